"""SFT training throughput on CPU: our engine vs HF transformers, and padding vs packing.

    python tools/bench_sft.py            # docs/ARCHITECTURE.md §8 shape: batch 8 x seq 256, 2 threads, ~2 min
    python tools/bench_sft.py --quick    # 1 warmup + 4 timed steps per side, < 1 min
    python tools/bench_sft.py --profile 30   # also torch.profiler's top ops of one step per side

Throughput (docs/ARCHITECTURE.md §8): the tiny GLM-MoE (preset ``glm4-moe-small``: H=256, 4 layers, 8 experts
top-2, one shared expert), fp32, dropout 0, ``torch.set_num_threads(2)``, one optimizer step per
global batch of 8 full-length rows of 256 positions (synthetic SFT rows: random token ids, loss on
the "answer" part only, so both sides compute the same masked next-token loss).

* ours: the engine's real training step in a world of one (``initialize_parallel`` in a plain
  process, gloo): ``build_trained_model`` -> :class:`Engine` (Megatron DDP, distributed optimizer,
  AdamW, clipping at 1.0, constant LR) -> ``Engine.train_step`` with the SFT trainer's
  ``lm_forward_step`` on micro-batches made by the trainer's ``SFTBatcher``.
* HF: ``Glm4MoeForCausalLM(Glm4MoeConfig(**preset.to_hf_dict()))`` trained by a plain torch loop:
  ``collate_sft`` batch, forward, masked cross-entropy (sum / supervised tokens, as ours),
  backward, ``clip_grad_norm_(1.0)``, ``torch.optim.AdamW`` with the same LR, betas, eps and
  weight decay. Timed with transformers' default implementations (SDPA attention, ``grouped_mm``
  experts) and with the per-expert loop (``experts_implementation="eager"``, the transformers 4.x
  code); the goal is judged against the faster of them.

Each side runs in its own process (glm_megatron's CPU layer patches torch process-wide; HF's
measurement must not see it) and builds its batches before the clock starts. The driver then
interleaves the sides step by step (a worker waiting for its next command uses no CPU), so a change
in machine load hits every side alike: this machine is shared, and back-to-back runs of one side
then the other gave ratios anywhere between 0.1x and 8x. The ratio ours/HF is the median over the
timed steps of (HF step time / ours at the same step); tokens/s = batch x seq / median step time
(every position of these rows is a real token).

Real-token fraction: synthetic SFT rows with lengths uniform in [32, 256] positions, shuffled and
cut into global batches of 8 as the trainer does. Padded: each batch through ``collate_sft`` (pad
to the batch maximum, the trainer's default) or padded to ``max_seq_length``; real = attention-mask
positions, computed = batch x padded length. Packed: ``PackedSFTDataset`` (first-fit-decreasing
into rows of 256) + ``collate_packed``; real = the positions up to the last document of each row
(its ``cu_seqlens``), computed = rows x 256. Both are checked against the trainer's own count
(``SFTBatcher.real_tokens``, what it logs as ``real_token_fraction``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

from bench_workers import (  # noqa: E402
    Worker,
    add_run_flags,
    our_sft_engine,
    plain_adamw_step,
    run_interleaved,
    serve_steps,
)  # noqa: E402

PRESET = "glm4-moe-small"
GOAL = 1.0  # docs/ARCHITECTURE.md §8: ours >= 1.0x HF tokens/s
# transformers' defaults (SDPA, grouped_mm experts) and the per-expert loop of transformers 4.x.
DEFAULT_HF = "default,sdpa:eager"
# The seed's SFT optimizer settings (TrainingSection defaults), a constant LR for the benchmark.
LR, BETAS, EPS, WEIGHT_DECAY, CLIP = 1.0e-4, (0.9, 0.95), 1.0e-8, 0.01, 1.0


# ----------------------------------------------------------------------------- synthetic data
class SyntheticSFT:
    """In-memory SFT rows with the ``TokenizedDataset`` interface the batchers use:
    ``len``, ``lengths()`` (tokens per row) and rows of ``input_ids`` / ``loss_mask``.

    Token ids avoid 0..2 (pad / special ids). The first 20-50 % of each row is the "prompt"
    (no loss), the rest the "answer"."""

    def __init__(self, lengths, vocab_size: int, seed: int):
        rng = np.random.default_rng(seed)
        self.rows = []
        for n in lengths:
            ids = rng.integers(3, vocab_size, size=int(n), dtype=np.int64)
            mask = np.zeros(int(n), dtype=np.int64)
            mask[int(n * rng.uniform(0.2, 0.5)):] = 1
            self.rows.append({"input_ids": ids, "loss_mask": mask})

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict:
        return self.rows[i]

    def lengths(self) -> np.ndarray:
        return np.array([len(r["input_ids"]) for r in self.rows])


def fixed_batches(spec: dict) -> tuple[SyntheticSFT, list[np.ndarray]]:
    """``pool`` global batches of ``batch`` rows of ``seq + 1`` tokens (``seq`` positions); the
    steps cycle through them."""
    from glm_megatron.models import get_preset

    vocab = get_preset(spec["preset"]).vocab_size
    ds = SyntheticSFT([spec["seq"] + 1] * (spec["pool"] * spec["batch"]), vocab, spec["seed"])
    rows = [np.arange(i * spec["batch"], (i + 1) * spec["batch"]) for i in range(spec["pool"])]
    return ds, rows


# ----------------------------------------------------------------------------- workers
# A worker builds its side, prints READY, then answers one command per stdin line: "step" runs one
# optimizer step on the next prebuilt batch and prints its time; "profile N" profiles one step;
# "quit" exits. Blocked on stdin it uses no CPU, so the driver can alternate sides step by step.


def setup_ours(spec: dict):
    from glm_megatron.engine.config import ModelSection
    from glm_megatron.models import get_preset

    glm = get_preset(spec["preset"])
    ds, rows = fixed_batches(spec)
    _, chunks, tconfig, micro, step = our_sft_engine(
        spec, glm, ModelSection(preset=spec["preset"]), ds, rows, lr=LR, betas=BETAS, eps=EPS,
        weight_decay=WEIGHT_DECAY, clip=CLIP)
    info = {"params": sum(p.numel() for m in chunks for p in m.parameters()),
            "impl": f"Megatron-Core local spec, {tconfig.moe_token_dispatcher_type} MoE dispatcher, "
                    "DDP + distributed optimizer (torch AdamW)"}
    return step, micro, info


def setup_hf(spec: dict):
    import torch
    from transformers import Glm4MoeConfig, Glm4MoeForCausalLM

    from glm_megatron.data.collate import IGNORE_INDEX, collate_sft
    from glm_megatron.models import get_preset

    torch.set_num_threads(spec["threads"])
    torch.manual_seed(spec["seed"])
    glm = get_preset(spec["preset"])
    hf = glm.to_hf_dict()
    hf.pop("torch_dtype", None)  # fp32 on CPU, like ours
    impl = {}  # empty: transformers' own defaults
    if spec.get("attn"):
        impl["attn_implementation"] = spec["attn"]
    if spec.get("experts"):
        impl["experts_implementation"] = spec["experts"]
    config = Glm4MoeConfig(**hf, **impl)
    assert config.attention_dropout == 0.0
    model = Glm4MoeForCausalLM(config).float()
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    ds, rows = fixed_batches(spec)
    batches = [collate_sft([ds[int(i)] for i in r], glm.pad_token_id or 0) for r in rows]
    assert all(tuple(b["tokens"].shape) == (spec["batch"], spec["seq"]) for b in batches)
    step, opt = plain_adamw_step(model, params, glm.vocab_size, lr=LR, betas=BETAS, eps=EPS,
                                 weight_decay=WEIGHT_DECAY, clip=CLIP, ignore_index=IGNORE_INDEX)

    info = {"params": sum(p.numel() for p in params),
            "impl": f"transformers Glm4MoeForCausalLM, attn={model.config._attn_implementation}, "
                    f"experts={getattr(model.config, '_experts_implementation', None)}, "
                    "plain loop, torch AdamW"}
    return step, batches, info


SETUPS = {"ours": setup_ours, "hf": setup_hf}


def serve(kind: str, spec: dict) -> None:
    step, batches, info = SETUPS[kind](spec)
    serve_steps(step, batches, info)



# ----------------------------------------------------------------------------- real-token fraction
def token_fractions(n_rows: int, seq: int, batch: int, min_len: int, seed: int) -> list[tuple]:
    """(name, real, computed, rows) for padding to the batch max, to max_seq_length, and packing."""
    import torch

    from glm_megatron.algorithms.sft.data import SFTBatcher
    from glm_megatron.data.collate import collate_sft
    from glm_megatron.data.packing import PackedSFTDataset, collate_packed
    from glm_megatron.models import get_preset

    glm = get_preset(PRESET)
    pad_id = glm.pad_token_id or 0
    rng = np.random.default_rng(seed)
    positions = rng.integers(min_len, seq + 1, size=n_rows)  # positions after the shift
    ds = SyntheticSFT(positions + 1, glm.vocab_size, seed)
    expected_real = int(positions.sum())
    order = rng.permutation(n_rows)  # the trainer shuffles rows, then cuts global batches
    n_batches = n_rows // batch
    out = []

    for name, multiple in (("padded to batch max (trainer default)", 1),
                           (f"padded to max_seq_length {seq}", seq)):
        real = computed = 0
        for k in range(n_batches):
            rows = order[k * batch:(k + 1) * batch]
            b = collate_sft([ds[int(i)] for i in rows], pad_id, pad_to_multiple_of=multiple)
            real += int(b["attention_mask"].sum())
            computed += b["tokens"].numel()
        out.append((name, real, computed, n_batches * batch))
    # Cross-check the padded count with the trainer's own bookkeeping.
    trainer = SFTBatcher(ds, max_seq_length=seq, pad_id=pad_id, pad_multiple=1,
                         ignore_index=-100, packing=False, device="cpu")
    used = order[:n_batches * batch]
    assert trainer.real_tokens(used) == out[0][1], "padded real-token count disagrees with trainer"

    packed = PackedSFTDataset(ds, seq, pad_id)
    real = computed = 0
    n_packs = len(packed)
    for k in range(0, n_packs, batch):
        idx = list(range(k, min(k + batch, n_packs)))
        samples = [packed[i] for i in idx]
        b = collate_packed(samples)
        computed += b["tokens"].numel()
        for i, s in zip(idx, samples):
            real += int(s["cu_seqlens"][len(packed.packs[i])])  # end of the row's last document
        assert torch.equal(b["position_ids"], torch.as_tensor(np.stack([s["position_ids"]
                                                                         for s in samples])))
    assert real == expected_real, "packing lost or duplicated tokens"
    trainer = SFTBatcher(ds, max_seq_length=seq, pad_id=pad_id, pad_multiple=1,
                         ignore_index=-100, packing=True, device="cpu")
    assert trainer.real_tokens(np.arange(len(trainer))) == real
    out.append((f"packed into rows of {seq} (PackedSFTDataset)", real, computed, n_packs))
    return out


# ----------------------------------------------------------------------------- report
def _load() -> str:
    one, five, fifteen = os.getloadavg()
    return f"{one:.2f} / {five:.2f} / {fifteen:.2f} (1 / 5 / 15 min) on {os.cpu_count()} CPUs"


def _sides(hf_impls: str) -> list[tuple[str, str, dict]]:
    """(label, worker, extra spec) for ours and each HF implementation ("default" or ATTN:EXPERTS)."""
    sides = [("ours", "ours", {})]
    for item in hf_impls.split(","):
        item = item.strip()
        if item == "default":
            sides.append(("HF default", "hf", {}))
        else:
            attn, experts = item.split(":")
            sides.append((f"HF {attn}+{experts}", "hf", {"attn": attn, "experts": experts}))
    return sides


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="1 warmup + 4 timed steps per side")
    p.add_argument("--steps", type=int, default=None, help="timed steps per side (default 20)")
    p.add_argument("--warmup", type=int, default=None, help="untimed steps per side (default 3)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--hf", default=DEFAULT_HF,
                   help="HF implementations to time, comma separated: 'default' (transformers' "
                        "own choice) or ATTN:EXPERTS, e.g. sdpa:eager (default: %(default)s)")
    p.add_argument("--rows", type=int, default=None, help="rows for the real-token fraction")
    add_run_flags(p)
    args = p.parse_args(argv)

    if args.worker:
        serve(args.worker, json.loads(args.spec))
        return 0

    steps = args.steps or (4 if args.quick else 20)
    warmup = args.warmup if args.warmup is not None else (1 if args.quick else 3)
    n_rows = args.rows or (256 if args.quick else 2048)
    command = " ".join([sys.executable, *sys.argv]).replace(str(ROOT) + os.sep, "")
    print(f"command: {command}")
    print(f"load average at start: {_load()}")
    spec = {"preset": PRESET, "batch": args.batch, "seq": args.seq, "threads": args.threads,
            "pool": 4, "seed": 1234}
    print(f"shape: {PRESET} (H=256, 4 layers, 8 experts top-2 + 1 shared), batch {args.batch} x "
          f"seq {args.seq}, fp32, dropout 0, {args.threads} threads; each side in its own process, "
          f"{warmup} warmup + {steps} timed optimizer steps, the sides' steps interleaved")

    sides = _sides(args.hf)
    workers = [Worker(label, kind, dict(spec, **extra), __file__) for label, kind, extra in sides]
    profiles = run_interleaved(workers, warmup, steps, args.profile)

    tokens = args.batch * args.seq
    ours = workers[0]
    summary = {}
    for w in workers:
        best, med = min(w.times), statistics.median(w.times)
        s = {"best_step_s": best, "median_step_s": med, "tokens_per_s_best": tokens / best,
             "tokens_per_s_median": tokens / med, "page_faults_per_step": statistics.median(w.faults),
             "loss_first": w.losses[0], "loss_last": w.losses[-1], **w.info}
        if w is not ours:
            # Paired: step i of this side ran right next to step i of ours, under the same load.
            s["ratio_paired_median"] = statistics.median(
                [t / o for t, o in zip(w.times, ours.times)])
            s["ratio_best"] = best / min(ours.times)
        summary[w.label] = s
    hf_labels = [w.label for w in workers[1:]]
    fastest = min(hf_labels, key=lambda k: summary[k]["ratio_paired_median"])
    ratio = summary[fastest]["ratio_paired_median"]
    met = ratio >= GOAL

    for label, table in profiles.items():
        print(f"\nprofile of one {label} step (torch.profiler, self CPU time):\n{table}")
    print()
    print(f"tokens/s = {args.batch} x {args.seq} tokens / step time (forward + backward + "
          "optimizer step); every position is a real token")
    print(f"{'side':<18} {'median ms':>9} {'best ms':>8} {'tokens/s med':>12} {'tokens/s best':>13} "
          f"{'ours/this':>10} {'faults':>7}  implementation")
    for w in workers:
        s = summary[w.label]
        rel = "" if w is ours else f"{s['ratio_paired_median']:.2f}x"
        print(f"{w.label:<18} {s['median_step_s'] * 1e3:9.1f} {s['best_step_s'] * 1e3:8.1f} "
              f"{s['tokens_per_s_median']:12.0f} {s['tokens_per_s_best']:13.0f} {rel:>10} "
              f"{s['page_faults_per_step']:7.0f}  {s['impl']}")
    print("ours/this: median over the timed steps of (this side's step time / ours at the same "
          "step); faults: minor page faults per step (median)")
    print("losses (first -> last step): " + "; ".join(
        f"{w.label} {w.losses[0]:.3f} -> {w.losses[-1]:.3f}" for w in workers))
    print(f"ratio ours / fastest HF ({fastest}): {ratio:.2f}x tokens/s   goal >= {GOAL:.1f}x: "
          f"{'MET' if met else 'NOT MET'}")
    print()
    fractions = token_fractions(n_rows, args.seq, args.batch, 32, seed=7)
    print(f"real-token fraction: {n_rows} synthetic SFT rows, lengths uniform in [32, {args.seq}] "
          f"positions, global batches of {args.batch}")
    print(f"{'layout':<44} {'rows':>6} {'real':>9} {'computed':>9} {'real/computed':>14}")
    for name, real, computed, rows in fractions:
        print(f"{name:<44} {rows:6d} {real:9d} {computed:9d} {real / computed:14.3f}")

    print()
    print(f"load average at end: {_load()}")
    if max(os.getloadavg()[:2]) > args.threads:
        print(f"note: load above {args.threads}: other work shares these CPUs, so absolute step "
              "times are noisy; the sides' steps are interleaved one by one and the ratio is the "
              "median of per-step pairs, so every side sees the same load.")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "command": command, "spec": spec, "warmup": warmup, "steps": steps,
            "summary": summary, "ratio": ratio, "fastest_hf": fastest, "goal_met": met,
            "fractions": [dict(zip(("layout", "real", "computed", "rows"), f)) for f in fractions],
            "loadavg_end": os.getloadavg(),
        }, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
