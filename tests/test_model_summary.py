"""model_summary builds the real model on the meta device; its counts equal transformers'."""

import re

import pytest
import torch

from glm_megatron.models import get_preset
from helpers.launch import run_tool


def hf_meta_param_count(preset: str) -> int:
    """transformers' own count: the preset's config.json through its Auto classes."""
    from transformers import AutoConfig, AutoModelForCausalLM

    hf = get_preset(preset).to_hf_dict()
    config = AutoConfig.for_model(hf.pop("model_type"), **hf)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    assert type(model).__name__ == hf["architectures"][0]
    return sum(p.numel() for p in model.parameters())


def number(text: str, label: str) -> int:
    return int(re.search(re.escape(label) + r"\s+([\d,]+)", text).group(1).replace(",", ""))


@pytest.mark.parametrize("preset, layout, active_b", [
    ("glm4.6-355b-a32b", ["--tp", "8", "--pp", "4", "--ep", "16", "--etp", "1"], 32.08),
    ("glm4.5-air-106b-a12b", ["--tp", "4", "--pp", "2", "--ep", "8", "--etp", "1"], 12.18),
])
def test_preset_totals_equal_transformers(preset, layout, active_b):
    proc = run_tool("tools/model_summary.py", "--preset", preset, *layout)
    assert proc.returncode == 0, proc.stderr
    total = number(proc.stdout, "total parameters:")
    assert total == hf_meta_param_count(preset)
    mtp = number(proc.stdout, "MTP layer(s), separate:")
    assert mtp > 0  # reported separately, never silently dropped
    # The "A32B" / "A12B" in the names count active parameters without embedding and head.
    active = float(re.search(r"without embedding and output layer: [\d,]+ \(([\d.]+) B\)",
                             proc.stdout).group(1))
    assert active == pytest.approx(active_b, abs=0.01)
    stages = re.findall(r"^\s+\d+\s+[\d,]+", proc.stdout, flags=re.M)
    assert len(stages) == int(layout[layout.index("--pp") + 1])


@pytest.mark.parametrize("preset, layout, world", [
    ("glm4-9b", ["--tp", "2"], "8"),  # GLM-4-9B has 2 KV groups: TP at most 2
    ("glm4-9b-0414", ["--tp", "2", "--pp", "2"], "8"),
    ("glm4-32b-0414", ["--tp", "2", "--pp", "1"], "16"),
])
def test_dense_preset_totals_equal_transformers(preset, layout, world):
    proc = run_tool("tools/model_summary.py", "--preset", preset, *layout, "--world-size", world)
    assert proc.returncode == 0, proc.stderr
    total = number(proc.stdout, "total parameters:")
    assert total == hf_meta_param_count(preset)
    if preset == "glm4-9b":
        assert total == 9_399_951_360  # GLM-4-9B's published count (GlmForCausalLM)
    assert number(proc.stdout, "active per token:") == total  # dense: every parameter is active
    assert number(proc.stdout, "routed experts:") == 0


def test_summary_from_hf_config_matches_the_checkpoint(tiny_hf_dir):
    proc = run_tool("tools/model_summary.py", "--hf-config", str(tiny_hf_dir), "--tp", "2",
                    "--ep", "2")
    assert proc.returncode == 0, proc.stderr
    from transformers import Glm4MoeForCausalLM

    hf = Glm4MoeForCausalLM.from_pretrained(str(tiny_hf_dir))
    assert number(proc.stdout, "total parameters:") == sum(p.numel() for p in hf.parameters())


@pytest.mark.parametrize("args, message", [
    (["--preset", "glm5"], "unknown model preset 'glm5'"),
    (["--preset", "glm4.6-355b-a32b", "--tp", "16"], "TP=16 does not divide the 8 KV groups"),
    (["--preset", "glm4.6-355b-a32b", "--ep", "7"], "EP=7 does not divide the 160 routed experts"),
])
def test_bad_input(args, message):
    proc = run_tool("tools/model_summary.py", *args)
    assert proc.returncode == 2
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr
