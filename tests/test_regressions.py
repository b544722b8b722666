"""Regression tests for bugs found in review: gradient layout and aliasing, model conversion after a
step, manually assigned gradients, frozen parameters, no_grad callers, half precision, eta = 0."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import parashield as ps


def _train(opt_factory, model, x, steps=3):
    opt = opt_factory(model)

    def closure():
        opt.zero_grad()
        loss = (model(x) ** 2).mean()
        loss.backward()
        return loss

    for _ in range(steps):
        opt.step(closure)
    return model


def test_channels_last_with_fused_adamw_equals_base_optimizer_at_eps_zero():
    x = torch.randn(2, 3, 8, 8).to(memory_format=torch.channels_last)
    out = []
    for apd in (False, True):
        torch.manual_seed(0)
        m = nn.Conv2d(3, 4, 3).to(memory_format=torch.channels_last)
        kw = dict(lr=1e-2, fused=True)
        make = (lambda mm: ps.APD(mm.parameters(), torch.optim.AdamW, budget=ps.Budget("l2", 0.0), steps=1, **kw)) \
            if apd else (lambda mm: torch.optim.AdamW(mm.parameters(), **kw))
        out.append(_train(make, m, x).weight.detach().clone())
        if apd:
            assert m.weight.grad.stride() == m.weight.stride()
    assert torch.equal(out[0], out[1])


def test_model_converted_after_a_step_keeps_exact_restore():
    torch.manual_seed(0)
    m = nn.Linear(4, 1)
    x, y = torch.randn(8, 4), torch.randn(8, 1)
    opt = ps.APD(m.parameters(), torch.optim.SGD, lr=0.0, steps=2)

    def closure():
        opt.zero_grad()
        loss = ((m(x.to(m.weight.dtype)) - y.to(m.weight.dtype)) ** 2).mean()
        loss.backward()
        return loss

    opt.step(closure)
    m.double()
    with torch.no_grad():
        m.weight.add_(1e-12)  # a value only float64 holds
    w0 = m.weight.detach().clone()
    opt.step(closure)
    assert torch.equal(m.weight, w0) and m.weight.grad.dtype == torch.float64
    norms = []
    for _ in range(3):
        opt.step(closure)
        norms.append(float(m.weight.grad.norm()))
    assert max(norms) < 10 and norms[0] == pytest.approx(norms[-1])


class _Shared(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.Parameter(torch.randn(3, 2))
        self.b = nn.Parameter(torch.randn(3, 2))
        self.c = nn.Parameter(torch.randn(2))

    def forward(self, x):  # a and b get one shared gradient tensor; c an expanded one
        return torch.tanh(x @ (self.a + self.b)) + self.c.sum()


@pytest.mark.parametrize("scale", [None, "element"])
def test_aliased_and_expanded_gradients_give_the_exact_one_step_corruption(scale):
    m = _Shared()
    x, y = torch.randn(8, 3), torch.randn(8, 2)
    obj = ps.Objective(m, lambda mod, b: ((mod(b[0]) - b[1]) ** 2).mean(), (x, y))
    budget = ps.Budget("l2", 0.1, scale=scale)
    res = ps.GradientCorruption(budget)(obj)
    params = [p.detach() for p in obj.params]
    assert budget.measure(list(res.delta.values()), params) == pytest.approx(0.1, rel=1e-5)
    grads = torch.autograd.grad(obj.loss_fn(m, (x, y)), obj.params)
    ref = budget.steepest([g.clone() for g in grads], params)
    assert all(torch.allclose(res.delta[n], r, atol=1e-7) for n, r in zip(obj.names, ref))
    two = ps.Objective(m, obj.loss_fn, [(x[:4], y[:4]), (x[4:], y[4:])])
    assert ps.loss_change(two, budget) == pytest.approx(ps.loss_change(obj, budget), rel=1e-5)


def test_attacks_work_inside_no_grad():
    torch.manual_seed(0)
    m = nn.Linear(4, 2)
    obj = ps.Objective(m, lambda mod, b: F.cross_entropy(mod(b[0]), b[1]), (torch.randn(8, 4), torch.randint(0, 2, (8,))))
    with torch.no_grad():
        assert ps.GradientCorruption(ps.Budget("l2", 0.1))(obj).loss_change > 0
        assert ps.hessian_trace(obj, samples=2) > 0


def test_gradients_assigned_by_hand_are_used():
    torch.manual_seed(0)
    m = nn.Linear(4, 1)
    x = torch.randn(8, 4)
    opt = ps.APD(m.parameters(), torch.optim.SGD, lr=0.1, steps=1, budget=ps.Budget("l2", 1e-3))
    w0 = m.weight.detach().clone()

    def closure():
        loss = (m(x) ** 2).mean()
        grads = torch.autograd.grad(loss, list(m.parameters()))
        for p, g in zip(m.parameters(), grads):
            p.grad = g
        return loss

    opt.step(closure)
    assert m.weight.grad is not None and not torch.equal(m.weight, w0)


def test_parameter_frozen_between_steps_is_not_updated():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 1))
    x = torch.randn(8, 4)
    opt = ps.APD(m.parameters(), torch.optim.SGD, lr=0.1, steps=2)

    def closure():
        opt.zero_grad()
        loss = (m(x) ** 2).mean()
        loss.backward()
        return loss

    opt.step(closure)
    m[0].requires_grad_(False)
    frozen = m[0].weight.detach().clone()
    opt.step(closure)
    assert torch.equal(m[0].weight, frozen) and m[0].weight.grad is None


@pytest.mark.parametrize("corrupt", [[], "weight", nn.Linear(2, 2), [torch.nn.Parameter(torch.zeros(1))]])
def test_bad_corrupt_argument(corrupt):
    m = nn.Linear(4, 1)
    with pytest.raises((TypeError, ValueError), match="corrupt"):
        ps.APD(m.parameters(), torch.optim.SGD, lr=0.1, corrupt=corrupt)


def test_half_precision_norms_do_not_overflow():
    g = [torch.full((20_000,), 1000.0, dtype=torch.float16)]
    w = [torch.ones(20_000, dtype=torch.float16)]
    d = ps.Budget("l2", 1.0).steepest(g, w)
    assert torch.isfinite(d[0]).all() and float(d[0].float().norm()) == pytest.approx(1.0, rel=1e-2)


def test_measure_with_zero_scale_coordinates():
    w = [torch.tensor([0.0, 1.0, 2.0])]
    b = ps.Budget("l2", 0.1, scale="element", eta=0.0)
    a = b.project([torch.tensor([0.5, 0.5, 0.5])], w)
    assert a[0][0] == 0 and b.contains(a, w)
    assert b.measure([torch.tensor([1e-3, 0.0, 0.0])], w) == float("inf")
