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
import logging
import os
import sys
import warnings

EXIT_BAD_INPUT = 2


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


def cmd_sft(argv) -> int:
    p = argparse.ArgumentParser(prog="glm_megatron sft", description="Supervised fine-tuning.")
    p.add_argument("--config", required=True, help="YAML config (the seed's keys + parallel:)")
    p.add_argument("--resume", default=None,
                   help="'auto' (latest complete checkpoint in checkpoint.output_dir) or a path")
    p.add_argument("overrides", nargs="*", help="dotted.key=value")
    args = p.parse_args(argv)
    from .engine.config import load_config

    overrides = list(args.overrides)
    if args.resume:
        overrides.append(f"checkpoint.resume={args.resume}")
    cfg = load_config(args.config, overrides)
    from .algorithms.sft.train import run_sft

    run_sft(cfg)
    return 0


def cmd_evaluate_sft(argv) -> int:
    from .algorithms.sft.evaluate import parse_args, run

    run(parse_args(argv))
    return 0


# --- reward model (issue 7) -------------------------------------------------------------------


def cmd_rm(argv) -> int:
    p = argparse.ArgumentParser(prog="glm_megatron rm", description="Reward-model training.")
    p.add_argument("--config", required=True, help="YAML config (the seed's keys + parallel:)")
    p.add_argument("--resume", default=None,
                   help="'auto' (latest complete checkpoint in checkpoint.output_dir) or a path")
    p.add_argument("overrides", nargs="*", help="dotted.key=value")
    args = p.parse_args(argv)
    from .algorithms.rm.config import RMConfig
    from .engine.config import load_config

    overrides = list(args.overrides) + ([f"checkpoint.resume={args.resume}"] if args.resume else [])
    cfg = load_config(args.config, overrides, schema=RMConfig)
    from .algorithms.rm.train import run_rm

    run_rm(cfg)
    return 0


def cmd_evaluate_rm(argv) -> int:
    from .algorithms.rm.evaluate import parse_args, run

    run(parse_args(argv))
    return 0


# --- PPO (issue 8) ------------------------------------------------------------------------------


def cmd_ppo(argv) -> int:
    p = argparse.ArgumentParser(prog="glm_megatron ppo", description="PPO RLHF.")
    p.add_argument("--config", required=True,
                   help="YAML config (the seed's training_rlhf_ppo.yaml keys + parallel:)")
    p.add_argument("--resume", default=None,
                   help="'auto' (latest complete checkpoint in checkpoint.output_dir) or a path")
    p.add_argument("overrides", nargs="*", help="dotted.key=value")
    args = p.parse_args(argv)
    from .algorithms.ppo.config import PPOConfig
    from .engine.config import load_config

    overrides = list(args.overrides) + ([f"checkpoint.resume={args.resume}"] if args.resume else [])
    cfg = load_config(args.config, overrides, schema=PPOConfig)
    from .algorithms.ppo.train import run_ppo

    run_ppo(cfg)
    return 0


COMMANDS = {"sft": cmd_sft, "evaluate-sft": cmd_evaluate_sft, "rm": cmd_rm,
            "evaluate-rm": cmd_evaluate_rm, "ppo": cmd_ppo}


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in COMMANDS:
        print(f"usage: python -m glm_megatron {{{','.join(COMMANDS)}}} ...", file=sys.stderr)
        return EXIT_BAD_INPUT
    _setup_logging()
    command, rest = argv[0], argv[1:]
    try:
        return COMMANDS[command](rest)
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
