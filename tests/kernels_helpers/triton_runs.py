"""Run tests/kernels_helpers/triton_checks.py in a fresh process and name the checks it reports."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
COMMON = [
    "token_logprobs kl=k3 entropy=True T=0.7 tile=150",
    "token_logprobs kl=None entropy=False T=1.0 tile=None",
    "token_logprobs kl=k2 entropy=False T=1.3 tile=64",
    "mutation caught T=0.7",
    "mutation caught T=1.0",
    "mutation caught T=1.3",
    "token_logprobs bf16 inputs",
    "logprobs_from_logits",
    "gae [B,T]",
    "gae packed",
    "gae mutation caught",
]
CHECKS = {"cpu": ["kernels are interpreted", *COMMON], "cuda": ["kernels run natively", *COMMON]}


def run_triton_checks(device: str) -> dict:
    """{check: [passed, detail]}; under the interpreter on "cpu", natively on "cuda"."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    if device == "cpu":
        env["TRITON_INTERPRET"] = "1"
    else:
        env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run(
        [sys.executable, "-m", "tests.kernels_helpers.triton_checks", "--device", device],
        cwd=ROOT, env=env, check=False, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, f"triton checks ({device}) crashed:\n{proc.stderr[-4000:]}"
    return json.loads(proc.stdout.strip().splitlines()[-1])
