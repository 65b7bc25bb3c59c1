"""SFT end to end on 2 gloo ranks: learning, layout equivalence, retention, evaluate-sft.

One torchrun launch runs every training scenario (tests/workers/train_suite.py); the tiny
model learns the digit tasks of examples/tiny_sft/make_data.py.
"""

import json

import pytest
from workers.train_common import build_tiny_data, run_glm

from helpers.launch import torchrun

LAYOUTS = ["tp1", "tp2", "ep2", "pp2"]


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny_sft_data")
    info = build_tiny_data(str(out))
    (out / "data.json").write_text(json.dumps(info))
    return out


@pytest.fixture(scope="module")
def suite(tiny_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("sft_suite")
    runs = ["learn_tp1", "learn_tp2", *[f"equal_{x}" for x in LAYOUTS], "retention"]
    torchrun("tests/workers/train_suite.py", "--data", str(tiny_data / "data.json"),
             "--out", str(out), "--runs", ",".join(runs))
    return out, json.loads((out / "results.json").read_text())


@pytest.mark.parametrize("layout,expected", [("tp1", "TP=1 PP=1"), ("tp2", "TP=2 PP=1")])
def test_eval_loss_falls_on_held_out_data(suite, layout, expected):
    run = suite[1][f"learn_{layout}"]
    assert run["layout"].startswith(expected)
    (s0, first), (s1, last) = run["eval"][0], run["eval"][-1]
    assert (s0, s1) == (0, 40)
    assert first["eval_tokens"] == last["eval_tokens"] > 0
    # From ~ln(vocab) to well below: the model learned the template and most of the task.
    assert first["eval_loss"] > 5.0
    assert last["eval_loss"] < 0.4 * first["eval_loss"], (first, last)
    assert last["eval_perplexity"] < 5.0


@pytest.mark.parametrize("layout", ["tp2", "ep2", "pp2"])
def test_parallel_layouts_give_the_tp1_losses(suite, layout):
    ref = [loss for _, loss in suite[1]["equal_tp1"]["history"]]
    got = [loss for _, loss in suite[1][f"equal_{layout}"]["history"]]
    assert len(ref) == len(got) == 4
    assert ref[-1] < ref[0] - 0.5  # the steps really trained
    assert max(abs(a - b) for a, b in zip(ref, got)) < 1e-4, (ref, got)


def test_save_total_limit_keeps_the_newest_and_the_best(suite):
    out, results = suite
    run_dir = out / "retention"
    iters = sorted(p.name for p in run_dir.glob("iter_*"))
    assert iters == ["iter_0000006", "iter_0000008"]
    assert all((run_dir / i / "COMPLETE").is_file() for i in iters)
    assert (run_dir / "latest").read_text().strip() == "iter_0000008"
    evals = {step: m["eval_loss"] for step, m in results["retention"]["eval"]}
    best_step = min(evals, key=evals.get)
    assert (run_dir / "best").read_text().strip() == f"iter_{best_step:07d}"
    state = json.loads((run_dir / "iter_0000008" / "trainer_state.json").read_text())
    assert state["step"] == 8 and state["best_metric"] == pytest.approx(evals[best_step])
    for part in ("model/metadata.json", "optimizer/metadata.json", "model_config.json",
                 "rng/rank_00000.safetensors", "rng/rank_00001.safetensors"):
        assert (run_dir / "iter_0000008" / part).is_file(), part


def test_evaluate_sft_on_a_checkpoint_at_another_layout(suite, tiny_data, tmp_path):
    out, _ = suite
    info = json.loads((tiny_data / "data.json").read_text())
    result_file = tmp_path / "eval.json"
    # Trained at TP=2 (+SP); evaluated at EP=2 from the run directory (latest checkpoint).
    _, log = run_glm("evaluate-sft", "--load", str(out / "learn_tp2"),
                   "--test-data", info["test"], "--tokenizer-path", info["tokenizer"],
                   "--output-file", str(result_file),
                   "--ep", "2", "--num-generations", "2", "--max-new-tokens", "16")
    result = json.loads(result_file.read_text())
    assert "evaluate-sft: eval_loss" in log
    assert result["layout"].startswith("TP=1 PP=1 CP=1 EP=2")
    assert result["eval_tokens"] > 0 and result["eval_samples"] == 8
    assert result["eval_loss"] < 2.5
    assert result["eval_perplexity"] == pytest.approx(2.718281828 ** result["eval_loss"], rel=1e-6)
    assert len(result["generations"]) == 2
    assert all(g["reference"] for g in result["generations"])
