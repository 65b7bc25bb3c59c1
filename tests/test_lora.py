"""LoRA adapters on our Megatron GLM equal peft's on HF transformers, at every layout.

The oracle is peft: a random adapter (A and B both non-zero) saved by peft for a tiny HF model;
our model loads the same base and adapter files and must give peft's loss and adapter gradients
(fp32) at TP1, TP2 with and without SP, PP2 and, for MoE, EP2. One torchrun launch per family
(tests/workers/lora_worker.py).
"""

import json

import pytest

from glm_megatron.models import ConfigError, get_preset
from glm_megatron.models.lora import LoraSettings, resolve_targets, valid_targets
from helpers.launch import torchrun
from helpers.tiny_hf import (
    make_random_peft_adapter,
    make_tiny_dense_hf_checkpoint,
    make_tiny_hf_checkpoint,
)

CASES = {
    # GLM-4-0414 (sandwich norms), every linear, plain LoRA scaling.
    "glm4": dict(layouts="tp1,tp2sp,tp2,pp2", targets=["q_proj", "k_proj", "v_proj", "o_proj",
                                                         "gate_up_proj", "down_proj"], rslora=False),
    # GLM-4.x MoE: attention adapters, rsLoRA scaling, expert parallelism.
    "glm4_moe": dict(layouts="tp1,tp2sp,ep2", targets=["q_proj", "k_proj", "v_proj", "o_proj"],
                     rslora=True),
}
LOSS_TOL = 1e-5
GRAD_REL_TOL = 1e-4


@pytest.fixture(scope="module", params=list(CASES))
def lora_run(request, tmp_path_factory):
    family, case = request.param, CASES[request.param]
    root = tmp_path_factory.mktemp(f"lora_{family}")
    if family == "glm4_moe":
        hf = make_tiny_hf_checkpoint(str(root / "hf"), seed=2, with_mtp=False)
    else:
        hf = make_tiny_dense_hf_checkpoint(str(root / "hf"), family, seed=2)
    adapter = make_random_peft_adapter(hf, str(root / "adapter"), case["targets"],
                                       use_rslora=case["rslora"])
    out = root / "result.json"
    torchrun("tests/workers/lora_worker.py", "--hf-dir", hf, "--adapter-dir", adapter,
             "--out", str(out), "--layouts", case["layouts"])
    return family, json.loads(out.read_text())


def test_loss_and_adapter_gradients_equal_peft(lora_run):
    family, result = lora_run
    for layout, ranks in result["layouts"].items():
        with_loss = [r for r in ranks if "loss" in r]
        assert with_loss, f"{family} {layout}: no rank reported a loss"
        for r in with_loss:
            assert abs(r["loss"] - result["peft_loss"]) < LOSS_TOL, (layout, r)
        for r in ranks:
            assert r["grads_checked"] > 0, (layout, r)
            assert r["grad_max_rel_err"] < GRAD_REL_TOL, (layout, r)


def test_only_adapters_train_and_every_adapter_tensor_is_used(lora_run):
    family, result = lora_run
    for layout, ranks in result["layouts"].items():
        for r in ranks:
            assert r["non_adapter_trainable"] == [], (layout, r)
            assert r["tensors_used_anywhere"] == result["peft_tensors"], (layout, r)
    # Tensor parallelism splits the adapters: each TP rank holds less than the whole.
    assert result["layouts"]["tp2sp"][0]["adapter_params"] < \
        result["layouts"]["tp1"][0]["adapter_params"]


def test_targets_are_checked_against_the_model():
    dense, moe = get_preset("glm4-9b-tiny"), get_preset("glm4-moe-tiny")
    assert resolve_targets(dense, ["v_proj", "q_proj"]) == ("q_proj", "v_proj")
    assert resolve_targets(dense, "all-linear") == valid_targets(dense)
    assert "gate_up_proj" in valid_targets(dense) and "gate_up_proj" not in valid_targets(moe)
    with pytest.raises(ConfigError) as err:
        resolve_targets(dense, ["q_proj", "gate_proj"])
    assert "model.lora_target_modules: gate_proj is not a linear module of a glm model; valid: " \
           "q_proj, k_proj, v_proj, o_proj, gate_up_proj, down_proj or all-linear" in str(err.value)
    with pytest.raises(ConfigError, match="down_proj is not a linear module of a glm4_moe"):
        resolve_targets(moe, ["down_proj"])


def test_scaling():
    assert LoraSettings(r=8, alpha=32).scale == 4.0
    assert LoraSettings(r=16, alpha=32, rslora=True).scale == 8.0


def test_config_keys_are_checked_naming_the_key(tmp_path):
    from glm_megatron.engine.config import ModelSection, TrainConfigError, load_config
    from glm_megatron.engine.model_setup import lora_settings

    dense = get_preset("glm4-9b-tiny")
    m = ModelSection(use_peft=True, lora_r=8, lora_alpha=32, lora_target_modules=["q_proj"])
    assert lora_settings(m, dense) == LoraSettings(r=8, alpha=32.0, targets=("q_proj",))
    assert lora_settings(ModelSection(), dense) is None
    with pytest.raises(TrainConfigError, match="model.lora_target_modules: gate_proj is not"):
        lora_settings(ModelSection(use_peft=True, lora_target_modules=["gate_proj"]), dense)
    with pytest.raises(TrainConfigError, match="adapter_config.json: no such file"):
        lora_settings(ModelSection(use_peft=True, lora_adapter=str(tmp_path)), dense)
    for override, message in [
        ("model.lora_r=0", "model.lora_r must be >= 1"),
        ("model.lora_dropout=1.0", r"model.lora_dropout must be in \[0, 1\)"),
        ("model.lora_target_modules=[1]",
         "model.lora_target_modules: expected a list of str or str or null, got list"),
        ("model.lora_adapter=x", "model.lora_adapter needs model.use_peft: true"),
    ]:
        extra = [] if "lora_adapter" in override else ["model.use_peft=true"]
        with pytest.raises(TrainConfigError, match=message):
            load_config(None, ["model.preset=glm4-9b-tiny", *extra, override])


def test_ppo_with_lora_has_no_separate_reference():
    from glm_megatron.algorithms.ppo.config import PPOConfig
    from glm_megatron.engine.config import TrainConfigError, load_config

    with pytest.raises(TrainConfigError, match="rlhf.reference_model: with rlhf.use_peft"):
        load_config(None, ["rlhf.use_peft=true", "rlhf.reference_model=/x",
                           "rlhf.policy_model=/p", "rlhf.reward_model=/r",
                           "data.prompt_data_path=/d"], schema=PPOConfig)
