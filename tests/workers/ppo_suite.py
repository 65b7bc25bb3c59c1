"""PPO scenarios on 2 gloo ranks, one launch (Megatron's import cost is paid once):

* ``tp2``: at TP=2 (sequence parallel), the fused-kernel PPO loss terms equal plain full-logits
  torch on the same batch, and offloading the frozen models gives identical scores;
* ``learn_tp1`` / ``learn_ep2``: whole PPO runs (run_ppo) at TP=1 (DP=2) and EP=2; the EP=2 one
  is also the uninterrupted reference of the kill -9 resume test;
* ``pp2_value``: PP=2 with a separate value model (its own optimizer), two steps and a save.

    torchrun --nproc-per-node=2 tests/workers/ppo_suite.py --inputs INPUTS.json --out DIR
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import torch  # noqa: E402
from workers.ppo_common import ppo_config  # noqa: E402


def _wait_file(path: str) -> None:
    import time

    for _ in range(600):
        if os.path.isfile(path):
            return
        time.sleep(0.05)


def _config_file(cfg_dict: dict, name: str, out: str):
    from workers.train_common import write_config

    from glm_megatron.algorithms.ppo.config import PPOConfig
    from glm_megatron.engine.config import load_config

    path = os.path.join(out, name + ".yaml")
    if int(os.environ["RANK"]) == 0:
        write_config(cfg_dict, path + ".tmp")
        os.replace(path + ".tmp", path)
    _wait_file(path)
    return load_config(path, [], schema=PPOConfig)


def full_logits_terms(models, batch, hp) -> dict:
    """The loss terms from full-vocabulary logits (the oracle for the fused kernel)."""
    from glm_megatron.algorithms.ppo.loss import masked_sum, policy_loss
    from glm_megatron.models.forward import forward_logits

    logits = forward_logits(models.policy.modules, batch["tokens"])
    if logits is None:
        return {}
    logp_all = torch.log_softmax(logits.double() / hp["temperature"], dim=-1)
    logp = logp_all.gather(-1, batch["labels"].unsqueeze(-1)).squeeze(-1)
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    mask = batch["mask"]
    pol = policy_loss(logp, batch["old_logprobs"].double(), batch["advantages"].double(), mask,
                      hp["clip_range"])
    return {"policy_loss": float(pol.loss_sum), "entropy": float(masked_sum(entropy, mask)),
            "approx_kl": float(pol.approx_kl_sum), "clip_fraction": float(pol.clipped_tokens)}


def fused_terms(models, batch, hp) -> dict:
    from glm_megatron.algorithms.ppo.forward import REPORT_KEYS, ppo_loss_step
    from glm_megatron.models.policy_heads import hidden_output

    with hidden_output(models.policy.modules):
        reports = models.policy.eval_step([batch], ppo_loss_step(hp, models.hidden_size))
    if not reports:
        return {}
    values = reports[0]["ppo"].tolist()
    return {k: float(v) for k, v in zip(REPORT_KEYS, values)}


def scenario_tp2(inputs: dict, out: str) -> dict:
    from glm_megatron.algorithms.ppo.data import build_rollouts
    from glm_megatron.algorithms.ppo.loss import kl_controller
    from glm_megatron.algorithms.ppo.step import PPOStep
    from glm_megatron.algorithms.ppo.train import build_models, prepare_ppo
    from glm_megatron.engine.batching import pad_multiple
    from glm_megatron.generation.rollout import InEngineGenerator
    from glm_megatron.generation.sampling import SamplingParams
    from glm_megatron.models.config import model_shape
    from glm_megatron.parallel import initialize_parallel, read_launch_env

    cfg = _config_file(ppo_config(inputs, os.path.join(out, "tp2"),
                                  parallel={"tensor_model_parallel_size": 2,
                                            "expert_model_parallel_size": 1}), "tp2", out)
    env = read_launch_env()
    prep = prepare_ppo(cfg, env.world_size)
    ctx = initialize_parallel(prep.layout, model_shape(prep.sources["policy"].glm), seed=3, env=env)
    models = build_models(cfg, prep, ctx.layout)
    tok = prep.tokenizer
    gen = InEngineGenerator(models.policy.modules, tok["stop_ids"], pad_id=tok["pad_id"], device=ctx.device)
    stepper = PPOStep(cfg, models, gen, prep.reward_stats, prep.plan, tok["pad_id"],
                      pad_multiple(ctx.layout), kl_controller(0.05, None, 1), eos_id=tok["eos_id"])
    prompts = prep.prompts[:6]
    ro = stepper.rollout(prompts, seed=5, sampling=SamplingParams(greedy=True))
    stop_ids = tok["stop_ids"]
    stepper.score(ro, stop_ids)
    plain = {k: ro.fields[k].clone() for k in ("old_logprobs", "ref_logprobs", "scores", "old_values")}
    # Offload both frozen models, check their storage is gone, score again.
    models.reference_offload.enabled = models.reward_offload.enabled = True
    models.reference_offload.offload()
    models.reward_offload.offload()
    resident = models.reference_offload.resident_bytes() + models.reward_offload.resident_bytes()
    stepper.score(ro, stop_ids)
    offloaded = {k: ro.fields[k] for k in plain}
    after = models.reference_offload.resident_bytes() + models.reward_offload.resident_bytes()
    # missing_eos_penalty through the real scoring path, on both kinds of response: even ones
    # made to end with a stop token, odd ones with their stop tokens removed (as if cut short).
    stops = set(stop_ids)
    cut = [(r[:-1] + [stop_ids[0]]) if i % 2 == 0 else ([t for t in r if t not in stops] or [p[-1]])
           for i, (p, r) in enumerate(zip(prompts, ro.responses))]
    ro_cut = build_rollouts(prompts, cut, tok["pad_id"], pad_multiple(ctx.layout))
    stepper.score(ro_cut, stop_ids)
    unpenalized = ro_cut.fields["scores"].clone()
    stepper.r.missing_eos_penalty = 0.7
    stepper.score(ro_cut, stop_ids)
    stepper.r.missing_eos_penalty = None
    # score_stops_as_eos: a response ending on <|user|> scores exactly like the same one ending
    # on <|endoftext|> (on by default), and differently with the option off.
    eos = tok["eos_id"]
    other = next(t for t in stop_ids if t != eos)
    bodies = [[t for t in r if t not in stops] or [p[-1]] for p, r in zip(prompts, ro.responses)]
    scores = {}
    for name, end, on in (("eos", eos, True), ("other", other, True), ("other_off", other, False)):
        stepper.r.score_stops_as_eos = on
        ro_end = build_rollouts(prompts, [b + [end] for b in bodies], tok["pad_id"], pad_multiple(ctx.layout))
        stepper.score(ro_end, stop_ids)
        scores[name] = ro_end.fields["scores"].clone()
    stepper.r.score_stops_as_eos = True
    result = {
        "layout": ctx.layout.describe(),
        "resident_while_offloaded": resident, "resident_after_scoring": after,
        "offload_max_diff": max(float((plain[k] - offloaded[k]).abs().max()) for k in plain),
        "responses": ro.responses,
        "eos_penalty_shift": (unpenalized - ro_cut.fields["scores"]).tolist(),
        "eos_ended": [r[-1] in stops for r in cut],
        "stop_as_eos_diff": float((scores["other"] - scores["eos"]).abs().max()),
        "stop_as_eos_off_diff": float((scores["other_off"] - scores["eos"]).abs().max()),
    }
    # Loss terms: perturbed old log-probs so that the ratios and clipping are not trivial.
    gen_noise = torch.Generator().manual_seed(0)
    batch = ro.select(range(len(ro)))
    batch["old_logprobs"] = batch["old_logprobs"] + 0.3 * torch.randn(
        batch["old_logprobs"].shape, generator=gen_noise) * batch["mask"]
    result["fused"] = fused_terms(models, batch, stepper.hp)
    result["full_logits"] = full_logits_terms(models, batch, stepper.hp)
    return result


def scenario_learn(inputs: dict, out: str, name: str, parallel: dict, steps: int) -> dict:
    from glm_megatron.algorithms.ppo.train import run_ppo

    run_dir = os.path.join(out, name)
    cfg = _config_file(ppo_config(inputs, run_dir, parallel=parallel,
                                  rlhf={"max_steps": steps, "save_steps": steps // 2,
                                        "eval_steps": steps}), name, out)
    result = run_ppo(cfg, log=lambda *a: None)
    res = {"validation": result["validation"], "output_dir": run_dir,
           "history": [(s, {k: v for k, v in m.items()}) for s, m in result["history"]]}
    return res


def scenario_pp2_value_model(inputs: dict, out: str) -> dict:
    """PP=2 with a separate value model started from the reward checkpoint: two steps, saved."""
    from glm_megatron.algorithms.ppo.train import run_ppo

    run_dir = os.path.join(out, "pp2_value")
    cfg = _config_file(ppo_config(
        inputs, run_dir,
        parallel={"pipeline_model_parallel_size": 2, "expert_model_parallel_size": 1},
        rlhf={"value_model": inputs["reward"], "value_learning_rate": 5.0e-4, "max_steps": 2,
              "save_steps": 2, "eval_steps": 2, "eval_at_start": False}), "pp2_value", out)
    result = run_ppo(cfg, log=lambda *a: None)
    ckpt = os.path.join(run_dir, "iter_0000002")
    return {"history": result["history"], "validation": result["validation"],
            "value_saved": os.path.isfile(os.path.join(ckpt, "value", "model", "metadata.json")),
            "policy_saved": os.path.isfile(os.path.join(ckpt, "model", "metadata.json"))}


def scenario_lora(inputs: dict, out: str, steps: int) -> dict:
    """LoRA on the policy's attention (rlhf.use_peft): the reference is the policy with its
    adapters off; checkpoints hold the adapters and the value head only."""
    from glm_megatron.algorithms.ppo.train import run_ppo
    from glm_megatron.conversion.dist_reader import TorchDistReader

    run_dir = os.path.join(out, "lora")
    lines = []
    cfg = _config_file(ppo_config(
        inputs, run_dir, parallel={"expert_model_parallel_size": 1},
        rlhf={"max_steps": steps, "save_steps": steps, "eval_steps": steps, "use_peft": True,
              "lora_r": 8, "lora_alpha": 16, "lora_target_modules": "all-linear",
              "learning_rate": 3.0e-3}), "lora", out)
    result = run_ppo(cfg, log=lines.append)
    saved = os.path.join(run_dir, f"iter_{steps:07d}", "model")
    return {"validation": result["validation"], "history": result["history"],
            "log": lines, "saved_keys": sorted(TorchDistReader(saved).tensors),
            "base_record": os.path.isfile(os.path.join(saved, "adapter_base.json"))}


def scenario_from_lora(inputs: dict, out: str, steps: int) -> dict:
    """PPO started from the LoRA scenario's checkpoint (adapters only): the policy and the
    reference load as its base with those adapters folded in, and get fresh adapters. The
    prompts are the raw JSONL files (the guide's form), rendered at start."""
    from glm_megatron.algorithms.ppo.train import run_ppo

    run_dir = os.path.join(out, "from_lora")
    lines = []
    cfg = _config_file(ppo_config(
        inputs, run_dir, parallel={"expert_model_parallel_size": 1},
        rlhf={"policy_model": os.path.join(out, "lora", f"iter_{steps:07d}"), "max_steps": 1,
              "save_steps": 1, "eval_steps": 1, "use_peft": True, "lora_r": 4, "lora_alpha": 8,
              "lora_target_modules": ["q_proj", "v_proj"]},
        data={"prompt_data_path": inputs["data"]["jsonl"]["prompts_train"],
              "validation_prompt_path": inputs["data"]["jsonl"]["prompts_val"],
              "tokenizer_path": inputs["data"]["tokenizer"]}), "from_lora", out)
    result = run_ppo(cfg, log=lines.append)
    return {"validation": result["validation"], "log": lines}


def main() -> None:
    from glm_megatron.parallel import install_cpu_support

    install_cpu_support()
    p = argparse.ArgumentParser()
    p.add_argument("--inputs", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=int, default=16)
    args = p.parse_args()
    with open(args.inputs, encoding="utf-8") as fh:
        inputs = json.load(fh)
    results = {"tp2": scenario_tp2(inputs, args.out)}
    results["learn_tp1"] = scenario_learn(inputs, args.out, "learn_tp1",
                                          {"expert_model_parallel_size": 1}, args.steps)
    results["learn_ep2"] = scenario_learn(inputs, args.out, "learn_ep2",
                                          {"expert_model_parallel_size": 2}, args.steps)
    results["pp2_value"] = scenario_pp2_value_model(inputs, args.out)
    results["lora"] = scenario_lora(inputs, args.out, args.steps)
    results["from_lora"] = scenario_from_lora(inputs, args.out, args.steps)
    if int(os.environ["RANK"]) == 0:
        with open(os.path.join(args.out, "results.json"), "w", encoding="utf-8") as fh:
            json.dump(results, fh, indent=1)
    # Between scenarios only Megatron's groups are rebuilt (initialize_parallel does it): a
    # second init of the default group on the same rendezvous port would hang.
    from glm_megatron.parallel import destroy_parallel

    destroy_parallel()


if __name__ == "__main__":
    main()
