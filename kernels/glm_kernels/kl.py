"""Per-token KL estimators between the policy and a reference policy (Schulman's k1/k2/k3).

With r = logp - logp_ref: k1 = r, k2 = r^2 / 2, k3 = exp(-r) - 1 + r (low variance, >= 0).
k3 is clamped to [-10, 10] as slime and verl do: exp(-r) overflows the penalty for tokens the
policy has pushed far below the reference, and one such token would dominate a batch mean.
The estimators are plain torch ops on logp, so they are differentiable through logp (and through
logp_ref if it requires grad); the clamp passes zero gradient where it is active.
"""

from __future__ import annotations

import torch

KL_TYPES = ("k1", "k2", "k3")
K3_CLAMP = 10.0


def check_kl_type(kl_type: str) -> None:
    if kl_type not in KL_TYPES:
        raise ValueError(f"kl_type must be one of {KL_TYPES}, got {kl_type!r}")


def kl_penalty(logp: torch.Tensor, ref_logp: torch.Tensor, kl_type: str) -> torch.Tensor:
    """Per-token KL estimate; computed in fp32 at least (fp64 inputs stay fp64)."""
    check_kl_type(kl_type)
    if logp.shape != ref_logp.shape:
        raise ValueError(f"ref_logprobs shape {tuple(ref_logp.shape)} != logprobs shape {tuple(logp.shape)}")
    dtype = torch.promote_types(torch.promote_types(logp.dtype, ref_logp.dtype), torch.float32)
    r = logp.to(dtype) - ref_logp.to(dtype)
    if kl_type == "k1":
        return r
    if kl_type == "k2":
        return 0.5 * r * r
    return torch.clamp(torch.expm1(-r) + r, min=-K3_CLAMP, max=K3_CLAMP)
