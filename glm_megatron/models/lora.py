"""LoRA adapters on Megatron-Core's parallel linears, exact under tensor, sequence and expert
parallelism.

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

**Routed experts** (MoE, Megatron's ``SequentialMLP``: ``local_experts[i]`` with
``linear_fc1 = cat(gate, up)`` and ``linear_fc2``; global expert = EP rank × local count + i) do
no communication in their linears: the token dispatcher gathers the tokens over the expert-TP ×
EP ranks before them and sums their partial outputs after. An expert adapter follows the same
contract: no activation collective; ``fc1``'s B holds this expert-TP rank's gate and up rows and
its (replicated) A has its gradient summed over the expert-TP group; ``fc2``'s A holds this
rank's input columns, its output is a partial sum like the base's, and its replicated B has its
gradient summed over the expert-TP group. The parameters are marked like Megatron's expert
weights (``allreduce = False``: DDP reduces them over the expert-data-parallel group) and their
checkpoint shards carry the expert offsets :class:`SequentialMLP` adds. Expert TP must be 1 or
the TP size (the gradient norm counts a replicated parameter on TP rank 0 only).

Every adapter parameter's gradient is then complete on every rank that holds it, so Megatron's
DDP, gradient clipping and distributed optimizer treat them like any other parameter.

**What HF names mean on ``glm4_moe``** (checked against peft 0.21.2 on transformers 5.24, which
keeps the routed experts fused: ``mlp.experts.gate_up_proj`` [E, 2I, H], ``mlp.experts.down_proj``
[E, H, I]). peft rewrites ``target_modules`` ``gate_proj`` / ``up_proj`` / ``down_proj`` of such a
model into ``target_parameters`` on those two fused parameters (its transformers-v5 conversion,
``peft.utils.transformers_weight_conversion``): the *routed experts only* — the shared expert and
the dense layers' MLPs are then not adapted, and tensors for them in an adapter file are dropped
without a word. ``gate_proj`` and ``up_proj`` become one adapter of rank ``2r`` and alpha
``2·alpha`` on the fused ``gate_up_proj`` (peft's ``rank_pattern`` / ``alpha_pattern``), and peft
refuses one of the two without the other. So here, on MoE models:

* ``gate_proj`` + ``up_proj`` (together), ``down_proj``: every routed expert, exactly as peft
  adapts them (:meth:`LoraSettings.expert_gate_up`: rank 2r, alpha 2·alpha);
* ``shared_experts.gate_proj`` / ``.up_proj`` / ``.down_proj``: the shared expert;
* ``mlp.gate_proj`` / ``.up_proj`` / ``.down_proj``: the first ``first_k_dense_replace`` dense
  layers' MLP (peft's dotted-suffix spelling);
* ``all-linear``: all of them and the attention projections (peft's own ``all-linear`` on
  glm4_moe adapts the router and misses the shared expert and dense MLPs).

The export writes the last two groups as peft ``target_parameters`` on their ``.weight`` (which
peft does not rewrite), so peft reads every adapter back (models/lora_experts.py has the formats).
"""

from __future__ import annotations

import math
import re
import zlib
from dataclasses import dataclass, field, replace

import torch
from megatron.core import parallel_state as ps
from megatron.core import tensor_parallel
from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes

from .config import ConfigError, GLMConfig
from .lora_names import ADAPTER_SUFFIX

ATTENTION_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
DENSE_MLP_TARGETS = ("gate_up_proj", "down_proj")  # dense GLM-4: one fused gate_up_proj module
EXPERT_TARGETS = ("gate_proj", "up_proj", "down_proj")  # MoE: the routed experts (peft's reading)
SHARED_EXPERT_TARGETS = ("shared_experts.gate_proj", "shared_experts.up_proj",
                         "shared_experts.down_proj")
DENSE_LAYER_TARGETS = ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")  # MoE's first dense layers
ETP_KEY = "parallel.expert_tensor_parallel_size"


def valid_targets(cfg: GLMConfig) -> tuple[str, ...]:
    """HF module names LoRA can target on ``cfg``'s model (module doc: what they mean on MoE)."""
    if not cfg.is_moe:
        return ATTENTION_TARGETS + DENSE_MLP_TARGETS
    targets = ATTENTION_TARGETS + EXPERT_TARGETS
    if cfg.n_shared_experts:
        targets += SHARED_EXPERT_TARGETS
    if cfg.first_k_dense_replace:
        targets += DENSE_LAYER_TARGETS
    return targets


def has_expert_targets(cfg: GLMConfig, targets) -> bool:
    return cfg.is_moe and any(t in EXPERT_TARGETS for t in targets)


@dataclass(frozen=True)
class LoraSettings:
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj")
    rslora: bool = False
    # HF modules trained fully beside the adapters (peft's modules_to_save; lora_saved_modules.py).
    modules_to_save: tuple[str, ...] = ()
    # The routed experts' fused gate_up_proj adapter: None = 2r / 2·alpha, as peft converts
    # gate_proj + up_proj (an adapter file's rank_pattern / alpha_pattern may say otherwise).
    expert_gate_up_r: int | None = None
    expert_gate_up_alpha: float | None = None

    @property
    def scale(self) -> float:
        return self.alpha / (math.sqrt(self.r) if self.rslora else self.r)

    def expert_gate_up(self) -> LoraSettings:
        """The settings of the routed experts' fused gate_up_proj adapters."""
        return replace(self, r=self.expert_gate_up_r or 2 * self.r,
                       alpha=self.expert_gate_up_alpha or 2 * self.alpha)


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
            f"{key}: {', '.join(map(str, unknown)) or 'nothing'} is not a linear module of a "
            f"{cfg.model_type} model; valid: {', '.join(valid)} or all-linear"
        )
    if cfg.is_moe and ("gate_proj" in names) != ("up_proj" in names):
        raise ConfigError(
            f"{key}: the routed experts' gate_proj and up_proj are one fused parameter "
            "(mlp.experts.gate_up_proj) in transformers 5, and peft adapts them only together: "
            "list both (shared_experts.gate_proj / mlp.gate_proj may stand alone)")
    return tuple(n for n in valid if n in names)


_PEFT_ADAPTER = re.compile(r"^base_model\.model\.model\.layers\.\d+\."
                           r"(self_attn|mlp|mlp\.shared_experts|mlp\.experts\.\d+)\.(\w+)\.lora_[AB]\.weight$")


def adapter_targets(cfg: GLMConfig, tensor_names) -> tuple[str, ...]:
    """The target names a set of per-module PEFT tensors (:func:`peft_tensors`) stands for."""
    found = set()
    for name in tensor_names:
        match = _PEFT_ADAPTER.match(name)
        if match is None:
            continue  # not an adapter tensor: the loader's unused-tensor check names it
        owner, leaf = match.groups()
        if owner.startswith("mlp.experts."):
            found.update(("gate_proj", "up_proj") if leaf == "gate_up_proj" else (leaf,))
        elif owner == "mlp.shared_experts":
            found.add("shared_experts." + leaf)
        elif owner == "mlp" and cfg.is_moe:
            found.add("mlp." + leaf)
        else:
            found.add(leaf)
    valid = valid_targets(cfg)
    return tuple([t for t in valid if t in found] + sorted(found - set(valid)))


def check_expert_layout(cfg: GLMConfig, targets, etp: int, tp: int, key: str = ETP_KEY) -> None:
    """Expert adapters are exact at expert TP 1 or expert TP = TP (see module doc)."""
    if has_expert_targets(cfg, targets) and etp not in (1, tp):
        raise ConfigError(
            f"{key}: LoRA on the routed experts needs expert tensor parallelism 1 or equal to "
            f"the tensor parallel size ({tp}), got {etp}")


@dataclass(frozen=True)
class Segment:
    """One HF module's rows inside a column-parallel base's local output, repeated per group."""

    name: str  # HF module whose lora_B these rows are ("q_proj", "gate_up_proj", ...)
    part: str  # the part of that module's rows ("q", "gate", "up", "all", ...)
    width: int  # local rows per group
    target: str = ""  # the lora_target_modules name that adapts it (default: ``name``)

    @property
    def target_name(self) -> str:
        return self.target or self.name


def _init_a(shape: tuple[int, int], seed: int) -> torch.Tensor:
    """PEFT's default: kaiming-uniform(a=√5) over the full A, the same on every rank."""
    a = torch.empty(shape)
    torch.nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=torch.Generator().manual_seed(seed))
    return a


class ColumnLora(torch.nn.Module):
    """Adapters whose B rows sit inside a column-parallel linear's output (see module doc).

    ``expert_group``: a routed expert's ``fc1`` — no activation collective, A's gradient summed
    over that (expert-TP) group instead."""

    def __init__(self, groups: int, segments: list[Segment], targets: tuple[str, ...],
                 in_features: int, settings: LoraSettings, seed: int, dtype, sequence_parallel,
                 expert_group=None):
        super().__init__()
        self.enabled = True
        self.groups, self.segments, self.settings = groups, segments, settings
        self.sequence_parallel = sequence_parallel
        self.expert_group = expert_group
        self.dropout = torch.nn.Dropout(settings.dropout)
        self.adapters = torch.nn.ModuleDict()
        wanted = [s.name for s in segments if s.target_name in targets]
        for k, name in enumerate(dict.fromkeys(wanted)):
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
        hidden = {}  # HF module name -> its A x
        for name, pair in self.adapters.items():
            if self.expert_group is not None:
                a = tensor_parallel.copy_to_tensor_model_parallel_region(pair.lora_A,
                                                                         group=self.expert_group)
                hidden[name] = x @ a.t()
            else:
                hidden[name] = tensor_parallel.copy_to_tensor_model_parallel_region(
                    x @ pair.lora_A.t())
        pieces = []
        for s in self.segments:
            if s.name in hidden:
                delta = hidden[s.name] @ self.adapters[s.name].lora_B[s.part].t()
                pieces.append(delta.view(*lead, self.groups, s.width))
            else:
                pieces.append(x.new_zeros(*lead, self.groups, s.width))
        width = self.groups * sum(s.width for s in self.segments)  # explicit: an expert may get 0 tokens
        return torch.cat(pieces, dim=-1).view(*lead, width) * self.settings.scale


class RowLora(torch.nn.Module):
    """One adapter on a row-parallel linear (``o_proj``, ``down_proj``).

    ``expert_group``: a routed expert's ``fc2`` — A split over that (expert-TP) group, the output
    a partial sum like the base's, B's gradient summed over the group."""

    def __init__(self, name: str, in_features: int, out_features: int, settings: LoraSettings,
                 seed: int, dtype, sequence_parallel: bool, expert_group=None):
        super().__init__()
        self.enabled = True
        self.settings, self.sequence_parallel = settings, sequence_parallel
        self.expert_group = expert_group
        self.dropout = torch.nn.Dropout(settings.dropout)
        if expert_group is None:
            size, rank = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
        else:
            size, rank = expert_group.size(), expert_group.rank()
        full = _init_a((settings.r, in_features), seed)
        pair = torch.nn.Module()
        pair.lora_A = torch.nn.Parameter(full.chunk(size, dim=1)[rank].contiguous().to(dtype))
        set_tensor_model_parallel_attributes(pair.lora_A, True, 1, 1)
        pair.lora_B = torch.nn.ParameterDict(
            {"all": torch.nn.Parameter(torch.zeros(out_features, settings.r, dtype=dtype))})
        self.adapters = torch.nn.ModuleDict({name: pair})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        (pair,) = self.adapters.values()
        if self.settings.dropout and self.training:
            with tensor_parallel.get_cuda_rng_tracker().fork():
                x = self.dropout(x)  # this rank's input columns: a dropout mask of its own
        if self.expert_group is not None:
            b = tensor_parallel.copy_to_tensor_model_parallel_region(pair.lora_B["all"],
                                                                     group=self.expert_group)
            return ((x @ pair.lora_A.t()) @ b.t()) * self.settings.scale
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
        groups = {}
        if self.expert_group is not None:
            # Sharded over expert TP and replicated over expert DP; SequentialMLP adds the expert
            # axis to ``sharded_offsets`` and sets the expert-DP replica id, as for its weights.
            groups = dict(tp_group=self.expert_group,
                          dp_cp_group=ps.get_expert_data_parallel_group())
        return make_sharded_tensors_for_checkpoint(
            self.state_dict(prefix="", keep_vars=True), prefix, axes, sharded_offsets, **groups)


class ColumnParallelAdapter(_ShardedAdapterState, ColumnLora):
    pass


class RowParallelAdapter(_ShardedAdapterState, RowLora):
    pass


def _mark_expert_params(adapter, etp: int) -> None:
    """Like Megatron's expert weights: DDP reduces them over the expert-DP group. With expert
    TP 1 every parameter is this rank's own (counted by the gradient norm on every rank)."""
    for p in adapter.parameters():
        p.allreduce = False
        if etp == 1 and not getattr(p, "tensor_model_parallel", False):
            set_tensor_model_parallel_attributes(p, True, 0, 1)


def adapter_input(base, x: torch.Tensor) -> torch.Tensor:
    """What the base linear multiplies ``x`` by its weight as: ``x`` itself, or — for Transformer
    Engine's fused LayerNormLinear (the GPU spec's ``linear_qkv`` / dense ``fc1``, which carry
    ``layer_norm_weight``) — ``x`` after the layer's RMSNorm, which the adapter must see too."""
    weight = getattr(base, "layer_norm_weight", None)
    if weight is None:
        return x
    if getattr(base, "normalization", "RMSNorm") != "RMSNorm":
        raise ConfigError(f"LoRA on a fused {base.normalization} + linear is not supported "
                          "(GLM models use RMSNorm)")
    xf = x.float()
    normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + base.eps)
    gamma = weight.float() + 1.0 if getattr(base, "zero_centered_gamma", False) else weight.float()
    return (normed * gamma).to(x.dtype)


def _add_adapter_output(adapter):
    def hook(module, args, kwargs, output):
        if not adapter.enabled:
            return output
        out, bias = output
        x = args[0] if args else kwargs["input_"]
        return out + adapter(adapter_input(module, x)).to(out.dtype), bias

    return hook


def adapter_modules(chunks):
    return [m for c in chunks for m in c.modules() if isinstance(m, (ColumnLora, RowLora))]


class AdaptersOff:
    """``with AdaptersOff(chunks):`` the chunks compute the base model (every adapter skipped):
    a LoRA policy is its own PPO reference, with one copy of the base weights in memory.

    Refused when modules train fully beside the adapters (``lora_modules_to_save``): switching
    the adapters off would not give the base model back."""

    def __init__(self, chunks):
        from .lora_saved_modules import SAVED_MODULE_ATTR

        saved = [n for c in chunks for n, p in c.named_parameters()
                 if getattr(p, SAVED_MODULE_ATTR, False) and p.requires_grad]
        if saved:
            raise ConfigError(
                f"lora_modules_to_save: {saved[0]} (and {len(saved) - 1} more) train fully, so "
                "the model with its adapters off (the reference of a LoRA PPO / DPO run) is not "
                "the base model; leave lora_modules_to_save empty for this trainer")
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
    """Where one adapter module sits: its owner, the base linear's attribute, its HF prefix and
    the HF modules inside the base's (local) output rows."""

    owner: torch.nn.Module
    base: str  # "linear_qkv", "linear_proj", "linear_fc1", "linear_fc2"
    kind: str  # "column" | "row"
    hf_prefix: str  # "model.layers.3.self_attn." / "model.layers.3.mlp.experts.17."
    segments: tuple[Segment, ...] = field(default=())  # column: rows per group; row: one
    groups: int = 1
    expert: bool = False  # a routed expert's linear (no TP communication of its own)


def _mlp_sites(mlp, prefix: str, fused: bool, target_prefix: str):
    width = mlp.linear_fc1.weight.shape[0] // 2  # this rank's gate rows, then as many up rows
    if fused:
        segments = (Segment("gate_up_proj", "gate", width), Segment("gate_up_proj", "up", width))
    else:
        segments = (Segment("gate_proj", "gate", width, target_prefix + "gate_proj"),
                    Segment("up_proj", "up", width, target_prefix + "up_proj"))
    yield AdaptedLinear(mlp, "linear_fc1", "column", prefix, segments)
    yield AdaptedLinear(mlp, "linear_fc2", "row", prefix,
                        (Segment("down_proj", "all", 0, target_prefix + "down_proj"),))


def _expert_sites(experts, prefix: str):
    locals_ = getattr(experts, "local_experts", None)
    if locals_ is None:
        return  # grouped experts (TE): attach_lora refuses expert targets on them
    offset = ps.get_expert_model_parallel_rank() * len(locals_)
    for i, expert in enumerate(locals_):
        p = f"{prefix}{offset + i}."
        width = expert.linear_fc1.weight.shape[0] // 2
        # One adapter on the fused gate_up_proj (its B: this rank's gate rows, then up rows).
        yield AdaptedLinear(expert, "linear_fc1", "column", p,
                            (Segment("gate_up_proj", "gate", width, "gate_proj"),
                             Segment("gate_up_proj", "up", width, "gate_proj")), expert=True)
        yield AdaptedLinear(expert, "linear_fc2", "row", p,
                            (Segment("down_proj", "all", 0, "down_proj"),), expert=True)


def adaptable_linears(chunk, cfg: GLMConfig):
    """Every linear of this chunk's decoder layers that LoRA can adapt (see valid_targets)."""
    tp = ps.get_tensor_model_parallel_world_size()
    groups, hd = cfg.num_key_value_heads // tp, cfg.head_dim
    per_group = cfg.num_attention_heads // cfg.num_key_value_heads
    qkv = (Segment("q_proj", "q", per_group * hd), Segment("k_proj", "k", hd),
           Segment("v_proj", "v", hd))
    for layer in getattr(getattr(chunk, "decoder", None), "layers", []):
        p = f"model.layers.{layer.layer_number - 1}."
        attn, mlp = layer.self_attention, layer.mlp
        yield AdaptedLinear(attn, "linear_qkv", "column", p + "self_attn.", qkv, groups)
        yield AdaptedLinear(attn, "linear_proj", "row", p + "self_attn.",
                            (Segment("o_proj", "all", 0),))
        if not cfg.is_moe:
            yield from _mlp_sites(mlp, p + "mlp.", True, "")
        elif not hasattr(mlp, "router"):  # one of the first_k_dense_replace dense layers
            yield from _mlp_sites(mlp, p + "mlp.", False, "mlp.")
        else:
            if getattr(mlp, "shared_experts", None) is not None:
                yield from _mlp_sites(mlp.shared_experts, p + "mlp.shared_experts.", False,
                                      "shared_experts.")
            yield from _expert_sites(mlp.experts, p + "mlp.experts.")


def _check_sequential_experts(chunk, cfg: GLMConfig) -> None:
    for layer in getattr(getattr(chunk, "decoder", None), "layers", []):
        experts = getattr(getattr(layer, "mlp", None), "experts", None)
        if experts is not None and not hasattr(experts, "local_experts"):
            raise ConfigError(
                "LoRA on the routed experts (targets gate_proj, up_proj, down_proj) needs "
                "Megatron's SequentialMLP experts (moe_grouped_gemm off); this model has "
                f"{type(experts).__name__}")


def _site_seed(seed: int, site: AdaptedLinear) -> int:
    # From the HF module path, not the rank's enumeration: the same start at every layout.
    return seed * 1_000_003 + zlib.crc32(f"{site.hf_prefix}{site.base}".encode()) % 1_000_003


def attach_lora(chunks, cfg: GLMConfig, settings: LoraSettings, *, seed: int = 0) -> int:
    """Add adapters for ``settings.targets`` to this rank's chunks; freeze everything else but
    ``settings.modules_to_save``.

    Returns the number of adapter parameters on this rank. A and B start as PEFT starts them
    (A kaiming-uniform from a seed of the HF module, B zero), identically on every rank.
    """
    tp, etp = ps.get_tensor_model_parallel_world_size(), ps.get_expert_tensor_parallel_world_size()
    experts = has_expert_targets(cfg, settings.targets)
    if experts:
        check_expert_layout(cfg, settings.targets, etp, tp)
    expert_group = ps.get_expert_tensor_parallel_group() if experts else None
    count = 0
    from .lora_saved_modules import SAVED_MODULE_ATTR

    for chunk in chunks:
        for p in chunk.parameters():
            p.requires_grad_(False)
            if hasattr(p, SAVED_MODULE_ATTR):  # left by adapters folded in before (lora_fold.py)
                delattr(p, SAVED_MODULE_ATTR)
        if settings.modules_to_save:
            from .lora_saved_modules import unfreeze_modules_to_save

            unfreeze_modules_to_save(chunk, cfg, settings.modules_to_save)
        if experts:
            _check_sequential_experts(chunk, cfg)
        for site in adaptable_linears(chunk, cfg):
            if not any(s.target_name in settings.targets for s in site.segments):
                continue
            base = getattr(site.owner, site.base)
            weight = base.weight
            # Expert linears see the dispatched tokens, never a sequence-parallel shard.
            sp = bool(base.config.sequence_parallel) and not site.expert
            group = expert_group if site.expert else None
            if site.kind == "column":
                own = settings.expert_gate_up() if site.expert else settings
                adapter = ColumnParallelAdapter(site.groups, list(site.segments), settings.targets,
                                                weight.shape[1], own, _site_seed(seed, site),
                                                weight.dtype, sp, expert_group=group)
            else:
                (segment,) = site.segments
                size = etp if site.expert else tp
                adapter = RowParallelAdapter(segment.name, weight.shape[1] * size,
                                             weight.shape[0], settings, _site_seed(seed, site),
                                             weight.dtype, sp, expert_group=group)
            if site.expert:
                _mark_expert_params(adapter, etp)
            adapter.to(weight.device)
            site.owner.add_module(site.base + ADAPTER_SUFFIX, adapter)
            base.register_forward_hook(_add_adapter_output(adapter), with_kwargs=True)
            count += sum(p.numel() for p in adapter.parameters())
    return count


def peft_tensors(site: AdaptedLinear, adapter) -> dict[str, list[tuple[str, torch.nn.Parameter]]]:
    """PEFT tensor name -> this rank's parameters that hold it (several B parts are concatenated
    along rows, e.g. gate then up of ``gate_up_proj``). Routed experts are named one module per
    expert (``…mlp.experts.17.gate_up_proj``), models/lora_experts.py turns that into peft's
    fused layout."""
    out = {}
    for name, pair in adapter.adapters.items():
        hf = f"base_model.model.{site.hf_prefix}{name}."
        out[hf + "lora_A.weight"] = [("A", pair.lora_A)]
        out[hf + "lora_B.weight"] = [(part, b) for part, b in pair.lora_B.items()]
    return out


def local_piece(full: torch.Tensor, param, site: AdaptedLinear) -> torch.Tensor:
    """This rank's piece of a full (HF) tensor for ``param`` of the adapter at ``site``."""
    if not getattr(param, "tensor_model_parallel", False):
        return full
    if site.expert:
        size, rank = ps.get_expert_tensor_parallel_world_size(), ps.get_expert_tensor_parallel_rank()
    else:
        size, rank = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
    return full.chunk(size, dim=param.partition_dim)[rank]


def load_peft_adapter(chunks, cfg: GLMConfig, tensors: dict[str, torch.Tensor],
                      source: str) -> set[str]:
    """Copy a PEFT adapter's (full, unsharded, per-module: see :func:`peft_tensors`) tensors into
    this rank's adapters, and the fully trained modules' into their parameters; returns the names
    used. A missing tensor or a shape that does not fit is refused naming it."""
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
                    piece = local_piece(piece, param, site)
                    if tuple(piece.shape) != tuple(param.shape):
                        raise ConfigError(f"{source}: {hf_name}: shape {tuple(full.shape)} does "
                                          f"not fit this model (this rank expects "
                                          f"{tuple(param.shape)} per part)")
                    with torch.no_grad():
                        param.copy_(piece)
                used.add(hf_name)
    from .lora_saved_modules import load_saved_modules

    return used | load_saved_modules(chunks, cfg, tensors, source)
