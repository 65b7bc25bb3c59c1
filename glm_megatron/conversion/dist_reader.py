"""Read global tensors straight from a ``torch_dist`` checkpoint, without building a model.

Megatron's ``dist_checkpointing`` writes PyTorch Distributed Checkpoint files whose metadata
names every global tensor with its full shape; ``torch.distributed.checkpoint.load`` with
``no_dist=True`` fills preallocated tensors in one process. Keys are read in small groups so
memory stays at about one decoder layer.
"""

from __future__ import annotations

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.metadata import TensorStorageMetadata

from ..models.hf_layout import is_model_tensor_key
from ..models.torch_dist_files import (
    check_torch_dist,
    load_failure,
    read_errors,
    weights_only_loads,
)


class TorchDistReader:
    def __init__(self, path: str):
        self.path = path
        # Pickle-free, and every shard file present and long enough (names the bad file).
        metadata = check_torch_dist(path)
        self.tensors: dict[str, TensorStorageMetadata] = {
            key: meta for key, meta in metadata.state_dict_metadata.items()
            if isinstance(meta, TensorStorageMetadata) and is_model_tensor_key(key)
        }

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self.tensors[key].size)

    def dtype(self, key: str) -> torch.dtype:
        return self.tensors[key].properties.dtype

    def nbytes(self, key: str) -> int:
        meta = self.tensors[key]
        return meta.size.numel() * torch.empty((), dtype=meta.properties.dtype).element_size()

    def load(self, keys: list[str]) -> dict[str, torch.Tensor]:
        state = {k: torch.empty(self.shape(k), dtype=self.dtype(k)) for k in keys}
        try:
            with weights_only_loads():
                dcp.load(state, storage_reader=dcp.FileSystemReader(self.path), no_dist=True)
        except read_errors() as err:  # corrupt .distcp shard files: name the file
            raise load_failure(self.path, err) from None
        return state
