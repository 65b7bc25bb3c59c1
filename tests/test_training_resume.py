"""Preemption and crash recovery through the real CLI on 2 gloo ranks (EP=2).

One run is stopped by SIGTERM (Slurm preemption: it must save and exit 0), resumed with
``--resume auto``, killed with ``kill -9`` mid-run (no chance to save), and resumed again; its
per-step losses must equal those of the same config never interrupted (run in-process by the
suite worker) to 1e-6.
"""

import json
import signal
import time

import psutil
import pytest
from workers.train_common import (
    build_tiny_data,
    complete_steps,
    kill_job,
    logged_steps,
    read_train_log,
    run_glm,
    start_glm,
    tiny_config,
    wait_for,
    write_config,
)

from helpers.launch import torchrun

STEPS = 60


def _config(data, out_dir):
    return tiny_config(
        data, out_dir,
        training={"max_steps": STEPS},
        checkpoint={"save_strategy": "steps", "checkpoint_interval": 4, "save_final": True},
        parallel={"expert_model_parallel_size": 2})


def _start(cfg_file, *extra):
    return start_glm("sft", "--config", cfg_file, *extra)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    out = tmp_path_factory.mktemp("resume_data")
    info = build_tiny_data(str(out))
    (out / "data.json").write_text(json.dumps(info))
    return out


def test_sigterm_then_kill9_resume_equals_uninterrupted(data, tmp_path):
    info = json.loads((data / "data.json").read_text())
    out_dir = str(tmp_path / "run")
    cfg_file = write_config(_config(info, out_dir), str(tmp_path / "sft.yaml"))

    # 1. SIGTERM to the workers (what Slurm does on preemption) -> checkpoint, exit 0.
    proc = _start(cfg_file)
    wait_for(lambda: logged_steps(out_dir) >= 6, proc)
    workers = psutil.Process(proc.pid).children()  # torchrun's ranks
    assert len(workers) == 2
    for w in workers:
        w.send_signal(signal.SIGTERM)
    text = proc.communicate(timeout=300)[0]
    assert proc.returncode == 0, text[-4000:]
    assert "checkpoint saved at step" in text
    stopped = complete_steps(out_dir)[-1]
    assert 6 <= stopped < STEPS
    state = json.loads((tmp_path / "run" / f"iter_{stopped:07d}" / "trainer_state.json").read_text())
    assert state["step"] == stopped and state["consumed_samples"] == 8 * stopped

    # 2. Resume, then kill -9 the whole job (no handler runs) after one more checkpoint.
    proc = _start(cfg_file, "--resume", "auto")
    wait_for(lambda: complete_steps(out_dir)[-1] >= stopped + 4, proc)
    kill_job(proc)
    killed_at = logged_steps(out_dir)
    assert killed_at < STEPS, "the run finished before it could be killed"

    # 3. Resume again to the end.
    _, text = run_glm("sft", "--config", cfg_file, "--resume", "auto")
    assert "resumed from" in text and f"sft finished at step {STEPS}" in text
    resumed = read_train_log(out_dir)
    assert sorted(resumed) == list(range(1, STEPS + 1))

    # The same config, never interrupted (another output dir), in one in-process run.
    ref_cfg = _config(info, str(tmp_path / "reference"))
    ref_cfg["checkpoint"].update(save_strategy="no", save_final=False)
    write_config(ref_cfg, str(tmp_path / "reference.yaml"))
    torchrun("tests/workers/train_suite.py", "--data", str(data / "data.json"), "--out",
             str(tmp_path), "--runs", "reference", "--reference-config",
             str(tmp_path / "reference.yaml"))
    ref = dict(json.loads((tmp_path / "results.json").read_text())["reference"]["history"])
    assert len(ref) == STEPS
    diff = max(abs(resumed[s] - ref[s]) for s in ref)
    assert diff <= 1e-6, (diff, resumed, ref)
    assert ref[STEPS] < ref[1] - 1.0  # it trained


def test_a_dying_rank_ends_the_job_with_a_clear_error(data, tmp_path):
    """kill -9 of one rank: the job must end at once, naming the rank, not hang in a collective."""
    info = json.loads((data / "data.json").read_text())
    out_dir = str(tmp_path / "run")
    cfg = _config(info, out_dir)
    cfg["training"]["max_steps"] = 10_000
    proc = _start(write_config(cfg, str(tmp_path / "sft.yaml")))
    wait_for(lambda: logged_steps(out_dir) >= 2, proc)
    victim = psutil.Process(proc.pid).children()[1]
    victim.send_signal(signal.SIGKILL)
    started = time.time()
    text = proc.communicate(timeout=120)[0]
    assert proc.returncode != 0
    assert time.time() - started < 60
    assert f"pid: {victim.pid}" in text and "Signal 9 (SIGKILL)" in text


def test_a_pipeline_stage_with_nothing_to_train_is_refused(data, tmp_path):
    """All of stage 0 frozen (embedding + its 2 layers) would hang the optimizer's checkpoint."""
    info = json.loads((data / "data.json").read_text())
    cfg = _config(info, str(tmp_path / "run"))
    cfg["parallel"] = {"pipeline_model_parallel_size": 2}
    cfg["model"].update(freeze_embeddings=True, freeze_encoder_layers=2)
    proc = _start(write_config(cfg, str(tmp_path / "sft.yaml")))
    text = proc.communicate(timeout=300)[0]
    assert proc.returncode != 0
    assert "leave a rank (a whole pipeline stage) with nothing to train" in text
