"""GLM-4-0414's sandwich norms as a Megatron ``TransformerLayer`` (model_type ``glm4``).

transformers' ``Glm4DecoderLayer`` normalises each sub-block's output before its residual add::

    h = x + post_self_attn_layernorm(attn(input_layernorm(x)))
    y = h + post_mlp_layernorm(mlp(post_attention_layernorm(h)))

Megatron's layer has no slot for the two extra norms. Rather than copying its long forward
(recompute, CUDA-graph and inference branches), :class:`SandwichNormLayer` owns the two norms
and applies them with forward hooks on its ``self_attention`` and ``mlp`` modules, which turn
their ``(output, bias)`` into ``(norm(output + bias), None)`` before Megatron's bias-dropout-add.
Hooks run on every call of the module, also when Megatron recomputes it under activation
checkpointing. The norms are :class:`~.norm.GLMRMSNorm` on the local and the Transformer Engine
path alike (two small norms per layer; their weights are marked sequence-parallel, so their
gradients are summed over the TP group under SP, like the input norm's).

Parameter names mirror HF's: ``decoder.layers.N.post_self_attn_layernorm.weight`` and
``decoder.layers.N.post_mlp_layernorm.weight``.
"""

from __future__ import annotations

from megatron.core.transformer.transformer_layer import TransformerLayer

from .norm import GLMRMSNorm


def _normalise_output(norm):
    def hook(_module, _inputs, output):
        out, bias = output
        if bias is not None:
            out = out + bias
        return norm(out), None

    return hook


class SandwichNormLayer(TransformerLayer):
    def __init__(self, config, submodules, *args, **kwargs):
        super().__init__(config, submodules, *args, **kwargs)
        eps, hidden = config.layernorm_epsilon, config.hidden_size
        self.post_self_attn_layernorm = GLMRMSNorm(config, hidden, eps=eps)
        self.post_mlp_layernorm = GLMRMSNorm(config, hidden, eps=eps)
        self.self_attention.register_forward_hook(_normalise_output(self.post_self_attn_layernorm))
        self.mlp.register_forward_hook(_normalise_output(self.post_mlp_layernorm))
