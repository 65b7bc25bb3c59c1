"""DPO end to end on 2 gloo ranks: learning at TP=2 and EP=2, LoRA (reference = adapters off),
precomputed reference log-probs equal to live ones, the step-0 loss of each loss type against
TRL's formulas on log-probs computed by transformers from the HF export of the same weights, a
CLI run killed with kill -9 and resumed, and a bad config through the CLI.

The CLI run is started and killed first; then one torchrun launch runs every training scenario
(tests/workers/dpo_suite.py), its resumption included, on the valence-of-words preferences of
examples/tiny_rm/make_data.py.
"""

import json
import math

import pytest
import torch
import torch.nn.functional as F
from workers.dpo_suite import LEARN_STEPS, ORACLE_PAIRS, ORACLES, dpo_config, kill_config
from workers.rm_common import build_rm_data
from workers.train_common import (
    complete_steps,
    kill_job,
    logged_steps,
    read_train_log,
    start_glm,
    wait_for,
    write_config,
)

from glm_megatron.data.dataset import TokenizedDataset
from helpers.launch import REPO, torchrun

METRICS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
           "logps/chosen", "logps/rejected")


@pytest.fixture(scope="module")
def dpo_data(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny_dpo_data")
    info = build_rm_data(str(out))
    (out / "data.json").write_text(json.dumps(info))
    return info, out / "data.json"


@pytest.fixture(scope="module")
def killed_run(dpo_data, tmp_path_factory):
    """``glm_megatron dpo`` through torchrun, killed with kill -9 once it has a checkpoint; the
    suite resumes it (:func:`workers.dpo_suite.kill_config`)."""
    out = tmp_path_factory.mktemp("dpo_killed")
    out_dir = out / "run"
    cfg_file = write_config(kill_config(dpo_data[0], str(out_dir)), str(out / "dpo.yaml"))
    proc = start_glm("dpo", "--config", cfg_file)
    wait_for(lambda: logged_steps(out_dir) >= 3 and bool(complete_steps(out_dir)), proc)
    kill_job(proc)
    return out_dir, logged_steps(out_dir), complete_steps(out_dir)


@pytest.fixture(scope="module")
def suite(dpo_data, killed_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("dpo_suite")
    torchrun("tests/workers/dpo_suite.py", "--data", str(dpo_data[1]), "--out", str(out),
             "--killed-run", str(killed_run[0]))
    return out, json.loads((out / "results.json").read_text())


@pytest.mark.parametrize("name,layout", [("learn_tp2", "TP=2 PP=1"), ("learn_ep2", "EP=2"),
                                         ("lora", "TP=1 PP=1")])
def test_held_out_reward_accuracy_rises(suite, name, layout):
    run = suite[1][name]
    assert layout in run["layout"]
    (s0, first), (s1, last) = run["eval"][0], run["eval"][-1]
    assert (s0, s1) == (0, LEARN_STEPS)
    assert first["eval_samples"] == last["eval_samples"] > 50
    # Policy = reference at step 0: every implicit reward is 0, no pair is ranked right.
    assert first["eval_rewards/accuracies"] == 0.0 and first["eval_rewards/margins"] == 0.0
    assert last["eval_rewards/accuracies"] >= 0.9, last
    assert last["eval_rewards/margins"] > 0.5
    assert last["eval_rewards/chosen"] > 0 > last["eval_rewards/rejected"]
    assert last["eval_loss"] < 0.6 * first["eval_loss"], (first, last)


@pytest.mark.parametrize("name", ["learn_tp2", "learn_ep2", "lora"])
def test_the_reference_stays_the_starting_model(suite, name):
    """rewards/chosen / beta = logps/chosen - reference logps: after training, what remains of
    the reference is the step-0 policy's log-probs (a frozen copy; the LoRA base with the trained
    adapters switched off), not the trained weights."""
    run = suite[1][name]
    beta = run["config"]["training"]["beta"]
    first, last = run["eval"][0][1], run["eval"][-1][1]
    for side in ("chosen", "rejected"):
        ref = last[f"eval_logps/{side}"] - last[f"eval_rewards/{side}"] / beta
        assert ref == pytest.approx(first[f"eval_logps/{side}"], abs=2e-3)
        assert abs(last[f"eval_logps/{side}"] - first[f"eval_logps/{side}"]) > 0.5  # it moved


def test_precomputed_reference_log_probs_equal_the_live_reference(suite):
    live = [loss for _, loss in suite[1]["live_dp2"]["history"]]
    precomputed = [loss for _, loss in suite[1]["precomputed_dp2"]["history"]]
    assert len(live) == len(precomputed) == 3
    assert live[0] == pytest.approx(math.log(2.0), abs=1e-6)  # policy = reference at step 0
    assert max(abs(a - b) for a, b in zip(live, precomputed)) < 1e-5, (live, precomputed)
    assert live[-1] < live[0] - 0.01  # the steps moved the policy away from the reference


def test_a_reference_of_another_architecture_is_refused_before_any_work(suite):
    message = suite[1]["refused_reference"]
    assert message.startswith("training.reference_model: ") and "other_architecture" in message
    assert "another architecture than the policy" in message


def test_lora_run_saves_adapters_only_and_names_its_base(suite):
    model = suite[0] / "lora" / f"iter_{LEARN_STEPS:07d}" / "model"
    base = json.loads((model / "adapter_base.json").read_text())
    assert base["base"].rstrip("/").endswith("init/model")


def test_metric_names_in_the_step_log_and_tensorboard(suite):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = suite[0] / "learn_ep2"
    rows = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, LEARN_STEPS + 1))
    assert set(METRICS) <= set(rows[-1]) and rows[-1]["rewards/accuracies"] > 0.5
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {f"train/{m}" for m in METRICS} | {f"eval/{m}" for m in METRICS} <= tags
    assert {"train/loss", "eval/loss"} <= tags


# -- the oracle: transformers' log-probs, TRL's loss -------------------------------------------


def trl_dpo(pc, pr, rc, rr, nc, nr, loss_type, beta, label_smoothing):
    """TRL's DPO loss and metrics, restated from its source (TRL is not imported: its import
    pulls in datasets/pandas/pyarrow, and its loss lives inside ``DPOTrainer``):

    - sigmoid and ipo: trl 1.16.0, trl/trainer/dpo_trainer.py, ``DPOTrainer._compute_loss``;
      IPO normalises each response's score by its completion length there;
    - conservative: TRL's sigmoid loss with ``label_smoothing`` before 1.0
      (``DPOTrainer.dpo_loss``), the cDPO formula;
    - metrics: the same ``_compute_loss`` (rewards = beta * log-ratio of summed log-probs).
    """
    chosen_logratios = pc - rc
    rejected_logratios = pr - rr
    delta_score = chosen_logratios - rejected_logratios
    if loss_type == "sigmoid":
        per_sequence_loss = -F.logsigmoid(beta * delta_score)
    elif loss_type == "ipo":
        chosen_avg_score = chosen_logratios / nc.clamp(min=1.0)
        rejected_avg_score = rejected_logratios / nr.clamp(min=1.0)
        ipo_delta = chosen_avg_score - rejected_avg_score
        per_sequence_loss = (ipo_delta - 1 / (2 * beta)) ** 2
    else:
        logits = (pc - pr) - (rc - rr)
        per_sequence_loss = (-F.logsigmoid(beta * logits) * (1 - label_smoothing)
                             - F.logsigmoid(-beta * logits) * label_smoothing)
    chosen_rewards, rejected_rewards = beta * chosen_logratios, beta * rejected_logratios
    return {"loss": per_sequence_loss.mean(), "rewards/chosen": chosen_rewards.mean(),
            "rewards/rejected": rejected_rewards.mean(),
            "rewards/accuracies": (chosen_rewards > rejected_rewards).float().mean(),
            "rewards/margins": (chosen_rewards - rejected_rewards).mean(),
            "logps/chosen": pc.mean(), "logps/rejected": pr.mean()}


def hf_response_logps(model, ids, mask):
    """Sum of log p(token | prefix) over the response tokens, from transformers' logits."""
    with torch.no_grad():
        logits = model(input_ids=torch.as_tensor(ids)[None]).logits[0].float()
    logps = torch.log_softmax(logits[:-1], dim=-1).gather(
        1, torch.as_tensor(ids[1:])[:, None]).squeeze(1)
    return float((logps * torch.as_tensor(mask[1:]).float()).sum())


@pytest.fixture(scope="module")
def hf_logps(suite, dpo_data, tmp_path_factory):
    """(policy, reference) summed response log-probs of the oracle pairs, and response lengths,
    computed by transformers on the HF exports of learn_tp2's final weights and of the
    initialisation."""
    from transformers import Glm4MoeForCausalLM

    from glm_megatron.conversion.megatron_to_hf import convert_megatron_to_hf

    out = tmp_path_factory.mktemp("dpo_hf")
    val = TokenizedDataset(dpo_data[0]["val"])
    max_len = dpo_config(dpo_data[0], "", "")["training"]["max_seq_length"]
    pairs = [val[i] for i in range(ORACLE_PAIRS)]
    found = {}
    for name, load in (("policy", suite[0] / "learn_tp2"), ("reference", suite[0] / "init")):
        convert_megatron_to_hf(str(load), str(out / name), progress=False)
        model = Glm4MoeForCausalLM.from_pretrained(str(out / name), torch_dtype=torch.float32)
        model.eval()
        found[name] = {side: torch.tensor([
            hf_response_logps(model, p[f"{side}_input_ids"][:max_len].astype("int64"),
                              p[f"{side}_loss_mask"][:max_len]) for p in pairs])
            for side in ("chosen", "rejected")}
    lengths = {side: torch.tensor([float(p[f"{side}_loss_mask"][:max_len].sum()) for p in pairs])
               for side in ("chosen", "rejected")}
    return found, lengths


@pytest.mark.parametrize("name", list(ORACLES))
def test_step0_loss_equals_trl_on_transformers_logprobs(suite, hf_logps, name):
    out, results = suite
    t = results[name]["config"]["training"]
    found, lengths = hf_logps
    expected = trl_dpo(found["policy"]["chosen"], found["policy"]["rejected"],
                       found["reference"]["chosen"], found["reference"]["rejected"],
                       lengths["chosen"], lengths["rejected"], t["loss_type"], t["beta"],
                       t.get("label_smoothing", 0.0))
    assert {"pp2": "PP=2", "tp2": "TP=2", "ep2": "EP=2"}[ORACLES[name][0]] in results[name]["layout"]
    (step, loss), = results[name]["history"]
    row = json.loads((out / name / "train_log.jsonl").read_text().splitlines()[0])
    assert step == 1 and row["loss"] == pytest.approx(loss, abs=1e-7)
    # Measured: the loss within 3e-8, the summed log-probs within 4e-6 (fp32).
    assert loss == pytest.approx(float(expected["loss"]), rel=0, abs=1e-6), (name, expected)
    for metric in METRICS:
        assert row[metric] == pytest.approx(float(expected[metric]), rel=0, abs=5e-5), metric
    # Not a trivially equal pair of models: the trained policy already prefers chosen.
    assert 0.5 < float(expected["rewards/accuracies"]) and abs(float(expected["rewards/margins"])) > 0.1
    if t["loss_type"] != "ipo":
        assert loss < math.log(2.0) - 0.05


# -- crash recovery and bad input through the CLI ----------------------------------------------


def test_kill9_then_resume_equals_the_uninterrupted_run(suite, killed_run):
    """The CLI run killed with kill -9 after a checkpoint, resumed with ``checkpoint.resume:
    auto`` (what --resume auto sets): per-step losses of the same config never interrupted, to
    1e-6. Its reference is rebuilt from the starting weights (the seeded random init), not from
    the resumed ones."""
    out_dir, killed_at, saved = killed_run
    assert 3 <= killed_at < LEARN_STEPS, "the run finished before it could be killed"
    resumed_from = suite[1]["resumed"]["history"][0][0] - 1
    assert resumed_from == saved[-1] and resumed_from % 3 == 0
    resumed = read_train_log(str(out_dir))
    ref = dict(suite[1]["learn_ep2"]["history"])
    assert sorted(resumed) == sorted(ref) == list(range(1, LEARN_STEPS + 1))
    diff = max(abs(resumed[s] - ref[s]) for s in ref)
    assert diff <= 1e-6, (diff, resumed, ref)
    assert ref[LEARN_STEPS] < ref[1] - 0.2  # it trained


def test_a_bad_config_is_one_line_and_exit_2(dpo_data, tmp_path):
    cfg = dpo_config(dpo_data[0], str(tmp_path / "run"), str(tmp_path / "nowhere"),
                     training={"loss_type": "conservative"})  # label_smoothing left at 0
    cfg_file = write_config(cfg, str(tmp_path / "bad.yaml"))
    import subprocess
    import sys

    from helpers.launch import test_env

    proc = subprocess.run([sys.executable, "-m", "glm_megatron", "dpo", "--config", cfg_file],
                          cwd=REPO, env=test_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines == ["error: training.label_smoothing must be in (0, 0.5) for loss_type "
                     "conservative (the probability that a preference label is flipped), got 0.0"]
