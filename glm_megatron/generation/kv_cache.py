"""Batched generation with a KV cache for PPO rollouts, inside the training engine, at any layout.

The model runs through Megatron-Core's own static-batching inference path: a
``StaticInferenceContext`` passed as ``inference_context`` holds each layer's key/value cache
[max_seq, b, kv_heads, head_dim]; the model (in eval mode, which is what switches Megatron's
attention into inference mode) writes the new keys/values at ``sequence_len_offset`` and attends
over everything cached. One prefill call, then one token per call. The full-recompute greedy
generator in :mod:`glm_megatron.generation.greedy` is the oracle the tests compare against.

Why it is built this way:

* **Lockstep over prompts of different lengths** (Megatron's classic static scheme). All rows share
  one position counter, so the cache needs no per-row offsets and no padding masks (Megatron's
  static cache has neither). The prefill covers the shortest prompt; after that
  each step feeds one position for every row, and a row whose prompt is longer than the current
  position keeps its prompt token instead of the sampled one. Longer prompts are thus encoded one
  token per step: wasteful for very unequal lengths, exact always. Finished rows keep being fed
  (their outputs are ignored) because every row of the batch moves together.
* **World-wide agreement.** Expert parallelism puts different data-parallel ranks (with different
  prompts) into the same MoE all-to-all/all-gather, and pipeline/tensor parallelism put ranks into
  shared P2P and all-reduce calls: every rank must make the same model calls with the same tensor
  shapes. So before starting, one all-reduce over the world fixes the batch size (local batches
  are padded with dummy rows whose outputs are dropped), the prefill length (the shortest prompt
  anywhere) and the buffer length (the longest prompt + max_new_tokens anywhere); after each step
  one all-reduce says whether any row anywhere is still unfinished, and only when none is does
  every rank stop. A rank with no prompts takes part with dummy rows and returns ``[]``.
* **Sequence parallelism off while generating.** Training with MoE and TP > 1 needs sequence
  parallelism, which splits the sequence over the TP ranks; a one-token decode step cannot be
  split. :func:`sequence_parallel_disabled` turns it off on the TransformerConfig(s) and on every
  module that copied the flag at construction (parallel linears, the embeddings' reduce-scatter,
  the reward head, ...) and restores each value exactly afterwards. The pipeline schedules read
  ``config.sequence_parallel`` for their P2P shapes, so they follow.
* **TP rank 0's draw, broadcast to its TP group.** The TP ranks of a group hold identical
  gathered logits, but any difference in RNG state (or a non-deterministic kernel) would make
  them pick different tokens and silently desynchronise the replica. Sampling happens on every
  TP rank (so the generators advance alike) but TP rank 0's tokens are broadcast and used. Only
  the last pipeline stage has logits; it broadcasts the tokens to the other stages.
* **Pipeline parallelism** goes through Megatron's ``get_forward_backward_func`` (forward only),
  as :mod:`glm_megatron.models.forward` does. Without virtual stages each call is one micro-batch
  of the whole batch. With virtual stages (VPP) Megatron's interleaved schedule needs at least PP
  micro-batches: the batch is cut into PP micro-batches (padded to a multiple of PP) and each one
  writes its own rows of the cache through ``batch_size_offset``.

Not supported: models built with MTP layers (Megatron's postprocess needs labels for them: build
the generation model with ``build_mtp=False``) and context parallelism.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from megatron.core.inference.contexts import StaticInferenceContext
from megatron.core.model_parallel_config import ModelParallelConfig
from megatron.core.pipeline_parallel import get_forward_backward_func

from .sampling import SamplingParams, sample_tokens

__all__ = ["SamplingParams", "generate", "sequence_parallel_disabled"]

# A prompt length no real prompt has: a rank without prompts reports it so the MIN ignores it.
_NO_PROMPT = 1 << 40

# Module attributes that Megatron derives from ``config.sequence_parallel`` at construction (the
# same list as Megatron's own ``transformer.utils.set_model_to_sequence_parallel``).
_SEQUENCE_PARALLEL_ATTRS = ("sequence_parallel", "scatter_to_sequence_parallel", "reduce_scatter_embeddings")


@contextlib.contextmanager
def sequence_parallel_disabled(chunks: list[torch.nn.Module]):
    """Turn sequence parallelism off on the model (configs and modules); restore it exactly on exit.

    Megatron modules copy ``config.sequence_parallel`` into attributes of their own at
    construction (``sequence_parallel`` on the parallel linears, MTP, TE layers, our reward head;
    ``reduce_scatter_embeddings`` on the embeddings), so both the config and those must change.
    Parameter attributes of the same name (which only steer gradient reduction) are left alone.
    """
    configs: dict[int, ModelParallelConfig] = {}
    saved: list[tuple[object, str, bool]] = []
    for chunk in chunks:
        for module in chunk.modules():
            attrs = vars(module)
            if isinstance(attrs.get("config"), ModelParallelConfig):
                configs[id(attrs["config"])] = attrs["config"]
            saved += [(module, name, attrs[name]) for name in _SEQUENCE_PARALLEL_ATTRS
                      if isinstance(attrs.get(name), bool)]
    saved += [(config, "sequence_parallel", config.sequence_parallel) for config in configs.values()]
    try:
        for owner, name, _ in saved:
            setattr(owner, name, False)
        yield
    finally:
        for owner, name, value in saved:
            setattr(owner, name, value)


@contextlib.contextmanager
def _eval_mode(chunks: list[torch.nn.Module]):
    """eval() (Megatron's inference path needs ``not self.training``), restoring each module's mode."""
    modes = [(m, m.training) for chunk in chunks for m in chunk.modules()]
    try:
        for chunk in chunks:
            chunk.eval()
        yield
    finally:
        for module, training in modes:
            module.training = training


@dataclass(frozen=True)
class _Plan:
    """The shapes every rank agreed on."""

    batch: int  # rows per rank (local prompts + dummy rows)
    prefill: int  # shortest prompt anywhere: the first call feeds this many positions
    length: int  # buffer / KV-cache length: longest prompt + max_new_tokens anywhere


def _agree_on_plan(prompts: list[list[int]], max_new_tokens: int, micro_batches: int,
                   device) -> _Plan:
    local = torch.tensor([
        len(prompts),
        -min((len(p) for p in prompts), default=_NO_PROMPT),  # MAX of the negation is the MIN
        max((len(p) + max_new_tokens for p in prompts), default=0),
    ], dtype=torch.long, device=device)
    dist.all_reduce(local, op=dist.ReduceOp.MAX)
    batch, neg_prefill, length = (int(v) for v in local.tolist())
    batch = -(-batch // micro_batches) * micro_batches
    return _Plan(batch=batch, prefill=-neg_prefill, length=length)


def _check_supported(chunks: list[torch.nn.Module]) -> None:
    if ps.get_context_parallel_world_size() > 1:
        raise ValueError("KV-cache generation does not support context parallelism (CP > 1)")
    for chunk in chunks:
        for module in chunk.modules():
            config = vars(module).get("config")
            if getattr(config, "mtp_num_layers", None):
                raise ValueError(
                    "KV-cache generation needs a model built without MTP layers (build_mtp=False): "
                    "Megatron's postprocess computes the MTP loss and needs labels"
                )


def _last_logits(chunks, context: StaticInferenceContext, ids: torch.Tensor, start: int,
                 micro_batches: int) -> torch.Tensor | None:
    """fp32 logits [b, V] of the last fed position (last pipeline stage; None elsewhere).

    ``ids`` [b, n] are the tokens of positions ``start .. start+n-1``; the cache holds positions
    before ``start``. Does not advance ``context.sequence_len_offset`` (the caller does, once for
    all micro-batches).
    """
    batch, fed = ids.shape
    rows = batch // micro_batches
    positions = torch.arange(start, start + fed, device=ids.device).unsqueeze(0).expand(rows, fed)
    micro = [(i, ids[i * rows:(i + 1) * rows]) for i in range(micro_batches)]

    def step(data_iterator, model):
        index, micro_ids = next(data_iterator)
        # Each micro-batch owns rows [index*rows, (index+1)*rows) of every layer's cache.
        context.batch_size_offset = index * rows
        out = model(input_ids=micro_ids, position_ids=positions, attention_mask=None,
                    inference_context=context, runtime_gather_output=True)
        return out, lambda output, non_loss_data=True: output

    data = [iter(micro) for _ in chunks] if len(chunks) > 1 else iter(micro)
    store = get_forward_backward_func()(
        forward_step_func=step, data_iterator=data, model=chunks, num_microbatches=micro_batches,
        seq_length=fed, micro_batch_size=rows, forward_only=True, collect_non_loss_data=True,
    )
    context.batch_size_offset = 0
    if not ps.is_pipeline_last_stage(ignore_virtual=True):
        return None
    # materialize_only_last_token_logits (the context's default) keeps only position -1: [rows, 1, V].
    return torch.cat([out[:, -1].float() for out in store], dim=0)


def _share_tokens(logits: torch.Tensor | None, batch: int, sampling: SamplingParams,
                  generator: torch.Generator | None, device) -> torch.Tensor:
    """The next token of every row, identical on all ranks of the model replica."""
    if logits is not None:
        tokens = sample_tokens(logits, sampling, generator).to(device)
        if ps.get_tensor_model_parallel_world_size() > 1:
            dist.broadcast(tokens, src=ps.get_tensor_model_parallel_src_rank(),
                           group=ps.get_tensor_model_parallel_group())
    else:
        tokens = torch.empty(batch, dtype=torch.long, device=device)
    if ps.get_pipeline_model_parallel_world_size() > 1:
        dist.broadcast(tokens, src=ps.get_pipeline_model_parallel_last_rank(),
                       group=ps.get_pipeline_model_parallel_group())
    return tokens


def _anyone_unfinished(finished: torch.Tensor) -> bool:
    flag = (~finished).any().to(torch.long).reshape(1)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())


@torch.no_grad()
def generate(chunks: list[torch.nn.Module], prompts: list[list[int]], *, max_new_tokens: int,
             stop_ids, sampling: SamplingParams, generator: torch.Generator | None = None,
             pad_id: int = 0, device=None) -> list[list[int]]:
    """New token ids per prompt (a stop token included when one was produced). Collective over the
    whole world.

    ``chunks``: this rank's model chunks (Megatron ``GPTModel``, possibly DDP-wrapped), built
    without MTP. ``prompts``: this data-parallel rank's prompts; they must be identical on the
    ranks of one model replica (its TP and PP ranks) and may differ in number and content across
    data-parallel ranks (zero prompts is fine). Every rank of the world must call this together.
    ``generator``: for sampling, on the logits' device; only TP rank 0's draw is used (broadcast).
    Each row stops after a token in ``stop_ids`` or after ``max_new_tokens`` new tokens.
    The model's train/eval modes and sequence-parallel settings are restored on return.
    """
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    for i, prompt in enumerate(prompts):
        if len(prompt) == 0:
            raise ValueError(f"prompt {i} is empty: generation needs at least one prompt token")
    _check_supported(chunks)
    if device is None:
        device = next(chunks[0].parameters()).device
    # Megatron's interleaved schedule needs at least PP micro-batches.
    micro_batches = ps.get_pipeline_model_parallel_world_size() if len(chunks) > 1 else 1
    plan = _agree_on_plan(prompts, max_new_tokens, micro_batches, device)
    if plan.batch == 0 or plan.length <= plan.prefill:  # no prompts anywhere, or nothing to generate
        return [[] for _ in prompts]

    # Rows: the local prompts, then dummy rows (a copy of a real prompt keeps their activations
    # realistic; a rank without prompts uses pad tokens). Dummy rows are finished from the start.
    rows = [list(p) for p in prompts]
    filler = rows[0] if rows else [pad_id] * plan.prefill
    rows += [filler] * (plan.batch - len(rows))
    tokens = torch.full((plan.batch, plan.length), pad_id, dtype=torch.long)
    for i, row in enumerate(rows):
        tokens[i, :len(row)] = torch.tensor(row, dtype=torch.long)
    tokens = tokens.to(device)
    prompt_len = torch.tensor([len(r) for r in rows], dtype=torch.long, device=device)
    budget = torch.zeros(plan.batch, dtype=torch.long, device=device)
    budget[:len(prompts)] = max_new_tokens
    produced = torch.zeros(plan.batch, dtype=torch.long, device=device)
    finished = budget == 0
    stop = torch.tensor(sorted(set(int(s) for s in stop_ids)), dtype=torch.long, device=device)

    context = StaticInferenceContext(plan.batch, plan.length)
    context.materialize_only_last_token_logits = True  # we only ever read the last position
    start, end = 0, plan.prefill
    with _eval_mode(chunks), sequence_parallel_disabled(chunks):
        while True:
            logits = _last_logits(chunks, context, tokens[:, start:end], start, micro_batches)
            context.sequence_len_offset += end - start
            position = end  # the position these logits predict
            sampled = _share_tokens(logits, plan.batch, sampling, generator, device)
            generating = (prompt_len <= position) & ~finished
            # Rows still inside their prompt keep the prompt token; finished rows keep pad.
            tokens[:, position] = torch.where(generating, sampled, tokens[:, position])
            produced += generating.long()
            finished |= generating & (torch.isin(sampled, stop) | (produced >= budget))
            if position + 1 >= plan.length or not _anyone_unfinished(finished):
                break
            start, end = position, position + 1
    return [tokens[i, len(p):len(p) + int(produced[i])].tolist() for i, p in enumerate(prompts)]
