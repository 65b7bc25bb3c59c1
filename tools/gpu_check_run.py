"""The machinery of tools/gpu_check.py: stage results, the stage runner, logged subprocesses
with a timeout and a GPU-memory sampler, and the summary table.

A stage is a function ``fn(ctx) -> Outcome``. It reports a failure by raising
:class:`StageFailed` (a message and the last lines of its output), a skip by raising
:class:`StageSkip`; any other exception is recorded as FAIL with its message and traceback, and
the next stage runs all the same.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import threading
import time
import traceback
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

PASS, FAIL, SKIP = "PASS", "FAIL", "SKIP"
EXIT_OK, EXIT_FAILED, EXIT_BAD_FLAGS, EXIT_NO_GPU = 0, 1, 2, 3
TAIL_LINES = 25


class StageFailed(Exception):
    """A stage's check did not hold: ``message`` and the last lines of its output."""

    def __init__(self, message: str, tail: str = "", data: dict | None = None):
        super().__init__(message)
        self.message, self.tail, self.data = message, tail, data or {}


class StageSkip(Exception):
    """The stage cannot run here; the message is the reason."""


@dataclass
class Outcome:
    status: str = PASS
    figures: str = ""
    memory: str = "n/a"
    detail: str = ""
    data: dict = field(default_factory=dict)


@dataclass
class Stage:
    key: str  # what --only names
    title: str  # the table's row name
    fn: Callable
    needs_cuda: bool
    timeout: float | None  # seconds for the stage's subprocesses together; None: in-process
    what: str = ""


@dataclass
class Row:
    key: str
    title: str
    status: str
    figures: str
    seconds: float
    memory: str
    detail: str
    data: dict


@dataclass
class Context:
    repo: Path
    out: Path
    python: str
    cuda: bool  # a CUDA device is visible to this process (and not --cpu-smoke)
    cpu_smoke: bool = False  # run the CUDA stages on CPU: a plumbing run, nothing GPU-checked
    timeouts: dict = field(default_factory=dict)  # stage key -> seconds

    def stage_dir(self, key: str, clean: bool = False) -> Path:
        path = self.out / key
        if clean and path.exists():
            shutil.rmtree(path)
        path.mkdir(parents=True, exist_ok=True)
        return path

    def subprocess_env(self) -> dict:
        env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONUNBUFFERED="1")
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(self.repo), env.get("PYTHONPATH")) if p)
        env.setdefault("OMP_NUM_THREADS", "4")
        env.pop("TRITON_INTERPRET", None)  # the kernels run natively on CUDA
        if self.cpu_smoke:
            env["CUDA_VISIBLE_DEVICES"] = ""
        return env


def run_stage(stage: Stage, ctx: Context) -> Row:
    """Run one stage; whatever it raises becomes its row (FAIL / SKIP), never the caller's."""
    t0 = time.monotonic()
    if stage.needs_cuda and not ctx.cuda and not ctx.cpu_smoke:
        outcome = Outcome(SKIP, detail="needs CUDA, none visible")
    else:
        try:
            outcome = stage.fn(ctx)
        except StageSkip as err:
            outcome = Outcome(SKIP, detail=str(err))
        except StageFailed as err:
            outcome = Outcome(FAIL, figures=err.message,
                              detail=err.message + (f"\n{err.tail}" if err.tail else ""), data=err.data)
        except KeyboardInterrupt:
            raise
        except BaseException as err:  # noqa: B036 - a stage's SystemExit must not end the run
            tb = "".join(traceback.format_exception(type(err), err, err.__traceback__))
            message = f"{type(err).__name__}: {err}"
            outcome = Outcome(FAIL, figures=message,
                              detail=message + "\n" + last_lines(tb, TAIL_LINES))
    return Row(stage.key, stage.title, outcome.status, outcome.figures,
               time.monotonic() - t0, outcome.memory, outcome.detail, outcome.data)


def run_stages(stages, ctx: Context, echo: Callable[[str], None] | None = None) -> list[Row]:
    rows = []
    for i, stage in enumerate(stages, 1):
        if echo:
            echo(f"== {i}/{len(stages)} {stage.title} ...")
        row = run_stage(stage, ctx)
        if echo:
            echo(f"   {row.status} in {row.seconds:.1f} s" + (f": {row.figures}" if row.figures else
                                                            f" ({row.detail})" if row.detail else ""))
        rows.append(row)
    return rows


def exit_status(rows: list[Row], cuda: bool) -> int:
    """1 if any stage failed; else 3 without a GPU (nothing was checked); else 0."""
    if any(r.status == FAIL for r in rows):
        return EXIT_FAILED
    return EXIT_OK if cuda else EXIT_NO_GPU


def verdict(rows: list[Row], cuda: bool, cpu_smoke: bool, device: str) -> str:
    status = exit_status(rows, cuda)
    failed = [r.title for r in rows if r.status == FAIL]
    if status == EXIT_FAILED:
        return (f"FAIL (exit 1): {len(failed)} stage(s) failed: {', '.join(failed)}. "
                "Their last output lines are below; full logs in logs/.")
    if status == EXIT_NO_GPU:
        how = ("--cpu-smoke ran the CUDA stages on CPU: a plumbing run only"
               if cpu_smoke else "every CUDA stage was skipped")
        return (f"NO GPU (exit 3): nothing was checked on a GPU ({how}). "
                "This is not a pass.")
    skipped = [r.title for r in rows if r.status == SKIP]
    extra = f" ({len(skipped)} skipped: {', '.join(skipped)})" if skipped else ""
    return f"PASS (exit 0): every stage run passed on {device}{extra}."


# ---------------------------------------------------------------------------------------------
# Subprocesses


def last_lines(text: str, n: int = TAIL_LINES) -> str:
    return "\n".join(text.rstrip().splitlines()[-n:])


def without_launcher_report(text: str) -> str:
    """The output without torchrun's own traceback and ChildFailedError banner, so that a failed
    worker's last lines are what the tail shows."""
    at = text.find("ChildFailedError")
    if at < 0:
        return text
    start = text.rfind("Traceback (most recent call last):", 0, at)
    return text[:start] if start > 0 else text


def tail_of(path: Path, n: int = TAIL_LINES) -> str:
    try:
        return last_lines(without_launcher_report(path.read_text(encoding="utf-8", errors="replace")), n)
    except OSError:
        return ""


class GpuMemorySampler:
    """Peak device memory in use while a block runs, above the level when it started, sampled
    with nvidia-smi (the whole device: every process on it). ``peak`` is None without nvidia-smi
    or without a device."""

    def __init__(self, interval: float = 0.25):
        self.interval = interval
        self.exe = shutil.which("nvidia-smi")
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        self.index = visible.split(",")[0].strip() if visible else "0"
        self.baseline = self.max_seen = None
        self.stop = threading.Event()
        self.thread = None

    def read(self) -> int | None:
        if not self.exe or self.index == "":
            return None
        try:
            out = subprocess.run([self.exe, "--query-gpu=memory.used", "--format=csv,noheader,nounits",
                                  "-i", self.index], capture_output=True, text=True, timeout=10)
            return int(out.stdout.strip().splitlines()[0]) * 2**20 if out.returncode == 0 else None
        except (OSError, ValueError, IndexError, subprocess.TimeoutExpired):
            return None

    def loop(self) -> None:
        while not self.stop.wait(self.interval):
            value = self.read()
            if value is not None:
                self.max_seen = value if self.max_seen is None else max(self.max_seen, value)

    def __enter__(self):
        self.baseline = self.read()
        if self.baseline is not None:
            self.max_seen = self.baseline
            self.thread = threading.Thread(target=self.loop, daemon=True)
            self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        if self.thread is not None:
            self.thread.join()
        return False

    @property
    def peak(self) -> int | None:
        if self.baseline is None or self.max_seen is None:
            return None
        return self.max_seen - self.baseline


@dataclass
class ProcResult:
    cmd: list
    rc: int | None  # None: killed at the timeout
    seconds: float
    log: Path
    peak_memory: int | None  # bytes above the start level (nvidia-smi), None: unknown
    tail: str

    @property
    def timed_out(self) -> bool:
        return self.rc is None


def run_logged(cmd: list, log: Path, timeout: float, env: dict, cwd: Path) -> ProcResult:
    """Run ``cmd`` with stdout + stderr into ``log``; at ``timeout`` its whole process group
    (torchrun and its workers) is terminated and ``rc`` is None."""
    log.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    with open(log, "w", encoding="utf-8") as fh, GpuMemorySampler() as mem:
        fh.write("$ " + " ".join(map(str, cmd)) + "\n")
        fh.flush()
        proc = subprocess.Popen([str(c) for c in cmd], cwd=cwd, env=env, stdout=fh,
                                stderr=subprocess.STDOUT, start_new_session=True)
        try:
            rc = proc.wait(timeout=max(timeout, 1.0))
        except subprocess.TimeoutExpired:
            rc = None
            for sig, grace in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
                try:
                    os.killpg(proc.pid, sig)  # the group this Popen started, nothing else
                except ProcessLookupError:
                    break
                try:
                    proc.wait(timeout=grace)
                    break
                except subprocess.TimeoutExpired:
                    continue
    tail = tail_of(log)
    if rc is None:
        tail += f"\n[gpu_check: killed after {timeout:.0f} s]"
    return ProcResult(list(map(str, cmd)), rc, time.monotonic() - t0, log, mem.peak, tail)


def require_ok(res: ProcResult, what: str) -> None:
    if res.timed_out:
        raise StageFailed(f"{what}: timed out after {res.seconds:.0f} s", res.tail)
    if res.rc != 0:
        raise StageFailed(f"{what}: exit status {res.rc}", res.tail)


class Deadline:
    """The time a stage's subprocesses have left together."""

    def __init__(self, seconds: float):
        self.end = time.monotonic() + seconds
        self.seconds = seconds

    def left(self, what: str) -> float:
        left = self.end - time.monotonic()
        if left <= 1.0:
            raise StageFailed(f"{what}: the stage's {self.seconds:.0f} s were used up before it started")
        return left


@contextlib.contextmanager
def quiet_into(log: Path):
    """In-process work of a stage (imports, checkpoint writing) with its prints, warnings and
    progress bars appended to ``log`` instead of the terminal."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "a", encoding="utf-8") as fh, contextlib.redirect_stdout(fh), \
            contextlib.redirect_stderr(fh), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def gib(n: int | None, how: str) -> str:
    return "n/a" if n is None else f"{n / 2**30:.2f} GiB ({how})"


# ---------------------------------------------------------------------------------------------
# The summary


def _cell(text) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def status_cell(row: Row) -> str:
    return f"SKIP ({row.detail})" if row.status == SKIP and row.detail else row.status


def table(rows: list[Row]) -> str:
    lines = ["| stage | status | key figures | seconds | peak GPU memory |",
             "|---|---|---|---:|---|"]
    for i, r in enumerate(rows, 1):
        lines.append(f"| {i}. {_cell(r.title)} | {_cell(status_cell(r))} | {_cell(r.figures)} | "
                     f"{r.seconds:.1f} | {_cell(r.memory)} |")
    return "\n".join(lines)


def failure_details(rows: list[Row]) -> str:
    parts = []
    for r in rows:
        if r.status == FAIL:
            parts.append(f"### {r.title}: FAIL\n\n```\n{r.detail.rstrip()}\n```")
    return "\n\n".join(parts)


def write_summary(out: Path, header: dict, rows: list[Row], verdict_line: str, status: int) -> tuple:
    out.mkdir(parents=True, exist_ok=True)
    md = [f"# GPU check: {header.get('device', '?')}", "",
          f"**{verdict_line}**", "",
          table(rows), ""]
    details = failure_details(rows)
    if details:
        md += [details, ""]
    md += [f"started {header.get('started')}, {header.get('total_seconds', 0):.0f} s in all; "
           f"command: `{header.get('command')}`", ""]
    md_path, json_path = out / "summary.md", out / "summary.json"
    md_path.write_text("\n".join(md), encoding="utf-8")
    doc = dict(header, verdict=verdict_line, exit_status=status, stages=[asdict(r) for r in rows])
    json_path.write_text(json.dumps(doc, indent=2, default=str) + "\n", encoding="utf-8")
    return md_path, json_path
