"""TP=2 on two gloo ranks equals TP=1 on the concatenated weight: values, weight-gradient shards,
and the hidden gradient (partial per rank; its TP sum, and Megatron's ColumnParallelLinear-style
region op, give the full gradient). Also DP-aware whitening."""

import pytest
import torch
import torch.distributed as dist

import glm_kernels
from tests.kernels_helpers.compare import assert_rel
from tests.kernels_helpers.dist import run_ranks
from tests.kernels_helpers.logprob_case import make_case, weighted_loss

KW = {"temperature": 0.8, "kl_type": "k3", "return_entropy": True}


def _shard(weight, rank, world):
    vs = weight.shape[0] // world
    return weight[rank * vs : (rank + 1) * vs]


def _rank_main(rank, world):
    # One spawn for every distributed check: process start-up and imports dominate their cost.
    return {"tp": _tp_rank(rank, world, 200), "whiten": _whiten_rank(rank, world)}


@pytest.fixture(scope="module")
def ranks():
    return run_ranks(_rank_main, 2)


def _tp_rank(rank, world, tile):
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel.mappings import (
        copy_to_tensor_model_parallel_region,
    )

    hidden, weight, labels, ref, weights = make_case(seed=3)
    group = dist.group.WORLD
    h = hidden.clone().requires_grad_()
    w = _shard(weight, rank, world).clone().requires_grad_()
    out = glm_kernels.token_logprobs(
        h, w, labels, tp_group=group, ref_logprobs=ref, tile_elems=tile, backend="torch", **KW
    )
    weighted_loss(out, weights).backward()
    logits = (hidden @ _shard(weight, rank, world).t()).requires_grad_()
    lout = glm_kernels.logprobs_from_logits(
        logits, labels, tp_group=group, ref_logprobs=ref, tile_elems=tile, **KW
    )
    weighted_loss(lout, weights).backward()
    # The documented contract: route hidden through Megatron's region op (all-reduce in backward).
    ps.initialize_model_parallel(tensor_model_parallel_size=world)
    h2 = hidden.clone().requires_grad_()
    out2 = glm_kernels.token_logprobs(
        copy_to_tensor_model_parallel_region(h2),
        w.detach(),
        labels,
        tp_group=ps.get_tensor_model_parallel_group(),
        ref_logprobs=ref,
        **KW,
    )
    weighted_loss(out2, weights).backward()
    ps.destroy_model_parallel()
    return {
        "out": [t.detach() for t in out],
        "lout": [t.detach() for t in lout],
        "gh": h.grad,
        "gw": w.grad,
        "glogits": logits.grad,
        "gh_megatron": h2.grad,
    }


def test_tp2_equals_tp1_on_concatenated_weight(ranks):
    hidden, weight, labels, ref, weights = make_case(seed=3)
    h = hidden.clone().requires_grad_()
    w = weight.clone().requires_grad_()
    want = glm_kernels.token_logprobs(h, w, labels, ref_logprobs=ref, backend="torch", **KW)
    weighted_loss(want, weights).backward()
    logits = (hidden @ weight.t()).requires_grad_()
    lout = glm_kernels.logprobs_from_logits(logits, labels, ref_logprobs=ref, **KW)
    weighted_loss(lout, weights).backward()
    tp = [r["tp"] for r in ranks]
    for r in tp:
        for name in ("out", "lout"):
            for got, exp, what in zip(r[name], want, ("logprobs", "kl", "entropy")):
                assert_rel(got, exp.detach(), what=f"{name} {what}")
        assert_rel(r["gh_megatron"], h.grad, what="hidden grad through copy_to_tensor_model_parallel_region")
    assert_rel(torch.cat([r["gw"] for r in tp]), w.grad, what="weight grad shards")
    assert_rel(torch.cat([r["glogits"] for r in tp], dim=1), logits.grad, what="logits grad shards")
    # Each rank's hidden grad is partial (this shard only) and their sum is the full gradient.
    assert_rel(tp[0]["gh"] + tp[1]["gh"], h.grad, what="sum of partial hidden grads")
    assert (tp[0]["gh"] - h.grad).abs().max() > 1e-3


def _whiten_rank(rank, world):
    g = torch.Generator().manual_seed(5)
    adv = torch.randn(world * 3, 7, generator=g) * 4 + 2
    mask = torch.rand(world * 3, 7, generator=g) > 0.3
    rows = slice(rank * 3, rank * 3 + 3)
    return glm_kernels.whiten_advantages(adv[rows], mask[rows], group=dist.group.WORLD)


def test_whitening_across_dp_ranks_equals_whole_batch(ranks):
    g = torch.Generator().manual_seed(5)
    adv = torch.randn(6, 7, generator=g) * 4 + 2
    mask = torch.rand(6, 7, generator=g) > 0.3
    want = glm_kernels.whiten_advantages(adv, mask)
    got = torch.cat([r["whiten"] for r in ranks])
    assert_rel(got, want, what="DP whitening")
    sel = want[mask]
    assert abs(sel.mean().item()) < 1e-5 and abs(sel.std().item() - 1) < 1e-4
