"""Shared by the PPO tests and their worker: the tiny SFT -> reward model pipeline and PPO configs.

``build_ppo_inputs(out)`` makes the data of examples/tiny_ppo/make_data.py (one tokenizer for all
stages; prompts "Describe the X N." whose reward is the share of positive words), trains a short
SFT policy and a reward model started from it through the real CLI, and caches the result.
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

from workers.train_common import REPO, run_glm, write_config

SFT_STEPS = 80
RM_STEPS = 40


def _make_data_module():
    spec = importlib.util.spec_from_file_location("tiny_ppo_make_data",
                                                  REPO / "examples" / "tiny_ppo" / "make_data.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _stage_config(example: str, out_dir: str, **sections) -> dict:
    import yaml

    cfg = yaml.safe_load((REPO / "examples" / "tiny_ppo" / example).read_text())
    cfg["checkpoint"]["output_dir"] = out_dir
    cfg["logging"] = dict(cfg.get("logging") or {}, progress_bar=False)
    for name, values in sections.items():
        cfg.setdefault(name, {}).update(values)
    return cfg


def build_ppo_data(out: str) -> dict:
    """examples/tiny_ppo/make_data.py's splits (paths in the returned dict), no training."""
    return _make_data_module().build(out, sft_train=640, sft_val=32, sft_test=4, pref_train=480,
                                     pref_val=64, pref_test=8, prompts_train=256, prompts_val=32,
                                     digit_share=0.0)


def build_ppo_inputs(out: str) -> dict:
    """Data, an SFT policy and a reward model (paths in the returned dict); cached in ``out``."""
    marker = os.path.join(out, "inputs.json")
    if os.path.isfile(marker):
        return json.loads(Path(marker).read_text())
    data = build_ppo_data(os.path.join(out, "data"))
    sft_dir, rm_dir = os.path.join(out, "sft"), os.path.join(out, "rm")
    sft = _stage_config("sft.yaml", sft_dir,
                        training={"max_steps": SFT_STEPS},
                        data={"train_data_path": data["sft_train"], "validation_data_path": data["sft_val"]},
                        checkpoint={"checkpoint_interval": SFT_STEPS, "save_total_limit": 1},
                        evaluation={"eval_steps": SFT_STEPS, "eval_at_start": False})
    run_glm("sft", "--config", write_config(sft, os.path.join(out, "sft.yaml")), timeout=900)
    rm = _stage_config("rm.yaml", rm_dir,
                       model={"load_checkpoint": os.path.join(sft_dir, "best")},
                       training={"max_steps": RM_STEPS},
                       data={"train_data_path": data["pref_train"], "validation_data_path": data["pref_val"]},
                       checkpoint={"save_steps": RM_STEPS, "save_total_limit": 1},
                       evaluation={"eval_steps": RM_STEPS})
    run_glm("rm", "--config", write_config(rm, os.path.join(out, "rm.yaml")), timeout=900)
    info = {"data": data, "policy": os.path.join(sft_dir, "best"), "reward": os.path.join(rm_dir, "best"),
            "rm_eval": _last_eval(rm_dir)}
    Path(marker).write_text(json.dumps(info))
    return info


def _last_eval(run_dir: str) -> dict:
    state = os.path.join(run_dir, Path(run_dir, "latest").read_text().strip(), "trainer_state.json")
    return json.loads(Path(state).read_text()).get("last_eval", {})


def ppo_config(inputs: dict, output_dir: str, **sections) -> dict:
    """The tiny PPO example config pointed at ``inputs``; ``sections`` update each section."""
    import yaml

    cfg = yaml.safe_load((REPO / "examples" / "tiny_ppo" / "ppo.yaml").read_text())
    cfg["rlhf"].update(policy_model=inputs["policy"], reward_model=inputs["reward"])
    cfg["data"].update(prompt_data_path=inputs["data"]["prompts_train"],
                       validation_prompt_path=inputs["data"]["prompts_val"])
    cfg["checkpoint"].update(output_dir=output_dir)
    cfg["logging"].update(progress_bar=False)
    for name, values in sections.items():
        cfg.setdefault(name, {}).update(values)
    return cfg


def read_ppo_log(output_dir: str) -> dict[int, dict]:
    """step -> metrics; the last entry of a step wins (a killed run may log a step twice)."""
    rows = {}
    with open(os.path.join(output_dir, "ppo_log.jsonl"), encoding="utf-8") as fh:
        for line in fh:
            row = json.loads(line)
            rows[row["step"]] = row
    return rows
