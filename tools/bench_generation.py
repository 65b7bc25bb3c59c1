"""Greedy generation throughput: the KV-cache generator vs batched full recompute, world of one.

    python tools/bench_generation.py                     # glm4-moe-small, 8 prompts x 32 tokens, +64; ~1 min
    python tools/bench_generation.py --reps 3            # steadier on a loaded machine, ~3 min
    python tools/bench_generation.py --preset glm4-moe-tiny   # overhead-bound: per-call Python cost

Both sides decode the same batch of random prompts (equal lengths), greedily, fp32, with the model
built by ``build_glm_model`` in a world of one (``initialize_parallel``, gloo on CPU, NCCL when a
GPU is present):

* baseline: batched full recompute. Each step re-runs the whole batch's sequence so far through
  ``forward_logits`` (Megatron's forward-only schedule) and appends the argmax of the last
  position. This is the fair comparison: the same batching, no cache. (The per-prompt
  ``greedy_generate`` of the evaluation code is slower still: it is also unbatched.)
* ours: ``glm_megatron.generation.kv_cache.generate`` (Megatron's static KV cache, one prefill
  and then one token per step).

No stop tokens, so both produce exactly ``--new-tokens`` per prompt; the tool asserts that the two
produce the same tokens. The sides alternate rep by rep after one untimed warm-up each, so a change
in machine load hits both alike. Reported: the median and the best time over the reps (on a shared
machine the best is the least disturbed), tokens/s = batch x new tokens / time, and the ratio
baseline time / ours (> 1: the KV cache is faster).
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _single_process_env() -> None:
    """torchrun's variables for a world of one, unless a launcher already set them."""
    for var in ("SLURM_PROCID", "SLURM_NTASKS"):
        os.environ.pop(var, None)
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(_free_port()))
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")


def recompute_generate(chunks, prompts, new_tokens: int):
    """Batched greedy decoding without a cache: the whole sequence through the model every step."""
    import torch

    from glm_megatron.models.forward import forward_logits

    ids = prompts
    for _ in range(new_tokens):
        logits = forward_logits(chunks, ids)
        ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True).to(ids.device)], dim=1)
    return ids[:, prompts.shape[1]:].tolist()


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="glm4-moe-small")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--reps", type=int, default=1,
                   help="timed runs per side, alternating (after one warm-up each)")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    if min(a.batch, a.prompt_len, a.new_tokens, a.reps) < 1:
        p.error("--batch, --prompt-len, --new-tokens and --reps must be >= 1")

    _single_process_env()
    import torch

    torch.set_num_threads(a.threads)
    from glm_megatron.generation.kv_cache import SamplingParams, generate
    from glm_megatron.models import get_preset
    from glm_megatron.models.config import model_shape
    from glm_megatron.models.loading import build_glm_model
    from glm_megatron.parallel import (
        ParallelLayout,
        destroy_parallel,
        initialize_parallel,
        install_cpu_support,
    )

    install_cpu_support()
    cfg = get_preset(a.preset)
    ctx = initialize_parallel(ParallelLayout(), model_shape(cfg), seed=a.seed)
    chunks, _ = build_glm_model(cfg, ctx.layout)
    for chunk in chunks:
        chunk.eval()
    params = sum(p.numel() for c in chunks for p in c.parameters())
    gen = torch.Generator().manual_seed(a.seed)
    prompts = torch.randint(3, cfg.vocab_size, (a.batch, a.prompt_len), generator=gen).to(ctx.device)
    prompt_lists = prompts.tolist()
    greedy = SamplingParams(greedy=True)

    def sync():
        if ctx.device.type == "cuda":
            torch.cuda.synchronize()

    sides = {
        "recompute": lambda n: recompute_generate(chunks, prompts, n),
        "kv": lambda n: generate(chunks, prompt_lists, max_new_tokens=n, stop_ids=[], sampling=greedy,
                                 device=ctx.device),
    }
    times = {name: [] for name in sides}
    outputs = {}
    for run in sides.values():  # warm-up: first-call allocations, lazy inits
        run(min(2, a.new_tokens))
    for _ in range(a.reps):
        for name, run in sides.items():
            sync()
            start = time.perf_counter()
            outputs[name] = run(a.new_tokens)
            sync()
            times[name].append(time.perf_counter() - start)

    same = outputs["kv"] == outputs["recompute"]
    distinct = len({t for row in outputs["kv"] for t in row})
    tokens = a.batch * a.new_tokens
    base, ours = statistics.median(times["recompute"]), statistics.median(times["kv"])
    best_base, best_ours = min(times["recompute"]), min(times["kv"])
    print(f"# greedy generation, {a.preset} ({params / 1e6:.1f}M params), batch {a.batch} x prompt "
          f"{a.prompt_len} -> +{a.new_tokens} tokens, fp32, device {ctx.device}, "
          f"{torch.get_num_threads()} CPU threads, {a.reps} rep(s)")
    columns = f"{'median s':>9}{'tokens/s':>10}{'ratio':>8}{'best s':>9}{'tokens/s':>10}{'ratio':>8}"
    print(f"{'method':52}{columns}")
    print(f"{'baseline: batched full recompute (forward_logits)':52}{base:9.2f}{tokens / base:10.1f}"
          f"{1.0:7.2f}x{best_base:9.2f}{tokens / best_base:10.1f}{1.0:7.2f}x")
    print(f"{'ours: KV cache (kv_generation.generate)':52}{ours:9.2f}{tokens / ours:10.1f}"
          f"{base / ours:7.2f}x{best_ours:9.2f}{tokens / best_ours:10.1f}{best_base / best_ours:7.2f}x")
    print("per-rep times s: " + ", ".join(
        f"{name} " + " ".join(f"{t:.2f}" for t in times[name]) for name in sides))
    print(f"same tokens: {same} ({distinct} distinct generated token ids)")
    destroy_parallel()
    if not same:
        raise SystemExit("FAIL: the KV-cache generator and full recompute produced different tokens")


if __name__ == "__main__":
    main()
