"""The PPO config: the seed's keys load, bad keys / values / batch arithmetic / model paths are
refused with the key named, before any process group exists."""

import json
import subprocess
import sys

import pytest

from glm_megatron.algorithms.ppo.config import PPOConfig, resolve_ppo_batch
from glm_megatron.engine.config import TrainConfigError, load_config
from helpers.launch import REPO
from helpers.launch import test_env as launch_env

SEED_KEYS = """
rlhf:
  policy_model: "output/sft/glm4-6-chat/checkpoint-best"
  reference_model: "output/sft/glm4-6-chat/checkpoint-best"
  reward_model: "output/rlhf/reward_model/checkpoint-best"
  value_model: null
  learning_rate: 1.0e-6
  batch_size: 128
  mini_batch_size: 32
  ppo_epochs: 4
  clip_range: 0.2
  clip_range_vf: 0.2
  kl_penalty: "kl"
  kl_coef: 0.1
  target_kl: 0.01
  vf_coef: 1.0
  vf_clip_range: 10.0
  entropy_coef: 0.01
  max_steps: 5000
  save_steps: 500
  eval_steps: 100
  max_new_tokens: 512
  temperature: 1.0
  top_p: 0.9
  gradient_accumulation_steps: 4
  gradient_clipping: 1.0
  mixed_precision: "bf16"
data:
  prompt_data_path: "data/rlhf/prompts/train.jsonl"
  validation_prompt_path: "data/rlhf/prompts/val.jsonl"
checkpoint:
  save_strategy: "steps"
  save_steps: 500
  save_total_limit: 3
"""


def _load(tmp_path, text=SEED_KEYS, overrides=()):
    path = tmp_path / "ppo.yaml"
    path.write_text(text)
    return load_config(str(path), list(overrides), schema=PPOConfig)


def test_the_seeds_config_loads_as_it_is(tmp_path):
    cfg = _load(tmp_path)
    assert cfg.rlhf.batch_size == 128 and cfg.kl_type == "k1" and cfg.rlhf.top_p == 0.9
    plan = resolve_ppo_batch(cfg, 8)
    assert (plan.rollouts_per_rank, plan.mini_batch_per_rank, plan.micro_batch_size) == (16, 4, 1)


@pytest.mark.parametrize("example", ["examples/tiny_ppo/ppo.yaml", "examples/glm46_355b_ppo.yaml"])
def test_example_configs_load(example):
    load_config(str(REPO / example), [], schema=PPOConfig)


@pytest.mark.parametrize("override,message", [
    ("rlhf.clip_rnage=0.1", "unknown key rlhf.clip_rnage"),
    ("rlhf.kl_penalty=forward", "rlhf.kl_penalty: 'forward' is not one of"),
    ("rlhf.ppo_epochs=two", "rlhf.ppo_epochs: expected int"),
    ("rlhf.mini_batch_size=48", "rlhf.batch_size 128 is not a multiple of rlhf.mini_batch_size 48"),
    ("rlhf.top_p=0", "rlhf.top_p must be in (0, 1]"),
    ("rlhf.temperature=0", "rlhf.temperature must be > 0"),
    ("rlhf.missing_eos_penalty=-0.5", "rlhf.missing_eos_penalty must be >= 0 or null"),
    ("rlhf.save_steps=100", "disagree (they are aliases)"),
    ("rlhf.value_learning_rate=1e-5", "rlhf.value_learning_rate needs a separate rlhf.value_model"),
    ("rlhf.reward_model=null", "rlhf.reward_model is not set"),
])
def test_bad_values_name_the_key(tmp_path, override, message):
    with pytest.raises(TrainConfigError) as err:
        _load(tmp_path, overrides=[override])
    assert message in str(err.value)


def test_batch_arithmetic_against_the_data_parallel_size(tmp_path):
    cfg = _load(tmp_path)
    with pytest.raises(TrainConfigError, match="multiples of the data-parallel size 3"):
        resolve_ppo_batch(cfg, 3)
    with pytest.raises(TrainConfigError, match="not a multiple of rlhf.gradient_accumulation_steps 4"):
        resolve_ppo_batch(cfg, 16)  # 32 / 16 = 2 rollouts per rank per mini-batch


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "glm_megatron", "ppo", *args], cwd=REPO,
                          env=launch_env(), capture_output=True, text=True, timeout=300)


def test_cli_refuses_missing_and_wrong_checkpoints_before_any_work(tmp_path):
    cfg = tmp_path / "ppo.yaml"
    cfg.write_text(SEED_KEYS)
    proc = _cli("--config", str(cfg))
    assert proc.returncode == 2
    assert ("error: rlhf.policy_model: output/sft/glm4-6-chat/checkpoint-best: no such directory"
            in proc.stderr)
    # A run directory with weights but no reward_model.json is not a reward model.
    run = tmp_path / "lm" / "iter_0000001"
    (run / "model").mkdir(parents=True)
    (run / "model" / "metadata.json").write_text("{}")
    (run / "model" / ".metadata").write_text("")
    (run / "COMPLETE").write_text("")
    (run / "model_config.json").write_text(json.dumps(_tiny_hf()))
    proc = _cli("--config", str(cfg), f"rlhf.policy_model={run}", f"rlhf.reference_model={run}",
                f"rlhf.reward_model={run}")
    assert proc.returncode == 2
    assert "rlhf.reward_model" in proc.stderr and "is not a reward-model checkpoint" in proc.stderr


def _tiny_hf() -> dict:
    from glm_megatron.models import get_preset

    return get_preset("glm4-moe-tiny").to_hf_dict()


@pytest.fixture(scope="module")
def prompt_data(tmp_path_factory):
    from workers.ppo_common import build_ppo_data

    return build_ppo_data(str(tmp_path_factory.mktemp("ppo_prompts")))


def test_a_raw_prompt_file_gives_the_ids_of_its_tokenized_split(prompt_data):
    """The guide's raw train.jsonl as prompt_data_path: rendered at start exactly as
    tools/tokenize_data.py --format prompts renders it (the tokenized split is the oracle)."""
    from glm_megatron.algorithms.ppo.data import open_prompts, prompt_tokenizer_info
    from glm_megatron.data.chat_template import template_for_model_type

    vocab = prompt_data["vocab_size"]
    tokenized, _ = open_prompts(prompt_data["prompts_train"], "k", vocab, 1024)
    raw_file = prompt_data["jsonl"]["prompts_train"]
    raw, skipped = open_prompts(raw_file, "k", vocab, 1024, tokenizer_path=prompt_data["tokenizer"],
                                template=template_for_model_type("glm4_moe"))
    assert skipped == 0 and len(raw) == len(tokenized) > 100 and raw == tokenized
    limit = sorted(len(p) for p in raw)[len(raw) // 2]
    short, skipped = open_prompts(raw_file, "k", vocab, limit - 1,
                                  tokenizer_path=prompt_data["tokenizer"],
                                  template=template_for_model_type("glm4_moe"))
    assert skipped == len(raw) - len(short) > 0 and all(len(p) < limit for p in short)
    info = prompt_tokenizer_info(raw_file, prompt_data["tokenizer"])
    assert info["stop_ids"] and info["vocab_size"] == vocab


def test_raw_prompt_files_are_checked_like_tokenized_ones(prompt_data, tmp_path):
    from glm_megatron.algorithms.ppo.data import open_prompts

    vocab, tok = prompt_data["vocab_size"], prompt_data["tokenizer"]
    raw_file = prompt_data["jsonl"]["prompts_train"]
    with pytest.raises(TrainConfigError, match="set data.tokenizer_path"):
        open_prompts(raw_file, "data.prompt_data_path", vocab, 1024)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "fine"}\n{"prompt": 3}\n')
    with pytest.raises(TrainConfigError, match=r"data.prompt_data_path: .*bad.jsonl:2: "):
        open_prompts(str(bad), "data.prompt_data_path", vocab, 1024, tokenizer_path=tok,
                     template="glm4.5")
    with pytest.raises(TrainConfigError, match="more than the policy's vocab_size 10"):
        open_prompts(raw_file, "data.prompt_data_path", 10, 1024, tokenizer_path=tok,
                     template="glm4.5")
