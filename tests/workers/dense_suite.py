"""Dense GLM-4 (families ``glm`` and ``glm4``) through every trainer, one torchrun launch (2 gloo ranks).

Launched by tests/test_dense_training.py. One after another in one process group (Megatron is
imported once):

* ``equal_tp1`` / ``equal_tp2sp``: four SFT steps of ``glm4-0414-tiny`` (sandwich norms) from the
  same saved weights at TP=1 (DP=2) and TP=2 with sequence parallelism;
* ``learn_tp2sp``: SFT of ``glm4-0414-tiny`` at TP=2 +SP on the digit tasks of
  examples/tiny_sft, evaluated on held-out data at the start and the end, saved; ``evaluate_sft``
  reads that checkpoint back at PP=2 (evaluate-sft's ``run``): the tokenized validation split, its
  JSONL source, and greedy answers to the test conversations;
* ``sft_pp2``: SFT of ``glm4-9b-tiny`` at PP=2 on examples/tiny_ppo's data, saved: the policy;
* ``rm``: a reward model started from it at TP=2 +SP, evaluated at start and end, saved;
  ``evaluate_rm`` reads it back at PP=2;
* ``ppo``: PPO (TP=1, DP=2) from that policy and reward model, validated at start and end, saved
  at step PPO_SAVE_AT; ``ppo_resumed`` resumes that checkpoint into another directory;
* ``generation``: KV-cache decoding against full-recompute greedy (tests/workers/
  generation_worker.py's checks) on ``glm4-0414-tiny`` at TP=2 +SP and ``glm4-9b-tiny`` at PP=2;
* ``refusals``: expert parallelism asked of a dense model (SFT, PPO and evaluate-sft).

Rank 0 writes ``results.json`` (with each scenario's seconds).

    torchrun --nproc-per-node=2 tests/workers/dense_suite.py --sft-data D.json --ppo-data P.json --out DIR
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from workers.ppo_common import ppo_config  # noqa: E402
from workers.rm_common import rm_config  # noqa: E402
from workers.train_common import finish_worker, tiny_config  # noqa: E402
from workers.train_suite import save_initial_weights  # noqa: E402

SANDWICH, GLM = "glm4-0414-tiny", "glm4-9b-tiny"
TP2SP = {"tensor_model_parallel_size": 2, "sequence_parallel": True}  # dense: SP is not implied
PP2 = {"pipeline_model_parallel_size": 2}
# Steps of each run (the test reads these too).
EQUAL_STEPS, LEARN_STEPS, POLICY_STEPS, RM_STEPS = 4, 40, 40, 24
PPO_STEPS, PPO_SAVE_AT = 8, 6  # ppo_resumed replays steps PPO_SAVE_AT + 1 .. PPO_STEPS


def _quiet(*_a, **_k):
    pass


def sft_scenarios(sft_data: dict, ppo_data: dict, out: str) -> dict:
    init = {"preset": None, "load_checkpoint": os.path.join(out, "init", "model")}
    runs = {}
    for name, parallel in (("equal_tp1", {}), ("equal_tp2sp", TP2SP)):
        runs[name] = tiny_config(
            sft_data, os.path.join(out, name), model=init,
            training={"max_steps": EQUAL_STEPS, "per_device_train_batch_size": 2,
                      "learning_rate": 1.0e-3, "warmup_ratio": 0.0},
            parallel=parallel)
    runs["learn_tp2sp"] = tiny_config(
        sft_data, os.path.join(out, "learn_tp2sp"), model={"preset": SANDWICH},
        training={"max_steps": LEARN_STEPS},
        checkpoint={"save_final": True},
        evaluation={"eval_strategy": "steps", "eval_steps": LEARN_STEPS, "eval_at_start": True},
        parallel=TP2SP)
    runs["sft_pp2"] = tiny_config(
        {"train": ppo_data["sft_train"], "val": ppo_data["sft_val"]}, os.path.join(out, "sft_pp2"),
        model={"preset": GLM},
        training={"max_steps": POLICY_STEPS, "per_device_train_batch_size": 8,
                  "global_batch_size": 16},
        checkpoint={"save_final": True},
        evaluation={"eval_strategy": "steps", "eval_steps": POLICY_STEPS, "eval_at_start": True,
                    "eval_batch_size": 32},
        parallel=PP2)
    return runs


def run_sft_scenarios(runs: dict, results: dict) -> None:
    from glm_megatron.algorithms.sft.config import SFTConfig
    from glm_megatron.algorithms.sft.train import run_sft
    from glm_megatron.engine.config import build_section

    for name, cfg_dict in runs.items():
        t0 = time.perf_counter()
        cfg = build_section(SFTConfig, cfg_dict, "")
        cfg.validate()
        result, _, ctx = run_sft(cfg, log=_quiet)
        results[name] = {"history": result.history, "eval": result.eval_history,
                         "layout": ctx.layout.describe(), "checkpoint": result.last_checkpoint,
                         "seconds": time.perf_counter() - t0}


def run_rm_scenario(ppo_data: dict, out: str, policy: str, steps: int) -> dict:
    from glm_megatron.algorithms.rm.config import RMConfig
    from glm_megatron.algorithms.rm.train import run_rm
    from glm_megatron.engine.config import build_section

    t0 = time.perf_counter()
    cfg_dict = rm_config(
        {"train": ppo_data["pref_train"], "val": ppo_data["pref_val"]}, os.path.join(out, "rm"),
        model={"preset": None, "load_checkpoint": policy, "freeze_encoder_layers": 1},
        training={"max_steps": steps},
        checkpoint={"save_final": True},
        evaluation={"eval_strategy": "steps", "eval_steps": steps, "eval_at_start": True},
        parallel=TP2SP)
    cfg = build_section(RMConfig, cfg_dict, "")
    cfg.validate()
    result, _, ctx = run_rm(cfg, log=_quiet)
    return {"history": result.history, "eval": result.eval_history, "layout": ctx.layout.describe(),
            "checkpoint": result.last_checkpoint, "seconds": time.perf_counter() - t0}


def run_evaluations(results: dict, sft_data: dict, ppo_data: dict, out: str) -> None:
    """evaluate-sft and evaluate-rm (their ``run``, as the CLI calls it) at PP=2, on checkpoints
    trained at TP=2 +SP: on the validation splits the trainers evaluated at their last step."""
    from glm_megatron.algorithms.rm import evaluate as rm_eval
    from glm_megatron.algorithms.sft import evaluate as sft_eval

    t0 = time.perf_counter()
    load = ["--load", os.path.join(out, "learn_tp2sp"), "--pp", "2"]

    def evaluate(test_data: str, *extra: str) -> dict:
        return sft_eval.run(sft_eval.parse_args(
            [*load, "--test-data", test_data, "--output-file", os.path.join(out, "eval_sft.json"),
             "--tokenizer-path", sft_data["tokenizer"], *extra]), log=_quiet)

    with open(os.path.join(sft_data["val"], "manifest.json"), encoding="utf-8") as fh:
        manifest = json.load(fh)
    # The tokenized validation split; its JSONL source tokenized on the fly with the template it
    # was tokenized with; the held-out test conversations (the model family's template), answered.
    results["evaluate_sft"] = {
        "tokenized": evaluate(sft_data["val"]),
        "jsonl": {"data_template": manifest["template"],
                  **evaluate(manifest["input_files"][0], "--template", manifest["template"])},
        "answers": evaluate(sft_data["test"], "--num-generations", "2", "--max-new-tokens", "16"),
        "seconds": time.perf_counter() - t0}
    t0 = time.perf_counter()
    rm = rm_eval.run(rm_eval.parse_args([
        "--load", os.path.join(out, "rm"), "--test-data", ppo_data["pref_val"],
        "--output-file", os.path.join(out, "eval_rm.json"), "--pp", "2"]), log=_quiet)
    results["evaluate_rm"] = {k: rm[k] for k in ("layout", "accuracy", "samples", "mean_margin",
                                                 "test_reward_stats", "saved_normalization")}
    results["evaluate_rm"]["seconds"] = time.perf_counter() - t0


def run_ppo_scenarios(inputs: dict, out: str, steps: int, save_at: int) -> dict:
    from glm_megatron.algorithms.ppo.config import PPOConfig
    from glm_megatron.algorithms.ppo.train import run_ppo
    from glm_megatron.engine.config import build_section

    res = {}
    resume = os.path.join(out, "ppo", f"iter_{save_at:07d}")
    for name, extra in (("ppo", {}), ("ppo_resumed", {"resume": resume})):
        t0 = time.perf_counter()
        # The tiny example's PPO at TP=1 DP=2: its EP=2 does not apply to a dense model.
        cfg = build_section(PPOConfig, ppo_config(
            inputs, os.path.join(out, name), parallel={"expert_model_parallel_size": 1},
            rlhf={"max_steps": steps, "save_steps": save_at, "eval_steps": steps},
            checkpoint=extra), "")
        cfg.validate()
        result = run_ppo(cfg, log=_quiet)
        res[name] = {"history": result["history"], "validation": result["validation"],
                     "reason": result["reason"], "output_dir": os.path.join(out, name),
                     "seconds": time.perf_counter() - t0}
    return res


def run_generation() -> dict:
    import torch.distributed as dist
    from workers.generation_worker import MAX_NEW, SHORT_MAX_NEW, prompt_sets, run_layout

    from glm_megatron.models import get_preset

    res = {"max_new": MAX_NEW, "short_max_new": SHORT_MAX_NEW}
    for preset, layout in ((SANDWICH, "tp2sp"), (GLM, "pp2")):
        t0 = time.perf_counter()
        # As generation_worker: larger initial weights give the random model clear logit margins.
        cfg = get_preset(preset).replace(initializer_range=0.2)
        mine = run_layout(cfg, layout, prompt_sets(cfg.vocab_size))
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, mine)
        res[f"{preset}_{layout}"] = {"ranks": gathered, "seconds": time.perf_counter() - t0}
    return res


def refusals(sft_data: dict, inputs: dict, out: str) -> dict:
    """Expert parallelism asked of a dense model: each entry point's message (None: accepted).
    All are checks made before any process group or model exists."""
    from glm_megatron.algorithms.ppo.config import PPOConfig
    from glm_megatron.algorithms.ppo.train import prepare_ppo
    from glm_megatron.algorithms.sft import evaluate as sft_eval
    from glm_megatron.algorithms.sft.config import SFTConfig
    from glm_megatron.algorithms.sft.train import prepare_sft
    from glm_megatron.engine.config import TrainConfigError, build_section
    from glm_megatron.engine.prepare import evaluation_target
    from glm_megatron.parallel import LayoutError

    ep2 = {"expert_model_parallel_size": 2}
    sft = build_section(SFTConfig, tiny_config(sft_data, os.path.join(out, "refused"),
                                               model={"preset": SANDWICH}, parallel=ep2), "")
    ppo = build_section(PPOConfig, ppo_config(inputs, os.path.join(out, "refused_ppo"),
                                              parallel=ep2), "")
    evaluate = sft_eval.parse_args(["--load", os.path.join(out, "learn_tp2sp"), "--ep", "2",
                                    "--test-data", sft_data["val"], "--output-file", "unused.json"])
    messages = {}
    for name, call in (("sft", lambda: prepare_sft(sft, 2)), ("ppo", lambda: prepare_ppo(ppo, 2)),
                       ("evaluate_sft", lambda: evaluation_target(evaluate))):
        try:
            call()
            messages[name] = None
        except (TrainConfigError, LayoutError) as err:
            messages[name] = f"{type(err).__name__}: {err}"
    return messages


def main() -> None:
    from glm_megatron.parallel import install_cpu_support

    install_cpu_support()
    p = argparse.ArgumentParser()
    p.add_argument("--sft-data", required=True, help="JSON from train_common.build_tiny_data")
    p.add_argument("--ppo-data", required=True, help="JSON from examples/tiny_ppo/make_data.build")
    p.add_argument("--out", required=True)
    args = p.parse_args()
    with open(args.sft_data, encoding="utf-8") as fh:
        sft_data = json.load(fh)
    with open(args.ppo_data, encoding="utf-8") as fh:
        ppo_data = json.load(fh)

    results = {"seconds": {}}
    t0 = time.perf_counter()
    save_initial_weights(os.path.join(args.out, "init"), preset=SANDWICH)
    results["seconds"]["init"] = time.perf_counter() - t0
    run_sft_scenarios(sft_scenarios(sft_data, ppo_data, args.out), results)
    policy = os.path.join(args.out, "sft_pp2")
    results["rm"] = run_rm_scenario(ppo_data, args.out, policy, RM_STEPS)
    run_evaluations(results, sft_data, ppo_data, args.out)
    inputs = {"data": ppo_data, "policy": policy, "reward": os.path.join(args.out, "rm")}
    results.update(run_ppo_scenarios(inputs, args.out, PPO_STEPS, PPO_SAVE_AT))
    results["generation"] = run_generation()
    results["refusals"] = refusals(sft_data, inputs, args.out)
    finish_worker(results, args.out)


if __name__ == "__main__":
    main()
