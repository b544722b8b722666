"""The papers' first findings on real data at unit-test scale: a small MLP trained for a few
seconds on scikit-learn's digits. Random corruption barely moves the loss, gradient corruption of
the same size raises it by orders of magnitude, and multi-step beats one-step."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import parashield as ps

sklearn_datasets = pytest.importorskip("sklearn.datasets")


def ce(model, batch):
    x, y = batch
    return nn.functional.cross_entropy(model(x), y)


def accuracy_on(batch):
    x, y = batch

    def metric(model):
        with torch.no_grad():
            return float((model(x).argmax(1) == y).float().mean())

    return metric


@pytest.fixture(scope="module")
def digits():
    X, y = sklearn_datasets.load_digits(return_X_y=True)
    order = np.random.default_rng(0).permutation(len(X))
    X = torch.tensor(X[order] / 16.0, dtype=torch.float32)
    y = torch.tensor(y[order], dtype=torch.long)
    n_train = 1200
    train, test = (X[:n_train], y[:n_train]), (X[n_train:], y[n_train:])
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(150):
        opt.zero_grad()
        ce(model, train).backward()
        opt.step()
    for p in model.parameters():
        p.grad = None
    model.eval()
    assert accuracy_on(test)(model) > 0.9
    return model, train, test


BUDGETS = [ps.Budget("l2", 0.05, scale="layer"), ps.Budget("l2", 1.0), ps.Budget("linf", 0.05, scale="element")]


@pytest.mark.parametrize("budget", BUDGETS, ids=lambda b: f"{b.norm}-{b.scale}-{b.eps}")
def test_gradient_corruption_dwarfs_random_corruption(digits, budget):
    model, _, test = digits
    obj = ps.Objective(model, ce, test)
    rand = ps.RandomCorruption(budget, trials=20, seed=0)(obj)
    grad = ps.GradientCorruption(budget)(obj)
    # the same size: both on the boundary of the budget
    params = obj.params
    assert budget.measure(list(grad.delta.values()), params) == pytest.approx(budget.eps, rel=1e-4)
    assert budget.measure(list(rand.delta.values()), params) == pytest.approx(budget.eps, rel=1e-4)
    assert grad.loss_change > 0.1
    # >= 10x even the worst of the random trials (and the mean is smaller still)
    assert grad.loss_change >= 10 * max(rand.loss_change, 0.0)
    assert grad.loss_change >= 10 * abs(rand.mean_change)
    multi = ps.MultiStepCorruption(budget, steps=10)(obj)
    assert multi.loss_change >= grad.loss_change
    assert budget.contains(list(multi.delta.values()), params, rtol=1e-4)


def test_accuracy_collapses_under_gradient_but_not_random_corruption(digits):
    model, _, test = digits
    metric = accuracy_on(test)
    clean = metric(model)
    budget = ps.Budget("l2", 0.1, scale="layer")
    obj = ps.Objective(model, ce, test)
    rc = ps.RandomCorruption(budget, trials=5, seed=1)
    random_acc = []
    for delta in rc.samples(obj):
        with ps.corrupted(model, dict(zip(obj.names, delta))):
            random_acc.append(metric(model))
    with ps.corrupted(model, ps.MultiStepCorruption(budget, steps=10)(obj)):
        attacked = metric(model)
    assert min(random_acc) >= clean - 0.05
    assert attacked <= clean - 0.3
    assert metric(model) == clean  # restored


def test_first_order_indicator_matches_as_eps_shrinks(digits):
    """Finding 3: the one-step loss change over the first-order indicator tends to 1 as eps -> 0."""
    model, _, test = digits
    obj = ps.Objective(model, ce, test)
    gaps = []
    for eps in (0.01, 0.001, 0.0002):
        budget = ps.Budget("l2", eps, scale="layer")
        one_step = ps.loss_change(obj, budget, "one_step")
        gaps.append(abs(one_step / ps.loss_change(obj, budget, "first_order") - 1))
        if eps == 0.001:
            # the second-order model is closer still
            second = ps.loss_change(obj, budget, "second_order", iters=20)
            assert abs(second / one_step - 1) < 0.5 * gaps[-1]
    assert gaps[-1] < 0.05
    assert gaps[0] > gaps[1] > gaps[2]
