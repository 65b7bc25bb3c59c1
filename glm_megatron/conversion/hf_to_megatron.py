"""HF safetensors -> Megatron ``torch_dist`` weights, at any layout, one process or many.

Each rank builds only its part of the model (its pipeline stage, TP slice and experts) on the
meta-free CPU/GPU without random initialisation, reads only the HF tensors that part needs, and
writes its shards through Megatron's ``dist_checkpointing``. A rank's memory is about its shard
plus one full tensor at a time. The checkpoint stores global tensors, so it loads at any other
layout; the conversion layout only decides how the work and memory are spread.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..models.config import ConfigError, GLMConfig, load_hf_config, model_shape
from ..models.hf_checkpoint import HFCheckpointReader
from ..models.hf_layout import expected_hf_tensors, is_mtp_tensor
from ..parallel import ParallelLayout, initialize_parallel
from . import output_dir, weights_dir

# A conversion must not round: these are the HF dtypes a parameter dtype holds exactly.
_LOSSLESS = {
    torch.float32: {torch.float32, torch.bfloat16, torch.float16},
    torch.bfloat16: {torch.bfloat16},
    torch.float16: {torch.float16},
}
_FP32_TENSORS = ("e_score_correction_bias",)  # kept fp32 on both sides


@dataclass
class HFCheckResult:
    cfg: GLMConfig
    with_mtp: bool
    params_dtype: torch.dtype
    hf_dtypes: dict


def compare_configs(cfg: GLMConfig, expected: GLMConfig, label: str) -> None:
    """Raise naming every architectural field where the checkpoint differs from ``expected``."""
    ignore = {"eos_token_id", "pad_token_id", "bos_token_id", "max_position_embeddings",
              "initializer_range"}
    diffs = [
        f"{f}: checkpoint {getattr(cfg, f)!r} vs {label} {getattr(expected, f)!r}"
        for f in cfg.__dataclass_fields__
        if f not in ignore and getattr(cfg, f) != getattr(expected, f)
    ]
    if diffs:
        raise ConfigError(f"config does not match {label}:\n  - " + "\n  - ".join(diffs))


def check_hf_checkpoint(hf_dir: str, *, preset: GLMConfig | None = None,
                        params_dtype: torch.dtype | None = None) -> HFCheckResult:
    """Validate names, shapes and dtypes of an HF checkpoint before any work."""
    cfg = load_hf_config(hf_dir)
    if preset is not None:
        compare_configs(cfg, preset, "the preset")
    reader = HFCheckpointReader(hf_dir)
    present = set(reader.names())
    has_mtp = any(is_mtp_tensor(n, cfg) for n in present)
    with_mtp = has_mtp and cfg.num_nextn_predict_layers > 0
    expected = expected_hf_tensors(cfg, with_mtp=with_mtp)
    missing = sorted(set(expected) - present)
    unexpected = sorted(present - set(expected))
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing tensor(s): {', '.join(missing[:20])}"
                        + (" ..." if len(missing) > 20 else ""))
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected tensor(s): {', '.join(unexpected[:20])}"
                        + (" ..." if len(unexpected) > 20 else ""))
    for name in sorted(set(expected) & present):
        found = reader.shape(name)
        if found != expected[name]:
            problems.append(f"shape mismatch: {name}: expected {expected[name]}, found {found}")
    if problems:
        raise ConfigError(f"{hf_dir}: checkpoint does not match its config.json:\n  - "
                          + "\n  - ".join(problems))
    hf_dtypes = {n: reader.dtype(n) for n in expected}
    if params_dtype is None:
        params_dtype = hf_dtypes["model.embed_tokens.weight"]
    lossy = [
        f"{n} ({d})" for n, d in hf_dtypes.items()
        if not n.endswith(_FP32_TENSORS) and d not in _LOSSLESS.get(params_dtype, {params_dtype})
    ]
    if lossy:
        raise ConfigError(
            f"{hf_dir}: {len(lossy)} tensor(s) cannot be held exactly in {params_dtype}: "
            f"{', '.join(lossy[:10])} (pass --dtype fp32)"
        )
    return HFCheckResult(cfg, with_mtp, params_dtype,
                         {n: str(d).replace("torch.", "") for n, d in hf_dtypes.items()})


def convert_hf_to_megatron(
    hf_dir: str,
    out_dir: str,
    layout: ParallelLayout,
    *,
    preset: GLMConfig | None = None,
    params_dtype: torch.dtype | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> dict:
    """Collective. Returns a summary (tensors, bytes, seconds) on every rank."""
    from ..models.checkpoint import save_model_weights
    from ..models.loading import build_glm_model, load_hf_into_model

    start = time.time()
    output_dir.check_output_dir(out_dir, overwrite, inputs=(hf_dir,))
    check = check_hf_checkpoint(hf_dir, preset=preset, params_dtype=params_dtype)
    ctx = initialize_parallel(layout, model_shape(check.cfg), training=False)
    tmp = output_dir.partial_path(out_dir)
    if ctx.is_main:
        output_dir.start(out_dir)
    dist.barrier()

    # No random initialisation: every value is overwritten from the checkpoint.
    chunks, _ = build_glm_model(check.cfg, ctx.layout, params_dtype=check.params_dtype,
                                build_mtp=check.with_mtp, perform_initialization=False)
    bar = _progress_bar(ctx.is_main and progress, chunks)
    totals = {"bytes": 0}

    def on_tensor(name: str, nbytes: int) -> None:
        totals["bytes"] += nbytes
        if bar is not None:
            bar.update(1)
            bar.set_postfix_str(f"{totals['bytes'] / 2**30:.2f} GiB", refresh=False)

    used = load_hf_into_model(chunks, check.cfg, HFCheckpointReader(hf_dir), on_tensor=on_tensor)
    if bar is not None:
        bar.close()
    # Nothing may be dropped silently: together the ranks must have used every HF tensor.
    gathered = [None] * ctx.world_size
    dist.all_gather_object(gathered, sorted(used))
    used_anywhere = set().union(*map(set, gathered))
    unused = sorted(set(check.hf_dtypes) - used_anywhere)
    if unused:
        raise ConfigError(f"{hf_dir}: {len(unused)} tensor(s) were not converted: {unused[:20]}")
    save_model_weights(chunks, tmp)
    done = torch.tensor([totals["bytes"]], dtype=torch.float64)
    dist.all_reduce(done)
    if ctx.is_main:
        weights_dir.write_json(os.path.join(tmp, weights_dir.CONFIG_FILE), check.cfg.to_hf_dict())
        weights_dir.write_json(os.path.join(tmp, weights_dir.INFO_FILE), {
            "format": weights_dir.FORMAT, "version": 1,
            "source": os.path.abspath(hf_dir),
            "params_dtype": str(check.params_dtype).replace("torch.", ""),
            "mtp": check.with_mtp,
            "hf_dtypes": check.hf_dtypes,
            "conversion_layout": ctx.layout.describe(),
        })
        output_dir.finish(out_dir)
    dist.barrier()
    return {"tensors": len(used_anywhere), "bytes": int(done[0]), "seconds": time.time() - start,
            "layout": ctx.layout.describe(), "mtp": check.with_mtp}


def _progress_bar(enabled: bool, chunks):
    if not enabled:
        return None
    from tqdm import tqdm

    count = sum(1 for c in chunks for _ in c.parameters())
    count += sum(1 for c in chunks for n, _ in c.named_buffers() if n.endswith("expert_bias"))
    return tqdm(total=count, desc="hf-to-megatron (rank 0)", unit="tensor", mininterval=2.0)
