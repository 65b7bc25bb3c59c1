"""The worker-process protocol the training benchmarks share (tools/bench_sft.py, bench_lora.py).

Each side of a benchmark runs in its own process (its own thread count, no allocator or import
interference). The driver starts ``python BENCH_SCRIPT --worker KIND --spec JSON`` and talks to
it over stdin/stdout: ``step`` runs and times one training step, ``profile N`` profiles one,
``stats`` returns the side's static figures, ``quit`` ends it; replies are JSON lines after
:data:`MARKER` (anything else the libraries print is ignored).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

MARKER = "BENCH "
ROOT = Path(__file__).resolve().parents[1]


def _reply(obj) -> None:
    sys.stdout.write(MARKER + json.dumps(obj) + "\n")
    sys.stdout.flush()


def serve_steps(step, batches, info: dict, stats=None) -> None:
    """Worker side: announce ``info``, then answer the driver's commands until ``quit``."""
    import resource

    import torch

    _reply(dict(info, ready=True, threads=torch.get_num_threads()))
    k = 0
    for line in sys.stdin:
        cmd = line.split()
        if not cmd or cmd[0] == "quit":
            break
        if cmd[0] == "stats":
            _reply(stats() if stats is not None else {})
            continue
        batch = batches[k % len(batches)]
        k += 1
        if cmd[0] == "profile":
            from torch.profiler import ProfilerActivity, profile

            with profile(activities=[ProfilerActivity.CPU]) as prof:
                step(batch)
            _reply({"profile": prof.key_averages().table(
                sort_by="self_cpu_time_total", row_limit=int(cmd[1]), max_name_column_width=60)})
            continue
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        start = time.perf_counter()
        loss = step(batch)
        elapsed = time.perf_counter() - start
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
        _reply({"time": elapsed, "loss": loss, "faults": faults})


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Worker:
    """Driver side of one worker process of the benchmark script ``script``."""

    def __init__(self, label: str, kind: str, spec: dict, script: str):
        self.label = label
        spec = dict(spec, port=free_port())
        env = dict(os.environ, OMP_NUM_THREADS=str(spec["threads"]), HF_HUB_OFFLINE="1",
                   TRANSFORMERS_OFFLINE="1", PYTHONWARNINGS="ignore")
        for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
            env.pop(var, None)
        cmd = [sys.executable, str(Path(script).resolve()), "--worker", kind,
               "--spec", json.dumps(spec)]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True, env=env, cwd=str(ROOT))
        self.info: dict = {}
        self.stats: dict = {}
        self.times: list[float] = []
        self.losses: list[float] = []
        self.faults: list[int] = []

    def read(self) -> dict:
        for line in self.proc.stdout:
            if line.startswith(MARKER):
                return json.loads(line[len(MARKER):])
        err = self.proc.stderr.read()
        raise SystemExit(f"{self.label} worker exited ({self.proc.wait()}):\n{err[-4000:]}")

    def ready(self) -> None:
        self.info = self.read()

    def send(self, command: str) -> dict:
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        return self.read()

    def step(self, timed: bool) -> float:
        out = self.send("step")
        self.losses.append(out["loss"])
        if timed:
            self.times.append(out["time"])
            self.faults.append(out["faults"])
        return out["time"]

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.write("quit\n")
            self.proc.stdin.close()
            self.proc.wait(timeout=60)


def plain_adamw_step(model, params, vocab: int, *, lr, betas, eps, weight_decay, clip,
                     ignore_index: int):
    """(step(batch) -> loss, optimizer): the transformers side's training step — a plain torch
    loop with torch's AdamW, token-mean cross-entropy over the supervised labels."""
    import torch
    import torch.nn.functional as F

    opt = torch.optim.AdamW(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)

    def step(batch):
        opt.zero_grad(set_to_none=True)
        logits = model(input_ids=batch["tokens"], use_cache=False).logits
        labels = batch["labels"].reshape(-1)
        loss_sum = F.cross_entropy(logits.reshape(-1, vocab).float(), labels,
                                   ignore_index=ignore_index, reduction="sum")
        loss = loss_sum / (labels != ignore_index).sum().clamp(min=1)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, clip)
        opt.step()
        return float(loss.detach())

    return step, opt


def our_sft_engine(spec: dict, glm, model_section, ds, rows, *, lr, betas, eps, weight_decay,
                   clip):
    """Our side's training step: one process (TP=1), the real SFT engine and batcher on the
    fixed batches ``rows`` of ``ds``. Returns (engine, chunks, tconfig, micro-batches, step)."""
    import torch

    torch.set_num_threads(spec["threads"])
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(spec["port"]))
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_PROCID", "SLURM_NTASKS"):
        os.environ.pop(var, None)
    from glm_megatron.algorithms.sft.data import SFTBatcher
    from glm_megatron.algorithms.sft.loss import lm_forward_step
    from glm_megatron.engine.config import TrainingSection
    from glm_megatron.engine.engine import Engine
    from glm_megatron.engine.model_setup import build_trained_model
    from glm_megatron.models.config import model_shape
    from glm_megatron.parallel import ParallelLayout, initialize_parallel, install_cpu_support

    install_cpu_support()  # this worker's entry; the HF workers run without it
    ctx = initialize_parallel(ParallelLayout(), model_shape(glm), seed=spec["seed"])
    t = TrainingSection(
        learning_rate=lr, min_learning_rate=lr, lr_scheduler="constant", warmup_ratio=0.0,
        per_device_train_batch_size=spec["batch"], global_batch_size=spec["batch"],
        max_seq_length=spec["seq"], weight_decay=weight_decay, adam_beta1=betas[0],
        adam_beta2=betas[1], adam_eps=eps, dropout=0.0, attention_dropout=0.0,
        gradient_clipping=clip, mixed_precision="fp32", seed=spec["seed"],
    )
    chunks, tconfig, _ = build_trained_model(glm, model_section, t, ctx.layout)
    engine = Engine(chunks, tconfig, t, total_steps=10**6)
    batcher = SFTBatcher(ds, max_seq_length=spec["seq"], pad_id=glm.pad_token_id or 0,
                         pad_multiple=1, ignore_index=-100, packing=False, device=ctx.device)
    micro = [batcher.microbatch(r, batcher.step_length(r)) for r in rows]
    assert all(tuple(mb["tokens"].shape) == (spec["batch"], spec["seq"]) for mb in micro)

    def step(mb):
        out = engine.train_step([mb], lm_forward_step)
        total, count = out["reports"][0]["lm loss"].tolist()
        return total / max(count, 1.0)

    return engine, chunks, tconfig, micro, step


def run_interleaved(workers: list[Worker], warmup: int, steps: int, profile: int = 0,
                    stats: bool = False) -> dict:
    """Start every side, alternate their steps (``warmup`` untimed, then ``steps`` timed), fetch
    their stats and (``profile`` > 0) one profiled step each; always stop the workers. Returns
    {label: profile table}."""
    try:
        for w in workers:
            w.ready()
        for i in range(warmup + steps):
            # Rotate who goes first so no side always follows the same neighbour.
            shift = i % len(workers)
            for w in workers[shift:] + workers[:shift]:
                w.step(timed=i >= warmup)
        if stats:
            for w in workers:
                w.stats = w.send("stats")
        return {w.label: w.send(f"profile {profile}")["profile"] for w in workers} if profile else {}
    finally:
        for w in workers:
            w.close()


def add_run_flags(p) -> None:
    """The flags every training benchmark takes, including the hidden worker ones."""
    import argparse

    p.add_argument("--profile", type=int, default=0, metavar="N",
                   help="profile one extra step per side and print its N most expensive ops")
    p.add_argument("--json", default=None, help="also write the results here")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--spec", help=argparse.SUPPRESS)
