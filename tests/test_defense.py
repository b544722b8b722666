"""Tests of the adversarial parameter defense: APD and its presets (SAM, adaptive
SAM, one-step defense, random weight perturbation) against reference computations written here from
the papers' formulas, plus the "must work with" list: LR schedulers, state_dict, clipping,
gradient accumulation, BatchNorm, bf16 / fp16 + GradScaler, checkpoints, NaN handling, argument
validation, and a small end-to-end robustness check on sklearn's digits.

DistributedDataParallel is tested in test_defense_ddp.py.
"""

from __future__ import annotations

import copy
import math
import os
import pickle
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import parashield as ps

F64 = torch.float64


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------
def mlp(seed: int = 0, dtype=F64, d_in: int = 5, hidden: int = 8, d_out: int = 3) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d_in, hidden), nn.Tanh(), nn.Linear(hidden, d_out)).to(dtype)


def batch(seed: int, n: int = 16, d_in: int = 5, d_out: int = 3, dtype=F64):
    g = torch.Generator().manual_seed(1000 + seed)
    return torch.randn(n, d_in, generator=g, dtype=dtype), torch.randn(n, d_out, generator=g, dtype=dtype)


def mse(model: nn.Module, x, y):
    return ((model(x) - y) ** 2).mean()


def closure_for(opt, model, x, y, counter=None):
    def closure():
        if counter is not None:
            counter.append(1)
        opt.zero_grad()
        loss = mse(model, x, y)
        loss.backward()
        return loss

    return closure


def clone_params(model):
    return [p.detach().clone() for p in model.parameters()]


@pytest.fixture(params=["gathered", "per_tensor"])
def bookkeeping(request, monkeypatch):
    """Both bookkeeping layouts: the CPU's gradients gathered into one flat buffer, and the
    accelerators' per-tensor gradients with fused ``_foreach`` ops (run here on the CPU)."""
    from parashield.defense import _Workspace

    if request.param == "per_tensor":  # no mean tensor size is below 0: nothing is gathered
        monkeypatch.setattr(_Workspace, "small_tensors", 0)
    return request.param


def assert_params_equal(model, saved):
    for p, s in zip(model.parameters(), saved):
        assert torch.equal(p.detach(), s), "parameters are not bit-for-bit the saved ones"


def assert_close(xs, ys, atol):
    for a, b in zip(xs, ys):
        torch.testing.assert_close(a.detach(), b.detach(), rtol=0, atol=atol)


def flat(ts):
    return torch.cat([t.reshape(-1) for t in ts])


def unflat(v, like):
    out, i = [], 0
    for t in like:
        out.append(v[i : i + t.numel()].view_as(t).clone())
        i += t.numel()
    return out


# ---------------------------------------------------------------------------------------------
# reference geometries, written from the budget definitions independently of parashield.Budget
# ---------------------------------------------------------------------------------------------
class RefL2:
    def __init__(self, eps):
        self.eps = eps

    def steepest(self, g, w, r):
        v = flat(g)
        return unflat(r * v / v.norm(), g)

    def project(self, a, w):
        v = flat(a)
        return unflat(v * min(1.0, self.eps / float(v.norm())), a)


class RefLinf:
    def __init__(self, eps):
        self.eps = eps

    def steepest(self, g, w, r):
        return [r * gi.sign() for gi in g]

    def project(self, a, w):
        return [ai.clamp(-self.eps, self.eps) for ai in a]


class RefL2Sparse:
    """||a||_2 <= eps, ||a||_0 <= n: steepest keeps the n largest |g_i|; projection keeps the n
    largest |a_i| and then projects onto the L2 ball."""

    def __init__(self, eps, n):
        self.eps, self.n = eps, n

    def _top(self, v):
        keep = torch.zeros_like(v, dtype=torch.bool)
        keep[v.abs().argsort(descending=True)[: self.n]] = True
        return torch.where(keep, v, torch.zeros_like(v))

    def steepest(self, g, w, r):
        h = self._top(flat(g))
        return unflat(r * h / h.norm(), g)

    def project(self, a, w):
        v = self._top(flat(a))
        return unflat(v * min(1.0, self.eps / float(v.norm())), a)


class RefL2Layer:
    """Per tensor: ||a_l||_2 <= eps * ||w_l||_2."""

    def __init__(self, eps):
        self.eps = eps

    def steepest(self, g, w, r):
        return [r * wl.norm() * gl / gl.norm() for gl, wl in zip(g, w)]

    def project(self, a, w):
        return [al * min(1.0, float(self.eps * wl.norm() / al.norm())) for al, wl in zip(a, w)]


class RefLinfLayer:
    """Per tensor: ||a_l||_inf <= eps * ||w_l||_inf."""

    def __init__(self, eps):
        self.eps = eps

    def steepest(self, g, w, r):
        return [r * wl.abs().max() * gl.sign() for gl, wl in zip(g, w)]

    def project(self, a, w):
        out = []
        for al, wl in zip(a, w):
            b = float(self.eps * wl.abs().max())
            out.append(al.clamp(-b, b))
        return out


def ref_apd_gradient(model, x, y, geom, K, alpha, include_clean, corrupt_idx=None):
    """The averaged trajectory gradient of the APD definition, computed by hand: a_0 = 0,
    a_{t+1} = project(a_t + alpha * steepest_unit(g_t)), mean of g_0..g_K (or g_1..g_K).
    Leaves the model at w."""
    params = list(model.parameters())
    idx = list(range(len(params))) if corrupt_idx is None else list(corrupt_idx)
    w = [p.detach().clone() for p in params]
    wc = [w[i] for i in idx]
    a = [torch.zeros_like(w[i]) for i in idx]
    grads = []
    for t in range(K + 1):
        with torch.no_grad():
            for p, wi in zip(params, w):
                p.copy_(wi)
            for i, ai in zip(idx, a):
                params[i].add_(ai)
        g = torch.autograd.grad(mse(model, x, y), params)
        grads.append(g)
        if t < K:
            step = geom.steepest([g[i] for i in idx], wc, alpha)
            a = geom.project([ai + si for ai, si in zip(a, step)], wc)
    with torch.no_grad():
        for p, wi in zip(params, w):
            p.copy_(wi)
    used = grads if include_clean else grads[1:]
    return [sum(g[i] for g in used) / len(used) for i in range(len(params))]


# ---------------------------------------------------------------------------------------------
# 1. SAM and adaptive SAM against the papers' formulas
# ---------------------------------------------------------------------------------------------
BASES = [
    pytest.param(torch.optim.SGD, dict(lr=0.1, momentum=0.9, weight_decay=1e-3), id="sgd-momentum"),
    pytest.param(torch.optim.Adam, dict(lr=0.01), id="adam"),
]


@pytest.mark.parametrize("base,kw", BASES)
@pytest.mark.parametrize(
    "adaptive,eta", [(False, 0.01), (True, 0.01), (True, 0.0)], ids=["sam", "asam-eta0.01", "asam-eta0"]
)
def test_sam_matches_reference(base, kw, adaptive, eta, bookkeeping):
    rho = 0.05 if not adaptive else 0.5
    model = mlp(0)
    ref = copy.deepcopy(model)
    opt = ps.SAM(model.parameters(), base, rho=rho, adaptive=adaptive, eta=eta, **kw)
    ref_opt = base(ref.parameters(), **kw)
    ref_params = list(ref.parameters())
    moved = 0.0
    for step in range(4):
        x, y = batch(step)
        w_before = clone_params(model)
        opt.step(closure_for(opt, model, x, y))

        # reference SAM / ASAM step
        w = [p.detach().clone() for p in ref_params]
        g = torch.autograd.grad(mse(ref, x, y), ref_params)
        if adaptive:  # e = rho T^2 g / ||T g||, T = |w| + eta
            T = [wi.abs() + eta for wi in w]
            norm = flat([ti * gi for ti, gi in zip(T, g)]).norm()
            e = [rho * ti * ti * gi / norm for ti, gi in zip(T, g)]
        else:  # e = rho g / ||g||
            norm = flat(g).norm()
            e = [rho * gi / norm for gi in g]
        with torch.no_grad():
            for p, ei in zip(ref_params, e):
                p.add_(ei)
        g_adv = torch.autograd.grad(mse(ref, x, y), ref_params)
        with torch.no_grad():
            for p, wi, gi in zip(ref_params, w, g_adv):
                p.copy_(wi)  # the base step is taken from w
                p.grad = gi.clone()
        ref_opt.step()

        assert_close(model.parameters(), ref_params, atol=1e-9)
        moved += float(flat([p.detach() - wb for p, wb in zip(model.parameters(), w_before)]).norm())
    assert moved > 1e-3  # the comparison is not vacuous


@pytest.mark.parametrize("preset", ["sam", "rwp"])
def test_one_gradient_presets_hold_one_parameter_sized_buffer(preset, bookkeeping):
    """SAM (and RWP with one sample) average a single gradient: the defense keeps only w."""
    model = mlp(0)
    make = {"sam": lambda p: ps.SAM(p, torch.optim.SGD, lr=0.1),
            "rwp": lambda p: ps.RandomWeightPerturbation(p, torch.optim.SGD, lr=0.1)}[preset]
    opt = make(model.parameters())
    opt.step(closure_for(opt, model, *batch(0)))
    ws = opt._workspace
    held = [f for buf in (ws.clean, ws.gsum, ws.work) if buf is not None for f in buf.flats]
    assert sum(f.numel() for f in held) == sum(p.numel() for p in model.parameters())


RELEASING = {
    "apd_layer": lambda p, **kw: ps.APD(p, torch.optim.SGD, budget=ps.Budget("l2", 0.1, scale="layer"), steps=3,
                                        lr=0.1, momentum=0.9, **kw),
    "asam": lambda p, **kw: ps.SAM(p, torch.optim.SGD, rho=0.1, adaptive=True, lr=0.1, **kw),
    "interval_sam": lambda p, **kw: ps.IntervalSAM(p, torch.optim.SGD, rho=0.1, interval=2, lr=0.1, **kw),
}


@pytest.mark.parametrize("make", list(RELEASING))
def test_released_buffers_give_the_same_training_bit_for_bit(make, bookkeeping):
    """release_buffers frees the copy of w between steps and gives it back for the next one: the
    same updates to the last bit, and between steps nothing of it (nor of its cached scales) held."""
    runs = {}
    for release in (False, True):
        model = mlp(0)
        opt = RELEASING[make](model.parameters(), release_buffers=release)
        for i in range(4):
            opt.step(closure_for(opt, model, *batch(i)))
            ws = opt._workspace
            held = sum(f.untyped_storage().nbytes() for f in ws.clean.flats)
            assert (held == 0) == release and not (release and ws.geometry._scale)
        runs[release] = clone_params(model)
    assert all(torch.equal(a, b) for a, b in zip(runs[False], runs[True]))
    assert not all(torch.equal(a, b) for a, b in zip(runs[True], clone_params(mlp(0))))


def test_released_buffers_by_default_on_accelerators_only():
    """On the CPU the copy of w is kept by default (a fresh allocation is page-faulted in again)."""
    model = mlp(0)
    opt = ps.SAM(model.parameters(), torch.optim.SGD, lr=0.1)
    opt.step(closure_for(opt, model, *batch(0)))
    assert opt.release_buffers is None and opt._workspace.release is False
    assert all(f.untyped_storage().nbytes() > 0 for f in opt._workspace.clean.flats)
    with pytest.raises(TypeError, match="release_buffers"):
        ps.APD(model.parameters(), torch.optim.SGD, lr=0.1, release_buffers="yes")


def test_released_buffers_after_an_exception_restore_w_and_free(bookkeeping):
    model = mlp(0)
    opt = ps.APD(model.parameters(), torch.optim.SGD, steps=3, lr=0.1, release_buffers=True)
    opt.step(closure_for(opt, model, *batch(0)))
    before = clone_params(model)
    calls = []

    def closure():
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return closure_for(opt, model, *batch(1))()

    with pytest.raises(KeyboardInterrupt):
        opt.step(closure)
    assert all(torch.equal(a, b) for a, b in zip(before, clone_params(model)))
    assert sum(f.untyped_storage().nbytes() for f in opt._workspace.clean.flats) == 0
    opt.step(closure_for(opt, model, *batch(2)))  # the next step gets the memory back
    assert not all(torch.equal(a, b) for a, b in zip(before, clone_params(model)))


def test_sam_differs_from_plain_base_step():
    """The reference comparison above must be able to fail: SAM's update differs from the base
    optimizer's step at w by far more than the tolerance."""
    model = mlp(0)
    plain = copy.deepcopy(model)
    x, y = batch(0)
    opt = ps.SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1)
    opt.step(closure_for(opt, model, x, y))
    popt = torch.optim.SGD(plain.parameters(), lr=0.1)
    closure_for(popt, plain, x, y)()
    popt.step()
    diff = flat([a.detach() - b.detach() for a, b in zip(model.parameters(), plain.parameters())]).abs().max()
    assert diff > 1e-5


def test_sam_rho0_is_the_base_optimizer():
    """rho = 0 is allowed: no perturbation, SAM reduces to the base step at w."""
    model = mlp(0)
    plain = copy.deepcopy(model)
    opt = ps.SAM(model.parameters(), torch.optim.SGD, rho=0.0, lr=0.1, momentum=0.9)
    popt = torch.optim.SGD(plain.parameters(), lr=0.1, momentum=0.9)
    for step in range(3):
        x, y = batch(step)
        opt.step(closure_for(opt, model, x, y))
        closure_for(popt, plain, x, y)()
        popt.step()
        assert_close(model.parameters(), plain.parameters(), atol=1e-12)


def test_asam_eta0_with_zero_weight_gives_no_perturbation_there():
    """eta = 0 is the popular port's form; a weight that is exactly 0 must get no perturbation
    (T = |w| = 0), not a NaN."""
    model = mlp(0)
    with torch.no_grad():
        model[0].bias.zero_()
    ref = copy.deepcopy(model)
    rho, x, y = 0.5, *batch(0)
    opt = ps.SAM(model.parameters(), torch.optim.SGD, rho=rho, adaptive=True, eta=0.0, lr=0.1)
    opt.step(closure_for(opt, model, x, y))
    params = list(ref.parameters())
    w = [p.detach().clone() for p in params]
    g = torch.autograd.grad(mse(ref, x, y), params)
    norm = flat([wi.abs() * gi for wi, gi in zip(w, g)]).norm()
    with torch.no_grad():
        for p, wi, gi in zip(params, w, g):
            p.add_(rho * wi.abs() ** 2 * gi / norm)
    g_adv = torch.autograd.grad(mse(ref, x, y), params)
    with torch.no_grad():
        for p, wi, gi in zip(params, w, g_adv):
            p.copy_(wi - 0.1 * gi)
    assert_close(model.parameters(), params, atol=1e-9)


# ---------------------------------------------------------------------------------------------
# 2. APD against a hand computation of the averaged trajectory gradient
# ---------------------------------------------------------------------------------------------
GEOMETRIES = [
    pytest.param(lambda: (ps.Budget("l2", 0.3), RefL2(0.3)), id="l2"),
    pytest.param(lambda: (ps.Budget("linf", 0.05), RefLinf(0.05)), id="linf"),
    pytest.param(lambda: (ps.Budget("l2", 0.3, sparsity=7), RefL2Sparse(0.3, 7)), id="l2-sparse7"),
    pytest.param(lambda: (ps.Budget("l2", 0.2, scale="layer"), RefL2Layer(0.2)), id="l2-layer"),
    pytest.param(lambda: (ps.Budget("linf", 0.1, scale="layer"), RefLinfLayer(0.1)), id="linf-layer"),
]


@pytest.mark.parametrize("make", GEOMETRIES)
@pytest.mark.parametrize("include_clean", [True, False], ids=["clean", "noclean"])
def test_apd_matches_hand_computed_trajectory(make, include_clean, bookkeeping):
    budget, geom = make()
    K, lr = 3, 0.2
    alpha = 1.5 * budget.eps / K  # the documented default step size
    model = mlp(1)
    ref = copy.deepcopy(model)
    opt = ps.APD(model.parameters(), torch.optim.SGD, budget=budget, steps=K, include_clean=include_clean, lr=lr)
    assert opt.step_size == pytest.approx(alpha)
    for step in range(3):
        x, y = batch(step)
        g_ref = ref_apd_gradient(ref, x, y, geom, K, alpha, include_clean)
        opt.step(closure_for(opt, model, x, y))
        # after the step .grad holds the averaged gradient; the step is plain SGD from w
        assert_close([p.grad for p in model.parameters()], g_ref, atol=1e-9)
        with torch.no_grad():
            for p, g in zip(ref.parameters(), g_ref):
                p.sub_(lr * g)
        assert_close(model.parameters(), ref.parameters(), atol=1e-9)
        # not vacuous: the trajectory average differs from the clean gradient
        g_clean = torch.autograd.grad(mse(ref, x, y), list(ref.parameters()))
        assert float(flat(g_ref).sub(flat(g_clean)).abs().max()) > 1e-5


def test_apd_projection_is_active_in_reference():
    """With K = 3 and alpha = 1.5 eps / K the last iterate leaves the ball before projection, so the
    tests above exercise project(); check that on the reference."""
    model = mlp(1)
    x, y = batch(0)
    geom = RefL2(0.3)
    params = list(model.parameters())
    w = clone_params(model)
    a = [torch.zeros_like(p) for p in params]
    norms = []
    for t in range(3):
        with torch.no_grad():
            for p, wi, ai in zip(params, w, a):
                p.copy_(wi + ai)
        g = torch.autograd.grad(mse(model, x, y), params)
        pre = [ai + si for ai, si in zip(a, geom.steepest(g, w, 0.15))]
        norms.append(float(flat(pre).norm()))
        a = geom.project(pre, w)
    assert max(norms) > 0.3 + 1e-3


def test_apd_corrupt_subset_only_moves_selected_parameters(bookkeeping):
    """``corrupt=`` restricts the corruption to some parameters; the others still get the averaged
    gradient."""
    K, lr, eps = 2, 0.2, 0.3
    model = mlp(2)
    ref = copy.deepcopy(model)
    first = list(model[0].parameters())
    opt = ps.APD(model.parameters(), torch.optim.SGD, budget=ps.Budget("l2", eps), steps=K, corrupt=first, lr=lr)
    seen = []

    def closure():
        seen.append([p.detach().clone() for p in model.parameters()])
        opt.zero_grad()
        loss = mse(model, *batch(0))
        loss.backward()
        return loss

    w = clone_params(model)
    opt.step(closure)
    for params in seen[1:]:  # corrupted passes: layer 0 moved, layer 2 untouched
        assert not torch.equal(params[0], w[0])
        assert torch.equal(params[2], w[2]) and torch.equal(params[3], w[3])
    g_ref = ref_apd_gradient(ref, *batch(0), RefL2(eps), K, 1.5 * eps / K, True, corrupt_idx=[0, 1])
    assert_close([p.grad for p in model.parameters()], g_ref, atol=1e-9)


@pytest.mark.parametrize("preset", ["one_step", "apd_k1"])
def test_one_step_defense_is_apd_k1(preset):
    eps, lr = 0.3, 0.2
    model = mlp(3)
    ref = copy.deepcopy(model)
    if preset == "one_step":
        opt = ps.OneStepDefense(model.parameters(), torch.optim.SGD, budget=ps.Budget("l2", eps), lr=lr)
    else:
        opt = ps.APD(model.parameters(), torch.optim.SGD, budget=ps.Budget("l2", eps), steps=1, lr=lr)
    for step in range(2):
        x, y = batch(step)
        g_ref = ref_apd_gradient(ref, x, y, RefL2(eps), 1, 1.5 * eps, True)
        opt.step(closure_for(opt, model, x, y))
        with torch.no_grad():
            for p, g in zip(ref.parameters(), g_ref):
                p.sub_(lr * g)
        assert_close(model.parameters(), ref.parameters(), atol=1e-9)


def test_random_weight_perturbation_uses_seeded_boundary_samples(bookkeeping):
    eps, K, lr, seed = 0.2, 3, 0.1, 7
    budget = ps.Budget("l2", eps)
    model = mlp(4)
    ref = copy.deepcopy(model)
    opt = ps.RandomWeightPerturbation(model.parameters(), torch.optim.SGD, budget=budget, steps=K, seed=seed, lr=lr)
    gen = torch.Generator().manual_seed(seed)
    x, y = batch(0)
    seen = []

    def closure():
        seen.append(clone_params(model))
        opt.zero_grad()
        loss = mse(model, x, y)
        loss.backward()
        return loss

    opt.step(closure)
    params = list(ref.parameters())
    w = clone_params(ref)
    grads = []
    for t in range(1, K + 1):
        a = budget.sample(w, gen)
        assert float(flat(a).norm()) == pytest.approx(eps)
        # the pass t saw w + a_t
        assert_close(seen[t], [wi + ai for wi, ai in zip(w, a)], atol=1e-12)
        with torch.no_grad():
            for p, wi, ai in zip(params, w, a):
                p.copy_(wi + ai)
        grads.append(torch.autograd.grad(mse(ref, x, y), params))
    g_ref = [sum(g[i] for g in grads) / K for i in range(len(params))]
    assert_close([p.grad for p in model.parameters()], g_ref, atol=1e-9)
    assert_close(model.parameters(), [wi - lr * gi for wi, gi in zip(w, g_ref)], atol=1e-9)


# ---------------------------------------------------------------------------------------------
# 3. closure call count and return value
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("K", [1, 2, 3, 4])
def test_closure_called_k_plus_1_times_and_clean_loss_returned(K):
    model = mlp(0)
    opt = ps.APD(model.parameters(), torch.optim.SGD, steps=K, lr=0.1)
    x, y = batch(0)
    returned = []
    calls = []

    def closure():
        calls.append(1)
        opt.zero_grad()
        loss = mse(model, x, y)
        loss.backward()
        returned.append(loss)
        return loss

    with torch.no_grad():
        clean = mse(model, x, y)
    for _ in range(2):
        calls.clear()
        returned.clear()
        with torch.no_grad():
            clean = mse(model, x, y)
        out = opt.step(closure)
        assert len(calls) == K + 1
        assert out is returned[0]
        assert float(out.detach()) == float(clean)
        assert any(float(r.detach()) != float(clean) for r in returned[1:])  # corrupted passes differ


def test_step_without_closure_needs_trajectory():
    model = mlp(0)
    opt = ps.APD(model.parameters(), torch.optim.SGD, lr=0.1)
    with pytest.raises(RuntimeError, match="trajectory"):
        opt.step()


# ---------------------------------------------------------------------------------------------
# 4. torch.optim citizenship: schedulers, state_dict, zero_grad, add_param_group, clipping
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "make_sched",
    [
        pytest.param(lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=1, gamma=0.5), id="steplr"),
        pytest.param(lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=4), id="cosine"),
    ],
)
def test_lr_scheduler_drives_base_optimizer(make_sched):
    model = mlp(0)
    opt = ps.APD(model.parameters(), torch.optim.SGD, steps=2, lr=0.4)
    sched = make_sched(opt)
    lrs = []
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. "lr_scheduler.step() before optimizer.step()"
        for step in range(4):
            lr = opt.param_groups[0]["lr"]
            assert opt.base_optimizer.param_groups[0]["lr"] == lr
            lrs.append(lr)
            w = clone_params(model)
            opt.step(closure_for(opt, model, *batch(step)))
            # plain SGD: w - lr * averaged gradient, with the scheduled lr
            for p, wi in zip(model.parameters(), w):
                torch.testing.assert_close(p.detach(), wi - lr * p.grad, rtol=0, atol=1e-12)
            sched.step()
    assert len(set(lrs)) == 4 and lrs[0] == 0.4  # the lr really changed every step


def test_one_cycle_lr_cycles_base_momentum():
    """OneCycleLR / CyclicLR look for 'momentum' in optimizer.defaults; the wrapper must expose
    the base optimizer's defaults."""
    model = mlp(0)
    opt = ps.APD(model.parameters(), torch.optim.SGD, steps=1, lr=0.1, momentum=0.9)
    assert opt.defaults["momentum"] == 0.9
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.5, total_steps=6)
    moms, lrs = [], []
    for step in range(5):
        opt.step(closure_for(opt, model, *batch(step)))
        sched.step()
        moms.append(opt.base_optimizer.param_groups[0]["momentum"])
        lrs.append(opt.base_optimizer.param_groups[0]["lr"])
    assert len(set(moms)) > 2 and len(set(lrs)) > 2


@pytest.mark.parametrize("corruption", ["adversarial", "random"])
def test_state_dict_round_trip_and_identical_continuation(corruption):
    model = mlp(0)
    opt = ps.APD(model.parameters(), torch.optim.SGD, steps=2, lr=0.1, momentum=0.9, corruption=corruption, seed=3)
    for step in range(3):
        opt.step(closure_for(opt, model, *batch(step)))
    sd = copy.deepcopy(opt.state_dict())  # as if written to disk

    model2 = mlp(5)  # different init; then take model's weights
    model2.load_state_dict(model.state_dict())
    opt2 = ps.APD(model2.parameters(), torch.optim.SGD, steps=2, lr=0.1, momentum=0.9, corruption=corruption, seed=99)
    opt2.load_state_dict(sd)
    # momentum buffers come back in the base optimizer's state
    for p, p2 in zip(model.parameters(), model2.parameters()):
        buf = opt.base_optimizer.state[p]["momentum_buffer"]
        assert torch.equal(opt2.base_optimizer.state[p2]["momentum_buffer"], buf)
        assert opt2.state[p2] is opt2.base_optimizer.state[p2]
    assert opt2.param_groups is opt2.base_optimizer.param_groups

    for step in range(3, 6):
        opt.step(closure_for(opt, model, *batch(step)))
        opt2.step(closure_for(opt2, model2, *batch(step)))
    for p, p2 in zip(model.parameters(), model2.parameters()):
        assert torch.equal(p, p2)


def test_state_dict_restore_is_needed_for_identical_continuation():
    """Counter-check of the test above: without load_state_dict (no momentum, another generator)
    the continuation differs, so the round trip test can fail."""
    model = mlp(0)
    opt = ps.APD(model.parameters(), torch.optim.SGD, steps=2, lr=0.1, momentum=0.9, corruption="random", seed=3)
    for step in range(3):
        opt.step(closure_for(opt, model, *batch(step)))
    model2 = copy.deepcopy(model)
    opt2 = ps.APD(model2.parameters(), torch.optim.SGD, steps=2, lr=0.1, momentum=0.9, corruption="random", seed=3)
    for step in range(3, 5):
        opt.step(closure_for(opt, model, *batch(step)))
        opt2.step(closure_for(opt2, model2, *batch(step)))
    assert not all(torch.equal(p, p2) for p, p2 in zip(model.parameters(), model2.parameters()))


def test_zero_grad():
    model = mlp(0)
    opt = ps.APD(model.parameters(), torch.optim.SGD, steps=1, lr=0.1)
    opt.step(closure_for(opt, model, *batch(0)))
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
    opt.zero_grad(set_to_none=False)
    assert all(p.grad is not None and not p.grad.any() for p in model.parameters())
    opt.step(closure_for(opt, model, *batch(1)))
    opt.zero_grad()
    assert all(p.grad is None for p in model.parameters())
    # under a profiler the call goes through Optimizer.zero_grad, whose range the trace shows
    opt.step(closure_for(opt, model, *batch(2)))
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        opt.zero_grad()
    assert all(p.grad is None for p in model.parameters())
    assert any("zero_grad" in e.name for e in prof.events())


def test_add_param_group_equals_constructing_with_groups():
    model = mlp(0)
    model2 = copy.deepcopy(model)
    opt = ps.APD(model[0].parameters(), torch.optim.SGD, steps=2, lr=0.1, momentum=0.9)
    opt.add_param_group({"params": list(model[2].parameters()), "lr": 0.03})
    assert len(opt.param_groups) == 2 and opt.param_groups is opt.base_optimizer.param_groups
    assert opt.param_groups[1]["momentum"] == 0.9  # filled from the base optimizer's defaults
    opt2 = ps.APD(
        [{"params": list(model2[0].parameters())}, {"params": list(model2[2].parameters()), "lr": 0.03}],
        torch.optim.SGD, steps=2, lr=0.1, momentum=0.9,
    )
    w_last = clone_params(model[2])
    for step in range(3):
        opt.step(closure_for(opt, model, *batch(step)))
        opt2.step(closure_for(opt2, model2, *batch(step)))
    assert not torch.equal(model[2].weight, w_last[0])  # the added group is trained
    for p, p2 in zip(model.parameters(), model2.parameters()):
        assert torch.equal(p, p2)


def test_gradient_clipping_between_trajectory_and_step(bookkeeping):
    eps, K, lr, max_norm = 0.3, 3, 0.5, 0.05
    model = mlp(1)
    ref = copy.deepcopy(model)
    opt = ps.APD(model.parameters(), torch.optim.SGD, budget=ps.Budget("l2", eps), steps=K, lr=lr)
    for step in range(2):
        x, y = batch(step)
        passes = []
        for t in opt.trajectory():
            passes.append(t)
            loss = mse(model, x, y)
            loss.backward()
        assert passes == list(range(K + 1))
        g_ref = ref_apd_gradient(ref, x, y, RefL2(eps), K, 1.5 * eps / K, True)
        assert_close([p.grad for p in model.parameters()], g_ref, atol=1e-9)  # averaged grad in .grad
        total = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
        assert float(total) > max_norm  # the clipping is active
        opt.step()
        scale = max_norm / (float(flat(g_ref).norm()) + 1e-6)
        with torch.no_grad():
            for p, g in zip(ref.parameters(), g_ref):
                p.sub_(lr * scale * g)
        assert_close(model.parameters(), ref.parameters(), atol=1e-9)


# ---------------------------------------------------------------------------------------------
# 5. BatchNorm: corrupted passes do not move running statistics
# ---------------------------------------------------------------------------------------------
class CustomBN(nn.modules.batchnorm._BatchNorm):
    def _check_input_dim(self, input):
        if input.dim() != 2:
            raise ValueError("expected 2D input")


class SubBN1d(nn.BatchNorm1d):
    pass


def _bn_model(kind):
    torch.manual_seed(0)
    if kind == "bn2d":
        model = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 25, 3))
        g = torch.Generator().manual_seed(1)
        x = torch.randn(8, 2, 5, 5, generator=g, dtype=F64)
        y = torch.randn(8, 3, generator=g, dtype=F64)
        return model.double(), x, y
    bn = {
        "bn1d": lambda: nn.BatchNorm1d(8),
        "bn1d-cma": lambda: nn.BatchNorm1d(8, momentum=None),  # cumulative average uses num_batches_tracked
        "custom": lambda: CustomBN(8),
        "subclass": lambda: SubBN1d(8),
    }[kind]()
    model = nn.Sequential(nn.Linear(5, 8), bn, nn.Tanh(), nn.Linear(8, 3)).double()
    return model, *batch(0)


@pytest.mark.parametrize("kind", ["bn1d", "bn1d-cma", "bn2d", "custom", "subclass"])
def test_batchnorm_statistics_only_from_clean_pass(kind):
    model, x, y = _bn_model(kind)
    model.train()
    opt = ps.APD(model.parameters(), torch.optim.SGD, budget=ps.Budget("l2", 0.5), steps=3, lr=0.1)
    for step in range(2):
        twin = copy.deepcopy(model)
        with torch.no_grad():
            twin(x + step)  # ONE clean forward in train mode
        opt.step(closure_for(opt, model, x + step, y))
        for b, bt in zip(model.buffers(), twin.buffers()):
            assert torch.equal(b, bt)
    bn = model[1]
    assert int(bn.num_batches_tracked) == 2  # not 2 * (K + 1)


def test_batchnorm_statistics_restored_when_closure_raises():
    model, x, y = _bn_model("bn1d")
    twin = copy.deepcopy(model)  # a step that does not complete leaves even the clean pass's statistics as found
    w = clone_params(model)
    opt = ps.APD(model.parameters(), torch.optim.SGD, budget=ps.Budget("l2", 0.5), steps=3, lr=0.1)
    calls = []

    def closure():
        calls.append(1)
        opt.zero_grad()
        loss = mse(model, x, y)
        if len(calls) == 3:
            raise RuntimeError("boom in pass 2")
        loss.backward()
        return loss

    with pytest.raises(RuntimeError, match="boom"):
        opt.step(closure)
    assert_params_equal(model, w)
    for b, bt in zip(model.buffers(), twin.buffers()):
        assert torch.equal(b, bt)


# ---------------------------------------------------------------------------------------------
# 6. mixed precision: bf16 autocast, fp16 with GradScaler
# ---------------------------------------------------------------------------------------------
def _classification(seed=0, n=64, d=10, classes=3, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    w = torch.randn(d, classes, generator=g)
    y = (x @ w).argmax(1)
    return x.to(device), y.to(device)


def _clf_model(seed=0, device="cpu", dtype=torch.float32):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Linear(32, 3)).to(device=device, dtype=dtype)


def test_bf16_autocast_training_lowers_loss():
    x, y = _classification()
    model = _clf_model()
    opt = ps.APD(model.parameters(), torch.optim.SGD, budget=ps.Budget("l2", 0.05), steps=2, lr=0.2, momentum=0.9)
    dtypes = set()

    def closure():
        opt.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x)
            dtypes.add(out.dtype)
            loss = F.cross_entropy(out, y)
        loss.backward()
        return loss

    losses = [float(opt.step(closure).detach()) for _ in range(25)]
    assert dtypes == {torch.bfloat16}
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < 0.5 * losses[0], losses
    for p in model.parameters():
        assert p.dtype == torch.float32 and p.grad.dtype == torch.float32 and torch.isfinite(p).all()


def _fp16_recipe(device):
    """The fp16 recipe of the user guide (docs/guide.md): two-phase API, scaler.scale(loss).backward() in each pass,
    scaler.step(opt), scaler.update(). Checks: training works under fp16 autocast; the update equals
    the unscaled APD update (float64, scale invariance); an inf in one corruption pass makes the
    scaler skip the step with w kept bit for bit and the scale reduced; unscale_ + clipping before
    scaler.step does not double-unscale."""
    dev = torch.device(device)
    # (a) fp16 autocast training
    x, y = _classification(device=dev)
    model = _clf_model(device=dev)
    opt = ps.APD(model.parameters(), torch.optim.SGD, budget=ps.Budget("l2", 0.05), steps=2, lr=0.2, momentum=0.9)
    scaler = torch.amp.GradScaler(device, init_scale=2.0**10)
    assert scaler.is_enabled()
    losses = []
    for _ in range(25):
        for t in opt.trajectory(scaler=scaler):
            with torch.autocast(device, dtype=torch.float16):
                out = model(x)
                loss = F.cross_entropy(out, y)
            assert out.dtype == torch.float16
            if t == 0:
                losses.append(float(loss.detach()))
            scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
    assert losses[-1] < 0.5 * losses[0], losses

    # (b) scale invariance, float64, no autocast
    budget = ps.Budget("l2", 0.3)
    m_s = mlp(0).to(dev)
    m_u = copy.deepcopy(m_s)
    o_s = ps.APD(m_s.parameters(), torch.optim.SGD, budget=budget, steps=3, lr=0.2, momentum=0.9)
    o_u = ps.APD(m_u.parameters(), torch.optim.SGD, budget=budget, steps=3, lr=0.2, momentum=0.9)
    scaler = torch.amp.GradScaler(device, init_scale=2.0**14)
    for step in range(3):
        xb, yb = (v.to(dev) for v in batch(step))
        for _ in o_s.trajectory(scaler=scaler):
            scaler.scale(mse(m_s, xb, yb)).backward()
        scaler.step(o_s)
        scaler.update()
        o_u.step(closure_for(o_u, m_u, xb, yb))
        assert_close(m_s.parameters(), m_u.parameters(), atol=1e-12)
    assert scaler.get_scale() == 2.0**14

    # (c) an inf in corruption pass t = 2: step skipped, w bit for bit, scale reduced
    w = clone_params(m_s)
    xb, yb = (v.to(dev) for v in batch(9))
    for t in o_s.trajectory(scaler=scaler):  # no NonFiniteGradientError with a scaler
        loss = mse(m_s, xb, yb)
        if t == 2:
            loss = loss * math.inf
        scaler.scale(loss).backward()
    assert_params_equal(m_s, w)
    scaler.step(o_s)
    scaler.update()
    assert_params_equal(m_s, w)
    assert scaler.get_scale() == 2.0**13
    # the next good step goes through and equals the unscaled run on the same batch
    o_u.step(closure_for(o_u, m_u, xb + 1, yb))
    for _ in o_s.trajectory(scaler=scaler):
        scaler.scale(mse(m_s, xb + 1, yb)).backward()
    scaler.step(o_s)
    scaler.update()
    assert_close(m_s.parameters(), m_u.parameters(), atol=1e-12)
    assert not all(torch.equal(p, wi) for p, wi in zip(m_s.parameters(), w))

    # (d) unscale_ + clipping, then scaler.step: no double unscale
    max_norm = 0.01
    for step in range(2):
        xb, yb = (v.to(dev) for v in batch(20 + step))
        for _ in o_s.trajectory(scaler=scaler):
            scaler.scale(mse(m_s, xb, yb)).backward()
        scaler.unscale_(o_s)
        total_s = torch.nn.utils.clip_grad_norm_(m_s.parameters(), max_norm)
        scaler.step(o_s)
        scaler.update()
        for _ in o_u.trajectory():
            mse(m_u, xb, yb).backward()
        total_u = torch.nn.utils.clip_grad_norm_(m_u.parameters(), max_norm)
        o_u.step()
        assert float(total_u) > max_norm
        torch.testing.assert_close(total_s, total_u, rtol=1e-12, atol=0)
        assert_close(m_s.parameters(), m_u.parameters(), atol=1e-12)


def test_fp16_grad_scaler_recipe_cpu():
    _fp16_recipe("cpu")


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fp16_grad_scaler_recipe_cuda():
    _fp16_recipe("cuda")


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("make", GEOMETRIES)
def test_cuda_trajectory_equals_cpu(make, bookkeeping):
    """The accelerator bookkeeping (per-tensor gradients, fused kernels, max|g| probes) takes the
    same steps as the CPU's; a NaN pass is still caught and named."""
    budget, _ = make()
    cpu, gpu = mlp(3), mlp(3).cuda()
    o_c = ps.APD(cpu.parameters(), torch.optim.SGD, budget=budget, steps=3, lr=0.1, momentum=0.9)
    o_g = ps.APD(gpu.parameters(), torch.optim.SGD, budget=budget, steps=3, lr=0.1, momentum=0.9)
    for step in range(3):
        x, y = batch(step)
        o_c.step(closure_for(o_c, cpu, x, y))
        o_g.step(closure_for(o_g, gpu, x.cuda(), y.cuda()))
    assert_close([p.cpu() for p in gpu.parameters()], list(cpu.parameters()), atol=1e-10)
    w = [p.detach().clone() for p in gpu.parameters()]
    x, y = batch(9)
    calls = []

    def bad_closure():
        calls.append(1)
        o_g.zero_grad()
        loss = mse(gpu, x.cuda(), y.cuda()) * (math.nan if len(calls) == 3 else 1.0)
        loss.backward()
        return loss

    with pytest.raises(ps.NonFiniteGradientError, match="t = 2"):
        o_g.step(bad_closure)
    assert all(torch.equal(a, b) for a, b in zip(w, gpu.parameters()))


# ---------------------------------------------------------------------------------------------
# 7. gradient accumulation
# ---------------------------------------------------------------------------------------------
def test_gradient_accumulation_equals_large_batch():
    model = mlp(0)
    big = copy.deepcopy(model)
    kw = dict(budget=ps.Budget("l2", 0.3), steps=3, lr=0.2, momentum=0.9)
    opt = ps.APD(model.parameters(), torch.optim.SGD, **kw)
    opt_big = ps.APD(big.parameters(), torch.optim.SGD, **kw)
    for step in range(3):
        x, y = batch(step, n=32)

        def accumulated():
            opt.zero_grad()
            total = 0.0
            for xm, ym in zip(x.chunk(4), y.chunk(4)):
                loss = mse(model, xm, ym) / 4
                loss.backward()
                total = total + loss.detach()
            return total

        l_acc = opt.step(accumulated)
        l_big = opt_big.step(closure_for(opt_big, big, x, y))
        assert float(l_acc) == pytest.approx(float(l_big.detach()), abs=1e-12)
        assert_close(model.parameters(), big.parameters(), atol=1e-10)


@pytest.mark.parametrize("how", ["closure", "trajectory"])
def test_pending_gradients_from_an_outside_backward_are_refused_not_dropped(how, bookkeeping):
    """A framework's accumulation leaves micro-batch gradients in .grad before the step: the step
    must refuse, leaving parameters and those gradients untouched, not silently discard them."""
    model = mlp(0)
    opt = ps.APD(model.parameters(), torch.optim.SGD, lr=0.1)
    x, y = batch(0)
    mse(model, x[:8], y[:8]).backward()
    pending = [p.grad.clone() for p in model.parameters()]
    w = clone_params(model)
    with pytest.raises(RuntimeError, match="already hold gradients.*zero_grad"):
        if how == "closure":
            opt.step(closure_for(opt, model, x, y))
        else:
            for _ in opt.trajectory():
                mse(model, x, y).backward()
    assert_params_equal(model, w)
    assert all(torch.equal(p.grad, g) for p, g in zip(model.parameters(), pending))


def test_zero_filled_gradients_are_not_pending():
    """zero_grad(set_to_none=False) leaves zeros: nothing is lost, the step runs as from None."""
    model, ref = mlp(0), mlp(0)
    opt = ps.APD(model.parameters(), torch.optim.SGD, lr=0.1)
    opt_ref = ps.APD(ref.parameters(), torch.optim.SGD, lr=0.1)
    x, y = batch(0)
    mse(model, x, y).backward()
    opt.zero_grad(set_to_none=False)
    opt.step(closure_for(opt, model, x, y))
    opt_ref.step(closure_for(opt_ref, ref, x, y))
    assert_params_equal(model, clone_params(ref))


def test_closure_after_a_completed_trajectory_is_called_once_without_grad():
    """Frameworks that always pass a closure (Lightning) run their pre-step hooks in it: after a
    trajectory it is called once, then the base step uses the averaged gradient untouched."""
    model, ref = mlp(0), mlp(0)
    opt = ps.APD(model.parameters(), torch.optim.SGD, lr=0.1)
    opt_ref = ps.APD(ref.parameters(), torch.optim.SGD, lr=0.1)
    x, y = batch(0)
    for _ in opt.trajectory():
        mse(model, x, y).backward()
    calls = []
    assert opt.step(lambda: calls.append(torch.is_grad_enabled()) or "hooks ran") == "hooks ran"
    assert calls == [False]
    opt_ref.step(closure_for(opt_ref, ref, x, y))
    assert_params_equal(model, clone_params(ref))
    for _ in opt.trajectory():
        mse(model, x, y).backward()
    with pytest.raises(RuntimeError, match="does not require grad"):
        opt.step(closure_for(opt, model, x, y))  # a backward there would add to the average: refused


def test_new_trajectory_over_an_unstepped_one_is_refused():
    """accelerate's accumulate() skips optimizer.step() on early micro-batches: the trajectory
    they ran must not be silently replaced by the next one."""
    model = mlp(0)
    opt = ps.APD(model.parameters(), torch.optim.SGD, lr=0.1)
    x, y = batch(0)
    for _ in opt.trajectory():
        mse(model, x, y).backward()
    with pytest.raises(RuntimeError, match="before step.. took the last one"):
        for _ in opt.trajectory():
            mse(model, x, y).backward()
    opt.step()  # the first trajectory's step is still available


def test_grad_scaler_skipped_step_after_unscale_and_clipping_is_not_pending():
    """fp16: unscale_ and clipping change the averaged gradient in place, then scaler.step skips
    the step on an inf; the next trajectory starts over it (it is the defense's own)."""
    model = mlp(0)
    opt = ps.APD(model.parameters(), torch.optim.SGD, lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    x, y = batch(0)
    w = clone_params(model)
    for t in opt.trajectory(scaler=scaler):
        scaler.scale(mse(model, x, y) * (math.inf if t == 1 else 1)).backward()
    scaler.unscale_(opt)
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    scaler.step(opt)
    scaler.update()
    assert_params_equal(model, w)  # skipped
    for _ in opt.trajectory(scaler=scaler):
        scaler.scale(mse(model, x, y)).backward()
    scaler.step(opt)
    assert not torch.equal(model[0].weight, w[0])


# ---------------------------------------------------------------------------------------------
# 8. checkpoints: bit-identical resume, atomic write, weights_only load
# ---------------------------------------------------------------------------------------------
def _ckpt_setup(corruption, init_seed):
    torch.manual_seed(init_seed)
    model = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 2))
    opt = ps.APD(model.parameters(), torch.optim.SGD, budget=ps.Budget("l2", 0.1), steps=2, lr=0.1,
                 momentum=0.9, corruption=corruption, seed=11)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    return model, opt, sched


def _ckpt_train(model, opt, sched, steps):
    for _ in range(steps):
        x = torch.randn(8, 6)  # data from the global generator: its state is in the checkpoint
        y = torch.randn(8, 2)

        def closure():
            opt.zero_grad()
            loss = F.mse_loss(model(x), y)
            loss.backward()
            return loss

        opt.step(closure)
        sched.step()


@pytest.mark.parametrize("corruption", ["adversarial", "random"])
def test_checkpoint_resume_is_bit_identical(tmp_path, corruption):
    N = 6
    torch.manual_seed(123)
    model, opt, sched = _ckpt_setup(corruption, 0)
    torch.manual_seed(123)
    _ckpt_train(model, opt, sched, N)
    final = clone_params(model)

    model, opt, sched = _ckpt_setup(corruption, 0)
    torch.manual_seed(123)
    _ckpt_train(model, opt, sched, N // 2)
    path = ps.save_checkpoint(tmp_path / "run" / "ckpt.pt", model, opt, sched, step=N // 2)
    assert sorted(os.listdir(tmp_path / "run")) == ["ckpt.pt"]  # no temporary file left

    torch.manual_seed(999)  # disturb the global generator; the checkpoint restores it
    model2, opt2, sched2 = _ckpt_setup(corruption, 1)
    extra = ps.load_checkpoint(path, model2, opt2, sched2)
    assert extra == {"step": N // 2}
    assert sched2.last_epoch == N // 2
    assert opt2.param_groups[0]["lr"] == opt.param_groups[0]["lr"]
    _ckpt_train(model2, opt2, sched2, N - N // 2)
    assert_params_equal(model2, final)


def test_checkpoint_resume_without_rng_differs(tmp_path):
    """Counter-check: the resume test can fail (data comes from the global generator)."""
    torch.manual_seed(123)
    model, opt, sched = _ckpt_setup("random", 0)
    torch.manual_seed(123)
    _ckpt_train(model, opt, sched, 4)
    final = clone_params(model)
    model, opt, sched = _ckpt_setup("random", 0)
    torch.manual_seed(123)
    _ckpt_train(model, opt, sched, 2)
    path = ps.save_checkpoint(tmp_path / "c.pt", model, opt, sched)
    torch.manual_seed(999)
    model2, opt2, sched2 = _ckpt_setup("random", 1)
    ps.load_checkpoint(path, model2, opt2, sched2, restore_rng=False)
    _ckpt_train(model2, opt2, sched2, 2)
    assert not all(torch.equal(p, f) for p, f in zip(model2.parameters(), final))


def test_checkpoint_failed_save_keeps_old_file(tmp_path, monkeypatch):
    model, opt, sched = _ckpt_setup("adversarial", 0)
    path = ps.save_checkpoint(tmp_path / "ckpt.pt", model, opt, sched, step=1)
    before = path.read_bytes()

    def broken_save(obj, f, *args, **kwargs):
        f.write(b"half a checkpoint")
        raise OSError("disk full")

    with torch.no_grad():
        model[0].weight.add_(1.0)
    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        ps.save_checkpoint(path, model, opt, sched, step=2)
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["ckpt.pt"]
    model2, opt2, sched2 = _ckpt_setup("adversarial", 1)
    assert ps.load_checkpoint(path, model2, opt2, sched2) == {"step": 1}


class _Evil:
    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return (os.mkdir, (self.target,))


def test_checkpoint_load_is_weights_only(tmp_path):
    model, opt, sched = _ckpt_setup("adversarial", 0)
    path = ps.save_checkpoint(tmp_path / "ok.pt", model, opt, sched)
    payload = torch.load(path, weights_only=True)
    marker = tmp_path / "pwned"
    payload["extra"] = {"x": _Evil(str(marker))}
    torch.save(payload, tmp_path / "evil.pt")
    with pytest.raises(ps.CheckpointError, match="weights_only") as info:
        ps.load_checkpoint(tmp_path / "evil.pt", model, opt, sched)
    assert isinstance(info.value.__cause__, pickle.UnpicklingError)
    assert not marker.exists()


# ---------------------------------------------------------------------------------------------
# 9. NaN / Inf and interrupted trajectories
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bad_call,name", [(1, "clean"), (2, "t = 1"), (3, "t = 2"), (4, "t = 3")])
@pytest.mark.parametrize("bad", [math.nan, math.inf])
@pytest.mark.parametrize("sparsity", [None, 7])
def test_nonfinite_pass_raises_naming_it_and_restores_w(bad_call, name, bad, sparsity, bookkeeping):
    model = mlp(0)
    opt = ps.APD(model.parameters(), torch.optim.SGD, budget=ps.Budget("l2", 0.05, sparsity=sparsity), steps=3,
                 lr=0.1, momentum=0.9)
    x, y = batch(0)
    calls = []

    def closure():
        calls.append(1)
        opt.zero_grad()
        loss = mse(model, x, y)
        if len(calls) == bad_call:
            loss = loss * bad
        loss.backward()
        return loss

    w = clone_params(model)
    with pytest.raises(ps.NonFiniteGradientError, match=name) as info:
        opt.step(closure)
    assert ("corruption pass" in str(info.value)) == (name != "clean")
    assert_params_equal(model, w)
    assert len(opt.base_optimizer.state) == 0  # no base step was taken
    with pytest.raises(RuntimeError):
        opt.step()  # the failed trajectory cannot be stepped
    # a good step afterwards works
    calls.clear()
    bad_call = -1
    opt.step(closure)
    assert not torch.equal(model[0].weight, w[0])


def test_exception_in_closure_leaves_w_bit_for_bit(bookkeeping):
    model = mlp(0)
    opt = ps.APD(model.parameters(), torch.optim.SGD, steps=3, lr=0.1)
    x, y = batch(0)
    calls, seen = [], []

    def closure():
        calls.append(1)
        seen.append(clone_params(model))
        opt.zero_grad()
        loss = mse(model, x, y)
        loss.backward()
        if len(calls) == 3:  # pass t = 2, the parameters are at w + a_2
            raise KeyError("user error")
        return loss

    w = clone_params(model)
    with pytest.raises(KeyError):
        opt.step(closure)
    assert not torch.equal(seen[2][0], w[0])  # the parameters really were moved
    assert_params_equal(model, w)


@pytest.mark.parametrize("stop", [0, 1, 2, 3])
def test_break_out_of_trajectory_restores_w(stop, bookkeeping):
    model = mlp(0)
    opt = ps.APD(model.parameters(), torch.optim.SGD, steps=3, lr=0.1)
    x, y = batch(0)
    w = clone_params(model)
    for t in opt.trajectory():
        mse(model, x, y).backward()
        if t == stop:
            break
    assert_params_equal(model, w)
    with pytest.raises(RuntimeError):
        opt.step()
    # an exception in the loop body also restores
    with pytest.raises(ZeroDivisionError):
        for t in opt.trajectory():
            mse(model, x, y).backward()
            if t == stop:
                1 / 0
    assert_params_equal(model, w)


# ---------------------------------------------------------------------------------------------
# 10. argument validation
# ---------------------------------------------------------------------------------------------
def _params():
    return mlp(0).parameters()


BAD_APD = [
    (dict(steps=0), ValueError, "steps"),
    (dict(steps=-1), ValueError, "steps"),
    (dict(steps=1.5), TypeError, "steps"),
    (dict(steps=True), TypeError, "steps"),
    (dict(step_size=0), ValueError, "step_size"),
    (dict(step_size=-0.1), ValueError, "step_size"),
    (dict(step_size=math.nan), ValueError, "step_size"),
    (dict(corruption="foo"), ValueError, "corruption"),
    (dict(distributed="foo"), ValueError, "distributed"),
    (dict(budget="l2"), TypeError, "budget"),
    (dict(budget=0.05), TypeError, "budget"),
    (dict(include_clean="no"), TypeError, "include_clean"),
    (dict(seed="x"), TypeError, "seed"),
]


@pytest.mark.parametrize("kwargs,exc,name", BAD_APD, ids=[f"{k}={v!r}" for kw, _, _ in BAD_APD for k, v in kw.items()])
def test_apd_bad_arguments(kwargs, exc, name):
    with pytest.raises(exc, match=name):
        ps.APD(_params(), torch.optim.SGD, lr=0.1, **kwargs)


@pytest.mark.parametrize(
    "base", ["SGD", torch.optim.SGD(mlp(0).parameters(), lr=0.1), nn.Linear, None], ids=["str", "instance", "not-optimizer", "none"]
)
def test_apd_bad_base_optimizer(base):
    with pytest.raises(TypeError, match="base_optimizer"):
        ps.APD(_params(), base, lr=0.1)


def test_apd_empty_params():
    with pytest.raises(ValueError, match="params"):
        ps.APD([], torch.optim.SGD, lr=0.1)


@pytest.mark.parametrize("rho", [-0.1, math.nan, math.inf, "0.05"])
def test_sam_bad_rho(rho):
    with pytest.raises((ValueError, TypeError), match="rho"):
        ps.SAM(_params(), torch.optim.SGD, rho=rho, lr=0.1)


def test_sam_bad_eta_and_adaptive():
    with pytest.raises(ValueError, match="eta"):
        ps.SAM(_params(), torch.optim.SGD, rho=0.05, adaptive=True, eta=-1.0, lr=0.1)
    with pytest.raises(TypeError, match="adaptive"):
        ps.SAM(_params(), torch.optim.SGD, rho=0.05, adaptive="yes", lr=0.1)


def test_base_optimizer_kwargs_are_validated_by_base():
    with pytest.raises(ValueError, match="learning rate"):
        ps.APD(_params(), torch.optim.SGD, lr=-1.0)


# ---------------------------------------------------------------------------------------------
# 11. end to end: APD makes a digits classifier more robust to multi-step parameter corruption
# ---------------------------------------------------------------------------------------------
def test_apd_more_robust_than_sgd_on_digits():
    sklearn = pytest.importorskip("sklearn")
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    from sklearn.preprocessing import StandardScaler

    del sklearn
    X, y = load_digits(return_X_y=True)
    Xtr, Xte, ytr, yte = train_test_split(X, y, test_size=0.3, random_state=0, stratify=y)
    scaler = StandardScaler().fit(Xtr)
    Xtr = torch.tensor(scaler.transform(Xtr), dtype=torch.float32)
    Xte = torch.tensor(scaler.transform(Xte), dtype=torch.float32)
    ytr, yte = torch.tensor(ytr), torch.tensor(yte)

    def loss_fn(m, b):
        return F.cross_entropy(m(b[0]), b[1])

    def accuracy(m):
        with torch.no_grad():
            return float((m(Xte).argmax(1) == yte).float().mean())

    def train(kind, epochs=10):
        torch.manual_seed(0)
        m = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
        kw = dict(lr=0.05, momentum=0.9)
        if kind == "sgd":
            opt = torch.optim.SGD(m.parameters(), **kw)
        elif kind == "apd":
            opt = ps.APD(m.parameters(), torch.optim.SGD, budget=ps.Budget("l2", 2.0), steps=3, **kw)
        else:
            opt = ps.SAM(m.parameters(), torch.optim.SGD, rho=1.0, **kw)  # printed for comparison only
        g = torch.Generator().manual_seed(1)
        for _ in range(epochs):
            perm = torch.randperm(len(Xtr), generator=g)
            for i in range(0, len(Xtr), 64):
                idx = perm[i : i + 64]

                def closure():
                    opt.zero_grad()
                    loss = loss_fn(m, (Xtr[idx], ytr[idx]))
                    loss.backward()
                    return loss

                if kind == "sgd":
                    closure()
                    opt.step()
                else:
                    opt.step(closure)
        return m

    attack_eps = (2.0, 3.0)
    results = {}
    for kind in ("sgd", "apd", "sam"):
        m = train(kind)
        row = {"clean": accuracy(m)}
        for eps in attack_eps:
            res = ps.MultiStepCorruption(ps.Budget("l2", eps), steps=10)(ps.Objective(m, loss_fn, (Xtr, ytr)))
            with ps.corrupted(m, res):
                row[eps] = accuracy(m)
        results[kind] = row
        print(f"digits {kind}: clean acc {row['clean']:.3f}, "
              + ", ".join(f"acc under multi-step L2 eps={e}: {row[e]:.3f}" for e in attack_eps))
    assert results["sgd"]["clean"] > 0.95 and results["apd"]["clean"] > 0.93
    for eps in attack_eps:
        assert results["apd"][eps] > results["sgd"][eps] + 0.05, results


def test_nan_loss_term_without_gradient_is_caught_and_w_restored(bookkeeping):
    """A NaN that only the loss carries (no gradient, e.g. an added constant) still stops the step."""
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2).double()
    x, y = torch.randn(8, 3, dtype=torch.float64), torch.randint(0, 2, (8,))
    opt = ps.APD(model.parameters(), torch.optim.SGD, budget=ps.Budget("l2", 0.1), steps=3, lr=0.1)
    clean = [p.detach().clone() for p in model.parameters()]
    calls = []

    def closure():
        calls.append(1)
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        return loss + (float("nan") if len(calls) == 3 else 0.0)

    with pytest.raises(ps.NonFiniteGradientError, match="t = 2"):
        opt.step(closure)
    assert all(torch.equal(a, b) for a, b in zip(clean, model.parameters()))
