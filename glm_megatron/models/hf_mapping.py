"""HF GLM checkpoint tensors <-> Megatron-Core GLM parameters, at any TP/PP/EP layout.

One place knows how the two name spaces and tensor layouts correspond; the conversion tools, the
parity tool and the tests all use it. The mapping works per *Megatron parameter of this rank*:

1. :func:`global_name` turns a rank-local parameter name (local layer index, local expert index,
   TE or local spec naming) into a canonical *global* Megatron name (global layer / expert).
2. :func:`hf_sources` says which HF tensors make that parameter and how (``copy``, ``qkv``
   per-group interleave, ``glu`` gate/up concatenation, ``gate_up`` the dense families' fused
   ``gate_up_proj``, which already is that concatenation).
3. :func:`combine` builds the full (unsharded) Megatron tensor from the HF tensors and
   :func:`split` inverts it; :func:`shard` cuts this rank's TP slice.

Layout facts (docs/ARCHITECTURE.md §6): Megatron's fused QKV weight interleaves per KV group
``[q (heads_per_group·hd) | k (hd) | v (hd)]`` for each group, so a contiguous TP slice of it is
whole groups; SwiGLU ``linear_fc1`` is ``cat(gate, up)`` *per TP rank*, so a TP slice is
``cat(gate_slice, up_slice)``, not a slice of the concatenation. The router's expert bias is
kept in fp32. The MTP layer is HF layer index ``num_hidden_layers + k``. The ``glm4`` sandwich
norms carry HF's names (``post_self_attn_layernorm``, ``post_mlp_layernorm``).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Protocol

import torch

from .config import GLMConfig
from .lora_names import is_adapter_param


class MappingError(ValueError):
    """A parameter or tensor that has no counterpart, or the wrong shape."""


@dataclass(frozen=True)
class Source:
    """How one Megatron tensor is made from HF tensors."""

    kind: str  # "copy" | "qkv" | "glu" | "gate_up"
    hf_names: tuple[str, ...]


# TE fuses the pre-attention / pre-MLP norms into the following linear and stores routed
# experts as one GroupedMLP per layer; translate those names to the local-spec ones.
_TE_RENAMES = [
    (re.compile(r"self_attention\.linear_qkv\.layer_norm_weight$"), "input_layernorm.weight"),
    (re.compile(r"mlp\.linear_fc1\.layer_norm_weight$"), "pre_mlp_layernorm.weight"),
    (re.compile(r"mlp\.experts\.linear_fc(\d)\.weight(\d+)$"),
     r"mlp.experts.local_experts.\2.linear_fc\1.weight"),
]

_LAYER_RE = re.compile(r"^(decoder|mtp)\.layers\.(\d+)\.(.*)$")
_EXPERT_RE = re.compile(r"^mlp\.experts\.local_experts\.(\d+)\.(.*)$")


def _te_to_local(name: str) -> str:
    for pattern, repl in _TE_RENAMES:
        new = pattern.sub(repl, name)
        if new != name:
            # The fused norm lives one level up in the local spec: strip its owner.
            if repl == "input_layernorm.weight":
                new = name[: name.index("self_attention.")] + repl
            elif repl == "pre_mlp_layernorm.weight":
                new = name[: name.index("mlp.")] + repl
            return new
    return name


_COLUMN_PARALLEL = re.compile(
    r"(^embedding\.word_embeddings\.weight|^output_layer\.weight|linear_qkv\.(weight|bias)"
    r"|linear_fc1\.weight|eh_proj\.weight)$"
)
_ROW_PARALLEL = re.compile(r"(linear_proj|linear_fc2)\.weight$")


def partition_dim(name: str) -> int | None:
    """The dimension Megatron splits across (expert-)TP ranks, None for replicated tensors.

    Decided by name, not by the parameter's ``partition_dim`` attribute, which Megatron only
    sets when it initialises the weights (``perform_initialization=True``).
    """
    if _COLUMN_PARALLEL.search(name):
        return 0
    if _ROW_PARALLEL.search(name):
        return 1
    return None


def is_expert_param(name: str) -> bool:
    """Routed-expert weights shard over the expert-TP group, everything else over TP."""
    return ".mlp.experts." in name


def global_name(
    local_name: str,
    *,
    layer_offset: int,
    expert_offset: int,
) -> str:
    """Canonical Megatron name with global layer and expert indices (local-spec naming).

    ``layer_offset`` is this pipeline (virtual) stage's first global decoder layer;
    ``expert_offset`` is ``ep_rank * num_local_experts``. MTP layers are numbered globally
    already (all of them live on the last stage).
    """
    name = _te_to_local(local_name)
    match = _LAYER_RE.match(name)
    if not match:
        return name
    block, index, rest = match.group(1), int(match.group(2)), match.group(3)
    if block == "decoder":
        index += layer_offset
    # The MTP block wraps a whole decoder layer: its experts sit under "transformer_layer.".
    inner = "transformer_layer." if rest.startswith("transformer_layer.") else ""
    expert = _EXPERT_RE.match(rest[len(inner):])
    if expert:
        local = int(expert.group(1))
        rest = f"{inner}mlp.experts.local_experts.{local + expert_offset}.{expert.group(2)}"
    return f"{block}.layers.{index}.{rest}"


def _layer_sources(prefix: str, rest: str, cfg: GLMConfig) -> Source | None:
    """Sources for a decoder-layer parameter named ``rest`` under HF ``prefix``."""
    attn = prefix + "self_attn."
    simple = {
        "input_layernorm.weight": prefix + "input_layernorm.weight",
        "pre_mlp_layernorm.weight": prefix + "post_attention_layernorm.weight",
        "post_self_attn_layernorm.weight": prefix + "post_self_attn_layernorm.weight",
        "post_mlp_layernorm.weight": prefix + "post_mlp_layernorm.weight",
        "self_attention.linear_proj.weight": attn + "o_proj.weight",
        "self_attention.q_layernorm.weight": attn + "q_norm.weight",
        "self_attention.k_layernorm.weight": attn + "k_norm.weight",
        "mlp.linear_fc2.weight": prefix + "mlp.down_proj.weight",
        "mlp.router.weight": prefix + "mlp.gate.weight",
        "mlp.router.expert_bias": prefix + "mlp.gate.e_score_correction_bias",
        "mlp.shared_experts.linear_fc2.weight": prefix + "mlp.shared_experts.down_proj.weight",
    }
    if rest in simple:
        return Source("copy", (simple[rest],))
    if rest in ("self_attention.linear_qkv.weight", "self_attention.linear_qkv.bias"):
        kind = rest.rsplit(".", 1)[1]
        return Source("qkv", tuple(f"{attn}{p}_proj.{kind}" for p in "qkv"))
    if rest == "mlp.linear_fc1.weight" and cfg.family.fused_gate_up:
        return Source("gate_up", (prefix + "mlp.gate_up_proj.weight",))
    if rest == "mlp.linear_fc1.weight":
        return Source("glu", (prefix + "mlp.gate_proj.weight", prefix + "mlp.up_proj.weight"))
    if rest == "mlp.shared_experts.linear_fc1.weight":
        p = prefix + "mlp.shared_experts."
        return Source("glu", (p + "gate_proj.weight", p + "up_proj.weight"))
    expert = _EXPERT_RE.match(rest)
    if expert:
        p = f"{prefix}mlp.experts.{expert.group(1)}."
        if expert.group(2) == "linear_fc1.weight":
            return Source("glu", (p + "gate_proj.weight", p + "up_proj.weight"))
        if expert.group(2) == "linear_fc2.weight":
            return Source("copy", (p + "down_proj.weight",))
    return None


def hf_sources(name: str, cfg: GLMConfig) -> Source:
    """The HF tensors behind the canonical Megatron parameter ``name`` (see :func:`global_name`)."""
    top = {
        "embedding.word_embeddings.weight": "model.embed_tokens.weight",
        "decoder.final_layernorm.weight": "model.norm.weight",
        "output_layer.weight": "lm_head.weight",
    }
    if name in top:
        return Source("copy", (top[name],))
    match = _LAYER_RE.match(name)
    if match:
        block, index, rest = match.group(1), int(match.group(2)), match.group(3)
        if block == "decoder":
            source = _layer_sources(f"model.layers.{index}.", rest, cfg)
        else:
            prefix = f"model.layers.{cfg.num_hidden_layers + index}."
            mtp_own = {
                "enorm.weight": prefix + "enorm.weight",
                "hnorm.weight": prefix + "hnorm.weight",
                "eh_proj.weight": prefix + "eh_proj.weight",
                "final_layernorm.weight": prefix + "shared_head.norm.weight",
            }
            if rest in mtp_own:
                source = Source("copy", (mtp_own[rest],))
            elif rest.startswith("transformer_layer."):
                source = _layer_sources(prefix, rest[len("transformer_layer."):], cfg)
            else:
                source = None
        if source is not None:
            return source
    raise MappingError(f"Megatron parameter {name!r} has no HF counterpart")


def combine(source: Source, tensors: list[torch.Tensor], cfg: GLMConfig) -> torch.Tensor:
    """Full (TP-unsharded) Megatron tensor from the HF tensors of ``source``."""
    if source.kind in ("copy", "gate_up"):
        return tensors[0]
    if source.kind == "glu":
        return torch.cat(tensors, dim=0)
    if source.kind == "qkv":
        q, k, v = tensors
        groups, hd = cfg.num_key_value_heads, cfg.head_dim
        per_group = cfg.num_attention_heads // groups
        tail = q.shape[1:]
        q = q.reshape(groups, per_group * hd, *tail)
        k = k.reshape(groups, hd, *tail)
        v = v.reshape(groups, hd, *tail)
        return torch.cat([q, k, v], dim=1).reshape(-1, *tail)
    raise MappingError(f"unknown mapping kind {source.kind!r}")


def split(source: Source, full: torch.Tensor, cfg: GLMConfig) -> list[torch.Tensor]:
    """Inverse of :func:`combine`: the HF tensors, in ``source.hf_names`` order."""
    if source.kind in ("copy", "gate_up"):
        return [full]
    if source.kind == "glu":
        return list(torch.chunk(full, 2, dim=0))
    if source.kind == "qkv":
        groups, hd = cfg.num_key_value_heads, cfg.head_dim
        per_group = cfg.num_attention_heads // groups
        tail = full.shape[1:]
        grouped = full.reshape(groups, (per_group + 2) * hd, *tail)
        q, k, v = torch.split(grouped, [per_group * hd, hd, hd], dim=1)
        return [t.reshape(-1, *tail).contiguous() for t in (q, k, v)]
    raise MappingError(f"unknown mapping kind {source.kind!r}")


def shard(full: torch.Tensor, source: Source, partition_dim: int | None, rank: int,
          size: int) -> torch.Tensor:
    """This TP rank's slice of a full Megatron tensor (``partition_dim`` None: replicated)."""
    if partition_dim is None or size == 1:
        return full
    if full.shape[partition_dim] % size:
        raise MappingError(
            f"dimension {partition_dim} of size {full.shape[partition_dim]} does not split over "
            f"{size} tensor-parallel ranks"
        )
    if source.kind in ("glu", "gate_up") and partition_dim == 0:
        gate, up = torch.chunk(full, 2, dim=0)
        return torch.cat([torch.chunk(gate, size, 0)[rank], torch.chunk(up, size, 0)[rank]], 0)
    return torch.chunk(full, size, dim=partition_dim)[rank]


# ----------------------------------------------------------------------------------------------
# Walking a built model.


@dataclass(frozen=True)
class LocalTensor:
    """One tensor of this rank's model chunk that corresponds to HF weights."""

    local_name: str
    name: str  # canonical global Megatron name
    tensor: torch.Tensor
    source: Source
    partition_dim: int | None
    expert: bool


def _layer_offset(model) -> int:
    layers = getattr(getattr(model, "decoder", None), "layers", None)
    if layers is None or len(layers) == 0:
        return 0
    return layers[0].layer_number - 1


def iter_local_tensors(model, cfg: GLMConfig, *, ep_rank: int, ep_size: int) -> Iterator[LocalTensor]:
    """Every parameter (and the router's expert-bias buffer) of one model chunk, mapped."""
    layer_offset = _layer_offset(model)
    num_local_experts = cfg.n_routed_experts // ep_size if cfg.n_routed_experts else 0
    expert_offset = ep_rank * num_local_experts
    named = list(model.named_parameters())
    named += [(n, b) for n, b in model.named_buffers() if n.endswith("router.expert_bias")]
    for local_name, tensor in named:
        if is_adapter_param(local_name):
            continue  # LoRA adapters are not HF model weights (models/lora.py maps them)
        name = global_name(local_name, layer_offset=layer_offset, expert_offset=expert_offset)
        source = hf_sources(name, cfg)
        yield LocalTensor(
            local_name=local_name,
            name=name,
            tensor=tensor,
            source=source,
            partition_dim=partition_dim(name),
            expert=is_expert_param(name),
        )


class TensorReader(Protocol):
    """Where HF tensors come from (e.g. :class:`~.hf_checkpoint.HFCheckpointReader`)."""

    def shape(self, name: str) -> tuple: ...

    def read(self, name: str) -> torch.Tensor: ...

    def read_slice(self, name: str, dim: int, start: int, stop: int) -> torch.Tensor: ...


def read_shard(source: Source, cfg: GLMConfig, reader: TensorReader, dim: int | None,
               rank: int, size: int) -> torch.Tensor:
    """This TP rank's slice of a Megatron tensor, reading only the HF rows/columns it needs.

    Equal to ``shard(combine(full HF tensors), ...)``, but a rank's memory stays at its shard:
    a QKV slice is whole KV groups of q, k and v; a GLU slice is the gate slice then the up slice.
    """
    if dim is None or size == 1:
        return combine(source, [reader.read(n) for n in source.hf_names], cfg)
    if source.kind == "qkv":
        groups = cfg.num_key_value_heads // size
        per_group = cfg.num_attention_heads // cfg.num_key_value_heads
        q_rows, kv_rows = groups * per_group * cfg.head_dim, groups * cfg.head_dim
        q, k, v = source.hf_names
        parts = [reader.read_slice(q, 0, rank * q_rows, (rank + 1) * q_rows),
                 reader.read_slice(k, 0, rank * kv_rows, (rank + 1) * kv_rows),
                 reader.read_slice(v, 0, rank * kv_rows, (rank + 1) * kv_rows)]
        local = cfg.replace(num_key_value_heads=groups, num_attention_heads=groups * per_group)
        return combine(source, parts, local)
    if source.kind == "gate_up":
        # This rank's rows of the gate half, then the same rows of the up half.
        (name,) = source.hf_names
        half = reader.shape(name)[0] // 2
        step = _split_length(name, half, size)
        return torch.cat([reader.read_slice(name, 0, start + rank * step, start + (rank + 1) * step)
                          for start in (0, half)], dim=0)
    parts = []
    for name in source.hf_names:
        step = _split_length(name, reader.shape(name)[dim], size, dim)
        parts.append(reader.read_slice(name, dim, rank * step, (rank + 1) * step))
    return combine(source, parts, cfg)


def _split_length(name: str, length: int, size: int, dim: int = 0) -> int:
    if length % size:
        raise MappingError(
            f"{name}: dimension {dim} of size {length} does not split over {size} ranks"
        )
    return length // size


def load_hf_weights(
    model_chunks: Iterable,
    cfg: GLMConfig,
    reader: TensorReader,
    *,
    tp_rank: int,
    tp_size: int,
    etp_rank: int,
    etp_size: int,
    ep_rank: int,
    ep_size: int,
    on_tensor: Callable[[str, int], None] | None = None,
) -> dict[str, str]:
    """Copy HF weights into this rank's model chunks; returns {HF name: Megatron name} used.

    Each rank reads only the HF tensors, and of those only the slices, that its part of the model
    needs. Shapes are checked: a mismatch names the tensors, the expected and the found shape.
    """
    used: dict[str, str] = {}
    for chunk in model_chunks:
        for item in iter_local_tensors(chunk, cfg, ep_rank=ep_rank, ep_size=ep_size):
            rank, size = (etp_rank, etp_size) if item.expert else (tp_rank, tp_size)
            piece = read_shard(item.source, cfg, reader, item.partition_dim, rank, size)
            if tuple(piece.shape) != tuple(item.tensor.shape):
                raise MappingError(
                    f"{', '.join(item.source.hf_names)} -> {item.name}: expected this rank's "
                    f"shape {tuple(item.tensor.shape)}, found {tuple(piece.shape)}"
                )
            with torch.no_grad():
                item.tensor.copy_(piece.to(item.tensor.dtype))
            for n in item.source.hf_names:
                used[n] = item.name
            if on_tensor is not None:
                on_tensor(item.name, piece.numel() * piece.element_size())
    return used
