"""``python -m glm_megatron <command>`` and the ``glm-megatron`` console script.

    torchrun [torchrun args] -m glm_megatron sft --config CFG.yaml [dotted.key=value ...] [--resume auto]
    torchrun [torchrun args] -m glm_megatron evaluate-sft --load CKPT --test-data F --output-file OUT.json
    torchrun [torchrun args] -m glm_megatron rm --config CFG.yaml [dotted.key=value ...] [--resume auto]
    torchrun [torchrun args] -m glm_megatron evaluate-rm --load CKPT --test-data F --output-file OUT.json
        [--plot-calibration OUT.png]
    torchrun [torchrun args] -m glm_megatron ppo --config CFG.yaml [dotted.key=value ...] [--resume auto]

Bad input (config keys, paths, layouts, data) ends in one ``error: ...`` line and exit status 2,
before any work. An error on one rank of a running job ends the whole job within seconds, that
rank's message printed once (``[rank N] error: ...``, or its traceback), never a hang in a
collective (:func:`_fail`). Everything runs under ``if __name__ == "__main__"`` because Megatron's
checkpoint writers start ``multiprocessing`` workers.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import re
import sys
import traceback
import warnings
from dataclasses import dataclass

EXIT_BAD_INPUT = 2
EXIT_FAILURE = 1
_LOCK = None  # the output directory's lock while a training command runs (engine.run_dir)


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
    "dpo": TrainingCommand("Direct preference optimisation (DPO, IPO, conservative DPO).",
                           "YAML config (the SFT keys + training.loss_type/beta/... + parallel:)",
                           "glm_megatron.algorithms.dpo.config:DPOConfig",
                           "glm_megatron.algorithms.dpo.train:run_dpo"),
}


def _resolve(ref: str):
    module, name = ref.split(":")
    return getattr(importlib.import_module(module), name)


def run_training(name: str, command: TrainingCommand, argv) -> int:
    """The one builder of every training command: --config, --resume, --overwrite, dotted
    overrides; the output directory is claimed (lock, no silent restart over checkpoints) and
    the config checked against the checkpoint it loads before any work."""
    p = argparse.ArgumentParser(prog=f"glm_megatron {name}", description=command.description)
    p.add_argument("--config", required=True, help=command.config_help)
    p.add_argument("--resume", default=None,
                   help="'auto' (latest complete checkpoint in checkpoint.output_dir) or a path")
    p.add_argument("--overwrite", action="store_true",
                   help="start a new run in a checkpoint.output_dir that holds checkpoints, "
                        "deleting them (checkpoint.overwrite=true)")
    p.add_argument("overrides", nargs="*", help="dotted.key=value")
    args = p.parse_args(argv)
    from .engine import run_dir
    from .engine.checkpointing import check_architecture_matches
    from .engine.config import load_config

    overrides = list(args.overrides) + ([f"checkpoint.resume={args.resume}"] if args.resume else [])
    overrides += ["checkpoint.overwrite=true"] if args.overwrite else []
    cfg = load_config(args.config, overrides, schema=_resolve(command.schema))
    if getattr(cfg, "model", None) is not None:
        check_architecture_matches(cfg.model)
    global _LOCK
    if getattr(cfg, "checkpoint", None) is not None:
        _LOCK = run_dir.claim(cfg.checkpoint, cfg.checkpoint.overwrite, _global_rank() == 0)
    try:
        _resolve(command.run)(cfg)
    finally:
        if _LOCK is not None:
            _LOCK.release()
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
            code = run_training(name, command, rest)
        else:
            code = run_evaluation(command, rest)
    except _user_errors() as err:
        return _fail(f"error: {err}", EXIT_BAD_INPUT, err)
    except Exception as err:
        if not _in_process_group():
            _shutdown()
            raise
        return _fail(traceback.format_exc().rstrip(), EXIT_FAILURE, err)
    _shutdown()
    return code


def _global_rank() -> int:
    return int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")) or 0)


def _in_process_group() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _fail(message: str, code: int, err: BaseException) -> int:
    """Report this rank's error once and end it.

    Inside a multi-rank process group the process ends at once with ``os._exit``: tearing the
    group down cleanly would wait for peers that are themselves blocked in a collective with
    this rank (the job would hang until the collective timeout, the error never printed).
    The peers' next collective then fails at once ("Connection closed by peer"), they exit too,
    and torchrun's agent stops what is left. A rank that fails only because a peer died says so
    in one line: the error that matters is the peer's, printed above."""
    from .parallel.launch_env import is_peer_failure

    if not _in_process_group():
        print(message, file=sys.stderr)
        _shutdown()
        return code
    rank = _global_rank()
    if is_peer_failure(err):
        # gloo prefixes its source location: "[.../pair.cc:553] Connection closed by peer ...".
        first = re.sub(r"^\[[^\]]*\]\s*", "", (str(err).strip().splitlines() or [""])[0])
        first = first.split(". ")[0][:160] or type(err).__name__
        message = f"rank {rank} stopped: another rank of the job failed first ({first})"
    else:
        message = f"[rank {rank}] {message}"
    print(message, file=sys.stderr, flush=True)
    sys.stdout.flush()
    if _LOCK is not None:
        _LOCK.release()
    os._exit(code)


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
