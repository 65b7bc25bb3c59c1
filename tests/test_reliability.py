"""Failure and safety: a failing rank ends the job at once, checkpoints never run code, output
directories are protected, bad checkpoints and data are named.

One real 2-rank SFT run (CLI, checkpoints at steps 1 and 2) is shared by the module; two more
launches resume copies of it with a planted fault each (a truncated RNG file on one rank; a
pickle payload in the newest checkpoint's metadata). Everything else calls the library code the
commands call, on copies of that run's files.
"""

import json
import os
import pickle
import shutil
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch
from workers.train_common import build_tiny_data, read_train_log, tiny_config, write_config

from glm_megatron.data.encoding import EncodeOptions, encode_sft
from glm_megatron.data.errors import DataValidationError, SkipCounter
from glm_megatron.data.readers import read_examples
from glm_megatron.data.readers.schema import Conversation
from glm_megatron.engine import checkpointing as ckpt
from glm_megatron.engine import rng_state, run_dir
from glm_megatron.engine.config import CheckpointSection, ModelSection, TrainConfigError
from glm_megatron.models.config import ConfigError
from glm_megatron.models.torch_dist_files import (
    CheckpointFileError,
    check_torch_dist,
    weights_only_loads,
)
from helpers.launch import REPO, run_job, run_tool
from helpers.launch import test_env as launch_env

# A job that hangs would sit in a collective for the 30-minute process-group timeout; every job
# here must end well before that (and before pytest's own timeout).
JOB_LIMIT = 300


def _glm(*args):
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
            "-m", "glm_megatron", *args]


def _config(info, out_dir, steps):
    return tiny_config(info, out_dir, training={"max_steps": steps},
                       checkpoint={"save_strategy": "steps", "checkpoint_interval": 1,
                                   "save_final": True})


class Payload:
    """A pickle that runs code when loaded: it creates ``marker``."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """(data info, the run dir with iter_0000001 and iter_0000002, its per-step losses)."""
    root = tmp_path_factory.mktemp("reliability")
    info = build_tiny_data(str(root / "data"), n_train=64, n_val=16, n_test=4)
    run = root / "run"
    cfg = write_config(_config(info, str(run), 2), str(root / "sft.yaml"))
    code, out, seconds = run_job(_glm("sft", "--config", cfg), JOB_LIMIT)
    assert code == 0, out[-4000:]
    print(f"base run: {seconds:.1f} s")
    assert ckpt.latest_checkpoint(str(run)).endswith("iter_0000002")
    assert not (run / run_dir.LOCK_FILE).exists()  # released at the end
    return info, run, read_train_log(str(run))


def _copy_run(run, dest):
    shutil.copytree(run, dest)
    return dest


# ---------------------------------------------------------------------------------------------
# Launched: one rank's failure; a refused checkpoint passed over


def test_one_ranks_corrupt_file_ends_the_job_at_once_with_its_message(base, tmp_path):
    info, run, _ = base
    run = _copy_run(run, tmp_path / "run")
    bad = run / "iter_0000002" / "rng" / "rank_00001.safetensors"
    bad.write_bytes(bad.read_bytes()[:100])  # only rank 1 reads it, after the process group exists
    cfg = write_config(_config(info, str(run), 4), str(tmp_path / "sft.yaml"))
    code, out, seconds = run_job(_glm("sft", "--config", cfg, "--resume", "auto"), JOB_LIMIT)
    print(f"failing resume ended after {seconds:.1f} s")
    assert code != 0
    message = f"[rank 1] error: checkpoint.resume: {bad}: unreadable RNG state, truncated or corrupt"
    assert out.count(message) == 1, out[-4000:]
    assert out.count(str(bad)) == 1  # printed once, by the rank that failed
    assert "[rank 0] error" not in out and "[rank0]: Traceback" not in out
    assert not (run / run_dir.LOCK_FILE).exists()  # released on the failure path too


def test_resume_auto_passes_over_a_refused_checkpoint_and_cuts_the_log(base, tmp_path):
    info, run, losses = base
    run = _copy_run(run, tmp_path / "run")
    marker = tmp_path / "code_ran"
    (run / "iter_0000002" / "model" / ".metadata").write_bytes(pickle.dumps(Payload(marker)))
    with open(run / "train_log.jsonl", "a", encoding="utf-8") as fh:  # a run killed at step 5
        fh.writelines(json.dumps({"step": s, "loss": 99.0}) + "\n" for s in (3, 4, 5))
        fh.write('{"step": 6, "lo')  # torn by the kill
    cfg = write_config(_config(info, str(run), 3), str(tmp_path / "sft.yaml"))
    code, out, _ = run_job(_glm("sft", "--config", cfg, "--resume", "auto"), JOB_LIMIT)
    assert code == 0, out[-4000:]
    assert not marker.exists()
    assert f"resuming from {run / 'iter_0000001'}, the newest usable checkpoint" in out
    assert "passed over: iter_0000002" in out and "refused: it references posix.system" in out
    assert "train_log.jsonl: dropped 5 row(s) after step 1" in out
    rows = [json.loads(line)["step"] for line in (run / "train_log.jsonl").read_text().splitlines()]
    assert rows == [1, 2, 3]  # each step once
    resumed = read_train_log(str(run))
    assert abs(resumed[2] - losses[2]) < 1e-6  # step 2 replayed exactly from iter_0000001


# ---------------------------------------------------------------------------------------------
# No pickle from checkpoints


def test_rng_state_is_saved_without_pickle_and_old_files_still_load(tmp_path):
    state = {"python": __import__("random").getstate(), "numpy": np.random.get_state(),
             "torch": torch.get_rng_state(), "tracker": {"model-parallel-rng": torch.get_rng_state()}}
    new = tmp_path / "rank_00000.safetensors"
    rng_state.write_rng_state(str(new), state)
    from safetensors import safe_open

    with safe_open(str(new), "pt") as fh:  # a plain safetensors file: tensors + JSON metadata
        assert set(fh.keys()) == {"torch", "tracker/model-parallel-rng"}
    old = tmp_path / "rank_00000.pt"
    torch.save(state, old)  # the format of earlier versions
    for file in (new, old):
        back = rng_state.read_rng_state(str(file))
        assert back["python"] == state["python"]
        assert np.array_equal(back["numpy"][1], state["numpy"][1]) and back["numpy"][2] == state["numpy"][2]
        assert torch.equal(back["torch"], state["torch"])
        assert torch.equal(back["tracker"]["model-parallel-rng"], state["torch"])


def test_a_planted_pickle_payload_never_runs(base, tmp_path):
    marker = tmp_path / "code_ran"
    legacy = tmp_path / "rank_00000.pt"
    torch.save({"python": Payload(marker), "numpy": None, "torch": None, "tracker": {}}, legacy)
    with pytest.raises(TrainConfigError, match=r"rank_00000.pt: refused: it references posix.system"):
        rng_state.read_rng_state(str(legacy))
    model = _copy_run(base[1] / "iter_0000001" / "model", tmp_path / "model")
    (model / ".metadata").write_bytes(pickle.dumps(Payload(marker)))
    with pytest.raises(CheckpointFileError, match=r"\.metadata: refused: it references posix.system"):
        check_torch_dist(str(model))
    # torch_dist byte items are loaded by torch's DefaultLoadPlanner with weights_only=False:
    # inside our loads every torch.load is weights-only.
    with weights_only_loads(), pytest.raises(pickle.UnpicklingError):
        torch.load(legacy, weights_only=False)
    assert not marker.exists()


# ---------------------------------------------------------------------------------------------
# Output directories


def test_the_converter_never_deletes_a_run_or_its_own_input(base, tmp_path):
    from glm_megatron.conversion import output_dir

    run = _copy_run(base[1], tmp_path / "run")
    before = sorted(os.listdir(run))
    proc = run_tool("tools/convert_checkpoint.py", "megatron-to-hf", "--load", str(run / "latest"),
                    "--output-dir", str(run), "--overwrite")
    assert proc.returncode == 2, proc.stderr
    assert f"{run}: the output directory holds this conversion's input {run / 'latest'}" in proc.stderr
    assert sorted(os.listdir(run)) == before
    # Without the input check, what a run directory holds is still no conversion's output.
    with pytest.raises(ConfigError, match=r"--overwrite refused: the directory holds iter_0000001"):
        output_dir.check_output_dir(str(run), overwrite=True)
    done = tmp_path / "export"
    output_dir.start(str(done))
    (tmp_path / "export.partial" / "config.json").write_text("{}")
    output_dir.finish(str(done))
    output_dir.check_output_dir(str(done), overwrite=True)  # our own export: replaceable
    (done / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="holds notes.txt, which no conversion wrote"):
        output_dir.check_output_dir(str(done), overwrite=True)


def test_a_training_run_claims_its_output_directory(base, tmp_path):
    info, run, _ = base
    # The CLI: a fresh run into a directory with checkpoints is refused before any work.
    cfg = write_config(_config(info, str(run), 2), str(tmp_path / "sft.yaml"))
    proc = subprocess.run([sys.executable, "-m", "glm_megatron", "sft", "--config", cfg], cwd=REPO,
                          env=launch_env(), capture_output=True, text=True, timeout=JOB_LIMIT)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert (f"error: checkpoint.output_dir: {run} already holds checkpoints (iter_0000001, "
            "iter_0000002); pass --resume auto") in proc.stderr
    assert "Traceback" not in proc.stderr

    copy = _copy_run(run, tmp_path / "run")
    section = CheckpointSection(output_dir=str(copy))
    with pytest.raises(TrainConfigError, match="pass only one of them"):
        run_dir.claim(CheckpointSection(output_dir=str(copy), resume="auto"), True, True)
    # Two runs: the second is refused while the first holds the lock.
    first = run_dir.claim(CheckpointSection(output_dir=str(copy), resume="auto"), False, True)
    with pytest.raises(TrainConfigError, match=rf"in use by another run \(host {socket.gethostname()}, "
                                               rf"pid {os.getpid()}"):
        run_dir.claim(CheckpointSection(output_dir=str(copy), resume="auto"), False, True)
    first.release()
    # A lock left by a killed run (its pid is gone on this host) is taken over.
    gone = subprocess.Popen(["true"])
    gone.wait()
    lock = copy / run_dir.LOCK_FILE
    lock.write_text(json.dumps({"host": socket.gethostname(), "pid": gone.pid, "started": "x"}))
    run_dir.claim(CheckpointSection(output_dir=str(copy), resume="auto"), False, True).release()
    assert not lock.exists()
    # A lock of another host is never broken.
    lock.write_text(json.dumps({"host": "elsewhere", "pid": 1, "started": "x"}))
    with pytest.raises(TrainConfigError, match="host elsewhere, pid 1"):
        run_dir.claim(CheckpointSection(output_dir=str(copy), resume="auto"), False, True)
    lock.unlink()
    # --overwrite: the previous run's checkpoints, markers, logs and events go, nothing else.
    (copy / "notes.txt").write_text("mine")
    run_dir.claim(section, True, True).release()
    assert sorted(os.listdir(copy)) == ["notes.txt"]


def test_step_logs_are_cut_back_to_the_start_step(tmp_path):
    rows = [{"step": s, "loss": float(s)} for s in (1, 2, 3, 4, 5)]
    log = tmp_path / "train_log.jsonl"
    log.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "samples.jsonl").write_text('{"step": 3, "prompt": "a"}\n{"step": 1, "prompt": "b"}\n')
    (tmp_path / "data.jsonl").write_text('{"conversations": []}\n')  # not a step log: untouched
    cut = run_dir.cut_step_logs(str(tmp_path), 2)
    assert cut == {str(log): 3, str(tmp_path / "samples.jsonl"): 1}
    assert [json.loads(x)["step"] for x in log.read_text().splitlines()] == [1, 2]
    assert (tmp_path / "data.jsonl").read_text() == '{"conversations": []}\n'


# ---------------------------------------------------------------------------------------------
# Checkpoint validation before loading


def test_corrupt_or_mismatched_checkpoints_are_named(base, tmp_path, caplog):
    run = _copy_run(base[1], tmp_path / "run")
    it1, it2 = run / "iter_0000001", run / "iter_0000002"
    # COMPLETE is required for any weights directory inside an iter_* directory.
    os.remove(it2 / ckpt.COMPLETE)
    with pytest.raises(TrainConfigError, match=r"iter_0000002/model: inside checkpoint .*incomplete"):
        ckpt.resolve_model_dir(str(it2 / "model"))
    # A truncated shard is named before anything is read.
    shard = sorted((it2 / "model").glob("*.distcp"))[0]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointFileError, match=rf"{shard.name}: truncated \({len(data) // 2} bytes"):
        check_torch_dist(str(it2 / "model"))
    # A shard overwritten with random bytes: named, and no advice to load with weights_only=False.
    shard.write_bytes(np.random.default_rng(0).bytes(len(data)))
    from glm_megatron.conversion.dist_reader import TorchDistReader

    reader = TorchDistReader(str(it2 / "model"))
    with pytest.raises(CheckpointFileError) as err:
        reader.load(sorted(reader.tensors))
    assert f"{shard}: corrupt" in str(err.value) and "weights_only" not in str(err.value)
    # trainer_state.json: named; an explicit resume refuses it, --resume auto falls back.
    (it1 / "trainer_state.json").write_text('{"step": 1, "sch')
    with pytest.raises(TrainConfigError, match=r"iter_0000001/trainer_state.json: unreadable, truncated"):
        ckpt.resolve_resume(str(it1), str(run))
    with pytest.raises(TrainConfigError, match="no usable checkpoint in"):
        ckpt.resolve_resume("auto", str(run))  # iter_0000002 is incomplete, iter_0000001 unusable
    # --resume auto with nothing to resume says so, once, and starts fresh.
    with caplog.at_level("WARNING"):
        assert ckpt.resolve_resume("auto", str(tmp_path / "empty")) is None
    assert "no complete checkpoint in" in caplog.text and "starting a fresh run" in caplog.text
    # A preset that is not the checkpoint's architecture: every differing field, both values.
    with pytest.raises(TrainConfigError, match=r"hidden_size: model.preset 256 vs checkpoint 64"):
        ckpt.check_architecture_matches(ModelSection(preset="glm4-moe-small",
                                                     load_checkpoint=str(base[1] / "iter_0000001")))
    ckpt.check_architecture_matches(ModelSection(preset="glm4-moe-tiny",
                                                 load_checkpoint=str(base[1] / "iter_0000001")))


def test_hf_index_entries_are_checked_against_their_shards(tmp_path):
    from safetensors.torch import save_file

    from glm_megatron.models.hf_checkpoint import HFCheckpointReader

    save_file({"a.weight": torch.zeros(2)}, str(tmp_path / "model-00001-of-00002.safetensors"))
    save_file({"b.weight": torch.zeros(2)}, str(tmp_path / "model-00002-of-00002.safetensors"))
    weight_map = {"a.weight": "model-00001-of-00002.safetensors",
                  "b.weight": "model-00002-of-00002.safetensors",
                  "c.weight": "model-00002-of-00002.safetensors"}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(ConfigError, match=r"1 tensor\(s\) listed for model-00002-of-00002.safetensors "
                                          r"are not in that file: c.weight"):
        HFCheckpointReader(str(tmp_path))
    del weight_map["c.weight"]
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    assert HFCheckpointReader(str(tmp_path)).names() == ["a.weight", "b.weight"]


def test_model_shapes_are_checked_before_a_load(base):
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    from glm_megatron.models.checkpoint import check_shapes
    from glm_megatron.models.torch_dist_files import read_metadata

    model = str(base[1] / "iter_0000001" / "model")
    wrong = {"e": ShardedTensor.from_rank_offsets("embedding.word_embeddings.weight", torch.zeros(7, 64))}
    with pytest.raises(ConfigError, match=r"embedding.word_embeddings.weight: checkpoint \(512, 64\) "
                                          r"vs model \(7, 64\)"):
        check_shapes(wrong, read_metadata(model), model)
    right = {"e": ShardedTensor.from_rank_offsets("embedding.word_embeddings.weight", torch.zeros(512, 64))}
    check_shapes(right, read_metadata(model), model)


# ---------------------------------------------------------------------------------------------
# Data


def test_empty_assistant_turns_and_empty_files_are_errors(tmp_path):
    from glm_megatron.data.tokenizer import load_tokenizer
    from glm_megatron.data.tokenizing import tokenize_files

    info = build_tiny_data(str(tmp_path / "data"), n_train=16, n_val=4, n_test=2)
    tok = load_tokenizer(info["tokenizer"])
    empty_turn = Conversation([{"role": "user", "content": "hi"}, {"role": "assistant", "content": " "}])
    with pytest.raises(DataValidationError, match="message 1: empty assistant turn"):
        encode_sft(tok, empty_turn, EncodeOptions())
    src = tmp_path / "in.jsonl"
    good = {"conversations": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}
    src.write_text(json.dumps(good) + "\n" + json.dumps(empty_turn.to_json()) + "\n")
    with pytest.raises(DataValidationError, match=rf"{src}:2: message 1: empty assistant turn"):
        tokenize_files([str(src)], str(tmp_path / "tok"), tok, "sft", EncodeOptions())
    summary = tokenize_files([str(src)], str(tmp_path / "tok2"), tok, "sft", EncodeOptions(),
                             skip_invalid=True)
    assert summary["skipped_by_reason"] == {"empty assistant turn": 1}, summary
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(DataValidationError, match=rf"{empty}: empty input file"):
        list(read_examples(str(empty), "sft", SkipCounter(skip_invalid=True)))
