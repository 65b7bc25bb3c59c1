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


# ----------------------------------------------------------------------------- LoRA
def peft_adapter_count(preset: str, targets, r: int) -> int:
    """peft's trainable-parameter count for LoRA on transformers' model of the preset
    (``targets``: target_modules, or a dict of LoraConfig arguments)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM

    hf = get_preset(preset).to_hf_dict()
    config = AutoConfig.for_model(hf.pop("model_type"), **hf)
    kwargs = targets if isinstance(targets, dict) else {"target_modules": targets}
    model = get_peft_model(AutoModelForCausalLM.from_config(config),
                           LoraConfig(r=r, lora_alpha=2 * r, **kwargs))
    trainable, _ = model.get_nb_trainable_parameters()
    assert trainable == sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    return trainable


def lora_stage_rows(text: str) -> list[tuple[int, float]]:
    """(adapter params, frozen GiB) per stage from the LoRA per-rank table."""
    table = text.split("per rank with LoRA", 1)[1]
    return [(int(n.replace(",", "")), float(g))
            for n, g in re.findall(r"^\s+\d+\s+([\d,]+)\s+([\d.]+) GiB", table, flags=re.M)]


LORA_CASES = [
    # preset, --lora-targets, the same targets for peft, r, layout
    ("glm4-9b-tiny", "q_proj,v_proj", ["q_proj", "v_proj"], 8, ["--tp", "2"]),  # k_proj not
    ("glm4-9b-tiny", "all-linear", "all-linear", 4, ["--tp", "2", "--pp", "2"]),
    ("glm4-moe-tiny", "q_proj,k_proj,v_proj", ["q_proj", "k_proj", "v_proj"], 8,
     ["--tp", "2", "--ep", "2"]),
    # MoE: peft adapts gate/up/down as the routed experts' fused parameters (gate_up at rank 2r)
    ("glm4-moe-tiny", "gate_proj,up_proj,down_proj", ["gate_proj", "up_proj", "down_proj"], 8,
     ["--tp", "2", "--ep", "2"]),
    # ... and the shared expert and the dense layer only as parameters (what our export writes).
    ("glm4-moe-tiny", "all-linear", dict(
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        target_parameters=[f"{m}.{p}_proj.weight" for m in ("shared_experts", "mlp")
                           for p in ("gate", "up", "down")]), 16, ["--pp", "2"]),
]


@pytest.mark.parametrize("preset, targets, peft_targets, r, layout", LORA_CASES)
def test_lora_adapter_count_equals_peft(preset, targets, peft_targets, r, layout):
    proc = run_tool("tools/model_summary.py", "--preset", preset, *layout, "--lora-r", str(r),
                    "--lora-targets", targets)
    assert proc.returncode == 0, proc.stderr
    assert number(proc.stdout, "trainable (adapter) parameters:") == \
        peft_adapter_count(preset, peft_targets, r)
    stages = lora_stage_rows(proc.stdout)
    assert len(stages) == (int(layout[layout.index("--pp") + 1]) if "--pp" in layout else 1)
    assert all(n > 0 for n, _ in stages)


REAL_BUILD = """
import json, sys
from glm_megatron.parallel import ParallelLayout, initialize_parallel, install_cpu_support
install_cpu_support()
import torch.distributed as dist
from glm_megatron.models import get_preset
from glm_megatron.models.config import model_shape
from glm_megatron.models.loading import build_glm_model
from glm_megatron.models.lora import LoraSettings, attach_lora, resolve_targets
counts = {}
for preset, targets, r in json.loads(sys.argv[2]):
    glm = get_preset(preset)
    layout = ParallelLayout(tensor_model_parallel_size=2)
    initialize_parallel(layout, model_shape(glm))
    chunks, _ = build_glm_model(glm, layout)
    settings = LoraSettings(r=r, targets=resolve_targets(glm, targets.split(",")))
    counts[f"{preset} {targets} {r}"] = attach_lora(chunks, glm, settings)
gathered = [None] * dist.get_world_size()
dist.all_gather_object(gathered, counts)
if dist.get_rank() == 0:
    open(sys.argv[1], "w").write(json.dumps(gathered))
"""


def test_lora_per_rank_counts_equal_a_real_build(tmp_path):
    """The meta-device count per rank is what attach_lora creates on a real TP=2 build."""
    import json

    from helpers.launch import torchrun

    cases = [("glm4-9b-tiny", "all-linear", 4), ("glm4-moe-tiny", "q_proj,k_proj,v_proj,o_proj", 8)]
    script, out = tmp_path / "count.py", tmp_path / "counts.json"
    script.write_text(REAL_BUILD)
    torchrun(str(script), str(out), json.dumps(cases), nproc=2)
    real = json.loads(out.read_text())
    for preset, targets, r in cases:
        proc = run_tool("tools/model_summary.py", "--preset", preset, "--tp", "2",
                        "--lora-r", str(r), "--lora-target-modules", targets)
        assert proc.returncode == 0, proc.stderr
        ((per_rank, _),) = lora_stage_rows(proc.stdout)
        assert [ranks[f"{preset} {targets} {r}"] for ranks in real] == [per_rank, per_rank]


def test_lora_memory_of_glm4_9b():
    """The tutorial's r=8 on q, k, v at TP=2: adapters counted by hand, a frozen bf16 base."""
    proc = run_tool("tools/model_summary.py", "--preset", "glm4-9b", "--tp", "2",
                    "--world-size", "8", "--lora-r", "8")
    assert proc.returncode == 0, proc.stderr
    h, kv, layers, r = 4096, 2 * 128, 40, 8
    assert number(proc.stdout, "trainable (adapter) parameters:") == \
        layers * (3 * r * h + r * (h + kv + kv))  # A of q, k, v + their B
    assert "LoRA r=8 on q_proj, k_proj, v_proj" in proc.stdout
    ((per_rank, frozen_gib),) = lora_stage_rows(proc.stdout)
    assert per_rank == layers * (3 * r * h + r * (h + kv + kv) // 2)  # B split over TP
    params = int(re.search(r"^\s+0\s+([\d,]+)", proc.stdout, flags=re.M).group(1).replace(",", ""))
    assert frozen_gib == pytest.approx(params * 2 / 1024**3, abs=0.005)


@pytest.mark.parametrize("args, message", [
    (["--preset", "glm4-moe-tiny", "--lora-r", "8", "--lora-targets", "gate_up_proj"],
     "--lora-targets: gate_up_proj is not a linear module of a glm4_moe model; valid: q_proj, "
     "k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj, shared_experts.gate_proj, "
     "shared_experts.up_proj, shared_experts.down_proj, mlp.gate_proj, mlp.up_proj, "
     "mlp.down_proj or all-linear"),
    (["--preset", "glm4.5-air-106b-a12b", "--tp", "4", "--etp", "2", "--lora-r", "8",
      "--lora-targets", "all-linear"],
     "--etp: LoRA on the routed experts needs expert tensor parallelism 1 or equal to the tensor "
     "parallel size (4), got 2"),
    (["--preset", "glm4-9b-tiny", "--lora-targets", "q_proj"], "--lora-targets needs --lora-r"),
])
def test_lora_bad_input(args, message):
    proc = run_tool("tools/model_summary.py", *args)
    assert proc.returncode == 2
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr
