"""The shared parallel-state layer: every trainer, tool and test goes through it.

Without CUDA, a program's entry point calls :func:`install_cpu_support` once before building
Megatron models or process groups (see :mod:`.cpu_compat` for what it patches and why).
"""

from .cpu_compat import CpuSupportError, cpu_support_installed, install_cpu_support
from .launch_env import LaunchEnv, LaunchEnvError, read_launch_env
from .layout import (
    LayoutError,
    ModelShape,
    ParallelLayout,
    pipeline_stage_layer_counts,
    validate_layout,
)
from .state import ParallelContext, destroy_parallel, initialize_parallel, seed_everything

__all__ = [
    "CpuSupportError", "cpu_support_installed", "install_cpu_support",
    "LaunchEnv", "LaunchEnvError", "read_launch_env", "LayoutError", "ModelShape",
    "ParallelLayout", "pipeline_stage_layer_counts", "validate_layout", "ParallelContext",
    "destroy_parallel", "initialize_parallel", "seed_everything",
]
