"""Checks on a ``torch_dist`` directory before anything reads it, and reading it without pickle.

A ``torch_dist`` checkpoint (PyTorch Distributed Checkpoint, what Megatron's
``dist_checkpointing`` writes) is ``.metadata`` (a pickle), ``__R_N.distcp`` shard files (one
``torch.save`` per item at an offset), ``common.pt`` and ``metadata.json``. Checkpoints are
shared between teams and downloaded, and a pickle runs code when it is loaded, so:

- ``.metadata`` is unpickled here with an allowlist (the checkpoint-metadata dataclasses and
  enums of ``torch.distributed.checkpoint``, ``torch.Size``, dtypes and layouts); anything else
  is refused before torch's own ``pickle.load`` of the same file (``FileSystemReader
  .read_metadata``) could run it;
- every ``torch.load`` during a load is weights-only (:func:`weights_only_loads`): torch's
  ``DefaultLoadPlanner.load_bytes`` loads byte items with ``weights_only=False``;
- the metadata names every item's shard file, offset and length, so a missing or truncated
  shard is named with its path before the load starts (:func:`check_torch_dist`), and a shard
  whose bytes are not torch-serialised data is found by its item headers after a failed load
  (:func:`load_failure`) -- never with torch's advice to retry with ``weights_only=False``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import os
import pickle
import re

import torch

from .config import ConfigError

METADATA_FILE = ".metadata"
_DCP_MODULES = ("torch.distributed.checkpoint.metadata", "torch.distributed.checkpoint.planner",
                "torch.distributed.checkpoint.filesystem")
# Functions torch itself pickles into the metadata (a layout is saved by name).
_ALLOWED_FUNCTIONS = {("torch.serialization", "_get_layout")}
# Plain value classes torch's metadata may hold (StorageMeta.checkpoint_id is the save path).
_ALLOWED_CLASSES = {("collections", "OrderedDict"), ("pathlib", "PosixPath"),
                    ("pathlib", "PurePosixPath"), ("pathlib", "WindowsPath"),
                    ("pathlib", "PureWindowsPath"), ("pathlib._local", "PosixPath")}
_ZIP_MAGIC = b"PK\x03\x04"  # torch.save's format: every shard item starts with it


def read_errors() -> tuple:
    """What a failed torch_dist read raises: torch's ``CheckpointException`` (which gathers the
    per-rank errors) is a BaseException, not an Exception."""
    from torch.distributed.checkpoint.api import CheckpointException

    return (Exception, CheckpointException)


class CheckpointFileError(ConfigError):
    """A torch_dist file that is missing, truncated, corrupt or refused; names the file."""


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        import importlib

        if (module, name) in _ALLOWED_FUNCTIONS:
            return super().find_class(module, name)
        if module in _DCP_MODULES:
            obj = getattr(importlib.import_module(module), name, None)
            if isinstance(obj, type) and (dataclasses.is_dataclass(obj) or issubclass(obj, enum.Enum)):
                return obj
        if module == "torch":
            obj = getattr(torch, name, None)
            if obj is torch.Size or isinstance(obj, (torch.dtype, torch.layout, torch.memory_format)):
                return obj
        if (module, name) in _ALLOWED_CLASSES:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{module}.{name}")


def read_metadata(path: str):
    """The ``torch.distributed.checkpoint`` Metadata of ``path``, unpickled with an allowlist."""
    file = os.path.join(path, METADATA_FILE)
    try:
        with open(file, "rb") as fh:
            metadata = _MetadataUnpickler(fh).load()
    except FileNotFoundError:
        raise CheckpointFileError(f"{file}: missing (the torch_dist checkpoint is incomplete)") from None
    except pickle.UnpicklingError as err:
        if re.fullmatch(r"[\w.]+\.[\w]+", str(err)):
            raise CheckpointFileError(
                f"{file}: refused: it references {err}, which checkpoint metadata never holds "
                "(a pickle that could run code when loaded)") from None
        raise CheckpointFileError(f"{file}: corrupt or truncated ({err})") from None
    except (EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError) as err:
        raise CheckpointFileError(f"{file}: corrupt or truncated ({type(err).__name__}: {err})") from None
    from torch.distributed.checkpoint.metadata import Metadata

    if not isinstance(metadata, Metadata):
        raise CheckpointFileError(f"{file}: not torch_dist metadata (a {type(metadata).__name__})")
    return metadata


def _items_by_file(metadata) -> dict[str, list]:
    files: dict[str, list] = {}
    for info in (metadata.storage_data or {}).values():
        files.setdefault(info.relative_path, []).append(info)
    return files


def check_torch_dist(path: str):
    """Raise :class:`CheckpointFileError` naming the file unless ``path``'s metadata is safe and
    readable and every shard file it names exists and holds all its items; returns the
    metadata."""
    metadata = read_metadata(path)
    for name, items in sorted(_items_by_file(metadata).items()):
        file = os.path.join(path, name)
        if not os.path.isfile(file):
            raise CheckpointFileError(f"{file}: missing (named by {METADATA_FILE})")
        need, size = max(i.offset + i.length for i in items), os.path.getsize(file)
        if size < need:
            raise CheckpointFileError(f"{file}: truncated ({size} bytes, {METADATA_FILE} says "
                                      f"at least {need})")
    return metadata


def corrupt_shard(path: str) -> str | None:
    """The first shard file of ``path`` with an item that does not start like ``torch.save``
    output (random or overwritten bytes), or None."""
    for name, items in sorted(_items_by_file(read_metadata(path)).items()):
        file = os.path.join(path, name)
        with open(file, "rb") as fh:
            for item in sorted(items, key=lambda i: i.offset):
                if item.transform_descriptors:  # compressed items: no fixed header to check
                    continue
                fh.seek(item.offset)
                if fh.read(len(_ZIP_MAGIC)) != _ZIP_MAGIC:
                    return file
    return None


def load_failure(path: str, err: BaseException) -> CheckpointFileError:
    """The user-facing error of a failed read of ``path``: the corrupt file when one can be
    found, else the first line of the underlying error (torch's weights-only hints removed)."""
    try:
        check_torch_dist(path)
        bad = corrupt_shard(path)
    except CheckpointFileError as found:
        return found
    except OSError as found:
        return CheckpointFileError(f"{path}: unreadable ({found})")
    if bad:
        return CheckpointFileError(f"{bad}: corrupt (its bytes are not torch-serialised tensors)")
    first = next((ln.strip() for ln in str(err).splitlines() if ln.strip()), type(err).__name__)
    if "weights_only" in first or "Weights only" in first:
        first = "an item that is not a plain tensor"
    return CheckpointFileError(f"{path}: cannot read the torch_dist checkpoint ({first[:300]})")


@contextlib.contextmanager
def weights_only_loads():
    """Every ``torch.load`` in the block is weights-only, whatever its caller asked for."""
    name = "TORCH_FORCE_WEIGHTS_ONLY_LOAD"
    previous = os.environ.get(name)
    os.environ[name] = "1"
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = previous


@contextlib.contextmanager
def checked_read(path: str):
    """The block reads the torch_dist checkpoint ``path``: checked first, weights-only loads,
    and any failure turned into one :class:`CheckpointFileError` naming the file."""
    check_torch_dist(path)
    try:
        with weights_only_loads():
            yield
    except ConfigError:
        raise
    except read_errors() as err:  # torch/Megatron raise many types for unreadable shards
        from ..parallel.launch_env import is_peer_failure

        if is_peer_failure(err):  # another rank died mid-load: its error is the one to show
            raise
        raise load_failure(path, err) from None
