"""``python -m glm_megatron <command>`` and the ``glm-megatron`` console script.

    torchrun [torchrun args] -m glm_megatron sft --config CFG.yaml [dotted.key=value ...] [--resume auto]
    torchrun [torchrun args] -m glm_megatron evaluate-sft --load CKPT --test-data F --output-file OUT.json
    torchrun [torchrun args] -m glm_megatron rm --config CFG.yaml [dotted.key=value ...] [--resume auto]
    torchrun [torchrun args] -m glm_megatron evaluate-rm --load CKPT --test-data F --output-file OUT.json
        [--plot-calibration OUT.png]
    torchrun [torchrun args] -m glm_megatron ppo --config CFG.yaml [dotted.key=value ...] [--resume auto]

Bad input (config keys, paths, layouts, data) ends in one ``error: ...`` line and exit status 2,
before any work. Everything runs under ``if __name__ == "__main__"`` because Megatron's
checkpoint writers start ``multiprocessing`` workers.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
import warnings
from dataclasses import dataclass

EXIT_BAD_INPUT = 2


@dataclass(frozen=True)
class TrainingCommand:
    """A trainer: its config schema and its run function, as ``module:name`` (imported lazily so
    ``--help`` and config errors cost no Megatron import)."""

    description: str
    config_help: str
    schema: str
    run: str


@dataclass(frozen=True)
class EvaluationCommand:
    """An evaluator with its own argument parser: ``module`` has ``parse_args`` and ``run``."""

    module: str


COMMANDS = {
    "sft": TrainingCommand("Supervised fine-tuning.", "YAML config (the seed's keys + parallel:)",
                           "glm_megatron.algorithms.sft.config:SFTConfig",
                           "glm_megatron.algorithms.sft.train:run_sft"),
    "evaluate-sft": EvaluationCommand("glm_megatron.algorithms.sft.evaluate"),
    "rm": TrainingCommand("Reward-model training.", "YAML config (the seed's keys + parallel:)",
                          "glm_megatron.algorithms.rm.config:RMConfig",
                          "glm_megatron.algorithms.rm.train:run_rm"),
    "evaluate-rm": EvaluationCommand("glm_megatron.algorithms.rm.evaluate"),
    "ppo": TrainingCommand("PPO RLHF.",
                           "YAML config (the seed's training_rlhf_ppo.yaml keys + parallel:)",
                           "glm_megatron.algorithms.ppo.config:PPOConfig",
                           "glm_megatron.algorithms.ppo.train:run_ppo"),
}


def _resolve(ref: str):
    module, name = ref.split(":")
    return getattr(importlib.import_module(module), name)


def run_training(name: str, command: TrainingCommand, argv) -> int:
    """The one builder of every training command: --config, --resume, dotted overrides."""
    p = argparse.ArgumentParser(prog=f"glm_megatron {name}", description=command.description)
    p.add_argument("--config", required=True, help=command.config_help)
    p.add_argument("--resume", default=None,
                   help="'auto' (latest complete checkpoint in checkpoint.output_dir) or a path")
    p.add_argument("overrides", nargs="*", help="dotted.key=value")
    args = p.parse_args(argv)
    from .engine.config import load_config

    overrides = list(args.overrides) + ([f"checkpoint.resume={args.resume}"] if args.resume else [])
    cfg = load_config(args.config, overrides, schema=_resolve(command.schema))
    _resolve(command.run)(cfg)
    return 0


def run_evaluation(command: EvaluationCommand, argv) -> int:
    module = importlib.import_module(command.module)
    module.run(module.parse_args(argv))
    return 0


def _setup_logging() -> None:
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # Megatron logs its whole config at INFO on every build, and warns at import about optional
    # CUDA extensions (Apex, Transformer Engine) that a CPU run does not have.
    logging.getLogger("megatron").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", category=UserWarning, module=r"megatron\..*")
    warnings.filterwarnings("ignore", category=FutureWarning)


def _user_errors() -> tuple:
    from .data.errors import DataValidationError
    from .engine.config import TrainConfigError
    from .models.config import ConfigError
    from .parallel import LaunchEnvError, LayoutError

    return (TrainConfigError, ConfigError, LayoutError, LaunchEnvError, DataValidationError)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in COMMANDS:
        print(f"usage: python -m glm_megatron {{{','.join(COMMANDS)}}} ...", file=sys.stderr)
        return EXIT_BAD_INPUT
    _setup_logging()
    from .parallel import install_cpu_support

    install_cpu_support()  # no-op with CUDA; Megatron-Core on gloo ranks otherwise
    name, rest = argv[0], argv[1:]
    command = COMMANDS[name]
    try:
        if isinstance(command, TrainingCommand):
            return run_training(name, command, rest)
        return run_evaluation(command, rest)
    except _user_errors() as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    finally:
        _shutdown()


def _shutdown() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        from .parallel import destroy_parallel

        try:
            destroy_parallel()
        except Exception:  # a peer already gone: nothing left to tear down cleanly
            pass


if __name__ == "__main__":
    sys.exit(main())
