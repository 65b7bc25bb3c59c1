"""KV-cache generation (glm_megatron.generation.kv_cache) against full-recompute greedy decoding.

One torchrun launch (2 gloo ranks) runs TP=2 (+SP, as training builds it), EP=2 (DP=2, different
prompts per rank), PP=2 and PP=2 with virtual stages; see tests/workers/generation_worker.py. The
sampling filters are unit-tested here without any process group.
"""

import json

import pytest
import torch

from glm_megatron.generation.sampling import SamplingParams, filter_logits, sample_tokens
from helpers.launch import torchrun

LAYOUTS = ["tp2", "ep2", "pp2", "pp2vpp2"]
SAMPLING_LAYOUTS = ["tp2", "ep2"]


@pytest.fixture(scope="module")
def gen(tmp_path_factory):
    out = tmp_path_factory.mktemp("kv_generation") / "result.json"
    torchrun("tests/workers/generation_worker.py", "--out", str(out), "--layouts", ",".join(LAYOUTS))
    return json.loads(out.read_text())


def ranks(gen, layout):
    return gen["layouts"][layout]


@pytest.mark.parametrize("layout", LAYOUTS)
def test_greedy_kv_cache_equals_full_recompute(gen, layout):
    for r in ranks(gen, layout):
        assert r["kv_greedy"] == r["oracle"], r["layout"]
        assert all(len(o) == gen["max_new"] for o in r["oracle"])
        # The random model is not degenerate: greedy decoding produces varied tokens.
        assert len({t for o in r["oracle"] for t in o}) > 5, r["oracle"]


def test_layouts_are_what_training_builds(gen):
    assert all(r["sp"] for r in ranks(gen, "tp2")), "TP=2 MoE must run with sequence parallelism"
    # EP=2 on two ranks is DP=2: each rank generated its own, different prompt set.
    first, second = ranks(gen, "ep2")
    assert {first["dp_rank"], second["dp_rank"]} == {0, 1}
    assert len(first["oracle"]) != len(second["oracle"])
    # At DP=1 both ranks of the replica return the same tokens (TP group / pipeline broadcast).
    for layout in ("tp2", "pp2", "pp2vpp2"):
        a, b = ranks(gen, layout)
        assert a["kv_greedy"] == b["kv_greedy"] and a["kv_stop_short"] == b["kv_stop_short"]


@pytest.mark.parametrize("layout", LAYOUTS)
def test_model_state_is_restored(gen, layout):
    for r in ranks(gen, layout):
        assert r["sp_restored"], "sequence-parallel flags differ after generate()"
        assert r["train_mode_restored"], "train mode not restored after generate()"


@pytest.mark.parametrize("layout", LAYOUTS)
def test_stop_token_and_max_new_tokens_end_rows(gen, layout):
    short = gen["short_max_new"]
    for r in ranks(gen, layout):
        assert r["kv_stop_short"] == r["expected_stop_short"]
        lengths = [len(o) for o in r["kv_stop_short"]]
        assert max(lengths) == short, lengths
    # The stop id was taken from the first response of DP rank 0: that row ended on it, early.
    dp0 = next(r for r in ranks(gen, layout) if r["dp_rank"] == 0)
    first_row = dp0["kv_stop_short"][0]
    assert first_row[-1] == dp0["stop_id"] and len(first_row) < short


def test_rank_without_prompts_and_unequal_max_new_tokens(gen):
    for r in ranks(gen, "ep2"):
        assert r["kv_one_empty"] == r["expected_one_empty"]
        assert r["kv_mixed_max"] == r["expected_mixed_max"]
    assert sorted(len(r["kv_one_empty"]) for r in ranks(gen, "ep2"))[0] == 0


@pytest.mark.parametrize("layout", SAMPLING_LAYOUTS)
def test_sampling_is_reproducible_and_top_k1_is_greedy(gen, layout):
    for r in ranks(gen, layout):
        assert r["sample_a"] == r["sample_a_again"]  # the second run via InEngineGenerator
        assert r["sample_a"] != r["oracle"], "temperature 0.9 sampling gave exactly the greedy tokens"
        assert r["top_k1"] == r["oracle"]


def test_tp_ranks_pick_the_same_sampled_tokens(gen):
    # The two TP ranks seeded their generators differently; TP rank 0's draw is broadcast.
    a, b = ranks(gen, "tp2")
    assert a["sample_a"] == b["sample_a"]


# ----------------------------------------------------------------------------- sampling, unit
# Probabilities exact in binary, no ties: 1/2, 1/4, 1/8, 3/32, 1/32 for tokens 3, 0, 4, 1, 2.
PROBS = torch.tensor([[0.25, 0.09375, 0.03125, 0.5, 0.125]])
LOGITS = PROBS.log()


def kept(sampling: SamplingParams) -> set[int]:
    return set(torch.nonzero(torch.isfinite(filter_logits(LOGITS, sampling))[0]).flatten().tolist())


@pytest.mark.parametrize("top_k, expected", [(1, {3}), (2, {3, 0}), (3, {3, 0, 4}), (0, {0, 1, 2, 3, 4}),
                                             (99, {0, 1, 2, 3, 4})])
def test_top_k_keeps_the_k_most_likely(top_k, expected):
    assert kept(SamplingParams(top_k=top_k)) == expected


@pytest.mark.parametrize("top_p, expected", [
    (0.3, {3}),  # the most likely token always stays
    (0.49, {3}),
    (0.51, {3, 0}),  # 1/2 falls short of 0.51: one more token
    (0.8, {3, 0, 4}),
    (0.9, {3, 0, 4, 1}),
    (0.99, {0, 1, 2, 3, 4}),
    (1.0, {0, 1, 2, 3, 4}),
])
def test_top_p_keeps_the_smallest_set_reaching_p(top_p, expected):
    assert kept(SamplingParams(top_p=top_p)) == expected


def test_top_k_then_top_p_renormalises_within_top_k():
    # top_k=3 leaves 1/2, 1/4, 1/8 (mass 7/8): renormalised 4/7, 2/7, 1/7; top_p=0.8 then needs
    # the first two (6/7 >= 0.8), where top_p alone would keep three.
    assert kept(SamplingParams(top_k=3, top_p=0.8)) == {3, 0}


def test_temperature_scales_logits_before_filtering():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    out = filter_logits(logits, SamplingParams(temperature=0.5))
    assert torch.allclose(out, logits * 2)
    # Hot enough, 1/2 no longer covers the top token alone: top_p keeps more.
    cold = filter_logits(logits, SamplingParams(temperature=0.25, top_p=0.5))
    hot = filter_logits(logits, SamplingParams(temperature=4.0, top_p=0.5))
    assert torch.isfinite(cold).sum() == 1 and torch.isfinite(hot).sum() == 2


def test_greedy_and_zero_temperature_take_the_argmax():
    logits = torch.randn(6, 50, generator=torch.Generator().manual_seed(0))
    for params in (SamplingParams(greedy=True), SamplingParams(temperature=0.0)):
        assert torch.equal(sample_tokens(logits, params), logits.argmax(-1))


def test_sampling_draws_from_the_filtered_distribution_and_follows_the_generator():
    logits = LOGITS.expand(4000, -1)
    params = SamplingParams(top_k=2)
    draws = sample_tokens(logits, params, torch.Generator().manual_seed(1))
    assert set(draws.tolist()) == {0, 3}
    assert abs((draws == 3).float().mean().item() - 2 / 3) < 0.03  # 1/2 : 1/4 renormalised
    again = sample_tokens(logits, params, torch.Generator().manual_seed(1))
    other = sample_tokens(logits, params, torch.Generator().manual_seed(2))
    assert torch.equal(draws, again) and not torch.equal(draws, other)


def test_generate_refuses_empty_prompts_before_any_collective():
    from glm_megatron.generation.kv_cache import generate

    with pytest.raises(ValueError, match="prompt 1 is empty"):
        generate([torch.nn.Linear(1, 1)], [[5], []], max_new_tokens=4, stop_ids=[],
                 sampling=SamplingParams(greedy=True))


def test_sampling_params_are_validated():
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0.0)
    with pytest.raises(ValueError, match="top_k"):
        SamplingParams(top_k=-1)
