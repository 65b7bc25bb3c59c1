"""Chunk plan and fp32 logits tiles shared by both token log-prob entry points."""

from __future__ import annotations

import torch

# Elements of one fp32 [tokens, vocab] tile. On CPU 2M (8 MiB) keeps the tile and its scratch in
# L3 next to the weight chunk, which is what beat larger tiles in tools/bench_kernels.py; on GPU
# the tile is HBM-resident anyway and larger tiles mean fewer, longer GEMMs.
CPU_TILE_ELEMS = 1 << 21
GPU_TILE_ELEMS = 1 << 26
MAX_TOKEN_CHUNK = 4096


def plan(n_tokens: int, n_vocab: int, device: torch.device, tile_elems: int | None):
    """(token chunk, vocab chunk) with token_chunk * vocab_chunk <= tile_elems."""
    if tile_elems is None:
        tile_elems = GPU_TILE_ELEMS if device.type == "cuda" else CPU_TILE_ELEMS
    if tile_elems < 1:
        raise ValueError(f"tile_elems must be >= 1, got {tile_elems}")
    nt = max(1, min(n_tokens, MAX_TOKEN_CHUNK, tile_elems))
    vc = max(1, min(n_vocab, tile_elems // nt))
    return nt, vc


def ranges(total: int, step: int):
    for start in range(0, total, step):
        yield start, min(total, start + step)


def mm_f32(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """a @ b with an fp32 result; half inputs keep half GEMMs with fp32 accumulation/output."""
    if a.dtype == b.dtype == torch.float32:
        return torch.mm(a, b, out=out)
    half = next((t.dtype for t in (a, b) if t.dtype in (torch.bfloat16, torch.float16)), None)
    if a.is_cuda and half is not None:
        a, b = a.to(half), b.to(half)
        try:
            res = torch.mm(a, b, out_dtype=torch.float32)
        except (RuntimeError, TypeError):  # older torch without mm(out_dtype=)
            res = torch.mm(a, b).float()
    else:
        res = torch.mm(a.float(), b.float())
    if out is None:
        return res
    return out.copy_(res)


def local_labels(labels: torch.Tensor, start: int, width: int) -> torch.Tensor:
    """Column of each row's target inside [start, start + width), or -1; labels < 0 never hit."""
    loc = labels - start
    return torch.where((labels >= 0) & (loc < width) & (loc >= 0), loc, torch.full_like(loc, -1))
