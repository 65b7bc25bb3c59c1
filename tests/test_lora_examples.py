"""The LoRA examples: examples/glm4_9b_lora (the ChatGLM4 tutorial on 8 GPUs) and the pieces of
``make demo-lora`` (examples/tiny_lora), checked without any process group or training run.

- sft_lora.yaml loads through the SFT schema with the tutorial's hyper-parameters, describes
  GLM-4-9B (preset, or a glm-4-9b-chat-hf config.json), fits 8 ranks with its global batch of 16,
  and names launch scripts that exist and read it;
- prepare_data.sh turns Alpaca records into tokenized train / val splits with the glm4 template;
- the tiny demo's data builder writes the tutorial's {instruction, input, output} records, its
  base is a GlmForCausalLM the tiny configs can train at TP=2, and its LoRA keys are the 9B
  example's.

The demo itself (a few minutes) is ``make demo-lora``, not part of the suite.
"""

import importlib.util
import json
import re
import subprocess
import sys

import pytest

from glm_megatron.algorithms.sft.config import SFTConfig
from glm_megatron.engine.batching import resolve_batch
from glm_megatron.engine.config import load_config
from glm_megatron.engine.model_setup import lora_settings, resolve_glm_config
from glm_megatron.models import get_preset
from glm_megatron.models.config import model_shape
from glm_megatron.parallel import LayoutError, validate_layout
from helpers.launch import REPO
from helpers.launch import test_env as launch_env

EXAMPLE_DIR = REPO / "examples" / "glm4_9b_lora"
EXAMPLE = EXAMPLE_DIR / "sft_lora.yaml"
TINY = REPO / "examples" / "tiny_lora"
TUTORIAL_LORA = dict(use_peft=True, lora_r=8, lora_alpha=32.0, lora_dropout=0.1,
                     lora_target_modules=["q_proj", "k_proj", "v_proj"])


def load_example(*overrides, path=EXAMPLE):
    return load_config(str(path), list(overrides), schema=SFTConfig)


def tiny_module(name):
    spec = importlib.util.spec_from_file_location(f"tiny_lora_{name}", TINY / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def layout_of(cfg, world_size, glm, cuda=True):
    return validate_layout(cfg.parallel, world_size, model_shape(glm), training=True, cuda=cuda,
                           have_transformer_engine=cuda)


# ------------------------------------------------------------------ examples/glm4_9b_lora


def test_example_has_the_tutorials_hyper_parameters():
    cfg = load_example()
    m, t, d, e = cfg.model, cfg.training, cfg.data, cfg.evaluation
    assert {k: getattr(m, k) for k in TUTORIAL_LORA} == TUTORIAL_LORA
    assert not m.use_rslora and m.lora_adapter is None
    assert m.hf_checkpoint.endswith("glm-4-9b-chat-hf") and m.preset is None
    assert m.load_checkpoint is None
    assert t.learning_rate == 5e-4 and t.num_epochs == 3 and t.max_steps is None
    assert t.per_device_train_batch_size == 2 and t.mixed_precision == "bf16"
    assert t.max_seq_length == d.max_seq_length == 512 and not t.packing
    # TrainingArguments' defaults the tutorial keeps: linear to 0, no warmup, betas (0.9, 0.999).
    assert (t.lr_scheduler, t.min_learning_rate, t.warmup_ratio) == ("linear", 0.0, 0.0)
    assert (t.adam_beta1, t.adam_beta2, t.weight_decay, t.gradient_clipping) == (0.9, 0.999, 0.0, 1.0)
    assert d.train_data_path.endswith("/train") and d.validation_data_path.endswith("/val")
    assert e.eval_batch_size == 4 and e.eval_strategy == "steps" and e.eval_at_start
    assert cfg.checkpoint.checkpoint_interval % e.eval_steps == 0  # best-model tracking
    assert cfg.logging.log_interval == 10


def test_example_is_glm4_9b_at_tp1_dp8_with_the_tutorials_global_batch():
    cfg = load_example("model.hf_checkpoint=", "model.preset=glm4-9b")
    glm = resolve_glm_config(cfg.model)
    assert glm == get_preset("glm4-9b") and glm.model_type == "glm"
    lora = lora_settings(cfg.model, glm)
    assert lora.targets == ("q_proj", "k_proj", "v_proj") and lora.scale == pytest.approx(4.0)
    layout = layout_of(cfg, 8, glm)
    assert (layout.tp, layout.pp, layout.ep, layout.cp) == (1, 1, 1, 1)
    plan = resolve_batch(cfg.training, layout.data_parallel_size(8))
    assert (plan.data_parallel_size, plan.micro_batch_size, plan.gradient_accumulation_steps,
            plan.global_batch_size) == (8, 2, 1, 16)


def test_example_at_tp2_sp_keeps_the_global_batch_and_tp4_is_refused():
    glm = get_preset("glm4-9b")
    cfg = load_example("parallel.tensor_model_parallel_size=2", "parallel.sequence_parallel=true")
    layout = layout_of(cfg, 8, glm)
    plan = resolve_batch(cfg.training, layout.data_parallel_size(8))
    assert (plan.data_parallel_size, plan.gradient_accumulation_steps, plan.global_batch_size) == (4, 2, 16)
    with pytest.raises(LayoutError, match="TP=4 does not divide the 2 KV groups"):
        layout_of(load_example("parallel.tensor_model_parallel_size=4"), 8, glm)


def test_example_reads_the_architecture_from_a_glm_4_9b_chat_hf_directory(tmp_path):
    from transformers import AutoConfig

    # transformers' GlmConfig defaults are GLM-4-9B-chat's config.json (tests/test_model_config.py).
    (tmp_path / "config.json").write_text(json.dumps(AutoConfig.for_model("glm").to_dict()))
    cfg = load_example(f"model.hf_checkpoint={tmp_path}")
    assert resolve_glm_config(cfg.model) == get_preset("glm4-9b")


def test_launch_lines_name_existing_scripts_that_read_this_config():
    text = EXAMPLE.read_text()
    launches = re.findall(r"^#\s+((?:torchrun|sbatch|examples/glm4_9b_lora/\S+\.sh) .*)$", text, re.M)
    assert any(line.startswith("torchrun --nproc-per-node 8") for line in launches), launches
    assert any(line.startswith("sbatch examples/glm4_9b_lora/slurm.sbatch") for line in launches)
    for line in launches:
        for script in re.findall(r"examples/\S+\.(?:sh|sbatch)", line):
            assert (REPO / script).is_file(), script
    for name in ("torchrun_8gpu.sh", "slurm.sbatch", "prepare_data.sh"):
        script = EXAMPLE_DIR / name
        assert subprocess.run(["bash", "-n", str(script)]).returncode == 0, name
        if name != "prepare_data.sh":
            assert "examples/glm4_9b_lora/sft_lora.yaml" in script.read_text()
            assert "-m glm_megatron sft --config" in script.read_text()
    readme = (EXAMPLE_DIR / "README.md").read_text()
    for needle in ("--adapter-only", "PeftModel.from_pretrained", "prepare_data.sh", "make demo-lora"):
        assert needle in readme, needle


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny_lora")
    return tiny_module("make_data").build(str(out / "data"), pretrain=60, lora=120, seed=3)


def test_prepare_data_script_tokenizes_alpaca_records_with_the_glm4_template(tiny_data, tmp_path):
    out = tmp_path / "prepared"
    proc = subprocess.run(
        ["bash", str(EXAMPLE_DIR / "prepare_data.sh"), tiny_data["lora"], tiny_data["tokenizer"],
         str(out)], cwd=REPO, env=launch_env(PY=sys.executable, MAX_SEQ_LENGTH="64"),
        capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "written 120 (alpaca: 120)" in proc.stdout, proc.stdout
    summary = json.loads((out / "tokenized" / "summary.json").read_text())
    assert summary["records_read"] == 120 and summary["skipped"] == 0
    assert summary["rows"]["train"] + summary["rows"]["val"] == 120 and summary["rows"]["val"] > 0
    for split in ("train", "val"):
        manifest = json.loads((out / "tokenized" / split / "manifest.json").read_text())
        assert manifest["template"] == "glm4" and manifest["max_seq_length"] == 64
    first = json.loads((out / "alpaca_zh_unified.jsonl").read_text().splitlines()[0])
    row = json.loads(open(tiny_data["lora"], encoding="utf-8").read())[0]
    prompt = row["instruction"] + ("\n\n" + row["input"] if row["input"] else "")
    assert first["conversations"][-2:] == [{"role": "user", "content": prompt},
                                           {"role": "assistant", "content": row["output"]}]


# ------------------------------------------------------------------ examples/tiny_lora


def test_tiny_data_builder_writes_alpaca_zh_records(tiny_data):
    from glm_megatron.data.readers import parse_record

    for key in ("pretrain", "lora"):
        rows = json.loads(open(tiny_data[key], encoding="utf-8").read())  # one JSON array
        assert isinstance(rows, list) and rows
        for row in rows:
            assert set(row) == {"instruction", "input", "output"}, row
            assert all(isinstance(v, str) for v in row.values()) and row["instruction"] and row["output"]
            _, fmt = parse_record(row, "sft")
            assert fmt == "alpaca"
        chinese = [r for r in rows if re.search(r"[\u4e00-\u9fff]", r["instruction"])]
        if key == "pretrain":
            assert not chinese  # the base learns its skills from English instructions only
        else:
            assert len(chinese) > len(rows) / 2 and len(chinese) < len(rows)  # zh + some en
            assert any(r["input"] == "" for r in rows)  # the tutorial's questions have no input
    config = json.loads(open(f"{tiny_data['tokenizer']}/tokenizer_config.json", encoding="utf-8").read())
    assert config["glm_chat_template_name"] == "glm4"


def test_tiny_data_builder_rejects_non_alpaca_rows():
    make_data = tiny_module("make_data")
    make_data.check_alpaca_rows([{"instruction": "你是谁？", "input": "", "output": "TinyGLM"}])
    for bad in ({"instruction": "x", "output": "y"}, {"instruction": "", "input": "", "output": "y"},
                {"instruction": "x", "input": 1, "output": "y"}):
        with pytest.raises(ValueError, match="row 0"):
            make_data.check_alpaca_rows([bad])


def test_tiny_base_and_configs_train_the_tutorials_lora_at_tp2(tiny_data, tmp_path):
    info = tiny_module("make_base").make_base(str(tmp_path / "init-hf"), tiny_data["tokenizer"])
    hf_config = json.loads((tmp_path / "init-hf" / "config.json").read_text())
    assert hf_config["model_type"] == "glm" and hf_config["architectures"] == ["GlmForCausalLM"]
    assert info["vocab_size"] >= tiny_data["vocab_size"] and info["vocab_size"] % 16 == 0
    assert (tmp_path / "init-hf" / "tokenizer.json").is_file()
    nine_b = load_example()
    for name in ("pretrain", "lora"):
        cfg = load_example(f"model.hf_checkpoint={tmp_path / 'init-hf'}", path=TINY / f"{name}.yaml")
        glm = resolve_glm_config(cfg.model)
        assert glm.model_type == "glm" and glm.vocab_size == info["vocab_size"]
        layout = layout_of(cfg, 2, glm, cuda=False)
        assert layout.tp == 2 and layout.sequence_parallel
        assert resolve_batch(cfg.training, layout.data_parallel_size(2)).global_batch_size == 16
        assert cfg.training.max_seq_length == 64
        if name == "lora":
            assert cfg.evaluation.eval_at_start
            assert {k: getattr(cfg.model, k) for k in TUTORIAL_LORA} == \
                {k: getattr(nine_b.model, k) for k in TUTORIAL_LORA}
            assert lora_settings(cfg.model, glm).targets == ("q_proj", "k_proj", "v_proj")
        else:
            assert not cfg.model.use_peft
