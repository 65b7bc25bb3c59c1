"""Chunked torch path of the fused log-prob (hidden- and logits-level) vs the full-logits fp64
reference: values and gradients, every KL type, entropy, temperature, ignored labels."""

import pytest
import torch

import glm_kernels
from glm_kernels.reference import token_logprobs_reference
from tests.kernels_helpers.compare import assert_rel
from tests.kernels_helpers.logprob_case import make_case, weighted_loss

CASES = [(kl, ent, temp) for kl in (None, "k1", "k2", "k3") for ent in (False, True) for temp in (1.0, 0.7)]


def _reference(hidden, weight, labels, ref, kl, ent, temp, weights):
    h = hidden.double().requires_grad_()
    w = weight.double().requires_grad_()
    out = token_logprobs_reference(
        h,
        w,
        labels,
        temperature=temp,
        ref_logprobs=None if kl is None else ref,
        kl_type=kl,
        return_entropy=ent,
    )
    gh, gw = torch.autograd.grad(weighted_loss(out, weights), [h, w])
    return out, gh, gw


def _check_outputs(out, want, kl, ent):
    assert_rel(out.logprobs, want.logprobs, what="logprobs")
    assert out.logprobs.dtype == torch.float32
    if kl is None:
        assert out.kl is None
    else:
        assert_rel(out.kl, want.kl, what=f"kl {kl}")
    if ent:
        assert_rel(out.entropy, want.entropy, what="entropy")
    else:
        assert out.entropy is None


# tile_elems=200 forces several token and vocab chunks (and ragged last chunks) at n=24, v=96.
@pytest.mark.parametrize("tile", [None, 200])
@pytest.mark.parametrize("kl,ent,temp", CASES)
def test_hidden_level_matches_reference(kl, ent, temp, tile):
    hidden, weight, labels, ref, weights = make_case()
    want, gh_ref, gw_ref = _reference(hidden, weight, labels, ref, kl, ent, temp, weights)
    h = hidden.clone().requires_grad_()
    w = weight.clone().requires_grad_()
    out = glm_kernels.token_logprobs(
        h,
        w,
        labels,
        temperature=temp,
        ref_logprobs=None if kl is None else ref,
        kl_type=kl,
        return_entropy=ent,
        backend="torch",
        tile_elems=tile,
    )
    _check_outputs(out, want, kl, ent)
    gh, gw = torch.autograd.grad(weighted_loss(out, weights), [h, w])
    assert_rel(gh, gh_ref, what="grad hidden")
    assert_rel(gw, gw_ref, what="grad weight")


@pytest.mark.parametrize("tile", [None, 200])
@pytest.mark.parametrize("kl,ent,temp", CASES[::3])
def test_logits_level_matches_reference(kl, ent, temp, tile):
    hidden, weight, labels, ref, weights = make_case(seed=1)
    want = token_logprobs_reference(
        hidden,
        weight,
        labels,
        temperature=temp,
        ref_logprobs=None if kl is None else ref,
        kl_type=kl,
        return_entropy=ent,
    )
    logits64 = (hidden.double() @ weight.double().t()).requires_grad_()
    # Reference gradient w.r.t. logits, through the same log_softmax formula.
    lsm = torch.log_softmax(logits64 / temp, -1)
    valid = labels != -100
    safe = torch.where(valid, labels, 0)
    lp = torch.where(valid, lsm.gather(-1, safe[:, None])[:, 0], 0.0)
    ref_out = glm_kernels.TokenLogProbs(
        lp,
        None if kl is None else torch.where(valid, glm_kernels.kl_penalty(lp, ref.double(), kl), 0.0),
        torch.where(valid, -(lsm.exp() * lsm).sum(-1), 0.0) if ent else None,
    )
    (g_ref,) = torch.autograd.grad(weighted_loss(ref_out, weights), [logits64])
    logits = logits64.detach().float().requires_grad_()
    out = glm_kernels.logprobs_from_logits(
        logits,
        labels,
        temperature=temp,
        ref_logprobs=None if kl is None else ref,
        kl_type=kl,
        return_entropy=ent,
        backend="torch",
        tile_elems=tile,
    )
    _check_outputs(out, want, kl, ent)
    (g,) = torch.autograd.grad(weighted_loss(out, weights), [logits])
    assert_rel(g, g_ref, what="grad logits")


def test_ignored_tokens_are_zero_and_get_no_gradient():
    hidden, weight, labels, ref, _ = make_case()
    labels[:5] = -100
    h = hidden.clone().requires_grad_()
    out = glm_kernels.token_logprobs(h, weight, labels, ref_logprobs=ref, kl_type="k3", return_entropy=True)
    for t in out:
        assert torch.all(t[:5] == 0)
    out.logprobs.sum().add(out.entropy.sum()).add(out.kl.sum()).backward()
    assert torch.all(h.grad[:5] == 0) and torch.any(h.grad[5:] != 0)


def test_batched_leading_dims_and_custom_ignore_index():
    hidden, weight, labels, _, _ = make_case(n=12)
    labels = torch.where(labels == -100, torch.full_like(labels, 7), labels)
    labels[0] = 7
    out = glm_kernels.token_logprobs(hidden.view(3, 4, -1), weight, labels.view(3, 4), ignore_index=7)
    want = token_logprobs_reference(hidden, weight, labels, ignore_index=7)
    assert out.logprobs.shape == (3, 4)
    assert_rel(out.logprobs.view(-1), want.logprobs)
    assert out.logprobs.view(-1)[0] == 0


def test_k3_is_clamped_and_its_gradient_stops_there():
    logp = torch.tensor([-30.0, -1.0], requires_grad=True)
    kl = glm_kernels.kl_penalty(logp, torch.tensor([0.0, -1.5]), "k3")
    assert kl[0].item() == 10.0
    kl.sum().backward()
    assert logp.grad[0].item() == 0.0 and logp.grad[1].item() != 0.0


@pytest.mark.parametrize(
    "change,match",
    [
        ({"weight": torch.randn(96, 15)}, "hidden size mismatch"),
        ({"labels": torch.zeros(23, dtype=torch.long)}, "labels shape"),
        ({"labels": torch.zeros(24)}, "integer"),
        ({"kl_type": "k4", "ref_logprobs": torch.zeros(24)}, "kl_type"),
        ({"kl_type": "k1"}, "together"),
        ({"ref_logprobs": torch.zeros(24)}, "together"),
        ({"kl_type": "k1", "ref_logprobs": torch.zeros(5)}, "ref_logprobs shape"),
        ({"temperature": 0.0}, "temperature"),
        ({"labels": torch.full((24,), 96)}, "outside the vocabulary"),
        ({"backend": "cuda"}, "backend"),
        ({"backend": "triton"}, "TRITON_INTERPRET"),
    ],
)
def test_bad_inputs_raise_clear_errors(change, match, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    hidden, weight, labels, _, _ = make_case()
    args = {"weight": weight, "labels": labels}
    args.update(change)
    w, lab = args.pop("weight"), args.pop("labels")
    with pytest.raises(ValueError, match=match):
        glm_kernels.token_logprobs(hidden, w, lab, **args)


def test_logits_level_bad_inputs():
    with pytest.raises(ValueError, match="labels shape"):
        glm_kernels.logprobs_from_logits(torch.randn(4, 10), torch.zeros(5, dtype=torch.long))
    with pytest.raises(ValueError, match="outside the vocabulary"):
        glm_kernels.logprobs_from_logits(torch.randn(4, 10), torch.full((4,), -1))
