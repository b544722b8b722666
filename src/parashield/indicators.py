"""Loss change indicators: estimates of ``max_{a in S} L(w + a) - L(w)``, the
curvature extras (top Hessian eigenvalue, Hessian trace), per-layer vulnerability and the
critical eps at which a metric collapses.

Curvature is reached only through Hessian-vector products (double backward); the Krylov solvers
work on flat float64 vectors of the selected parameters.

The formulas: docs/method.md, "Loss change indicators" and "Curvature"; measured costs:
docs/guide.md.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import Tensor, nn

from ._checks import check_budget, check_count, check_objective, check_real, check_seed
from ._krylov import eigenpairs, gaussian_start
from ._krylov import lanczos as _lanczos
from ._progress import progress
from .budget import Budget, _flat, _unflat_
from .corruption import (
    GradientCorruption,
    MultiStepCorruption,
    RandomCorruption,
    corrupted,
    make_corruption,
)
from .objective import Objective, Probe, check_finite, preserved_modes

METHODS = ("first_order", "second_order", "random", "one_step", "multi_step")


def loss_change(objective: Objective, budget: Budget, method: str = "first_order", **kwargs) -> float:
    """Estimate ``max_{a in S} L(w + a) - L(w)``.

    Methods: ``"first_order"`` (``eps * ||h||_q``, exact for linear losses), ``"second_order"``
    (maximum of ``g.a + a.H.a / 2`` over S; kwargs ``iters``), ``"random"`` (mean change over
    random boundary corruptions; kwargs ``trials``, ``seed``), ``"one_step"`` and ``"multi_step"``
    (the change the corruption reaches; kwargs of ``MultiStepCorruption`` such as ``steps``).
    """
    check_objective(objective)
    check_budget(budget)
    if method == "first_order":
        _no_kwargs(method, kwargs)
        with objective.probe() as pr:
            _, grads = pr.gradient()
            return float(budget.ascent_value(grads, pr.clean))
    if method == "second_order":
        return second_order(objective, budget, **kwargs)
    if method == "random":
        return RandomCorruption(budget, **kwargs)(objective).mean_change
    if method == "one_step":
        _no_kwargs(method, kwargs)
        return GradientCorruption(budget)(objective).loss_change
    if method == "multi_step":
        return MultiStepCorruption(budget, **kwargs)(objective).loss_change
    raise ValueError(f"method must be one of {METHODS}, got {method!r}")


def _no_kwargs(method: str, kwargs: dict) -> None:
    if kwargs:
        raise TypeError(f"method {method!r} takes no options, got {sorted(kwargs)}")


# ---------------------------------------------------------------------------- flat HVP operator
class _FlatHessian:
    """``v -> H v`` on flat float64 vectors, optionally in element-scaled coordinates
    ``v -> s * H (s * v)``, at the parameters as they are when it is made."""

    def __init__(self, probe: Probe, scale: Optional[Tensor] = None) -> None:
        self.probe = probe
        self.params = probe.clean
        self.sizes = [p.numel() for p in self.params]
        self.scale = scale
        self.hvp = probe.hvp_operator()

    def __call__(self, v: Tensor) -> Tensor:
        x = v if self.scale is None else v * self.scale
        x = x.to(self.params[0].dtype)  # one copy; the parts are views of it
        parts = [t.view_as(p) for t, p in zip(x.split(self.sizes), self.params)]
        hv = _flat(self.hvp(parts)).double()
        return hv if self.scale is None else hv * self.scale


def _trust_region_max(T: Tensor, b: Tensor, r: float) -> tuple[Tensor, float]:
    """Exact ``max_{||y|| <= r} b.y + y.T.y / 2`` for a small symmetric T (Moré-Sorensen via
    the eigendecomposition, hard case included)."""
    lam, V = torch.linalg.eigh(T)
    c = V.T @ b  # maximise c.z + sum lam_i z_i^2 / 2 over ||z|| <= r, y = V z
    lmax = float(lam[-1])

    def z_of(mu: float) -> Tensor:  # stationary point of the Lagrangian, mu > lam_max
        return c / (mu - lam)

    if lmax < 0:
        z0 = z_of(0.0)
        if float(torch.linalg.vector_norm(z0)) <= r:
            return V @ z0, float(c @ z0 + 0.5 * (lam * z0 * z0).sum())
    lo = max(lmax, 0.0)
    tiny = 1e-12 * max(1.0, abs(lmax))
    top = lam >= lmax - tiny
    c_top = float(torch.linalg.vector_norm(c[top]))
    if c_top <= 1e-14 * max(1.0, float(torch.linalg.vector_norm(c))):
        # Hard case: the secular equation has no root above lam_max; move along its eigenvector.
        safe = torch.where(top, torch.ones_like(lam), lmax - lam)
        z = torch.where(top, torch.zeros_like(c), c / safe)
        if float(torch.linalg.vector_norm(z)) <= r:
            fill = math.sqrt(max(r * r - float(z @ z), 0.0))
            z = z.clone()
            z[int(torch.nonzero(top)[0])] = fill
            return V @ z, float(c @ z + 0.5 * (lam * z * z).sum())
    hi = lo + float(torch.linalg.vector_norm(c)) / r + 1.0
    while float(torch.linalg.vector_norm(z_of(hi))) > r:
        hi = 2 * hi - lo
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if mid <= lo or mid >= hi:
            break
        if float(torch.linalg.vector_norm(z_of(mid))) > r:
            lo = mid
        else:
            hi = mid
    z = z_of(hi)
    return V @ z, float(c @ z + 0.5 * (lam * z * z).sum())


def second_order(objective: Objective, budget: Budget, iters: int = 50, seed: int = 0) -> float:
    """Maximum over S of the quadratic model ``g.a + a.H.a / 2`` (Hessian-vector products only).

    For dense L2 budgets (plain or element-scaled) this is the trust-region subproblem, solved
    exactly in a Krylov space of up to ``iters`` Lanczos vectors (exact once the space is
    invariant, e.g. when ``iters >= k``, hard case included). Other budgets use projected
    gradient ascent on the model with step ``1 / |lambda_max|``, ``iters`` steps from each of two
    starts (the one-step corruption and a random boundary point, seeded), keeping the best.
    """
    check_objective(objective)
    check_budget(budget)
    check_count("iters", iters)
    check_seed(seed)
    with objective.probe() as pr:
        _, grads = pr.gradient()
        g = _flat(grads).double()
        if budget.norm == "l2" and budget.sparsity is None and budget.scale in (None, "element"):
            s = _flat(budget._element_scale(pr.clean)).double() if budget.scale == "element" else None
            op = _FlatHessian(pr, s)
            b = g if s is None else g * s
            nb = float(torch.linalg.vector_norm(b))
            gen = torch.Generator().manual_seed(seed)
            start = b if nb > 0 else torch.randn(b.numel(), generator=gen, dtype=torch.float64)
            T, Q = _lanczos(op, start.to(b.device), iters, generator=gen)
            y, value = _trust_region_max(T.cpu(), (Q @ b).cpu(), budget.eps)
            return value
        op = _FlatHessian(pr)
        # Step 1 / ||H||: 20 Lanczos vectors give a spectral-radius estimate; a 20-step power
        # iteration's Rayleigh quotient does not converge when +-lambda have similar size, and an
        # underestimate below ||H|| / 2 makes the ascent diverge on concave directions.
        start = torch.randn(g.numel(), generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        T, _ = _lanczos(op, start.to(g.device), 20)
        lam = float(torch.linalg.eigvalsh(T.cpu()).abs().max())
        step = 1.0 / lam if lam > 0 else 1.0

        def ascend(parts: list[Tensor]) -> float:
            a = _flat(parts).double()
            best = -math.inf
            for _ in progress(range(iters), desc="second-order ascent", unit="step", leave=False):
                ha = op(a)
                best = max(best, float(g @ a + 0.5 * (a @ ha)))
                _unflat_(parts, (a + step * (g + ha)).to(parts[0].dtype))
                budget.project_(parts, pr.clean)
                a = _flat(parts).double()
            ha = op(a)
            return max(best, float(g @ a + 0.5 * (a @ ha)))

        # Two starts: the one-step corruption, and a random boundary point. The first alone
        # stalls at the stationary point a = 0 of directions where g vanishes (e.g. g = 0 with
        # positive curvature, where the true maximum is on the boundary).
        gen = torch.Generator().manual_seed(seed)
        return max(ascend(budget.steepest(grads, pr.clean)), ascend(budget.sample(pr.clean, gen)))


def _power_iteration(op, k: int, iters: int, tol: float, seed: int, device) -> float:
    gen = torch.Generator().manual_seed(seed)
    v = torch.randn(k, generator=gen, dtype=torch.float64).to(device)
    v /= torch.linalg.vector_norm(v)
    value = 0.0
    for _ in progress(range(iters), desc="power iteration", unit="hvp", leave=False):
        hv = op(v)
        new = float(v @ hv)
        norm = torch.linalg.vector_norm(hv)
        if float(norm) == 0:
            return 0.0
        v = hv / norm
        if abs(new - value) <= tol * max(abs(new), 1e-12):
            return new
        value = new
    return value


def hessian_top_eigenvalue(
    objective: Objective, iters: int = 100, tol: float = 1e-6, method: str = "lanczos", seed: int = 0
) -> float:
    """Dominant (largest-magnitude) eigenvalue of the Hessian of the loss, with its sign.

    ``method="lanczos"`` (default; converges much faster) runs Lanczos from a seeded Gaussian
    start until the Ritz value's error bound ``min(r, r^2 / gap)`` is below ``tol`` times its
    magnitude (r the Ritz residual, gap the distance to the next Ritz value; the default 1e-6
    gives about six correct digits), at most ``iters`` Hessian-vector products. ``"power"``:
    power iteration until the Rayleigh quotient changes by less than ``tol`` (relative), at
    most ``iters`` products.
    """
    check_objective(objective)
    check_count("iters", iters)
    check_real("tol", tol)
    check_seed(seed)
    if method not in ("lanczos", "power"):
        raise ValueError(f"method must be 'lanczos' or 'power', got {method!r}")
    with objective.probe() as pr:
        check_finite(pr.loss(), "loss")
        op = _FlatHessian(pr)
        k = objective.numel
        if method == "power":
            return _power_iteration(op, k, iters, tol, seed, objective.device)
        start, gen = gaussian_start(k, seed, objective.device)
        values, _, _ = eigenpairs(op, start, 1, "magnitude", tol, iters, gen, bound="value")
        return float(values[0])


def hessian_trace(objective: Objective, samples: int = 100, seed: int = 0) -> float:
    """Hutchinson estimate ``E[v.H.v]`` of the Hessian trace with Rademacher vectors (seeded)."""
    check_objective(objective)
    check_count("samples", samples)
    check_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    total = 0.0
    with objective.probe() as pr:
        check_finite(pr.loss(), "loss")
        op = _FlatHessian(pr)
        for _ in progress(range(samples), desc="Hessian trace", unit="sample", leave=False):
            v = (torch.randint(0, 2, (objective.numel,), generator=gen).double() * 2 - 1).to(objective.device)
            total += float(v @ op(v))
    return total / samples


# ---------------------------------------------------------------------------- per layer
@dataclass
class LayerVulnerability:
    """Indicator value when only ``name`` (a parameter or a module) is corrupted."""

    name: str
    numel: int
    value: float

    def __repr__(self) -> str:
        return f"LayerVulnerability({self.name!r}, numel={self.numel}, value={self.value:.6g})"


def layer_vulnerability(
    objective: Objective, budget: Budget, method: str = "first_order", by: str = "parameter", **kwargs
) -> list[LayerVulnerability]:
    """The indicator for every layer corrupted alone, most vulnerable first.

    ``by="parameter"`` treats each selected tensor as a layer, ``by="module"`` groups tensors by
    their owning module. ``first_order`` reuses one gradient for all layers; other methods run
    once per layer.
    """
    check_objective(objective)
    check_budget(budget)
    if by not in ("parameter", "module"):
        raise ValueError(f"by must be 'parameter' or 'module', got {by!r}")
    groups: dict[str, list[int]] = {}
    for i, name in enumerate(objective.names):
        key = name if by == "parameter" else (name.rsplit(".", 1)[0] if "." in name else name)
        groups.setdefault(key, []).append(i)
    rows = []
    if method == "first_order":
        _no_kwargs(method, kwargs)
        with objective.probe() as pr:
            _, grads = pr.gradient()
            for key, idx in groups.items():
                value = budget.ascent_value([grads[i] for i in idx], [pr.clean[i] for i in idx])
                rows.append(LayerVulnerability(key, sum(objective.params[i].numel() for i in idx), float(value)))
    else:
        for key, idx in progress(groups.items(), desc=f"layer vulnerability ({method})", unit="layer", leave=False):
            sub = objective.restrict([objective.params[i] for i in idx])  # tensors: names may hold glob characters
            rows.append(LayerVulnerability(key, sub.numel, loss_change(sub, budget, method, **kwargs)))
    return sorted(rows, key=lambda r: r.value, reverse=True)


# ---------------------------------------------------------------------------- critical eps
def critical_eps(
    objective: Objective,
    budget: Budget,
    metric: Callable[[nn.Module], float],
    drop: float,
    corruption: str = "multi_step",
    eps_start: Optional[float] = None,
    iters: int = 12,
    max_doublings: int = 12,
    **corruption_kwargs,
) -> float:
    """Smallest eps at which ``metric(model)`` falls by at least ``drop`` under the corruption.

    The corruption is computed on the objective's data; ``metric`` is evaluated (in eval mode) on
    whatever data it closes over, e.g. held-out accuracy. For ``"random"`` the metric is averaged
    over the trials. The search doubles eps from ``eps_start`` (default: the budget's eps) until
    the drop is reached (at most ``max_doublings`` times, else ``inf``), then bisects ``iters``
    times between the last eps without the drop and the first with it; it assumes the drop grows
    with eps and returns the upper end of the final bracket. A metric that returns NaN raises
    ValueError (no drop can be measured from it), and so do ``max_doublings`` that would double
    eps past the largest float.
    """
    check_objective(objective)
    check_budget(budget)
    check_count("iters", iters)
    check_count("max_doublings", max_doublings)
    if not callable(metric):
        raise TypeError(f"metric must be callable as metric(model) -> float, got {type(metric).__name__}")
    check_real("drop", drop, positive=True)
    start = budget.eps if eps_start is None else check_real("eps_start", eps_start, positive=True)
    hi, lo = start or 1e-3, 0.0
    try:
        math.ldexp(hi, max_doublings)
    except OverflowError:
        most = math.floor(math.log2(sys.float_info.max) - math.log2(hi))
        raise ValueError(f"max_doublings={max_doublings} doubles eps {hi:g} past the largest float; "
                         f"at most {most} doublings are possible") from None
    make_corruption(corruption, budget, **corruption_kwargs)  # a bad name or option fails before any work
    model = objective.model

    def value(eps: Optional[float]) -> float:
        out = float(metric(model))
        if math.isnan(out):
            where = "the clean model" if eps is None else f"eps = {eps:g}"
            raise ValueError(f"metric returned NaN on {where}: a drop cannot be measured from NaN")
        return out

    def measured(eps: float) -> float:
        with preserved_modes(model, False):
            b = budget.with_eps(eps)
            if corruption == "random":
                rc = RandomCorruption(b, **corruption_kwargs)
                values = []
                for delta in rc.samples(objective):
                    with corrupted(model, dict(zip(objective.names, delta))):
                        values.append(value(eps))
                return sum(values) / len(values)
            result = make_corruption(corruption, b, **corruption_kwargs)(objective)
            with corrupted(model, result):
                return value(eps)

    with preserved_modes(model, False):
        base = value(None)
    for _ in progress(range(max_doublings + 1), desc="critical eps: doubling", unit="eps", leave=False):
        if base - measured(hi) >= drop:
            break
        lo, hi = hi, 2 * hi
    else:
        return math.inf
    for _ in progress(range(iters), desc="critical eps: bisection", unit="eps", leave=False):
        mid = 0.5 * (lo + hi)
        if base - measured(mid) >= drop:
            hi = mid
        else:
            lo = mid
    return hi
