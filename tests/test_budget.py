"""Property tests for ``Budget``: projection, steepest ascent, sampling and
argument validation, against independent reference solvers written here in numpy float64."""

from __future__ import annotations

import dataclasses
import itertools
import math
import os

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import parashield as ps

# Seeded (derandomized) by default; PARASHIELD_HYPOTHESIS_EXAMPLES=N runs a longer random search.
_DEEP = int(os.environ.get("PARASHIELD_HYPOTHESIS_EXAMPLES", "0"))
SETTINGS = settings(
    max_examples=_DEEP or 60,
    deadline=None,
    derandomize=not _DEEP,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
NORMS = ("l1", "l2", "linf")
SCALES = (None, "layer", "element")
P = {"l1": 1.0, "l2": 2.0, "linf": math.inf}
Q = {"l1": math.inf, "l2": 2.0, "linf": 1.0}
SHAPES = [(1,), (2,), (3,), (2, 2), (1, 2), (2, 1)]
# Exact projection with sparsity: L2 unscaled, L-inf unscaled and element-scaled.
SPARSE_EXACT = {("l2", None), ("linf", None), ("linf", "element")}


# ------------------------------------------------------------------------------ strategies
finite = st.floats(-3.0, 3.0, allow_nan=False, allow_infinity=False, allow_subnormal=False)
values = st.one_of(finite, st.sampled_from([0.0, 1.0, -1.0, 0.5]))  # zeros and ties


@st.composite
def tensors_like(draw, shapes, elements=values):
    out = []
    for shape in shapes:
        n = int(np.prod(shape))
        out.append(torch.tensor(draw(st.lists(elements, min_size=n, max_size=n)), dtype=torch.float64).reshape(shape))
    return out


@st.composite
def cases(draw, norms=NORMS, scales=SCALES, sparse=None, max_dim=6):
    """(budget, params, x): x a list of tensors shaped like params."""
    shapes = draw(
        st.lists(st.sampled_from(SHAPES), min_size=1, max_size=3).filter(
            lambda s: sum(int(np.prod(x)) for x in s) <= max_dim
        )
    )
    k = sum(int(np.prod(s)) for s in shapes)
    norm = draw(st.sampled_from(norms))
    scale = draw(st.sampled_from(scales))
    if scale == "layer" or sparse is False:
        sparsity = None
    elif sparse is True:
        sparsity = draw(st.integers(1, k + 1))
    else:
        sparsity = draw(st.one_of(st.none(), st.integers(1, k + 1)))
    eps = draw(st.one_of(st.floats(0.05, 3.0), st.sampled_from([0.0, 1.0])))
    eta = draw(st.sampled_from([0.01, 0.3]))
    budget = ps.Budget(norm, eps, sparsity=sparsity, scale=scale, eta=eta)
    params = draw(tensors_like(shapes))
    x = draw(tensors_like(shapes, st.one_of(finite.map(lambda v: 2 * v), values)))
    return budget, params, x


# ------------------------------------------------------------------------------ references
def flat(ts) -> np.ndarray:
    return np.concatenate([t.detach().reshape(-1).double().numpy() for t in ts])


def split(v: np.ndarray, like):
    out, i = [], 0
    for t in like:
        out.append(v[i : i + t.numel()])
        i += t.numel()
    return out


def pnorm(v: np.ndarray, p: float) -> float:
    return float(np.linalg.norm(v, ord=p)) if v.size else 0.0


def proj_l2(x, r):
    n = np.linalg.norm(x)
    return x.copy() if n <= r else x * (r / n)


def proj_weighted_l1(x, r, c):
    """argmin ||a - x||_2 s.t. sum c_i |a_i| <= r, by bisection on the soft-threshold level."""
    if np.sum(c * np.abs(x)) <= r:
        return x.copy()

    def a_of(lam):
        return np.sign(x) * np.maximum(np.abs(x) - lam * c, 0.0)

    lo, hi = 0.0, float(np.max(np.abs(x) / c))
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if np.sum(c * np.abs(a_of(mid))) > r:
            lo = mid
        else:
            hi = mid
    return a_of(hi)


def proj_ellipsoid(x, r, s):
    """argmin ||a - x||_2 s.t. ||a / s||_2 <= r: a = x s^2 / (s^2 + mu), bisection on mu."""
    if np.linalg.norm(x / s) <= r:
        return x.copy()

    def a_of(mu):
        return x * s * s / (s * s + mu)

    lo, hi = 0.0, 1.0
    while np.linalg.norm(a_of(hi) / s) > r:
        hi *= 2
    for _ in range(300):
        mid = 0.5 * (lo + hi)
        if np.linalg.norm(a_of(mid) / s) > r:
            lo = mid
        else:
            hi = mid
    return a_of(hi)


def elem_scale(budget, params) -> np.ndarray:
    return np.abs(flat(params)) + budget.eta


def reference_projection(budget, params, x) -> np.ndarray:
    """Exact projection for the dense budgets (sparsity None)."""
    assert budget.sparsity is None
    xf, eps = flat(x), budget.eps
    if budget.scale == "layer":
        parts = []
        for xl, wl in zip(split(xf, params), split(flat(params), params)):
            r = eps * pnorm(wl, P[budget.norm])
            if budget.norm == "l2":
                parts.append(proj_l2(xl, r))
            elif budget.norm == "linf":
                parts.append(np.clip(xl, -r, r))
            else:
                parts.append(proj_weighted_l1(xl, r, np.ones_like(xl)))
        return np.concatenate(parts)
    s = elem_scale(budget, params) if budget.scale == "element" else np.ones_like(xf)
    if budget.norm == "l2":
        return proj_l2(xf, eps) if budget.scale is None else proj_ellipsoid(xf, eps, s)
    if budget.norm == "linf":
        return np.clip(xf, -eps * s, eps * s)
    return proj_weighted_l1(xf, eps, 1.0 / s)


def brute_force_sparse_distance(budget, params, x) -> float:
    """min over supports of size n of the distance to the n-sparse set (L2 / L-inf only)."""
    xf = flat(x)
    k, n = xf.size, min(budget.sparsity, xf.size)
    s = elem_scale(budget, params) if budget.scale == "element" else np.ones_like(xf)
    best = math.inf
    for support in itertools.combinations(range(k), n):
        idx = np.array(support, dtype=int)
        a = np.zeros_like(xf)
        if budget.norm == "l2":
            a[idx] = proj_l2(xf[idx], budget.eps)
        else:
            a[idx] = np.clip(xf[idx], -budget.eps * s[idx], budget.eps * s[idx])
        best = min(best, float(np.linalg.norm(a - xf)))
    return best


def dual_value(budget, params, g) -> float:
    """max_{a in S} <g, a> in closed form."""
    eps = budget.eps
    if budget.scale == "layer":
        return sum(
            eps * pnorm(wl, P[budget.norm]) * pnorm(gl, Q[budget.norm])
            for wl, gl in zip(split(flat(params), params), split(flat(g), params))
        )
    h = flat(g)
    if budget.scale == "element":
        h = h * elem_scale(budget, params)
    if budget.sparsity is not None:
        h = np.sort(np.abs(h))[::-1][: budget.sparsity]
    return eps * pnorm(h, Q[budget.norm])


def random_feasible_points(budget, params, count=20, seed=0):
    """Points of S: boundary samples, shrunk samples and projections of large random vectors."""
    gen = torch.Generator().manual_seed(seed)
    pts = []
    for i in range(count):
        a = budget.sample(params, gen)
        if i % 3 == 1:
            a = [t * float(torch.rand((), generator=gen, dtype=torch.float64)) for t in a]
        elif i % 3 == 2:
            a = budget.project([3 * torch.randn(p.shape, generator=gen, dtype=torch.float64) for p in params], params)
        pts.append(a)
    return pts


def dist(a, b) -> float:
    return float(np.linalg.norm(flat(a) - flat(b)))


# ------------------------------------------------------------------------------ projection
@SETTINGS
@given(cases())
def test_project_is_feasible_and_idempotent(case):
    budget, params, x = case
    a = budget.project(x, params)
    assert [t.shape for t in a] == [t.shape for t in x]
    assert all(torch.isfinite(t).all() for t in a)
    assert budget.contains(a, params, rtol=1e-9)
    if budget.sparsity is not None:
        assert sum(int(t.count_nonzero()) for t in a) <= budget.sparsity
    again = budget.project(a, params)
    scale = 1.0 + float(np.abs(flat(x)).max())
    np.testing.assert_allclose(flat(again), flat(a), rtol=0, atol=1e-9 * scale)
    # project does not modify its input; project_ works in place and agrees with project
    x_copy = [t.clone() for t in x]
    budget.project(x, params)
    assert all(torch.equal(u, v) for u, v in zip(x, x_copy))
    inplace = [t.clone() for t in x]
    out = budget.project_(inplace, params)
    assert out is inplace
    np.testing.assert_allclose(flat(inplace), flat(a), rtol=0, atol=1e-12 * scale)


@SETTINGS
@given(cases())
def test_float32_project_and_steepest_stay_feasible(case):
    budget, params, x = case
    # flush values that float32 cannot hold as normal numbers
    params = [torch.where(p.abs() < 1e-6, 0.0, p).float() for p in params]
    x = [torch.where(t.abs() < 1e-6, 0.0, t).float() for t in x]
    for out in (budget.project(x, params), budget.steepest(x, params)):
        assert all(t.dtype == torch.float32 and torch.isfinite(t).all() for t in out)
        assert budget.contains(out, params)
    d = budget.steepest(x, params)
    expected = dual_value(budget, params, x)
    assert float(flat(d) @ flat(x)) == pytest.approx(expected, rel=1e-5, abs=1e-6)


@SETTINGS
@given(cases(sparse=False))
def test_project_dense_is_the_nearest_point(case):
    budget, params, x = case
    a = budget.project(x, params)
    ref = reference_projection(budget, params, x)
    scale = 1.0 + float(np.abs(flat(x)).max())
    np.testing.assert_allclose(flat(a), ref, rtol=0, atol=1e-9 * scale)
    # no random feasible point is closer (a convex set has a unique nearest point)
    d = dist(a, x)
    for b in random_feasible_points(budget, params, count=12):
        assert dist(b, x) >= d - 1e-9 * scale


@SETTINGS
@given(cases(norms=("l2",), scales=("element",), sparse=False))
def test_project_ellipsoid_kkt(case):
    """Element-scaled L2: x - a = mu * a / s^2 with mu >= 0, and mu > 0 only on the boundary."""
    budget, params, x = case
    assume(budget.eps > 0)
    a = flat(budget.project(x, params))
    xf, s = flat(x), elem_scale(budget, params)
    inside = np.linalg.norm(xf / s) <= budget.eps
    if inside:
        np.testing.assert_allclose(a, xf, rtol=0, atol=1e-12)
        return
    np.testing.assert_allclose(np.linalg.norm(a / s), budget.eps, rtol=1e-9)
    normal = a / (s * s)
    # x - a is parallel to the outward normal with a non-negative factor
    mu = float((xf - a) @ normal / (normal @ normal))
    assert mu >= -1e-12
    np.testing.assert_allclose(xf - a, mu * normal, rtol=0, atol=1e-8 * (1 + np.abs(xf).max()))


@SETTINGS
@given(cases(sparse=True))
def test_project_sparse_exact_cases_match_brute_force(case):
    budget, params, x = case
    assume((budget.norm, budget.scale) in SPARSE_EXACT)
    a = budget.project(x, params)
    assert budget.contains(a, params, rtol=1e-9)
    best = brute_force_sparse_distance(budget, params, x)
    scale = 1.0 + float(np.abs(flat(x)).max())
    assert dist(a, x) == pytest.approx(best, rel=1e-9, abs=1e-10 * scale)


@SETTINGS
@given(cases(norms=("l1",), scales=(None, "element"), sparse=True))
def test_project_sparse_l1_heuristic_feasible(case):
    budget, params, x = case
    a = budget.project(x, params)
    assert budget.contains(a, params, rtol=1e-9)
    np.testing.assert_allclose(flat(budget.project(a, params)), flat(a), atol=1e-9 * (1 + np.abs(flat(x)).max()))


def test_project_sparse_l2_keeps_largest_and_scales():
    budget = ps.Budget("l2", 1.0, sparsity=2)
    w = [torch.zeros(5, dtype=torch.float64)]
    a = budget.project([torch.tensor([3.0, -4.0, 1.0, 0.5, -2.0], dtype=torch.float64)], w)[0]
    torch.testing.assert_close(a, torch.tensor([0.6, -0.8, 0.0, 0.0, 0.0], dtype=torch.float64), rtol=0, atol=1e-15)


def test_project_sparse_linf_prefers_largest_saving():
    """Keep the coordinates whose zeroing costs most after clipping: with eps = 1, x = (5, 1.2,
    1.1) and n = 1, keeping 5 saves 25 - 16 = 9 while keeping 1.2 saves only 1.44 - 0.04."""
    budget = ps.Budget("linf", 1.0, sparsity=1)
    w = [torch.zeros(3, dtype=torch.float64)]
    a = budget.project([torch.tensor([5.0, 1.2, 1.1], dtype=torch.float64)], w)[0]
    assert a.tolist() == [1.0, 0.0, 0.0]
    # element-scaled: bound_i = eps * (|w_i| + eta); a large bound makes a small |x_i| win
    budget = ps.Budget("linf", 1.0, sparsity=1, scale="element", eta=0.0)
    w = [torch.tensor([0.1, 10.0, 0.1], dtype=torch.float64)]
    a = budget.project([torch.tensor([5.0, 3.0, 0.0], dtype=torch.float64)], w)[0]
    # keep 5 (clipped to 0.1): saving 25 - 4.9^2 = 0.99; keep 3 (inside): saving 9
    assert a.tolist() == [0.0, 3.0, 0.0]


# ------------------------------------------------------------------------------ steepest
@SETTINGS
@given(cases())
def test_steepest_attains_dual_norm_and_is_feasible(case):
    budget, params, g = case
    d = budget.steepest(g, params)
    assert all(torch.isfinite(t).all() for t in d)
    value = float(flat(d) @ flat(g))
    expected = dual_value(budget, params, g)
    assert value == pytest.approx(expected, rel=1e-12, abs=1e-12)
    assert float(budget.ascent_value(g, params)) == pytest.approx(expected, rel=1e-12, abs=1e-12)
    assert budget.contains(d, params, rtol=1e-9)
    # the argmax: no feasible point does better
    for a in random_feasible_points(budget, params, count=15, seed=1):
        assert float(flat(a) @ flat(g)) <= expected * (1 + 1e-9) + 1e-12
    # radius rescales linearly; steepest does not modify its input; steepest_ works in place
    g_copy = [t.clone() for t in g]
    d2 = budget.steepest(g, params, radius=2 * budget.eps)
    assert float(flat(d2) @ flat(g)) == pytest.approx(2 * expected, rel=1e-12, abs=1e-12)
    assert all(torch.equal(u, v) for u, v in zip(g, g_copy))
    inplace = [t.clone() for t in g]
    assert budget.steepest_(inplace, params) is inplace
    np.testing.assert_array_equal(flat(inplace), flat(d))


@pytest.mark.parametrize("norm", NORMS)
def test_steepest_closed_forms(norm):
    """p=2 -> eps h/||h||; p=inf -> eps sign(h); p=1 -> all of eps on the largest |g_i|."""
    eps = 0.5
    w = [torch.ones(4, dtype=torch.float64)]
    g = [torch.tensor([1.0, -3.0, 2.0, 0.0], dtype=torch.float64)]
    d = ps.Budget(norm, eps).steepest(g, w)[0]
    expected = {
        "l2": eps * g[0] / g[0].norm(),
        "linf": eps * torch.sign(g[0]),
        "l1": torch.tensor([0.0, -eps, 0.0, 0.0], dtype=torch.float64),
    }[norm]
    torch.testing.assert_close(d, expected, rtol=1e-15, atol=0)
    # sparse, n = 2: h = (0, -3, 2, 0)
    d = ps.Budget(norm, eps, sparsity=2).steepest(g, w)[0]
    h = torch.tensor([0.0, -3.0, 2.0, 0.0], dtype=torch.float64)
    expected = {"l2": eps * h / h.norm(), "linf": eps * torch.sign(h), "l1": expected}[norm]
    torch.testing.assert_close(d, expected, rtol=1e-15, atol=0)


@pytest.mark.parametrize("norm", NORMS)
@pytest.mark.parametrize("scale", SCALES)
def test_steepest_non_contiguous_tensors(norm, scale):
    """Transposed (non-contiguous) parameters and gradients give the same result."""
    gen = torch.Generator().manual_seed(3)
    w = [torch.randn(3, 4, generator=gen, dtype=torch.float64), torch.randn(5, generator=gen, dtype=torch.float64)]
    g = [torch.randn(3, 4, generator=gen, dtype=torch.float64), torch.randn(5, generator=gen, dtype=torch.float64)]
    wt = [w[0].T.contiguous().T, w[1]]
    gt = [g[0].T.contiguous().T, g[1]]
    assert not wt[0].is_contiguous() and not gt[0].is_contiguous()
    budget = ps.Budget(norm, 0.3, scale=scale)
    for a, b in zip(budget.steepest(g, w), budget.steepest(gt, wt)):
        torch.testing.assert_close(a, b, rtol=1e-14, atol=1e-15)
    x = [3 * t for t in g]
    xt = [3 * t for t in gt]
    for a, b in zip(budget.project(x, w), budget.project(xt, wt)):
        torch.testing.assert_close(a, b, rtol=1e-15, atol=1e-15)


# ------------------------------------------------------------------------------ zero input
ALL_BUDGETS = [
    (norm, scale, sparsity)
    for norm in NORMS
    for scale in SCALES
    for sparsity in (None, 2)
    if not (scale == "layer" and sparsity is not None)
]


@pytest.mark.parametrize("norm,scale,sparsity", ALL_BUDGETS)
def test_zero_gradient_gives_zero_corruption(norm, scale, sparsity):
    budget = ps.Budget(norm, 0.7, sparsity=sparsity, scale=scale)
    params = [torch.randn(2, 3, dtype=torch.float64), torch.randn(4, dtype=torch.float64)]
    zeros = [torch.zeros_like(p) for p in params]
    for out in (budget.steepest(zeros, params), budget.project(zeros, params), budget.steepest(zeros, params, radius=0.1)):
        assert all(torch.equal(t, torch.zeros_like(t)) for t in out)
    assert float(budget.ascent_value(zeros, params)) == 0.0
    # float32 too, and zero parameters (layer scale: zero radius)
    p32 = [torch.zeros(3, dtype=torch.float32)]
    for g in ([torch.zeros(3)], [torch.tensor([1.0, -2.0, 0.5])]):
        out = budget.steepest(g, p32)
        assert all(torch.isfinite(t).all() for t in out)
        assert budget.contains(out, p32)


@pytest.mark.parametrize("norm,scale,sparsity", ALL_BUDGETS)
def test_zero_eps_budget_is_the_origin(norm, scale, sparsity):
    budget = ps.Budget(norm, 0.0, sparsity=sparsity, scale=scale)
    params = [torch.randn(2, 3, dtype=torch.float64)]
    x = [torch.randn(2, 3, dtype=torch.float64)]
    for out in (budget.project(x, params), budget.steepest(x, params), budget.sample(params, 0)):
        assert all(torch.equal(t, torch.zeros_like(t)) for t in out)


# ------------------------------------------------------------------------------ sampling
@SETTINGS
@given(cases(), st.integers(0, 2**31 - 1))
def test_samples_on_boundary_sparse_and_seeded(case, seed):
    budget, params, _ = case
    if budget.scale == "layer":
        assume(all(float(p.abs().max()) > 1e-3 for p in params))
    a = budget.sample(params, seed)
    assert [t.shape for t in a] == [t.shape for t in params]
    assert all(t.dtype == torch.float64 for t in a)
    if budget.scale == "layer":
        for al, wl in zip(a, params):
            expected = budget.eps * float(torch.linalg.vector_norm(wl.reshape(-1), budget.p))
            assert float(torch.linalg.vector_norm(al.reshape(-1), budget.p)) == pytest.approx(expected, rel=1e-6, abs=1e-300)
    else:
        assert budget.measure(a, params) == pytest.approx(budget.eps, rel=1e-6, abs=1e-300)
    assert budget.contains(a, params)
    if budget.sparsity is not None:
        assert sum(int(t.count_nonzero()) for t in a) <= budget.sparsity
    # same seed (int or Generator) -> same sample
    b = budget.sample(params, seed)
    c = budget.sample(params, torch.Generator().manual_seed(seed))
    assert all(torch.equal(u, v) for u, v in zip(a, b))
    assert all(torch.equal(u, v) for u, v in zip(a, c))


@pytest.mark.parametrize("norm", NORMS)
def test_sample_different_seeds_differ(norm):
    params = [torch.randn(5, dtype=torch.float64)]
    for sparsity in (None, 2):
        budget = ps.Budget(norm, 1.0, sparsity=sparsity)
        a, b = budget.sample(params, 0)[0], budget.sample(params, 1)[0]
        assert not torch.equal(a, b)


def test_sample_float32_dtype_and_boundary():
    params = [torch.randn(4, 3), torch.randn(3)]
    for norm in NORMS:
        a = ps.Budget(norm, 0.2).sample(params, 0)
        assert all(t.dtype == torch.float32 for t in a)
        assert ps.Budget(norm, 0.2).measure(a, params) == pytest.approx(0.2, rel=1e-5)


def test_sample_sparse_support_is_uniform():
    """Each of k coordinates is in the random n-support with probability n/k."""
    k, n, trials = 6, 2, 3000
    budget = ps.Budget("l2", 1.0, sparsity=n)
    params = [torch.randn(k, dtype=torch.float64)]
    gen = torch.Generator().manual_seed(0)
    counts = torch.zeros(k)
    for _ in range(trials):
        a = budget.sample(params, gen)[0]
        assert int(a.count_nonzero()) == n
        counts += (a != 0).float()
    p = n / k
    sigma = math.sqrt(trials * p * (1 - p))
    assert torch.all((counts - trials * p).abs() < 5 * sigma), counts


def test_sample_l2_direction_is_isotropic():
    """Uniform on the L2 sphere: mean 0 and E[a a^T] = eps^2 / k * I."""
    k, trials, eps = 4, 4000, 2.0
    budget = ps.Budget("l2", eps)
    params = [torch.randn(k, dtype=torch.float64)]
    gen = torch.Generator().manual_seed(0)
    A = torch.stack([budget.sample(params, gen)[0] for _ in range(trials)])
    # each a_i^2 / eps^2 ~ Beta(1/2, (k-1)/2): mean 1/k, var 2(k-1)/(k^2(k+2)); 5 sigma bounds
    sd_sq = math.sqrt(2 * (k - 1) / (k * k * (k + 2)) / trials) * eps**2
    assert torch.all((A.square().mean(0) - eps**2 / k).abs() < 5 * sd_sq)
    sd_mean = eps / math.sqrt(k * trials)
    assert torch.all(A.mean(0).abs() < 5 * sd_mean)


def test_sample_l1_and_linf_cover_the_sphere():
    """L1: |a_i| / eps ~ Beta(1, k-1) (mean 1/k); L-inf: exactly one coordinate at +-eps per draw,
    each one equally often, the others uniform on [-eps, eps] (mean |a_i| = eps/2)."""
    k, trials = 4, 3000
    params = [torch.randn(k, dtype=torch.float64)]
    gen = torch.Generator().manual_seed(0)
    A = torch.stack([ps.Budget("l1", 1.0).sample(params, gen)[0] for _ in range(trials)])
    sd = math.sqrt((k - 1) / (k * k * (k + 1)) / trials)
    assert torch.all((A.abs().mean(0) - 1 / k).abs() < 5 * sd)
    assert (A > 0).float().mean() == pytest.approx(0.5, abs=5 * math.sqrt(0.25 / (k * trials)))
    A = torch.stack([ps.Budget("linf", 1.0).sample(params, gen)[0] for _ in range(trials)])
    at_face = A.abs() == 1.0
    assert torch.all(at_face.sum(1) >= 1)
    inner = A[~at_face]
    assert (inner > 0).float().mean() == pytest.approx(0.5, abs=5 * math.sqrt(0.25 / inner.numel()))
    assert inner.abs().mean() == pytest.approx(0.5, abs=5 * math.sqrt(1 / 12 / inner.numel()))
    assert (A[at_face] > 0).float().mean() == pytest.approx(0.5, abs=5 * math.sqrt(0.25 / trials))
    p = 1 / k
    assert torch.all((at_face.float().sum(0) - trials * p).abs() < 5 * math.sqrt(trials * p * (1 - p)))


# ------------------------------------------------------------------------------ measure/contains
def test_measure_and_contains_each_geometry():
    w = [torch.tensor([3.0, -4.0], dtype=torch.float64), torch.tensor([1.0], dtype=torch.float64)]
    a = [torch.tensor([0.3, 0.4], dtype=torch.float64), torch.tensor([-0.2], dtype=torch.float64)]
    assert ps.Budget("l2", 1).measure(a, w) == pytest.approx(math.sqrt(0.29), rel=1e-15)
    assert ps.Budget("l1", 1).measure(a, w) == pytest.approx(0.9, rel=1e-15)
    assert ps.Budget("linf", 1).measure(a, w) == pytest.approx(0.4, rel=1e-15)
    # layer: max(||a_l|| / ||w_l||) = max(0.5/5, 0.2/1)
    assert ps.Budget("l2", 1, scale="layer").measure(a, w) == pytest.approx(0.2, rel=1e-15)
    # element: a / (|w| + eta)
    b = ps.Budget("linf", 1, scale="element", eta=1.0)
    assert b.measure(a, w) == pytest.approx(max(0.3 / 4, 0.4 / 5, 0.2 / 2), rel=1e-15)
    assert ps.Budget("l2", 0.6).contains(a, w)
    assert not ps.Budget("l2", 0.5).contains(a, w)
    assert not ps.Budget("l2", 1.0, sparsity=2).contains(a, w)  # 3 nonzeros
    assert ps.Budget("l2", 1.0, sparsity=3).contains(a, w)


@SETTINGS
@given(cases(), st.floats(0.5, 2.0))
def test_contains_is_measure_below_eps(case, factor):
    """contains(a) <=> measure(a) <= eps (and sparsity), up to its relative tolerance: points just
    outside are rejected, points just inside accepted."""
    budget, params, _ = case
    assume(budget.eps > 0)
    if budget.scale == "layer":
        assume(all(float(p.abs().max()) > 1e-3 for p in params))
    a = budget.sample(params, 0)
    for f, inside in ((1 + 1e-4, False), (1 - 1e-9, True), (factor, factor <= 1)):
        b = [t * f for t in a]
        assert budget.contains(b, params) == inside
        assert budget.measure(b, params) == pytest.approx(f * budget.eps, rel=1e-9)


# ------------------------------------------------------------------------------ validation
@pytest.mark.parametrize(
    "kwargs,exc,word",
    [
        (dict(norm="l3"), ValueError, "norm"),
        (dict(norm="foo"), ValueError, "norm"),
        (dict(norm=None), ValueError, "norm"),
        (dict(norm=3), ValueError, "norm"),
        (dict(eps=-0.1), ValueError, "eps"),
        (dict(eps=float("nan")), ValueError, "eps"),
        (dict(eps=float("inf")), ValueError, "eps"),
        (dict(eps="0.1"), TypeError, "eps"),
        (dict(eps=None), TypeError, "eps"),
        (dict(eps=True), TypeError, "eps"),
        (dict(eps=torch.tensor(0.1)), TypeError, "eps"),
        (dict(sparsity=0), ValueError, "sparsity"),
        (dict(sparsity=-1), ValueError, "sparsity"),
        (dict(sparsity=2.5), TypeError, "sparsity"),
        (dict(sparsity=2.0), TypeError, "sparsity"),
        (dict(sparsity=True), TypeError, "sparsity"),
        (dict(sparsity="3"), TypeError, "sparsity"),
        (dict(scale="foo"), ValueError, "scale"),
        (dict(scale="Layer"), ValueError, "scale"),
        (dict(scale="layer", sparsity=3), ValueError, "sparsity"),
        (dict(eta=-1.0), ValueError, "eta"),
        (dict(eta=float("nan")), ValueError, "eta"),
    ],
)
def test_validation_errors_name_the_argument(kwargs, exc, word):
    args = dict(norm="l2", eps=0.1)
    args.update(kwargs)
    with pytest.raises(exc, match=word):
        ps.Budget(**args)


@pytest.mark.parametrize(
    "spelling,canonical",
    [("l1", "l1"), ("L2", "l2"), ("linf", "linf"), ("Linf", "linf"), (1, "l1"), (2, "l2"), (2.0, "l2"),
     (float("inf"), "linf"), ("inf", "linf"), ("l_inf", "linf")],
)
def test_norm_spellings(spelling, canonical):
    b = ps.Budget(spelling, 0.1)
    assert b.norm == canonical
    assert b.q == Q[canonical]


def test_budget_is_immutable_and_with_eps():
    b = ps.Budget("l2", 0.1, sparsity=3, scale="element", eta=0.2)
    with pytest.raises(dataclasses.FrozenInstanceError):
        b.eps = 0.5  # type: ignore[misc]
    c = b.with_eps(0.5)
    assert (c.eps, c.norm, c.sparsity, c.scale, c.eta) == (0.5, "l2", 3, "element", 0.2)
    assert b.eps == 0.1
    with pytest.raises(ValueError, match="eps"):
        b.with_eps(-1.0)


@pytest.fixture(params=["host", "sync_free"])
def selection_path(request, monkeypatch):
    """Run a top-n test through the CPU's path (candidates above a sampled threshold) and through
    the accelerators' path without host syncs (forced here on the CPU)."""
    import parashield.budget as budget_module

    monkeypatch.setattr(budget_module, "_sync_free", lambda ts: request.param == "sync_free")
    return request.param


@pytest.mark.parametrize("n", [1, 1000, 123_457, 1_500_000])
@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.usefixtures("selection_path")
def test_top_n_over_many_tensors_matches_a_sort(n, ties):
    """The sampled-threshold selection (k > 1M: candidates above a sample quantile, then
    kthvalue) keeps exactly the n largest scores, ties broken by position across tensors."""
    from parashield.budget import _keep_top_n_

    gen = torch.Generator().manual_seed(n)
    shapes = [(700, 1000), (3,), (500, 1200), (10, 10)]
    xs = [torch.randn(s, generator=gen) for s in shapes]
    if ties:  # coarse values: thousands of exact ties at every threshold
        xs = [torch.round(x * 8) / 8 for x in xs]
    flat = torch.cat([x.reshape(-1) for x in xs])
    # Reference: stable sort by descending |x| (position breaks ties), keep the first n.
    idx = torch.sort(-flat.abs(), stable=True).indices[:n]
    expected = torch.zeros_like(flat)
    expected[idx] = flat[idx]
    out = [x.clone() for x in xs]
    _keep_top_n_(out, torch._foreach_abs(out), n)
    assert torch.equal(torch.cat([o.reshape(-1) for o in out]), expected)
    out = [x.clone() for x in xs]  # scores computed block by block from the values
    _keep_top_n_(out, torch.abs, n)
    assert torch.equal(torch.cat([o.reshape(-1) for o in out]), expected)
    # Non-contiguous tensors (a transposed view) are written through their strides.
    out = [x.t().contiguous().t() if x.dim() == 2 else x.clone() for x in xs]
    assert not out[0].is_contiguous()
    _keep_top_n_(out, torch._foreach_abs(out), n)
    assert torch.equal(torch.cat([o.reshape(-1) for o in out]), expected)
    out = [x.t().contiguous().t() if x.dim() == 2 else x.clone() for x in xs]
    _keep_top_n_(out, torch.abs, n)
    assert torch.equal(torch.cat([o.reshape(-1) for o in out]), expected)


@pytest.mark.parametrize("size", [1000, 1_200_000])
@pytest.mark.parametrize("blockwise", [False, True])
@pytest.mark.usefixtures("selection_path")
def test_top_n_keeps_nan_scores_first(size, blockwise):
    """A NaN compares False with every threshold; it must still count as the largest score (a
    NaN corruption is reported, never silently dropped)."""
    from parashield.budget import _keep_top_n_

    x = torch.randn(size, generator=torch.Generator().manual_seed(1))
    nan_at = torch.tensor([5, 77, size - 1])
    x[nan_at] = float("nan")
    n = 10
    out = [x.clone()]
    _keep_top_n_(out, torch.abs if blockwise else [x.abs()], n)
    kept = torch.nonzero(out[0].isnan() | (out[0] != 0)).squeeze(1)
    finite_top = torch.sort(-torch.nan_to_num(x.abs(), nan=-1.0), stable=True).indices[: n - 3]
    assert kept.tolist() == sorted([*nan_at.tolist(), *finite_top.tolist()])


@given(case=cases(sparse=True))
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_sync_free_selection_equals_the_host_path_bit_for_bit(case, monkeypatch):
    """Projection and steepest ascent of every sparse budget give the same tensors, bit for bit,
    through the accelerators' top-n path as through the CPU's."""
    import parashield.budget as budget_module

    budget, params, x = case
    results = {}
    for path in (False, True):
        monkeypatch.setattr(budget_module, "_sync_free", lambda ts, path=path: path)
        results[path] = (budget.project([t.clone() for t in x], params), budget.steepest([t.clone() for t in x], params))
    for host, free in zip(results[False], results[True]):  # the projections, then the ascent steps
        for a, b in zip(host, free):
            torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("budget", [ps.Budget("l2", 0.5, sparsity=100), ps.Budget("linf", 0.5, sparsity=100),
                                    ps.Budget("l1", 0.5), ps.Budget("l1", 0.5, scale="layer")],
                         ids=lambda b: f"{b.norm}-{b.scale}-{b.sparsity}")
def test_accelerator_paths_read_no_value_back_to_the_host(budget):
    """On the meta device a tensor has a shape and no data, so any step that needs a value on
    the host (``.item()``, ``nonzero``, indexing by a tensor, a data-dependent size) raises:
    projection and steepest ascent of sparse and L1 budgets run there, as they must on a GPU to
    never wait for it."""
    params = [torch.empty(300, 40, device="meta"), torch.empty(40, device="meta")]
    x = [torch.empty_like(p) for p in params]
    out = budget.project_(x, params)
    assert [t.shape for t in out] == [p.shape for p in params] and out[0].device.type == "meta"
    if budget.sparsity is not None:  # the L1 steepest step is an argmax (its own sync-free path)
        budget.steepest_([torch.empty_like(p) for p in params], params)


def test_sync_free_selection_equals_the_host_path_on_mixed_dtypes_and_ties(monkeypatch):
    import parashield.budget as budget_module

    gen = torch.Generator().manual_seed(3)
    xs = [torch.round(torch.randn(shape, generator=gen) * 4) / 4 for shape in ((50, 60), (7,), (40, 30))]
    xs = [xs[0].to(torch.float16), xs[1].double(), xs[2].t()]  # mixed dtypes, a transposed view
    xs[1][2] = float("nan")
    results = []
    for path in (False, True):
        monkeypatch.setattr(budget_module, "_sync_free", lambda ts, path=path: path)
        out = [x.clone() if x.is_contiguous() else x.t().clone().t() for x in xs]
        budget_module._keep_top_n_(out, torch.abs, 500, lambda v: v * 0.5)
        results.append(out)
    for a, b in zip(*results):
        assert a.dtype == b.dtype and a.stride() == b.stride()
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)
    assert sum(int((t != 0).sum()) for t in results[1]) == 500


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_sparse_projection_on_cuda_has_no_host_sync():
    params = [torch.randn(1000, 100, device="cuda"), torch.randn(100, device="cuda")]
    budget = ps.Budget("l2", 0.5, sparsity=1000)
    x = [torch.randn_like(p) for p in params]
    expected = [t.cpu() for t in ps.Budget("l2", 0.5, sparsity=1000).project([t.cpu() for t in x], [p.cpu() for p in params])]
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = budget.project_([t.clone() for t in x], params)
        budget.steepest_([t.clone() for t in x], params)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    for a, b in zip(out, expected):
        torch.testing.assert_close(a.cpu(), b, rtol=1e-6, atol=1e-7)
