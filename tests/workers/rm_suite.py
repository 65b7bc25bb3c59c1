"""Distributed worker: reward-model trainings and checks in one torchrun launch (2 gloo ranks).

Launched by tests/test_reward_training.py. Runs, one after another in one process group:
learning at DP=2 (TP=1) and TP=2 (+SP) from the same initial weights, a frozen-layers run at
EP=2, and the last-token read under right / left padding at TP=1 and TP=2 (+SP). Rank 0 writes
``results.json``.
"""

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from workers.rm_common import rm_config  # noqa: E402
from workers.train_suite import save_initial_weights  # noqa: E402

from glm_megatron.algorithms.rm.config import RMConfig  # noqa: E402
from glm_megatron.engine.config import build_section  # noqa: E402,I001

LAYOUTS = {
    "tp1": {},
    "tp2": {"tensor_model_parallel_size": 2},  # MoE + TP: sequence parallelism is implied
    "ep2": {"expert_model_parallel_size": 2},
}


def scenarios(data: dict, out: str, init: str) -> dict:
    start = {"preset": None, "load_checkpoint": init}
    runs = {}
    for layout in ("tp1", "tp2"):
        runs[f"learn_{layout}"] = rm_config(
            data, os.path.join(out, f"learn_{layout}"), model=start,
            checkpoint={"save_final": layout == "tp2"},  # evaluate-rm reads this one
            evaluation={"eval_strategy": "steps", "eval_steps": 24, "eval_at_start": True},
            parallel=LAYOUTS[layout])
    runs["frozen"] = rm_config(
        data, os.path.join(out, "frozen"),
        model=dict(start, freeze_encoder_layers=2, freeze_embeddings=True),
        training={"max_steps": 4, "learning_rate": 1.0e-2, "warmup_ratio": 0.0},
        checkpoint={"save_final": True}, parallel=LAYOUTS["ep2"])
    return runs


def padding_check(layout: dict, seqs: list, pad_id: int) -> dict:
    """Rewards of 4 sequences: alone, right-padded and left-padded to 48, and read (wrongly) at
    the last, padding position."""
    import torch

    from glm_megatron.algorithms.rm.loss import rm_forward_step
    from glm_megatron.engine.engine import ModelRunner
    from glm_megatron.engine.preference_batches import build_inputs
    from glm_megatron.models import get_preset
    from glm_megatron.models.config import model_shape
    from glm_megatron.models.loading import build_glm_model
    from glm_megatron.models.reward_head import attach_reward_heads
    from glm_megatron.parallel import ParallelLayout, initialize_parallel

    glm = get_preset("glm4-moe-tiny")
    sp = layout.get("tensor_model_parallel_size", 1) > 1
    ctx = initialize_parallel(ParallelLayout(**layout, sequence_parallel=sp), model_shape(glm),
                              seed=5, training=False)
    chunks, tconfig = build_glm_model(glm, ctx.layout)
    attach_reward_heads(chunks, tconfig, seed=11)
    # A random head reads ~0 everywhere; a larger one makes position errors visible.
    for c in chunks:
        with torch.no_grad():
            c.output_layer.weight.mul_(50.0)
    runner = ModelRunner(chunks)
    mult = ctx.layout.tp if sp else 1

    def rewards(batch, last_index=None):
        n = batch["tokens"].shape[0] // 2
        mb = dict(batch, margin=torch.zeros(n), weight=torch.ones(n))
        if last_index is not None:
            mb["last_index"] = last_index
        (report,) = runner.eval_step([mb], rm_forward_step)
        pairs = report["rm pairs"]
        return torch.cat([pairs[:, 0], pairs[:, 1]]).tolist()

    alone = []
    for s in seqs:  # paired with itself, padded only as far as sequence parallelism needs
        length = -(-len(s) // mult) * mult
        alone.append(rewards(build_inputs([s, s], length, pad_id))[0])
    right = build_inputs(seqs, 48, pad_id, "right")
    return {
        "layout": ctx.layout.describe(),
        "alone": alone,
        "right": rewards(right),
        "left": rewards(build_inputs(seqs, 48, pad_id, "left")),
        "right_read_at_end": rewards(right, torch.full((len(seqs),), 47)),
    }


def main():
    from glm_megatron.parallel import install_cpu_support

    install_cpu_support()
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", required=True, help="JSON from rm_common.build_rm_data")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    with open(args.data, encoding="utf-8") as fh:
        data = json.load(fh)

    from glm_megatron.algorithms.rm.train import run_rm
    from glm_megatron.data.dataset import TokenizedDataset
    from glm_megatron.parallel import destroy_parallel

    results = {}
    init = os.path.join(args.out, "init")
    save_initial_weights(init)
    for name, cfg_dict in scenarios(data, args.out, os.path.join(init, "model")).items():
        cfg = build_section(RMConfig, cfg_dict, "")
        cfg.validate()
        result, _, ctx = run_rm(cfg, log=lambda *a: None)
        results[name] = {"history": result.history, "eval": result.eval_history,
                         "layout": ctx.layout.describe(), "checkpoint": result.last_checkpoint}
    val = TokenizedDataset(data["val"])
    seqs = [val[0]["chosen_input_ids"][:7], val[1]["rejected_input_ids"][:12],
            val[2]["chosen_input_ids"][:20], val[3]["rejected_input_ids"]]
    seqs = [[int(t) for t in s] for s in seqs]
    for name in ("tp1", "tp2"):
        results[f"padding_{name}"] = padding_check(LAYOUTS[name], seqs, pad_id=0)
    if int(os.environ["RANK"]) == 0:
        with open(os.path.join(args.out, "results.json"), "w", encoding="utf-8") as fh:
            json.dump(results, fh, indent=1)
    destroy_parallel()


if __name__ == "__main__":
    main()
