#!/usr/bin/env python
"""First run on a GPU (issue 22): one command, one summary table.

    make gpu-check                                   # = python tools/gpu_check.py
    python tools/gpu_check.py --out output/gpu_check --only env,kernels --timeout-per-stage 200
    python tools/gpu_check.py --cpu-smoke            # the CUDA stages on CPU: a plumbing run only

Stages (each catches its own failure; a CUDA stage without a device is SKIP):

  1 env      torch / CUDA / device / bf16 / Triton / Transformer Engine / NCCL, a bf16 GEMM
  2 kernels  pytest on the kernel tests (the Triton checks run natively on CUDA)
  3 bench    tools/bench_kernels_gpu.py: log-prob TFLOP/s vs bf16 peak, GAE GB/s vs HBM
  4 train    tiny SFT -> reward model -> PPO (examples/tiny_ppo) through
             `python -m torch.distributed.run --nproc-per-node 1 -m glm_megatron ...`, bf16, NCCL
  5 parity   tools/verify_hf_parity.py --dtype bf16 on a tiny random glm4_moe, glm and glm4

Writes OUT/summary.md, OUT/summary.json and each stage's logs under OUT/<stage>/. Exit status:
0 every stage run passed on a GPU, 1 a stage failed, 2 bad flags, 3 no GPU (nothing was checked).
The performance goals (log-prob >= 50 % of bf16 peak, GAE >= 50 % of HBM bandwidth) are printed
beside the figures and do not change the exit status.
"""

from __future__ import annotations

import argparse
import datetime
import os
import shlex
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from gpu_check_run import (  # noqa: E402
    Context,
    Stage,
    exit_status,
    failure_details,
    run_stages,
    table,
    verdict,
    write_summary,
)
from gpu_check_stages import (  # noqa: E402
    stage_environment,
    stage_kernel_bench,
    stage_kernel_tests,
    stage_parity,
    stage_train,
)

REPO = Path(__file__).resolve().parents[1]

# Subprocess timeouts (seconds, all of a stage's subprocesses together): 450 s in all, so that a
# run where every stage hits its limit still ends inside 8 minutes on an H100 (the environment
# stage runs in-process in seconds). A normal run takes a fraction of each.
STAGES = (
    Stage("env", "environment", stage_environment, needs_cuda=False, timeout=None,
          what="torch, CUDA, device, bf16, Triton, Transformer Engine, NCCL; a bf16 GEMM"),
    Stage("kernels", "kernel tests", stage_kernel_tests, needs_cuda=True, timeout=110,
          what="pytest on the Triton / log-prob / GAE kernel tests, natively on CUDA"),
    Stage("bench", "kernel bench", stage_kernel_bench, needs_cuda=True, timeout=80,
          what="tools/bench_kernels_gpu.py (make bench-gpu): TFLOP/s and GB/s against the peaks"),
    Stage("train", "tiny SFT/RM/PPO", stage_train, needs_cuda=True, timeout=170,
          what="SFT -> reward model -> PPO through the CLI under torchrun, 1 GPU, bf16, NCCL"),
    Stage("parity", "HF parity bf16", stage_parity, needs_cuda=True, timeout=90,
          what="tools/verify_hf_parity.py --dtype bf16 on tiny glm4_moe, glm, glm4"),
)


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def select_stages(spec: str | None, parser: argparse.ArgumentParser) -> list[Stage]:
    """``--only``: stage keys or 1-based numbers, comma-separated, in the table's order."""
    if spec is None:
        return list(STAGES)
    keys = {s.key: s for s in STAGES}
    valid = ", ".join(f"{i} {s.key}" for i, s in enumerate(STAGES, 1))
    chosen = set()
    for item in (x.strip() for x in spec.split(",")):
        if not item:
            continue
        if item.isdigit() and 1 <= int(item) <= len(STAGES):
            chosen.add(STAGES[int(item) - 1].key)
        elif item in keys:
            chosen.add(item)
        else:
            parser.error(f"--only: unknown stage {item!r} (stages: {valid})")
    if not chosen:
        parser.error(f"--only: no stage named (stages: {valid})")
    return [s for s in STAGES if s.key in chosen]


def positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seconds, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    stages = "\n".join(f"  {i} {s.key:8} {s.what} (timeout {s.timeout or '-'} s)"
                       for i, s in enumerate(STAGES, 1))
    p = argparse.ArgumentParser(
        prog="gpu_check", description=__doc__.split("\n")[1],
        epilog=f"stages:\n{stages}\n\nexit status: 0 pass on a GPU, 1 a stage failed, 2 bad flags, "
               "3 no GPU (nothing checked)",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(REPO / "output" / "gpu_check"),
                   help="directory for summary.md, summary.json and the stages' logs")
    p.add_argument("--only", help="comma-separated stages to run: keys or numbers (env,kernels or 1,2)")
    p.add_argument("--timeout-per-stage", type=positive_seconds, default=None, metavar="S",
                   help="seconds for each stage's subprocesses instead of the defaults above")
    p.add_argument("--cpu-smoke", action="store_true",
                   help="run the CUDA stages on CPU (gloo, fp32, bench --quick): checks this "
                        "script's plumbing, nothing on a GPU; exits 3 unless a stage fails")
    return p


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    stages = select_stages(args.only, parser)
    out = Path(args.out).resolve()
    cuda = cuda_available() and not args.cpu_smoke
    timeouts = {s.key: args.timeout_per_stage or s.timeout for s in STAGES}
    ctx = Context(repo=REPO, out=out, python=sys.executable, cuda=cuda, cpu_smoke=args.cpu_smoke,
                  timeouts=timeouts)
    started = datetime.datetime.now().isoformat(timespec="seconds")
    t0 = time.monotonic()
    print(f"gpu_check: {len(stages)} stage(s) -> {out}", flush=True)
    rows = run_stages(stages, ctx, echo=lambda line: print(line, flush=True))
    env_row = next((r for r in rows if r.key == "env"), None)
    device = (env_row.data.get("device") if env_row and env_row.data else None) or (
        "a CUDA device" if cuda else "no GPU")
    status = exit_status(rows, cuda)
    line = verdict(rows, cuda, args.cpu_smoke, device)
    header = {"device": device, "cuda": cuda, "cpu_smoke": args.cpu_smoke, "started": started,
              "total_seconds": time.monotonic() - t0, "timeouts": timeouts,
              "command": shlex.join(["python", "tools/gpu_check.py",
                                     *(sys.argv[1:] if argv is None else argv)])}
    md, js = write_summary(out, header, rows, line, status)
    print()
    print(table(rows))
    print()
    details = failure_details(rows)
    if details:
        print(details)
        print()
    print(line)
    print(f"summary: {md}  {js}")
    return status


if __name__ == "__main__":
    sys.exit(main())
