"""A LoRA reward model on a dense GLM-4 through the command line (TP=2 + SP, 2 gloo ranks).

Adapters on every linear plus the trainable score head: held-out pair accuracy rises; the
checkpoint holds the adapters and the head only, and names its base; evaluate-rm
loads it as its base with the adapters folded in and reproduces the run's reward statistics;
reward-to-hf merges the adapters into the base and transformers scores pairs as Megatron did.
"""

import json

import pytest
import torch
from workers.rm_common import build_rm_data, rm_config
from workers.train_common import run_glm, write_config

from helpers.launch import run_tool
from helpers.tiny_hf import make_tiny_dense_hf_checkpoint


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora_rm")
    data = build_rm_data(str(root / "data"))
    base = make_tiny_dense_hf_checkpoint(str(root / "base"), "glm4", seed=6,
                                         vocab_size=data["vocab_size"], pad_token_id=0)
    out = root / "run"
    cfg = rm_config(data, str(out),
                    training={"max_steps": 30, "learning_rate": 5e-3, "min_learning_rate": 5e-4},
                    checkpoint={"save_strategy": "steps", "save_steps": 30},
                    evaluation={"eval_strategy": "steps", "eval_steps": 30, "eval_at_start": True})
    cfg["model"] = {"hf_checkpoint": base, "use_peft": True, "lora_r": 8, "lora_alpha": 16,
                    "lora_target_modules": "all-linear"}
    cfg["parallel"] = {"tensor_model_parallel_size": 2, "sequence_parallel": True}
    _, log = run_glm("rm", "--config", write_config(cfg, str(root / "rm.yaml")))
    return out, log, data


@pytest.fixture(scope="module")
def evaluated(run, tmp_path_factory):
    """evaluate-rm of the LoRA run on the validation split, at TP2: every adapter is folded into
    its base linear's shard (q/k/v inside the fused QKV rows, gate/up inside fc1, o/down by
    input columns)."""
    out, _, data = run
    result = tmp_path_factory.mktemp("lora_rm_eval") / "eval.json"
    _, log = run_glm("evaluate-rm", "--load", str(out), "--test-data", data["val"],
                     "--output-file", str(result), "--tp", "2")
    return json.loads(result.read_text()), log


def test_pair_accuracy_rises_with_adapters_and_head_only(run):
    out, log, _ = run
    accuracy = [float(line.split("eval_accuracy ")[1].split()[0]) for line in log.splitlines()
                if line.startswith("eval @ step")]
    assert len(accuracy) == 2 and accuracy[-1] > max(0.8, accuracy[0] + 0.2), accuracy
    from glm_megatron.conversion.dist_reader import TorchDistReader

    model = out / "iter_0000030" / "model"
    keys = sorted(TorchDistReader(str(model)).tensors)
    assert "output_layer.weight" in keys  # the reward head trains and is saved
    assert all("_lora.adapters." in k or k == "output_layer.weight" for k in keys), keys[:5]
    assert json.loads((model / "adapter_base.json").read_text())["model_type"] == "glm4"


def test_evaluate_rm_folds_the_adapters_and_reproduces_the_saved_statistics(run, evaluated):
    out, log, _ = run
    result, eval_log = evaluated
    saved = json.loads((out / "iter_0000030" / "reward_model.json").read_text())["normalization"]
    assert result["layout"].startswith("TP=2 PP=1")
    # The same model, the adapters folded into the base instead of run beside it.
    assert result["test_reward_stats"]["mean"] == pytest.approx(saved["mean"], abs=1e-4)
    assert result["test_reward_stats"]["std"] == pytest.approx(saved["std"], abs=1e-4)
    final = [float(line.split("eval_accuracy ")[1].split()[0]) for line in log.splitlines()
             if line.startswith("eval @ step")][-1]
    assert result["accuracy"] == pytest.approx(final, abs=1e-4)  # logged to 4 places


def test_reward_to_hf_merges_the_adapters_and_scores_as_megatron(run, evaluated, tmp_path):
    """The merged export, run by transformers' Glm4ForSequenceClassification, gives
    evaluate-rm's per-pair rewards (transformers is the oracle)."""
    from transformers import Glm4ForSequenceClassification

    from glm_megatron.data.dataset import TokenizedDataset

    out, _, data = run
    proc = run_tool("tools/convert_checkpoint.py", "reward-to-hf", "--load", str(out),
                    "--output-dir", str(tmp_path / "hf_rm"))
    assert proc.returncode == 0, proc.stderr
    config = json.loads((tmp_path / "hf_rm" / "config.json").read_text())
    assert config["architectures"] == ["Glm4ForSequenceClassification"]
    hf, info = Glm4ForSequenceClassification.from_pretrained(
        str(tmp_path / "hf_rm"), dtype=torch.float32, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    hf.eval()
    val, expected = TokenizedDataset(data["val"]), evaluated[0]["pair_rewards"]
    for i in range(4):
        for side, col in (("chosen", 0), ("rejected", 1)):
            ids = torch.as_tensor(val[i][f"{side}_input_ids"].astype("int64"))[None]
            with torch.no_grad():
                reward = float(hf(input_ids=ids).logits[0, 0])
            assert reward == pytest.approx(expected[i][col], abs=2e-3), (i, side)
