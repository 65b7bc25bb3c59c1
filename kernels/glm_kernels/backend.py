"""Which implementation runs an op: the Triton kernels or the chunked torch path.

"auto" picks Triton for CUDA tensors and torch otherwise. "triton" on CPU tensors is allowed only
under TRITON_INTERPRET=1 (Triton's interpreter, used by the tests at small shapes); it is far too
slow for real work, so it is never chosen automatically.
"""

from __future__ import annotations

import os

import torch

BACKENDS = ("auto", "torch", "triton")


def interpreting() -> bool:
    """True when Triton kernels run under the CPU interpreter in this process."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_backend(backend: str, like: torch.Tensor) -> str:
    """Return "torch" or "triton" for tensors living where `like` lives."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        return "triton" if like.is_cuda and triton_available() else "torch"
    if backend == "triton":
        if not triton_available():
            raise ValueError("backend='triton' requested but triton is not installed")
        if not like.is_cuda and not interpreting():
            raise ValueError(
                "backend='triton' needs CUDA tensors, or TRITON_INTERPRET=1 set before triton is "
                "imported (CPU interpreter, for tests)"
            )
    return backend
