"""Curvature: the Krylov solvers on explicit matrices, and the Hessian / GGN / Fisher operators
of a tiny network against dense matrices built with autograd."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.func import functional_call

import parashield as ps
from parashield._krylov import eigenpairs, gaussian_start, hutchinson, hutchpp, lanczos, quadrature



def _matrix(spectrum, seed=0):
    """A symmetric matrix with the given eigenvalues and a random orthonormal eigenbasis."""
    gen = torch.Generator().manual_seed(seed)
    n = len(spectrum)
    V, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    return V @ torch.diag(torch.as_tensor(spectrum, dtype=torch.float64)) @ V.T


def _start(n, seed):
    return torch.randn(n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


# ------------------------------------------------------------------------------ solvers
@pytest.mark.parametrize("which", ["largest", "smallest", "magnitude"])
def test_eigenpairs_of_an_explicit_matrix(which):
    spectrum = torch.cat([torch.tensor([9.0, 7.5, -8.0]), torch.linspace(-2, 3, 57, dtype=torch.float64)])
    A = _matrix(spectrum)
    values, vectors, steps = eigenpairs(lambda v: A @ v, _start(60, 0), 3, which, tol=1e-10, max_iters=60)
    lam, U = torch.linalg.eigh(A)
    order = {"largest": torch.argsort(lam, descending=True), "smallest": torch.argsort(lam),
             "magnitude": torch.argsort(lam.abs(), descending=True)}[which][:3]
    assert torch.allclose(values, lam[order], rtol=1e-9)
    for i, j in enumerate(order):
        assert abs(float(vectors[:, i] @ U[:, j])) == pytest.approx(1.0, abs=1e-8)
    assert steps < 60


def test_top_eigenvalue_is_reliable_for_every_seed():
    # A hard case: a top eigenvalue only 1% above the next, and 400 dimensions.
    spectrum = torch.cat([torch.tensor([10.0, 9.9]), torch.linspace(-3, 9, 398, dtype=torch.float64)])
    A = _matrix(spectrum, seed=1)
    for seed in range(20):
        values, _, _ = eigenpairs(lambda v: A @ v, _start(400, seed), 1, tol=1e-6, max_iters=300)
        assert abs(float(values[0]) - 10.0) <= 1e-3 * 10.0, seed


def test_value_bound_stops_early_and_keeps_its_promise():
    # A network-like spectrum: a cluster of outliers (the top 7% above the next) over a bulk near 0.
    spectrum = torch.cat([torch.tensor([1.0, 0.93, 0.86, 0.82, 0.74]), torch.linspace(-0.02, 0.1, 395, dtype=torch.float64)])
    A = _matrix(spectrum, seed=4)
    for seed in range(10):
        kw = dict(k=1, tol=1e-3, max_iters=200)
        v_val, _, n_val = eigenpairs(lambda v: A @ v, _start(400, seed), bound="value", **kw)
        v_res, _, n_res = eigenpairs(lambda v: A @ v, _start(400, seed), bound="residual", **kw)
        assert abs(float(v_val[0]) - 1.0) <= 1e-3, seed
        assert abs(float(v_res[0]) - 1.0) <= 1e-5, seed  # the residual bound overshoots: error ~ r^2 / gap
        assert n_val < n_res, seed


def test_tolerance_stops_early_on_an_easy_problem():
    # One eigenvalue far above the rest: a few products suffice, whatever max_iters allows.
    A = _matrix(torch.cat([torch.tensor([10.0]), torch.linspace(0, 1, 299, dtype=torch.float64)]), seed=5)
    for bound in ("value", "residual"):
        values, _, steps = eigenpairs(lambda v: A @ v, _start(300, 0), 1, tol=1e-6, max_iters=300, bound=bound)
        assert float(values[0]) == pytest.approx(10.0, rel=1e-6)
        assert steps <= 12, (bound, steps)


def test_gaussian_starts_differ_by_seed_and_repeat_per_seed():
    a, gen_a = gaussian_start(50, 0, torch.device("cpu"))
    b, _ = gaussian_start(50, 1, torch.device("cpu"))
    again, gen_again = gaussian_start(50, 0, torch.device("cpu"))
    assert torch.equal(a, again) and not torch.allclose(a, b)
    # the generator goes on past the start, so restart vectors are not the next seed's start
    assert torch.equal(torch.randn(3, generator=gen_a), torch.randn(3, generator=gen_again))
    assert not torch.equal(torch.randn(50, generator=gen_a, dtype=torch.float64), b)


def test_eigenpairs_rejects_an_unknown_bound():
    with pytest.raises(ValueError, match="bound must be one of"):
        eigenpairs(lambda v: v, _start(5, 0), 1, bound="angle")


def test_lanczos_quadrature_reproduces_the_moments():
    A = _matrix(torch.linspace(-1, 4, 30, dtype=torch.float64), seed=2)
    v = _start(30, 3)
    v = v / v.norm()
    T, Q = lanczos(lambda x: A @ x, v, 8)
    nodes, weights = quadrature(T)
    assert float(weights.sum()) == pytest.approx(1.0, abs=1e-12)
    Av = v.clone()
    for j in range(2 * 8):  # Gauss quadrature with m nodes is exact up to degree 2m - 1
        assert float((weights * nodes**j).sum()) == pytest.approx(float(v @ Av), rel=1e-8, abs=1e-10)
        Av = A @ Av


def test_hutchinson_standard_error_is_calibrated():
    A = _matrix(torch.linspace(-1, 3, 40, dtype=torch.float64), seed=4)
    exact = float(torch.trace(A))
    errors, stderrs = [], []
    for seed in range(60):
        value, stderr = hutchinson(lambda v: A @ v, 40, 20, torch.Generator().manual_seed(seed), torch.device("cpu"))
        errors.append(value - exact)
        stderrs.append(stderr)
    rms = math.sqrt(sum(e * e for e in errors) / len(errors))
    assert 0.7 < rms / (sum(stderrs) / len(stderrs)) < 1.4


def test_hutchpp_needs_fewer_products_on_a_low_rank_dominated_matrix():
    spectrum = torch.cat([torch.full((6,), 100.0), torch.rand(194, generator=torch.Generator().manual_seed(0)).double()])
    A = _matrix(spectrum, seed=5)
    exact = float(spectrum.sum())
    cpu = torch.device("cpu")

    def mean_error(fn, products):
        return sum(abs(fn(lambda v: A @ v, 200, products, torch.Generator().manual_seed(s), cpu)[0] - exact)
                   for s in range(20)) / 20

    hpp, hutch = mean_error(hutchpp, 30), mean_error(hutchinson, 90)
    assert hpp < 0.2 * hutch  # a third of the products, a fifth of the error
    with pytest.raises(ValueError, match="matvecs"):
        hutchpp(lambda v: A @ v, 200, 2, torch.Generator(), cpu)


# ------------------------------------------------------------------------------ operators on a network
def _net():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(10, 3, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 3, (10,), generator=gen)
    return model, (x, y)


def _ce(model, batch):
    return nn.functional.cross_entropy(model(batch[0]), batch[1])


def _flat_call(model, flat, x):
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]
    parts = flat.split([math.prod(s) for s in shapes])
    return functional_call(model, {n: t.view(s) for n, t, s in zip(names, parts, shapes)}, (x,))


def _dense(model, batch, kind):
    x, y = batch
    w = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    if kind == "hessian":
        return torch.autograd.functional.hessian(lambda f: nn.functional.cross_entropy(_flat_call(model, f, x), y), w)
    J = torch.autograd.functional.jacobian(lambda f: _flat_call(model, f, x), w)  # (N, C, P)
    p = torch.softmax(_flat_call(model, w, x), 1).detach()
    if kind == "ggn":
        H = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
        return torch.einsum("ncp,ncd,ndq->pq", J, H, J) / len(y)
    g = torch.einsum("ncp,nc->np", J, p - nn.functional.one_hot(y, 3).double())  # per-example gradients
    return g.T @ g / len(y)


@pytest.mark.parametrize("curvature", ["hessian", "ggn", "fisher"])
def test_eigenpairs_match_the_dense_matrix(curvature):
    model, batch = _net()
    dense = _dense(model, batch, curvature)
    lam, U = torch.linalg.eigh(dense)
    obj = ps.Objective(model, _ce, batch)
    for seed in (0, 1):
        res = ps.hessian_eigenpairs(obj, 3, curvature=curvature, seed=seed)
        assert torch.allclose(torch.tensor(res.values, dtype=torch.float64), lam.flip(0)[:3], rtol=1e-6, atol=1e-10)
        top = torch.cat([t.reshape(-1) for t in res.vectors[0].values()])
        assert abs(float(top @ U[:, -1])) == pytest.approx(1.0, abs=1e-6)
    assert list(res.vectors[0]) == [n for n, _ in model.named_parameters()]
    assert curvature in repr(res)


def test_value_bound_on_a_network_is_the_top_eigenvalue_function():
    model, batch = _net()
    lam = torch.linalg.eigvalsh(_dense(model, batch, "hessian"))
    top = float(lam[lam.abs().argmax()])
    obj = ps.Objective(model, _ce, batch)
    for seed in range(3):
        fast = ps.hessian_eigenpairs(obj, which="magnitude", tol=1e-4, bound="value", seed=seed)
        slow = ps.hessian_eigenpairs(obj, which="magnitude", tol=1e-4, seed=seed)
        assert fast.values[0] == pytest.approx(top, rel=1e-4) and fast.matvecs <= slow.matvecs
        assert ps.hessian_top_eigenvalue(obj, tol=1e-4, seed=seed) == fast.values[0]  # the same algorithm


@pytest.mark.parametrize("curvature", ["ggn", "fisher"])
def test_output_curvature_over_several_batches_is_the_example_mean(curvature):
    model, (x, y) = _net()
    whole = ps.hessian_trace_estimate(ps.Objective(model, _ce, (x, y)), 5, curvature=curvature)
    split = ps.hessian_trace_estimate(ps.Objective(model, _ce, [(x[:4], y[:4]), (x[4:], y[4:])]), 5,
                                      curvature=curvature)
    assert split.value == pytest.approx(whole.value, rel=1e-10)


@pytest.mark.parametrize("method", ["hutchinson", "hutch++"])
def test_trace_estimate_against_the_dense_trace(method):
    model, batch = _net()
    exact = float(torch.trace(_dense(model, batch, "ggn")))
    est = ps.hessian_trace_estimate(ps.Objective(model, _ce, batch), 60, method=method, curvature="ggn")
    assert abs(est.value - exact) <= 4 * est.stderr + 1e-12
    assert est.matvecs == 60 and method in repr(est)


def test_density_nodes_are_the_eigenvalues_when_lanczos_spans_the_space():
    model, batch = _net()
    lam = torch.linalg.eigvalsh(_dense(model, batch, "hessian"))
    obj = ps.Objective(model, _ce, batch)
    d = ps.hessian_density(obj, probes=2, iters=obj.numel, points=2000)
    for nodes, weights in zip(d.nodes, d.weights):
        assert float(weights.sum()) == pytest.approx(1.0, abs=1e-9)
        kept = nodes[weights > 1e-8]
        assert float((kept[:, None] - lam[None, :]).abs().min(1).values.max()) < 1e-6
    mass = float(torch.trapezoid(d.density, d.grid))
    assert mass == pytest.approx(1.0, abs=1e-3)


def test_plot_draws_the_density():
    pytest.importorskip("matplotlib")
    import matplotlib

    matplotlib.use("Agg")
    model, batch = _net()
    d = ps.hessian_density(ps.Objective(model, _ce, batch), probes=1, iters=10)
    ax = d.plot()
    assert len(ax.lines) == 1 and ax.get_yscale() == "log"


def test_model_is_restored_and_grads_untouched():
    model, batch = _net()
    before = [p.detach().clone() for p in model.parameters()]
    model.train()
    obj = ps.Objective(model, _ce, batch)
    for curvature in ("hessian", "ggn", "fisher"):
        ps.hessian_eigenpairs(obj, 2, curvature=curvature)
        ps.hessian_density(obj, probes=1, iters=5, curvature=curvature)
        ps.hessian_trace_estimate(obj, 6, method="hutch++", curvature=curvature)
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))
    assert model.training and all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda o: ps.hessian_eigenpairs(o, curvature="gauss"), ValueError, "curvature"),
        (lambda o: ps.hessian_eigenpairs(o, which="top"), ValueError, "which"),
        (lambda o: ps.hessian_eigenpairs(o, k=1000), ValueError, "k must be"),
        (lambda o: ps.hessian_eigenpairs(o, tol=0), ValueError, "tol"),
        (lambda o: ps.hessian_eigenpairs(o, bound="angle"), ValueError, "bound"),
        (lambda o: ps.hessian_eigenpairs(o, curvature="ggn", logits_fn=3), TypeError, "logits_fn"),
        (lambda o: ps.hessian_density(o, sigma=-1.0), ValueError, "sigma"),
        (lambda o: ps.hessian_trace_estimate(o, method="exact"), ValueError, "method"),
        (lambda o: ps.hessian_trace_estimate(o, 0), ValueError, "matvecs"),
    ],
)
def test_bad_arguments_are_named(call, error, match):
    model, batch = _net()
    with pytest.raises(error, match=match):
        call(ps.Objective(model, _ce, batch))
