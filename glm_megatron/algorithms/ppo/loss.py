"""The PPO arithmetic as pure tensor functions: losses, per-token rewards, KL control, metrics.

Nothing here knows about process groups, models or micro-batches; the PPO trainer composes these
pieces and the tests check each one against numbers worked out by hand. Keeping the math apart
from the engine is what makes that possible.

Conventions:

- Per-token tensors are ``[B, T]`` with a response mask of the same shape: nonzero/True on the
  response tokens that count, 0 elsewhere (prompt, padding). Masked-out positions are replaced
  *before* any arithmetic, so padding holding garbage (huge values, inf, NaN) neither changes a
  result nor leaks a NaN into a gradient.
- Losses are **sums over masked tokens**, not means. Megatron's ``calculate_per_token_loss``
  contract has a loss function return ``(sum, count, report)`` and divides by the token count of
  the whole global batch (every micro-batch, every data-parallel rank), so that the gradient is
  that of the global per-token mean whatever the layout. A per-micro-batch mean would weight short
  micro-batches more.
- Arithmetic is done in fp32 at least: bf16/fp16 inputs are promoted (fp64 stays fp64), because
  ratios are exponentials of differences of log-probs and lose too much in bf16.
- Quantities PPO treats as constants (old log-probs, advantages, old values, returns) are detached;
  gradients flow only into ``logprobs`` and ``values``.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

# ----------------------------------------------------------------------------------------------
# helpers


def _check_same_shape(**tensors: torch.Tensor) -> None:
    """ValueError naming every argument and its shape when the shapes differ."""
    shapes = {name: tuple(t.shape) for name, t in tensors.items()}
    if len(set(shapes.values())) > 1:
        listed = ", ".join(f"{name} {shape}" for name, shape in shapes.items())
        raise ValueError(f"shape mismatch: {listed} (all must be the same [B, T])")


def _f32(x: torch.Tensor) -> torch.Tensor:
    """Promote to at least fp32 (bf16/fp16/int/bool -> fp32; fp64 unchanged)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _bool(mask: torch.Tensor) -> torch.Tensor:
    return mask if mask.dtype == torch.bool else mask != 0


def _zero_masked(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``x`` with masked-out positions set to 0; the gradient there is exactly 0.

    ``torch.where`` rather than ``x * mask``: ``inf * 0`` is NaN, and a NaN anywhere upstream of a
    multiplication by 0 would still poison the backward pass.
    """
    return torch.where(mask, x, torch.zeros((), dtype=x.dtype, device=x.device))


def masked_sum(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Sum of ``x`` over the positions where ``mask`` is nonzero (fp32, a 0-dim tensor)."""
    _check_same_shape(x=x, mask=mask)
    return _zero_masked(_f32(x), _bool(mask)).sum()


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of ``x`` over the positions where ``mask`` is nonzero; an empty mask is an error
    (a mean of nothing is a caller bug, not 0)."""
    _check_same_shape(x=x, mask=mask)
    m = _bool(mask)
    count = int(m.sum())
    if count == 0:
        raise ValueError("masked_mean: the mask selects no element")
    return masked_sum(x, m) / count


# ----------------------------------------------------------------------------------------------
# losses


class PolicyLossTerms(NamedTuple):
    loss_sum: torch.Tensor        # Σ -min(r·A, clip(r)·A) over masked tokens; carries the gradient
    clipped_tokens: torch.Tensor  # #tokens with |r - 1| > ε (detached; / tokens = clip fraction)
    approx_kl_sum: torch.Tensor   # Σ k3 = (r - 1) - log r, an estimate of KL(old || new) (detached)
    ratio_sum: torch.Tensor       # Σ r (detached; / tokens = mean ratio, should stay near 1)


def policy_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                mask: torch.Tensor, clip_range: float) -> PolicyLossTerms:
    """PPO's clipped surrogate, per token ``-min(r·A, clip(r, 1-ε, 1+ε)·A)``, ``r = exp(logp - old)``.

    The gradient w.r.t. ``logprobs`` is ``-r·A`` where the unclipped term is the min and 0 where
    the clipped one is (r > 1+ε with A > 0, or r < 1-ε with A < 0): the update stops pushing a
    token's probability once it has moved ε in the direction the advantage wants.

    ``clipped_tokens`` uses the usual clip-fraction definition (OpenAI baselines, SB3):
    tokens with ``|r - 1| > ε``, whatever the sign of A. It therefore also counts tokens outside
    the band whose min still picked the unclipped term (e.g. r > 1+ε with A < 0), which do get a
    gradient; it is a measure of how far the policy moved, not of how many gradients were cut.
    """
    _check_same_shape(logprobs=logprobs, old_logprobs=old_logprobs, advantages=advantages, mask=mask)
    if clip_range < 0:
        raise ValueError(f"clip_range must be >= 0, got {clip_range}")
    m = _bool(mask)
    # The difference is zeroed on masked tokens before exp(): padding then has r = 1, A = 0.
    log_ratio = _zero_masked(_f32(logprobs) - _f32(old_logprobs).detach(), m)
    adv = _zero_masked(_f32(advantages).detach(), m)
    ratio = torch.exp(log_ratio)
    unclipped = ratio * adv
    clipped = torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range) * adv
    loss_sum = _zero_masked(-torch.minimum(unclipped, clipped), m).sum()

    with torch.no_grad():
        outside = (ratio - 1.0).abs() > clip_range
        clipped_tokens = (outside & m).sum().to(ratio.dtype)
        # k3 is >= 0 for every sample (unlike k1 = -log r) and unbiased for KL(old || new) when
        # the tokens were sampled from the old policy, which is the case within a PPO epoch.
        approx_kl_sum = _zero_masked((ratio - 1.0) - log_ratio, m).sum()
        ratio_sum = _zero_masked(ratio, m).sum()
    return PolicyLossTerms(loss_sum, clipped_tokens, approx_kl_sum, ratio_sum)


class ValueLossTerms(NamedTuple):
    loss_sum: torch.Tensor        # Σ max((v - R)², (v_clipped - R)²) over masked tokens
    clipped_tokens: torch.Tensor  # #tokens where the clipped term is strictly larger (detached)


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor,
               mask: torch.Tensor, clip_range_vf: float | None) -> ValueLossTerms:
    """Clipped value loss, per token ``max((v - R)², (v_clipped - R)²)``,
    ``v_clipped = old_v + clip(v - old_v, -c, c)``.

    This is the seed guide's formula: no ½ factor (TRL and OpenRLHF use ½·max), so ``vf_coef``
    weights it accordingly. ``clip_range_vf=None`` gives the plain squared error.
    The max makes the clip pessimistic: a value prediction that moved more than ``c`` from the
    rollout's value gets no gradient when the clipped prediction has the larger error.

    ``clipped_tokens`` counts tokens where the clipped term strictly wins the max (TRL's
    ``vf_clipfrac``); always 0 without clipping.
    """
    _check_same_shape(values=values, old_values=old_values, returns=returns, mask=mask)
    if clip_range_vf is not None and clip_range_vf < 0:
        raise ValueError(f"clip_range_vf must be >= 0 or None, got {clip_range_vf}")
    m = _bool(mask)
    v = _zero_masked(_f32(values), m)
    ret = _zero_masked(_f32(returns).detach(), m)
    unclipped = (v - ret) ** 2
    if clip_range_vf is None:
        loss_sum = _zero_masked(unclipped, m).sum()
        return ValueLossTerms(loss_sum, torch.zeros((), dtype=loss_sum.dtype, device=loss_sum.device))

    old = _zero_masked(_f32(old_values).detach(), m)
    v_clipped = old + torch.clamp(v - old, -clip_range_vf, clip_range_vf)
    clipped = (v_clipped - ret) ** 2
    loss_sum = _zero_masked(torch.maximum(unclipped, clipped), m).sum()
    with torch.no_grad():
        clipped_tokens = ((clipped > unclipped) & m).sum().to(loss_sum.dtype)
    return ValueLossTerms(loss_sum, clipped_tokens)


def ppo_total_loss(policy_sum, value_sum, entropy_sum, vf_coef: float, entropy_coef: float):
    """``policy + vf_coef·value - entropy_coef·entropy``: all three are token sums over the same
    mask, so dividing the result by the shared token count gives the mean of the combination."""
    return policy_sum + vf_coef * value_sum - entropy_coef * entropy_sum


# ----------------------------------------------------------------------------------------------
# rewards


def token_rewards(scores: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor, kl_coef) -> torch.Tensor:
    """Per-token rewards [B, T]: ``-kl_coef·kl`` on every response token, plus each row's sequence
    score on its last response token (the last position where the mask is nonzero).

    The score sits on the last token because that is where the reward model read it (the whole
    response is visible there); GAE carries it back to earlier tokens. Works for left and right
    padding alike. ``kl`` is the per-token KL estimate against the reference policy.
    """
    _check_same_shape(kl=kl, mask=mask)
    if kl.dim() != 2:
        raise ValueError(f"kl and mask must be [B, T], got shape {tuple(kl.shape)}")
    if tuple(scores.shape) != (kl.shape[0],):
        raise ValueError(f"scores must be [B] = ({kl.shape[0]},), got shape {tuple(scores.shape)}")
    m = _bool(mask)
    positions = torch.arange(m.shape[1], device=m.device).expand_as(m)
    last = torch.where(m, positions, -1).amax(dim=1)
    empty = (last < 0).nonzero().flatten().tolist()
    if empty:
        raise ValueError(f"token_rewards: row(s) {empty} have no response token (all-zero mask)")
    rewards = _zero_masked(-kl_coef * _f32(kl), m)
    rows = torch.arange(m.shape[0], device=m.device)
    rewards[rows, last] += _f32(scores).to(rewards.dtype)
    return rewards


def normalize_scores(raw: torch.Tensor, mean: float, std: float, clip: float | None) -> torch.Tensor:
    """``(raw - mean) / std``, then clamped to ``[-clip, clip]`` when ``clip`` is not None.

    ``mean``/``std`` are the reward model's statistics (e.g. from its calibration set), so that
    rewards have a fixed scale across runs; the clamp bounds the damage of an outlier score.
    """
    std = float(std)
    if not std > 0:  # also rejects NaN
        raise ValueError(f"normalize_scores: std must be > 0, got {std}")
    if clip is not None and not clip > 0:
        raise ValueError(f"normalize_scores: clip must be > 0 or None, got {clip}")
    out = (_f32(torch.as_tensor(raw)) - float(mean)) / std
    return out if clip is None else out.clamp(-clip, clip)


def ended_with_stop(responses: list, stop_ids) -> torch.Tensor:
    """Per response: True when its last token is a stop token (it was not cut at the length cap)."""
    stops = set(stop_ids)
    return torch.tensor([bool(r) and r[-1] in stops for r in responses], dtype=torch.bool)


def penalize_missing_stop(scores: torch.Tensor, ended: torch.Tensor, penalty: float | None) -> torch.Tensor:
    """``scores - penalty`` where a response did not end with a stop token (TRL's
    missing_eos_penalty): a reward model rarely saw truncated text, so its score there is
    unreliable, and without this the policy is never told that rambling to the cap is bad."""
    if not penalty:
        return scores
    if penalty < 0:
        raise ValueError(f"penalize_missing_stop: penalty must be >= 0, got {penalty}")
    return torch.where(ended.to(scores.device), scores, scores - float(penalty))


# ----------------------------------------------------------------------------------------------
# KL coefficient control


class AdaptiveKLController:
    """Ziegler et al. (2019) adaptive KL coefficient, as in TRL and OpenRLHF.

    ``update`` moves the coefficient multiplicatively towards the value that keeps the observed
    KL at ``target``: ``err = clip(kl / target - 1, -0.2, 0.2)``, ``value *= 1 + err·n_steps /
    horizon``. The ±0.2 clip caps the change per update, so one noisy KL estimate cannot swing the
    penalty; ``horizon`` (in samples/steps, same unit as ``n_steps``) sets how fast it reacts.
    """

    kind = "adaptive"

    def __init__(self, init_kl_coef: float, target: float, horizon: float):
        if not init_kl_coef >= 0:
            raise ValueError(f"init_kl_coef must be >= 0, got {init_kl_coef}")
        if not target > 0:
            raise ValueError(f"target KL must be > 0, got {target}")
        if not horizon > 0:
            raise ValueError(f"horizon must be > 0, got {horizon}")
        self.value = float(init_kl_coef)
        self.target = float(target)
        self.horizon = float(horizon)

    def update(self, current_kl: float, n_steps: int) -> None:
        current_kl = float(current_kl)
        # A NaN KL would silently turn the coefficient into NaN for the rest of the run.
        if not math.isfinite(current_kl):
            raise ValueError(f"AdaptiveKLController.update: current_kl is not finite ({current_kl})")
        err = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + err * n_steps / self.horizon

    def state_dict(self) -> dict:
        return {"kind": self.kind, "value": self.value, "target": self.target, "horizon": self.horizon}

    def load_state_dict(self, d: dict) -> None:
        """Restore the coefficient only; target and horizon come from the (possibly edited)
        config of the resumed run. A checkpoint of the other controller kind is an error."""
        _check_kind(self.kind, d)
        self.value = float(d["value"])


class FixedKLController:
    """A constant KL coefficient with the adaptive controller's interface."""

    kind = "fixed"

    def __init__(self, kl_coef: float):
        if not kl_coef >= 0:
            raise ValueError(f"kl_coef must be >= 0, got {kl_coef}")
        self.value = float(kl_coef)

    def update(self, current_kl: float, n_steps: int) -> None:
        pass

    def state_dict(self) -> dict:
        return {"kind": self.kind, "value": self.value}

    def load_state_dict(self, d: dict) -> None:
        _check_kind(self.kind, d)
        self.value = float(d["value"])


def _check_kind(kind: str, d: dict) -> None:
    if d.get("kind") != kind:
        raise ValueError(f"KL controller state is for a {d.get('kind')!r} controller, this run uses "
                         f"{kind!r} (set or unset target_kl as in the checkpointed run)")


def kl_controller(kl_coef: float, target_kl: float | None, horizon: float):
    """Adaptive when ``target_kl`` is set, fixed otherwise."""
    if target_kl is not None:
        return AdaptiveKLController(kl_coef, target_kl, horizon)
    return FixedKLController(kl_coef)


def should_stop_epoch(approx_kl: float, target_kl: float | None, factor: float) -> bool:
    """Early stop of a PPO epoch: True when ``target_kl`` is set and the policy's approximate KL
    from the rollout policy exceeds ``factor·target_kl`` (further steps would optimise a surrogate
    that no longer describes the data)."""
    return target_kl is not None and float(approx_kl) > factor * target_kl


# ----------------------------------------------------------------------------------------------
# text metrics


def repetition_rate(tokens: list[int], n: int = 3) -> float:
    """Fraction of the response's n-grams that repeat an earlier n-gram of the same response.

    A cheap degeneration signal (PPO policies that hack a reward model often loop). 0 for a
    response with fewer than n+1 tokens (at most one n-gram, nothing to repeat). Pass the
    response tokens only, without padding.
    """
    if n < 1:
        raise ValueError(f"repetition_rate: n must be >= 1, got {n}")
    tokens = list(tokens)
    total = len(tokens) - n + 1
    if total < 2:
        return 0.0
    seen: set[tuple[int, ...]] = set()
    repeats = 0
    for i in range(total):
        gram = tuple(tokens[i:i + n])
        if gram in seen:
            repeats += 1
        else:
            seen.add(gram)
    return repeats / total


def batch_repetition(responses: list[list[int]], n: int = 3) -> float:
    """Mean :func:`repetition_rate` over responses (each response weighs the same)."""
    if len(responses) == 0:
        raise ValueError("batch_repetition: no responses")
    return sum(repetition_rate(r, n) for r in responses) / len(responses)
