"""Launch a real multi-process job (torchrun, gloo) from a test and fail with its log."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_env(**extra) -> dict:
    env = dict(os.environ)
    env.update(
        OMP_NUM_THREADS="1",
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        PYTHONPATH=os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]),
        CUDA_VISIBLE_DEVICES="",
    )
    env.update(extra)
    return env


def torchrun(script: str, *args: str, nproc: int = 2, timeout: int = 900, log: Path = None):
    """Run ``script`` under torchrun with ``nproc`` ranks; raise AssertionError with the log tail.

    ``--standalone``: torchrun's agent binds its rendezvous store on a free port itself (a port
    picked here and released before torchrun binds it could be taken in between)."""
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
        str(REPO / script), *args,
    ]
    returncode, output, _ = run_job(cmd, min(timeout, pytest_timeout() - 60))
    if log is not None:
        log.write_text(output)
    if returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {returncode}:\n{output[-6000:]}")
    return output


def pytest_timeout() -> int:
    """pytest.ini's per-test timeout: a job must time out before it, so that the test fails with
    the job's log rather than being killed by pytest-timeout without it."""
    import configparser

    ini = configparser.ConfigParser()
    ini.read(REPO / "pytest.ini")
    return int(ini.get("pytest", "timeout", fallback="1500"))


def run_job(cmd: list[str], timeout: int, env: dict = None) -> tuple[int, str, float]:
    """Run a (torchrun) command to its end: (exit status, stdout + stderr, seconds). A job still
    running after ``timeout`` seconds is killed, every process of it, and reported as an
    AssertionError with its log (never left running, never a silent pass)."""
    import time

    import psutil

    start = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=REPO, env=env or test_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        job = psutil.Process(proc.pid)
        for p in [*job.children(recursive=True), job]:  # torchrun's ranks have own sessions
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        output, _ = proc.communicate()
        raise AssertionError(f"{' '.join(cmd)} still running after {timeout} s (hung?), "
                             f"killed:\n{output[-6000:]}") from None
    return proc.returncode, output, time.monotonic() - start


def run_tool(script: str, *args: str, timeout: int = 600, env: dict = None):
    """Run a tools/ script as a user would; returns the CompletedProcess (no check)."""
    return subprocess.run(
        [sys.executable, str(REPO / script), *args], cwd=REPO, env=test_env(**(env or {})),
        capture_output=True, text=True, timeout=timeout,
    )
