"""LoRA SFT through the command line on a dense GLM-4 (the tutorial's family), 2 gloo ranks.

The base is a tiny random ``GlmForCausalLM`` loaded from HF safetensors (``model.hf_checkpoint``,
as the tutorial loads glm-4-9b-chat-hf); the run trains adapters only, at TP=2 with sequence
parallelism. Checked: held-out loss falls; checkpoints hold only the adapters and name the base;
a run killed with kill -9 and resumed with --resume auto repeats the uninterrupted run's
losses; a different base is refused naming both; the PEFT export loads in peft and gives the
merged export's logits (peft is the oracle); the merged export differs from the base (the
adapters learned something). One more run trains LoRA on every linear of a tiny GLM-4.5 MoE
(routed experts included) with lm_head trained fully, at TP=2+SP with expert TP 1, and checks
its exports the same way.
"""

import json
import os

import pytest
import torch
from workers.train_common import (
    build_tiny_data,
    complete_steps,
    kill_job,
    read_train_log,
    run_glm,
    start_glm,
    tiny_config,
    wait_for,
    write_config,
)

from helpers.launch import run_tool
from helpers.tiny_hf import make_tiny_dense_hf_checkpoint

CONVERT = "tools/convert_checkpoint.py"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_up_proj", "down_proj"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora_sft")
    data = build_tiny_data(str(root / "data"))
    base = make_tiny_dense_hf_checkpoint(str(root / "base"), "glm", seed=4,
                                         vocab_size=data["vocab_size"], pad_token_id=0)
    return root, data, base


def lora_config(data, base, out, **sections):
    cfg = tiny_config(data, str(out), **sections)
    cfg["model"] = {"hf_checkpoint": base, "use_peft": True, "lora_r": 8, "lora_alpha": 16,
                    "lora_dropout": 0.0, "lora_target_modules": TARGETS}
    cfg["training"].update(learning_rate=5e-3, min_learning_rate=5e-4, max_steps=20)
    cfg["parallel"] = {"tensor_model_parallel_size": 2, "sequence_parallel": True}
    cfg["checkpoint"].update(save_strategy="steps", checkpoint_interval=10)
    cfg["evaluation"].update(eval_strategy="steps", eval_steps=20, eval_at_start=True)
    return cfg


@pytest.fixture(scope="module")
def run(setup):
    root, data, base = setup
    out = root / "run"
    _, log = run_glm("sft", "--config", write_config(lora_config(data, base, out),
                                                     str(root / "sft.yaml")))
    return out, log


def test_eval_loss_falls_and_only_adapters_train(run):
    _, log = run
    evals = [float(line.split("eval_loss ")[1].split()[0]) for line in log.splitlines()
             if line.startswith("eval @ step")]
    assert len(evals) == 2 and evals[-1] < evals[0] - 0.5, evals
    assert "LoRA r=8 alpha=16" in log


def test_checkpoints_hold_the_adapters_and_name_the_base(run, setup):
    out, _ = run
    _, _, base = setup
    model = out / "iter_0000020" / "model"
    record = json.loads((model / "adapter_base.json").read_text())
    assert record["base"] == os.path.abspath(base) and record["lora"]["targets"] == TARGETS
    from glm_megatron.conversion.dist_reader import TorchDistReader

    keys = list(TorchDistReader(str(model)).tensors)
    assert keys and all("_lora.adapters." in k for k in keys), keys[:5]
    # Megatron stores global tensors: lora_A of q_proj is [r, hidden], B's q rows [q_dim, r].
    q = [k for k in keys if k.startswith("decoder.layers.0.") and "q_proj" in k]
    shapes = {k.rsplit(".", 1)[-1]: TorchDistReader(str(model)).shape(k) for k in q}
    assert shapes == {"lora_A": (8, 64), "q": (64, 8)}, shapes


def test_kill9_then_resume_auto_repeats_the_uninterrupted_run(run, setup):
    """kill -9 right after the step-10 checkpoint (adapters + their optimizer state), then
    --resume auto: every step's loss equals the uninterrupted run's."""
    out, _ = run
    root, data, base = setup
    again = root / "killed"
    cfg_file = write_config(lora_config(data, base, again), str(root / "killed.yaml"))
    proc = start_glm("sft", "--config", cfg_file)
    wait_for(lambda: again.is_dir() and 10 in complete_steps(str(again)), proc)
    kill_job(proc)
    assert 20 not in complete_steps(str(again)), "the run finished before it could be killed"
    run_glm("sft", "--config", cfg_file, "--resume", "auto")
    first, second = read_train_log(str(out)), read_train_log(str(again))
    assert sorted(second) == list(range(1, 21))
    for step, loss in second.items():
        assert loss == pytest.approx(first[step], abs=1e-6), step


def test_adapters_on_another_base_are_refused(run, setup):
    out, _ = run
    root, data, _ = setup
    other = make_tiny_dense_hf_checkpoint(str(root / "other_base"), "glm", seed=9,
                                          vocab_size=data["vocab_size"], num_hidden_layers=2)
    cfg = lora_config(data, other, root / "wrong")
    cfg["checkpoint"]["resume"] = str(out / "iter_0000010")
    code, log = run_glm("sft", "--config", write_config(cfg, str(root / "wrong.yaml")), check=False)
    assert code != 0 and "glm_megatron/" not in log.split("error: checkpoint.resume:")[0][-3000:]
    assert f"were trained on {os.path.abspath(root / 'base')}" in log
    assert f"this run's base is {os.path.abspath(other)}" in log


def test_peft_export_equals_the_merged_export(run, setup, tmp_path):
    out, _ = run
    _, _, base = setup
    adapter, merged = tmp_path / "adapter", tmp_path / "merged"
    proc = run_tool(CONVERT, "megatron-to-hf", "--load", str(out), "--output-dir", str(adapter),
                    "--adapter-only")
    assert proc.returncode == 0, proc.stderr
    assert "PEFT LoRA adapter, 48 tensors" in proc.stdout
    proc = run_tool(CONVERT, "megatron-to-hf", "--load", str(out), "--output-dir", str(merged))
    assert proc.returncode == 0, proc.stderr
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == os.path.abspath(base)
    ids = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        plain = AutoModelForCausalLM.from_pretrained(base).eval()
        base_logits = plain(input_ids=ids).logits
        peft_logits = PeftModel.from_pretrained(plain, str(adapter)).eval()(input_ids=ids).logits
        merged_model = AutoModelForCausalLM.from_pretrained(str(merged)).eval()
        merged_logits = merged_model(input_ids=ids).logits
    assert type(merged_model).__name__ == "GlmForCausalLM"
    assert (peft_logits - merged_logits).abs().max() < 1e-4
    assert (peft_logits - base_logits).abs().max() > 1e-2  # the adapters changed the model


def test_adapter_only_export_of_a_full_checkpoint_is_refused(setup, tmp_path):
    _, _, base = setup
    from glm_megatron.models import ConfigError  # noqa: F401 (the tool maps it to exit 2)

    proc = run_tool(CONVERT, "hf-to-megatron", "--hf-dir", base, "--output-dir",
                    str(tmp_path / "full"))
    assert proc.returncode == 0, proc.stderr
    proc = run_tool(CONVERT, "megatron-to-hf", "--load", str(tmp_path / "full"), "--output-dir",
                    str(tmp_path / "x"), "--adapter-only")
    assert proc.returncode == 2 and "holds no LoRA adapters" in proc.stderr, proc.stderr


def test_merged_export_without_its_base_is_refused_before_writing(run, tmp_path):
    import shutil

    out, _ = run
    moved = tmp_path / "run"
    shutil.copytree(out / "iter_0000020", moved / "iter_0000020")
    (moved / "latest").write_text("iter_0000020\n")
    record_file = moved / "iter_0000020" / "model" / "adapter_base.json"
    record = json.loads(record_file.read_text())
    record["base"] = str(tmp_path / "deleted_base")
    record_file.write_text(json.dumps(record))
    proc = run_tool(CONVERT, "megatron-to-hf", "--load", str(moved), "--output-dir",
                    str(tmp_path / "merged"))
    assert proc.returncode == 2, proc.stderr
    assert "deleted_base are gone" in proc.stderr and "--adapter-only" in proc.stderr
    assert not (tmp_path / "merged").exists()


# --------------------------------------------------------------------- GLM-4.x MoE, every linear
@pytest.fixture(scope="module")
def moe_run(setup):
    """LoRA on every linear of a tiny GLM-4.5-shaped MoE (routed experts, shared expert, dense
    layer) plus lm_head trained fully, at TP2+SP with expert TP 1: the expert adapters' gradients
    are reduced over the two expert-data-parallel ranks and their optimizer state is sharded
    there; gradient clipping counts every expert adapter once."""
    from helpers.tiny_hf import make_tiny_hf_checkpoint

    root, data, _ = setup
    base = make_tiny_hf_checkpoint(str(root / "moe_base"), seed=4, with_mtp=False,
                                   vocab_size=data["vocab_size"])
    out = root / "moe_run"
    cfg = tiny_config(data, str(out))
    cfg["model"] = {"hf_checkpoint": base, "use_peft": True, "lora_r": 8, "lora_alpha": 16,
                    "lora_target_modules": "all-linear", "lora_modules_to_save": ["lm_head"]}
    cfg["training"].update(learning_rate=5e-3, min_learning_rate=5e-4, max_steps=6,
                           gradient_clipping=0.5)
    cfg["parallel"] = {"tensor_model_parallel_size": 2, "sequence_parallel": True,
                       "expert_tensor_parallel_size": 1}
    cfg["checkpoint"].update(save_final=True)
    cfg["evaluation"].update(eval_strategy="steps", eval_steps=6, eval_at_start=True)
    _, log = run_glm("sft", "--config", write_config(cfg, str(root / "moe.yaml")))
    return base, out, log


def test_moe_lora_trains_and_its_peft_export_equals_the_merged_export(moe_run, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from glm_megatron.conversion.dist_reader import TorchDistReader
    from glm_megatron.conversion.megatron_to_hf import convert_megatron_to_hf

    base, out, log = moe_run
    evals = [float(line.split("eval_loss ")[1].split()[0]) for line in log.splitlines()
             if line.startswith("eval @ step")]
    assert len(evals) == 2 and evals[-1] < evals[0] - 1.0, evals
    keys = list(TorchDistReader(str(out / "iter_0000006" / "model")).tensors)
    assert [k for k in keys if "_lora.adapters." not in k] == ["output_layer.weight"]
    assert any(".mlp.experts.experts.linear_fc1_lora." in k for k in keys)
    assert any(".mlp.shared_experts.linear_fc2_lora." in k for k in keys)
    adapter, merged = tmp_path / "adapter", tmp_path / "merged"
    convert_megatron_to_hf(str(out), str(adapter), adapter_only=True, progress=False)
    convert_megatron_to_hf(str(out), str(merged), progress=False)
    ids = torch.randint(0, 300, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        plain = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
        base_logits = plain(input_ids=ids).logits
        peft_logits = PeftModel.from_pretrained(plain, str(adapter)).eval()(input_ids=ids).logits
        merged_logits = AutoModelForCausalLM.from_pretrained(
            str(merged), dtype=torch.float32).eval()(input_ids=ids).logits
    assert (peft_logits - merged_logits).abs().max() < 1e-4
    assert (peft_logits - base_logits).abs().max() > 1e-2
