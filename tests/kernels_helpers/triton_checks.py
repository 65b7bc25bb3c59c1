"""Run the Triton kernels and compare them with the references, on CPU under Triton's
interpreter (`--device cpu`, TRITON_INTERPRET=1) or natively on a GPU (`--device cuda`).

Run as a fresh process (tests/test_kernels_triton.py does, once per device): the
interpreter must be chosen before triton decorates the kernels, which a pytest process that
already imported triton cannot undo. Prints one JSON object: {check name: [passed, detail]}.
"""

import argparse
import json
import os
import sys

_parser = argparse.ArgumentParser(description=__doc__)
_parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
ARGS = _parser.parse_args()
if ARGS.device == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
    sys.exit("triton_checks --device cpu must run with TRITON_INTERPRET=1 in the environment")
if ARGS.device == "cuda" and os.environ.get("TRITON_INTERPRET") == "1":
    sys.exit("triton_checks --device cuda must run without TRITON_INTERPRET (natively)")

import torch  # noqa: E402
import triton.runtime.interpreter as interp  # noqa: E402

import glm_kernels  # noqa: E402
from glm_kernels import gae_triton, token_logprobs_triton  # noqa: E402
from glm_kernels.reference import gae_reference, token_logprobs_reference  # noqa: E402
from tests.kernels_helpers.compare import rel_err  # noqa: E402
from tests.kernels_helpers.logprob_case import make_case, weighted_loss  # noqa: E402

if ARGS.device == "cuda" and not torch.cuda.is_available():
    sys.exit("triton_checks --device cuda: no CUDA device")
DEV = torch.device(ARGS.device)
TOL = 1e-5
# cuBLAS may reduce bf16 GEMMs partly in bf16 (allow_bf16_reduced_precision_reduction): ~1e-3.
# A wrong kernel is off by O(1), so this still catches one. On CPU the GEMMs run in fp32.
BF16_TOL = 2e-2 if ARGS.device == "cuda" else 1e-5
results = {}


def record(name, errs):
    worst = max(errs.values())
    results[name] = [worst <= TOL, {k: f"{v:.2e}" for k, v in errs.items()}]


def logprob_check(kl, ent, temp, tile):
    hidden, weight, labels, ref, weights = make_case(n=10, h=16, v=40, seed=7)
    kw = {
        "temperature": temp,
        "ref_logprobs": None if kl is None else ref,
        "kl_type": kl,
        "return_entropy": ent,
    }
    h64, w64 = hidden.double().requires_grad_(), weight.double().requires_grad_()
    want = token_logprobs_reference(h64, w64, labels, **kw)
    gh_ref, gw_ref = torch.autograd.grad(weighted_loss(want, weights), [h64, w64])
    h, w = hidden.to(DEV).requires_grad_(), weight.to(DEV).requires_grad_()
    kw_dev = dict(kw, ref_logprobs=None if kl is None else ref.to(DEV))
    out = glm_kernels.token_logprobs(h, w, labels.to(DEV), backend="triton", tile_elems=tile, **kw_dev)
    gh, gw = torch.autograd.grad(weighted_loss(out, [x.to(DEV) for x in weights]), [h, w])
    out, gh, gw = _cpu(out), gh.cpu(), gw.cpu()
    errs = {
        "logprobs": rel_err(out.logprobs, want.logprobs),
        "grad_h": rel_err(gh, gh_ref),
        "grad_w": rel_err(gw, gw_ref),
    }
    if kl:
        errs["kl"] = rel_err(out.kl, want.kl)
    if ent:
        errs["entropy"] = rel_err(out.entropy, want.entropy)
    record(f"token_logprobs kl={kl} entropy={ent} T={temp} tile={tile}", errs)
    # Sensitivity: the same comparison must fail when the kernel's input is wrong.
    bad = glm_kernels.token_logprobs(
        hidden.to(DEV), weight.to(DEV), labels.to(DEV), backend="triton", tile_elems=tile,
        **dict(kw_dev, temperature=temp * 1.01),
    )
    bad = _cpu(bad)
    results[f"mutation caught T={temp}"] = [
        rel_err(bad.logprobs, want.logprobs) > TOL,
        "perturbed temperature",
    ]


def _cpu(out):
    return type(out)(*(None if t is None else t.detach().cpu() for t in out))


def bf16_check():
    """bf16 hidden / weight (the GPU training dtype): vs the fp64 reference on the same rounded
    inputs, so only the kernel's own arithmetic (fp32 tiles, bf16 GEMM inputs) is measured."""
    hidden, weight, labels, ref, weights = make_case(n=64, h=32, v=300, seed=11)
    hb, wb = hidden.bfloat16(), weight.bfloat16()
    want = token_logprobs_reference(hb.double(), wb.double(), labels, temperature=0.9,
                                    ref_logprobs=ref, kl_type="k3", return_entropy=True)
    out = glm_kernels.token_logprobs(hb.to(DEV), wb.to(DEV), labels.to(DEV), temperature=0.9,
                                 ref_logprobs=ref.to(DEV), kl_type="k3", return_entropy=True,
                                 backend="triton", tile_elems=2048)
    out = _cpu(out)
    errs = {"logprobs": rel_err(out.logprobs, want.logprobs), "kl": rel_err(out.kl, want.kl),
            "entropy": rel_err(out.entropy, want.entropy)}
    worst = max(errs.values())
    results["token_logprobs bf16 inputs"] = [worst <= BF16_TOL, {k: f"{v:.2e}" for k, v in errs.items()}]


def logits_check():
    hidden, weight, labels, _ref, weights = make_case(n=10, h=16, v=40, seed=8)
    logits = (hidden @ weight.t()).to(DEV).requires_grad_()
    labels = labels.to(DEV)
    weights = [x.to(DEV) for x in weights]
    out = glm_kernels.logprobs_from_logits(
        logits, labels, temperature=0.7, return_entropy=True, backend="triton"
    )
    (g,) = torch.autograd.grad(weighted_loss(out, weights), [logits])
    want = glm_kernels.logprobs_from_logits(
        logits, labels, temperature=0.7, return_entropy=True, backend="torch"
    )
    (g_ref,) = torch.autograd.grad(weighted_loss(want, weights), [logits])
    record(
        "logprobs_from_logits",
        {
            "logprobs": rel_err(out.logprobs, want.logprobs),
            "entropy": rel_err(out.entropy, want.entropy),
            "grad": rel_err(g, g_ref),
        },
    )


def gae_checks():
    g = torch.Generator().manual_seed(9)
    r, v = torch.randn(3, 70, generator=g), torch.randn(3, 70, generator=g)
    m = torch.rand(3, 70, generator=g) > 0.15
    m[1, 40:] = False
    adv, ret = (x.cpu() for x in glm_kernels.compute_gae(r.to(DEV), v.to(DEV), m.to(DEV), 0.99, 0.95,
                                                      backend="triton"))
    adv_ref, ret_ref = gae_reference(r, v, m, 0.99, 0.95)
    record("gae [B,T]", {"adv": rel_err(adv, adv_ref), "ret": rel_err(ret, ret_ref)})
    cu = torch.tensor([0, 3, 3, 40, 41, 75])
    r, v = torch.randn(75, generator=g), torch.randn(75, generator=g)
    m = torch.rand(75, generator=g) > 0.1
    adv, ret = (x.cpu() for x in glm_kernels.compute_gae(r.to(DEV), v.to(DEV), m.to(DEV), 0.9, 0.8,
                                                      cu_seqlens=cu.to(DEV), backend="triton"))
    adv_ref, ret_ref = gae_reference(r, v, m, 0.9, 0.8, cu_seqlens=cu)
    record("gae packed", {"adv": rel_err(adv, adv_ref), "ret": rel_err(ret, ret_ref)})
    wrong, _ = gae_reference(r, v, m, 0.9, 0.81, cu_seqlens=cu)
    results["gae mutation caught"] = [rel_err(adv, wrong) > TOL, "lam 0.8 vs 0.81"]


kinds = [
    type(k).__name__
    for k in (
        token_logprobs_triton.stats_kernel,
        token_logprobs_triton.grad_kernel,
        gae_triton.gae_kernel,
    )
]
if ARGS.device == "cpu":
    results["kernels are interpreted"] = [all(k == interp.InterpretedFunction.__name__ for k in kinds), kinds]
else:
    results["kernels run natively"] = [all(k != interp.InterpretedFunction.__name__ for k in kinds), kinds]
logprob_check("k3", True, 0.7, 150)
logprob_check(None, False, 1.0, None)
logprob_check("k2", False, 1.3, 64)
bf16_check()
logits_check()
gae_checks()
print(json.dumps(results))
