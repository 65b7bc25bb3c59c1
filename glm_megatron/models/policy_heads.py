"""The policy's output layer in PPO: hidden states for the fused log-prob kernel, and a value head.

PPO never needs full-vocabulary logits in training: ``kernels.token_logprobs`` takes the hidden
states and this rank's vocabulary shard of the LM head and returns per-token log-probs and
entropy. So while scoring and training, ``output_layer`` (Megatron's ColumnParallelLinear, kept
as it is for checkpoints and for generation) is switched to *hidden* mode: ``GPTModel`` still
runs its final norm and pipeline logic, but gets back ``[b, s, H]`` hidden states, prepared for
the kernel's tensor-parallel contract:

* the hidden states go through ``copy_to_tensor_model_parallel_region`` (no sequence
  parallelism) or ``gather_from_sequence_parallel_region`` (sequence parallelism), whose
  backward sums the partial hidden gradients of the vocabulary shards over TP, exactly as
  ColumnParallelLinear's own backward does;
* with a value head (``rlhf.value_model: null``), its score is appended as channel ``H``:
  ``[b, s, H + 1]``. The head is replicated over TP and every TP rank computes the same value
  loss, so its input is *not* reduced in backward (a sequence-parallel gather that splits the
  gradient, like the reward head), while the LM branch's input is.

The value head is a child ``value_head`` of the model chunk holding the output layer (key
``value_head.weight``, [1, H], replicated); HF export skips it.
"""

from __future__ import annotations

import contextlib

import torch
from megatron.core import parallel_state as ps
from megatron.core.tensor_parallel import (
    copy_to_tensor_model_parallel_region,
    gather_from_sequence_parallel_region,
)

from .reward_head import RewardHead

VALUE_HEAD_KEY = "value_head.weight"


def _hidden_forward(layer, value_head):
    """The replacement ``output_layer.forward`` used in hidden mode."""

    def forward(hidden, weight=None, runtime_gather_output=None):
        tp = ps.get_tensor_model_parallel_world_size()
        if layer.sequence_parallel and tp > 1:
            lm_hidden = gather_from_sequence_parallel_region(hidden, tensor_parallel_output_grad=True)
        else:
            lm_hidden = copy_to_tensor_model_parallel_region(hidden)
        if value_head is None:
            return lm_hidden, None
        # The value head gathers (and splits its gradient) by itself, like the reward head.
        value, _ = value_head(hidden)
        return torch.cat([lm_hidden, value.to(lm_hidden.dtype)], dim=-1), None

    return forward


def output_chunks(chunks) -> list:
    return [c for c in chunks if getattr(c, "post_process", False)]


def attach_value_head(chunks, tconfig, seed: int) -> None:
    """A value head on the chunk holding the output layer (last pipeline stage); call after the
    LM weights are loaded, before DDP wrapping."""
    for chunk in output_chunks(chunks):
        chunk.value_head = RewardHead(tconfig.hidden_size, tconfig.sequence_parallel,
                                      tconfig.params_dtype, seed)


@contextlib.contextmanager
def hidden_output(chunks):
    """Within the block, the model returns hidden states (+ value channel) instead of logits."""
    patched = []
    for chunk in output_chunks(chunks):
        layer = chunk.output_layer
        layer.forward = _hidden_forward(layer, getattr(chunk, "value_head", None))
        patched.append(layer)
    try:
        yield
    finally:
        for layer in patched:
            del layer.forward  # back to the class's forward


def lm_head_weight(model) -> torch.Tensor:
    """This rank's [V/TP, H] LM-head shard of a (possibly DDP-wrapped) last-stage chunk."""
    module = model
    while not hasattr(module, "output_layer") and hasattr(module, "module"):
        module = module.module
    return module.output_layer.weight


def split_value(output: torch.Tensor, hidden_size: int):
    """``[b, s, H(+1)]`` -> (hidden [b, s, H], value [b, s] or None)."""
    if output.shape[-1] == hidden_size + 1:
        return output[..., :hidden_size], output[..., hidden_size].float()
    return output, None
