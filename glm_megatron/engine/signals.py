"""Preemption: SIGTERM / SIGUSR1 (Slurm, torchrun's shutdown) ask for a checkpoint and exit 0.

The handler only sets a flag; the training loop checks it between steps and all ranks agree
through one all-reduce (a signal may reach ranks at slightly different steps), so every rank
saves the same step. Under torchrun, add ``--signals-to-handle=SIGTERM,SIGINT,SIGUSR1`` so the
agent forwards SIGUSR1 (it forwards SIGTERM by default) and waits up to 30 s for the workers.
"""

from __future__ import annotations

import signal

import torch
import torch.distributed as dist

HANDLED = (signal.SIGTERM, signal.SIGUSR1)


class PreemptionFlag:
    def __init__(self):
        self.received: int | None = None
        self._previous = {}

    def install(self) -> PreemptionFlag:
        for sig in HANDLED:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        self.received = signum

    def agreed(self) -> bool:
        """Collective: True on every rank when any rank received a signal."""
        flag = torch.tensor([1.0 if self.received is not None else 0.0],
                            device="cuda" if torch.cuda.is_available() else "cpu")
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item() > 0)

    def uninstall(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()
