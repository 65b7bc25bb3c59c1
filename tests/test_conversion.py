"""HF safetensors <-> Megatron torch_dist conversion: lossless, layout-free, verified, deployable.

The oracle is transformers: the source is a tiny random Glm4MoeForCausalLM saved by it (with MTP
tensors added as released checkpoints store them), and the exported directory must load in it and
give the logits of our model.
"""

import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from glm_megatron.conversion import output_dir
from glm_megatron.conversion.weights_dir import resolve_weights_dir
from glm_megatron.models.config import ConfigError
from helpers.launch import run_tool, torchrun
from helpers.tiny_hf import make_bf16_sharded_copy, read_all_tensors

CONVERT = "tools/convert_checkpoint.py"
TP2_EP2 = ["--tp", "2", "--ep", "2", "--etp", "1"]


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    from glm_megatron.data.tokenizer_training import train_bpe

    out = tmp_path_factory.mktemp("tok")
    texts = ["hello world, the quick brown fox", "12 + 30 = 42", "GLM answers questions"] * 20
    train_bpe(texts, str(out), vocab_size=300)
    return out


@pytest.fixture(scope="module")
def converted(tiny_hf_dir, tmp_path_factory):
    """The fp32 tiny model converted at TP=2 x EP=2 on two gloo ranks."""
    out = tmp_path_factory.mktemp("conv") / "megatron"
    log = torchrun(CONVERT, "hf-to-megatron", "--hf-dir", str(tiny_hf_dir), "--output-dir",
                   str(out), *TP2_EP2)
    assert "MTP kept" in log and "181 HF tensors" in log
    return out


def test_round_trip_is_bitwise_for_bf16_sharded_checkpoint(tiny_hf_dir, tmp_path):
    src = make_bf16_sharded_copy(str(tiny_hf_dir), str(tmp_path / "hf_bf16"))
    torchrun(CONVERT, "hf-to-megatron", "--hf-dir", src, "--output-dir", str(tmp_path / "meg"),
             *TP2_EP2)
    # Small shards force a multi-file export with an index.
    proc = run_tool(CONVERT, "megatron-to-hf", "--load", str(tmp_path / "meg"), "--output-dir",
                    str(tmp_path / "back"), "--max-shard-size-gb", "0.0002")
    assert proc.returncode == 0, proc.stderr
    original, back = read_all_tensors(src), read_all_tensors(str(tmp_path / "back"))
    assert sorted(back) == sorted(original)
    for name, tensor in original.items():
        assert back[name].dtype == tensor.dtype, name
        assert torch.equal(back[name], tensor), name
    assert back["model.layers.1.mlp.gate.e_score_correction_bias"].dtype == torch.float32
    assert any(n.startswith("model.layers.4.") for n in back)  # the MTP layer survived
    index = json.loads((tmp_path / "back" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in back.values())


@pytest.mark.parametrize("layout", [["--ep", "2"], ["--pp", "2"]])
def test_checkpoint_written_at_tp2_ep2_loads_at_other_layouts(converted, tiny_hf_dir, layout):
    out = torchrun("tools/verify_hf_parity.py", "--hf-dir", str(tiny_hf_dir), "--load",
                   str(converted), *layout)
    assert "PASS" in out
    assert float(out.split("max |Δlogits|:")[1].split()[0]) < 1e-4


def test_export_loads_in_transformers_with_chat_template(converted, tiny_hf_dir, tokenizer_dir,
                                                          tmp_path):
    export = tmp_path / "export"
    proc = run_tool(CONVERT, "megatron-to-hf", "--load", str(converted), "--output-dir",
                    str(export), "--tokenizer-dir", str(tokenizer_dir))
    assert proc.returncode == 0, proc.stderr
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    model = AutoModelForCausalLM.from_pretrained(str(export))
    assert type(model).__name__ == "Glm4MoeForCausalLM"
    tok = AutoTokenizer.from_pretrained(str(export))
    text = tok.apply_chat_template(
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"}],
        tokenize=False, add_generation_prompt=True)
    assert text.startswith("[gMASK]<sop><|system|>\nBe brief.<|user|>\n2+2?")
    assert text.rstrip().endswith("<|assistant|>")
    generation = GenerationConfig.from_pretrained(str(export))
    assert generation.eos_token_id == [tok.convert_tokens_to_ids(t) for t in
                                       ("<|endoftext|>", "<|user|>", "<|observation|>")]
    # transformers on the exported files vs our model on the Megatron checkpoint.
    proc = run_tool("tools/verify_hf_parity.py", "--hf-dir", str(export), "--load", str(converted))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "PASS" in proc.stdout


def test_trainer_checkpoint_directories_are_resolved(converted, tmp_path):
    run = tmp_path / "run"
    iter_dir = run / "iter_0000005"
    shutil.copytree(converted, iter_dir / "model")
    shutil.move(str(iter_dir / "model" / "model_config.json"), iter_dir / "model_config.json")
    (run / "latest").write_text("iter_0000005")
    with pytest.raises(ConfigError, match="incomplete .no COMPLETE marker"):
        resolve_weights_dir(str(run))
    (iter_dir / "COMPLETE").write_text("")
    assert resolve_weights_dir(str(run)) == str(iter_dir / "model")
    proc = run_tool(CONVERT, "megatron-to-hf", "--load", str(run), "--output-dir",
                    str(tmp_path / "hf"))
    assert proc.returncode == 0, proc.stderr
    assert len(read_all_tensors(str(tmp_path / "hf"))) == 181


@pytest.fixture(scope="module")
def reward_run(converted, tmp_path_factory):
    """A reward trainer's run directory on ``converted``'s trunk: ``iter_x/model`` holds the same
    tensors with a [1, H] reward head as ``output_layer.weight``, ``iter_x`` its model_config.json,
    reward_model.json (the trainer's writer) and COMPLETE, and ``latest`` names it."""
    import torch.distributed.checkpoint as dcp

    from glm_megatron.algorithms.rm.train import write_reward_file
    from glm_megatron.conversion.dist_reader import TorchDistReader

    reader = TorchDistReader(str(converted))
    state = reader.load(sorted(reader.tensors))
    hidden = state["output_layer.weight"].shape[1]
    state["output_layer.weight"] = torch.randn(1, hidden, generator=torch.Generator().manual_seed(3))
    run = tmp_path_factory.mktemp("rm_run")
    iter_dir = run / "iter_0000003"
    dcp.save(state, storage_writer=dcp.FileSystemWriter(str(iter_dir / "model")), no_dist=True)
    shutil.copy(converted / "metadata.json", iter_dir / "model" / "metadata.json")
    shutil.copy(converted / "model_config.json", iter_dir / "model_config.json")
    write_reward_file(str(iter_dir), hidden, {"mean": 0.25, "std": 1.5}, "test", 0.0)
    (iter_dir / "COMPLETE").write_text("")
    (run / "latest").write_text(iter_dir.name + "\n")
    return run, state["output_layer.weight"]


def test_reward_to_hf_writes_the_lm_trunk_and_the_score_head(reward_run, converted, tokenizer_dir,
                                                             tmp_path):
    run, head = reward_run
    out = tmp_path / "rm_hf"
    proc = run_tool(CONVERT, "reward-to-hf", "--load", str(run), "--output-dir", str(out),
                    "--tokenizer-dir", str(tokenizer_dir), "--max-shard-size-gb", "0.0002")
    assert proc.returncode == 0, proc.stderr
    assert f"wrote {out}: reward model, 181 tensors in" in proc.stdout
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["Glm4MoeForSequenceClassification"]
    assert config["num_labels"] == 1
    assert config["reward_normalization"]["mean"] == 0.25
    assert config["reward_normalization"]["std"] == 1.5
    assert (out / "tokenizer.json").exists()
    rm = read_all_tensors(str(out))
    assert "lm_head.weight" not in rm and torch.equal(rm["score.weight"], head)
    # The trunk is bitwise what megatron-to-hf writes for the same checkpoint's LM.
    proc = run_tool(CONVERT, "megatron-to-hf", "--load", str(converted), "--output-dir",
                    str(tmp_path / "lm_hf"))
    assert proc.returncode == 0, proc.stderr
    lm = read_all_tensors(str(tmp_path / "lm_hf"))
    assert sorted(set(rm) - {"score.weight"}) == sorted(set(lm) - {"lm_head.weight"})
    for name, tensor in lm.items():
        if name != "lm_head.weight":
            assert torch.equal(rm[name], tensor), name
    # The subcommand writes what the public function writes.
    from glm_megatron.conversion.reward_export import export_reward_to_hf

    summary = export_reward_to_hf(str(run), str(tmp_path / "rm_api"),
                                  tokenizer_dir=str(tokenizer_dir), max_shard_bytes=int(0.0002 * 2**30))
    assert summary["tensors"] == 181 and summary["shards"] > 1
    api = read_all_tensors(str(tmp_path / "rm_api"))
    assert sorted(api) == sorted(rm) and all(torch.equal(api[n], rm[n]) for n in rm)
    assert json.loads((tmp_path / "rm_api" / "config.json").read_text()) == config
    # transformers loads the trunk (the head and the MTP layer are not part of Glm4MoeModel).
    from transformers import Glm4MoeModel

    _, info = Glm4MoeModel.from_pretrained(str(out), output_loading_info=True)
    assert not info["missing_keys"], info
    assert [k for k in info["unexpected_keys"]
            if "score" not in k and not k.startswith(("layers.4.", "model.layers.4."))] == [], info


def test_interrupted_conversion_never_looks_complete(tmp_path):
    out = tmp_path / "out"
    tmp = output_dir.start(str(out))
    (tmp_path / "out.partial" / "metadata.json").write_text("{}")
    (tmp_path / "out.partial" / ".metadata").write_text("")
    assert not out.exists()  # nothing at the final name until finish()
    with pytest.raises(ConfigError, match="interrupted conversion"):
        resolve_weights_dir(tmp)
    output_dir.finish(str(out))
    assert out.exists() and not os.path.exists(tmp)


# ---- bad input: every case answers with the file / tensor / field, exit status 2 --------------


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def _edit_tensors(hf_dir, edit):
    file = os.path.join(hf_dir, "model.safetensors")
    tensors = load_file(file)
    edit(tensors)
    save_file(tensors, file, metadata={"format": "pt"})


def _convert_error(*args):
    proc = run_tool(CONVERT, *args)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
    return proc.stderr


def test_preset_mismatch_names_the_fields(tiny_hf_dir, tmp_path):
    err = _convert_error("hf-to-megatron", "--hf-dir", str(tiny_hf_dir), "--output-dir",
                         str(tmp_path / "o"), "--preset", "glm4.6-355b-a32b")
    assert "hidden_size: checkpoint 64 vs the preset 5120" in err
    assert "n_routed_experts: checkpoint 8 vs the preset 160" in err


def test_missing_unexpected_and_misshapen_tensors_are_listed(tiny_hf_dir, tmp_path):
    bad = _copy(tiny_hf_dir, tmp_path / "bad")

    def edit(t):
        del t["model.layers.2.mlp.experts.3.up_proj.weight"]
        t["model.layers.2.mlp.extra.weight"] = torch.zeros(2)
        t["model.layers.1.self_attn.o_proj.weight"] = torch.zeros(64, 32)

    _edit_tensors(str(bad), edit)
    err = _convert_error("hf-to-megatron", "--hf-dir", str(bad), "--output-dir", str(tmp_path / "o"))
    assert "1 missing tensor(s): model.layers.2.mlp.experts.3.up_proj.weight" in err
    assert "1 unexpected tensor(s): model.layers.2.mlp.extra.weight" in err
    assert ("shape mismatch: model.layers.1.self_attn.o_proj.weight: expected (64, 64), "
            "found (64, 32)") in err


def test_corrupt_or_partial_hf_directory(tiny_hf_dir, tmp_path):
    truncated = _copy(tiny_hf_dir, tmp_path / "truncated")
    file = truncated / "model.safetensors"
    file.write_bytes(file.read_bytes()[:1000])
    err = _convert_error("hf-to-megatron", "--hf-dir", str(truncated), "--output-dir",
                         str(tmp_path / "o"))
    assert "model.safetensors: not a readable safetensors file" in err

    partial = tmp_path / "partial"
    make_bf16_sharded_copy(str(tiny_hf_dir), str(partial))
    os.remove(partial / "model-00002-of-00003.safetensors")
    err = _convert_error("hf-to-megatron", "--hf-dir", str(partial), "--output-dir",
                         str(tmp_path / "o"))
    assert "shard file(s) missing" in err and "model-00002-of-00003.safetensors" in err


def test_non_empty_output_directory_is_refused(tiny_hf_dir, converted, tmp_path):
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "keep.txt").write_text("mine")
    err = _convert_error("hf-to-megatron", "--hf-dir", str(tiny_hf_dir), "--output-dir", str(taken))
    assert "exists and is not empty (pass --overwrite" in err
    err = _convert_error("megatron-to-hf", "--load", str(converted), "--output-dir", str(taken))
    assert "exists and is not empty" in err
    # --overwrite replaces only what a conversion wrote: keep.txt is not, so it is refused...
    err = _convert_error("megatron-to-hf", "--load", str(converted), "--output-dir", str(taken),
                         "--overwrite")
    assert "--overwrite refused: the directory holds keep.txt" in err
    assert (taken / "keep.txt").read_text() == "mine"
    # ...until it is gone (replacing an earlier export: tests/test_reliability.py).
    (taken / "keep.txt").unlink()
    proc = run_tool(CONVERT, "megatron-to-hf", "--load", str(converted), "--output-dir",
                    str(taken), "--overwrite")
    assert proc.returncode == 0, proc.stderr
    assert (taken / "config.json").exists()


def test_bad_megatron_checkpoints(converted, tiny_hf_dir, tmp_path):
    err = _convert_error("megatron-to-hf", "--load", str(tmp_path), "--output-dir", str(tmp_path / "o"))
    assert "not a Megatron checkpoint" in err
    broken = _copy(converted, tmp_path / "broken")
    os.remove(broken / ".metadata")
    err = _convert_error("megatron-to-hf", "--load", str(broken), "--output-dir", str(tmp_path / "o"))
    assert "incomplete (no .metadata file)" in err
    # A checkpoint of another model shape than the config given for it.
    other = _copy(tiny_hf_dir, tmp_path / "other_cfg")
    cfg = json.loads((other / "config.json").read_text())
    cfg["num_hidden_layers"] = 2
    (other / "config.json").write_text(json.dumps(cfg))
    err = _convert_error("megatron-to-hf", "--load", str(converted), "--output-dir",
                         str(tmp_path / "o"), "--hf-config-dir", str(other))
    assert "is not part of the model config" in err or "shape mismatch" in err


def test_bad_reward_exports(reward_run, converted, tmp_path):
    run, _ = reward_run
    out = str(tmp_path / "o")
    err = _convert_error("reward-to-hf", "--load", str(converted), "--output-dir", out)
    assert "not a reward-model checkpoint (no reward_model.json" in err and "megatron-to-hf" in err
    err = _convert_error("reward-to-hf", "--load", str(tmp_path), "--output-dir", out)
    assert "error: --load: " in err and "not a Megatron checkpoint" in err
    # megatron-to-hf names the subcommand instead of failing on the head's shape.
    err = _convert_error("megatron-to-hf", "--load", str(run), "--output-dir", out)
    assert "is a reward model (reward_model.json beside it)" in err and "reward-to-hf" in err
    # reward_model.json beside an LM's weights: the [V, H] output layer is not a reward head.
    fake = tmp_path / "fake" / "iter_0000001"
    shutil.copytree(converted, fake / "model")
    shutil.copy(run / "iter_0000003" / "reward_model.json", fake / "reward_model.json")
    (fake / "COMPLETE").write_text("")
    err = _convert_error("reward-to-hf", "--load", str(fake), "--output-dir", out)
    assert "no reward head output_layer.weight of shape (1, 64)" in err
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "keep.txt").write_text("mine")
    err = _convert_error("reward-to-hf", "--load", str(run), "--output-dir", str(taken))
    assert "exists and is not empty" in err
    proc = run_tool(CONVERT, "reward-to-hf", "--load", str(run), "--output-dir", out,
                    env={"RANK": "0", "WORLD_SIZE": "2"})
    assert proc.returncode == 2 and "runs in one process" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not os.path.exists(out)
