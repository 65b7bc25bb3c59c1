"""Workarounds for Megatron-Core 0.16.1's distributed-optimizer checkpointing.

Everything here is about saving and restoring ``megatron.core.optimizer.DistributedOptimizer``
state with ``megatron.core.dist_checkpointing`` when neither Apex nor Transformer Engine is
installed (``HAVE_APEX_OR_TE = False`` in ``megatron/core/optimizer/distrib_optimizer.py``: the
inner optimizer is then plain ``torch.optim.Adam``, whose per-parameter state has a ``step``
tensor that TE / Apex FusedAdam keep in the param groups instead). Each function names the
upstream code it works around; when Megatron-Core is upgraded, re-check each one and delete what
upstream fixed. ``engine.checkpointing`` is the only user.
"""

from __future__ import annotations

import torch

from ..models.checkpoint import model_sharded_state_dict

# The distributed optimizer's layout-independent checkpoint format (see optimizer_sharded_state_dict).
SHARDING_TYPE = "fully_reshardable"


def _optimizers(optimizer) -> list:
    """The optimizers behind ``optimizer``: a ``ChainedOptimizer`` (dense + expert parameters)
    holds several in ``chained_optimizers``."""
    return getattr(optimizer, "chained_optimizers", [optimizer])


def optimizer_sharded_state_dict(optimizer, chunks: list[torch.nn.Module], is_loading: bool) -> dict:
    """The optimizer's sharded state dict for ``dist_checkpointing.save`` / ``load``, in the
    ``fully_reshardable`` format (loads at another TP/PP/EP/DP layout).

    Works around ``DistributedOptimizer.sharded_state_dict``
    (``megatron/core/optimizer/distrib_optimizer.py``), whose default
    ``metadata["distrib_optim_sharding_type"]`` is ``fully_sharded_model_space``: that format
    (``sharded_param_state_fs_model_space``) builds ShardedTensors with ``flattened_range`` set,
    which Megatron-Core's own ``ShardedTensor.validate_metadata_integrity``
    (``megatron/core/dist_checkpointing/mapping.py``) rejects ("ShardedTensor.flattened_range is
    not supported"). ``fully_reshardable`` (``sharded_param_state_fully_reshardable``) saves
    model-shaped, unflattened tensors instead.
    """
    return optimizer.sharded_state_dict(
        model_sharded_state_dict(chunks), is_loading=is_loading,
        metadata={"distrib_optim_sharding_type": SHARDING_TYPE})


def materialize_optimizer_state(optimizer) -> None:
    """Give a fresh torch Adam its state tensors (``step``, ``exp_avg``, ``exp_avg_sq``) before a
    load. Zeros are placeholders: the load overwrites all of them.

    Works around ``DistributedOptimizer.state_dict`` (``megatron/core/optimizer/
    distrib_optimizer.py``), which ``sharded_state_dict(is_loading=True)`` calls first: without
    Apex/TE it reads ``state["step"]`` of every parameter and asserts that there is exactly one
    distinct value, which fails on an optimizer that has not stepped yet (no state at all).
    """
    for opt in _optimizers(optimizer):
        inner = opt.optimizer
        for group in inner.param_groups:
            for p in group["params"]:
                state = inner.state[p]
                if not state:
                    state["step"] = torch.zeros((), dtype=torch.float32)
                    state["exp_avg"] = torch.zeros_like(p.data)
                    state["exp_avg_sq"] = torch.zeros_like(p.data)


def load_optimizer_state(optimizer, state: dict) -> None:
    """``optimizer.load_state_dict(state)`` for a state loaded by ``dist_checkpointing.load``
    from :func:`optimizer_sharded_state_dict`, then :func:`_unshare_adam_steps`.

    Works around ``DistributedOptimizer._set_main_param_and_optimizer_states``
    (``megatron/core/optimizer/distrib_optimizer.py``): called by
    ``load_parameter_state_from_fully_reshardable`` with the loaded tensors, which leave out
    ``step`` on purpose, it copies into *every* entry of the parameter's torch-Adam state,
    ``step`` included (``dst_tensors[key].copy_(tensors[key])`` -> ``KeyError: 'step'``).
    During the load only, each distributed optimizer's method is shadowed by one that hides
    ``step`` from it and puts it back afterwards (the step itself comes from the param groups).
    """
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    patched = []
    for opt in _optimizers(optimizer):
        if not isinstance(opt, DistributedOptimizer):
            continue
        original = opt._set_main_param_and_optimizer_states

        def without_step(model_param, tensors, _opt=opt, _original=original):
            group, order = _opt.model_param_group_index_map[model_param]
            main_param = _opt.optimizer.param_groups[group]["params"][order]
            adam_state = _opt.optimizer.state[main_param]
            step = adam_state.pop("step", None)
            try:
                _original(model_param, tensors)
            finally:
                if step is not None:
                    adam_state["step"] = step

        opt._set_main_param_and_optimizer_states = without_step
        patched.append(opt)
    try:
        optimizer.load_state_dict(state)
    finally:
        for opt in patched:
            del opt._set_main_param_and_optimizer_states  # the class's method again
    _unshare_adam_steps(optimizer)


def _unshare_adam_steps(optimizer) -> None:
    """Give every parameter its own Adam ``step`` tensor after a load.

    Works around ``DistributedOptimizer.load_state_dict`` (``megatron/core/optimizer/
    distrib_optimizer.py``): without Apex/TE it builds one ``step`` tensor from the param groups
    and assigns that same object to every parameter's state (its HybridDeviceOptimizer branch
    clones it, this one does not). torch's Adam increments ``step`` in place once per parameter,
    so after a resume the step count (and Adam's bias correction) ran ahead by the number of
    parameters per step, and the dense and expert optimizers disagreed at the next resume.
    """
    for opt in _optimizers(optimizer):
        for state in opt.optimizer.state.values():
            if isinstance(state.get("step"), torch.Tensor):
                state["step"] = state["step"].clone()
