"""Run real Megatron-Core 0.16 code on CPU with gloo (tests, CI, laptops, the demo).

Megatron-Core assumes CUDA in a number of small places. :func:`install_cpu_support` makes those
work on the CPU. It is installed explicitly, once, by each entry point (the CLI's ``main()``, each
tool that builds Megatron models or process groups, each test worker), never as a side effect of a
library call: :func:`~glm_megatron.parallel.initialize_parallel` on a machine without CUDA refuses
to run without it (:class:`CpuSupportError`). With CUDA available it installs nothing.

What it patches, each for an upstream Megatron-Core behaviour:

* ``torch.cuda.current_device()`` returns ``torch.device("cpu")``. Megatron passes it as the
  device of its buffers and of many tensors (``device=torch.cuda.current_device()``: the global
  memory buffer of the tensor-parallel linear layers, pipeline p2p buffers, the distributed
  optimizer, checkpoint loading), so those land on the CPU with no further change.
* The factory functions ``torch.tensor/as_tensor/asarray/empty/zeros/ones/full/arange/linspace/
  eye/rand/randn/randint/randperm/empty_strided`` and ``torch.*_like``, the ``Tensor.new_*``
  factories and ``Tensor.to`` are wrapped by a thin function that rewrites a CUDA device
  argument (``device="cuda"``, ``"cuda:0"``, ``torch.device("cuda")``; for ``.to`` also
  positional) to the CPU and otherwise calls the original unchanged. Megatron writes
  ``device="cuda"`` literally in ~50 places on our paths: the causal masks of
  ``transformer/utils.py``, the token counters of the pipeline schedules, the optimizer's
  ``found_inf``/scale tensors and grad clipping, the checkpoint exchange utils, ``rerun_state_machine``
  and ``tensor_parallel/data.py``.
* ``Tensor.cuda()`` is the identity (optimizer state loading, ``language_module`` weight tying,
  ``rope_utils``, the checkpoint exchange utils call it).
* ``Tensor.type()`` without arguments (the type *name*), when called from a ``megatron.*`` module,
  reports a CPU float/half/bf16 tensor under its CUDA name (``torch.FloatTensor`` ->
  ``torch.cuda.FloatTensor``). Megatron's optimizer, distributed optimizer and grad clipping
  dispatch on ``param.type() == 'torch.cuda.FloatTensor'`` and refuse anything else. Every other
  caller (HF transformers, our own code) gets the true name; ``isinstance`` checks, dtypes and
  ``.type(dtype)`` conversions are not affected.
* The CUDA RNG used by Megatron's RNG tracker (``torch.cuda.manual_seed``/``manual_seed_all``/
  ``get_rng_state``/``set_rng_state`` and ``tensor_parallel.random``'s private
  ``_get_cuda_rng_state``/``_set_cuda_rng_state``) maps to the CPU generator, so the tensor- and
  expert-parallel RNG forks still give each rank the stream Megatron intends.
* ``torch.cuda.Stream``, ``Event``, ``current_stream``, ``default_stream``, ``stream``,
  ``set_stream``, ``synchronize``, ``empty_cache`` and the NVTX ranges become no-op stand-ins
  (Megatron creates streams and events in its schedules, DDP and timers).

Earlier versions used one process-wide :class:`torch.overrides.TorchFunctionMode` for the device
rewrite and the type names. A mode runs Python code on *every* torch call of the process (HF
models too): it cost ~40 % of a CPU decode step. The wrappers above run only on the few functions
that take a device, and there is no torch function mode left.

Independently of CUDA, :func:`patch_megatron_without_transformer_engine` fixes a Megatron-Core
0.16 bug (``moe_utils.te_general_gemm`` is referenced even when Transformer Engine is absent);
:func:`require_runtime_support` applies it for ``initialize_parallel`` and the model summary.
"""

from __future__ import annotations

import contextlib
import functools
import sys

import torch

_INSTALLED = False
_CPU = torch.device("cpu")
# Megatron's optimizer code accepts only these names (see the module docstring).
_CUDA_TYPE_NAMES = {
    "torch.FloatTensor": "torch.cuda.FloatTensor",
    "torch.HalfTensor": "torch.cuda.HalfTensor",
    "torch.BFloat16Tensor": "torch.cuda.BFloat16Tensor",
}
# torch.* functions that take a ``device=`` keyword and create a tensor.
_TORCH_FACTORIES = (
    "tensor", "as_tensor", "asarray", "scalar_tensor", "empty", "empty_strided", "zeros", "ones",
    "full", "arange", "linspace", "logspace", "eye", "rand", "randn", "randint", "randperm",
    "empty_like", "zeros_like", "ones_like", "full_like", "rand_like", "randn_like",
    "randint_like",
)
_TENSOR_FACTORIES = ("new_tensor", "new_empty", "new_zeros", "new_ones", "new_full")
_ORIGINALS: dict[str, object] = {}  # "zeros" / "Tensor.to" -> the unwrapped function


class CpuSupportError(RuntimeError):
    """Megatron code was started without CUDA and without :func:`install_cpu_support`."""


def _is_cuda_device(device) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    return False


def _cpu_factory(fn):
    """``fn`` with a CUDA ``device=`` keyword rewritten to the CPU."""

    @functools.wraps(fn)
    def factory(*args, **kwargs):
        device = kwargs.get("device")
        if device is not None and _is_cuda_device(device):
            kwargs["device"] = _CPU
        return fn(*args, **kwargs)

    return factory


def _cpu_to(orig):
    @functools.wraps(orig)
    def to(self, *args, **kwargs):
        if args and _is_cuda_device(args[0]):
            args = (_CPU, *args[1:])
        device = kwargs.get("device")
        if device is not None and _is_cuda_device(device):
            kwargs["device"] = _CPU
        return orig(self, *args, **kwargs)

    return to


def _cuda_identity(self, *args, **kwargs):
    return self


def _megatron_type(orig):
    @functools.wraps(orig)
    def type_(self, *args, **kwargs):
        if args or kwargs:
            return orig(self, *args, **kwargs)
        name = orig(self)
        if name in _CUDA_TYPE_NAMES:
            caller = sys._getframe(1).f_globals.get("__name__") or ""
            if caller.startswith("megatron."):
                return _CUDA_TYPE_NAMES[name]
        return name

    return type_


def _replace(owner, name: str, wrapper) -> None:
    # Named as where it now lives (``torch.zeros``, ``torch.Tensor.to``), so it pickles by
    # reference like the original did.
    wrapper.__module__ = "torch"
    wrapper.__qualname__ = name if owner is torch else f"Tensor.{name}"
    _ORIGINALS[wrapper.__qualname__] = getattr(owner, name)
    setattr(owner, name, wrapper)


def _patch_devices() -> None:
    # torch's device context (``with torch.device("meta")``) recognises factories by identity in
    # a cached set: build it from the originals before they are wrapped.
    from torch.utils._device import _device_constructors

    _device_constructors()
    for name in _TORCH_FACTORIES:
        if hasattr(torch, name):
            _replace(torch, name, _cpu_factory(getattr(torch, name)))
    for name in _TENSOR_FACTORIES:
        _replace(torch.Tensor, name, _cpu_factory(getattr(torch.Tensor, name)))
    _replace(torch.Tensor, "to", _cpu_to(torch.Tensor.to))
    _replace(torch.Tensor, "type", _megatron_type(torch.Tensor.type))
    _replace(torch.Tensor, "cuda", _cuda_identity)


class _NoOpStream:
    """Stands in for torch.cuda.Stream / Event: every method is a no-op."""

    def __init__(self, *args, **kwargs):
        pass

    def __getattr__(self, name):
        return lambda *args, **kwargs: None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _noop(*args, **kwargs):
    return None


def _noop_context(*args, **kwargs):
    return contextlib.nullcontext()


def _seed_cpu_generator(seed) -> None:
    torch.default_generator.manual_seed(int(seed))


def _patch_torch_cuda() -> None:
    cuda = torch.cuda
    cuda.current_device = lambda: _CPU
    cuda.Stream = _NoOpStream
    cuda.Event = _NoOpStream
    cuda.current_stream = lambda *a, **k: _NoOpStream()
    cuda.default_stream = lambda *a, **k: _NoOpStream()
    cuda.stream = _noop_context
    cuda.set_stream = _noop
    cuda.synchronize = _noop
    cuda.empty_cache = _noop
    # Not torch.manual_seed: it calls torch.cuda.manual_seed_all itself (recursion).
    cuda.manual_seed = _seed_cpu_generator
    cuda.manual_seed_all = _seed_cpu_generator
    cuda.get_rng_state = lambda *a, **k: torch.get_rng_state()
    cuda.set_rng_state = lambda state, *a, **k: torch.set_rng_state(state)
    cuda.nvtx.range_push = _noop
    cuda.nvtx.range_pop = _noop
    cuda.nvtx.range = _noop_context


def _patch_megatron_rng() -> None:
    from megatron.core.tensor_parallel import random as mrandom

    mrandom._get_cuda_rng_state = lambda *a, **k: torch.get_rng_state()
    mrandom._set_cuda_rng_state = lambda state, *a, **k: torch.set_rng_state(state)


def patch_megatron_without_transformer_engine() -> None:
    """Megatron-Core 0.16 references ``moe_utils.te_general_gemm`` even without TE installed."""
    from megatron.core.transformer.moe import moe_utils

    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None


def install_cpu_support() -> bool:
    """Let Megatron-Core run on the CPU when CUDA is absent (see the module docstring).

    Call it once at the entry point of a program (the CLI's ``main()``, a tool's ``main()``, a
    test worker) before building models or process groups. Idempotent; a no-op when CUDA is
    available. Returns True when the CPU support is active.
    """
    global _INSTALLED
    patch_megatron_without_transformer_engine()
    if torch.cuda.is_available():
        return False
    if not _INSTALLED:
        _patch_torch_cuda()
        _patch_megatron_rng()
        _patch_devices()
        _INSTALLED = True
    return True


def cpu_support_installed() -> bool:
    return _INSTALLED


def require_runtime_support(caller: str) -> None:
    """What Megatron code needs before it runs: raise :class:`CpuSupportError` without CUDA and
    without :func:`install_cpu_support`; apply the Transformer-Engine-less fix on any machine."""
    if not torch.cuda.is_available() and not _INSTALLED:
        raise CpuSupportError(
            f"{caller}: no CUDA device, and the CPU support for Megatron-Core is not installed. "
            "Call glm_megatron.parallel.install_cpu_support() once at the program's entry point "
            "(its main(), a test worker's start), before building models or process groups."
        )
    patch_megatron_without_transformer_engine()
