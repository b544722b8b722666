"""The robustness evaluation: Auto-PGD in parameter space reaches the exact maximum on
quadratics, works under every budget, beats 50-step projected ascent with 5 restarts on the
digits model at fewer passes, and leaves the model as found."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from torch import nn

import parashield as ps
from parashield.evaluation import checkpoints
from parashield.indicators import _trust_region_max
from parashield.margin import dlr

from conftest import Quadratic, quadratic_loss, make_mlp


def _quadratic(seed: int, d: int, concave: bool = False, w0=None):
    gen = torch.Generator().manual_seed(seed)
    A = torch.randn(d, d, generator=gen, dtype=torch.float64)
    g = torch.randn(d, generator=gen, dtype=torch.float64)
    H = A @ A.T * (-1 if concave else 1)
    model = Quadratic(g, H, w0)
    return ps.Objective(model, quadratic_loss, torch.zeros(1)), g, H


def _value(g, H, a):
    return float(g @ a + 0.5 * a @ H @ a)


def test_checkpoints_follow_auto_pgd():
    # p = 0, 0.22, 0.41, 0.57, 0.70, 0.80, 0.87, 0.93, 0.99 (then past 1)
    assert checkpoints(100) == [22, 41, 57, 70, 80, 87, 93, 99]
    assert checkpoints(1) == [1]


@pytest.mark.parametrize("concave", [False, True])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_l2_ball_reaches_the_trust_region_maximum(seed, concave):
    obj, g, H = _quadratic(seed, 5, concave)
    eps = 0.8
    _, exact = _trust_region_max(H, g, eps)
    found = ps.AutoPGDCorruption(ps.Budget("l2", eps), steps=50, restarts=1)(obj)
    assert found.loss_change == pytest.approx(exact, rel=1e-5)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_linf_box_reaches_the_best_vertex(seed):
    # A convex quadratic is maximized at a vertex of the box: brute force over all 2^d of them.
    d, eps = 3, 0.7
    obj, g, H = _quadratic(seed, d)
    exact = max(_value(g, H, eps * torch.tensor(s, dtype=torch.float64)) for s in itertools.product([-1, 1], repeat=d))
    found = ps.AutoPGDCorruption(ps.Budget("linf", eps), steps=25, restarts=8)(obj)
    assert found.loss_change == pytest.approx(exact, rel=1e-9)


@pytest.mark.parametrize("seed", [0, 1])
def test_l1_ball_reaches_the_best_vertex(seed):
    d, eps = 4, 0.9
    obj, g, H = _quadratic(seed, d)
    vertices = [s * eps * torch.eye(d, dtype=torch.float64)[i] for i in range(d) for s in (-1, 1)]
    exact = max(_value(g, H, v) for v in vertices)
    found = ps.AutoPGDCorruption(ps.Budget("l1", eps), steps=25, restarts=8)(obj)
    assert found.loss_change == pytest.approx(exact, rel=1e-9)


def test_sparse_l2_reaches_the_best_support():
    # n = 2 of d = 4 coordinates: the exact maximum is the best trust-region maximum over supports.
    d, n, eps = 4, 2, 0.6
    obj, g, H = _quadratic(3, d)
    exact = max(
        _trust_region_max(H[list(s)][:, list(s)], g[list(s)], eps)[1] for s in itertools.combinations(range(d), n)
    )
    found = ps.AutoPGDCorruption(ps.Budget("l2", eps, sparsity=n), steps=25, restarts=8)(obj)
    assert found.loss_change == pytest.approx(exact, rel=1e-6)


def test_scaled_budgets_reach_the_exact_maximum():
    w0 = torch.tensor([0.5, -2.0, 1.0], dtype=torch.float64)
    # layer scale, one tensor: the L2 ball of radius eps * ||w0||
    obj, g, H = _quadratic(4, 3, w0=w0)
    eps = 0.3
    _, exact = _trust_region_max(H, g, eps * float(w0.norm()))
    found = ps.AutoPGDCorruption(ps.Budget("l2", eps, scale="layer"), steps=50, restarts=1)(obj)
    assert found.loss_change == pytest.approx(exact, rel=1e-5)
    # element scale, L-inf: the box |a_i| <= eps (|w0_i| + eta); brute force over its vertices
    budget = ps.Budget("linf", eps, scale="element", eta=0.1)
    bound = eps * (w0.abs() + 0.1)
    exact = max(_value(g, H, bound * torch.tensor(s, dtype=torch.float64)) for s in itertools.product([-1, 1], repeat=3))
    found = ps.AutoPGDCorruption(budget, steps=25, restarts=8)(obj)
    assert found.loss_change == pytest.approx(exact, rel=1e-9)


def test_converged_runs_leave_their_passes_to_new_starts():
    # On a convex quadratic over a box every run ends at a vertex within a few steps.
    obj, _, _ = _quadratic(0, 3)
    attack = ps.AutoPGDCorruption(ps.Budget("linf", 0.7), steps=25, restarts=4)
    runs = list(attack.runs(obj))
    assert len(runs) > 4
    # the budget of 100 gradient passes is spent; a run that reaches its step cap adds one loss pass
    assert 100 <= sum(len(r.history) for r in runs) <= 100 + len(runs)
    assert attack(obj).passes == sum(r.passes for r in runs) == 1 + sum(len(r.history) for r in runs)


BUDGETS = [
    ps.Budget("l1", 0.5), ps.Budget("l2", 0.3), ps.Budget("linf", 0.05), ps.Budget("l2", 0.3, sparsity=5),
    ps.Budget("linf", 0.05, sparsity=5), ps.Budget("l2", 0.1, scale="layer"), ps.Budget("linf", 0.1, scale="layer"),
    ps.Budget("l1", 0.1, scale="element"), ps.Budget("l2", 0.1, scale="element"),
]


@pytest.mark.parametrize("budget", BUDGETS, ids=lambda b: f"{b.norm}-{b.scale}-{b.sparsity}")
def test_every_budget_yields_a_feasible_corruption_that_raises_the_loss(budget, models):
    model = make_mlp(0, (3, 5, 2))
    obj = ps.Objective(model, models.mse_loss, models.regression_batch())
    res = ps.AutoPGDCorruption(budget, steps=10, restarts=2)(obj)
    delta = [res.delta[n] for n in obj.names]
    assert budget.contains(delta, obj.params)
    assert res.loss_after == pytest.approx(obj.loss(delta), rel=1e-12)
    assert res.loss_after > res.loss_before + 1e-3 * budget.eps


def test_dlr_is_shift_and_scale_invariant():
    gen = torch.Generator().manual_seed(0)
    z, y = torch.randn(6, 5, generator=gen, dtype=torch.float64), torch.tensor([0, 1, 2, 3, 4, 0])
    assert float(dlr(3.0 * z + 7.0, y)) == pytest.approx(float(dlr(z, y)), rel=1e-12)
    # by hand for one row: z = (2, 1, 0), y = 0: -(2 - 1) / (2 - 0)
    assert float(dlr(torch.tensor([[2.0, 1.0, 0.0]]), torch.tensor([0]))) == pytest.approx(-0.5)
    with pytest.raises(ValueError, match="3 classes"):
        dlr(torch.zeros(2, 2), torch.tensor([0, 1]))


# ------------------------------------------------------------------------------ digits
def ce(model, batch):
    x, y = batch
    return nn.functional.cross_entropy(model(x), y)


@pytest.fixture(scope="module")
def digits():
    datasets = pytest.importorskip("sklearn.datasets")
    X, y = datasets.load_digits(return_X_y=True)
    order = np.random.default_rng(0).permutation(len(X))
    X = torch.tensor(X[order] / 16.0, dtype=torch.float32)
    y = torch.tensor(y[order], dtype=torch.long)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(150):
        opt.zero_grad()
        ce(model, (X[:1200], y[:1200])).backward()
        opt.step()
    model.eval()
    for p in model.parameters():
        p.grad = None
    return model, (X[1200:1500], y[1200:1500]), (X[1500:], y[1500:])


def _accuracy(batch):
    def metric(model):
        with torch.no_grad():
            return float((model(batch[0]).argmax(1) == batch[1]).float().mean())

    return metric


@pytest.mark.parametrize(
    "budget",
    [ps.Budget("l2", 0.05, scale="layer"), ps.Budget("linf", 0.05, scale="element"), ps.Budget("l2", 1.0, sparsity=20),
     ps.Budget("linf", 0.02, scale="layer"), ps.Budget("l1", 2.0)],
    ids=lambda b: f"{b.norm}-{b.scale}-{b.sparsity}",
)
def test_digits_at_least_as_strong_as_50_step_ascent_with_5_restarts(digits, budget):
    model, attack, _ = digits
    obj = ps.Objective(model, ce, attack)
    reference = ps.MultiStepCorruption(budget, steps=50, restarts=5)(obj)
    ev = ps.evaluate_robustness(obj, budget, classification=True).results[0]
    assert ev.passes <= reference.passes
    assert ev.loss_after >= reference.loss_after
    assert budget.contains([ev.corruption.delta[n] for n in obj.names], obj.params)


@pytest.fixture(scope="module")
def fashion():
    """A small CNN trained briefly on 3,000 Fashion-MNIST images (the Debian package's files,
    which CI installs): attack data and held-out data of 300 images each."""
    from parashield.reproduce.datasets import load_fashion_mnist

    try:
        data = load_fashion_mnist(limit_train=3600)
    except (FileNotFoundError, RuntimeError) as exc:
        pytest.skip(f"Fashion-MNIST is not installed: {exc}")
    x, y = data.x_train, data.y_train
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 8, 5, stride=2), nn.ReLU(), nn.Conv2d(8, 16, 5, stride=2), nn.ReLU(),
                          nn.Flatten(), nn.Linear(16 * 4 * 4, 10))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for step in range(120):
        i = torch.arange(step * 200, step * 200 + 200) % 3000
        opt.zero_grad()
        ce(model, (x[i], y[i])).backward()
        opt.step()
    model.eval()
    for p in model.parameters():
        p.grad = None
    return model, (x[3000:3300], y[3000:3300]), (x[3300:3600], y[3300:3600])


@pytest.mark.parametrize("budget", [ps.Budget("l2", 0.05, scale="layer"), ps.Budget("linf", 0.02, scale="layer"),
                                    ps.Budget("l2", 1.0, sparsity=20)],
                         ids=lambda b: f"{b.norm}-{b.scale}-{b.sparsity}")
def test_fashion_at_least_as_strong_as_50_step_ascent_with_5_restarts(fashion, budget):
    model, attack, heldout = fashion
    obj = ps.Objective(model, ce, attack)
    assert float(_accuracy(heldout)(model)) > 0.7  # a trained model, not a toy at chance
    reference = ps.MultiStepCorruption(budget, steps=50, restarts=5)(obj)
    ev = ps.evaluate_robustness(obj, budget, classification=True).results[0]
    assert ev.passes <= reference.passes
    assert ev.loss_after >= reference.loss_after
    assert budget.contains([ev.corruption.delta[n] for n in obj.names], obj.params)


def test_reports_on_held_out_data_and_restores_the_model(digits):
    model, attack, heldout = digits
    state = {k: v.clone() for k, v in model.state_dict().items()}
    obj = ps.Objective(model, ce, attack)
    budget = ps.Budget("l2", 0.05, scale="layer")
    ev = ps.evaluate_robustness(obj, budget, eps=[0.02, 0.05], classification=True, heldout=heldout,
                                metric=_accuracy(heldout), steps=5, restarts=1)
    assert [r.eps for r in ev.results] == [0.02, 0.05] and ev.members == ("apgd-loss", "apgd-dlr")
    for r in ev.results:
        assert r.member in ev.members and r.loss_after == max(r.member_losses.values())
        with ps.corrupted(model, r.corruption):
            with torch.no_grad():
                assert r.heldout_after == pytest.approx(float(ce(model, heldout)), rel=1e-6)
                assert r.loss_after == pytest.approx(float(ce(model, attack)), rel=1e-6)
            assert r.metric_after == _accuracy(heldout)(model)
        with torch.no_grad():
            assert r.heldout_before == pytest.approx(float(ce(model, heldout)), rel=1e-6)
        assert r.metric_after < r.metric_before
    assert "eps=0.05" in repr(ev) and "held-out" in repr(ev)
    assert ev.at(0.05) is ev.results[1]
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k])
    assert not model.training and all(p.grad is None for p in model.parameters())


def test_restores_the_model_when_the_metric_raises(digits):
    model, attack, _ = digits
    state = {k: v.clone() for k, v in model.state_dict().items()}
    calls = []

    def metric(m):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return 1.0

    with pytest.raises(KeyboardInterrupt):
        ps.evaluate_robustness(ps.Objective(model, ce, attack), ps.Budget("l2", 0.5), metric=metric, steps=3,
                               restarts=1)
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k])


def test_custom_margin_member(models):
    model = make_mlp(0, (3, 5, 2))
    obj = ps.Objective(model, models.mse_loss, models.regression_batch())
    margin = lambda m, b: -models.mse_loss(m, b)  # a deliberately useless second loss  # noqa: E731
    ev = ps.evaluate_robustness(obj, ps.Budget("l2", 0.2), margin_fn=margin, steps=5, restarts=2)
    r = ev.results[0]
    assert ev.members == ("apgd-loss", "apgd-margin") and r.member == "apgd-loss"
    assert r.member_losses["apgd-margin"] <= r.loss_after


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(classification=True, margin_fn=ce), ValueError, "not both"),
        (dict(classification=1), TypeError, "classification"),
        (dict(margin_fn="dlr"), TypeError, "margin_fn"),
        (dict(metric=3), TypeError, "metric"),
        (dict(eps=[]), ValueError, "eps"),
        (dict(eps=[-1.0]), ValueError, "eps"),
        (dict(steps=0), ValueError, "steps"),
        (dict(restarts=1.5), TypeError, "restarts"),
    ],
)
def test_bad_arguments_are_named(kwargs, error, match, models):
    model = make_mlp(0, (3, 5, 2))
    obj = ps.Objective(model, models.mse_loss, models.regression_batch())
    with pytest.raises(error, match=match):
        ps.evaluate_robustness(obj, ps.Budget("l2", 0.2), **kwargs)


def test_classification_needs_x_y_batches(models):
    model = make_mlp(0, (3, 5, 3))
    x, _ = models.regression_batch(d_out=3)
    obj = ps.Objective(model, lambda m, b: m(b).sum(), x)
    with pytest.raises(TypeError, match="logits_fn"):
        ps.evaluate_robustness(obj, ps.Budget("l2", 0.2), classification=True, steps=2, restarts=1)
