"""Read an HF safetensors checkpoint lazily: each rank opens only the tensors it asks for."""

from __future__ import annotations

import json
import os

import torch
from safetensors import safe_open

from .config import ConfigError

_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}


class HFCheckpointReader:
    """Name -> file index over ``model.safetensors`` or ``model.safetensors.index.json``."""

    def __init__(self, hf_dir: str):
        self.hf_dir = hf_dir
        index = os.path.join(hf_dir, "model.safetensors.index.json")
        single = os.path.join(hf_dir, "model.safetensors")
        self.files: dict[str, str] = {}
        self._open: dict[str, object] = {}
        if os.path.exists(index):
            try:
                with open(index, encoding="utf-8") as fh:
                    weight_map = json.load(fh)["weight_map"]
            except (json.JSONDecodeError, KeyError) as err:
                raise ConfigError(f"{index}: not a safetensors index ({err})") from None
            for name, file in weight_map.items():
                self.files[name] = os.path.join(hf_dir, file)
            missing = sorted({f for f in self.files.values() if not os.path.exists(f)})
            if missing:
                raise ConfigError(f"{index}: shard file(s) missing: {', '.join(missing)}")
            self._check_index(index)
        elif os.path.exists(single):
            try:
                with safe_open(single, "pt") as fh:
                    self.files = {name: single for name in fh.keys()}
            except Exception as err:
                raise ConfigError(f"{single}: not a readable safetensors file ({err})") from None
        else:
            raise ConfigError(
                f"{hf_dir}: no model.safetensors or model.safetensors.index.json found"
            )

    def _check_index(self, index: str) -> None:
        """Every tensor the index lists is in the shard it names (only the headers are read)."""
        by_file: dict[str, list[str]] = {}
        for name, file in self.files.items():
            by_file.setdefault(file, []).append(name)
        for file, names in sorted(by_file.items()):
            present = set(self._handle_of(file).keys())
            absent = sorted(n for n in names if n not in present)
            if absent:
                raise ConfigError(f"{index}: {len(absent)} tensor(s) listed for "
                                  f"{os.path.basename(file)} are not in that file: "
                                  f"{', '.join(absent[:5])}")

    def names(self) -> list[str]:
        return sorted(self.files)

    def __contains__(self, name: str) -> bool:
        return name in self.files

    def _handle(self, name: str):
        try:
            file = self.files[name]
        except KeyError:
            raise ConfigError(f"{self.hf_dir}: checkpoint has no tensor {name!r}") from None
        return self._handle_of(file)

    def _handle_of(self, file: str):
        handle = self._open.get(file)
        if handle is None:
            try:
                handle = self._open[file] = safe_open(file, "pt")
            except Exception as err:  # safetensors raises its own error types for bad headers
                raise ConfigError(f"{file}: not a readable safetensors file ({err})") from None
        return handle

    def read(self, name: str) -> torch.Tensor:
        return self._handle(name).get_tensor(name)

    def read_slice(self, name: str, dim: int, start: int, stop: int) -> torch.Tensor:
        """Rows (dim 0) or columns (dim 1) ``start:stop``; only those bytes are read."""
        part = self._handle(name).get_slice(name)
        index = (slice(start, stop),) if dim == 0 else (slice(None), slice(start, stop))
        return part[index]

    def shape(self, name: str) -> tuple:
        """Shape from the file header, without reading the data."""
        return tuple(self._handle(name).get_slice(name).get_shape())

    def dtype(self, name: str) -> torch.dtype:
        return _SAFETENSORS_DTYPES[self._handle(name).get_slice(name).get_dtype()]
