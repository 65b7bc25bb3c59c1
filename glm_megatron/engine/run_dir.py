"""A training run's output directory: one run at a time, no silent restart over checkpoints, and
per-step logs that match the run being resumed.

- :func:`claim` (global rank 0, before any work; the training commands call it): takes the
  directory's lock file, refuses a fresh run (no ``--resume``) into a directory that already
  holds complete checkpoints unless ``--overwrite`` (``checkpoint.overwrite``), and with
  ``--overwrite`` deletes the previous run's checkpoints, markers, step logs and TensorBoard
  events first.
- The lock (:data:`LOCK_FILE`, JSON: host, pid, start time, command) is created with
  ``O_EXCL``, so two runs cannot both hold it; a lock whose pid no longer exists on this host
  (a run killed with ``kill -9``) is stale and taken over, saying so. A lock held on another
  host is never broken: the message names it.
- :func:`cut_step_logs` (the loop, rank 0): the per-step JSONL logs (``train_log.jsonl``, PPO's
  ``ppo_log.jsonl`` / ``samples.jsonl``: every file of JSON rows with an integer ``step``) lose
  the rows after the step the run starts from, so steps replayed after a crash are logged once.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import sys
import time

from ..models.checkpoint_dirs import BEST, ITER_RE, LATEST, list_checkpoints
from .config import TrainConfigError

log = logging.getLogger(__name__)
LOCK_FILE = ".glm_megatron.lock"


class RunLock:
    """The held lock file of an output directory (:meth:`release` is idempotent)."""

    def __init__(self, path: str | None, record: dict | None = None):
        self.path, self.record = path, record

    def release(self) -> None:
        if self.path is None:
            return
        try:
            if _read_lock(self.path) == self.record:  # never remove another run's lock
                os.remove(self.path)
        except OSError:
            pass
        self.path = None


def _read_lock(path: str) -> dict | None:
    try:
        with open(path, encoding="utf-8") as fh:
            record = json.load(fh)
        return record if isinstance(record, dict) else None
    except (OSError, ValueError):
        return None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def acquire_lock(output_dir: str) -> RunLock:
    """Create ``output_dir/.glm_megatron.lock`` or raise TrainConfigError naming its owner."""
    os.makedirs(output_dir, exist_ok=True)
    path = os.path.join(output_dir, LOCK_FILE)
    record = {"host": socket.gethostname(), "pid": os.getpid(),
              "started": time.strftime("%Y-%m-%d %H:%M:%S"), "command": " ".join(sys.argv)}
    for _ in range(3):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            owner = _read_lock(path)
            if owner is None:
                time.sleep(0.2)  # another run between creating and writing it
                owner = _read_lock(path)
            if owner is None:
                raise TrainConfigError(f"checkpoint.output_dir: {output_dir}: unreadable lock file "
                                       f"{path}; delete it if no run uses this directory") from None
            stale = owner.get("host") == record["host"] and isinstance(owner.get("pid"), int) \
                and not _pid_alive(owner["pid"])
            if not stale:
                raise TrainConfigError(
                    f"checkpoint.output_dir: {output_dir} is in use by another run (host "
                    f"{owner.get('host')}, pid {owner.get('pid')}, started {owner.get('started')}; "
                    f"lock file {path}): wait for it, choose another checkpoint.output_dir, or "
                    "delete the lock file if that run is gone") from None
            log.warning("%s: taking over a stale lock of pid %s (no longer running on %s)",
                        output_dir, owner["pid"], owner["host"])
            try:
                os.remove(path)
            except FileNotFoundError:
                pass
            continue
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump(record, fh)
        return RunLock(path, record)
    raise TrainConfigError(f"checkpoint.output_dir: {output_dir}: could not take the lock {path}")


def previous_run_files(output_dir: str) -> list[str]:
    """What ``--overwrite`` deletes: iter dirs, markers, step logs, the default TensorBoard dir."""
    if not os.path.isdir(output_dir):
        return []
    found = []
    for name in sorted(os.listdir(output_dir)):
        path = os.path.join(output_dir, name)
        if ITER_RE.match(name) or name in (LATEST, BEST) or (name == "tensorboard" and os.path.isdir(path)) \
                or (name.endswith(".jsonl") and is_step_log(path)):
            found.append(path)
    return found


def claim(checkpoint, overwrite: bool, is_main: bool) -> RunLock:
    """Before any work: the output directory's lock and the fresh-run check (see the module
    docstring). ``checkpoint`` is the config's checkpoint section. Other ranks get an empty lock
    (rank 0 decides for the job: its error is the one printed)."""
    out, resume = checkpoint.output_dir, checkpoint.resume
    if overwrite and resume:
        raise TrainConfigError(f"--overwrite starts a new run in {out}; --resume {resume} continues "
                               "one: pass only one of them")
    if not is_main:
        return RunLock(None)
    lock = acquire_lock(out)
    try:
        found = list_checkpoints(out)
        if found and not resume and not overwrite:
            names = ", ".join(os.path.basename(p) for _, p in found[-3:])
            raise TrainConfigError(
                f"checkpoint.output_dir: {out} already holds checkpoints ({names}); pass --resume "
                "auto to continue that run, or --overwrite (checkpoint.overwrite=true) to delete "
                "them and start a new run there")
        if overwrite:
            removed = previous_run_files(out)
            for path in removed:
                if os.path.isdir(path):
                    shutil.rmtree(path)
                else:
                    os.remove(path)
            if removed:
                log.warning("--overwrite: removed the previous run's %s from %s",
                            ", ".join(os.path.basename(p) for p in removed), out)
    except BaseException:
        lock.release()
        raise
    return lock


# ---------------------------------------------------------------------------------------------
# Per-step logs


def _step_rows(path: str) -> list[tuple[str, int]] | None:
    """(line, step) of every row of ``path``, or None unless it is a log of JSON rows with an
    integer ``step``."""
    rows = []
    try:
        with open(path, encoding="utf-8") as fh:
            for line in fh:
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except ValueError:
                    # A torn last line (killed mid-write) belongs to no step: dropped.
                    rows.append((line, sys.maxsize))
                    continue
                if not isinstance(row, dict) or not isinstance(row.get("step"), int):
                    return None
                rows.append((line, row["step"]))
    except (OSError, UnicodeDecodeError):
        return None
    return rows


def is_step_log(path: str) -> bool:
    rows = _step_rows(path)
    return rows is not None and any(step != sys.maxsize for _, step in rows)


def cut_step_logs(output_dir: str, step: int) -> dict[str, int]:
    """Drop the rows after ``step`` from every per-step JSONL log in ``output_dir`` (rewritten
    atomically); returns {file: rows dropped} for the files that changed."""
    cut = {}
    if not os.path.isdir(output_dir):
        return cut
    for name in sorted(os.listdir(output_dir)):
        path = os.path.join(output_dir, name)
        if not name.endswith(".jsonl") or not os.path.isfile(path):
            continue
        rows = _step_rows(path)
        if rows is None or all(s == sys.maxsize for _, s in rows):
            continue
        kept = [line if line.endswith("\n") else line + "\n" for line, s in rows if s <= step]
        if len(kept) == len(rows):
            continue
        with open(path + ".tmp", "w", encoding="utf-8") as fh:
            fh.writelines(kept)
        os.replace(path + ".tmp", path)
        cut[path] = len(rows) - len(kept)
    return cut
