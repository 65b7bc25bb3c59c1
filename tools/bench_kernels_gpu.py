"""The kernels on a GPU: achieved TFLOP/s and HBM GB/s against the device's peak, side by side
with the materialised-logits path.

    python tools/bench_kernels_gpu.py                # N=16384 H=5120 V=151552/8 bf16; GAE 4096 x 8192
    python tools/bench_kernels_gpu.py --device cpu --quick   # the same code on CPU (smoke run)

Log-prob + KL(k3) forward + backward of `glm_kernels.token_logprobs` (Triton on CUDA) from bf16 hidden
states and this rank's vocab shard (GLM-4.6 at TP=8: V/8 = 18944 rows), against
`hidden @ weight.T` then an fp32 cross-entropy on the materialised logits (what the peers do).
TFLOP/s is reported two ways: *useful* counts the 3 GEMMs any implementation needs (forward,
hidden and weight gradients: 6·N·H·V), *executed* adds the forward GEMM our backward repeats
(8·N·H·V). Peak memory is torch.cuda.max_memory_allocated above the inputs.

GAE: `glm_kernels.compute_gae` (Triton scan) on fp32 [B, T] with a right-padded mask; bytes moved =
r, v, mask read + advantages, returns written (17 per element), against the bytes a plain
`clone()` of the inputs moves at the device's copy speed.

The goals (issue 4): log-prob at >= 50 % of bf16 peak, GAE at >= 50 % of HBM bandwidth.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import glm_kernels  # noqa: E402

# Dense bf16 tensor-core TFLOP/s and HBM GB/s (vendor datasheets), by device-name fragment; the
# first fragment found in torch.cuda.get_device_name() wins, so the PCIe part precedes "H100".
GPU_PEAKS = {
    "H200": (989.4, 4800.0),
    "H100 PCIe": (756.0, 2000.0),
    "H100": (989.4, 3350.0),
    "A100": (312.0, 2039.0),
}


def device_peaks(device: torch.device):
    """(name, peak bf16 TFLOP/s or None, peak GB/s or None)."""
    if device.type != "cuda":
        return "cpu", None, None
    name = torch.cuda.get_device_name(device)
    for fragment, peaks in GPU_PEAKS.items():
        if fragment in name:
            return name, *peaks
    return name, None, None


def best_time(fn, reps: int, device: torch.device) -> float:
    """Seconds of the fastest of `reps` calls after one warm-up (CUDA events on a GPU)."""
    fn()
    best = float("inf")
    for _ in range(reps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            best = min(best, start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            best = min(best, time.perf_counter() - t0)
    return best


def peak_extra_bytes(fn, device: torch.device) -> int | None:
    if device.type != "cuda":
        return None
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated(device) - base


def _pct(value, peak) -> str:
    return "n/a" if peak is None else f"{100 * value / peak:.0f} %"


def bench_logprob(a, device, peak_tflops):
    g = torch.Generator().manual_seed(0)
    n, h, v = a.n, a.hidden, a.vocab
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    hidden = torch.randn(n, h, generator=g).to(device, dtype)
    weight = (torch.randn(v, h, generator=g) * 0.02).to(device, dtype)
    labels = torch.randint(0, v, (n,), generator=g).to(device)
    ref, w_lp, w_kl = (torch.randn(n, generator=g).to(device) for _ in range(3))

    def ours():
        hd, wt = hidden.detach().requires_grad_(), weight.detach().requires_grad_()
        out = glm_kernels.token_logprobs(hd, wt, labels, ref_logprobs=ref - 10.0, kl_type="k3")
        ((out.logprobs * w_lp).sum() + (out.kl * w_kl).sum()).backward()

    def materialised():
        hd, wt = hidden.detach().requires_grad_(), weight.detach().requires_grad_()
        logp = -torch.nn.functional.cross_entropy((hd @ wt.t()).float(), labels, reduction="none")
        kl = glm_kernels.kl_penalty(logp, ref - 10.0, "k3")
        ((logp * w_lp).sum() + (kl * w_kl).sum()).backward()

    useful, executed = 6 * n * h * v, 8 * n * h * v
    print(f"# log-prob + KL(k3) fwd+bwd, N={n} H={h} V/TP={v} {str(dtype).replace('torch.', '')}")
    for name, fn, flops in (("ours (glm_kernels.token_logprobs)", ours, executed),
                            ("materialised logits + cross_entropy", materialised, useful)):
        t = best_time(fn, a.reps, device)
        extra = peak_extra_bytes(fn, device)
        mem = "n/a" if extra is None else f"{extra / 2**30:.2f} GiB"
        print(f"  {name:38} {t * 1e3:9.2f} ms  useful {useful / t / 1e12:7.1f} TFLOP/s "
              f"({_pct(useful / t / 1e12, peak_tflops)} of peak)  executed {flops / t / 1e12:7.1f} "
              f"TFLOP/s  extra peak memory {mem}")


def bench_gae(a, device, peak_gbs):
    g = torch.Generator().manual_seed(0)
    b, t = a.gae_b, a.gae_t
    r, v = (torch.randn(b, t, generator=g).to(device) for _ in range(2))
    lens = torch.randint(t // 2, t + 1, (b,), generator=g)
    m = (torch.arange(t)[None] < lens[:, None]).to(device)
    moved = b * t * (4 + 4 + 1 + 4 + 4)
    ours = best_time(lambda: glm_kernels.compute_gae(r, v, m, 0.99, 0.95), a.reps * 3, device)
    copy = best_time(lambda: (r.clone(), v.clone(), m.clone()), a.reps * 3, device)
    copied = 2 * b * t * (4 + 4 + 1)
    print(f"# GAE B={b} T={t} fp32, right-padded")
    print(f"  ours (glm_kernels.compute_gae) {ours * 1e3:9.3f} ms  {moved / ours / 1e9:8.1f} GB/s "
          f"({_pct(moved / ours / 1e9, peak_gbs)} of HBM peak)")
    print(f"  clone of the inputs            {copy * 1e3:9.3f} ms  {copied / copy / 1e9:8.1f} GB/s "
          f"({_pct(copied / copy / 1e9, peak_gbs)} of HBM peak)")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda")
    p.add_argument("--quick", action="store_true", help="small shapes (N=512 H=256 V=4096; GAE 64 x 1024)")
    p.add_argument("--n", type=int, default=16384)
    p.add_argument("--hidden", type=int, default=5120)
    p.add_argument("--vocab", type=int, default=151552 // 8)
    p.add_argument("--gae-b", type=int, default=4096)
    p.add_argument("--gae-t", type=int, default=8192)
    p.add_argument("--reps", type=int, default=5)
    a = p.parse_args()
    device = torch.device(a.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("bench_kernels_gpu: no CUDA device here (use --device cpu for a smoke run)")
    if a.quick:
        a.n, a.hidden, a.vocab, a.gae_b, a.gae_t, a.reps = 512, 256, 4096, 64, 1024, 1
    name, peak_tflops, peak_gbs = device_peaks(device)
    print(f"# device: {name}; peaks: bf16 {peak_tflops or 'n/a'} TFLOP/s, HBM {peak_gbs or 'n/a'} GB/s")
    bench_logprob(a, device, peak_tflops)
    bench_gae(a, device, peak_gbs)


if __name__ == "__main__":
    main()
