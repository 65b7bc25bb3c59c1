"""Shared by the training tests and their workers: tiny synthetic SFT data and configs."""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]


def make_data_module():
    spec = importlib.util.spec_from_file_location("tiny_sft_make_data",
                                                  REPO / "examples" / "tiny_sft" / "make_data.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def build_tiny_data(out: str, n_train: int = 400, n_val: int = 48, n_test: int = 8) -> dict:
    """Digit-transformation conversations, a SentencePiece tokenizer, tokenized splits."""
    marker = os.path.join(out, "info.json")
    if os.path.isfile(marker):
        return json.loads(Path(marker).read_text())
    info = make_data_module().build(out, n_train, n_val, n_test, seed=0)
    Path(marker).write_text(json.dumps(info))
    return info


def tiny_config(data: dict, output_dir: str, **sections) -> dict:
    """A config dict for glm4-moe-tiny on the tiny data; ``sections`` update each section."""
    cfg = {
        "model": {"preset": "glm4-moe-tiny"},
        "training": {
            "learning_rate": 3.0e-3, "min_learning_rate": 3.0e-4, "warmup_ratio": 0.05,
            "lr_scheduler": "cosine", "max_steps": 10, "per_device_train_batch_size": 4,
            "global_batch_size": 8, "max_seq_length": 64, "mixed_precision": "bf16", "seed": 7,
        },
        "data": {"train_data_path": data["train"], "validation_data_path": data["val"]},
        "checkpoint": {"output_dir": output_dir, "save_strategy": "no", "save_final": False},
        "evaluation": {"eval_strategy": "no", "eval_batch_size": 16},
        "logging": {"log_interval": 1000, "progress_bar": False},
        "parallel": {},
    }
    for name, values in sections.items():
        cfg.setdefault(name, {}).update(values)
    return cfg


def finish_worker(results: dict, out: str) -> None:
    """The end of a torchrun worker: rank 0 writes ``out/results.json``, then every rank tears the
    process groups down (between scenarios only Megatron's groups are rebuilt)."""
    from glm_megatron.parallel import destroy_parallel

    if int(os.environ["RANK"]) == 0:
        with open(os.path.join(out, "results.json"), "w", encoding="utf-8") as fh:
            json.dump(results, fh, indent=1)
    destroy_parallel()


def write_config(cfg: dict, path: str) -> str:
    with open(path, "w", encoding="utf-8") as fh:
        yaml.safe_dump(cfg, fh)
    return path


def read_train_log(output_dir: str) -> dict[int, float]:
    """step -> loss, the last entry of each step winning (see glm_megatron/engine/loop.py)."""
    losses = {}
    with open(os.path.join(output_dir, "train_log.jsonl"), encoding="utf-8") as fh:
        for line in fh:
            row = json.loads(line)
            losses[row["step"]] = row["loss"]
    return losses


def glm_cmd(*args: str, nproc: int = 2) -> list[str]:
    """torchrun ... -m glm_megatron ARGS (the user's command line)."""
    import sys

    from helpers.launch import free_port

    return [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
            f"--master-port={free_port()}", "-m", "glm_megatron", *args]


def run_glm(*args: str, nproc: int = 2, timeout: int = 600, check: bool = True):
    import subprocess

    from helpers.launch import test_env

    proc = subprocess.run(glm_cmd(*args, nproc=nproc), cwd=REPO, env=test_env(),
                          capture_output=True, text=True, timeout=timeout)
    output = proc.stdout + proc.stderr
    if check and proc.returncode != 0:
        raise AssertionError(f"glm_megatron {' '.join(args)} exited {proc.returncode}:\n"
                             f"{output[-6000:]}")
    return proc.returncode, output


def start_glm(*args: str, nproc: int = 2):
    """``glm_cmd(*args)`` started in the background (output piped), for tests that interrupt it."""
    import subprocess

    from helpers.launch import test_env

    return subprocess.Popen(glm_cmd(*args, nproc=nproc), cwd=REPO, env=test_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def wait_for(cond, proc, timeout=300):
    """Poll ``cond()`` until true; fail with the job's output if it ends first, or on timeout."""
    import time

    deadline = time.time() + timeout
    while time.time() < deadline:
        if cond():
            return
        if proc.poll() is not None:
            raise AssertionError(f"run ended early ({proc.returncode}):\n{proc.stdout.read()[-4000:]}")
        time.sleep(0.05)
    raise AssertionError("timed out")


def logged_steps(out_dir) -> int:
    """The last step in ``train_log.jsonl`` (0 before the first)."""
    try:
        return max(read_train_log(out_dir), default=0)
    except (FileNotFoundError, json.JSONDecodeError):
        return 0


def complete_steps(out_dir) -> list[int]:
    """Steps of the checkpoints in ``out_dir`` that are complete (their COMPLETE marker)."""
    return sorted(int(p[5:]) for p in os.listdir(out_dir)
                  if p.startswith("iter_") and os.path.isfile(os.path.join(out_dir, p, "COMPLETE")))


def kill_job(proc) -> None:
    """SIGKILL every process of a torchrun job, as a node failure would (no handler runs)."""
    import signal

    import psutil

    # torchrun starts its ranks in sessions of their own, so a process-group kill would miss
    # them: each process is killed.
    job = psutil.Process(proc.pid)
    for p in [*job.children(recursive=True), job]:
        p.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
