"""tools/gpu_check.py on a machine without a GPU: exit 3 with every CUDA stage SKIP, the stage
runner records a raising stage as FAIL and goes on, --only selects, bad flags are refused, and
the parsers read what the tools really print."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TOOL = REPO / "tools" / "gpu_check.py"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"tool_{name}", REPO / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


gpu_check = _load("gpu_check")  # puts tools/ on sys.path, so its helpers import by name
import gpu_check_run as run  # noqa: E402
import gpu_check_stages as stages  # noqa: E402


def _no_gpu_env() -> dict:
    return dict(os.environ, CUDA_VISIBLE_DEVICES="", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")


def _run_tool(*args, timeout=120):
    return subprocess.run([sys.executable, str(TOOL), *map(str, args)], cwd=REPO, env=_no_gpu_env(),
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def no_cuda(monkeypatch):
    monkeypatch.setattr(gpu_check, "cuda_available", lambda: False)


def _ctx(tmp_path, cuda=True) -> run.Context:
    return run.Context(repo=REPO, out=tmp_path, python=sys.executable, cuda=cuda, timeouts={})


# --- the whole script without a GPU -----------------------------------------------------------


def test_without_a_gpu_exits_3_and_writes_the_summary_with_cuda_stages_skipped(tmp_path):
    proc = _run_tool("--out", tmp_path)
    assert proc.returncode == 3, proc.stdout + proc.stderr
    doc = json.loads((tmp_path / "summary.json").read_text())
    assert doc["exit_status"] == 3 and doc["cuda"] is False
    assert doc["verdict"].startswith("NO GPU") and "not a pass" in doc["verdict"]
    by_key = {s["key"]: s for s in doc["stages"]}
    assert list(by_key) == ["env", "kernels", "bench", "train", "parity"]
    assert by_key["env"]["status"] == "PASS"
    assert by_key["env"]["data"]["torch"] and "no CUDA device" in by_key["env"]["figures"]
    for key in ("kernels", "bench", "train", "parity"):
        assert by_key[key]["status"] == "SKIP", by_key[key]
        assert "CUDA" in by_key[key]["detail"]
    md = (tmp_path / "summary.md").read_text()
    assert "| stage | status | key figures | seconds | peak GPU memory |" in md
    assert "NO GPU (exit 3)" in md and "SKIP (needs CUDA" in md
    # The same table on stdout, with the verdict last but for the paths.
    assert "| 1. environment | PASS |" in proc.stdout
    assert "NO GPU (exit 3): nothing was checked on a GPU" in proc.stdout


def test_only_selects_stages_by_key_or_number(tmp_path, no_cuda, capsys):
    assert gpu_check.main(["--out", str(tmp_path / "a"), "--only", "env"]) == 3
    doc = json.loads((tmp_path / "a" / "summary.json").read_text())
    assert [s["key"] for s in doc["stages"]] == ["env"]
    capsys.readouterr()
    # numbers and keys mix; the table keeps the stages' order
    assert gpu_check.main(["--out", str(tmp_path / "b"), "--only", "5, bench"]) == 3
    doc = json.loads((tmp_path / "b" / "summary.json").read_text())
    assert [(s["key"], s["status"]) for s in doc["stages"]] == [("bench", "SKIP"), ("parity", "SKIP")]
    assert "environment" not in capsys.readouterr().out


@pytest.mark.parametrize("argv,message", [
    (["--only", "nope"], "--only: unknown stage 'nope' (stages: 1 env, 2 kernels, 3 bench"),
    (["--only", "9"], "--only: unknown stage '9'"),
    (["--only", ","], "--only: no stage named"),
    (["--timeout-per-stage", "0"], "--timeout-per-stage: must be > 0"),
    (["--timeout-per-stage", "soon"], "--timeout-per-stage: expected seconds, got 'soon'"),
    (["--bogus"], "unrecognized arguments: --bogus"),
])
def test_bad_flags_are_refused_with_a_clear_error(argv, message, tmp_path, no_cuda, capsys):
    with pytest.raises(SystemExit) as exc:
        gpu_check.main(["--out", str(tmp_path), *argv])
    assert exc.value.code == run.EXIT_BAD_FLAGS == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "summary.json").exists()


def test_timeout_per_stage_replaces_every_default(tmp_path, no_cuda):
    gpu_check.main(["--out", str(tmp_path), "--only", "env", "--timeout-per-stage", "42"])
    doc = json.loads((tmp_path / "summary.json").read_text())
    assert set(doc["timeouts"].values()) == {42.0}


def test_default_timeouts_keep_the_run_under_8_minutes():
    assert sum(s.timeout or 0 for s in gpu_check.STAGES) <= 480 - 30  # 30 s for the environment


# --- the stage runner --------------------------------------------------------------------------


def test_a_raising_stage_is_fail_with_its_message_and_the_others_still_run(tmp_path):
    calls = []

    def boom(ctx):
        calls.append("boom")
        raise RuntimeError("kaput in the middle")

    def exits(ctx):
        calls.append("exits")
        sys.exit(7)  # a stage's sys.exit must not end the run either

    def fails(ctx):
        calls.append("fails")
        raise run.StageFailed("loss is nan", tail="last line of the log")

    def fine(ctx):
        calls.append("fine")
        return run.Outcome(run.PASS, "42 TFLOP/s", "1.00 GiB (torch)")

    fake = [run.Stage("a", "boom", boom, False, None), run.Stage("b", "exits", exits, False, None),
            run.Stage("c", "fails", fails, False, None), run.Stage("d", "fine", fine, False, None)]
    rows = run.run_stages(fake, _ctx(tmp_path))
    assert calls == ["boom", "exits", "fails", "fine"]
    assert [r.status for r in rows] == ["FAIL", "FAIL", "FAIL", "PASS"]
    assert rows[0].figures == "RuntimeError: kaput in the middle"
    assert "Traceback" in rows[0].detail and "kaput in the middle" in rows[0].detail
    assert rows[1].figures == "SystemExit: 7"
    assert rows[2].figures == "loss is nan" and "last line of the log" in rows[2].detail
    assert rows[3].figures == "42 TFLOP/s" and rows[3].memory == "1.00 GiB (torch)"
    assert run.exit_status(rows, cuda=True) == 1
    assert run.exit_status(rows, cuda=False) == 1  # a failure wins over "no GPU"
    assert run.exit_status(rows[3:], cuda=True) == 0
    assert run.exit_status(rows[3:], cuda=False) == 3
    details = run.failure_details(rows)
    assert "### boom: FAIL" in details and "### fine" not in details


def test_a_cuda_stage_without_cuda_is_skipped_and_not_called(tmp_path):
    def never(ctx):
        raise AssertionError("called")

    row = run.run_stage(run.Stage("x", "x", never, True, 10), _ctx(tmp_path, cuda=False))
    assert row.status == "SKIP" and "needs CUDA" in row.detail
    assert run.status_cell(row) == "SKIP (needs CUDA, none visible)"
    def skips(ctx):
        raise run.StageSkip("why")

    skip = run.run_stage(run.Stage("y", "y", skips, False, None), _ctx(tmp_path))
    assert skip.status == "SKIP" and skip.detail == "why"


def test_table_cells_escape_pipes():
    row = run.Row("p", "parity", "PASS", "max |Δ| 0.1", 1.0, "n/a", "", {})
    line = run.table([row]).splitlines()[-1]
    assert "max \\|Δ\\| 0.1" in line and line.count(" | ") == 4


def test_a_subprocess_past_its_timeout_is_killed_and_reported_with_its_tail(tmp_path):
    code = "import time; print('started', flush=True); time.sleep(60)"
    res = run.run_logged([sys.executable, "-c", code], tmp_path / "x.log", 2, dict(os.environ), tmp_path)
    assert res.timed_out and res.seconds < 30
    assert "started" in res.tail and "killed after 2 s" in res.tail
    with pytest.raises(run.StageFailed, match="timed out"):
        run.require_ok(res, "sleeper")
    ok = run.run_logged([sys.executable, "-c", "print('hi')"], tmp_path / "y.log", 30, dict(os.environ),
                        tmp_path)
    assert ok.rc == 0 and ok.tail.endswith("hi")
    with pytest.raises(run.StageFailed, match="exit status 3"):
        run.require_ok(run.run_logged([sys.executable, "-c", "raise SystemExit(3)"], tmp_path / "z.log",
                                      30, dict(os.environ), tmp_path), "three")


# --- the parsers on what the tools print -------------------------------------------------------

GPU_BENCH = "\n".join([  # what tools/bench_kernels_gpu.py prints on a GPU
    "# device: NVIDIA H100 80GB HBM3; peaks: bf16 989.4 TFLOP/s, HBM 3350.0 GB/s",
    "# log-prob + KL(k3) fwd+bwd, N=16384 H=5120 V/TP=18944 bfloat16",
    "  ours (glm_kernels.token_logprobs)          21.00 ms  useful   453.2 TFLOP/s (46 % of peak)  "
    "executed   604.3 TFLOP/s  extra peak memory 0.31 GiB",
    "  materialised logits + cross_entropy        30.00 ms  useful   317.3 TFLOP/s (32 % of peak)  "
    "executed   317.3 TFLOP/s  extra peak memory 4.75 GiB",
    "# GAE B=4096 T=8192 fp32, right-padded",
    "  ours (glm_kernels.compute_gae)     0.300 ms    1900.0 GB/s (57 % of HBM peak)",
    "  clone of the inputs                0.200 ms    2800.0 GB/s (84 % of HBM peak)",
])


def test_bench_parser_reads_shares_and_goals():
    b = stages.parse_bench(GPU_BENCH)
    assert b["missing"] == [] and b["device"] == "NVIDIA H100 80GB HBM3"
    assert math.isclose(b["logprob"]["ours"]["share"], 453.2 / 989.4)
    assert b["logprob"]["ours"]["extra_peak_gib"] == 0.31
    assert b["goals"]["logprob_share_of_bf16_peak"]["met"] is False
    assert b["goals"]["gae_share_of_hbm_bandwidth"]["met"] is True
    text = stages.bench_figures(b)
    assert "453.2 TFLOP/s = 46 % of bf16 peak (goal >= 50 %: NOT met)" in text
    assert "GAE 1900 GB/s = 57 % of HBM (goal >= 50 %: met)" in text


def test_bench_parser_reads_the_real_bench_output():
    proc = subprocess.run([sys.executable, "tools/bench_kernels_gpu.py", "--device", "cpu", "--quick"],
                          cwd=REPO, env=_no_gpu_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    b = stages.parse_bench(proc.stdout)
    assert b["missing"] == [], proc.stdout
    assert b["device"] == "cpu" and b["peak_tflops"] is None
    # (on a CPU the rates may print as 0.0; the times never do)
    assert all(b[s][k]["ms"] > 0 for s, k in (("logprob", "ours"), ("logprob", "materialised"),
                                                ("gae", "ours"), ("gae", "copy")))
    assert b["goals"]["gae_share_of_hbm_bandwidth"]["met"] is None  # no peak for a CPU


def test_bench_parser_names_what_it_could_not_read():
    b = stages.parse_bench(GPU_BENCH.replace("  clone of the inputs", "  something else"))
    assert b["missing"] == []  # any second GAE line is the copy baseline
    b = stages.parse_bench("\n".join(GPU_BENCH.splitlines()[:3]))
    assert b["missing"] == ["logprob.materialised", "gae.ours", "gae.copy"]


def _junit(tmp_path, cases) -> Path:
    body = "".join(f'<testcase classname="tests.t" name="{n}">{inner}</testcase>' for n, inner in cases)
    path = tmp_path / "junit.xml"
    path.write_text(f'<?xml version="1.0"?><testsuites><testsuite name="pytest">{body}</testsuite>'
                    "</testsuites>")
    return path


def test_kernel_tests_without_the_native_cuda_checks_fail_on_a_gpu(tmp_path):
    skipped = '<skipped message="needs a CUDA device"/>'
    counts = stages.parse_junit(_junit(tmp_path, [
        ("test_triton_kernel[cpu: gae packed]", ""), ("test_triton_kernel[cuda: gae packed]", skipped),
        ("test_gae[numba]", '<failure message="boom"/>')]))
    assert (counts["passed"], counts["failed"], counts["skipped"], counts["cuda_skipped"]) == (1, 1, 1, 1)
    problems = stages.judge_kernel_tests(counts, cuda=True)
    assert any("1 failed: tests.t::test_gae[numba]" in p for p in problems)
    assert any("native CUDA checks did not run" in p for p in problems)
    counts = stages.parse_junit(_junit(tmp_path, [("test_triton_kernel[cuda: gae packed]", "")]))
    assert stages.judge_kernel_tests(counts, cuda=True) == []


PARITY_OUT = """\
layout:           TP=1 PP=1 CP=1 EP=1 ETP=1
max |Δlogits|:    6.758e-01  (tolerance 1.3e+00)
mean |Δlogits|:   2.183e-02
top-1 agreement:  0.9688  (minimum 0.875)
FAIL
"""


def test_parity_parser_and_tolerances():
    got = stages.parse_parity(PARITY_OUT)
    assert got == {"max_abs_diff": 0.6758, "mean_abs_diff": 0.02183, "top1_agreement": 0.9688,
                   "verdict": "FAIL"}
    assert stages.parse_parity("error: bad dir")["verdict"] is None
    # never looser than twice transformers' own bf16 error, never stricter than the tool's defaults
    assert stages.parity_tolerances({"max_abs_diff": 0.66, "top1_agreement": 0.9375}) == (1.32, 0.875)
    assert stages.parity_tolerances({"max_abs_diff": 0.01, "top1_agreement": 1.0}) == (0.5, 0.99)


# --- the training stage's configs and logs -----------------------------------------------------


def test_generated_training_configs_load_with_the_trainers_schemas(tmp_path):
    import yaml

    from glm_megatron.algorithms.ppo.config import PPOConfig
    from glm_megatron.algorithms.rm.config import RMConfig
    from glm_megatron.algorithms.sft.config import SFTConfig
    from glm_megatron.engine.config import load_config

    configs = stages.train_configs(REPO, tmp_path)
    for name, schema in (("sft", SFTConfig), ("rm", RMConfig), ("ppo", PPOConfig)):
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(configs[name]))
        cfg = load_config(str(path), schema=schema)
        assert cfg.parallel.expert_model_parallel_size == 1
        assert cfg.checkpoint.output_dir == str(tmp_path / name)
    sft = load_config(str(tmp_path / "sft.yaml"), schema=SFTConfig)
    assert sft.training.max_steps == stages.TRAIN_STEPS["sft"] and sft.training.mixed_precision == "bf16"
    assert sft.data.train_data_path.startswith(str(tmp_path / "data"))
    ppo = load_config(str(tmp_path / "ppo.yaml"), schema=PPOConfig)
    assert ppo.rlhf.max_steps == stages.TRAIN_STEPS["ppo"] and ppo.rlhf.reward_model == str(tmp_path / "rm")


def test_training_log_check_catches_nan_short_logs_and_skipped_steps(tmp_path):
    log = tmp_path / "train_log.jsonl"

    def write(rows):
        log.write_text("".join(json.dumps(r) + "\n" for r in rows))

    write([{"step": 1, "loss": 6.3}, {"step": 2, "loss": 5.1}])
    assert stages.check_log(log, 2, ("loss",)) == {"loss": [6.3, 5.1]}
    write([{"step": 1, "loss": 6.3}, {"step": 2, "loss": float("nan")}])
    with pytest.raises(run.StageFailed, match="not finite: step 2: loss=nan"):
        stages.check_log(log, 2, ("loss",))
    write([{"step": 1, "loss": 6.3}])
    with pytest.raises(run.StageFailed, match="1 rows, expected 2"):
        stages.check_log(log, 2, ("loss",))
    write([{"step": 1, "policy_loss": 0.1, "skipped_steps": 1}])
    with pytest.raises(run.StageFailed, match="1 optimizer step"):
        stages.check_log(log, 1, ("policy_loss",))
    with pytest.raises(run.StageFailed, match="was not written"):
        stages.check_log(tmp_path / "missing.jsonl", 1, ("loss",))
