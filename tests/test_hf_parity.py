"""Our Megatron GLM models equal HF transformers' at TP1/TP2+SP/EP2/PP2/PP2×VPP2.

Three families, one torchrun launch (2 gloo ranks) each running every layout; see
tests/workers/parity_worker.py:

* ``glm4_moe`` vs ``Glm4MoeForCausalLM``: a dense first layer and three MoE layers, QK norm,
  partial rotary, routed scaling 2.5 and a random expert bias, so each feature changes the logits;
* ``glm`` vs ``GlmForCausalLM`` (GLM-4-9B): interleaved partial rotary, fused gate_up_proj;
* ``glm4`` vs ``Glm4ForCausalLM`` (GLM-4-0414): the same plus sandwich norms.
"""

import json

import pytest

from helpers.launch import run_tool, torchrun
from helpers.tiny_hf import make_tiny_dense_hf_checkpoint, make_tiny_hf_checkpoint

LAYOUTS = {
    "glm4_moe": ["tp1", "tp2sp", "ep2", "pp2", "pp2vpp2", "tp2ep2"],
    "glm": ["tp1", "tp2sp", "pp2", "pp2vpp2"],
    "glm4": ["tp1", "tp2sp", "pp2", "pp2vpp2"],
}
# Layouts that also load the MTP layer (MoE only) and round-trip a torch_dist checkpoint.
CKPT_LAYOUTS = {"glm4_moe": "tp2sp,ep2", "glm": "tp2sp", "glm4": "tp2sp"}
CASES = [(family, layout) for family, layouts in LAYOUTS.items() for layout in layouts]
LOGITS_TOL = 1e-4  # fp32, absolute
GRAD_REL_TOL = 1e-4  # fp32, max |Δgrad| / max |grad_hf| per parameter


@pytest.fixture(scope="module")
def parity_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("parity")


@pytest.fixture(scope="module")
def hf_dirs(tiny_hf_dir, parity_dir):
    dense = {t: make_tiny_dense_hf_checkpoint(str(parity_dir / f"hf_{t}"), t, seed=3)
             for t in ("glm", "glm4")}
    return {"glm4_moe": str(tiny_hf_dir), **dense}


@pytest.fixture(scope="module")
def parity_runs(hf_dirs, parity_dir):
    """family -> the worker's JSON result, each family launched once, on first use."""
    results = {}

    def run(family):
        if family not in results:
            out = parity_dir / f"result_{family}.json"
            torchrun(
                "tests/workers/parity_worker.py", "--hf-dir", hf_dirs[family], "--out", str(out),
                "--layouts", ",".join(LAYOUTS[family]), "--mtp-layouts", CKPT_LAYOUTS[family],
                "--ckpt-dir", str(parity_dir / "ckpt" / family),
            )
            results[family] = json.loads(out.read_text())
        return results[family]

    return run


@pytest.fixture(scope="module")
def parity(parity_runs):
    return parity_runs("glm4_moe")


@pytest.mark.parametrize("family,layout", CASES)
def test_logits_match_hf(parity_runs, family, layout):
    ranks = parity_runs(family)["layouts"][layout]
    with_logits = [r for r in ranks if "logits_max_abs_diff" in r]
    assert with_logits, f"{family} {layout}: no rank reported logits"
    for r in with_logits:
        assert r["logits_max_abs_diff"] < LOGITS_TOL, r
        assert r["top1_agreement"] == 1.0, r
        assert abs(r["loss"] - r["hf_loss"]) < 1e-5, r


@pytest.mark.parametrize("family,layout", CASES)
def test_gradients_match_hf(parity_runs, family, layout):
    for r in parity_runs(family)["layouts"][layout]:
        assert r["grads_checked"] > 0, r
        assert r["grad_max_rel_err"] < GRAD_REL_TOL, r


@pytest.mark.parametrize("family", ["glm", "glm4"])
def test_dense_checkpoint_round_trips(parity_runs, family):
    for r in parity_runs(family)["layouts"]["tp2sp"]:
        assert r["mtp_params"] == 0 and r["ckpt_mismatched"] == [], r


@pytest.mark.parametrize("family", list(LAYOUTS))
def test_pipeline_stages_split_the_parameters(parity_runs, family):
    parity = parity_runs(family)
    first, last = parity["layouts"]["pp2"]
    full = parity["layouts"]["tp1"][0]["grads_checked"]
    # Each stage holds only its own layers; together they hold all of them (the embedding and
    # output layer are on different stages, so nothing is counted twice).
    assert 0 < first["grads_checked"] < full and 0 < last["grads_checked"] < full
    assert first["grads_checked"] + last["grads_checked"] == full


@pytest.mark.parametrize("layout", ["tp2sp", "ep2"])
def test_mtp_layer_loads_and_checkpoint_round_trips(parity, layout):
    for r in parity["layouts"][layout]:
        assert r["mtp_params"] > 0, r
        assert r["ckpt_mismatched"] == [], r


def test_verify_tool_passes_on_a_checkpoint_saved_at_another_layout(parity, parity_dir, tiny_hf_dir):
    # Written at TP=2+SP by the worker, checked at PP=2: Megatron reshards on load.
    ckpt = parity_dir / "ckpt" / "glm4_moe" / "tp2sp"
    out = torchrun("tools/verify_hf_parity.py", "--hf-dir", str(tiny_hf_dir), "--load", str(ckpt),
                   "--pp", "2")
    assert "PASS" in out and "TP=1 PP=2" in out
    diff = float(out.split("max |Δlogits|:")[1].split()[0])
    assert diff < LOGITS_TOL


def test_verify_tool_fails_on_weights_of_another_model(parity, parity_dir, tmp_path):
    other = make_tiny_hf_checkpoint(str(tmp_path / "other"), seed=1)
    with pytest.raises(AssertionError) as err:
        torchrun("tools/verify_hf_parity.py", "--hf-dir", other, "--load",
                 str(parity_dir / "ckpt" / "glm4_moe" / "ep2"), "--ep", "2")
    assert "FAIL" in str(err.value) and "exited 1" in str(err.value)


def test_verify_tool_passes_on_a_dense_glm4_checkpoint(parity_runs, parity_dir, hf_dirs):
    # A GLM-4-0414 checkpoint (sandwich norms) written at TP=2+SP, checked at PP=2.
    parity_runs("glm4")
    out = torchrun("tools/verify_hf_parity.py", "--hf-dir", hf_dirs["glm4"], "--load",
                   str(parity_dir / "ckpt" / "glm4" / "tp2sp"), "--pp", "2")
    assert "PASS" in out and float(out.split("max |Δlogits|:")[1].split()[0]) < LOGITS_TOL


def test_verify_tool_bad_input(tmp_path):
    proc = run_tool("tools/verify_hf_parity.py", "--hf-dir", str(tmp_path / "missing"))
    assert proc.returncode == 2
    assert "missing: no such file" in proc.stderr and "Traceback" not in proc.stderr
