"""Distributed worker: several short SFT runs in one torchrun launch (2 gloo ranks).

Launched by tests/test_sft_training.py. Each scenario is a full ``run_sft`` (config -> parallel
setup -> model -> engine -> loop) at its own layout, one after another in the same process group
so Megatron is imported once. Rank 0 writes every run's loss history and eval results as JSON.
"""

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from workers.train_common import tiny_config  # noqa: E402

from glm_megatron.algorithms.sft.config import SFTConfig  # noqa: E402,I001
from glm_megatron.engine.config import build_section  # noqa: E402

LAYOUTS = {
    "tp1": {},
    "tp2": {"tensor_model_parallel_size": 2},  # MoE + TP: sequence parallelism is implied
    "ep2": {"expert_model_parallel_size": 2},
    "pp2": {"pipeline_model_parallel_size": 2},
}


def scenarios(data: dict, out: str, names: list[str]) -> dict:
    runs = {}
    for layout in ("tp1", "tp2"):
        runs[f"learn_{layout}"] = tiny_config(
            data, os.path.join(out, f"learn_{layout}"),
            training={"max_steps": 40, "warmup_ratio": 0.05},
            checkpoint={"save_final": layout == "tp2"},  # evaluate-sft reads this one
            evaluation={"eval_strategy": "steps", "eval_steps": 40, "eval_at_start": True},
            parallel=LAYOUTS[layout])
    for layout in LAYOUTS:
        # Same initial weights at every layout (random init differs per layout's RNG streams):
        # saved once at TP=1, loaded resharded through model.load_checkpoint.
        runs[f"equal_{layout}"] = tiny_config(
            data, os.path.join(out, f"equal_{layout}"),
            model={"preset": None, "load_checkpoint": os.path.join(out, "init", "model")},
            training={"max_steps": 4, "per_device_train_batch_size": 2, "learning_rate": 1.0e-3,
                      "warmup_ratio": 0.0},
            parallel=LAYOUTS[layout])
    runs["retention"] = tiny_config(
        data, os.path.join(out, "retention"),
        training={"max_steps": 8},
        checkpoint={"save_strategy": "steps", "checkpoint_interval": 2, "save_total_limit": 2},
        evaluation={"eval_strategy": "steps", "eval_steps": 2, "max_eval_samples": 16},
        parallel=LAYOUTS["ep2"])
    runs["reference"] = json.loads(os.environ.get("REFERENCE_CONFIG", "null")) or None
    return {k: v for k, v in runs.items() if k in names and v is not None}


def save_initial_weights(path: str, preset: str = "glm4-moe-tiny") -> None:
    """A random ``preset`` model at TP=1, saved the way a conversion tool or earlier stage would."""
    from glm_megatron.models import get_preset
    from glm_megatron.models.checkpoint import save_model_weights
    from glm_megatron.models.config import model_shape
    from glm_megatron.models.loading import build_glm_model
    from glm_megatron.parallel import ParallelLayout, initialize_parallel

    glm = get_preset(preset)
    ctx = initialize_parallel(ParallelLayout(), model_shape(glm), seed=3)
    chunks, _ = build_glm_model(glm, ctx.layout)
    save_model_weights(chunks, os.path.join(path, "model"))
    if ctx.is_main:
        with open(os.path.join(path, "model_config.json"), "w", encoding="utf-8") as fh:
            json.dump(glm.to_hf_dict(), fh)
    import torch.distributed as dist

    dist.barrier()


def main():
    from glm_megatron.parallel import install_cpu_support

    install_cpu_support()
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", required=True, help="JSON from train_common.build_tiny_data")
    parser.add_argument("--out", required=True)
    parser.add_argument("--runs", required=True)
    parser.add_argument("--reference-config", default=None, help="YAML dict for the 'reference' run")
    args = parser.parse_args()
    if args.reference_config:
        import yaml

        with open(args.reference_config, encoding="utf-8") as fh:
            os.environ["REFERENCE_CONFIG"] = json.dumps(yaml.safe_load(fh))
    with open(args.data, encoding="utf-8") as fh:
        data = json.load(fh)

    from glm_megatron.algorithms.sft.train import run_sft
    from glm_megatron.parallel import destroy_parallel

    results = {}
    save_initial_weights(os.path.join(args.out, "init"))
    for name, cfg_dict in scenarios(data, args.out, args.runs.split(",")).items():
        cfg = build_section(SFTConfig, cfg_dict, "")
        cfg.validate()
        result, engine, ctx = run_sft(cfg, log=lambda *a: None)
        results[name] = {
            "history": result.history,
            "eval": result.eval_history,
            "best": result.state.best_checkpoint,
            "layout": ctx.layout.describe(),
            "reason": result.reason,
        }
    if int(os.environ["RANK"]) == 0:
        with open(os.path.join(args.out, "results.json"), "w", encoding="utf-8") as fh:
            json.dump(results, fh, indent=1)
    destroy_parallel()


if __name__ == "__main__":
    main()
