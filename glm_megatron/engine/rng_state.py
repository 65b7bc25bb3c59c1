"""Per-rank RNG states of a trainer checkpoint, saved so that they cannot carry code.

``iter_x/rng/rank_NNNNN.safetensors``: the torch and Megatron-tracker (and CUDA) generator states
as uint8 tensors, Python's and NumPy's states as JSON in the safetensors metadata. A pickle
would run code when loaded, and checkpoints are shared and downloaded. Files of older versions
(``rank_NNNNN.pt``, ``torch.save`` of the same dict) load weights-only with NumPy's array types
allowed and nothing else, or are refused naming the file.
"""

from __future__ import annotations

import importlib
import json
import os
import pickle
import random
import re
import zipfile

import numpy as np
import torch

from .config import TrainConfigError

RNG_DIR = "rng"


def rng_state() -> dict:
    from megatron.core import tensor_parallel

    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "tracker": tensor_parallel.get_cuda_rng_tracker().get_states(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    from megatron.core import tensor_parallel

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])


RNG_FORMAT = "glm_megatron.rng/1"
# How a pickled NumPy array is rebuilt: the one global an old RNG file needs besides its types.
_NUMPY_ARRAY_RECONSTRUCT = (("numpy._core.multiarray", "_reconstruct"),
                            ("numpy.core.multiarray", "_reconstruct"))
# What torch.load raises for a refused global, a truncated zip or a foreign file.
_UNREADABLE_PICKLE = (pickle.UnpicklingError, RuntimeError, EOFError, ValueError,
                      zipfile.BadZipFile, KeyError, AttributeError, TypeError)


def rng_file(path: str, rank: int, legacy: bool = False) -> str:
    return os.path.join(path, RNG_DIR, f"rank_{rank:05d}" + (".pt" if legacy else ".safetensors"))


def write_rng_state(file: str, state: dict) -> None:
    """Generator states as uint8 tensors (safetensors), Python's and NumPy's as JSON metadata."""
    from safetensors.torch import save_file

    tensors = {"torch": state["torch"]}
    if "cuda" in state:
        tensors["cuda"] = state["cuda"]
    tensors.update({f"tracker/{name}": t for name, t in state["tracker"].items()})
    version, internal, gauss = state["python"]
    kind, keys, pos, has_gauss, cached = state["numpy"]
    meta = {"format": RNG_FORMAT,
            "python": json.dumps([version, list(internal), gauss]),
            "numpy": json.dumps([kind, keys.tolist(), int(pos), int(has_gauss), float(cached)])}
    save_file({k: v.contiguous() for k, v in tensors.items()}, file + ".tmp", metadata=meta)
    os.replace(file + ".tmp", file)


def read_rng_state(file: str) -> dict:
    """:func:`write_rng_state`'s file, or an older version's ``rank_NNNNN.pt`` loaded
    weights-only (NumPy's array types allowed, nothing else); TrainConfigError naming the file
    when it is truncated, corrupt or holds anything that could run code."""
    if file.endswith(".pt"):
        return _read_legacy_rng_state(file)
    from safetensors import safe_open

    try:
        with safe_open(file, "pt") as fh:
            meta = fh.metadata() or {}
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}
        if meta.get("format") != RNG_FORMAT:
            raise ValueError(f"format {meta.get('format')!r}, expected {RNG_FORMAT!r}")
        version, internal, gauss = json.loads(meta["python"])
        kind, keys, pos, has_gauss, cached = json.loads(meta["numpy"])
        state = {"python": (version, tuple(internal), gauss),
                 "numpy": (kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached),
                 "torch": tensors.pop("torch"),
                 "tracker": {k.removeprefix("tracker/"): v for k, v in tensors.items()
                             if k.startswith("tracker/")}}
        if "cuda" in tensors:
            state["cuda"] = tensors["cuda"]
        return state
    except Exception as err:  # safetensors / json / key errors: a truncated or foreign file
        raise TrainConfigError(f"checkpoint.resume: {file}: unreadable RNG state, truncated or "
                               f"corrupt ({type(err).__name__}: {str(err).splitlines()[0][:200]})"
                               ) from None


def _read_legacy_rng_state(file: str) -> dict:
    allowed = [np.ndarray, np.dtype, type(np.dtype(np.uint32))]
    for module, name in _NUMPY_ARRAY_RECONSTRUCT:  # NumPy 2 / NumPy 1
        try:
            allowed.append(getattr(importlib.import_module(module), name))
            break
        except (ImportError, AttributeError):
            continue
    try:
        with torch.serialization.safe_globals(allowed):
            state = torch.load(file, map_location="cpu", weights_only=True)
        if not isinstance(state, dict) or not {"python", "numpy", "torch", "tracker"} <= set(state):
            raise ValueError("not an RNG state")
        return state
    except _UNREADABLE_PICKLE as err:
        found = re.search(r"(?:Unsupported global: GLOBAL|unsupported GLOBAL) ([\w.]+)", str(err))
        why = (f"it references {found.group(1)}, which an RNG state never holds (a pickle that "
               "could run code when loaded)") if found else "truncated or corrupt"
        raise TrainConfigError(f"checkpoint.resume: {file}: refused: {why}; delete the rng/ "
                               "directory to resume without restoring the RNG streams") from None
