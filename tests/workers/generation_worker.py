"""Distributed worker: KV-cache generation vs full-recompute greedy generation at several layouts.

Launched by tests/test_kv_generation.py under torchrun (2 gloo ranks). For each layout it builds
a random tiny GLM-MoE (preset ``glm4-moe-tiny``) the way training does (TP > 1 implies sequence
parallelism), and records per rank: the oracle (``greedy_generate``, one prompt at a time, full
recompute, sequence parallel on), greedy KV-cache generation, stop-token and max_new_tokens runs,
sampling runs, and whether the model's train mode and sequence-parallel flags came back. pytest
asserts on the JSON rank 0 writes.

Prompts belong to data-parallel ranks: at EP2 (DP = 2) the two ranks generate different numbers
of prompts of different lengths (and, once, one rank none); at DP = 1 both ranks of the replica
share one set. The oracle's forward is collective (MoE, TP, PP), so every rank runs it on every set, in the
same order.
"""

import argparse
import json
import os
import sys
import time

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from glm_megatron.generation.greedy import greedy_generate  # noqa: E402
from glm_megatron.generation.kv_cache import SamplingParams, generate  # noqa: E402
from glm_megatron.generation.rollout import InEngineGenerator  # noqa: E402
from glm_megatron.models import get_preset  # noqa: E402
from glm_megatron.models.config import model_shape  # noqa: E402
from glm_megatron.models.loading import build_glm_model  # noqa: E402
from glm_megatron.parallel import (  # noqa: E402
    ParallelLayout,
    destroy_parallel,
    initialize_parallel,
    install_cpu_support,
)

LAYOUTS = {
    # sequence_parallel is implied for MoE + TP > 1 by validate_layout(training=True).
    "tp2": ParallelLayout(tensor_model_parallel_size=2),
    "ep2": ParallelLayout(expert_model_parallel_size=2),
    "pp2": ParallelLayout(pipeline_model_parallel_size=2),
    "pp2vpp2": ParallelLayout(pipeline_model_parallel_size=2, virtual_pipeline_model_parallel_size=2),
    # Dense models do not imply sequence parallelism; tests/workers/dense_suite.py asks for it.
    "tp2sp": ParallelLayout(tensor_model_parallel_size=2, sequence_parallel=True),
    # Not in the default test run (time): attention TP and expert parallelism over the same ranks.
    "tp2ep2": ParallelLayout(tensor_model_parallel_size=2, expert_model_parallel_size=2,
                             expert_tensor_parallel_size=1),
}
# Prompt lengths per data-parallel rank: unequal counts, unequal lengths, shortest not first.
PROMPT_LENGTHS = [[5, 9, 3], [7, 4, 6, 11]]
MAX_NEW = 8
SHORT_MAX_NEW = 5
# Sampling runs where it matters: TP (ranks of a group must agree) and EP/DP (different prompts).
SAMPLING_LAYOUTS = ("tp2", "ep2", "tp2ep2")
SAMPLING = SamplingParams(temperature=0.9, top_p=0.95, top_k=50)


def prompt_sets(vocab: int) -> list[list[list[int]]]:
    gen = torch.Generator().manual_seed(11)
    return [[torch.randint(3, vocab, (n,), generator=gen).tolist() for n in lengths]
            for lengths in PROMPT_LENGTHS]


def truncate_at_stop(tokens: list[int], stop: int) -> list[int]:
    return tokens[:tokens.index(stop) + 1] if stop in tokens else tokens


SP_ATTRS = ("sequence_parallel", "scatter_to_sequence_parallel", "reduce_scatter_embeddings")


def sp_flags(chunks) -> list:
    """Every sequence-parallel flag of the model, in a fixed order."""
    flags = [chunks[0].config.sequence_parallel]
    for chunk in chunks:
        for module in chunk.modules():
            flags += [(name, value) for name, value in vars(module).items()
                      if name in SP_ATTRS and isinstance(value, bool)]
    return flags


def oracle_greedy(chunks, prompt: list[int], pad_multiple: int) -> list[int]:
    """Full-recompute greedy tokens (``greedy_generate``: one prompt, also under virtual
    pipelining, where forward_logits fills the batch up to PP micro-batches)."""
    return greedy_generate(chunks, prompt, MAX_NEW, [], pad_multiple=pad_multiple)


def run_layout(cfg, name: str, sets) -> dict:
    from megatron.core import parallel_state as ps

    ctx = initialize_parallel(LAYOUTS[name], model_shape(cfg), seed=5)
    chunks, _ = build_glm_model(cfg, ctx.layout)
    dp_rank, dp_size = ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()
    prompts = sets[dp_rank]
    pad_multiple = ctx.layout.tp if ctx.layout.sequence_parallel else 1
    res = {"layout": ctx.layout.describe(), "dp_rank": dp_rank, "sp": ctx.layout.sequence_parallel}

    # The oracle, for every data-parallel set (its forward is collective across the replica and EP).
    t0 = time.perf_counter()
    oracle_sets = [[oracle_greedy(chunks, p, pad_multiple) for p in s] for s in sets[:dp_size]]
    res["oracle_s"] = time.perf_counter() - t0
    oracle = oracle_sets[dp_rank]
    res["oracle"] = oracle

    for chunk in chunks:
        chunk.train()  # generate() must switch to eval and back
    flags_before = sp_flags(chunks)
    greedy = SamplingParams(greedy=True)
    t0 = time.perf_counter()
    res["kv_greedy"] = generate(chunks, prompts, max_new_tokens=MAX_NEW, stop_ids=[], sampling=greedy)
    res["generate_s"] = time.perf_counter() - t0
    res["sp_restored"] = sp_flags(chunks) == flags_before
    res["train_mode_restored"] = all(m.training for c in chunks for m in c.modules())

    # A stop id that greedy decoding produces early in one response (the same id on every rank),
    # with a max_new_tokens that cuts the other responses: both ways of ending a row at once.
    stop = oracle_sets[0][0][2]
    res["stop_id"] = stop
    res["expected_stop_short"] = [truncate_at_stop(o[:SHORT_MAX_NEW], stop) for o in oracle]
    res["kv_stop_short"] = generate(chunks, prompts, max_new_tokens=SHORT_MAX_NEW,
                                    stop_ids=[stop, 10**6], sampling=greedy)

    if name in SAMPLING_LAYOUTS:
        # Each rank seeds its generator differently: the TP broadcast must still make the ranks
        # of a replica agree. Same seed twice -> same tokens; top_k=1 -> greedy.
        def sample(seed, sampling=SAMPLING):
            gen = torch.Generator().manual_seed(seed + 1000 * dist.get_rank())
            return generate(chunks, prompts, max_new_tokens=MAX_NEW, stop_ids=[], sampling=sampling,
                            generator=gen)

        res["sample_a"] = sample(1)
        # The same draw again, through the rollout interface (it seeds its own generator).
        rollout = InEngineGenerator(chunks, stop_ids=[])
        res["sample_a_again"] = rollout.generate(prompts, max_new_tokens=MAX_NEW, sampling=SAMPLING,
                                                 seed=1 + 1000 * dist.get_rank())
        res["top_k1"] = sample(3, SamplingParams(temperature=1.0, top_k=1))

    if dp_size > 1:
        # The second data-parallel rank has no prompts: it must still take part in the collectives.
        mine = prompts if dp_rank == 0 else []
        res["kv_one_empty"] = generate(chunks, mine, max_new_tokens=MAX_NEW, stop_ids=[],
                                       sampling=greedy)
        res["expected_one_empty"] = oracle if dp_rank == 0 else []
        # Different max_new_tokens per rank: the buffer length is agreed across the world.
        own_max = 3 if dp_rank == 0 else MAX_NEW
        res["kv_mixed_max"] = generate(chunks, prompts, max_new_tokens=own_max, stop_ids=[],
                                       sampling=greedy)
        res["expected_mixed_max"] = [o[:own_max] for o in oracle]
    return res


def main():
    install_cpu_support()
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--layouts", default=",".join(LAYOUTS))
    args = parser.parse_args()

    # Larger initial weights than the preset's 0.05 give the random model's logits clear margins:
    # varied greedy choices that rounding (cache vs recompute, TP splits) cannot flip.
    cfg = get_preset("glm4-moe-tiny").replace(initializer_range=0.2)
    sets = prompt_sets(cfg.vocab_size)
    results = {}
    for name in args.layouts.split(","):
        t0 = time.perf_counter()
        res = run_layout(cfg, name, sets)
        res["layout_s"] = time.perf_counter() - t0
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, res)
        results[name] = gathered
    if dist.get_rank() == 0:
        with open(args.out, "w", encoding="utf-8") as fh:
            json.dump({"layouts": results, "max_new": MAX_NEW, "short_max_new": SHORT_MAX_NEW}, fh,
                      indent=1)
    destroy_parallel()


if __name__ == "__main__":
    main()
