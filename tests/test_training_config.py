"""Trainer config: the seed's YAML loads as is; bad keys, types and combinations are clear
errors naming the key, from the library and from the CLI (exit 2, no traceback)."""

import json
import os
import subprocess
import sys

import pytest

from glm_megatron.engine import checkpointing as ckpt
from glm_megatron.engine.batching import resolve_batch
from glm_megatron.engine.config import TrainConfigError, load_config
from helpers.launch import REPO
from helpers.launch import test_env as launch_env

# configs/training_sft.yaml from the seed (glm46_post_training_guide.md), verbatim.
SEED_SFT_YAML = """\
model:
  # Load from pre-trained or mid-trained checkpoint
  load_checkpoint: "output/pretrain/checkpoint-final"
  freeze_embeddings: false
  freeze_encoder_layers: 0  # Unfreeze all layers

training:
  # Learning rate (lower than pre-training)
  learning_rate: 1.0e-5
  min_learning_rate: 1.0e-6
  warmup_ratio: 0.03
  lr_scheduler: "cosine"

  # Training duration
  num_epochs: 3
  max_steps: null  # Train for full epochs

  # Batch configuration
  per_device_train_batch_size: 1
  gradient_accumulation_steps: 8
  global_batch_size: 512  # Much smaller than pre-training

  # Sequence length
  max_seq_length: 8192
  packing: false  # Disable for SFT

  # Regularization
  weight_decay: 0.01
  dropout: 0.0  # Disable dropout for SFT
  attention_dropout: 0.0

  # Gradient management
  gradient_clipping: 1.0
  mixed_precision: "bf16"

  # Loss configuration
  loss_type: "causal_lm"
  ignore_index: -100  # Ignore padding in loss

# Data configuration
data:
  train_data_path: "data/sft/tokenized/train"
  validation_data_path: "data/sft/tokenized/val"
  validation_split: 0.01
  max_seq_length: 8192

# Checkpoint management
checkpoint:
  save_strategy: "epoch"
  save_total_limit: 5
  checkpoint_interval: 500

# Evaluation
evaluation:
  eval_strategy: "steps"
  eval_steps: 100
  metric_for_best_model: "eval_loss"
"""


@pytest.fixture
def seed_file(tmp_path):
    path = tmp_path / "training_sft.yaml"
    path.write_text(SEED_SFT_YAML)
    return str(path)


def test_seed_config_loads_as_is(seed_file):
    cfg = load_config(seed_file)
    assert cfg.training.learning_rate == 1.0e-5 and cfg.training.global_batch_size == 512
    assert cfg.model.load_checkpoint == "output/pretrain/checkpoint-final"
    assert cfg.checkpoint.save_strategy == "epoch" and cfg.evaluation.eval_steps == 100
    plan = resolve_batch(cfg.training, data_parallel_size=64)  # 1 x 8 x 64 = 512
    assert plan.gradient_accumulation_steps == 8


@pytest.mark.parametrize("override,message", [
    ("training.lr=1e-4", "unknown key training.lr"),
    ("optimizer.lr=1", "unknown section 'optimizer'"),
    ("training.learning_rate=fast", "training.learning_rate: expected float"),
    ("training.packing=3", "training.packing: expected bool"),
    ("parallel.tensor_model_parallel_size=2.5", "parallel.tensor_model_parallel_size: expected int"),
    ("training.lr_scheduler=poly", "training.lr_scheduler: 'poly' is not one of"),
    ("training.warmup_ratio=1.5", "training.warmup_ratio must be in [0, 1)"),
    ("data.max_seq_length=4096", "data.max_seq_length (4096) differs from training.max_seq_length"),
    ("checkpoint.save_strategy=steps", None),  # checkpoint_interval is set: fine
    ("model.preset=glm4-moe-tiny", "exclusive"),  # hf_config + preset? no: load_checkpoint ok
    ("checkpoint.save_steps=7", "checkpoint.checkpoint_interval and checkpoint.save_steps disagree"),
    ("evaluation.metric_for_best_model=loss", "evaluation.metric_for_best_model must name"),
])
def test_bad_values_name_the_key(seed_file, override, message):
    if message is None:
        load_config(seed_file, [override])
        return
    if override.startswith("model.preset"):
        # preset + load_checkpoint is legal (architecture from the preset, weights loaded).
        assert load_config(seed_file, [override]).model.preset == "glm4-moe-tiny"
        with pytest.raises(TrainConfigError, match="exclusive"):
            load_config(seed_file, [override, "model.hf_config=x"])
        return
    with pytest.raises(TrainConfigError) as err:
        load_config(seed_file, [override])
    assert message in str(err.value)


def test_overrides_parse_yaml_values(seed_file):
    cfg = load_config(seed_file, ["training.learning_rate=2e-4", "training.max_steps=10",
                                  "parallel.sequence_parallel=true", "training.max_steps=12"])
    assert cfg.training.learning_rate == 2e-4 and cfg.training.max_steps == 12
    assert cfg.parallel.sequence_parallel is True


def test_global_batch_must_match_the_world(seed_file):
    cfg = load_config(seed_file)
    with pytest.raises(TrainConfigError, match=r"global_batch_size 512 != .* = 1 x 8 x 2 = 16"):
        resolve_batch(cfg.training, data_parallel_size=2)
    cfg = load_config(seed_file, ["training.gradient_accumulation_steps=null"])
    assert resolve_batch(cfg.training, 2).gradient_accumulation_steps == 256
    with pytest.raises(TrainConfigError, match="not divisible"):
        resolve_batch(cfg.training, 3)


@pytest.mark.parametrize("name", ["glm46_355b_sft.yaml", "glm45_air_sft.yaml", "glm4_9b_sft.yaml",
                                  "tiny_sft/sft_tiny.yaml"])
def test_example_configs_load_and_their_layouts_fit(name):
    from glm_megatron.models import get_preset
    from glm_megatron.models.config import model_shape
    from glm_megatron.parallel import validate_layout

    cfg = load_config(str(REPO / "examples" / name))
    world = {"glm46_355b_sft.yaml": 512, "glm45_air_sft.yaml": 128, "glm4_9b_sft.yaml": 8}.get(name, 2)
    preset = {"glm46_355b_sft.yaml": "glm4.6-355b-a32b", "glm45_air_sft.yaml": "glm4.5-air-106b-a12b",
              "glm4_9b_sft.yaml": "glm4-9b"}
    glm = get_preset(preset.get(name, "glm4-moe-tiny"))
    layout = validate_layout(cfg.parallel, world, model_shape(glm), training=True,
                             cuda=True, have_transformer_engine=True)
    plan = resolve_batch(cfg.training, layout.data_parallel_size(world))
    assert plan.global_batch_size == cfg.training.global_batch_size


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "glm_megatron", *args], cwd=REPO,
                          env=launch_env(), capture_output=True, text=True, timeout=300)


def test_cli_reports_config_errors_without_traceback(seed_file, tmp_path):
    proc = _cli("sft", "--config", seed_file, "training.learning_rat=1")
    assert proc.returncode == 2
    assert "error: unknown key training.learning_rat" in proc.stderr
    assert "Traceback" not in proc.stderr
    # The seed as is: valid config, but its checkpoint does not exist here -> named, before work.
    proc = _cli("sft", "--config", seed_file)
    assert proc.returncode == 2, proc.stderr
    assert "error: model.load_checkpoint: output/pretrain/checkpoint-final: no such directory" \
        in proc.stderr
    proc = _cli("sft", "--config", str(tmp_path / "missing.yaml"))
    assert proc.returncode == 2 and "no such config file" in proc.stderr
    proc = _cli("evaluate-sft", "--load", str(tmp_path), "--test-data", "x", "--output-file", "y")
    assert proc.returncode == 2 and "error: --load:" in proc.stderr and "Traceback" not in proc.stderr


def _fake_ckpt(root, step, complete=True):
    import pickle

    from torch.distributed.checkpoint.metadata import Metadata

    d = root / ckpt.iter_name(step)
    for sub in ("model", "optimizer"):  # empty but well-formed torch_dist directories
        (d / sub).mkdir(parents=True)
        (d / sub / "metadata.json").write_text("{}")
        (d / sub / ".metadata").write_bytes(pickle.dumps(Metadata(state_dict_metadata={}, storage_data={})))
    (d / "trainer_state.json").write_text(json.dumps({"step": step, "scheduler": {}}))
    if complete:
        (d / ckpt.COMPLETE).write_text("")
    return d


def test_latest_ignores_incomplete_and_prune_keeps_best(tmp_path):
    for step in (2, 4, 6, 8):
        _fake_ckpt(tmp_path, step)
    _fake_ckpt(tmp_path, 10, complete=False)  # killed while saving
    assert ckpt.latest_checkpoint(str(tmp_path)).endswith("iter_0000008")
    assert ckpt.resolve_resume("auto", str(tmp_path)).endswith("iter_0000008")
    assert ckpt.resolve_resume("auto", str(tmp_path / "fresh")) is None
    best = str(tmp_path / "iter_0000002")
    deleted = ckpt.prune_checkpoints(str(tmp_path), 2, {best})
    assert sorted(p.rsplit("/", 1)[1] for p in deleted) == ["iter_0000004", "iter_0000006"]
    assert [s for s, _ in ckpt.list_checkpoints(str(tmp_path))] == [2, 8]
    assert (tmp_path / "iter_0000010").is_dir()  # incomplete ones are not counted or touched


def test_load_checkpoint_paths_resolve_to_the_weights(tmp_path):
    d = _fake_ckpt(tmp_path, 4)
    ckpt.write_marker(str(tmp_path), "latest", d.name)
    ckpt.write_marker(str(tmp_path), "best", d.name)
    want = str(d / "model")
    for path in (tmp_path, d, d / "model", tmp_path / "latest", tmp_path / "best"):
        assert ckpt.resolve_model_dir(str(path)) == want
    with pytest.raises(TrainConfigError, match="model.load_checkpoint: .* no such directory"):
        ckpt.resolve_model_dir(str(tmp_path / "nope"))
    # The run's latest names an incomplete checkpoint (killed while saving): refused, not skipped.
    broken = _fake_ckpt(tmp_path, 6, complete=False)
    ckpt.write_marker(str(tmp_path), "latest", broken.name)
    with pytest.raises(TrainConfigError, match="incomplete .no COMPLETE marker"):
        ckpt.resolve_model_dir(str(tmp_path))
    os.remove(d / "model" / ".metadata")
    with pytest.raises(TrainConfigError, match="incomplete .no .metadata file"):
        ckpt.resolve_model_dir(str(d))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(TrainConfigError, match="not a Megatron checkpoint"):
        ckpt.resolve_model_dir(str(empty))


def test_lr_schedule_warmup_then_cosine_to_min():
    import torch

    from glm_megatron.engine.config import TrainingSection
    from glm_megatron.engine.lr_schedule import build_scheduler, current_lr

    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.0)
    t = TrainingSection(learning_rate=1e-3, min_learning_rate=1e-4, warmup_ratio=0.1)
    sched = build_scheduler(opt, t, total_steps=100)
    lrs = []
    for _ in range(100):
        lrs.append(current_lr(opt))  # the lr the step trains with
        sched.step(1)
    assert lrs[0] == pytest.approx(1e-4)  # step 1 of a 10-step warmup, not 0
    assert lrs[9] == pytest.approx(1e-3)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:]))
    assert lrs[-1] == pytest.approx(1e-4, rel=1e-3)
    assert lrs[54] == pytest.approx(1e-4 + 0.5 * (1e-3 - 1e-4), rel=1e-2)  # cosine midpoint


def test_unquoted_no_is_the_no_choice(tmp_path):
    # YAML 1.1 reads `save_strategy: no` (and the override save_strategy=no) as false.
    path = tmp_path / "c.yaml"
    path.write_text("checkpoint:\n  save_strategy: no\nevaluation:\n  eval_strategy: no\n")
    cfg = load_config(str(path), ["checkpoint.save_strategy=no"])
    assert cfg.checkpoint.save_strategy == "no" and cfg.evaluation.eval_strategy == "no"
