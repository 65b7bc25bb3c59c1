"""How LoRA adapter parameters are named inside our Megatron model (no Megatron import here).

An adapter of the linear ``linear_qkv`` is its sibling module ``linear_qkv_lora``; its
parameters are ``…linear_qkv_lora.adapters.<hf module>.lora_A`` and ``….lora_B.<part>``.
"""

ADAPTER_SUFFIX = "_lora"


def is_adapter_param(name: str) -> bool:
    return f"{ADAPTER_SUFFIX}.adapters." in name
