"""Dense GLM-4 (``glm``: GLM-4-9B, ``glm4``: GLM-4-0414 with sandwich norms) through SFT, the
reward model, PPO, KV-cache generation and evaluate-sft / evaluate-rm, on 2 gloo ranks.

One torchrun launch (tests/workers/dense_suite.py) runs every scenario on the tiny presets
``glm4-0414-tiny`` and ``glm4-9b-tiny``: the digit tasks of examples/tiny_sft and the
SFT -> reward model -> PPO pipeline of examples/tiny_ppo, made in the same launch. The GLM-4-9B
example config (the ChatGLM4 tutorial on 8 GPUs) is checked without any process group.
"""

import json
import math
import re

import pytest
from workers.dense_suite import (
    EQUAL_STEPS,
    LEARN_STEPS,
    POLICY_STEPS,
    PPO_SAVE_AT,
    PPO_STEPS,
    RM_STEPS,
)
from workers.ppo_common import build_ppo_data, read_ppo_log
from workers.train_common import build_tiny_data

from glm_megatron.engine.config import load_config
from helpers.launch import REPO, torchrun

# Per-token KL to the reference (k1) allowed at the end of the short PPO run (measured ~0.23).
KL_BOUND = 0.5


@pytest.fixture(scope="module")
def suite(tmp_path_factory):
    root = tmp_path_factory.mktemp("dense")
    data = {"sft": build_tiny_data(str(root / "sft_data")),
            "ppo": build_ppo_data(str(root / "ppo_data"))}
    for name, info in data.items():
        (root / f"{name}_data.json").write_text(json.dumps(info))
    out = root / "out"
    out.mkdir()
    torchrun("tests/workers/dense_suite.py", "--sft-data", str(root / "sft_data.json"),
             "--ppo-data", str(root / "ppo_data.json"), "--out", str(out), timeout=900,
             log=root / "worker.log")
    return json.loads((out / "results.json").read_text())


def first_last_eval(run):
    (s0, first), (s1, last) = run["eval"][0], run["eval"][-1]
    return (s0, s1), first, last


def test_sandwich_model_at_tp2_sp_trains_like_tp1(suite):
    # Same saved weights: a sandwich norm whose gradient missed the TP all-reduce under sequence
    # parallelism (or any TP split error) makes the TP=2 losses drift from TP=1 (DP=2). Measured:
    # ~1.5e-7 apart; with the two sandwich norms' weights unmarked for SP, 1.1e-4 to 1.7e-4.
    assert suite["equal_tp1"]["layout"].startswith("TP=1 PP=1")
    assert suite["equal_tp2sp"]["layout"].startswith("TP=2 PP=1") and "+SP" in suite["equal_tp2sp"]["layout"]
    ref = [loss for _, loss in suite["equal_tp1"]["history"]]
    got = [loss for _, loss in suite["equal_tp2sp"]["history"]]
    assert len(ref) == len(got) == EQUAL_STEPS
    assert ref[-1] < ref[0] - 0.5  # the steps really trained
    assert max(abs(a - b) for a, b in zip(ref, got)) < 1e-5, (ref, got)


@pytest.mark.parametrize("name,layout,steps,ratio", [
    ("learn_tp2sp", "TP=2 PP=1", LEARN_STEPS, 0.4),  # glm4-0414-tiny, digit tasks
    ("sft_pp2", "TP=1 PP=2", POLICY_STEPS, 0.5),  # glm4-9b-tiny, tiny_ppo's mixed-valence answers
])
def test_sft_held_out_loss_falls(suite, name, layout, steps, ratio):
    run = suite[name]
    assert run["layout"].startswith(layout)
    assert ("+SP" in run["layout"]) == (name == "learn_tp2sp")
    when, first, last = first_last_eval(run)
    assert when == (0, steps)
    assert first["eval_tokens"] == last["eval_tokens"] > 0
    assert first["eval_loss"] > 5.0  # ~ln(512) untrained (measured 6.06 / 6.36)
    assert last["eval_loss"] < ratio * first["eval_loss"], (first, last)  # measured 0.21 / 0.31
    assert run["checkpoint"].endswith(f"iter_{steps:07d}")


def test_evaluate_sft_at_pp2_reproduces_the_tp2_sp_trainers_eval(suite):
    trained = first_last_eval(suite["learn_tp2sp"])[2]
    runs = suite["evaluate_sft"]
    for r in (runs["tokenized"], runs["jsonl"], runs["answers"]):
        assert r["layout"].startswith("TP=1 PP=2")
        assert r["checkpoint"].endswith(f"learn_tp2sp/iter_{LEARN_STEPS:07d}/model")
    # Same weights and validation rows, resharded TP=2 +SP -> PP=2: the same loss, from the
    # tokenized split and from its JSONL source rendered with the split's template.
    for r in (runs["tokenized"], runs["jsonl"]):
        assert r["eval_tokens"] == trained["eval_tokens"]
        assert r["eval_loss"] == pytest.approx(trained["eval_loss"], abs=1e-4)
        assert r["eval_perplexity"] == pytest.approx(math.exp(r["eval_loss"]), rel=1e-6)
    assert runs["jsonl"]["template"] == runs["jsonl"]["data_template"] == "glm4.5"
    # Without --template, conversations are rendered as the model family's chat models expect.
    answers = runs["answers"]
    assert answers["template"] == "glm4-0414" and "template" not in runs["tokenized"]
    assert len(answers["generations"]) == 2
    assert all(g["reference"] and g["generated"] for g in answers["generations"])


def test_reward_model_on_a_dense_trunk_learns(suite):
    run = suite["rm"]
    assert run["layout"].startswith("TP=2 PP=1") and "+SP" in run["layout"]
    when, first, last = first_last_eval(run)
    assert when == (0, RM_STEPS)
    assert first["eval_samples"] == last["eval_samples"] > 50
    assert first["eval_accuracy"] < 0.75, first  # near chance from the SFT trunk (measured 0.59)
    assert last["eval_accuracy"] >= 0.9, last
    assert last["eval_mean_margin"] > 1.0
    assert last["eval_loss"] < 0.5 * first["eval_loss"]


def test_evaluate_rm_at_pp2_reproduces_the_saved_statistics(suite):
    r, last = suite["evaluate_rm"], first_last_eval(suite["rm"])[2]
    assert r["layout"].startswith("TP=1 PP=2")
    assert r["samples"] == last["eval_samples"] and r["accuracy"] >= 0.9
    assert abs(r["accuracy"] - last["eval_accuracy"]) <= 1 / r["samples"]  # at most a near tie flips
    saved = r["saved_normalization"]
    assert saved["count"] == 2 * r["samples"] and saved["std"] > 0.1
    assert r["test_reward_stats"]["mean"] == pytest.approx(saved["mean"], abs=1e-4)
    assert r["test_reward_stats"]["std"] == pytest.approx(saved["std"], abs=1e-4)


def test_ppo_on_a_dense_policy_raises_validation_reward_with_bounded_kl(suite):
    run = suite["ppo"]
    assert run["reason"] == "finished"
    (s0, before), (s1, after) = run["validation"][0], run["validation"][-1]
    assert (s0, s1) == (0, PPO_STEPS)
    assert after["mean_reward"] > before["mean_reward"] + 0.4, (before, after)  # measured +1.06
    assert math.isfinite(after["kl_divergence"]) and abs(after["kl_divergence"]) < KL_BOUND, after
    history = [m for _, m in run["history"]]
    assert len(history) == PPO_STEPS
    for m in history:
        assert m["skipped_steps"] == 0 and 0 <= m["clip_fraction"] <= 1
        for key in ("policy_loss", "value_loss", "entropy", "approx_kl", "kl_penalty"):
            assert math.isfinite(m[key]), (key, m)
        assert m["value_loss"] > 0


def test_ppo_resumed_from_a_checkpoint_replays_the_same_steps(suite):
    reference = read_ppo_log(suite["ppo"]["output_dir"])
    resumed = read_ppo_log(suite["ppo_resumed"]["output_dir"])
    assert sorted(resumed) == list(range(PPO_SAVE_AT + 1, PPO_STEPS + 1))
    for step in resumed:
        assert resumed[step]["rollout_digest"] == reference[step]["rollout_digest"], step
        for key in ("mean_reward", "policy_loss", "value_loss", "kl_penalty"):
            assert resumed[step][key] == pytest.approx(reference[step][key], rel=1e-6, abs=1e-7), (step, key)
    got, want = suite["ppo_resumed"]["validation"][-1], suite["ppo"]["validation"][-1]
    assert got[0] == want[0] == PPO_STEPS
    assert got[1]["mean_reward"] == pytest.approx(want[1]["mean_reward"], rel=1e-6)


@pytest.mark.parametrize("name,layout", [("glm4-0414-tiny_tp2sp", "TP=2 PP=1"),
                                         ("glm4-9b-tiny_pp2", "TP=1 PP=2")])
def test_kv_cache_generation_equals_full_recompute_greedy(suite, name, layout):
    gen = suite["generation"]
    ranks = gen[name]["ranks"]
    assert len(ranks) == 2
    for r in ranks:
        assert r["layout"].startswith(layout) and r["sp"] == ("+SP" in r["layout"])
        assert r["kv_greedy"] == r["oracle"], r["layout"]
        assert all(len(o) == gen["max_new"] for o in r["oracle"])
        assert len({t for o in r["oracle"] for t in o}) > 5, r["oracle"]  # not degenerate
        assert r["kv_stop_short"] == r["expected_stop_short"]
        assert max(len(o) for o in r["kv_stop_short"]) == gen["short_max_new"]
        assert r["sp_restored"] and r["train_mode_restored"]
    assert ranks[0]["kv_greedy"] == ranks[1]["kv_greedy"]  # DP=1: one replica, same tokens
    assert any("+SP" in r["layout"] for r in ranks) == (name.endswith("sp"))


@pytest.mark.parametrize("entry,prefix", [("sft", "parallel: "), ("ppo", "parallel: "),
                                          ("evaluate_sft", "--tp/--pp/--ep: ")])
def test_expert_parallelism_on_a_dense_model_is_refused(suite, entry, prefix):
    message = suite["refusals"][entry]
    assert message is not None, f"{entry} accepted EP=2 on a dense model"
    assert message.startswith(f"TrainConfigError: {prefix}"), message
    assert "EP=2 but the model is dense (no routed experts): expert_model_parallel_size must be 1" \
        in message
    if entry == "ppo":
        assert "(for rlhf.policy_model)" in message


# ------------------------------------------------------------------ examples/glm4_9b_sft.yaml
EXAMPLE = REPO / "examples" / "glm4_9b_sft.yaml"


def _example_layout(*overrides):
    from glm_megatron.models import get_preset
    from glm_megatron.models.config import model_shape
    from glm_megatron.parallel import validate_layout

    cfg = load_config(str(EXAMPLE), list(overrides))
    return cfg, validate_layout(cfg.parallel, 8, model_shape(get_preset("glm4-9b")), training=True,
                                cuda=True, have_transformer_engine=True)


def test_glm4_9b_example_is_full_sft_at_tp2_sp_dp4_on_8_gpus():
    from glm_megatron.engine.batching import resolve_batch

    cfg, layout = _example_layout()
    assert (layout.tp, layout.pp, layout.ep, layout.sequence_parallel) == (2, 1, 1, True)
    plan = resolve_batch(cfg.training, layout.data_parallel_size(8))
    assert (plan.data_parallel_size, plan.micro_batch_size, plan.gradient_accumulation_steps,
            plan.global_batch_size) == (4, 2, 4, 32)
    t = cfg.training
    assert t.max_seq_length == cfg.data.max_seq_length == 512 and t.num_epochs == 3
    assert t.mixed_precision == "bf16" and t.use_distributed_optimizer
    assert 5e-6 <= t.learning_rate <= 5e-5  # a full fine-tune, not the tutorial's LoRA 5e-4
    assert cfg.model.hf_checkpoint and cfg.model.preset is None
    # The launch lines of its header name scripts that exist and this config.
    launches = re.findall(r"^#\s+((?:torchrun|sbatch) .*)$", EXAMPLE.read_text(), re.M)
    assert len(launches) == 2
    for line in launches:
        assert "examples/glm4_9b_sft.yaml" in line
        for script in re.findall(r"examples/launch/\S+", line):
            assert (REPO / script).is_file(), script


@pytest.mark.parametrize("override,message", [
    ("parallel.tensor_model_parallel_size=4", "TP=4 does not divide the 2 KV groups"),
    ("parallel.expert_model_parallel_size=2", "expert_model_parallel_size must be 1"),
])
def test_glm4_9b_example_refuses_impossible_layouts(override, message):
    from glm_megatron.parallel import LayoutError

    with pytest.raises(LayoutError, match=re.escape(message)):
        _example_layout(override)
