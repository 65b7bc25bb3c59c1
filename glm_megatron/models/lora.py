"""LoRA adapters on Megatron-Core's parallel linears, exact under tensor and sequence parallelism.

``y = W x + s · B A x`` with ``s = alpha / r`` (rsLoRA: ``alpha / sqrt(r)``), A random, B zero
at the start, dropout on the adapter's input (docs/ARCHITECTURE.md §6). Targets use HF module
names (:func:`valid_targets`); one adapter per HF module, as PEFT stores it.

Each adapted Megatron linear gets a sibling module ``<linear>_lora`` (so the base weights keep
their names and checkpoint keys) and a forward hook that adds the adapter's output to the
linear's. Under tensor parallelism:

* **column-parallel** base (``linear_qkv``, ``linear_fc1``): A is replicated, B holds this rank's
  output rows laid out like the base weight — q/k/v rows of the local KV groups inside the fused
  QKV output, this rank's gate rows then up rows inside ``fc1``. With SP the (sequence-sharded)
  input is all-gathered first, its gradient split back (the adapter path is replicated); ``A x``
  passes Megatron's ``copy_to_tensor_model_parallel_region`` so its gradient, and with it A's, is
  summed over the TP ranks.
* **row-parallel** base (``linear_proj``, ``linear_fc2``): A holds this rank's input columns, B is
  replicated; ``A x`` is all-reduced (``reduce_from_tensor_model_parallel_region``) and, with SP,
  the adapter's output is split along the sequence like the base's reduce-scatter.

Every adapter parameter's gradient is then complete on every rank that holds it, so Megatron's
DDP, gradient clipping and distributed optimizer treat them like any other parameter.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from megatron.core import parallel_state as ps
from megatron.core import tensor_parallel
from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes

from .config import ConfigError, GLMConfig
from .lora_names import ADAPTER_SUFFIX

ATTENTION_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")


def valid_targets(cfg: GLMConfig) -> tuple[str, ...]:
    """HF module names LoRA can target on ``cfg``'s model.

    Dense models: attention and the MLP (``gate_up_proj`` is one module in their checkpoints).
    MoE models: attention only for now — peft (0.21, transformers 5) maps ``gate_proj`` /
    ``up_proj`` / ``down_proj`` of a ``glm4_moe`` model onto the routed experts' fused
    parameters, which our per-expert Megatron experts do not adapt yet; an adapter that peft
    could not read back would be no PEFT adapter.
    """
    if cfg.is_moe:
        return ATTENTION_TARGETS
    return ATTENTION_TARGETS + ("gate_up_proj", "down_proj")


@dataclass(frozen=True)
class LoraSettings:
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj")
    rslora: bool = False

    @property
    def scale(self) -> float:
        return self.alpha / (math.sqrt(self.r) if self.rslora else self.r)


def resolve_targets(cfg: GLMConfig, requested, key: str = "model.lora_target_modules"):
    """HF target names -> a tuple of valid ones; ``all-linear`` means every one. Raises naming
    ``key`` and the valid names."""
    names = [requested] if isinstance(requested, str) else list(requested)
    valid = valid_targets(cfg)
    if names == ["all-linear"]:
        return valid
    unknown = [n for n in names if n not in valid]
    if unknown or not names:
        raise ConfigError(
            f"{key}: {', '.join(unknown) or 'nothing'} is not a linear module of a "
            f"{cfg.model_type} model; valid: {', '.join(valid)} or all-linear"
        )
    return tuple(n for n in valid if n in names)


@dataclass(frozen=True)
class Segment:
    """One HF module's rows inside a column-parallel base's local output, repeated per group."""

    name: str  # HF module whose lora_B these rows are ("q_proj", "gate_up_proj", ...)
    part: str  # the part of that module's rows ("q", "gate", "up", ...)
    width: int  # local rows per group


def column_segments(base: str, cfg: GLMConfig, tp: int) -> tuple[int, list[Segment]]:
    """(groups, segments) of a column-parallel base's local output rows."""
    if base == "linear_qkv":
        groups, hd = cfg.num_key_value_heads // tp, cfg.head_dim
        per_group = cfg.num_attention_heads // cfg.num_key_value_heads
        return groups, [Segment("q_proj", "q", per_group * hd), Segment("k_proj", "k", hd),
                        Segment("v_proj", "v", hd)]
    # A dense fc1: this rank's gate rows then its up rows, both of HF's one gate_up_proj.
    width = cfg.intermediate_size // tp
    return 1, [Segment("gate_up_proj", "gate", width), Segment("gate_up_proj", "up", width)]


def _init_a(shape: tuple[int, int], seed: int) -> torch.Tensor:
    """PEFT's default: kaiming-uniform(a=√5) over the full A, the same on every rank."""
    a = torch.empty(shape)
    torch.nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=torch.Generator().manual_seed(seed))
    return a


class ColumnLora(torch.nn.Module):
    """Adapters whose B rows sit inside a column-parallel linear's output (see module doc)."""

    def __init__(self, groups: int, segments: list[Segment], targets: tuple[str, ...],
                 in_features: int, settings: LoraSettings, seed: int, dtype, sequence_parallel):
        super().__init__()
        self.enabled = True
        self.groups, self.segments, self.settings = groups, segments, settings
        self.sequence_parallel = sequence_parallel
        self.dropout = torch.nn.Dropout(settings.dropout)
        self.adapters = torch.nn.ModuleDict()
        for k, name in enumerate(dict.fromkeys(s.name for s in segments if s.name in targets)):
            pair = torch.nn.Module()
            pair.lora_A = torch.nn.Parameter(_init_a((settings.r, in_features), seed + k).to(dtype))
            pair.lora_B = torch.nn.ParameterDict()
            for s in segments:
                if s.name == name:
                    b = torch.nn.Parameter(torch.zeros(groups * s.width, settings.r, dtype=dtype))
                    set_tensor_model_parallel_attributes(b, True, 0, 1)
                    pair.lora_B[s.part] = b
            self.adapters[name] = pair

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.sequence_parallel:
            x = tensor_parallel.gather_from_sequence_parallel_region(
                x, tensor_parallel_output_grad=False)
        x = self.dropout(x)
        lead = x.shape[:-1]
        parts = []
        for name, pair in self.adapters.items():
            h = tensor_parallel.copy_to_tensor_model_parallel_region(x @ pair.lora_A.t())
            parts.append((name, h))
        hidden = dict(parts)  # HF module name -> its A x
        pieces = []
        for s in self.segments:
            if s.name in hidden:
                delta = hidden[s.name] @ self.adapters[s.name].lora_B[s.part].t()
                pieces.append(delta.view(*lead, self.groups, s.width))
            else:
                pieces.append(x.new_zeros(*lead, self.groups, s.width))
        return torch.cat(pieces, dim=-1).view(*lead, -1) * self.settings.scale


class RowLora(torch.nn.Module):
    """One adapter on a row-parallel linear (``o_proj``, ``down_proj``)."""

    def __init__(self, name: str, in_features: int, out_features: int, settings: LoraSettings,
                 seed: int, dtype, sequence_parallel: bool):
        super().__init__()
        self.enabled = True
        self.settings, self.sequence_parallel = settings, sequence_parallel
        self.dropout = torch.nn.Dropout(settings.dropout)
        tp, rank = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
        full = _init_a((settings.r, in_features), seed)
        pair = torch.nn.Module()
        pair.lora_A = torch.nn.Parameter(full.chunk(tp, dim=1)[rank].contiguous().to(dtype))
        set_tensor_model_parallel_attributes(pair.lora_A, True, 1, 1)
        pair.lora_B = torch.nn.ParameterDict(
            {"all": torch.nn.Parameter(torch.zeros(out_features, settings.r, dtype=dtype))})
        self.adapters = torch.nn.ModuleDict({name: pair})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        (pair,) = self.adapters.values()
        if self.settings.dropout and self.training:
            with tensor_parallel.get_cuda_rng_tracker().fork():
                x = self.dropout(x)  # this rank's input columns: a dropout mask of its own
        h = tensor_parallel.reduce_from_tensor_model_parallel_region(x @ pair.lora_A.t())
        out = (h @ pair.lora_B["all"].t()) * self.settings.scale
        if self.sequence_parallel:
            out = tensor_parallel.scatter_to_sequence_parallel_region(out)
        return out


class _ShardedAdapterState:
    """Checkpoint layout of an adapter module: tensor-parallel parameters sharded along their
    ``partition_dim`` (so the global tensors are the HF ones), the others replicated."""

    def sharded_state_dict(self, prefix="", sharded_offsets=(), metadata=None):
        from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint

        axes = {n: p.partition_dim for n, p in self.named_parameters()
                if getattr(p, "tensor_model_parallel", False)}
        return make_sharded_tensors_for_checkpoint(
            self.state_dict(prefix="", keep_vars=True), prefix, axes, sharded_offsets)


class ColumnParallelAdapter(_ShardedAdapterState, ColumnLora):
    pass


class RowParallelAdapter(_ShardedAdapterState, RowLora):
    pass


def _add_adapter_output(adapter):
    def hook(_module, args, kwargs, output):
        if not adapter.enabled:
            return output
        out, bias = output
        x = args[0] if args else kwargs["input_"]
        return out + adapter(x).to(out.dtype), bias

    return hook


def adapter_modules(chunks):
    return [m for c in chunks for m in c.modules() if isinstance(m, (ColumnLora, RowLora))]


class AdaptersOff:
    """``with AdaptersOff(chunks):`` the chunks compute the base model (every adapter skipped):
    a LoRA policy is its own PPO reference, with one copy of the base weights in memory."""

    def __init__(self, chunks):
        self.adapters = adapter_modules(chunks)

    def __enter__(self):
        for a in self.adapters:
            a.enabled = False
        return self

    def __exit__(self, *exc):
        for a in self.adapters:
            a.enabled = True
        return False


@dataclass(frozen=True)
class AdaptedLinear:
    """Where one adapter module sits: its owner, the base linear's attribute, its HF prefix."""

    owner: torch.nn.Module
    base: str  # "linear_qkv", "linear_proj", "linear_fc1", "linear_fc2"
    kind: str  # "column" | "row"
    hf_prefix: str  # "model.layers.3.self_attn." / "model.layers.3.mlp."


def adaptable_linears(chunk, cfg: GLMConfig):
    """Every linear of this chunk's decoder layers that LoRA can adapt (see valid_targets)."""
    for layer in getattr(getattr(chunk, "decoder", None), "layers", []):
        index = layer.layer_number - 1
        attn = layer.self_attention
        yield AdaptedLinear(attn, "linear_qkv", "column", f"model.layers.{index}.self_attn.")
        yield AdaptedLinear(attn, "linear_proj", "row", f"model.layers.{index}.self_attn.")
        if not cfg.is_moe:
            yield AdaptedLinear(layer.mlp, "linear_fc1", "column", f"model.layers.{index}.mlp.")
            yield AdaptedLinear(layer.mlp, "linear_fc2", "row", f"model.layers.{index}.mlp.")


def attach_lora(chunks, cfg: GLMConfig, settings: LoraSettings, *, seed: int = 0) -> int:
    """Add adapters for ``settings.targets`` to this rank's chunks; freeze everything else.

    Returns the number of adapter parameters on this rank. A and B start as PEFT starts them
    (A kaiming-uniform from a seed of the layer and module, B zero), identically on every rank.
    """
    tp = ps.get_tensor_model_parallel_world_size()
    count = 0
    for chunk in chunks:
        for p in chunk.parameters():
            p.requires_grad_(False)
        for k, site in enumerate(adaptable_linears(chunk, cfg)):
            base = getattr(site.owner, site.base)
            weight = base.weight
            site_seed = seed * 1_000_003 + int(site.hf_prefix.split(".")[2]) * 101 + k
            sp = bool(base.config.sequence_parallel)
            if site.kind == "column":
                groups, segments = column_segments(site.base, cfg, tp)
                if not any(s.name in settings.targets for s in segments):
                    continue
                adapter = ColumnParallelAdapter(groups, segments, settings.targets,
                                                weight.shape[1], settings, site_seed,
                                                weight.dtype, sp)
            else:
                name = "o_proj" if site.base == "linear_proj" else "down_proj"
                if name not in settings.targets:
                    continue
                adapter = RowParallelAdapter(name, weight.shape[1] * tp, weight.shape[0],
                                             settings, site_seed, weight.dtype, sp)
            adapter.to(weight.device)
            site.owner.add_module(site.base + ADAPTER_SUFFIX, adapter)
            base.register_forward_hook(_add_adapter_output(adapter), with_kwargs=True)
            count += sum(p.numel() for p in adapter.parameters())
    return count


def peft_tensors(site: AdaptedLinear, adapter) -> dict[str, list[tuple[str, torch.nn.Parameter]]]:
    """PEFT tensor name -> this rank's parameters that hold it (several B parts are concatenated
    along rows, e.g. gate then up of ``gate_up_proj``)."""
    out = {}
    for name, pair in adapter.adapters.items():
        hf = f"base_model.model.{site.hf_prefix}{name}."
        out[hf + "lora_A.weight"] = [("A", pair.lora_A)]
        out[hf + "lora_B.weight"] = [(part, b) for part, b in pair.lora_B.items()]
    return out


def load_peft_adapter(chunks, cfg: GLMConfig, tensors: dict[str, torch.Tensor],
                      source: str) -> set[str]:
    """Copy a PEFT adapter's (full, unsharded) tensors into this rank's adapters; returns the
    names used. A missing tensor or a shape that does not fit is refused naming it."""
    tp, rank = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
    used = set()
    for chunk in chunks:
        for site in adaptable_linears(chunk, cfg):
            adapter = getattr(site.owner, site.base + ADAPTER_SUFFIX, None)
            if adapter is None:
                continue
            for hf_name, params in peft_tensors(site, adapter).items():
                if hf_name not in tensors:
                    raise ConfigError(f"{source}: adapter has no tensor {hf_name}")
                full = tensors[hf_name]
                pieces = full.chunk(len(params), dim=0) if len(params) > 1 else [full]
                for (_, param), piece in zip(params, pieces):
                    if getattr(param, "tensor_model_parallel", False):
                        piece = piece.chunk(tp, dim=param.partition_dim)[rank]
                    if tuple(piece.shape) != tuple(param.shape):
                        raise ConfigError(f"{source}: {hf_name}: shape {tuple(full.shape)} does "
                                          f"not fit this model (this rank expects "
                                          f"{tuple(param.shape)} per part)")
                    with torch.no_grad():
                        param.copy_(piece)
                used.add(hf_name)
    return used
