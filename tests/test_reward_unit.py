"""Reward model pieces without a process group: the ranking loss, last-token indices, padding,
calibration, the config schema and bad preference data."""

import json
import math
import os

import numpy as np
import pytest
import torch

from glm_megatron.algorithms.rm.calibration import calibration_table, plot_calibration
from glm_megatron.algorithms.rm.config import RMConfig
from glm_megatron.algorithms.rm.loss import pair_loss, ranking_loss
from glm_megatron.data.encoding import EncodeOptions
from glm_megatron.data.errors import DataValidationError
from glm_megatron.engine.config import TrainConfigError, load_config
from glm_megatron.engine.preference_batches import build_inputs
from glm_megatron.models.reward_head import last_token_index, read_scores


def _sigmoid(x):
    return 1.0 / (1.0 + math.exp(-x))


def test_ranking_loss_with_margin_equals_hand_computed_value():
    # Two pairs in a [4, T, 1] score tensor (chosen rows 0-1, rejected rows 2-3), read at their
    # last real tokens; the second pair is masked out (eval filler) and must count for nothing.
    scores = torch.zeros(4, 5, 1)
    values = {(0, 2): 1.5, (1, 4): -0.25, (2, 3): 0.5, (3, 1): 0.75}
    for (row, pos), v in values.items():
        scores[row, pos, 0] = v
    scores[0, 4, 0] = 9.0  # padding after the last token: must not be read
    last = torch.tensor([2, 4, 3, 1])
    total, count, report = pair_loss(last, torch.tensor([0.5, 0.5]), torch.tensor([1.0, 1.0]), scores)
    # pair 0: -log sigmoid(1.5 - 0.5 - 0.5); pair 1: -log sigmoid(-0.25 - 0.75 - 0.5)
    expected = -math.log(_sigmoid(0.5)) - math.log(_sigmoid(-1.5))
    assert float(total) == pytest.approx(expected, rel=1e-6)
    assert int(count) == 2
    assert report["rm accuracy"].tolist() == [1.0, 2.0]
    masked, count, _ = pair_loss(last, torch.tensor([0.5, 0.5]), torch.tensor([1.0, 0.0]), scores)
    assert float(masked) == pytest.approx(-math.log(_sigmoid(0.5)), rel=1e-6) and int(count) == 1
    # Per-pair margins (from the data) replace the scalar.
    per_pair, _, _ = pair_loss(last, torch.tensor([0.0, 2.0]), torch.tensor([1.0, 1.0]), scores)
    assert float(per_pair) == pytest.approx(-math.log(_sigmoid(1.0)) - math.log(_sigmoid(-3.0)),
                                            rel=1e-6)


def test_ranking_loss_is_stable_for_large_differences():
    loss = ranking_loss(torch.tensor([100.0, -100.0]), torch.tensor([0.0, 0.0]), 0.0)
    assert torch.isfinite(loss).all()
    assert loss[0] < 1e-30 and float(loss[1]) == pytest.approx(100.0)


def test_last_token_index_right_left_and_unpadded():
    mask = torch.tensor([[1, 1, 1, 0, 0], [0, 0, 1, 1, 1], [1, 1, 1, 1, 1]], dtype=torch.bool)
    assert last_token_index(mask).tolist() == [2, 4, 4]
    with pytest.raises(ValueError, match="no real token"):
        last_token_index(torch.zeros(1, 3, dtype=torch.bool))
    scores = torch.arange(15.0).view(3, 5, 1)
    assert read_scores(scores, last_token_index(mask)).tolist() == [2.0, 9.0, 14.0]


def test_build_inputs_left_padding_positions_and_mask():
    b = build_inputs([[5, 6], [7, 8, 9]], 4, pad_id=0, padding_side="left")
    assert b["tokens"].tolist() == [[0, 0, 5, 6], [0, 7, 8, 9]]
    assert b["position_ids"].tolist() == [[0, 0, 0, 1], [0, 0, 1, 2]]
    assert b["last_index"].tolist() == [3, 3]
    allowed = ~b["attn_mask"][:, 0]
    # The last real token sees exactly the real tokens of its row.
    assert allowed[0, 3].tolist() == [False, False, True, True]
    assert allowed[1, 3].tolist() == [False, True, True, True]
    r = build_inputs([[5, 6], [7, 8, 9]], 4, pad_id=0)
    assert r["attn_mask"] is None and r["last_index"].tolist() == [1, 2]
    with pytest.raises(ValueError, match="expected 1..4"):
        build_inputs([[1] * 5], 4, pad_id=0)


def test_calibration_table_and_ece_by_hand(tmp_path):
    # Differences 2, 2, -2, 0.1: confidences s(2)=0.881 (x3, two right), s(0.1)=0.525 (right).
    chosen, rejected = np.array([2.0, 2.0, 0.0, 0.1]), np.array([0.0, 0.0, 2.0, 0.0])
    t = calibration_table(chosen, rejected, num_bins=5)
    counts = [b["count"] for b in t["bins"]]
    assert counts == [1, 0, 0, 3, 0]
    c = _sigmoid(2.0)
    assert t["bins"][3]["accuracy"] == pytest.approx(2 / 3)
    expected = 0.25 * abs(1.0 - _sigmoid(0.1)) + 0.75 * abs(2 / 3 - c)
    assert t["expected_calibration_error"] == pytest.approx(expected)
    path = plot_calibration(t, str(tmp_path / "c.png"))
    assert os.path.getsize(path) > 5000 and open(path, "rb").read(4) == b"\x89PNG"


BASE = ["checkpoint.save_strategy=epoch"]


def _write_cfg(tmp_path, text):
    p = tmp_path / "rm.yaml"
    p.write_text(text)
    return str(p)


def test_config_keys_of_the_seed_and_errors(tmp_path):
    cfg = load_config(_write_cfg(tmp_path, "model: {preset: glm4-moe-tiny, freeze_encoder_layers: 2}\n"
                                 "training: {loss_type: ranking, margin: 0.5}\n"
                                 "checkpoint: {save_steps: 500}\n"), schema=RMConfig)
    assert cfg.training.margin == 0.5 and cfg.evaluation.metric_for_best_model == "eval_accuracy"
    with pytest.raises(TrainConfigError, match="training.loss_type: 'causal_lm' is not one of"):
        load_config(None, [*BASE, "training.loss_type=causal_lm"], schema=RMConfig)
    with pytest.raises(TrainConfigError, match="training.packing"):
        load_config(None, [*BASE, "training.packing=true"], schema=RMConfig)
    with pytest.raises(TrainConfigError, match="training.margin: expected float"):
        load_config(None, [*BASE, "training.margin=big"], schema=RMConfig)


def test_prepare_rm_rejects_sft_data_and_too_many_frozen_layers(tmp_path):
    from glm_megatron.algorithms.rm.train import prepare_rm
    from glm_megatron.data.dataset import DatasetWriter

    sft = str(tmp_path / "sft")
    w = DatasetWriter(sft, "sft", 512)
    w.add({"input_ids": np.array([1, 2, 3]), "loss_mask": np.array([0, 1, 1], dtype=np.uint8)}, 0, 1)
    w.close({})
    cfg = load_config(None, [*BASE, "model.preset=glm4-moe-tiny", f"data.train_data_path={sft}"],
                      schema=RMConfig)
    with pytest.raises(TrainConfigError, match="data.train_data_path: .* holds 'sft' rows"):
        prepare_rm(cfg, 1)
    cfg = load_config(None, [*BASE, "model.preset=glm4-moe-tiny", f"data.train_data_path={sft}",
                             "model.freeze_encoder_layers=9"], schema=RMConfig)
    with pytest.raises(TrainConfigError, match="model.freeze_encoder_layers: 9 > the model's 4"):
        prepare_rm(cfg, 1)


def test_prepare_names_the_layout_the_batch_and_the_eval_data(tmp_path):
    """The checks SFT and RM share (glm_megatron/engine/prepare.py), through prepare_sft."""
    from glm_megatron.algorithms.sft.train import prepare_sft
    from glm_megatron.data.dataset import DatasetWriter

    sft = str(tmp_path / "sft")
    w = DatasetWriter(sft, "sft", 512)
    for _ in range(3):
        w.add({"input_ids": np.array([1, 2, 3]), "loss_mask": np.array([0, 1, 1], dtype=np.uint8)}, 0, 1)
    w.close({})
    base = [*BASE, "model.preset=glm4-moe-tiny", f"data.train_data_path={sft}"]
    prep = prepare_sft(load_config(None, [*base, "training.num_epochs=2"]), 1)
    assert (prep.total_steps, prep.plan.global_batch_size, prep.resume_from) == (6, 1, None)
    with pytest.raises(TrainConfigError, match="parallel: invalid parallel layout TP=2"):
        prepare_sft(load_config(None, [*base, "parallel.tensor_model_parallel_size=2"]), 1)
    with pytest.raises(TrainConfigError, match="3 training rows is less than one global batch [(]4[)]"):
        prepare_sft(load_config(None, [*base, "training.gradient_accumulation_steps=4"]), 1)
    with pytest.raises(TrainConfigError, match="eval_at_start needs validation data"):
        prepare_sft(load_config(None, [*base, "evaluation.eval_at_start=true"]), 1)


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    from glm_megatron.data.tokenizer_training import train_sentencepiece

    out = tmp_path_factory.mktemp("rm_tok")
    texts = [f"Describe the lamp {i}. bright kind dull rude warm cold" for i in range(50)]
    train_sentencepiece(texts, str(out / "tok"), 400)
    return str(out / "tok")


@pytest.mark.parametrize("record,message", [
    ({"prompt": "Hi?", "chosen": "same", "rejected": "same"}, "chosen and rejected are identical"),
    ({"prompt": "Hi?", "chosen": "yes"}, "missing field 'rejected'"),
])
def test_bad_preference_data_gets_the_pipelines_errors(tmp_path, tokenizer_dir, record, message):
    from glm_megatron.algorithms.rm.evaluate import load_test_pairs

    bad = tmp_path / "bad.jsonl"
    good = {"prompt": "Describe the lamp.", "chosen": "bright kind", "rejected": "dull rude"}
    bad.write_text(json.dumps(good) + "\n" + json.dumps(record) + "\n")
    with pytest.raises(DataValidationError, match=f"{bad}:2: {message}"):
        load_test_pairs(str(bad), tokenizer_dir, 512)
    from glm_megatron.data.tokenizer import load_tokenizer
    from glm_megatron.data.tokenizing import tokenize_files

    with pytest.raises(DataValidationError, match=f"{bad}:2: {message}"):
        tokenize_files([str(bad)], str(tmp_path / "tok_out"), load_tokenizer(tokenizer_dir),
                       "preference", EncodeOptions())


def test_cli_bad_input_exits_2_with_error_line(tmp_path):
    import subprocess
    import sys

    from helpers.launch import REPO, test_env

    cfg = _write_cfg(tmp_path, "model: {preset: glm4-moe-tiny}\ntraining: {margn: 0.5}\n")
    proc = subprocess.run([sys.executable, "-m", "glm_megatron", "rm", "--config", cfg],
                          cwd=REPO, env=test_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "error: unknown key training.margn" in proc.stderr
    proc = subprocess.run([sys.executable, "-m", "glm_megatron", "evaluate-rm", "--load",
                           str(tmp_path / "nope"), "--test-data", "x", "--output-file", "o.json"],
                          cwd=REPO, env=test_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "error: --load: " in proc.stderr and "no such" in proc.stderr


def test_per_pair_margin_from_the_data_reaches_the_loss(tmp_path, tokenizer_dir):
    """A record's ``margin`` is stored per pair and used; records without one get the config's."""
    from glm_megatron.data.dataset import TokenizedDataset
    from glm_megatron.data.tokenizer import load_tokenizer
    from glm_megatron.data.tokenizing import tokenize_files
    from glm_megatron.engine.preference_batches import PreferenceBatcher

    src = tmp_path / "prefs.jsonl"
    records = [
        {"prompt": "Describe the lamp.", "chosen": "bright kind", "rejected": "dull rude",
         "margin": 2.5},
        {"prompt": "Describe the lamp.", "chosen": "warm", "rejected": "cold"},
        {"prompt": "Describe the lamp.", "responses": ["bright", "warm", "dull"], "margin": 1},
    ]
    src.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    tokenize_files([str(src)], str(tmp_path / "tok"), load_tokenizer(tokenizer_dir),
                   "preference", EncodeOptions())
    data = TokenizedDataset(str(tmp_path / "tok" / "train"))
    batch = PreferenceBatcher(data, 0, 1, 0.5, "cpu").microbatch(np.arange(len(data)), 32)
    assert batch["margin"].tolist() == [2.5, 0.5, 1.0, 1.0, 1.0]  # 3 ranked responses: 3 pairs


@pytest.mark.parametrize("margin", [-1, "big", True])
def test_bad_margin_is_a_clear_error(tmp_path, tokenizer_dir, margin):
    from glm_megatron.data.tokenizer import load_tokenizer
    from glm_megatron.data.tokenizing import tokenize_files

    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "Hi?", "chosen": "a", "rejected": "b",
                               "margin": margin}) + "\n")
    with pytest.raises(DataValidationError, match=f"{bad}:1: field 'margin' must be a "
                                                  "non-negative number"):
        tokenize_files([str(bad)], str(tmp_path / "tok_out"), load_tokenizer(tokenizer_dir),
                       "preference", EncodeOptions())
