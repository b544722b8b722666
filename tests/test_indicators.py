"""Loss change indicators and corruptions against exact answers: linear
losses (first order is exact), quadratic losses (second order is exact), curvature extras against
a dense Hessian, per-layer indicators and the critical eps."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from torch import nn

import parashield as ps

NORMS = ("l1", "l2", "linf")
P = {"l1": 1.0, "l2": 2.0, "linf": math.inf}
Q = {"l1": math.inf, "l2": 2.0, "linf": 1.0}
ALL_BUDGETS = [
    (norm, scale, sparsity)
    for norm in NORMS
    for scale in (None, "layer", "element")
    for sparsity in (None, 1, 3)
    if not (scale == "layer" and sparsity is not None)
]


def flat(ts) -> np.ndarray:
    return np.concatenate([t.detach().reshape(-1).double().cpu().numpy() for t in ts])


def dual_value(budget, params, grads) -> float:
    """max_{a in S} <g, a> in closed form, per geometry."""
    if budget.scale == "layer":
        return sum(
            budget.eps * np.linalg.norm(flat([w]), P[budget.norm]) * np.linalg.norm(flat([g]), Q[budget.norm])
            for w, g in zip(params, grads)
        )
    h = flat(grads)
    if budget.scale == "element":
        h = h * (np.abs(flat(params)) + budget.eta)
    if budget.sparsity is not None:
        h = np.sort(np.abs(h))[::-1][: budget.sparsity]
    return budget.eps * np.linalg.norm(h, Q[budget.norm])


# ------------------------------------------------------------------------------ linear loss
@pytest.fixture
def linear_objective(models):
    model = models.LinearModel(seed=0)
    batch = models.linear_batch(seed=1)
    return ps.Objective(model, models.linear_loss, batch)


def linear_gradient(objective):
    x1, x2 = objective.data
    return [x1.mean(0), x2.mean(0)]


@pytest.mark.parametrize("norm,scale,sparsity", ALL_BUDGETS)
def test_linear_loss_first_order_and_one_step_are_exact(linear_objective, norm, scale, sparsity):
    budget = ps.Budget(norm, 0.3, sparsity=sparsity, scale=scale, eta=0.05)
    obj = linear_objective
    expected = dual_value(budget, [p.detach() for p in obj.params], linear_gradient(obj))
    assert expected > 0.05
    assert ps.loss_change(obj, budget, "first_order") == pytest.approx(expected, rel=1e-10, abs=1e-12)
    res = ps.GradientCorruption(budget)(obj)
    assert res.loss_change == pytest.approx(expected, rel=1e-10, abs=1e-12)
    assert ps.loss_change(obj, budget, "one_step") == pytest.approx(expected, rel=1e-10, abs=1e-12)
    assert list(res.delta) == obj.names
    assert budget.contains(list(res.delta.values()), obj.params, rtol=1e-9)
    # the loss after is the loss of the model with the corruption applied
    with ps.corrupted(obj.model, res):
        after = float(linear_loss_value(obj))
    assert after == pytest.approx(res.loss_after, rel=1e-12, abs=1e-12)
    # the second-order model of a linear loss is the first-order one
    assert ps.loss_change(obj, budget, "second_order") == pytest.approx(expected, rel=1e-9, abs=1e-12)
    # multi-step cannot beat the exact maximum and reaches it on a linear loss, except for the
    # ellipsoid (element-scaled L2): the step s^2 g is not normal to it and the Euclidean
    # projection then settles slightly off the maximiser
    multi = ps.MultiStepCorruption(budget, steps=10)(obj)
    assert multi.loss_change <= expected * (1 + 1e-9) + 1e-12
    rel = 1e-2 if (norm, scale) == ("l2", "element") else 1e-9
    assert multi.loss_change == pytest.approx(expected, rel=rel)
    assert budget.contains(list(multi.delta.values()), obj.params, rtol=1e-9)


def linear_loss_value(obj):
    with torch.no_grad():
        return obj.loss_fn(obj.model, obj.data)


@pytest.mark.parametrize("scale", [None, "layer", "element"])
@pytest.mark.parametrize("norm", NORMS)
def test_linear_loss_random_trials_are_exact_inner_products(linear_objective, norm, scale):
    """Each random trial changes a linear loss by exactly <g, a>; the stats summarise them. For
    scaled budgets every trial is sized from the clean w (not from the previous trial's w + a)."""
    obj = linear_objective
    budget = ps.Budget(norm, 0.2, scale=scale)
    rc = ps.RandomCorruption(budget, trials=25, seed=3)
    res = rc(obj)
    g = flat(linear_gradient(obj))
    samples = list(rc.samples(obj))
    for a in samples:
        assert budget.measure(a, obj.params) == pytest.approx(0.2, rel=1e-9)
    exact = [float(flat(a) @ g) for a in samples]
    np.testing.assert_allclose(res.trial_changes, exact, rtol=1e-9, atol=1e-12)
    assert res.mean_change == pytest.approx(np.mean(exact), rel=1e-9, abs=1e-12)
    assert res.std_change == pytest.approx(np.std(exact, ddof=1), rel=1e-9)
    assert res.loss_change == pytest.approx(max(exact), rel=1e-9)
    assert ps.loss_change(obj, budget, "random", trials=25, seed=3) == pytest.approx(np.mean(exact), rel=1e-9, abs=1e-12)
    worst = int(np.argmax(exact))
    np.testing.assert_allclose(flat(res.delta.values()), flat(samples[worst]), rtol=0, atol=0)
    summary = res.as_dict()
    assert summary["worst_change"] == res.loss_change
    assert summary["method"] == "random" and summary["norm"] == norm
    assert summary["mean_change"] == res.mean_change
    # adversarial beats every random trial of the same size
    assert max(exact) <= ps.loss_change(obj, budget, "one_step") + 1e-12


# ------------------------------------------------------------------------------ quadratics
def trust_region_max(g: np.ndarray, H: np.ndarray, r: float) -> float:
    """Exact max of g.a + a.H.a/2 over ||a||_2 <= r (eigendecomposition + bisection on the
    multiplier); not for the hard case (g orthogonal to the top eigenspace)."""
    lam, V = np.linalg.eigh(H)
    c = V.T @ g

    def value(z):
        return float(c @ z + 0.5 * np.sum(lam * z * z))

    if lam[-1] < 0:
        z = -c / lam
        if np.linalg.norm(z) <= r:
            return value(z)
    lo = max(lam[-1], 0.0)
    assert abs(c[-1]) > 1e-6, "hard case: use the closed form"
    hi = lo + 1.0
    while np.linalg.norm(c / (hi - lam)) > r:
        hi = lo + 2 * (hi - lo)
    for _ in range(400):
        mid = 0.5 * (lo + hi)
        if np.linalg.norm(c / (mid - lam)) > r:
            lo = mid
        else:
            hi = mid
    return value(c / (hi - lam))


def random_symmetric(k, seed, shift=0.0):
    gen = torch.Generator().manual_seed(seed)
    A = torch.randn(k, k, generator=gen, dtype=torch.float64)
    return ((A + A.T) / 2 + shift * torch.eye(k, dtype=torch.float64)).numpy()


def quad_objective(make_quadratic, models, g, H, w0=None):
    model = make_quadratic(torch.as_tensor(g), torch.as_tensor(H), None if w0 is None else torch.as_tensor(w0))
    return ps.Objective(model, models.quadratic_loss, torch.zeros(1))


QUAD_CASES = {
    # name: (H, g, eps)
    "indefinite": (random_symmetric(8, 0), np.random.default_rng(0).standard_normal(8), 0.7),
    "positive_definite": (random_symmetric(8, 1, shift=4.0), np.random.default_rng(1).standard_normal(8), 0.5),
    "negative_definite_boundary": (random_symmetric(6, 2, shift=-5.0), 3 * np.random.default_rng(2).standard_normal(6), 0.3),
    "negative_definite_interior": (random_symmetric(6, 3, shift=-5.0), 0.2 * np.random.default_rng(3).standard_normal(6), 2.0),
}


@pytest.mark.parametrize("case", sorted(QUAD_CASES))
def test_second_order_l2_is_trust_region_max(make_quadratic, models, case):
    H, g, eps = QUAD_CASES[case]
    lam = np.linalg.eigvalsh(H)
    if case == "indefinite":
        assert lam[0] < 0 < lam[-1]
    if case.startswith("negative"):
        assert lam[-1] < 0
    exact = trust_region_max(g, H, eps)
    interior = np.linalg.norm(np.linalg.solve(H, g)) < eps
    assert interior == (case == "negative_definite_interior")
    obj = quad_objective(make_quadratic, models, g, H)
    budget = ps.Budget("l2", eps)
    assert ps.loss_change(obj, budget, "second_order") == pytest.approx(exact, rel=1e-8, abs=1e-10)
    # the reference is a maximum: no feasible point does better
    gen = torch.Generator().manual_seed(0)
    for _ in range(200):
        a = flat(budget.sample(obj.params, gen)) * float(torch.rand((), generator=gen)) ** 0.25
        assert g @ a + 0.5 * a @ H @ a <= exact + 1e-12
    # multi-step: a feasible lower bound, within 1% of the maximum
    # the default step (1.5 eps / K) travels 1.5 eps in all: too short for the curved ascent path
    # of a strongly concave loss; 5 eps of travel
    res = ps.MultiStepCorruption(budget, steps=100, step_size=0.05 * eps, restarts=3, random_start=True, seed=1)(obj)
    assert budget.contains(list(res.delta.values()), obj.params, rtol=1e-9)
    assert res.loss_change <= exact + 1e-9
    assert res.loss_change >= 0.99 * exact
    # and the loss change it reports is the true one: g.a + a.H.a / 2
    a = flat(res.delta.values())
    assert res.loss_change == pytest.approx(g @ a + 0.5 * a @ H @ a, rel=1e-10, abs=1e-12)


@settings(max_examples=40, deadline=None, derandomize=True)
@given(st.integers(1, 9), st.integers(0, 2**32 - 1), st.floats(-4.0, 4.0), st.floats(0.05, 3.0))
def test_second_order_l2_random_trust_regions(make_quadratic, models, k, seed, shift, eps):
    rng = np.random.default_rng(seed)
    A = rng.standard_normal((k, k))
    H = (A + A.T) / 2 + shift * np.eye(k)
    g = rng.standard_normal(k) * rng.choice([0.1, 1.0, 5.0])
    lam, V = np.linalg.eigh(H)
    assume(abs(V[:, -1] @ g) > 1e-3 * np.linalg.norm(g))  # away from the hard case
    exact = trust_region_max(g, H, eps)
    obj = quad_objective(make_quadratic, models, g, H)
    assert ps.loss_change(obj, ps.Budget("l2", eps), "second_order") == pytest.approx(exact, rel=1e-7, abs=1e-10)


@settings(max_examples=40, deadline=None, derandomize=True)
@given(st.integers(1, 9), st.integers(0, 2**32 - 1), st.floats(0.05, 3.0))
def test_second_order_linf_random_diagonal(make_quadratic, models, k, seed, eps):
    rng = np.random.default_rng(seed)
    h = rng.choice([-1, 1], k) * rng.uniform(0.3, 2.0, k)
    g = rng.standard_normal(k) * rng.choice([0.1, 1.0, 5.0])

    def coord_max(gi, hi):
        cands = [-eps, eps] + ([float(np.clip(-gi / hi, -eps, eps))] if hi < 0 else [])
        return max(gi * a + hi * a * a / 2 for a in cands)

    exact = sum(coord_max(gi, hi) for gi, hi in zip(g, h))
    obj = quad_objective(make_quadratic, models, g, np.diag(h))
    assert ps.loss_change(obj, ps.Budget("linf", eps), "second_order") == pytest.approx(exact, rel=1e-6, abs=1e-10)


def test_second_order_l2_hard_case(make_quadratic, models):
    """g orthogonal to the top eigenvector: the maximiser moves along that eigenvector although
    the gradient never points there (Krylov space of g alone is not enough)."""
    H = np.diag([1.0, -1.0, -2.0])
    g = np.array([0.0, 1.0, 0.0])
    obj = quad_objective(make_quadratic, models, g, H)
    # z_2 = 1 / (1 + 1) = 0.5, z_1 = sqrt(1 - 0.25): value 0.5 - 0.125 + 0.375
    assert ps.loss_change(obj, ps.Budget("l2", 1.0), "second_order") == pytest.approx(0.75, rel=1e-10)
    # a rotated, larger instance
    k = 7
    lam = np.array([2.0, 1.5, 0.3, -0.1, -0.7, -1.0, -3.0])
    c = np.array([0.0, 0.2, -0.1, 0.3, 0.05, -0.2, 0.4])
    Qm, _ = np.linalg.qr(np.random.default_rng(5).standard_normal((k, k)))
    H, g = Qm @ np.diag(lam) @ Qm.T, Qm @ c
    r = 1.5
    z_rest = c[1:] / (lam[0] - lam[1:])
    assert np.linalg.norm(z_rest) < r
    exact = float(c[1:] @ z_rest + 0.5 * np.sum(lam[1:] * z_rest**2) + 0.5 * lam[0] * (r**2 - z_rest @ z_rest))
    obj = quad_objective(make_quadratic, models, g, H)
    assert ps.loss_change(obj, ps.Budget("l2", r), "second_order") == pytest.approx(exact, rel=1e-8)


def test_second_order_pure_quadratic(make_quadratic, models):
    """g = 0: L2 -> eps^2 lam_max / 2 (0 if H <= 0); L-inf with diagonal H -> sum of the positive
    h_i eps^2 / 2; L1 with diagonal H -> eps^2 max(h_i) / 2."""
    h = np.array([1.0, 2.0, -2.0, 0.5, -0.5])
    obj = quad_objective(make_quadratic, models, np.zeros(5), np.diag(h))
    eps = 0.8
    assert ps.loss_change(obj, ps.Budget("l2", eps), "second_order") == pytest.approx(eps**2 * 2.0 / 2, rel=1e-10)
    assert ps.loss_change(obj, ps.Budget("linf", eps), "second_order") == pytest.approx(eps**2 * 3.5 / 2, rel=1e-6)
    assert ps.loss_change(obj, ps.Budget("l1", eps), "second_order") == pytest.approx(eps**2 * 2.0 / 2, rel=1e-6)
    obj = quad_objective(make_quadratic, models, np.zeros(5), -np.diag(np.abs(h)))
    for norm in NORMS:
        assert ps.loss_change(obj, ps.Budget(norm, eps), "second_order") == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_second_order_linf_diagonal_is_separable_max(make_quadratic, models, seed):
    """Diagonal H: max over the box is sum_i max_{|a| <= eps} g_i a + h_i a^2 / 2."""
    rng = np.random.default_rng(seed)
    k, eps = 9, 0.6
    h = rng.choice([-1, 1], k) * rng.uniform(0.5, 2.0, k)
    g = rng.standard_normal(k)

    def coord_max(gi, hi):
        cands = [-eps, eps]
        if hi < 0:
            cands.append(float(np.clip(-gi / hi, -eps, eps)))
        return max(gi * a + hi * a * a / 2 for a in cands)

    exact = sum(coord_max(gi, hi) for gi, hi in zip(g, h))
    obj = quad_objective(make_quadratic, models, g, np.diag(h))
    budget = ps.Budget("linf", eps)
    assert ps.loss_change(obj, budget, "second_order") == pytest.approx(exact, rel=1e-8)
    res = ps.MultiStepCorruption(budget, steps=100)(obj)
    assert res.loss_change <= exact + 1e-9
    assert res.loss_change >= 0.99 * exact
    assert budget.contains(list(res.delta.values()), obj.params, rtol=1e-9)


def test_second_order_scaled_l2(make_quadratic, models):
    """Element scale: a = s z with ||z|| <= eps, i.e. a trust region on (s g, S H S). Layer scale
    with one tensor: a ball of radius eps ||w||."""
    rng = np.random.default_rng(7)
    k = 6
    H = random_symmetric(k, 7, shift=3.0)  # positive definite: the layer-scale heuristic is exact
    g = rng.standard_normal(k)
    w0 = rng.standard_normal(k)
    obj = quad_objective(make_quadratic, models, g, H, w0)
    eps, eta = 0.4, 0.1
    s = np.abs(w0) + eta
    exact = trust_region_max(s * g, H * np.outer(s, s), eps)
    assert ps.loss_change(obj, ps.Budget("l2", eps, scale="element", eta=eta), "second_order") == pytest.approx(exact, rel=1e-8)
    exact = trust_region_max(g, H, eps * np.linalg.norm(w0))
    value = ps.loss_change(obj, ps.Budget("l2", eps, scale="layer"), "second_order", iters=200)
    assert value == pytest.approx(exact, rel=1e-6)


def test_random_mean_matches_trace_formula(make_quadratic, models):
    """g = 0, L2: E[a.H.a/2] over the sphere of radius eps is eps^2 tr(H) / (2k)."""
    k, eps, trials = 8, 0.5, 3000
    H = random_symmetric(k, 11, shift=1.0)
    obj = quad_objective(make_quadratic, models, np.zeros(k), H)
    expected = eps**2 * np.trace(H) / (2 * k)
    # Var(u.H.u) for u uniform on the unit sphere: 2 (k tr(H^2) - tr(H)^2) / (k^2 (k + 2))
    var = 2 * (k * np.trace(H @ H) - np.trace(H) ** 2) / (k**2 * (k + 2))
    sigma = eps**2 / 2 * math.sqrt(var / trials)
    value = ps.loss_change(obj, ps.Budget("l2", eps), "random", trials=trials, seed=0)
    assert abs(value - expected) < 5 * sigma, (value, expected, sigma)
    assert 5 * sigma < 0.2 * abs(expected)  # the test has power


# ------------------------------------------------------------------------------ curvature
def dense_hessian(objective) -> torch.Tensor:
    model, names = objective.model, objective.names
    shapes = [p.shape for p in objective.params]
    sizes = [p.numel() for p in objective.params]
    w = torch.cat([p.detach().reshape(-1) for p in objective.params])

    def f(v):
        parts = dict(zip(names, (t.reshape(s) for t, s in zip(torch.split(v, sizes), shapes))))
        x, y = objective.data
        out = torch.func.functional_call(model, parts, (x,))
        return ((out - y) ** 2).mean()

    return torch.autograd.functional.hessian(f, w)


@pytest.fixture
def mlp_objective(models):
    model = models.make_mlp(seed=9, sizes=(3, 5, 2))
    batch = models.regression_batch(seed=1, n=12)
    return ps.Objective(model, models.mse_loss, batch)


def test_hvp_operator_over_one_batch_equals_the_plain_product(models):
    """The one-batch operator (the gradient's graph built once) gives ``hvp``'s products, for
    several vectors in a row, with an unused parameter and over a loss linear in a parameter."""
    model = models.make_mlp(seed=3, sizes=(3, 5, 2))
    model.unused = nn.Parameter(torch.ones(2, dtype=torch.float64))
    model.linear = nn.Parameter(torch.full((2,), 0.5, dtype=torch.float64))
    batch = models.regression_batch(seed=2, n=10)
    obj = ps.Objective(model, lambda m, b: models.mse_loss(m, b) + 3 * m.linear.sum(), batch)
    before = [p.detach().clone() for p in model.parameters()]
    gen = torch.Generator().manual_seed(0)
    with obj.probe() as pr:
        product = pr.hvp_operator()
        for _ in range(3):
            v = [torch.randn(p.shape, generator=gen, dtype=p.dtype) for p in pr.params]
            for a, b in zip(product(v), pr.hvp(v)):
                torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
        names = [n for n, _ in model.named_parameters()]
        assert not product(v)[names.index("unused")].any() and not product(v)[names.index("linear")].any()
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    several = ps.Objective(model, models.mse_loss, [batch, batch])
    with several.probe() as pr:
        assert pr.hvp_operator() == pr.hvp  # several batches: one graph at a time, product by product


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_loss_and_gradient_report_the_same_loss(models, dtype):
    """``Probe.loss`` and ``Probe.gradient`` give the same value, bit for bit, over one batch
    (the batch's own loss) and over several (the example-weighted mean): attacks compare the
    two (Auto-PGD's history), so they must not differ by a rounding."""
    model = models.make_mlp(seed=1, sizes=(3, 4, 2), dtype=dtype)
    one = models.regression_batch(seed=4, n=199, dtype=dtype)
    for data in (one, [one, models.regression_batch(seed=5, n=7, dtype=dtype)]):
        with ps.Objective(model, models.mse_loss, data).probe() as pr:
            loss, _ = pr.gradient()
            assert loss.dtype == torch.float64 and torch.equal(loss, pr.loss())
    with ps.Objective(model, models.mse_loss, one).probe() as pr:
        assert float(pr.loss()) == float(models.mse_loss(model, one))


def test_hessian_top_eigenvalue_matches_dense(mlp_objective):
    obj = mlp_objective
    assert obj.numel == 32
    H = dense_hessian(obj)
    torch.testing.assert_close(H, H.T, rtol=1e-10, atol=1e-12)
    ev = torch.linalg.eigvalsh(H)
    order = ev.abs().argsort(descending=True)
    top, second = float(ev[order[0]]), float(ev[order[1]])
    assert abs(second) / abs(top) < 0.8  # a spectral gap, so power iteration converges
    assert ps.hessian_top_eigenvalue(obj) == pytest.approx(top, rel=1e-6)  # the default tol's error bound
    assert ps.hessian_top_eigenvalue(obj, tol=1e-12) == pytest.approx(top, rel=1e-10)
    assert ps.hessian_top_eigenvalue(obj, method="power", iters=3000, tol=1e-13) == pytest.approx(top, rel=1e-6)


@pytest.mark.parametrize("method", ["lanczos", "power"])
def test_hessian_top_eigenvalue_keeps_sign(make_quadratic, models, method):
    """The dominant eigenvalue is the largest in magnitude, reported with its sign."""
    Qm, _ = np.linalg.qr(np.random.default_rng(0).standard_normal((5, 5)))
    for lam, top in (([3.0, 1.0, 0.5, -1.0, -0.2], 3.0), ([1.0, 0.5, -4.0, -1.0, 0.0], -4.0)):
        H = Qm @ np.diag(lam) @ Qm.T
        obj = quad_objective(make_quadratic, models, np.ones(5), H)
        kwargs = dict(iters=2000, tol=1e-14) if method == "power" else {}
        assert ps.hessian_top_eigenvalue(obj, method=method, **kwargs) == pytest.approx(top, rel=1e-6)


def test_hessian_trace_matches_dense(mlp_objective):
    obj = mlp_objective
    H = dense_hessian(obj)
    tr = float(torch.trace(H))
    samples = 1000
    # Rademacher Hutchinson: Var(v.H.v) = 2 sum_{i != j} H_ij^2
    off = H - torch.diag(torch.diag(H))
    sigma = math.sqrt(2 * float((off**2).sum()) / samples)
    est = ps.hessian_trace(obj, samples=samples, seed=0)
    assert abs(est - tr) < 5 * sigma, (est, tr, sigma)
    assert 5 * sigma < 0.5 * abs(tr)


def test_hessian_trace_exact_for_diagonal_hessian(make_quadratic, models):
    """With a diagonal Hessian every Rademacher probe gives v.H.v = tr(H) exactly."""
    h = np.array([1.0, -2.0, 3.5, 0.25, 7.0])
    obj = quad_objective(make_quadratic, models, np.ones(5), np.diag(h))
    assert ps.hessian_trace(obj, samples=3, seed=5) == pytest.approx(h.sum(), rel=1e-12)


@pytest.mark.parametrize("fn,kwargs", [(ps.hessian_top_eigenvalue, {"iters": 0}), (ps.hessian_trace, {"samples": 0}),
                                       (ps.hessian_top_eigenvalue, {"method": "qr"})])
def test_curvature_argument_validation(mlp_objective, fn, kwargs):
    with pytest.raises(ValueError, match=next(iter(kwargs)) if "method" not in kwargs else "method"):
        fn(mlp_objective, **kwargs)


# ------------------------------------------------------------------------------ per layer
def test_layer_vulnerability_first_order(mlp_objective):
    obj = mlp_objective
    eps = 0.1
    with torch.enable_grad():
        loss = obj.loss_fn(obj.model, obj.data)
        grads = torch.autograd.grad(loss, obj.params)
    for p in obj.params:
        assert p.grad is None
    rows = ps.layer_vulnerability(obj, ps.Budget("l2", eps))
    expected = {n: eps * float(g.norm()) for n, g in zip(obj.names, grads)}
    assert sorted(r.name for r in rows) == sorted(obj.names)
    for r in rows:
        assert r.value == pytest.approx(expected[r.name], rel=1e-10)
        assert r.numel == dict(obj.model.named_parameters())[r.name].numel()
    values = [r.value for r in rows]
    assert values == sorted(values, reverse=True)
    assert len(set(values)) == len(values)
    # grouped by module: weight and bias together
    rows = ps.layer_vulnerability(obj, ps.Budget("l2", eps), by="module")
    by_module = {r.name: r for r in rows}
    assert set(by_module) == {"0", "2"}
    for m in ("0", "2"):
        gw, gb = grads[obj.names.index(f"{m}.weight")], grads[obj.names.index(f"{m}.bias")]
        assert by_module[m].value == pytest.approx(eps * math.sqrt(float(gw.norm() ** 2 + gb.norm() ** 2)), rel=1e-10)
        assert by_module[m].numel == gw.numel() + gb.numel()
    assert [r.value for r in rows] == sorted((r.value for r in rows), reverse=True)


def test_layer_vulnerability_other_methods_use_one_layer_at_a_time(mlp_objective):
    obj = mlp_objective
    budget = ps.Budget("linf", 0.05)
    rows = ps.layer_vulnerability(obj, budget, method="one_step")
    for r in rows:
        assert r.value == pytest.approx(ps.loss_change(obj.restrict(r.name), budget, "one_step"), rel=1e-12)
    rows = ps.layer_vulnerability(obj, budget, method="multi_step", steps=3)
    assert len(rows) == 4 and all(r.value > 0 for r in rows)
    with pytest.raises(ValueError, match="by"):
        ps.layer_vulnerability(obj, budget, by="layer")


def test_layer_vulnerability_names_with_glob_characters():
    """Module names may contain glob characters; each layer must still be corrupted alone."""
    model = nn.ModuleDict({"a[0]": nn.Linear(2, 1), "a0": nn.Linear(2, 1)}).double()
    x = torch.randn(5, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))

    def loss_fn(m, batch):
        return m["a[0]"](batch).mean() + (m["a0"](batch) * 3).mean()  # linear: one-step = first order

    obj = ps.Objective(model, loss_fn, x)
    assert [n for n, _ in ps.select_parameters(model, "a[0].weight")] == ["a[0].weight"]
    rows = ps.layer_vulnerability(obj, ps.Budget("l2", 0.1), method="one_step")
    first = {r.name: r.value for r in ps.layer_vulnerability(obj, ps.Budget("l2", 0.1))}
    for r in rows:
        assert r.numel == dict(model.named_parameters())[r.name].numel()
        # corrupting that tensor alone: exactly its own first-order value
        assert r.value == pytest.approx(first[r.name], rel=1e-10)


# ------------------------------------------------------------------------------ critical eps
def test_critical_eps_linear(linear_objective):
    """Metric = -loss. One-step L2 raises a linear loss by eps ||g||, so the drop d is reached
    exactly at eps* = d / ||g||."""
    obj = linear_objective
    gnorm = float(np.linalg.norm(flat(linear_gradient(obj))))

    def metric(model):
        with torch.no_grad():
            return -float(obj.loss_fn(model, obj.data))

    drop = 0.37
    eps_star = drop / gnorm
    budget = ps.Budget("l2", 0.01)
    found = ps.critical_eps(obj, budget, metric, drop, corruption="one_step", iters=20)
    base = metric(obj.model)

    def drop_at(eps):
        res = ps.GradientCorruption(budget.with_eps(eps))(obj)
        with ps.corrupted(obj.model, res):
            return base - metric(obj.model)

    assert drop_at(found) >= drop - 1e-12
    assert drop_at(0.9 * found) < drop
    assert found == pytest.approx(eps_star, rel=1e-4)
    # a starting eps above the answer works too
    found = ps.critical_eps(obj, budget, metric, drop, corruption="one_step", eps_start=50 * eps_star, iters=30)
    assert found == pytest.approx(eps_star, rel=1e-6)
    # random corruption averaged over trials: E <g, a> = 0 -> larger (or infinite) eps than one-step
    found_random = ps.critical_eps(obj, budget, metric, drop, corruption="random", trials=5, seed=0)
    assert found_random >= found * (1 - 1e-6)


def test_critical_eps_infinite_when_metric_cannot_drop(linear_objective):
    obj = linear_objective
    assert ps.critical_eps(obj, ps.Budget("l2", 0.01), lambda m: 1.0, 0.5, corruption="one_step") == math.inf
    with pytest.raises(ValueError, match="drop"):
        ps.critical_eps(obj, ps.Budget("l2", 0.01), lambda m: 1.0, 0.0)
    with pytest.raises(ValueError, match="drop"):
        ps.critical_eps(obj, ps.Budget("l2", 0.01), lambda m: 1.0, float("nan"))


def test_loss_change_argument_validation(linear_objective):
    obj = linear_objective
    with pytest.raises(ValueError, match="method"):
        ps.loss_change(obj, ps.Budget("l2", 0.1), "zeroth_order")
    with pytest.raises(TypeError, match="budget"):
        ps.loss_change(obj, 0.1, "first_order")
    with pytest.raises(TypeError, match="objective"):
        ps.loss_change(obj.model, ps.Budget("l2", 0.1))
    with pytest.raises(TypeError):
        ps.loss_change(obj, ps.Budget("l2", 0.1), "first_order", steps=3)


def test_multi_step_keep_best_returns_the_best_iterate_over_restarts():
    """With a step far too long the iterates oscillate; the result is the highest-loss iterate
    of all restarts (kept in one buffer), and its reported loss is the loss at its delta."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2)).double()
    data = (torch.randn(32, 4, dtype=torch.float64), torch.randint(0, 2, (32,)))
    obj = ps.Objective(model, lambda m, b: torch.nn.functional.cross_entropy(m(b[0]), b[1]), data)
    budget = ps.Budget("linf", 1.0)
    res = ps.MultiStepCorruption(budget, steps=6, step_size=2.0, restarts=3, random_start=True, seed=1)(obj)
    iterates = [h for h in res.history]
    assert res.loss_after == max(iterates)
    assert obj.loss(list(res.delta.values())) == pytest.approx(res.loss_after, rel=1e-12)
    best = iterates.index(max(iterates))
    assert best > 13 and best != 20  # a middle iterate of the last restart, after earlier improvements
