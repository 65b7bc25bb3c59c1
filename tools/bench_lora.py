"""LoRA training on CPU: our engine's LoRA vs its full fine-tuning, and vs transformers + peft.

    python tools/bench_lora.py            # tiny dense GLM-4-9B, batch 8 x seq 256, 2 threads, ~1 min
    python tools/bench_lora.py --quick    # 1 warmup + 4 timed steps per side
    python tools/bench_lora.py --lora-targets all-linear --lora-r 16
    python tools/bench_lora.py --hf-full      # also HF full fine-tuning, next to ours full
    python tools/bench_lora.py --shape small  # H=256 (glm4-moe-small's sizes, dense), ~2 min
    python tools/bench_lora.py --profile 30   # also torch.profiler's top ops of one step per side

Shape (docs/ARCHITECTURE.md §8, the SFT benchmark's recipe on a dense model): preset
``glm4-9b-tiny`` (GLM-4-9B's architecture, ``GlmForCausalLM``: H=64, 4 layers, 4 heads / 2 KV
groups), fp32, dropout 0, ``torch.set_num_threads(2)``, one optimizer step per global batch of 8
full-length rows of 256 positions (synthetic SFT rows, loss on the "answer" part only), LoRA r=8,
alpha 16 on q_proj, k_proj, v_proj (the ChatGLM4 tutorial's adapter).

Every side starts from the same weights: the driver saves one random ``GlmForCausalLM`` (HF
safetensors) and one PEFT adapter made by peft for it (its own init: A kaiming-uniform, B zero),
and every side loads those files, so the sides' losses agree step by step (the report shows it).

* ours LoRA: the engine's real training step in a world of one (gloo): ``build_trained_model``
  with ``model.use_peft`` / ``model.lora_adapter`` (base loaded from the HF files, frozen; adapters
  attached by ``models.lora.attach_lora`` and loaded from the PEFT directory) -> :class:`Engine`
  (Megatron DDP, distributed optimizer, AdamW, clipping at 1.0, constant LR) ->
  ``Engine.train_step`` with the SFT trainer's ``lm_forward_step`` on ``SFTBatcher`` micro-batches.
* ours full: the same without ``model.use_peft`` (every parameter trains).
* HF + peft: ``AutoModelForCausalLM.from_pretrained`` (``GlmForCausalLM``) +
  ``PeftModel.from_pretrained(..., is_trainable=True)`` trained by a plain torch loop over peft's
  trainable parameters: ``collate_sft`` batch, forward, masked cross-entropy (sum / supervised
  tokens, as ours), backward, ``clip_grad_norm_(1.0)``, ``torch.optim.AdamW`` with the same LR,
  betas, eps and weight decay. Timed with transformers' default attention (SDPA) and with eager;
  the goal (ours LoRA >= 1.0x HF + peft tokens/s) is judged against the faster.

(a) LoRA vs full fine-tuning in our engine: trainable parameters, the optimizer's state as
allocated (Adam m and v of this rank's distributed-optimizer shard, plus fp32 master copies when
the model is bf16: none here) and the DDP gradient buffers, measured on the live objects after a
step; median step time and the paired ratio of step times. (b) tokens/s of ours LoRA vs HF +
peft, the paired ratio as in tools/bench_sft.py.

Each side runs in its own process (glm_megatron's CPU layer patches torch process-wide; HF's
measurement must not see it) and builds its batches before the clock starts; the driver
interleaves the sides step by step (a worker waiting for its next command uses no CPU), so a
change in machine load hits every side alike. Ratios are medians over the timed steps of per-step
pairs; tokens/s = batch x seq / median step time (every position is a real token).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

from bench_sft import BETAS, CLIP, EPS, LR, WEIGHT_DECAY, SyntheticSFT  # noqa: E402
from bench_workers import (  # noqa: E402
    Worker,
    add_run_flags,
    our_sft_engine,
    plain_adamw_step,
    run_interleaved,
    serve_steps,
)  # noqa: E402

PRESET = "glm4-9b-tiny"
GOAL = 1.0  # ours LoRA >= 1.0x transformers + peft tokens/s
DEFAULT_HF = "default,eager"  # attention implementations of the HF + peft sides
DEFAULT_TARGETS = "q_proj,k_proj,v_proj"
# --shape small: the attention and dense-MLP sizes of bench_sft's glm4-moe-small on the dense
# model, where fixed per-op costs weigh less than at H=64.
SHAPES = {"tiny": {}, "small": dict(hidden_size=256, intermediate_size=512, num_attention_heads=8,
                                    num_key_value_heads=2, head_dim=32, vocab_size=4096)}


def model_config(spec: dict):
    from glm_megatron.models import get_preset

    return get_preset(spec["preset"]).replace(**SHAPES[spec["shape"]])


def fixed_batches(spec: dict):
    """``pool`` global batches of ``batch`` rows of ``seq + 1`` tokens (as tools/bench_sft.py)."""
    import numpy as np

    ds = SyntheticSFT([spec["seq"] + 1] * (spec["pool"] * spec["batch"]),
                      model_config(spec).vocab_size, spec["seed"])
    return ds, [np.arange(i * spec["batch"], (i + 1) * spec["batch"]) for i in range(spec["pool"])]


# ----------------------------------------------------------------------------- shared weights
def make_weights(spec: dict, out: Path) -> tuple[str, str]:
    """One random HF model of the preset and one PEFT adapter for it, saved by transformers and
    peft; every side loads these."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.utils import logging

    logging.disable_progress_bar()
    hf = model_config(spec).to_hf_dict()
    hf.pop("torch_dtype", None)
    config = AutoConfig.for_model(hf.pop("model_type"), **hf)
    torch.manual_seed(spec["seed"])
    model = AutoModelForCausalLM.from_config(config).float()
    hf_dir, adapter_dir = out / "hf", out / "adapter"
    model.save_pretrained(str(hf_dir))
    peft_model = get_peft_model(model, LoraConfig(
        r=spec["r"], lora_alpha=spec["alpha"], lora_dropout=0.0,
        target_modules=list(spec["targets"])))
    peft_model.save_pretrained(str(adapter_dir))
    return str(hf_dir), str(adapter_dir)


# ----------------------------------------------------------------------------- workers
# A worker builds its side, prints READY, then answers one command per stdin line: "step" runs one
# optimizer step on the next prebuilt batch and prints its time; "stats" reports its parameter and
# optimizer-state sizes; "profile N" profiles one step; "quit" exits.
def _tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def _adam_state_bytes(torch_optimizer) -> int:
    """Bytes of Adam's per-parameter state tensors (m, v; the scalar step counters left out)."""
    import torch

    return _tensor_bytes(v for state in torch_optimizer.state.values() for v in state.values()
                         if torch.is_tensor(v) and v.dim() > 0)


def setup_ours(spec: dict):
    from glm_megatron.engine.config import ModelSection
    from glm_megatron.models.lora_names import is_adapter_param

    glm = model_config(spec)
    lora = spec["lora"]
    m = ModelSection(preset=spec["preset"], hf_checkpoint=spec["hf_dir"], use_peft=lora,
                     lora_adapter=spec["adapter_dir"] if lora else None)
    ds, rows = fixed_batches(spec)
    engine, chunks, _, micro, step = our_sft_engine(
        spec, glm, m, ds, rows, lr=LR, betas=BETAS, eps=EPS, weight_decay=WEIGHT_DECAY, clip=CLIP)
    trainable = [(n, p) for c in chunks for n, p in c.named_parameters() if p.requires_grad]
    if lora:
        assert trainable and all(is_adapter_param(n) for n, _ in trainable)

    def stats():
        opts = getattr(engine.optimizer, "chained_optimizers", [engine.optimizer])
        state = sum(_adam_state_bytes(o.optimizer) for o in opts)
        # fp32 master copies of bf16 weights (the distributed optimizer's shards); none in fp32.
        master = sum(_tensor_bytes(p for g in getattr(o, "shard_fp32_from_float16_groups", [])
                                   for p in g) for o in opts)
        grads = sum(_tensor_bytes(b.grad_data for b in d.buffers + d.expert_parallel_buffers)
                    for d in engine.model)
        return {"trainable": sum(p.numel() for _, p in trainable),
                "params": sum(p.numel() for c in chunks for p in c.parameters()),
                "optimizer_bytes": state + master, "grad_bytes": grads}

    info = {"impl": "Megatron-Core local spec, DDP + distributed optimizer (torch AdamW)"
                    + (", LoRA forward hooks on the parallel linears" if lora else "")}
    return step, micro, info, stats


def setup_hf(spec: dict):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from glm_megatron.data.collate import IGNORE_INDEX, collate_sft

    torch.set_num_threads(spec["threads"])
    torch.manual_seed(spec["seed"])
    glm = model_config(spec)
    impl = {"attn_implementation": spec["attn"]} if spec.get("attn") else {}
    base = AutoModelForCausalLM.from_pretrained(spec["hf_dir"], dtype=torch.float32, **impl)
    assert base.config.attention_dropout == 0.0
    model = PeftModel.from_pretrained(base, spec["adapter_dir"], is_trainable=True) \
        if spec.get("peft", True) else base
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    ds, rows = fixed_batches(spec)
    batches = [collate_sft([ds[int(i)] for i in r], glm.pad_token_id or 0) for r in rows]
    assert all(tuple(b["tokens"].shape) == (spec["batch"], spec["seq"]) for b in batches)
    step, opt = plain_adamw_step(model, params, glm.vocab_size, lr=LR, betas=BETAS, eps=EPS,
                                 weight_decay=WEIGHT_DECAY, clip=CLIP, ignore_index=IGNORE_INDEX)

    def stats():
        total = sum(p.numel() for p in model.parameters())
        return {"trainable": sum(p.numel() for p in params), "params": total,
                "optimizer_bytes": _adam_state_bytes(opt),
                "grad_bytes": _tensor_bytes(p.grad for p in params)}

    info = {"impl": f"transformers {type(base).__name__}"
                    f"{' + peft LoRA' if model is not base else ''}, "
                    f"attn={base.config._attn_implementation}, plain loop, torch AdamW"}
    return step, batches, info, stats


SETUPS = {"ours": setup_ours, "hf": setup_hf}


def serve(kind: str, spec: dict) -> None:
    serve_steps(*SETUPS[kind](spec))



# ----------------------------------------------------------------------------- report
def _load() -> str:
    one, five, fifteen = os.getloadavg()
    return f"{one:.2f} / {five:.2f} / {fifteen:.2f} (1 / 5 / 15 min) on {os.cpu_count()} CPUs"


def _paired(a: list[float], b: list[float]) -> float:
    """Median over the timed steps of a_i / b_i (step i of both ran next to each other)."""
    return statistics.median([x / y for x, y in zip(a, b)])


def _sides(hf_impls: str, hf_full: bool) -> list[tuple[str, str, dict]]:
    """(label, worker, extra spec): ours LoRA, ours full, HF + peft per attention impl, then
    (``hf_full``) HF full fine-tuning with transformers' default attention."""
    sides = [("ours LoRA", "ours", {"lora": True}), ("ours full", "ours", {"lora": False})]
    for attn in (a.strip() for a in hf_impls.split(",") if a.strip()):
        extra = {} if attn == "default" else {"attn": attn}
        sides.append((f"HF+peft {attn}", "hf", extra))
    if hf_full:
        sides.append(("HF full", "hf", {"peft": False}))
    return sides


def _mib(n: int) -> str:
    return f"{n / 1024**2:.2f} MiB"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="1 warmup + 4 timed steps per side")
    p.add_argument("--steps", type=int, default=None, help="timed steps per side (default 20)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps per side (default 3)")
    p.add_argument("--preset", default=PRESET, help="a dense preset (default: %(default)s)")
    p.add_argument("--shape", choices=sorted(SHAPES), default="tiny",
                   help="tiny: the preset as it is; small: H=256, 8 heads / 2 KV groups of 32, "
                        "intermediate 512, vocab 4096 (default: %(default)s)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--lora-r", type=int, default=8)
    p.add_argument("--lora-alpha", type=float, default=16.0)
    p.add_argument("--lora-targets", "--lora-target-modules", dest="lora_targets",
                   default=DEFAULT_TARGETS,
                   help="HF module names, comma separated, or all-linear (default: %(default)s)")
    p.add_argument("--hf", default=DEFAULT_HF,
                   help="attention implementations of the HF + peft sides, comma separated: "
                        "'default' (transformers' own choice) or a name, e.g. eager "
                        "(default: %(default)s)")
    p.add_argument("--hf-full", action="store_true",
                   help="also time HF full fine-tuning (no peft), next to ours full")
    add_run_flags(p)
    args = p.parse_args(argv)

    if args.worker:
        serve(args.worker, json.loads(args.spec))
        return 0

    import warnings

    warnings.filterwarnings("ignore")  # Megatron's notes about Transformer Engine / Apex
    from glm_megatron.models import ConfigError
    from glm_megatron.models.lora import resolve_targets

    try:
        glm = model_config({"preset": args.preset, "shape": args.shape})
        if glm.is_moe:
            raise ConfigError(f"--preset {args.preset}: a dense preset is needed (this benchmark "
                              "compares with transformers' dense GLM classes)")
        targets = resolve_targets(glm, [t.strip() for t in args.lora_targets.split(",")],
                                  key="--lora-targets")
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2

    steps = args.steps or (4 if args.quick else 20)
    warmup = args.warmup if args.warmup is not None else (1 if args.quick else 3)
    command = " ".join([sys.executable, *sys.argv]).replace(str(ROOT) + os.sep, "")
    print(f"command: {command}")
    print(f"load average at start: {_load()}")
    spec = {"preset": args.preset, "shape": args.shape, "batch": args.batch, "seq": args.seq,
            "threads": args.threads, "pool": 4, "seed": 1234, "r": args.lora_r, "alpha": args.lora_alpha,
            "targets": list(targets)}
    print(f"shape: {args.preset}{'' if args.shape == 'tiny' else ' --shape ' + args.shape} "
          f"({glm.model_type}, H={glm.hidden_size}, {glm.num_hidden_layers} layers, "
          f"{glm.num_attention_heads} heads / {glm.num_key_value_heads} KV groups, intermediate "
          f"{glm.intermediate_size}, vocab {glm.vocab_size}), batch {args.batch} x seq {args.seq}, "
          f"fp32, dropout 0, {args.threads} threads; LoRA r={args.lora_r} alpha={args.lora_alpha:g} on "
          f"{', '.join(targets)}; each side in its own process from the same HF weights and PEFT "
          f"adapter files, {warmup} warmup + {steps} timed optimizer steps, the sides' steps "
          "interleaved")

    with tempfile.TemporaryDirectory(prefix="bench_lora_") as tmp:
        spec["hf_dir"], spec["adapter_dir"] = make_weights(spec, Path(tmp))
        workers = [Worker(label, kind, dict(spec, **extra), __file__)
                   for label, kind, extra in _sides(args.hf, args.hf_full)]
        profiles = run_interleaved(workers, warmup, steps, args.profile, stats=True)

    tokens = args.batch * args.seq
    lora, full = workers[0], workers[1]
    hf_sides = [w for w in workers[2:] if w.label != "HF full"]
    hf_full = [w for w in workers if w.label == "HF full"]
    summary = {}
    for w in workers:
        best, med = min(w.times), statistics.median(w.times)
        summary[w.label] = {
            "best_step_s": best, "median_step_s": med, "tokens_per_s_best": tokens / best,
            "tokens_per_s_median": tokens / med, "page_faults_per_step": statistics.median(w.faults),
            "losses": w.losses, **w.stats, **w.info}
        if w is not lora:
            summary[w.label]["ratio_paired_median"] = _paired(w.times, lora.times)
    fastest = min((w.label for w in hf_sides), key=lambda k: summary[k]["ratio_paired_median"])
    ratio = summary[fastest]["ratio_paired_median"]
    met = ratio >= GOAL
    lora_vs_full = _paired(lora.times, full.times)

    for label, table in profiles.items():
        print(f"\nprofile of one {label} step (torch.profiler, self CPU time):\n{table}")

    print()
    print("(a) our engine, LoRA vs full fine-tuning (this rank; measured on the live optimizer "
          "and DDP buffers after the run" + ("; HF full for reference)" if hf_full else ")"))
    print(f"{'side':<12} {'params':>10} {'trainable':>10} {'Adam state':>12} {'grad buffers':>13} "
          f"{'median ms':>9} {'best ms':>8}")
    for w in (lora, full, *hf_full):
        s = summary[w.label]
        print(f"{w.label:<12} {s['params']:>10,} {s['trainable']:>10,} "
              f"{_mib(s['optimizer_bytes']):>12} {_mib(s['grad_bytes']):>13} "
              f"{s['median_step_s'] * 1e3:9.1f} {s['best_step_s'] * 1e3:8.1f}")
    sl, sf = summary[lora.label], summary[full.label]
    print(f"LoRA / full: trainable parameters {sl['trainable'] / sf['trainable']:.4f}, "
          f"optimizer state {sl['optimizer_bytes'] / sf['optimizer_bytes']:.4f}, "
          f"gradient buffers {sl['grad_bytes'] / sf['grad_bytes']:.4f}, "
          f"step time {lora_vs_full:.2f} (median of per-step pairs)")
    if hf_full:
        print(f"ours full / HF full: {_paired(hf_full[0].times, full.times):.2f}x tokens/s "
              "(median of per-step pairs)")

    print()
    print(f"(b) tokens/s = {args.batch} x {args.seq} tokens / step time (forward + backward + "
          "optimizer step); every position is a real token")
    print(f"{'side':<16} {'median ms':>9} {'best ms':>8} {'tokens/s med':>12} {'tokens/s best':>13} "
          f"{'LoRA/this':>10} {'trainable':>10} {'faults':>7}  implementation")
    for w in [lora, *hf_sides, full, *hf_full]:
        s = summary[w.label]
        rel = "" if w is lora else f"{s['ratio_paired_median']:.2f}x"
        print(f"{w.label:<16} {s['median_step_s'] * 1e3:9.1f} {s['best_step_s'] * 1e3:8.1f} "
              f"{s['tokens_per_s_median']:12.0f} {s['tokens_per_s_best']:13.0f} {rel:>10} "
              f"{s['trainable']:>10,} {s['page_faults_per_step']:7.0f}  {s['impl']}")
    print("LoRA/this: median over the timed steps of (this side's step time / ours LoRA at the "
          "same step); faults: minor page faults per step (median)")
    print("losses (first -> last step): " + "; ".join(
        f"{w.label} {w.losses[0]:.4f} -> {w.losses[-1]:.4f}" for w in workers))
    gaps = {w.label: max(abs(a - b) for a, b in zip(lora.losses, w.losses)) for w in hf_sides}
    print("same start, same updates: max |loss(ours LoRA) - loss(HF+peft)| over all steps: "
          + "; ".join(f"{k} {v:.1e}" for k, v in gaps.items())
          + f"; first-step loss of ours full {full.losses[0]:.4f} (B = 0: the base's loss)")
    if any(n != sl["trainable"] for n in (summary[w.label]["trainable"] for w in hf_sides)):
        print("WARNING: trainable parameters differ between ours LoRA and HF + peft")
    print(f"ratio ours LoRA / fastest HF + peft ({fastest}): {ratio:.2f}x tokens/s   "
          f"goal >= {GOAL:.1f}x: {'MET' if met else 'NOT MET'}")

    print()
    print(f"load average at end: {_load()}")
    if max(os.getloadavg()[:2]) > args.threads:
        print(f"note: load above {args.threads}: other work shares these CPUs, so absolute step "
              "times are noisy; the sides' steps are interleaved one by one and the ratios are "
              "medians of per-step pairs, so every side sees the same load.")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "command": command, "spec": {k: v for k, v in spec.items() if not k.endswith("_dir")},
            "warmup": warmup, "steps": steps, "summary": summary, "ratio": ratio,
            "fastest_hf": fastest, "goal_met": met, "lora_vs_full_step_time": lora_vs_full,
            "loadavg_end": os.getloadavg(),
        }, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
