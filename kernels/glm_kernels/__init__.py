"""glm_kernels: kernels for PPO outside the model: fused vocab-parallel token log-prob (+ KL,
+ entropy) and GAE as a scan. Each op: Triton kernel on CUDA, chunked torch (log-prob) or numba
(GAE) path on CPU, plain reference for tests (`glm_kernels.reference`). The source lives in the
repository's kernels/ folder; the package is named glm_kernels so that it never collides with
Hugging Face's `kernels` package. See README "Kernels" for the layout, contracts and benchmark
numbers."""

from .gae import compute_gae
from .kl import KL_TYPES, kl_penalty
from .token_logprobs import TokenLogProbs, token_logprobs
from .token_logprobs_from_logits import logprobs_from_logits
from .whiten import whiten_advantages

__all__ = [
    "KL_TYPES",
    "TokenLogProbs",
    "compute_gae",
    "kl_penalty",
    "logprobs_from_logits",
    "token_logprobs",
    "whiten_advantages",
]
