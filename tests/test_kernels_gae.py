"""GAE CPU paths (numba, the CPU default, and vectorised torch) vs the per-timestep loop: random
masks, variable lengths, packed segments, edge gammas/lambdas, whitening, fp64, backend choice and
bad inputs."""

import pytest
import torch

import glm_kernels
from glm_kernels.reference import gae_reference
from tests.kernels_helpers.compare import assert_rel


def _rand(shape, seed, p_hole=0.1):
    g = torch.Generator().manual_seed(seed)
    r = torch.randn(shape, generator=g)
    v = torch.randn(shape, generator=g)
    m = torch.rand(shape, generator=g) > p_hole  # interior holes end a response
    return r, v, m


CPU_BACKENDS = ["numba", "torch"]


# T values around the block length: aligned, ragged, one step, long enough for many blocks.
@pytest.mark.parametrize("T", [1, 7, 64, 100, 1000])
@pytest.mark.parametrize("gamma,lam", [(0.99, 0.95), (1.0, 1.0), (0.5, 0.0), (0.0, 0.7)])
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_matches_loop_random_masks(T, gamma, lam, backend):
    r, v, m = _rand((6, T), seed=T)
    adv, ret = glm_kernels.compute_gae(r, v, m, gamma, lam, backend=backend)
    adv_ref, ret_ref = gae_reference(r, v, m, gamma, lam)
    assert adv.dtype == torch.float32
    assert_rel(adv, adv_ref, what="advantages")
    assert_rel(ret, ret_ref, what="returns")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_variable_lengths_right_padded(backend):
    B, T = 9, 300
    r, v, _ = _rand((B, T), seed=1)
    lens = torch.tensor([0, 1, 2, 50, 299, 300, 128, 129, 17])
    m = torch.arange(T)[None] < lens[:, None]
    adv, ret = glm_kernels.compute_gae(r, v, m, 0.99, 0.95, backend=backend)
    adv_ref, ret_ref = gae_reference(r, v, m, 0.99, 0.95)
    assert_rel(adv, adv_ref)
    assert_rel(ret, ret_ref)
    assert torch.all(adv[~m] == 0) and torch.all(ret[~m] == 0)


# Both CPU paths on the same right-padded batch: the GEMM fast path (used automatically) and the
# general blocked scan; T values cover ragged GEMM blocks and two levels of block recursion.
@pytest.mark.parametrize("T", [1, 7, 64, 65, 4097])
@pytest.mark.parametrize("gamma,lam", [(0.99, 0.95), (1.0, 1.0), (0.3, 0.2), (0.9, 0.0)])
def test_right_padded_fast_path_and_general_path(T, gamma, lam):
    from glm_kernels.gae import next_valid
    from glm_kernels.gae_torch import gae_right_padded, gae_scan, right_padded

    r, v, _ = _rand((5, T), seed=T)
    lens = torch.tensor([0, 1, T // 2, T - 1, T]).clamp(min=0)
    m = torch.arange(T)[None] < lens[:, None]
    assert right_padded(m.float()) and (T < 2 or not right_padded((~m).float()))
    adv_ref, ret_ref = gae_reference(r, v, m, gamma, lam)
    for adv, ret in (
        gae_right_padded(r, v, m.float(), gamma, lam),
        gae_scan(r, v, m, next_valid(m, None), gamma, lam),
    ):
        assert_rel(adv, adv_ref, what="advantages")
        assert_rel(ret, ret_ref, what="returns")


def test_right_padded_detection():
    from glm_kernels.gae_torch import right_padded

    T = 5000  # large enough that position sums exceed 2^24 if the split were wrong
    m = torch.arange(T)[None] < torch.tensor([[0], [1], [T], [4999], [2500]])
    assert right_padded(m.float())
    for hole in ((2, 0), (2, 1234), (4, 1000), (3, 100)):  # holes before the last one
        bad = m.clone()
        bad[hole] = False
        assert not right_padded(bad.float()), hole
    swapped = m.clone()
    swapped[4, 2499], swapped[4, 2500] = False, True  # same count, shifted by one
    assert not right_padded(swapped.float())
    big = torch.ones(2, (1 << 16) + 3)
    big[1, 7] = 0
    assert not right_padded(big) and right_padded(big[:1])


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_packed_segments_do_not_leak(backend):
    lens = [5, 0, 130, 1, 64, 77]
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist())
    r, v, m = _rand((int(cu[-1]),), seed=2, p_hole=0.05)
    m[cu[1:-1] - 1] = True  # every segment's last step valid: a leak would show right there
    adv, ret = glm_kernels.compute_gae(r, v, m, 0.95, 0.9, cu_seqlens=cu, backend=backend)
    adv_ref, ret_ref = gae_reference(r, v, m, 0.95, 0.9, cu_seqlens=cu)
    assert_rel(adv, adv_ref, what="packed advantages")
    assert_rel(ret, ret_ref, what="packed returns")
    # Same numbers as running each segment as its own row.
    s, e = int(cu[2]), int(cu[3])
    row, _ = glm_kernels.compute_gae(r[None, s:e], v[None, s:e], m[None, s:e], 0.95, 0.9, backend=backend)
    assert_rel(adv[s:e], row[0])


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_long_sequence_stays_exact(backend):
    r, v, m = _rand((2, 8192), seed=3, p_hole=0.0)
    # no decay: errors would accumulate, not fade
    adv, _ = glm_kernels.compute_gae(r, v, m, 1.0, 1.0, backend=backend)
    adv_ref, _ = gae_reference(r, v, m, 1.0, 1.0)
    assert_rel(adv, adv_ref)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_whitening_option(backend):
    r, v, m = _rand((4, 50), seed=4)
    adv, _ = glm_kernels.compute_gae(r, v, m, 0.99, 0.95, whiten=True, backend=backend)
    raw, _ = gae_reference(r, v, m, 0.99, 0.95)
    sel = raw[m]
    want = torch.zeros_like(raw)
    want[m] = (sel - sel.mean()) / torch.sqrt(sel.var() + 1e-8)
    assert_rel(adv, want, what="whitened")


@pytest.mark.parametrize("layout", ["right_padded", "holes", "packed"])
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_fp64_stays_fp64(backend, layout):
    r, v, m = _rand((5, 333), seed=5)
    r, v = r.double() * 1e3, v.double()
    cu = None
    if layout == "right_padded":
        m = torch.arange(333)[None] < torch.tensor([[0], [1], [200], [332], [333]])
    if layout == "packed":
        cu = torch.tensor([0, 300, 300, 1000, 1665])
        r, v, m = r.view(-1), v.view(-1), m.view(-1)
    adv, ret = glm_kernels.compute_gae(r, v, m, 0.999, 0.97, cu_seqlens=cu, backend=backend)
    adv_ref, ret_ref = gae_reference(r, v, m, 0.999, 0.97, cu_seqlens=cu)
    assert adv.dtype == ret.dtype == torch.float64
    assert_rel(adv, adv_ref, tol=1e-12, what="fp64 advantages")  # fp32 arithmetic would miss this
    assert_rel(ret, ret_ref, tol=1e-12, what="fp64 returns")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_dtype_promotion_and_odd_layouts(backend):
    """bf16 rewards, int mask, non-contiguous inputs: outputs fp32 and still exact."""
    r, v, m = _rand((7, 40), seed=6)
    r16 = r.bfloat16()
    rt, vt, mt = r16.t().contiguous().t(), v.t().contiguous().t(), m.int().t().contiguous().t()
    assert not rt.is_contiguous()
    adv, ret = glm_kernels.compute_gae(rt, vt, mt, 0.9, 0.8, backend=backend)
    adv_ref, ret_ref = gae_reference(r16.float(), v, m, 0.9, 0.8)
    assert adv.dtype == ret.dtype == torch.float32
    assert_rel(adv, adv_ref)
    assert_rel(ret, ret_ref)


def test_masked_positions_exactly_zero_numba():
    r, v, m = _rand((3, 64), seed=7, p_hole=0.3)
    r[~m] = float("nan")  # garbage under the mask must not reach any output
    v[~m] = 1e30
    adv, ret = glm_kernels.compute_gae(r, v, m, 0.99, 0.95, backend="numba")
    assert torch.all(adv[~m] == 0) and torch.all(ret[~m] == 0)
    assert torch.isfinite(adv).all() and torch.isfinite(ret).all()
    r0, v0 = r.where(m, 0.0), v.where(m, 0.0)
    adv_ref, ret_ref = gae_reference(r0, v0, m, 0.99, 0.95)
    assert_rel(adv, adv_ref)
    assert_rel(ret, ret_ref)


@pytest.mark.parametrize("packed", [False, True])
def test_auto_on_cpu_is_numba(packed, monkeypatch):
    import glm_kernels.gae_numba as gn

    r, v, m = _rand((4, 97), seed=8)
    cu = torch.tensor([0, 97, 200, 388]) if packed else None
    if packed:
        r, v, m = r.view(-1), v.view(-1), m.view(-1)
    calls = []
    real = gn.gae_numba
    monkeypatch.setattr(gn, "gae_numba", lambda *a, **k: calls.append(1) or real(*a, **k))
    auto = glm_kernels.compute_gae(r, v, m, 0.99, 0.95, cu_seqlens=cu)
    assert calls, "backend='auto' on CPU did not run the numba kernel"
    explicit = glm_kernels.compute_gae(r, v, m, 0.99, 0.95, cu_seqlens=cu, backend="numba")
    for a, b in zip(auto, explicit):
        assert torch.equal(a, b)


def test_numba_refuses_non_cpu_tensors():
    r = torch.zeros(4, 5, device="meta")
    with pytest.raises(ValueError, match="numba.*CPU"):
        glm_kernels.compute_gae(r, r, None, 0.9, 0.9, backend="numba")


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"values": torch.zeros(3, 5)}, "values shape"),
        ({"mask": torch.ones(4, 4, dtype=torch.bool)}, "mask shape"),
        ({"gamma": 1.5}, "gamma"),
        ({"lam": -0.1}, "lam"),
        ({"rewards": torch.zeros(20), "values": torch.zeros(20), "mask": None}, r"\[B, T\]"),
        ({"cu_seqlens": torch.tensor([0, 4])}, "1-D"),
        (
            {
                "rewards": torch.zeros(20),
                "values": torch.zeros(20),
                "mask": None,
                "cu_seqlens": torch.tensor([0, 5, 3, 20]),
            },
            "non-decreasing",
        ),
        (
            {
                "rewards": torch.zeros(20),
                "values": torch.zeros(20),
                "mask": None,
                "cu_seqlens": torch.tensor([0, 5, 19]),
            },
            "end at 20",
        ),
        ({"backend": "gpu"}, "backend must be one of .*numba"),
    ],
)
def test_bad_inputs(kwargs, match):
    args = {
        "rewards": torch.zeros(4, 5),
        "values": torch.zeros(4, 5),
        "mask": torch.ones(4, 5, dtype=torch.bool),
        "gamma": 0.9,
        "lam": 0.9,
    }
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        glm_kernels.compute_gae(**args)


def test_whiten_rejects_empty_mask():
    with pytest.raises(ValueError, match="all zero"):
        glm_kernels.whiten_advantages(torch.randn(3, 4), torch.zeros(3, 4, dtype=torch.bool))
