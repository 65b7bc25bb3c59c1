"""PPO end to end on 2 gloo ranks: fused loss terms vs full logits at TP=2, offloaded frozen
models, learning on the tiny task at TP=1 and EP=2, and kill -9 resume through the real CLI.

The inputs are a real pipeline (tests/workers/ppo_common.py): a short SFT of glm4-moe-tiny on
"Describe the X N." prompts answered with positive and negative words, and a reward model
started from it that prefers positive words. PPO must raise the validation reward.
"""

import json
import os
import signal
import subprocess
import time

import psutil
import pytest
from workers.ppo_common import build_ppo_inputs, ppo_config, read_ppo_log
from workers.train_common import glm_cmd, write_config

from helpers.launch import REPO, torchrun
from helpers.launch import test_env as launch_env

STEPS = 16
# Per-token KL to the reference (the configured k1 estimator) allowed at the end of the run.
KL_BOUND = 0.2


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    out = tmp_path_factory.mktemp("ppo_inputs")
    info = build_ppo_inputs(str(out))
    (out / "inputs.json").write_text(json.dumps(info))
    return info, out / "inputs.json"


@pytest.fixture(scope="module")
def suite(inputs, tmp_path_factory):
    out = tmp_path_factory.mktemp("ppo_suite")
    torchrun("tests/workers/ppo_suite.py", "--inputs", str(inputs[1]), "--out", str(out),
             "--steps", str(STEPS), timeout=1500)
    return json.loads((out / "results.json").read_text())


def test_reward_model_of_the_pipeline_ranks_well(inputs):
    assert inputs[0]["rm_eval"]["eval_accuracy"] > 0.8


def test_fused_loss_terms_equal_full_logits_at_tp2(suite):
    run = suite["tp2"]
    assert run["layout"].startswith("TP=2")
    fused, full = run["fused"], run["full_logits"]
    assert full["clip_fraction"] > 0  # the perturbation exercises the clipped branch
    for key in ("policy_loss", "entropy", "approx_kl"):
        assert fused[key] == pytest.approx(full[key], rel=1e-4, abs=1e-4), key
    assert fused["clip_fraction"] == full["clip_fraction"]


def test_offloaded_frozen_models_give_identical_scores(suite):
    run = suite["tp2"]
    assert run["resident_while_offloaded"] == 0
    assert run["resident_after_scoring"] == 0  # offloaded again after use
    assert run["offload_max_diff"] == 0.0


def test_missing_eos_penalty_lowers_only_truncated_responses(suite):
    run = suite["tp2"]
    ended = run["eos_ended"]
    assert ended == [i % 2 == 0 for i in range(len(ended))]  # as the scenario built them
    for shift, stopped in zip(run["eos_penalty_shift"], ended):
        assert shift == pytest.approx(0.0 if stopped else 0.7, abs=1e-6)


def test_reward_model_scores_other_stop_tokens_as_eos(suite):
    run = suite["tp2"]
    assert run["stop_as_eos_diff"] == 0.0  # same token ids reach the reward model
    assert run["stop_as_eos_off_diff"] > 1e-4  # the option is what made them equal


@pytest.mark.parametrize("name", ["learn_tp1", "learn_ep2"])
def test_validation_reward_rises_with_bounded_kl(suite, name):
    run = suite[name]
    (s0, before), (s1, after) = run["validation"][0], run["validation"][-1]
    assert (s0, s1) == (0, STEPS)
    assert after["mean_reward"] > before["mean_reward"] + 0.4, (before, after)
    assert abs(after["kl_divergence"]) < KL_BOUND, after
    history = [m for _, m in run["history"]]
    assert all(m["skipped_steps"] == 0 for m in history)
    assert all(0 <= m["clip_fraction"] <= 1 for m in history)


def _start(cfg_file, *extra):
    return subprocess.Popen(glm_cmd("ppo", "--config", cfg_file, *extra), cwd=REPO, env=launch_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def _logged(out_dir) -> int:
    try:
        return max(read_ppo_log(out_dir), default=0)
    except (FileNotFoundError, json.JSONDecodeError):
        return 0


def test_kill9_resume_replays_the_same_trajectory(suite, inputs, tmp_path):
    reference = read_ppo_log(suite["learn_ep2"]["output_dir"])
    out_dir = str(tmp_path / "run")
    cfg = ppo_config(inputs[0], out_dir, parallel={"expert_model_parallel_size": 2},
                     rlhf={"max_steps": STEPS, "save_steps": STEPS // 2, "eval_steps": STEPS})
    cfg_file = write_config(cfg, str(tmp_path / "ppo.yaml"))
    proc = _start(cfg_file)
    deadline = time.time() + 900
    while _logged(out_dir) < STEPS // 2 + 2:
        if proc.poll() is not None or time.time() > deadline:
            raise AssertionError(f"run ended early ({proc.returncode}):\n{proc.stdout.read()[-4000:]}")
        time.sleep(0.05)
    # torchrun starts its ranks in sessions of their own: SIGKILL every process of the job, as a
    # node failure would (no handler runs, nothing is saved).
    job = psutil.Process(proc.pid)
    for p in [*job.children(recursive=True), job]:
        p.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    killed_at = _logged(out_dir)
    assert STEPS // 2 < killed_at < STEPS, "the run was not killed between two checkpoints"
    assert not os.path.exists(os.path.join(out_dir, f"iter_{STEPS:07d}"))
    assert os.path.isfile(os.path.join(out_dir, f"iter_{STEPS // 2:07d}", "COMPLETE"))
    resumed = subprocess.run(glm_cmd("ppo", "--config", cfg_file, "--resume", "auto"), cwd=REPO,
                             env=launch_env(), capture_output=True, text=True, timeout=900)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert f"resumed from {out_dir}/iter_{STEPS // 2:07d}" in resumed.stdout + resumed.stderr
    log = read_ppo_log(out_dir)
    assert f"ppo finished at step {STEPS}" in resumed.stdout
    for step in range(STEPS // 2 + 1, STEPS + 1):
        assert log[step]["rollout_digest"] == reference[step]["rollout_digest"], step
        for key in ("mean_reward", "policy_loss", "value_loss", "kl_penalty"):
            assert log[step][key] == pytest.approx(reference[step][key], rel=1e-6, abs=1e-7), (step, key)


def test_pipeline_parallel_with_a_separate_value_model(suite):
    run = suite["pp2_value"]
    assert run["policy_saved"] and run["value_saved"]
    for _, m in run["history"]:
        assert m["skipped_steps"] == 0 and m["optimizer_steps"] == 4
        for key in ("policy_loss", "value_loss", "entropy", "approx_kl", "mean_reward"):
            assert m[key] == m[key] and abs(m[key]) < 1e3, (key, m[key])  # finite
        assert m["value_loss"] > 0
    assert run["validation"][-1][0] == 2


def test_lora_policy_is_its_own_reference(suite):
    run = suite["lora"]
    (s0, before), (s1, after) = run["validation"][0], run["validation"][-1]
    assert (s0, s1) == (0, STEPS)
    # B starts at zero: before any update the policy *is* its reference, exactly.
    assert before["kl_divergence"] == 0.0, before
    assert after["mean_reward"] > before["mean_reward"] + 0.2, (before, after)
    assert abs(after["kl_divergence"]) < KL_BOUND and after["kl_divergence"] != 0.0, after
    assert any("reference: the policy's base weights (LoRA adapters off" in line
               for line in run["log"]), run["log"]
    # Adapters and the value head are saved; the frozen base is named, not copied.
    keys = run["saved_keys"]
    assert run["base_record"] and "value_head.weight" in keys
    assert all("_lora.adapters." in k or k == "value_head.weight" for k in keys), keys[:5]


def test_ppo_starts_from_a_lora_checkpoint_with_its_adapters_folded_in(suite):
    """The LoRA run's last validation and the next run's first use the same prompts (the next
    run reads them raw, rendered at start) and seed: the folded policy must generate and score
    as the adapters did."""
    end_of_lora = suite["lora"]["validation"][-1][1]
    (step, start), _ = suite["from_lora"]["validation"]
    assert step == 0
    assert start["mean_reward"] == pytest.approx(end_of_lora["mean_reward"], abs=1e-4)
    assert start["kl_divergence"] == 0.0  # its reference is the folded model itself
