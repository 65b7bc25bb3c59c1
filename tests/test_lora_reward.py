"""A LoRA reward model on a dense GLM-4 through the command line (TP=2 + SP, 2 gloo ranks).

Adapters on every linear plus the trainable score head: held-out pair accuracy rises; the
checkpoint holds the adapters and the head only, and names its base; what cannot use such a
checkpoint yet (the HF export, PPO's reward model) refuses it by name.
"""

import json

import pytest
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
    return out, log


def test_pair_accuracy_rises_with_adapters_and_head_only(run):
    out, log = run
    accuracy = [float(line.split("eval_accuracy ")[1].split()[0]) for line in log.splitlines()
                if line.startswith("eval @ step")]
    assert len(accuracy) == 2 and accuracy[-1] > max(0.8, accuracy[0] + 0.2), accuracy
    from glm_megatron.conversion.dist_reader import TorchDistReader

    model = out / "iter_0000030" / "model"
    keys = sorted(TorchDistReader(str(model)).tensors)
    assert "output_layer.weight" in keys  # the reward head trains and is saved
    assert all("_lora.adapters." in k or k == "output_layer.weight" for k in keys), keys[:5]
    assert json.loads((model / "adapter_base.json").read_text())["model_type"] == "glm4"


def test_exporting_a_lora_reward_model_is_refused_by_name(run, tmp_path):
    out, _ = run
    proc = run_tool("tools/convert_checkpoint.py", "reward-to-hf", "--load", str(out),
                    "--output-dir", str(tmp_path / "x"))
    assert proc.returncode == 2 and "is a LoRA reward model" in proc.stderr, proc.stderr
