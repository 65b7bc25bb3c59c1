"""Benchmark the kernels against the paths peers use, side by side, on this machine.

    python tools/bench_kernels.py            # full shapes (N=2048, H=512, V=151552; GAE 512 x 8192)
    python tools/bench_kernels.py --quick    # small shapes, seconds

Log-prob + KL (k3) forward + backward, TP=1 and TP=2 (two gloo processes): ours
(`glm_kernels.token_logprobs` from hidden states) vs Megatron-Core's `vocab_parallel_cross_entropy`
on materialised logits (hidden @ W.T, then the CE, as verl/slime/NeMo-RL do).

Peak memory on CPU: tracemalloc does not see torch's allocations and torch keeps no CPU allocator
statistics, so each measurement runs in a fresh process: inputs are built and touched, the kernel's
peak-RSS counter is reset (`echo 5 > /proc/self/clear_refs`), one forward+backward runs, and extra
peak = VmHWM - RSS at reset - bytes of the weight gradient (which both paths must produce). Large
torch buffers are mmap-backed, so RSS follows allocation closely. Time = best of `--reps` runs after
that first one, in the same process.

GAE: ours (`glm_kernels.compute_gae`: numba on CPU, and its vectorised torch path) vs a
per-timestep Python loop (verl/OpenRLHF/TRL style), a chunked-matmul scan (slime style) and the
memory floor (cloning the same input bytes), each under two fixed glibc malloc policies (outputs
on reused pages / on fresh pages; see MALLOC_POLICIES).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


# ----------------------------------------------------------------------------- measurement utils
def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak():
    Path("/proc/self/clear_refs").write_text("5")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ----------------------------------------------------------------------------- log-prob worker
def _logprob_rank(rank, world, impl, n, h, v, reps, port, out):
    import torch
    import torch.distributed as dist

    torch.set_num_threads(max(1, 2 // world))
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    import glm_kernels

    ps.initialize_model_parallel(tensor_model_parallel_size=world)
    group = ps.get_tensor_model_parallel_group()
    g = torch.Generator().manual_seed(0)
    vs = v // world
    hidden = torch.randn(n, h, generator=g)
    weight = (torch.randn(v, h, generator=g) * 0.02)[rank * vs : (rank + 1) * vs].clone()
    labels = torch.randint(0, v, (n,), generator=g)
    ref = torch.randn(n, generator=g) - 10.0
    w_lp, w_kl = torch.randn(n, generator=g), torch.randn(n, generator=g)

    def step():
        hd = hidden.detach().requires_grad_()
        wt = weight.detach().requires_grad_()
        if impl == "fused":
            out = glm_kernels.token_logprobs(hd, wt, labels, tp_group=group, ref_logprobs=ref, kl_type="k3")
            logp, kl = out.logprobs, out.kl
        else:  # the peers' path: materialised logits, Megatron's vocab-parallel CE
            logits = hd @ wt.t()
            logp = -vocab_parallel_cross_entropy(logits, labels)
            kl = glm_kernels.kl_penalty(logp, ref, "k3")
        ((logp * w_lp).sum() + (kl * w_kl).sum()).backward()
        return logp.detach(), hd.grad, wt.grad

    dist.barrier()
    _reset_peak()
    base = _rss_kib("VmRSS")
    logp, gh, gw = step()
    extra = (_rss_kib("VmHWM") - base) * 1024 - gw.numel() * gw.element_size()
    checksum = float(logp.double().sum())
    del logp, gh, gw
    times = []
    for _ in range(reps):
        dist.barrier()
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    Path(f"{out}.{rank}").write_text(json.dumps({"extra": extra, "time": min(times), "checksum": checksum}))
    dist.destroy_process_group()


def _logprob_worker(args):
    import torch.multiprocessing as mp

    port = _free_port()
    mp.spawn(
        _logprob_rank,
        nprocs=args.tp,
        join=True,
        args=(args.tp, args.impl, args.n, args.hidden, args.vocab, args.reps, port, args.out),
    )
    ranks = [json.loads(Path(f"{args.out}.{r}").read_text()) for r in range(args.tp)]
    print(
        json.dumps(
            {
                "extra": max(r["extra"] for r in ranks),
                "time": max(r["time"] for r in ranks),
                "checksum": ranks[0]["checksum"],
            }
        )
    )


def _run_logprob(impl, tp, a):
    out = f"/tmp/bench_kernels_{os.getpid()}_{impl}_{tp}"
    cmd = [
        sys.executable,
        __file__,
        "--worker",
        "logprob",
        "--impl",
        impl,
        "--tp",
        str(tp),
        "--n",
        str(a.n),
        "--hidden",
        str(a.hidden),
        "--vocab",
        str(a.vocab),
        "--reps",
        str(a.reps),
        "--out",
        out,
    ]
    res = subprocess.run(
        cmd, check=False, capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="2")
    )
    if res.returncode != 0:
        raise RuntimeError(f"{impl} TP={tp} failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------- GAE baselines
def gae_python_loop(rewards, values, mask, gamma, lam):
    """verl's compute_gae_advantage_return loop (also OpenRLHF / TRL): one step per token."""
    import torch

    nextvalues, lastgaelam, rev = 0, 0, []
    for t in reversed(range(rewards.shape[-1])):
        delta = rewards[:, t] + gamma * nextvalues - values[:, t]
        lastgaelam_ = delta + gamma * lam * lastgaelam
        nextvalues = values[:, t] * mask[:, t] + (1 - mask[:, t]) * nextvalues
        lastgaelam = lastgaelam_ * mask[:, t] + (1 - mask[:, t]) * lastgaelam
        rev.append(lastgaelam)
    adv = torch.stack(rev[::-1], dim=1)
    return adv, adv + values


def gae_chunked_matmul(rewards, values, gamma, lam, chunk=128):
    """slime's chunked_gae: intra-chunk scan as a [C, C] matmul, sequential carry across chunks."""
    import torch

    B, T = rewards.shape
    nxt = torch.cat([values[:, 1:], torch.zeros(B, 1)], dim=1)
    deltas = torch.flip(rewards + gamma * nxt - values, dims=[1])
    w = gamma * lam
    idx = torch.arange(chunk)
    diff = idx[None, :] - idx[:, None]
    M = torch.where(diff >= 0, w ** diff.clamp(min=0).double(), 0.0).float()
    pow_vec = w ** torch.arange(1, chunk + 1, dtype=torch.float32)
    n_chunks = T // chunk
    local = (deltas.view(B * n_chunks, chunk) @ M).view(B, n_chunks, chunk)
    out = torch.empty(B, T)
    s_prev = torch.zeros(B)
    for c in range(n_chunks):
        s = local[:, c] + s_prev[:, None] * pow_vec
        out[:, c * chunk : (c + 1) * chunk] = s
        s_prev = s[:, -1]
    adv = torch.flip(out, dims=[1])
    return adv, adv + values


def _best(fn, reps):
    fn()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return min(ts)


OURS_GAE = "ours (glm_kernels.compute_gae: numba on CPU)"
FLOOR_GAE = "memory floor (clone inputs = same bytes)"
SLIME_GAE = "slime-style chunked matmul scan"
LOOP_GAE = "verl-style per-timestep python loop"

# A GAE call's time hangs on whether its 16 MiB outputs land on pages glibc kept from the last
# call or on fresh mmap'ed ones (a page fault per 4 KiB). Left alone, glibc's dynamic mmap
# threshold flips between the two, which made runs bimodal; so every GAE row is measured under
# both fixed policies (M_MMAP_THRESHOLD caps at 32 MiB: bigger arrays are always fresh).
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
MALLOC_POLICIES = {"reused pages": (32 << 20, 1 << 30), "fresh pages": (1 << 20, 128 << 10)}


def _set_malloc_policy(name):
    mmap_threshold, trim_threshold = MALLOC_POLICIES[name]
    libc = ctypes.CDLL("libc.so.6")
    libc.mallopt(_M_MMAP_THRESHOLD, mmap_threshold)
    libc.mallopt(_M_TRIM_THRESHOLD, trim_threshold)


def bench_gae(a):
    """{policy: {row: seconds}} and the max |ours - loop|."""
    import torch

    import glm_kernels

    torch.set_num_threads(2)
    B, T = a.gae_b, a.gae_t
    g = torch.Generator().manual_seed(0)
    r, v = torch.randn(B, T, generator=g), torch.randn(B, T, generator=g)
    # Right-padded responses of random length in [T/2, T] (slime's kernel ignores the mask; its
    # cost does not depend on it).
    lens = torch.randint(T // 2, T + 1, (B,), generator=g)
    m = torch.arange(T)[None] < lens[:, None]
    table = {}
    for policy in MALLOC_POLICIES:
        _set_malloc_policy(policy)
        table[policy] = {
            OURS_GAE: _best(lambda: glm_kernels.compute_gae(r, v, m, 0.99, 0.95), a.reps * 3),
            "ours, vectorised torch path (backend='torch')": _best(
                lambda: glm_kernels.compute_gae(r, v, m, 0.99, 0.95, backend="torch"), a.reps * 3
            ),
            SLIME_GAE: _best(lambda: gae_chunked_matmul(r, v, 0.99, 0.95), a.reps * 3),
            FLOOR_GAE: _best(lambda: (r.clone(), v.clone(), m.clone()), a.reps * 3),
        }
    t0 = time.perf_counter()  # ~1.5 s of Python: measured once, its allocations do not matter
    adv_loop, _ = gae_python_loop(r, v, m.float(), 0.99, 0.95)
    loop_time = time.perf_counter() - t0
    for rows in table.values():
        rows[LOOP_GAE] = loop_time
    adv, _ = glm_kernels.compute_gae(r, v, m, 0.99, 0.95)
    return table, float((adv - adv_loop).abs().max())


def report_gae(a):
    table, err = bench_gae(a)
    print(f"# GAE B={a.gae_b} T={a.gae_t} fp32, right-padded random lengths (max |ours - loop|: {err:.1e})")
    print(f"  {'':48}" + "".join(f"{p:>16}" for p in table))
    for name in next(iter(table.values())):
        print(f"  {name:48}" + "".join(f"{rows[name] * 1e3:13.1f} ms" for rows in table.values()))
    for policy, rows in table.items():
        ours, loop, slime, floor = (rows[k] for k in (OURS_GAE, LOOP_GAE, SLIME_GAE, FLOOR_GAE))
        print(
            f"  {policy}: speed-up vs loop {loop / ours:.1f}x (goal >= 25: {_met(loop / ours >= 25)}); "
            f"vs slime-style {slime / ours:.2f}x (goal > 1: {_met(slime > ours)}); "
            f"time / memory floor {ours / floor:.2f}x (goal <= 2: {_met(ours <= 2 * floor)})"
        )


# ----------------------------------------------------------------------------- log-prob table
LOGPROB_IMPLS = {
    "megatron": "Megatron vocab_parallel_cross_entropy",
    "fused": "ours (glm_kernels.token_logprobs)",
}


def bench_logprob(a):
    print(f"# log-prob + KL(k3) fwd+bwd, N={a.n} H={a.hidden} V={a.vocab} fp32, 2 CPU threads in all")
    print(f"{'':8}{'impl':42}{'extra peak MiB':>15}{'time s':>9}{'mem ratio':>11}{'time ratio':>12}")
    for tp in (1, 2):
        res = {impl: _run_logprob(impl, tp, a) for impl in LOGPROB_IMPLS}
        base = res["megatron"]
        for impl, name in LOGPROB_IMPLS.items():
            r = res[impl]
            mem, tim = r["extra"] / base["extra"], r["time"] / base["time"]
            same = abs(r["checksum"] - base["checksum"]) <= 1e-4 * abs(base["checksum"])
            print(
                f"TP={tp:<5} {name:42}{r['extra'] / 2**20:15.1f}{r['time']:9.2f}{mem:11.3f}{tim:11.2f}x"
                + ("" if same else "  (log-probs DIFFER from Megatron's)")
            )
        mem, tim = res["fused"]["extra"] / base["extra"], res["fused"]["time"] / base["time"]
        print(f"TP={tp:<5} goals: memory <= 0.125 {_met(mem <= 0.125)}, time <= 1.0x {_met(tim <= 1.0)}")


# ----------------------------------------------------------------------------- main
def _met(ok: bool) -> str:
    return "met" if ok else "NOT met"


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small shapes (N=512, V=32768; GAE 64 x 2048)")
    p.add_argument("--n", type=int, default=2048)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--vocab", type=int, default=151552)
    p.add_argument("--gae-b", type=int, default=512)
    p.add_argument("--gae-t", type=int, default=8192)
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--tp", type=int, default=1)
    p.add_argument("--only", choices=["logprob", "gae"], default=None)
    p.add_argument("--worker", choices=["logprob"], help=argparse.SUPPRESS)
    p.add_argument("--impl", choices=list(LOGPROB_IMPLS), help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        return _logprob_worker(a)
    if a.quick:
        a.n, a.vocab, a.gae_b, a.gae_t, a.reps = 512, 32768, 64, 2048, 1
    if a.only != "gae":
        bench_logprob(a)
    if a.only != "logprob":
        report_gae(a)

if __name__ == "__main__":
    main()
