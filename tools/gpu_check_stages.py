"""The five stages of tools/gpu_check.py, and the parsers of what their subprocesses print.

Each stage is ``fn(ctx) -> Outcome`` (tools/gpu_check_run.py). The subprocesses are the
project's own entry points: pytest on the kernel tests, tools/bench_kernels_gpu.py,
``python -m torch.distributed.run ... -m glm_megatron sft|rm|ppo`` on the configs of
examples/tiny_ppo (data from examples/tiny_ppo/make_data.py) and tools/verify_hf_parity.py on
the tiny random checkpoints of tests/helpers/tiny_hf.py.
"""

from __future__ import annotations

import copy
import importlib
import importlib.metadata
import json
import math
import re
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

from gpu_check_run import (
    PASS,
    Context,
    Deadline,
    Outcome,
    StageFailed,
    gib,
    quiet_into,
    require_ok,
    run_logged,
)

# ---------------------------------------------------------------------------------------------
# 1. environment


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _try_import(name: str) -> tuple[object | None, str]:
    """(module or None, its version or the import error)."""
    try:
        module = importlib.import_module(name)
    except Exception as err:  # TE raises OSError / RuntimeError on a CUDA mismatch, not only ImportError
        return None, f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
    return module, getattr(module, "__version__", None) or "?"


def environment_facts(cuda: bool) -> dict:
    import torch
    import torch.distributed as dist

    facts = {"python": sys.version.split()[0], "torch": torch.__version__,
             "torch_cuda": torch.version.cuda, "cuda_available": bool(cuda),
             "megatron_core": _version("megatron-core"), "transformers": _version("transformers")}
    triton, facts["triton"] = _try_import("triton")
    facts["triton_ok"] = triton is not None
    te, facts["transformer_engine"] = _try_import("transformer_engine")
    facts["transformer_engine_ok"] = te is not None
    facts["nccl_available"] = bool(dist.is_available() and dist.is_nccl_available())
    if cuda:
        props = torch.cuda.get_device_properties(0)
        facts.update(device=torch.cuda.get_device_name(0), device_count=torch.cuda.device_count(),
                     capability=f"{props.major}.{props.minor}",
                     device_memory_gib=round(props.total_memory / 2**30, 1),
                     bf16_supported=bool(torch.cuda.is_bf16_supported()))
        try:
            v = torch.cuda.nccl.version()
            facts["nccl_version"] = ".".join(map(str, v)) if isinstance(v, tuple) else str(v)
        except Exception as err:  # noqa: BLE001 - reported, not fatal
            facts["nccl_version"] = f"unknown ({err})"
    else:
        facts.update(device="none (no CUDA device visible)", bf16_supported=None)
    return facts


def bf16_smoke(torch) -> tuple[bool, int]:
    """A bf16 GEMM on the device is finite and close to fp32; returns (ok, peak bytes)."""
    torch.cuda.reset_peak_memory_stats()
    g = torch.Generator(device="cuda").manual_seed(0)
    a = torch.randn(2048, 2048, device="cuda", generator=g)
    b = torch.randn(2048, 2048, device="cuda", generator=g)
    full = a @ b
    half = (a.bfloat16() @ b.bfloat16()).float()
    torch.cuda.synchronize()
    rel = ((half - full).norm() / full.norm()).item()
    return bool(torch.isfinite(half).all().item() and rel < 2e-2), torch.cuda.max_memory_allocated()


def stage_environment(ctx: Context) -> Outcome:
    import torch

    f = environment_facts(ctx.cuda)
    te = f"TE {f['transformer_engine']}" if f["transformer_engine_ok"] else "TE not importable"
    triton = f"Triton {f['triton']}" if f["triton_ok"] else "Triton not importable"
    if not ctx.cuda:
        figures = (f"no CUDA device; torch {f['torch']} (CUDA build: {f['torch_cuda'] or 'none'}), "
                   f"{triton}, {te}, NCCL {'yes' if f['nccl_available'] else 'no'}")
        return Outcome(PASS, figures, data=f)
    ok, peak = bf16_smoke(torch)
    f["bf16_gemm_ok"] = ok
    figures = (f"{f['device']} (sm {f['capability']}, {f['device_memory_gib']} GiB) x{f['device_count']}; "
               f"torch {f['torch']} CUDA {f['torch_cuda']}; bf16 {'yes' if f['bf16_supported'] else 'NO'}"
               f"{'' if ok else ' (bf16 GEMM WRONG)'}; {triton}; {te}; NCCL "
               f"{f.get('nccl_version', '?') if f['nccl_available'] else 'NOT available'}")
    problems = [what for what, bad in (
        ("bf16 not supported", not f["bf16_supported"]), ("bf16 GEMM wrong", not ok),
        ("NCCL not available", not f["nccl_available"]), ("Triton not importable", not f["triton_ok"]),
        ("Transformer Engine not importable (pip install -e '.[gpu]')", not f["transformer_engine_ok"]),
    ) if bad]
    memory = gib(peak, "torch")
    if problems:
        raise StageFailed("; ".join(problems) + f" | {figures}", data=f)
    return Outcome(PASS, figures, memory, data=f)


# ---------------------------------------------------------------------------------------------
# 2. the kernel tests

KERNEL_TESTS = ("tests/test_kernels_triton.py", "tests/test_kernels_logprobs.py",
                "tests/test_kernels_gae.py")


def parse_junit(path: Path) -> dict:
    """Counts of a pytest --junitxml report; ``cuda_*`` count the tests whose id names cuda."""
    counts = {k: 0 for k in ("passed", "failed", "skipped", "cuda_passed", "cuda_failed", "cuda_skipped")}
    failed_names = []
    for case in ET.parse(path).getroot().iter("testcase"):
        name = case.get("name", "")
        kinds = {child.tag for child in case}
        kind = ("failed" if kinds & {"failure", "error"} else "skipped" if "skipped" in kinds
                else "passed")
        counts[kind] += 1
        if "[cuda" in name:
            counts[f"cuda_{kind}"] += 1
        if kind == "failed":
            failed_names.append(f"{case.get('classname', '')}::{name}")
    counts["failed_names"] = failed_names
    return counts


def judge_kernel_tests(counts: dict, cuda: bool) -> list[str]:
    problems = []
    if counts["failed"]:
        problems.append(f"{counts['failed']} failed: " + ", ".join(counts["failed_names"][:5]))
    if counts["passed"] == 0:
        problems.append("no test passed")
    if cuda and (counts["cuda_skipped"] or not counts["cuda_passed"]):
        problems.append(f"the native CUDA checks did not run ({counts['cuda_passed']} passed, "
                        f"{counts['cuda_skipped']} skipped)")
    return problems


def stage_kernel_tests(ctx: Context) -> Outcome:
    d = ctx.stage_dir("kernels", clean=True)
    files = [f for f in KERNEL_TESTS if (ctx.repo / f).is_file()]
    missing = [f for f in KERNEL_TESTS if f not in files]
    if not files:
        raise StageFailed(f"none of {', '.join(KERNEL_TESTS)} exists")
    junit = d / "junit.xml"
    cmd = [ctx.python, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", "addopts=-ra",
           f"--junitxml={junit}", *files]
    res = run_logged(cmd, d / "pytest.log", ctx.timeouts["kernels"], ctx.subprocess_env(), ctx.repo)
    if res.timed_out:
        raise StageFailed(f"pytest timed out after {res.seconds:.0f} s", res.tail)
    if not junit.is_file():
        raise StageFailed(f"pytest wrote no report (exit status {res.rc})", res.tail)
    counts = parse_junit(junit)
    data = dict(counts, cmd=res.cmd, log=str(res.log), missing=missing)
    figures = (f"{counts['passed']} passed, {counts['failed']} failed, {counts['skipped']} skipped; "
               f"native CUDA checks {counts['cuda_passed']} passed / {counts['cuda_skipped']} skipped")
    if missing:
        figures += f"; missing: {', '.join(missing)}"
    memory = gib(res.peak_memory, "nvidia-smi")
    problems = judge_kernel_tests(counts, ctx.cuda)
    if res.rc not in (0,) and not problems:
        problems.append(f"pytest exit status {res.rc}")
    if problems:
        raise StageFailed("; ".join(problems) + f" ({figures})", res.tail, data)
    return Outcome(PASS, figures, memory, data=data)


# ---------------------------------------------------------------------------------------------
# 3. the kernel benchmark (tools/bench_kernels_gpu.py, `make bench-gpu`)

GOAL_SHARE = 0.5  # issue 4: log-prob >= 50 % of bf16 peak, GAE >= 50 % of HBM bandwidth
_NUM = r"[0-9][0-9.eE+-]*"
_DEVICE = re.compile(r"^# device: (?P<name>.*); peaks: bf16 (?P<tflops>\S+) TFLOP/s, HBM (?P<gbs>\S+) GB/s")
_LOGPROB = re.compile(rf"^\s+(?P<name>.+?)\s+(?P<ms>{_NUM}) ms\s+useful\s+(?P<useful>{_NUM}) TFLOP/s .*?"
                      rf"executed\s+(?P<executed>{_NUM}) TFLOP/s\s+extra peak memory (?P<mem>.+?)\s*$")
_GAE = re.compile(rf"^\s+(?P<name>.+?)\s+(?P<ms>{_NUM}) ms\s+(?P<gbs>{_NUM}) GB/s \(")
_MEM = re.compile(rf"(?P<v>{_NUM}) GiB")


def _peak(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None  # "n/a": a device the bench has no datasheet figures for


def parse_bench(text: str) -> dict:
    """The figures tools/bench_kernels_gpu.py prints: {device, peak_tflops, peak_gbs, logprob:
    {ours, materialised}, gae: {ours, copy}}; shares of the peaks where the peaks are known."""
    out = {"device": None, "peak_tflops": None, "peak_gbs": None, "logprob": {}, "gae": {}}
    section = None
    for line in text.splitlines():
        m = _DEVICE.match(line)
        if m:
            out.update(device=m["name"], peak_tflops=_peak(m["tflops"]), peak_gbs=_peak(m["gbs"]))
            continue
        if line.startswith("# log-prob"):
            section = "logprob"
            continue
        if line.startswith("# GAE"):
            section = "gae"
            continue
        if section == "logprob" and (m := _LOGPROB.match(line)):
            key = "ours" if m["name"].startswith("ours") else "materialised"
            mem = _MEM.search(m["mem"])
            out["logprob"][key] = {"ms": float(m["ms"]), "tflops": float(m["useful"]),
                                   "executed_tflops": float(m["executed"]),
                                   "extra_peak_gib": float(mem["v"]) if mem else None}
        elif section == "gae" and (m := _GAE.match(line)):
            key = "ours" if m["name"].startswith("ours") else "copy"
            out["gae"][key] = {"ms": float(m["ms"]), "gbs": float(m["gbs"])}
    for entry in out["logprob"].values():
        entry["share"] = entry["tflops"] / out["peak_tflops"] if out["peak_tflops"] else None
    for entry in out["gae"].values():
        entry["share"] = entry["gbs"] / out["peak_gbs"] if out["peak_gbs"] else None
    missing = [f"{s}.{k}" for s, keys in (("logprob", ("ours", "materialised")), ("gae", ("ours", "copy")))
               for k in keys if k not in out[s]]
    out["missing"] = missing
    out["goals"] = {
        "logprob_share_of_bf16_peak": _goal(out["logprob"].get("ours", {}).get("share")),
        "gae_share_of_hbm_bandwidth": _goal(out["gae"].get("ours", {}).get("share")),
    }
    return out


def _goal(share: float | None) -> dict:
    return {"value": share, "goal": GOAL_SHARE, "met": None if share is None else share >= GOAL_SHARE}


def _pct(share) -> str:
    return "n/a" if share is None else f"{100 * share:.0f} %"


def _goal_text(goal: dict) -> str:
    met = goal["met"]
    state = "unknown (no peak for this device)" if met is None else "met" if met else "NOT met"
    return f"goal >= {100 * goal['goal']:.0f} %: {state}"


def bench_figures(b: dict) -> str:
    lp, gae = b["logprob"], b["gae"]
    return (f"log-prob fwd+bwd {lp['ours']['tflops']:.1f} TFLOP/s = {_pct(lp['ours']['share'])} of bf16 peak "
            f"({_goal_text(b['goals']['logprob_share_of_bf16_peak'])}), materialised logits "
            f"{lp['materialised']['tflops']:.1f} = {_pct(lp['materialised']['share'])}; "
            f"GAE {gae['ours']['gbs']:.0f} GB/s = {_pct(gae['ours']['share'])} of HBM "
            f"({_goal_text(b['goals']['gae_share_of_hbm_bandwidth'])}), plain copy "
            f"{gae['copy']['gbs']:.0f} GB/s = {_pct(gae['copy']['share'])}")


def stage_kernel_bench(ctx: Context) -> Outcome:
    d = ctx.stage_dir("bench", clean=True)
    smoke = ["--device", "cpu", "--quick"] if ctx.cpu_smoke else []
    cmd = [ctx.python, "tools/bench_kernels_gpu.py", *smoke]
    res = run_logged(cmd, d / "bench.log", ctx.timeouts["bench"], ctx.subprocess_env(), ctx.repo)
    require_ok(res, "tools/bench_kernels_gpu.py")
    b = parse_bench(res.log.read_text(encoding="utf-8", errors="replace"))
    b.update(cmd=res.cmd, log=str(res.log))
    (d / "bench.json").write_text(json.dumps(b, indent=2) + "\n", encoding="utf-8")
    if b["missing"]:
        raise StageFailed(f"could not read {', '.join(b['missing'])} from the bench output", res.tail, b)
    ours, mat = b["logprob"]["ours"]["extra_peak_gib"], b["logprob"]["materialised"]["extra_peak_gib"]
    memory = (f"log-prob +{ours:.2f} GiB vs materialised +{mat:.2f} GiB (torch)" if ours is not None
              else gib(res.peak_memory, "nvidia-smi"))
    return Outcome(PASS, bench_figures(b), memory, data=b)


# ---------------------------------------------------------------------------------------------
# 4. tiny SFT -> reward model -> PPO through the real CLI, on one GPU

TRAIN_STEPS = {"sft": 5, "rm": 5, "ppo": 3}


def set_key(cfg: dict, dotted: str, value) -> None:
    node = cfg
    *path, last = dotted.split(".")
    for part in path:
        node = node.setdefault(part, {})
    node[last] = value


def train_configs(repo: Path, d: Path) -> dict:
    """{stage: config dict}: examples/tiny_ppo's three configs on one rank (EP=1), a handful of
    steps, bf16, data and outputs under ``d``. Every key is one the trainers' schemas know."""
    import yaml

    data, steps = d / "data", TRAIN_STEPS
    changes = {
        "sft": {
            "training.max_steps": steps["sft"], "training.mixed_precision": "bf16",
            "evaluation.eval_steps": steps["sft"], "evaluation.eval_at_start": False,
            "checkpoint.checkpoint_interval": steps["sft"], "checkpoint.save_total_limit": 1,
            "checkpoint.output_dir": str(d / "sft"),
            "data.train_data_path": str(data / "tokenized_sft_train/train"),
            "data.validation_data_path": str(data / "tokenized_sft_val/train"),
        },
        "rm": {
            "model.load_checkpoint": str(d / "sft"),
            "training.max_steps": steps["rm"], "training.mixed_precision": "bf16",
            "evaluation.eval_steps": steps["rm"], "checkpoint.save_steps": steps["rm"],
            "checkpoint.save_total_limit": 1, "checkpoint.output_dir": str(d / "rm"),
            "data.train_data_path": str(data / "tokenized_pref_train/train"),
            "data.validation_data_path": str(data / "tokenized_pref_val/train"),
        },
        "ppo": {
            "rlhf.policy_model": str(d / "sft"), "rlhf.reward_model": str(d / "rm"),
            "rlhf.max_steps": steps["ppo"], "rlhf.save_steps": steps["ppo"], "rlhf.eval_steps": steps["ppo"],
            "rlhf.batch_size": 16, "rlhf.mini_batch_size": 8, "rlhf.mixed_precision": "bf16",
            "checkpoint.output_dir": str(d / "ppo"), "checkpoint.save_total_limit": 1,
            "data.prompt_data_path": str(data / "tokenized_prompts_train/train"),
            "data.validation_prompt_path": str(data / "tokenized_prompts_val/train"),
            "data.max_validation_prompts": 16,
        },
    }
    configs = {}
    for name, file in (("sft", "sft.yaml"), ("rm", "rm.yaml"), ("ppo", "ppo.yaml")):
        with open(repo / "examples/tiny_ppo" / file, encoding="utf-8") as fh:
            cfg = copy.deepcopy(yaml.safe_load(fh))
        for key, value in {"parallel.expert_model_parallel_size": 1, "parallel.tensor_model_parallel_size": 1,
                           "logging.log_interval": 1, "logging.progress_bar": False,
                           **changes[name]}.items():
            set_key(cfg, key, value)
        configs[name] = cfg
    return configs


def check_log(path: Path, steps: int, loss_keys: tuple) -> dict:
    """The per-step JSON log: one row per step, every number finite, no skipped optimizer step."""
    if not path.is_file():
        raise StageFailed(f"{path.name} was not written")
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if len(rows) != steps:
        raise StageFailed(f"{path.name}: {len(rows)} rows, expected {steps}")
    bad = [f"step {r.get('step')}: {k}={v}" for r in rows for k, v in r.items()
           if isinstance(v, float) and not math.isfinite(v)]
    if bad:
        raise StageFailed(f"{path.name}: not finite: {', '.join(bad[:5])}")
    skipped = sum(int(r.get("skipped_steps", 0)) for r in rows)
    if skipped:
        raise StageFailed(f"{path.name}: {skipped} optimizer step(s) skipped (NaN/inf gradients)")
    missing = [k for k in loss_keys if k not in rows[0]]
    if missing:
        raise StageFailed(f"{path.name}: no {', '.join(missing)} in its rows")
    return {k: [r[k] for r in rows] for k in loss_keys}


_DTYPE = re.compile(r"dtype torch\.(\w+)")  # the SFT trainer's summary line
_BACKEND = re.compile(r"backend (\w+)")  # initialize_parallel's log line


def stage_train(ctx: Context) -> Outcome:
    import yaml

    d = ctx.stage_dir("train", clean=True)
    deadline = Deadline(ctx.timeouts["train"])
    env = ctx.subprocess_env()
    res = run_logged([ctx.python, "examples/tiny_ppo/make_data.py", "--out", d / "data"], d / "make_data.log",
                     deadline.left("examples/tiny_ppo/make_data.py"), env, ctx.repo)
    require_ok(res, "examples/tiny_ppo/make_data.py")
    configs = train_configs(ctx.repo, d)
    with quiet_into(d / "specs.log"):
        from glm_megatron.models.specs import use_transformer_engine

        te = use_transformer_engine() and not ctx.cpu_smoke
    data = {"transformer_engine_specs": te, "runs": {}}
    peaks, parts = [], []
    logs = {"sft": ("train_log.jsonl", ("loss",)), "rm": ("train_log.jsonl", ("loss",)),
            "ppo": ("ppo_log.jsonl", ("mean_reward", "policy_loss", "value_loss"))}
    for name, cfg in configs.items():
        cfg_path = d / f"{name}.yaml"
        cfg_path.write_text(yaml.safe_dump(cfg, sort_keys=False), encoding="utf-8")
        cmd = [ctx.python, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1",
               "-m", "glm_megatron", name, "--config", cfg_path]
        res = run_logged(cmd, d / f"{name}.log", deadline.left(name), env, ctx.repo)
        require_ok(res, f"glm_megatron {name}")
        log_name, keys = logs[name]
        try:
            series = check_log(d / name / log_name, TRAIN_STEPS[name], keys)
        except StageFailed as err:
            raise StageFailed(f"glm_megatron {name}: {err.message}", res.tail) from None
        peaks.append(res.peak_memory)
        data["runs"][name] = {"cmd": res.cmd, "log": str(res.log), "seconds": round(res.seconds, 1),
                              "peak_memory_bytes": res.peak_memory, **series}
        first, last = series[keys[0]][0], series[keys[0]][-1]
        parts.append(f"{name} {keys[0].replace('_', ' ')} {first:.3g}->{last:.3g}")
        if name == "sft":
            text = res.log.read_text(encoding="utf-8", errors="replace")
            data["dtype"] = m[1] if (m := _DTYPE.search(text)) else None
            data["backend"] = m[1] if (m := _BACKEND.search(text)) else None
            if ctx.cuda and (data["dtype"], data["backend"]) != ("bfloat16", "nccl"):
                raise StageFailed(f"SFT ran in {data['dtype']} over {data['backend']}, not bfloat16 "
                                  "over nccl", res.tail, data)
    steps = "/".join(str(TRAIN_STEPS[n]) for n in configs)
    figures = (f"{'; '.join(parts)} ({steps} steps, all finite); {data.get('dtype') or '?'}, "
               f"{'TE specs' if te else 'local specs (Transformer Engine not used)'}, "
               f"{data.get('backend') or '?'}")
    known = [p for p in peaks if p is not None]
    memory = gib(max(known), "nvidia-smi, max of the 3 runs") if known else "n/a (no nvidia-smi)"
    return Outcome(PASS, figures, memory, data=data)


# ---------------------------------------------------------------------------------------------
# 5. parity with transformers in bf16

BF16_TOLERANCE = 0.5  # tools/verify_hf_parity.py's bf16 default for max |Δlogits|
MIN_TOP1 = 0.99  # and its default top-1 agreement
PARITY_BATCH, PARITY_SEQ, PARITY_SEED = 2, 32, 0  # the tool's defaults (run_parity's seed)
_PARITY = {
    "max_abs_diff": re.compile(rf"max \|Δlogits\|:\s+(?P<v>{_NUM})"),
    "mean_abs_diff": re.compile(rf"mean \|Δlogits\|:\s+(?P<v>{_NUM})"),
    "top1_agreement": re.compile(rf"top-1 agreement:\s+(?P<v>{_NUM})"),
}


def parse_parity(text: str) -> dict:
    out = {}
    for key, pattern in _PARITY.items():
        m = pattern.search(text)
        out[key] = float(m["v"]) if m else None
    lines = [line.strip() for line in text.splitlines() if line.strip() in ("PASS", "FAIL")]
    out["verdict"] = lines[-1] if lines else None
    return out


def hf_bf16_floor(hf_dir: str) -> dict:
    """How far transformers' own model in bf16 is from itself in fp32 on the tool's tokens: the
    rounding noise a bf16 comparison cannot get under (MoE routing flips on near-ties)."""
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    cfg = json.loads((Path(hf_dir) / "config.json").read_text(encoding="utf-8"))
    gen = torch.Generator().manual_seed(PARITY_SEED)
    ids = torch.randint(0, cfg["vocab_size"], (PARITY_BATCH, PARITY_SEQ), generator=gen)
    logits = {}
    for dtype in (torch.float32, torch.bfloat16):
        model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=dtype).eval()
        with torch.no_grad():
            logits[dtype] = model(input_ids=ids).logits.float()
    full, half = logits[torch.float32], logits[torch.bfloat16]
    diff = (full - half).abs()
    return {"max_abs_diff": diff.max().item(), "mean_abs_diff": diff.mean().item(),
            "top1_agreement": (full.argmax(-1) == half.argmax(-1)).float().mean().item()}


def parity_tolerances(floor: dict) -> tuple[float, float]:
    """Ours and HF both carry bf16 rounding: allow twice HF's own bf16-vs-fp32 error, never less
    than the tool's bf16 defaults."""
    return (max(BF16_TOLERANCE, 2 * floor["max_abs_diff"]),
            min(MIN_TOP1, 1 - 2 * (1 - floor["top1_agreement"])))


def parity_families():
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from tests.helpers.tiny_hf import make_tiny_dense_hf_checkpoint, make_tiny_hf_checkpoint

    return (("glm4_moe", make_tiny_hf_checkpoint),
            ("glm", lambda out: make_tiny_dense_hf_checkpoint(out, "glm")),
            ("glm4", lambda out: make_tiny_dense_hf_checkpoint(out, "glm4")))


def stage_parity(ctx: Context) -> Outcome:
    d = ctx.stage_dir("parity", clean=True)
    deadline = Deadline(ctx.timeouts["parity"])
    env = ctx.subprocess_env()
    results, parts, failed, peaks, tails = {}, [], [], [], []
    for family, make in parity_families():
        hf_dir = str(d / family)
        try:
            with quiet_into(d / f"{family}_prepare.log"):
                make(hf_dir)
                floor = hf_bf16_floor(hf_dir)
        except Exception as err:  # noqa: BLE001 - this family fails, the others still run
            parts.append(f"{family} could not be prepared")
            failed.append(family)
            tails.append(f"--- {family} ---\n{type(err).__name__}: {err}")
            results[family] = {"ok": False, "error": f"{type(err).__name__}: {err}"}
            continue
        tol, top1 = parity_tolerances(floor)
        cmd = [ctx.python, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1",
               "tools/verify_hf_parity.py", "--hf-dir", hf_dir, "--dtype", "bf16",
               "--batch-size", PARITY_BATCH, "--seq-len", PARITY_SEQ,
               "--max-abs-diff", f"{tol:.4g}", "--min-top1", f"{top1:.4g}"]
        res = run_logged(cmd, d / f"{family}.log", deadline.left(family), env, ctx.repo)
        got = parse_parity(res.log.read_text(encoding="utf-8", errors="replace"))
        ok = res.rc == 0 and got["verdict"] == "PASS"
        results[family] = {"cmd": res.cmd, "log": str(res.log), "rc": res.rc, "hf_bf16_vs_fp32": floor,
                           "tolerance": tol, "min_top1": top1, **got, "ok": ok}
        peaks.append(res.peak_memory)
        if got["max_abs_diff"] is None:
            parts.append(f"{family} {'timed out' if res.timed_out else f'exit {res.rc}'}")
        else:
            parts.append(f"{family} max {got['max_abs_diff']:.3g} (tol {tol:.2g}) mean "
                         f"{got['mean_abs_diff']:.2g} (HF bf16 {floor['mean_abs_diff']:.2g}) top-1 "
                         f"{got['top1_agreement']:.3f} (min {top1:.3f}){'' if ok else ' FAIL'}")
        if not ok:
            failed.append(family)
            tails.append(f"--- {family} ---\n{res.tail}")
    figures = "; ".join(parts)
    (d / "parity.json").write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    if failed:
        raise StageFailed(f"{', '.join(failed)} outside the bf16 tolerance: {figures}", "\n".join(tails),
                          results)
    known = [p for p in peaks if p is not None]
    memory = gib(max(known), "nvidia-smi") if known else "n/a (no nvidia-smi)"
    return Outcome(PASS, figures, memory, data=results)

