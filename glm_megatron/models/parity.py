"""Our Megatron model vs HF transformers on the same tokens: max |Δlogits| and top-1 agreement.

Used by ``tools/verify_hf_parity.py`` after every conversion. Rank 0 runs the HF reference
(the class config.json names: ``Glm4MoeForCausalLM``, ``GlmForCausalLM`` or ``Glm4ForCausalLM``,
through ``AutoModelForCausalLM``) and broadcasts its logits; the last pipeline stage compares. For models
too large for one host, ``num_layers`` truncates both models to their first layers (embedding,
first layers, final norm and output layer are still checked).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..parallel import ParallelLayout, initialize_parallel
from .checkpoint import load_model_weights
from .config import GLMConfig, load_hf_config, model_shape
from .forward import forward_logits
from .hf_checkpoint import HFCheckpointReader
from .loading import build_glm_model, load_hf_into_model


@dataclass
class ParityReport:
    layout: str
    source: str
    max_abs_diff: float
    mean_abs_diff: float
    top1_agreement: float
    tokens: int


def _hf_logits(hf_dir: str, cfg: GLMConfig, ids: torch.Tensor, dtype) -> torch.Tensor:
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    # The load report lists the MTP tensors transformers ignores; not news to our users.
    hf_logging.set_verbosity_error()
    hf_config = AutoConfig.from_pretrained(hf_dir)
    hf_config.num_hidden_layers = cfg.num_hidden_layers
    model = AutoModelForCausalLM.from_pretrained(hf_dir, config=hf_config, dtype=dtype)
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def run_parity(
    hf_dir: str,
    layout: ParallelLayout,
    *,
    load: str | None = None,
    num_layers: int | None = None,
    batch_size: int = 2,
    seq_len: int = 32,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> ParityReport | None:
    """Collective. Returns the report on global rank 0 (None elsewhere)."""
    cfg = load_hf_config(hf_dir)
    if num_layers:
        cfg = cfg.replace(
            num_hidden_layers=num_layers,
            first_k_dense_replace=min(cfg.first_k_dense_replace, num_layers),
        )
    ctx = initialize_parallel(layout, model_shape(cfg), training=False, seed=seed)
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, cfg.vocab_size, (batch_size, seq_len), generator=gen)

    chunks, _ = build_glm_model(cfg, ctx.layout, params_dtype=dtype)
    if load:
        load_model_weights(chunks, load)
    else:
        load_hf_into_model(chunks, cfg, HFCheckpointReader(hf_dir))
    for chunk in chunks:
        chunk.eval()
    ids_dev = ids.to(ctx.device)
    ours = forward_logits(chunks, ids_dev)

    ref = torch.empty(batch_size, seq_len, cfg.vocab_size, dtype=torch.float32, device=ctx.device)
    if ctx.rank == 0:
        ref.copy_(_hf_logits(hf_dir, cfg, ids, dtype))
    dist.broadcast(ref, src=0)

    stats = None
    if ours is not None:
        diff = (ours - ref).abs()
        stats = (
            float(diff.max()), float(diff.mean()),
            float((ours.argmax(-1) == ref.argmax(-1)).float().mean()),
        )
    gathered = [None] * ctx.world_size
    dist.all_gather_object(gathered, stats)
    if ctx.rank != 0:
        return None
    worst = max((s for s in gathered if s is not None), key=lambda s: s[0])
    return ParityReport(
        layout=ctx.layout.describe(), source=load or hf_dir, max_abs_diff=worst[0],
        mean_abs_diff=worst[1], top1_agreement=min(s[2] for s in gathered if s is not None),
        tokens=batch_size * seq_len,
    )
