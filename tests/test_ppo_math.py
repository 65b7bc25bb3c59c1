"""PPO math against numbers worked out by hand with plain Python floats.

Each batch below is written out literally; the expected values are computed token by token with
``math`` in the test (never by re-running the vectorised torch code), and masked-out positions
hold huge/inf/NaN values to show that padding contributes nothing, not even to a gradient.
"""

import json
import math

import pytest
import torch

from glm_megatron.algorithms.ppo.loss import (
    AdaptiveKLController,
    FixedKLController,
    batch_repetition,
    ended_with_stop,
    kl_controller,
    masked_mean,
    masked_sum,
    normalize_scores,
    penalize_missing_stop,
    policy_loss,
    ppo_total_loss,
    repetition_rate,
    should_stop_epoch,
    token_rewards,
    value_loss,
)

BIG = 1e30
INF = float("inf")
NAN = float("nan")
EPS = 0.2


def approx(x):
    return pytest.approx(x, rel=1e-5, abs=1e-6)


# ----------------------------------------------------------------------------------------------
# policy loss
#
# Row 0 is right-padded, row 1 left-padded. log ratio = logprobs - old_logprobs:
#   (0,0)  +0.5, A=+1  ratio 1.649 > 1.2, A>0: min picks the clipped term   -> loss -1.2*1, grad 0
#   (0,1)  -0.5, A=-2  ratio 0.607 < 0.8, A<0: min picks the clipped term   -> loss +0.8*2, grad 0
#   (0,2)  +0.1, A=+0.5 inside the band                                     -> unclipped
#   (0,3)  padding with garbage
#   (1,0)  padding with garbage
#   (1,1)  +0.3, A=-1  ratio 1.35 > 1.2 but A<0: min picks the unclipped term (counted as clipped
#                      by |r-1| > eps, yet it has a gradient)
#   (1,2)  -0.3, A=+2  ratio 0.741 < 0.8 but A>0: unclipped term again
#   (1,3)   0.0, A=+3  ratio 1

LOGP = [[-0.5, -2.0, -1.9, BIG], [INF, -0.7, -1.3, -0.25]]
OLD_LOGP = [[-1.0, -1.5, -2.0, -BIG], [INF, -1.0, -1.0, -0.25]]
ADV = [[1.0, -2.0, 0.5, BIG], [NAN, -1.0, 2.0, 3.0]]
PMASK = [[1, 1, 1, 0], [0, 1, 1, 1]]
# (row, col, log ratio, advantage) of the response tokens, by hand.
PTOKENS = [(0, 0, 0.5, 1.0), (0, 1, -0.5, -2.0), (0, 2, 0.1, 0.5),
           (1, 1, 0.3, -1.0), (1, 2, -0.3, 2.0), (1, 3, 0.0, 3.0)]


def _policy(mask=PMASK, dtype=torch.float32):
    logp = torch.tensor(LOGP, dtype=dtype, requires_grad=True)
    terms = policy_loss(logp, torch.tensor(OLD_LOGP, dtype=dtype), torch.tensor(ADV, dtype=dtype),
                        torch.tensor(mask), EPS)
    return logp, terms


def _hand_policy_token(lr, a):
    r = math.exp(lr)
    r_clip = min(max(r, 1 - EPS), 1 + EPS)
    return -min(r * a, r_clip * a)


def test_policy_loss_sum_by_hand():
    _, terms = _policy()
    expected = [
        -(1 + EPS) * 1.0,               # clipped, positive advantage
        -((1 - EPS) * -2.0),            # clipped, negative advantage: +1.6
        -(math.exp(0.1) * 0.5),         # unclipped
        -(math.exp(0.3) * -1.0),        # outside the band, unclipped branch
        -(math.exp(-0.3) * 2.0),        # outside the band, unclipped branch
        -(1.0 * 3.0),
    ]
    # The hand list agrees with the formula token by token...
    assert [_hand_policy_token(lr, a) for _, _, lr, a in PTOKENS] == pytest.approx(expected)
    assert expected[0] == pytest.approx(-1.2) and expected[1] == pytest.approx(1.6)
    # ...and the function's sum with it.
    assert torch.isfinite(terms.loss_sum)
    assert terms.loss_sum.item() == approx(sum(expected))
    assert terms.loss_sum.dtype == torch.float32


def test_policy_clip_fraction_and_approx_kl_by_hand():
    _, terms = _policy()
    # |r - 1| > 0.2: exp(0.5), exp(-0.5), exp(0.3), exp(-0.3) yes; exp(0.1), exp(0) no.
    assert terms.clipped_tokens.item() == 4
    kl = sum((math.exp(lr) - 1) - lr for _, _, lr, _ in PTOKENS)
    assert terms.approx_kl_sum.item() == approx(kl)
    assert terms.approx_kl_sum.item() > 0  # k3 is non-negative token by token
    assert terms.ratio_sum.item() == approx(sum(math.exp(lr) for _, _, lr, _ in PTOKENS))
    # Reporting terms carry no gradient.
    assert not terms.clipped_tokens.requires_grad and not terms.approx_kl_sum.requires_grad


def test_policy_gradient_by_hand():
    logp, terms = _policy()
    terms.loss_sum.backward()
    g = logp.grad
    assert torch.isfinite(g).all()
    # Clipped branch picked by the min: no gradient.
    assert g[0, 0].item() == 0.0
    assert g[0, 1].item() == 0.0
    # Unclipped branch: d(-r·A)/d logp = -r·A.
    assert g[0, 2].item() == approx(-math.exp(0.1) * 0.5)
    assert g[1, 1].item() == approx(-math.exp(0.3) * -1.0)
    assert g[1, 2].item() == approx(-math.exp(-0.3) * 2.0)
    assert g[1, 3].item() == approx(-3.0)
    # Padding: exactly nothing.
    assert g[0, 3].item() == 0.0 and g[1, 0].item() == 0.0


def test_policy_masked_tokens_contribute_nothing():
    # Same loss when the garbage positions are replaced by harmless values.
    clean_logp = [[-0.5, -2.0, -1.9, 0.0], [0.0, -0.7, -1.3, -0.25]]
    clean_old = [[-1.0, -1.5, -2.0, 0.0], [0.0, -1.0, -1.0, -0.25]]
    clean_adv = [[1.0, -2.0, 0.5, 0.0], [0.0, -1.0, 2.0, 3.0]]
    clean = policy_loss(torch.tensor(clean_logp), torch.tensor(clean_old), torch.tensor(clean_adv),
                        torch.tensor(PMASK), EPS)
    _, dirty = _policy()
    for a, b in zip(clean, dirty):
        assert a.item() == approx(b.item())


def test_policy_bool_mask_and_bf16_promoted():
    _, terms = _policy(mask=[[True, True, True, False], [False, True, True, True]])
    assert terms.clipped_tokens.item() == 4
    logp = torch.tensor([[0.0, 0.5]], dtype=torch.bfloat16)
    t = policy_loss(logp, torch.zeros(1, 2, dtype=torch.bfloat16), torch.ones(1, 2, dtype=torch.bfloat16),
                    torch.ones(1, 2), EPS)
    assert t.loss_sum.dtype == torch.float32
    assert t.loss_sum.item() == approx(-(1.0 + 1.2))


def test_policy_shape_mismatch_names_both_shapes():
    with pytest.raises(ValueError) as e:
        policy_loss(torch.zeros(2, 4), torch.zeros(2, 4), torch.zeros(2, 4), torch.ones(2, 3), EPS)
    assert "(2, 4)" in str(e.value) and "(2, 3)" in str(e.value)
    with pytest.raises(ValueError, match="clip_range"):
        policy_loss(torch.zeros(1, 1), torch.zeros(1, 1), torch.zeros(1, 1), torch.ones(1, 1), -0.1)


# ----------------------------------------------------------------------------------------------
# value loss
#
#   (0,0) v=1.0, old=0.5, R=1.1: v_clip=0.7, (v-R)²=0.01 < (v_clip-R)²=0.16 -> clipped wins, grad 0
#   (0,1) v=0.4, old=0.5, R=0.0: inside the band, both 0.16                 -> grad 2(v-R)=0.8
#   (0,2) v=2.0, old=1.0, R=0.0: v_clip=1.2, 4 > 1.44                       -> unclipped, grad 4
#   (0,3) padding
#   (1,0) padding
#   (1,1) v=-1.0, old=0.0, R=-0.5: v_clip=-0.2, 0.25 > 0.09                 -> unclipped, grad -1
#   (1,2) v=0.0, old=0.0, R=1.0: 1 = 1                                      -> grad -2
#   (1,3) padding

VALS = [[1.0, 0.4, 2.0, BIG], [INF, -1.0, 0.0, NAN]]
OLD_VALS = [[0.5, 0.5, 1.0, -BIG], [0.0, 0.0, 0.0, 1.0]]
RETS = [[1.1, 0.0, 0.0, BIG], [-INF, -0.5, 1.0, 2.0]]
VMASK = [[1, 1, 1, 0], [0, 1, 1, 0]]
VC = 0.2


def _value(clip):
    v = torch.tensor(VALS, requires_grad=True)
    terms = value_loss(v, torch.tensor(OLD_VALS), torch.tensor(RETS), torch.tensor(VMASK), clip)
    return v, terms


def test_value_loss_clipped_by_hand():
    v, terms = _value(VC)
    clip_0 = 0.5 + min(max(1.0 - 0.5, -VC), VC)          # 0.7
    clip_2 = 1.0 + min(max(2.0 - 1.0, -VC), VC)          # 1.2
    clip_4 = 0.0 + min(max(-1.0 - 0.0, -VC), VC)         # -0.2
    expected = [
        max((1.0 - 1.1) ** 2, (clip_0 - 1.1) ** 2),      # 0.16, the clipped branch wins
        (0.4 - 0.0) ** 2,
        max((2.0 - 0.0) ** 2, (clip_2 - 0.0) ** 2),      # 4.0
        max((-1.0 + 0.5) ** 2, (clip_4 + 0.5) ** 2),     # 0.25
        (0.0 - 1.0) ** 2,
    ]
    assert expected[0] == pytest.approx(0.16) and expected[2] == pytest.approx(4.0)
    assert terms.loss_sum.item() == approx(sum(expected))
    assert terms.clipped_tokens.item() == 1
    terms.loss_sum.backward()
    g = v.grad
    assert torch.isfinite(g).all()
    assert g[0, 0].item() == 0.0                         # clipped branch: saturated clamp
    assert g[0, 1].item() == approx(2 * (0.4 - 0.0))
    assert g[0, 2].item() == approx(2 * (2.0 - 0.0))
    assert g[1, 1].item() == approx(2 * (-1.0 + 0.5))
    assert g[1, 2].item() == approx(2 * (0.0 - 1.0))
    assert g[0, 3].item() == 0.0 and g[1, 0].item() == 0.0 and g[1, 3].item() == 0.0


def test_value_loss_unclipped_by_hand():
    v, terms = _value(None)
    expected = (1.0 - 1.1) ** 2 + 0.4 ** 2 + 2.0 ** 2 + (-1.0 + 0.5) ** 2 + 1.0
    assert terms.loss_sum.item() == approx(expected)
    assert terms.clipped_tokens.item() == 0
    terms.loss_sum.backward()
    # Plain squared error: every response token has gradient 2(v - R), token (0,0) included.
    assert v.grad[0, 0].item() == approx(2 * (1.0 - 1.1))
    assert v.grad[0, 3].item() == 0.0


def test_value_loss_shape_mismatch():
    with pytest.raises(ValueError) as e:
        value_loss(torch.zeros(2, 4), torch.zeros(2, 5), torch.zeros(2, 4), torch.ones(2, 4), VC)
    assert "(2, 4)" in str(e.value) and "(2, 5)" in str(e.value)


# ----------------------------------------------------------------------------------------------
# helpers, total loss


def test_masked_sum_and_mean():
    x = torch.tensor([[1.0, 2.0, BIG], [INF, 4.0, 5.0]])
    m = torch.tensor([[1, 1, 0], [0, 0, 1]])
    assert masked_sum(x, m).item() == 8.0
    assert masked_mean(x, m).item() == approx(8.0 / 3)
    with pytest.raises(ValueError, match="no element"):
        masked_mean(x, torch.zeros(2, 3))
    with pytest.raises(ValueError) as e:
        masked_sum(x, torch.ones(3, 2))
    assert "(2, 3)" in str(e.value) and "(3, 2)" in str(e.value)


def test_ppo_total_loss():
    assert ppo_total_loss(2.0, 3.0, 5.0, 0.5, 0.01) == approx(2.0 + 0.5 * 3.0 - 0.01 * 5.0)
    t = ppo_total_loss(torch.tensor(1.0), torch.tensor(4.0), torch.tensor(10.0), 1.0, 0.1)
    assert t.item() == approx(1.0 + 4.0 - 1.0)


# ----------------------------------------------------------------------------------------------
# rewards


def test_token_rewards_last_token_left_and_right_padding():
    scores = torch.tensor([2.0, -1.0, 0.5])
    kl = torch.tensor([[0.1, 0.2, 0.3, BIG],       # right padding: last response token at 2
                       [INF, 0.5, -0.1, 0.2],      # left padding: last at 3
                       [0.4, NAN, 0.6, BIG]])      # a hole: last at 2
    mask = torch.tensor([[1, 1, 1, 0], [0, 1, 1, 1], [1, 0, 1, 0]])
    c = 0.1
    expected = [[-c * 0.1, -c * 0.2, -c * 0.3 + 2.0, 0.0],
                [0.0, -c * 0.5, -c * -0.1, -c * 0.2 - 1.0],
                [-c * 0.4, 0.0, -c * 0.6 + 0.5, 0.0]]
    r = token_rewards(scores, kl, mask, c)
    assert r.dtype == torch.float32
    assert r.tolist() == [approx(row) for row in expected]


def test_token_rewards_bad_input():
    with pytest.raises(ValueError, match=r"row\(s\) \[1\]"):
        token_rewards(torch.zeros(2), torch.zeros(2, 3), torch.tensor([[1, 0, 0], [0, 0, 0]]), 0.1)
    with pytest.raises(ValueError) as e:
        token_rewards(torch.zeros(2), torch.zeros(2, 3), torch.ones(2, 4), 0.1)
    assert "(2, 3)" in str(e.value) and "(2, 4)" in str(e.value)
    with pytest.raises(ValueError, match="scores"):
        token_rewards(torch.zeros(3), torch.zeros(2, 3), torch.ones(2, 3), 0.1)


def test_normalize_scores():
    raw = torch.tensor([3.0, -5.0, 0.5])
    # (3-1)/2 = 1, (-5-1)/2 = -3 -> clamped to -1.5, (0.5-1)/2 = -0.25
    assert normalize_scores(raw, 1.0, 2.0, 1.5).tolist() == approx([1.0, -1.5, -0.25])
    assert normalize_scores(raw, 1.0, 2.0, None).tolist() == approx([1.0, -3.0, -0.25])
    for bad in (0.0, -1.0, NAN):
        with pytest.raises(ValueError, match="std"):
            normalize_scores(raw, 0.0, bad, None)


def test_missing_stop_penalty():
    ended = ended_with_stop([[5, 2], [5, 6], [], [9], [7, 1]], stop_ids=[2, 9])
    assert ended.tolist() == [True, False, False, True, False]
    scores = torch.tensor([1.0, 1.0, -0.5, 0.25, 3.0])
    assert penalize_missing_stop(scores, ended, 0.5).tolist() == approx([1.0, 0.5, -1.0, 0.25, 2.5])
    assert penalize_missing_stop(scores, ended, None) is scores
    assert penalize_missing_stop(scores, ended, 0.0) is scores
    with pytest.raises(ValueError, match="penalty"):
        penalize_missing_stop(scores, ended, -1.0)


# ----------------------------------------------------------------------------------------------
# KL controllers


def test_adaptive_kl_controller_by_hand():
    ctl = AdaptiveKLController(0.1, target=0.01, horizon=100)
    assert ctl.value == 0.1
    # kl/target - 1 = 0.5, clipped to +0.2: factor 1 + 0.2·10/100 = 1.02
    ctl.update(0.015, 10)
    assert ctl.value == approx(0.1 * 1.02)
    # kl/target - 1 = -0.1 (inside the clip): factor 1 - 0.1·20/100 = 0.98
    ctl.update(0.009, 20)
    assert ctl.value == approx(0.1 * 1.02 * 0.98)
    # kl = 0: -1 clipped to -0.2: factor 1 - 0.2·50/100 = 0.9
    ctl.update(0.0, 50)
    assert ctl.value == approx(0.1 * 1.02 * 0.98 * 0.9)
    with pytest.raises(ValueError, match="finite"):
        ctl.update(NAN, 1)
    with pytest.raises(ValueError, match="target"):
        AdaptiveKLController(0.1, 0.0, 100)


def test_fixed_kl_controller_constant():
    ctl = FixedKLController(0.05)
    for kl in (0.0, 1.0, 100.0):
        ctl.update(kl, 1000)
    assert ctl.value == 0.05


def test_kl_controller_state_round_trip():
    ctl = kl_controller(0.1, target_kl=0.01, horizon=100)
    assert isinstance(ctl, AdaptiveKLController)
    ctl.update(0.02, 30)
    saved = json.loads(json.dumps(ctl.state_dict()))  # plain JSON data
    resumed = kl_controller(0.7, target_kl=0.01, horizon=100)
    resumed.load_state_dict(saved)
    assert resumed.value == ctl.value
    ctl.update(0.005, 10)
    resumed.update(0.005, 10)
    assert resumed.value == ctl.value

    fixed = kl_controller(0.2, target_kl=None, horizon=100)
    assert isinstance(fixed, FixedKLController)
    other = FixedKLController(0.3)
    other.load_state_dict(json.loads(json.dumps(fixed.state_dict())))
    assert other.value == 0.2
    with pytest.raises(ValueError, match="adaptive"):
        other.load_state_dict(saved)


def test_should_stop_epoch():
    assert should_stop_epoch(0.02, 0.01, 1.5)
    assert not should_stop_epoch(0.015, 0.01, 1.5)  # equal to the bound: keep going
    assert not should_stop_epoch(0.01, 0.01, 1.5)
    assert not should_stop_epoch(10.0, None, 1.5)


# ----------------------------------------------------------------------------------------------
# repetition


def test_repetition_rate_by_hand():
    # trigrams (1,2,3) (2,3,1) (3,1,2) (1,2,3): one of four repeats
    assert repetition_rate([1, 2, 3, 1, 2, 3]) == 0.25
    # (5,5,5) three times: the last two repeat
    assert repetition_rate([5, 5, 5, 5, 5]) == pytest.approx(2 / 3)
    assert repetition_rate([1, 2, 3, 4, 5, 6]) == 0.0
    assert repetition_rate([7, 7, 7]) == 0.0  # fewer than n+1 tokens
    assert repetition_rate([]) == 0.0
    # unigrams 1 2 1 1: the third and fourth repeat
    assert repetition_rate([1, 2, 1, 1], n=1) == 0.5
    assert batch_repetition([[1, 2, 3, 1, 2, 3], [5, 5, 5, 5, 5], [1, 2]]) == approx((0.25 + 2 / 3 + 0) / 3)
    with pytest.raises(ValueError):
        repetition_rate([1, 2], n=0)
    with pytest.raises(ValueError):
        batch_repetition([])
