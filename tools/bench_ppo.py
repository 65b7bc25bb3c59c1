"""PPO step time split by phase (rollout, scoring, training) on a tiny GLM-MoE, one CPU process.

    python tools/bench_ppo.py                 # glm4-moe-tiny, 16 rollouts x 32 new tokens, 6 steps
    python tools/bench_ppo.py --preset glm4-moe-small --steps 4 --rollouts 8

The real trainer (``run_ppo``) in a world of one: a randomly initialised policy (value head on its
trunk), the same weights as the frozen reference, a random reward model with unit normalisation,
random prompts of 16-32 tokens. Sampling runs to ``--new-tokens`` (no stop tokens), so every step
does the same work. The first step (warm-up) is left out of the medians. Printed: seconds per phase
and its share of the step, and the rollout phase's generated tokens/s; the KV-cache vs recompute
generation ratio is ``tools/bench_generation.py``.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _single_process_env() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), CUDA_VISIBLE_DEVICES="")


def write_inputs(out: str, preset: str, n_prompts: int, seed: int) -> dict:
    """Random policy and reward checkpoints with their model_config.json / reward_model.json,
    and a tokenized prompts split. Needs the parallel state of a world of one."""
    import torch

    from glm_megatron.algorithms.rm.train import write_reward_file
    from glm_megatron.data.dataset import DatasetWriter
    from glm_megatron.models import get_preset
    from glm_megatron.models.checkpoint import save_model_weights
    from glm_megatron.models.loading import build_glm_model
    from glm_megatron.models.reward_head import attach_reward_heads
    from glm_megatron.parallel import ParallelLayout

    glm = get_preset(preset)
    layout = ParallelLayout()
    paths = {}
    for name in ("policy", "reward"):
        torch.manual_seed(seed)
        chunks, tconfig = build_glm_model(glm, layout, params_dtype=torch.float32)
        if name == "reward":
            attach_reward_heads(chunks, tconfig, seed=seed)
        run = os.path.join(out, name, "iter_0000001")
        save_model_weights(chunks, os.path.join(run, "model"))
        Path(run, "model_config.json").write_text(json.dumps(glm.to_hf_dict()))
        if name == "reward":
            write_reward_file(run, glm.hidden_size, {"mean": 0.0, "std": 1.0}, "bench", 0.0)
        paths[name] = os.path.join(run, "model")
    rng = np.random.default_rng(seed)
    prompts = os.path.join(out, "prompts")
    writer = DatasetWriter(prompts, "prompts", glm.vocab_size)
    for i in range(n_prompts):
        writer.add({"prompt_ids": rng.integers(10, glm.vocab_size, rng.integers(16, 33))}, 0, i)
    # No stop tokens the random model could hit: every rollout runs to max_new_tokens.
    writer.close({"tokenizer": {"stop_ids": [glm.vocab_size + 1], "pad_id": 0}})
    paths["prompts"] = prompts
    return paths


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="glm4-moe-tiny")
    p.add_argument("--rollouts", type=int, default=16, help="rollouts per PPO step")
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    _single_process_env()
    import torch

    torch.set_num_threads(args.threads)
    from glm_megatron.algorithms.ppo.config import PPOConfig
    from glm_megatron.algorithms.ppo.train import run_ppo
    from glm_megatron.engine.config import load_config
    from glm_megatron.models import get_preset
    from glm_megatron.models.config import model_shape
    from glm_megatron.parallel import (
        ParallelLayout,
        destroy_parallel,
        initialize_parallel,
        install_cpu_support,
    )

    install_cpu_support()
    with tempfile.TemporaryDirectory() as tmp:
        initialize_parallel(ParallelLayout(), model_shape(get_preset(args.preset)), seed=0)
        paths = write_inputs(tmp, args.preset, 4 * args.rollouts, seed=0)
        destroy_parallel()
        overrides = [
            f"rlhf.policy_model={paths['policy']}", f"rlhf.reward_model={paths['reward']}",
            f"data.prompt_data_path={paths['prompts']}", f"rlhf.batch_size={args.rollouts}",
            f"rlhf.mini_batch_size={args.rollouts // 2}", "rlhf.ppo_epochs=2",
            f"rlhf.max_new_tokens={args.new_tokens}", f"rlhf.max_steps={args.steps}",
            "rlhf.eval_at_start=false", f"rlhf.eval_steps={10 * args.steps}", "rlhf.target_kl=null",
            "rlhf.approx_kl_stop_factor=null", f"checkpoint.output_dir={tmp}/ppo",
            "checkpoint.save_strategy=no", "checkpoint.save_final=false",
            "logging.progress_bar=false", f"logging.log_interval={10 * args.steps}",
            "logging.tensorboard_dir=null",
        ]
        cfg = load_config(None, overrides, schema=PPOConfig)
        result = run_ppo(cfg, log=lambda *a: None)
        destroy_parallel()
    timed = [m for _, m in result["history"][1:]] or [m for _, m in result["history"]]
    phases = {name: statistics.median(m[f"time_{name}"] for m in timed)
              for name in ("rollout", "scoring", "training")}
    total = sum(phases.values())
    tokens_per_sec = statistics.median(m["generated_tokens_per_sec"] for m in timed)
    print(f"PPO step on {args.preset}, 1 CPU process ({args.threads} threads), {args.rollouts} rollouts "
          f"x {args.new_tokens} new tokens, 2 epochs of 2 mini-batches; median of {len(timed)} steps")
    print(f"{'phase':<10} {'seconds':>8} {'share':>7}")
    for name, sec in phases.items():
        print(f"{name:<10} {sec:8.3f} {sec / total:7.1%}")
    print(f"{'step':<10} {total:8.3f}")
    print(f"rollout generation: {tokens_per_sec:.0f} generated tokens/s (KV cache)")


if __name__ == "__main__":
    main()
