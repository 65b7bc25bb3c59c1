"""LoRA adapters on our Megatron GLM equal peft's on HF transformers, at every layout.

The oracle is peft: a random adapter (A and B both non-zero, modules to save changed too) saved
by peft for a tiny HF model; our model reads the same base and adapter files and must give peft's
loss and adapter (and saved-module) gradients (fp32) at TP1, TP2 with and without SP, PP2 and,
for MoE, EP2 and TP2 folded with EP2 (expert TP 1). The MoE adapter covers attention, the routed
experts (peft's fused layout), the shared expert and the dense layer; a second MoE adapter in the
transformers-4 per-expert layout must give what peft makes of it. The MoE checkpoint saved at
TP2+EP2 loads at TP1, and its PEFT export loads in peft with the merged export's logits. One
torchrun launch per family (tests/workers/lora_worker.py).
"""

import json

import pytest
import torch

from glm_megatron.models import ConfigError, get_preset
from glm_megatron.models.lora import LoraSettings, resolve_targets, valid_targets
from helpers.launch import torchrun
from helpers.tiny_hf import (
    make_random_peft_adapter,
    make_random_v4_expert_adapter,
    make_tiny_dense_hf_checkpoint,
    make_tiny_hf_checkpoint,
)

MOE_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# peft cannot target these by module name on transformers 5 (its conversion maps gate_proj /
# up_proj / down_proj to the routed experts): it adapts them as parameters, as our export does.
MOE_PARAMETERS = ["shared_experts.gate_proj.weight", "shared_experts.up_proj.weight",
                  "shared_experts.down_proj.weight", "mlp.gate_proj.weight", "mlp.up_proj.weight",
                  "mlp.down_proj.weight"]
CASES = {
    # GLM-4-0414 (sandwich norms), every linear, plain LoRA scaling; lm_head and every norm
    # (peft's suffix rule) trained fully.
    "glm4": dict(layouts="tp1,tp2sp,tp2,pp2", targets=["q_proj", "k_proj", "v_proj", "o_proj",
                                                         "gate_up_proj", "down_proj"], rslora=False,
                 modules_to_save=["lm_head", "norm"]),
    # GLM-4.x MoE: every linear, rsLoRA scaling, expert parallelism; the embedding trained fully.
    "glm4_moe": dict(layouts="tp1,tp2sp,ep2,tp2ep2,tp1@v4", targets=MOE_MODULES,
                     target_parameters=MOE_PARAMETERS, rslora=True,
                     modules_to_save=["embed_tokens"], save_at="tp2ep2", reload_at="tp1"),
}
LOSS_TOL = 1e-5
GRAD_REL_TOL = 1e-4


def run_case(family: str, root) -> tuple[dict, object]:
    case = CASES[family]
    if family == "glm4_moe":
        hf = make_tiny_hf_checkpoint(str(root / "hf"), seed=2, with_mtp=False)
    else:
        hf = make_tiny_dense_hf_checkpoint(str(root / "hf"), family, seed=2)
    adapter = make_random_peft_adapter(hf, str(root / "adapter"), case["targets"],
                                       use_rslora=case["rslora"],
                                       target_parameters=case.get("target_parameters"),
                                       modules_to_save=case["modules_to_save"])
    out = root / "result.json"
    extra = []
    if family == "glm4_moe":
        v4 = make_random_v4_expert_adapter(hf, str(root / "adapter_v4"), seed=3, use_rslora=True)
        extra = ["--v4-adapter-dir", v4, "--save-at", case["save_at"], "--reload-at",
                 case["reload_at"], "--ckpt", str(root / "ckpt")]
    torchrun("tests/workers/lora_worker.py", "--hf-dir", hf, "--adapter-dir", adapter,
             "--out", str(out), "--layouts", case["layouts"], *extra)
    return json.loads(out.read_text()), root


@pytest.fixture(scope="module")
def lora_runs(tmp_path_factory):
    """family -> (worker result, its directory); each family's launch runs once, when needed."""
    done = {}

    def get(family):
        if family not in done:
            done[family] = run_case(family, tmp_path_factory.mktemp(f"lora_{family}"))
        return done[family]

    return get


@pytest.fixture(params=list(CASES))
def lora_run(request, lora_runs):
    result, root = lora_runs(request.param)
    return request.param, result, root


@pytest.fixture
def moe_run(lora_runs):
    return lora_runs("glm4_moe")


def test_loss_and_adapter_gradients_equal_peft(lora_run):
    family, result, _ = lora_run
    for layout, ranks in result["layouts"].items():
        with_loss = [r for r in ranks if "loss" in r]
        assert with_loss, f"{family} {layout}: no rank reported a loss"
        for r in with_loss:
            assert abs(r["loss"] - r["expected_loss"]) < LOSS_TOL, (layout, r)
        for r in ranks:
            assert r["grads_checked"] > 0, (layout, r)
            assert r["grad_max_rel_err"] < GRAD_REL_TOL, (layout, r)
            if "@v4" not in layout:  # the modules to save train on every rank that holds them
                assert sum(q["saved_grads_checked"] for q in ranks) > 0, (layout, ranks)
                assert r["saved_grad_max_rel_err"] < GRAD_REL_TOL, (layout, r)
    # The v4 adapter is another adapter: its loss is not the main one's.
    if family == "glm4_moe":
        main, v4 = result["layouts"]["tp1"][0], result["layouts"]["tp1@v4"][0]
        assert abs(main["expected_loss"] - v4["expected_loss"]) > 1e-3


def test_only_adapters_and_saved_modules_train_and_every_tensor_is_used(lora_run):
    family, result, _ = lora_run
    for layout, ranks in result["layouts"].items():
        for r in ranks:
            assert r["non_adapter_trainable"] == [], (layout, r)
            assert r["tensors_used_anywhere"] == r["tensors_expected"], (layout, r)
    # Tensor parallelism splits the adapters: each TP rank holds less than the whole.
    assert result["layouts"]["tp2sp"][0]["adapter_params"] < \
        result["layouts"]["tp1"][0]["adapter_params"]
    assert result["modules_to_save"] == CASES[family]["modules_to_save"]
    if family == "glm4_moe":
        # The file's targets (peft's fused experts + parameter targets) read back as every
        # linear; each EP rank holds half of the experts.
        assert tuple(result["targets"]) == valid_targets(get_preset("glm4-moe-tiny"))
        ep = result["layouts"]["ep2"]
        assert ep[0]["adapter_params"] == ep[1]["adapter_params"] < \
            result["layouts"]["tp1"][0]["adapter_params"]


def test_expert_checkpoint_saved_at_tp2_ep2_loads_at_tp1(moe_run):
    result, _ = moe_run
    for r in result["reload"]:
        assert r["before_load_err"] > 0.5 and r["saved_before_load_err"] > 1e-3, r  # fresh ones
        assert r["checked"] > 0 and r["max_err"] < 1e-6, r  # differ, until the checkpoint loads
        assert r["saved_checked"] > 0 and r["saved_max_err"] < 1e-6, r


def test_peft_export_of_the_moe_checkpoint_equals_the_adapter_and_the_merged_export(moe_run):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from glm_megatron.conversion.megatron_to_hf import convert_megatron_to_hf

    _, root = moe_run
    hf, ckpt = str(root / "hf"), str(root / "ckpt")
    adapter, merged = root / "export_adapter", root / "export_merged"
    convert_megatron_to_hf(ckpt, str(adapter), hf_config_dir=hf, adapter_only=True, progress=False)
    convert_megatron_to_hf(ckpt, str(merged), hf_config_dir=hf, progress=False)
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["target_modules"] == ["q_proj", "k_proj", "v_proj", "o_proj"]
    assert config["target_parameters"][:2] == ["gate_up_proj", "down_proj"]
    assert config["rank_pattern"] == {r".*\.gate_up_proj": 8}
    assert config["modules_to_save"] == ["embed_tokens"]
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(0))

    def logits(model):
        with torch.no_grad():
            return model.eval()(input_ids=ids).logits

    def base():
        return AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32)

    exported = logits(PeftModel.from_pretrained(base(), str(adapter)))
    original = logits(PeftModel.from_pretrained(base(), str(root / "adapter")))
    merged_logits = logits(AutoModelForCausalLM.from_pretrained(str(merged), dtype=torch.float32))
    assert (exported - original).abs().max() < 1e-5
    assert (exported - merged_logits).abs().max() < 1e-4
    assert (exported - logits(base())).abs().max() > 1e-2


def test_targets_are_checked_against_the_model():
    dense, moe = get_preset("glm4-9b-tiny"), get_preset("glm4-moe-tiny")
    assert resolve_targets(dense, ["v_proj", "q_proj"]) == ("q_proj", "v_proj")
    assert resolve_targets(dense, "all-linear") == valid_targets(dense)
    assert "gate_up_proj" in valid_targets(dense) and "gate_up_proj" not in valid_targets(moe)
    with pytest.raises(ConfigError) as err:
        resolve_targets(dense, ["q_proj", "gate_proj"])
    assert "model.lora_target_modules: gate_proj is not a linear module of a glm model; valid: " \
           "q_proj, k_proj, v_proj, o_proj, gate_up_proj, down_proj or all-linear" in str(err.value)
    # MoE: the routed experts under peft's names, the shared expert and the dense layer dotted.
    assert resolve_targets(moe, "all-linear") == (
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
        "shared_experts.gate_proj", "shared_experts.up_proj", "shared_experts.down_proj",
        "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
    assert resolve_targets(moe, ["down_proj", "shared_experts.gate_proj"]) == \
        ("down_proj", "shared_experts.gate_proj")
    with pytest.raises(ConfigError, match="gate_up_proj is not a linear module of a glm4_moe"):
        resolve_targets(moe, ["gate_up_proj"])
    with pytest.raises(ConfigError, match="routed experts' gate_proj and up_proj are one fused"):
        resolve_targets(moe, ["q_proj", "gate_proj"])


def test_expert_adapters_need_expert_tp_1_or_tp():
    from glm_megatron.engine.config import ModelSection, TrainConfigError
    from glm_megatron.engine.model_setup import lora_settings
    from glm_megatron.parallel import ParallelLayout

    moe = get_preset("glm4-moe-tiny")
    m = ModelSection(use_peft=True, lora_target_modules="all-linear")
    for etp in (None, 1, 4):  # None: expert TP = TP
        layout = ParallelLayout(tensor_model_parallel_size=4, expert_tensor_parallel_size=etp)
        assert lora_settings(m, moe, layout=layout).targets == valid_targets(moe)
    layout = ParallelLayout(tensor_model_parallel_size=4, expert_tensor_parallel_size=2)
    with pytest.raises(TrainConfigError, match=r"parallel.expert_tensor_parallel_size: LoRA on "
                       r"the routed experts needs expert tensor parallelism 1 or equal to the "
                       r"tensor parallel size \(4\), got 2"):
        lora_settings(m, moe, layout=layout)
    # Attention-only adapters do not care.
    attention = ModelSection(use_peft=True, lora_target_modules=["q_proj"])
    assert lora_settings(attention, moe, layout=layout).targets == ("q_proj",)


def test_modules_to_save_are_checked_against_the_model():
    from glm_megatron.engine.config import ModelSection, TrainConfigError, load_config
    from glm_megatron.engine.model_setup import lora_settings
    from glm_megatron.models.lora_saved_modules import saved_hf_tensors

    moe, dense = get_preset("glm4-moe-tiny"), get_preset("glm4-9b-tiny")
    m = ModelSection(use_peft=True, lora_modules_to_save=["lm_head", "embed_tokens"])
    assert lora_settings(m, moe).modules_to_save == ("lm_head", "embed_tokens")
    # peft's rule is a plain suffix: "norm" takes the final norm and every layer norm.
    norms = saved_hf_tensors(dense, ["norm"])
    assert {"model.norm.weight", "model.layers.0.input_layernorm.weight",
            "model.layers.3.post_attention_layernorm.weight"} <= norms
    for names, message in [
        (["lm_heads"], "lm_heads matches no module"),
        (["q_proj"], "q_proj takes model.layers.0.self_attn.q_proj.bias, which Megatron fuses "
                     "with model.layers.0.self_attn.k_proj.bias"),
        (["experts"], "experts takes the routed experts"),
        (["gate"], "gate takes the router"),
        (["o_proj"], "o_proj takes model.layers.0.self_attn.o_proj.weight, which a LoRA target "
                     "adapts"),
    ]:
        with pytest.raises(TrainConfigError) as err:
            lora_settings(ModelSection(use_peft=True, lora_target_modules=["o_proj"],
                                       lora_modules_to_save=names), moe)
        assert f"model.lora_modules_to_save: {message}" in str(err.value)
        assert "modules a glm4_moe model can train fully: " in str(err.value)
        assert "embed_tokens" in str(err.value).split("train fully: ")[1]
    with pytest.raises(TrainConfigError, match="model.lora_modules_to_save needs model.use_peft"):
        load_config(None, ["model.preset=glm4-9b-tiny", "model.lora_modules_to_save=[lm_head]"])


def test_adapters_on_a_fused_layernorm_linear_see_the_normalised_input():
    """Transformer Engine's LayerNormLinear (GPU spec: linear_qkv, dense fc1) normalises inside
    the linear: the adapter's input must be that RMSNorm's output (transformers' is the oracle)."""
    import torch
    from transformers.models.glm4_moe.modeling_glm4_moe import Glm4MoeRMSNorm

    from glm_megatron.models.lora import adapter_input

    x = torch.randn(3, 5, 16)
    plain = torch.nn.Linear(16, 8)
    assert adapter_input(plain, x) is x
    ref = Glm4MoeRMSNorm(16, eps=1e-5)
    torch.nn.init.uniform_(ref.weight, 0.5, 1.5)
    fused = torch.nn.Module()  # the attributes TE's LayerNormLinear carries
    fused.layer_norm_weight, fused.eps, fused.normalization = ref.weight, 1e-5, "RMSNorm"
    assert torch.allclose(adapter_input(fused, x), ref(x), atol=1e-6)
    fused.zero_centered_gamma = True
    fused.layer_norm_weight = torch.nn.Parameter(ref.weight.detach() - 1.0)
    assert torch.allclose(adapter_input(fused, x), ref(x), atol=1e-6)


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

    base = ["rlhf.policy_model=/p", "rlhf.reward_model=/r", "data.prompt_data_path=/d"]
    with pytest.raises(TrainConfigError, match="rlhf.reference_model: with rlhf.use_peft"):
        load_config(None, ["rlhf.use_peft=true", "rlhf.reference_model=/x", *base],
                    schema=PPOConfig)
    # The reference is the policy with its adapters off: fully trained modules would leak in.
    with pytest.raises(TrainConfigError, match="rlhf.lora_modules_to_save: the reference"):
        load_config(None, ["rlhf.use_peft=true", "rlhf.lora_modules_to_save=[lm_head]", *base],
                    schema=PPOConfig)
