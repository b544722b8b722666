"""GSAM, ASAM (weights-only option) and interval SAM: each against a reference written from its
paper's (or reference code's) formula in float64, and GSAM against pytorch-optimizer's."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import parashield as ps


@pytest.fixture(params=["gathered", "per_tensor"])
def bookkeeping(request, monkeypatch):
    """Both layouts of APD's bookkeeping (the CPU gathers small gradients into one buffer)."""
    from parashield.defense import _Workspace

    if request.param == "per_tensor":
        monkeypatch.setattr(_Workspace, "small_tensors", 0)
    return request.param


def _problem(seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    gen = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(16, 4, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 3, (16,), generator=gen)
    return model, x, y


def _grad(model, x, y, params=None):
    params = list(model.parameters()) if params is None else params
    loss = nn.functional.cross_entropy(model(x), y)
    return list(torch.autograd.grad(loss, params))


def _closure(opt, model, x, y, calls=None):
    def closure():
        if calls is not None:
            calls.append(1)
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        return loss

    return closure


def _dot(a, b):
    return sum(float((u * v).sum()) for u, v in zip(a, b))


def _at(model, delta, fn):
    """fn() with the parameters moved by delta, restored after."""
    params = list(model.parameters())
    saved = [p.detach().clone() for p in params]
    with torch.no_grad():
        for p, d in zip(params, delta):
            p.add_(d)
    try:
        return fn()
    finally:
        with torch.no_grad():
            for p, s in zip(params, saved):
                p.copy_(s)


def _sgd_(model, direction, lr):
    with torch.no_grad():
        for p, d in zip(model.parameters(), direction):
            p.sub_(lr * d)


# ------------------------------------------------------------------------------ GSAM
def test_gsam_matches_the_paper_formula(bookkeeping):
    rho, alpha, lr = 0.1, 0.3, 0.2
    model, x, y = _problem()
    ref, _, _ = _problem()
    opt = ps.GSAM(model.parameters(), torch.optim.SGD, rho=rho, alpha=alpha, lr=lr)
    for _ in range(5):
        opt.step(_closure(opt, model, x, y))
        g = _grad(ref, x, y)
        norm = _dot(g, g) ** 0.5
        gp = _at(ref, [rho * t / norm for t in g], lambda: _grad(ref, x, y))
        along = _dot(g, gp) / _dot(gp, gp)
        _sgd_(ref, [p - alpha * (c - along * p) for p, c in zip(gp, g)], lr)
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=0, atol=1e-12)


@pytest.mark.parametrize("adaptive", [False, True])
def test_gsam_matches_pytorch_optimizer(adaptive, bookkeeping):
    pytorch_optimizer = pytest.importorskip("pytorch_optimizer")
    rho, alpha = 0.05, 0.4
    model, x, y = _problem(3)
    ref, _, _ = _problem(3)
    opt = ps.GSAM(model.parameters(), torch.optim.SGD, rho=rho, alpha=alpha, adaptive=adaptive, eta=0.0,
                  lr=0.1, momentum=0.9)

    class ConstantRho:
        def step(self):
            return rho

    base = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9)
    theirs = pytorch_optimizer.GSAM(ref.parameters(), base, ref, ConstantRho(), alpha=alpha, adaptive=adaptive)
    theirs.set_closure(nn.functional.cross_entropy, x, y)
    worst = 0.0
    for _ in range(6):
        opt.step(_closure(opt, model, x, y))
        theirs.step()
        with torch.no_grad():
            worst = max(worst, max(float((p - q).abs().max()) for p, q in zip(model.parameters(), ref.parameters())))
    assert worst <= 1e-6
    print(f"GSAM adaptive={adaptive}: max |difference| to pytorch-optimizer after 6 steps {worst:.2e}")


def test_gsam_rejects_a_negative_alpha():
    model, _, _ = _problem()
    with pytest.raises(ValueError, match="alpha"):
        ps.GSAM(model.parameters(), torch.optim.SGD, alpha=-0.1, lr=0.1)


# ------------------------------------------------------------------------------ ASAM
def _reference_asam_step(model, x, y, rho, eta, lr):
    """The reference code's ascent: T = |w| + eta on tensors named 'weight', 1 elsewhere;
    e = rho T^2 g / ||T g||; then SGD with the gradient at w + e."""
    named = list(model.named_parameters())
    g = _grad(model, x, y)
    t = [(p.detach().abs() + eta) if "weight" in n else torch.ones_like(p) for n, p in named]
    tg = [a * b for a, b in zip(t, g)]
    norm = _dot(tg, tg) ** 0.5 + 1e-16
    e = [rho * a * b / norm for a, b in zip(t, tg)]
    gp = _at(model, e, lambda: _grad(model, x, y))
    _sgd_(model, gp, lr)


def test_asam_weights_only_matches_the_reference_code(bookkeeping):
    rho, eta, lr = 0.5, 0.01, 0.1
    model, x, y = _problem(5)
    ref, _, _ = _problem(5)
    plain, _, _ = _problem(5)
    opt = ps.ASAM(model.parameters(), torch.optim.SGD, rho=rho, eta=eta, scaled=ps.weight_tensors(model), lr=lr)
    every = ps.ASAM(plain.parameters(), torch.optim.SGD, rho=rho, eta=eta, lr=lr)
    for _ in range(5):
        opt.step(_closure(opt, model, x, y))
        every.step(_closure(every, plain, x, y))
        _reference_asam_step(ref, x, y, rho, eta, lr)
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=0, atol=1e-12)
    # scaling the biases too (the paper's formula) is a different rule
    assert max(float((p - q).detach().abs().max()) for p, q in zip(plain.parameters(), ref.parameters())) > 1e-6


def test_asam_scaled_must_be_held_by_the_optimizer():
    model, _, _ = _problem()
    with pytest.raises(ValueError, match="scaled names parameters that this optimizer does not hold"):
        ps.ASAM(list(model.parameters())[:2], torch.optim.SGD, scaled=[list(model.parameters())[3]], lr=0.1)


# ------------------------------------------------------------------------------ interval SAM
def test_interval_sam_matches_its_formula_and_pass_count(bookkeeping):
    rho, lr, k = 0.1, 0.2, 3
    model, x, y = _problem(7)
    ref, _, _ = _problem(7)
    opt = ps.IntervalSAM(model.parameters(), torch.optim.SGD, rho=rho, interval=k, lr=lr)
    calls: list = []
    e = None
    for step in range(7):
        opt.step(_closure(opt, model, x, y, calls))
        if step % k == 0:
            g = _grad(ref, x, y)
            norm = _dot(g, g) ** 0.5
            e = [rho * t / norm for t in g]
        _sgd_(ref, _at(ref, e, lambda: _grad(ref, x, y)), lr)
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=0, atol=1e-12)
    assert len(calls) == 3 * 2 + 4 * 1  # ascent at steps 0, 3, 6


def test_interval_one_is_sam():
    model, x, y = _problem(2)
    ref, _, _ = _problem(2)
    a = ps.IntervalSAM(model.parameters(), torch.optim.SGD, rho=0.1, interval=1, lr=0.1)
    b = ps.SAM(ref.parameters(), torch.optim.SGD, rho=0.1, lr=0.1)
    for _ in range(4):
        a.step(_closure(a, model, x, y))
        b.step(_closure(b, ref, x, y))
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), ref.parameters()))


def test_interval_sam_two_phase_api_restores_w_on_errors():
    model, x, y = _problem(4)
    opt = ps.IntervalSAM(model.parameters(), torch.optim.SGD, rho=0.1, interval=2, lr=0.1)
    for _ in opt.trajectory():
        nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
    saved = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(RuntimeError, match="boom"):
        for _ in opt.trajectory():  # a reuse step: one pass at w + e
            raise RuntimeError("boom")
    assert all(torch.equal(p, s) for p, s in zip(model.parameters(), saved))
    with pytest.raises(ps.NonFiniteGradientError, match="w \\+ e"):
        opt.step(lambda: (opt.zero_grad(), (model(x).sum() * float("nan")).backward())[0])
    assert all(torch.equal(p, s) for p, s in zip(model.parameters(), saved))


def test_interval_must_be_positive():
    model, _, _ = _problem()
    with pytest.raises(ValueError, match="interval"):
        ps.IntervalSAM(model.parameters(), torch.optim.SGD, interval=0, lr=0.1)
