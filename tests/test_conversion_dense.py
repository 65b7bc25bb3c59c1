"""Dense GLM-4 conversion both ways: GLM-4-9B (``glm``) and GLM-4-0414 (``glm4``, sandwich norms).

The source is a tiny random ``GlmForCausalLM`` / ``Glm4ForCausalLM`` saved by transformers; it is
converted at TP=2 on two gloo ranks (the fused ``gate_up_proj`` split into Megatron's per-rank
fc1 halves, QKV by KV group), exported back bit for bit, loaded by ``AutoModelForCausalLM`` with
the family's chat template, and checked against our model at another layout.
"""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from glm_megatron.data.chat_template import template_for_model_type
from helpers.launch import run_tool, torchrun
from helpers.tiny_hf import make_tiny_dense_hf_checkpoint, read_all_tensors

CONVERT = "tools/convert_checkpoint.py"
CLASSES = {"glm": "GlmForCausalLM", "glm4": "Glm4ForCausalLM"}
CHAT = [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "我是 GLM。"},
        {"role": "user", "content": "2+2?"}]


@pytest.fixture(scope="module", params=list(CLASSES))
def dense(request, tmp_path_factory):
    """(model_type, HF dir, Megatron dir converted at TP=2, scratch dir)."""
    model_type = request.param
    root = tmp_path_factory.mktemp(f"dense_{model_type}")
    hf = make_tiny_dense_hf_checkpoint(str(root / "hf"), model_type, seed=11)
    meg = root / "megatron"
    log = torchrun(CONVERT, "hf-to-megatron", "--hf-dir", hf, "--output-dir", str(meg),
                   "--tp", "2")
    assert f"{len(load_file(hf + '/model.safetensors'))} HF tensors" in log, log
    return model_type, hf, meg, root


def test_round_trip_is_bitwise(dense):
    _, hf, meg, root = dense
    proc = run_tool(CONVERT, "megatron-to-hf", "--load", str(meg), "--output-dir",
                    str(root / "back"), "--max-shard-size-gb", "0.00005")
    assert proc.returncode == 0, proc.stderr
    original, back = read_all_tensors(hf), read_all_tensors(str(root / "back"))
    assert sorted(back) == sorted(original)
    assert all(torch.equal(back[n], t) and back[n].dtype == t.dtype for n, t in original.items())
    assert "model.layers.0.mlp.gate_up_proj.weight" in back


def test_export_loads_in_transformers_with_the_family_template(dense, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from glm_megatron.data.tokenizer_training import train_bpe

    model_type, hf, meg, _ = dense
    tok_dir = tmp_path / "tok"
    train_bpe(["hello world", "12 + 30 = 42", "你好 我是 GLM"] * 20, str(tok_dir), vocab_size=300,
              template=template_for_model_type(model_type))
    # A tokenizer without a template gets the family's at export.
    config_file = tok_dir / "tokenizer_config.json"
    config = json.loads(config_file.read_text())
    config.pop("chat_template")
    config_file.write_text(json.dumps(config))
    export = tmp_path / "export"
    proc = run_tool(CONVERT, "megatron-to-hf", "--load", str(meg), "--output-dir", str(export),
                    "--tokenizer-dir", str(tok_dir))
    assert proc.returncode == 0, proc.stderr
    model = AutoModelForCausalLM.from_pretrained(str(export))
    assert type(model).__name__ == CLASSES[model_type]
    text = AutoTokenizer.from_pretrained(str(export)).apply_chat_template(
        CHAT, tokenize=False, add_generation_prompt=True)
    # The tutorial's GLM-4 layout: [gMASK]<sop><|user|>\n...<|assistant|>\n...
    assert text.startswith("[gMASK]<sop><|user|>\n你好<|assistant|>\n我是 GLM。<|user|>\n2+2?"), text
    assert text.rstrip("\n").endswith("<|assistant|>"), text
    # transformers on the exported files vs our model on the Megatron checkpoint, at PP=2.
    out = torchrun("tools/verify_hf_parity.py", "--hf-dir", str(export), "--load", str(meg),
                   "--pp", "2")
    assert "PASS" in out and float(out.split("max |Δlogits|:")[1].split()[0]) < 1e-4


def test_tensors_that_do_not_fit_the_config_are_named(dense, tmp_path):
    model_type, hf, _, _ = dense
    bad = tmp_path / "bad"
    make_tiny_dense_hf_checkpoint(str(bad), model_type, seed=11)
    tensors = load_file(str(bad / "model.safetensors"))
    name = "model.layers.2.mlp.gate_up_proj.weight"
    tensors[name] = tensors[name][:-2]
    if model_type == "glm4":
        del tensors["model.layers.1.post_mlp_layernorm.weight"]
    save_file(tensors, str(bad / "model.safetensors"), metadata={"format": "pt"})
    proc = run_tool(CONVERT, "hf-to-megatron", "--hf-dir", str(bad), "--output-dir",
                    str(tmp_path / "out"))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert f"shape mismatch: {name}: expected (192, 64), found (190, 64)" in proc.stderr
    if model_type == "glm4":
        assert "missing tensor(s): model.layers.1.post_mlp_layernorm.weight" in proc.stderr


def test_unsupported_model_type_names_the_supported_ones(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "chatglm"}))
    proc = run_tool(CONVERT, "hf-to-megatron", "--hf-dir", str(tmp_path), "--output-dir",
                    str(tmp_path / "out"))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert "model_type 'chatglm' is not supported; supported: glm4_moe (Glm4MoeForCausalLM), " \
           "glm (GlmForCausalLM), glm4 (Glm4ForCausalLM)" in proc.stderr
