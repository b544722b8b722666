"""Curvature of the loss in the selected parameters: top eigenpairs, spectral density (stochastic
Lanczos quadrature) and trace (Hutchinson or Hutch++, with a standard error), of the Hessian or of
its positive semi-definite surrogates for classification:

* ``curvature="hessian"``: the Hessian of the objective's loss (Hessian-vector products);
* ``curvature="ggn"``: the generalized Gauss-Newton ``J^T H_z J`` of the mean cross-entropy,
  ``J`` the Jacobian of the logits and ``H_z = diag(p) - p p^T`` the softmax Hessian per example
  (for cross-entropy also the Fisher information of the model's predictive distribution);
* ``curvature="fisher"``: the empirical Fisher ``mean_n g_n g_n^T`` of the per-example
  cross-entropy gradients ``g_n = J_n^T (p_n - e_{y_n})`` at the data's labels.

The GGN and Fisher need the logits: ``logits_fn(model, batch) -> (logits, labels)``, by default
``(model(x), y)`` for batches ``(x, y)``; the objective's ``loss_fn`` is not used for them. Each
product takes one forward pass and a Jacobian-vector / vector-Jacobian product pair per batch; no
per-example gradient is ever formed. The solvers are in ``_krylov`` and work on flat float64
vectors of the selected parameters.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator, Optional

import torch
from torch import Tensor

from ._checks import check_count, check_objective, check_seed
from ._krylov import BOUNDS, WHICH, eigenpairs, gaussian_start, hutchinson, hutchpp, lanczos, quadrature
from .budget import _flat
from .indicators import _FlatHessian
from .margin import LogitsFn, checked_logits, xy_logits
from .objective import Objective, Probe, _own_memory, batch_size, check_finite, to_device

CURVATURES = ("hessian", "ggn", "fisher")


class _FlatOutputCurvature:
    """``v -> G v`` (GGN) or ``v -> F v`` (empirical Fisher) of the mean cross-entropy, on flat
    float64 vectors, through the Jacobian of the logits."""

    def __init__(self, probe: Probe, logits_fn: LogitsFn, kind: str) -> None:
        self.probe = probe
        self.params = probe.params
        self.sizes = [p.numel() for p in self.params]
        self.logits_fn = logits_fn
        self.kind = kind

    def __call__(self, v: Tensor) -> Tensor:
        obj = self.probe.objective
        x = v.to(self.params[0].dtype)
        parts = [t.view_as(p) for t, p in zip(x.split(self.sizes), self.params)]
        acc, count = None, 0
        with torch.enable_grad():
            for batch in obj.batches():
                batch = to_device(batch, obj.device)
                z, y = checked_logits(self.logits_fn, obj.model, batch)
                u = torch.zeros_like(z, requires_grad=True)  # J^T u is linear in u: its u-gradient is J v
                jt_u = torch.autograd.grad(z, self.params, grad_outputs=u, create_graph=True, allow_unused=True)
                used = [(g, t) for g, t in zip(jt_u, parts) if g is not None]
                jv = torch.autograd.grad([g for g, _ in used], u, grad_outputs=[t for _, t in used])[0]
                p = torch.softmax(z.detach().double(), dim=1)
                jv = jv.detach().double()
                if self.kind == "ggn":  # (diag(p) - p p^T) Jv, row by row
                    out = p * jv - p * (p * jv).sum(1, keepdim=True)
                else:  # (p - e_y) (p - e_y)^T Jv
                    r = p - torch.nn.functional.one_hot(y.long(), p.shape[1]).double()
                    out = r * (r * jv).sum(1, keepdim=True)
                gv = _own_memory(torch.autograd.grad(z, self.params, grad_outputs=out.to(z.dtype),
                                                     allow_unused=True), self.params)
                n = batch_size(batch)
                if acc is None:
                    acc = gv
                else:
                    torch._foreach_add_(acc, gv)
                count += n
        if acc is None:
            raise ValueError("data yielded no batch")
        return _flat(acc).double() / count


@contextmanager
def _operator(objective: Objective, curvature: str, logits_fn: Optional[LogitsFn]) -> Iterator[Any]:
    """The flat curvature operator at w, inside the objective's probe (the model is restored on exit)."""
    if not isinstance(objective, Objective):
        raise TypeError(f"objective must be a parashield.Objective, got {type(objective).__name__}")
    if curvature not in CURVATURES:
        raise ValueError(f"curvature must be one of {CURVATURES}, got {curvature!r}")
    if logits_fn is not None and not callable(logits_fn):
        raise TypeError(f"logits_fn must be callable as logits_fn(model, batch), got {type(logits_fn).__name__}")
    with objective.probe() as pr:
        check_finite(pr.loss(), "loss")
        if curvature == "hessian":
            yield _FlatHessian(pr)
        else:
            yield _FlatOutputCurvature(pr, xy_logits if logits_fn is None else logits_fn, curvature)


def _as_params(objective: Objective, flat: Tensor) -> dict[str, Tensor]:
    parts = flat.split([p.numel() for p in objective.params])
    return {n: t.reshape(p.shape).to(p.dtype).clone() for n, t, p in zip(objective.names, parts, objective.params)}


# ---------------------------------------------------------------------------- eigenpairs
@dataclass(frozen=True)
class Eigenpairs:
    """Top eigenvalues (in the order asked for) and unit eigenvectors as ``{name: tensor}``."""

    values: tuple[float, ...]
    vectors: tuple[dict[str, Tensor], ...]
    curvature: str
    matvecs: int

    def __repr__(self) -> str:
        vals = ", ".join(f"{v:.6g}" for v in self.values)
        return f"Eigenpairs({self.curvature}: [{vals}], {self.matvecs} products)"


def hessian_eigenpairs(
    objective: Objective,
    k: int = 1,
    *,
    which: str = "largest",
    curvature: str = "hessian",
    logits_fn: Optional[LogitsFn] = None,
    tol: float = 1e-6,
    max_iters: int = 200,
    seed: int = 0,
    bound: str = "residual",
) -> Eigenpairs:
    """The k top eigenpairs of the curvature (``which``: ``"largest"`` algebraically,
    ``"smallest"``, or largest in ``"magnitude"``) by Lanczos with full reorthogonalization.

    Stops when every wanted Ritz pair's residual ``r = ||A y - theta y||`` is below
    ``tol * max|theta|`` (``bound="residual"``: accurate values and vectors), or, with
    ``bound="value"``, when every value's error bound ``min(r, r^2 / gap)`` is (``gap`` the
    distance to the nearest other Ritz value; several products fewer, vectors less accurate),
    or after ``max_iters`` products. The start is a Gaussian vector from a generator seeded with
    ``seed`` (see module docstring for ``curvature``/``logits_fn``).
    """
    check_objective(objective)
    k = check_count("k", k)
    max_iters = check_count("max_iters", max_iters)
    if which not in WHICH:
        raise ValueError(f"which must be one of {WHICH}, got {which!r}")
    if isinstance(tol, bool) or not isinstance(tol, (int, float)) or not (0 < tol < 1):
        raise ValueError(f"tol must be a number in (0, 1), got {tol!r}")
    if bound not in BOUNDS:
        raise ValueError(f"bound must be one of {BOUNDS}, got {bound!r}")
    if k > objective.numel:
        raise ValueError(f"k must be at most the number of selected parameters ({objective.numel}), got {k}")
    start, gen = gaussian_start(objective.numel, check_seed(seed), objective.device)
    with _operator(objective, curvature, logits_fn) as op:
        values, vectors, steps = eigenpairs(op, start, k, which, tol, max(max_iters, k), gen, bound)
    return Eigenpairs(tuple(float(v) for v in values), tuple(_as_params(objective, vectors[:, i]) for i in range(k)),
                      curvature, steps)


# ---------------------------------------------------------------------------- density
@dataclass(frozen=True)
class SpectralDensity:
    """Smoothed eigenvalue density ``density`` on ``grid`` (integrates to about 1), from the
    quadrature ``nodes``/``weights`` of each probe (shape (probes, m))."""

    grid: Tensor
    density: Tensor
    nodes: Tensor
    weights: Tensor
    sigma: float
    curvature: str

    def __repr__(self) -> str:
        return (f"SpectralDensity({self.curvature}: {self.nodes.shape[0]} probes x {self.nodes.shape[1]} nodes, "
                f"support [{float(self.nodes.min()):.4g}, {float(self.nodes.max()):.4g}], sigma={self.sigma:.3g})")

    def plot(self, ax: Any = None, log: bool = True) -> Any:
        """Plot the density on a matplotlib axis (a new figure's when None); returns the axis."""
        import matplotlib.pyplot as plt  # optional dependency, imported on use

        if ax is None:
            _, ax = plt.subplots(figsize=(5, 3.5))
        y = self.density.clamp_min(1e-12) if log else self.density
        ax.plot(self.grid.numpy(), y.numpy())
        if log:
            ax.set_yscale("log")
        ax.set_xlabel("eigenvalue")
        ax.set_ylabel("density")
        ax.set_title(f"{self.curvature} spectral density")
        return ax


def hessian_density(
    objective: Objective,
    *,
    probes: int = 4,
    iters: int = 80,
    points: int = 1000,
    sigma: Optional[float] = None,
    curvature: str = "hessian",
    logits_fn: Optional[LogitsFn] = None,
    seed: int = 0,
) -> SpectralDensity:
    """Eigenvalue density by stochastic Lanczos quadrature (Ubaru, Chen & Saad 2017; Ghorbani,
    Krishnan & Xiao 2019): ``probes`` Rademacher starts, ``iters`` Lanczos steps each; each gives
    Gauss nodes and weights of the spectral measure, whose average is smoothed with a Gaussian of
    width ``sigma`` (default 1% of the spectrum's span) on ``points`` grid points."""
    check_objective(objective)
    check_count("probes", probes)
    check_count("iters", iters)
    check_count("points", points)
    if sigma is not None and (isinstance(sigma, bool) or not isinstance(sigma, (int, float)) or not sigma > 0):
        raise ValueError(f"sigma must be a positive number or None, got {sigma!r}")
    gen = torch.Generator().manual_seed(check_seed(seed))
    nodes, weights = [], []
    m = min(iters, objective.numel)
    with _operator(objective, curvature, logits_fn) as op:
        for _ in range(probes):
            v = (torch.randint(0, 2, (objective.numel,), generator=gen).double() * 2 - 1).to(objective.device)
            T, _ = lanczos(op, v, m)
            theta, tau = quadrature(T)
            pad = m - theta.numel()  # an invariant subspace ends Lanczos early: zero-weight nodes
            nodes.append(torch.cat([theta, theta.new_full((pad,), float(theta[0]))]))
            weights.append(torch.cat([tau, tau.new_zeros(pad)]))
    nodes_t, weights_t = torch.stack(nodes), torch.stack(weights)
    lo, hi = float(nodes_t.min()), float(nodes_t.max())
    width = float(sigma) if sigma is not None else max(0.01 * (hi - lo), 1e-12 * max(abs(lo), abs(hi), 1.0))
    grid = torch.linspace(lo - 5 * width, hi + 5 * width, points, dtype=torch.float64)
    kernel = torch.exp(-0.5 * ((grid[:, None] - nodes_t.reshape(1, -1)) / width) ** 2) / (width * math.sqrt(2 * math.pi))
    density = (kernel * weights_t.reshape(1, -1)).sum(1) / probes
    return SpectralDensity(grid, density, nodes_t, weights_t, width, curvature)


# ---------------------------------------------------------------------------- trace
@dataclass(frozen=True)
class TraceEstimate:
    """A stochastic trace estimate with its standard error and the products it used."""

    value: float
    stderr: float
    matvecs: int
    method: str
    curvature: str

    def __repr__(self) -> str:
        return f"TraceEstimate({self.curvature}: {self.value:.6g} +- {self.stderr:.2g}, {self.method}, {self.matvecs} products)"


def hessian_trace_estimate(
    objective: Objective,
    matvecs: int = 100,
    *,
    method: str = "hutchinson",
    curvature: str = "hessian",
    logits_fn: Optional[LogitsFn] = None,
    seed: int = 0,
) -> TraceEstimate:
    """Trace of the curvature from ``matvecs`` products with its standard error:
    ``"hutchinson"`` (mean of ``v^T A v`` over Rademacher v) or ``"hutch++"`` (a third of the
    products find the dominant subspace, whose trace is then exact; Hutchinson on the rest). When
    a few eigenvalues dominate, as in trained networks, Hutch++ reaches the same error with far
    fewer products."""
    check_objective(objective)
    check_count("matvecs", matvecs)
    if method not in ("hutchinson", "hutch++"):
        raise ValueError(f"method must be 'hutchinson' or 'hutch++', got {method!r}")
    gen = torch.Generator().manual_seed(check_seed(seed))
    with _operator(objective, curvature, logits_fn) as op:
        if method == "hutchinson":
            value, stderr = hutchinson(op, objective.numel, matvecs, gen, objective.device)
        else:
            value, stderr = hutchpp(op, objective.numel, matvecs, gen, objective.device)
    return TraceEstimate(value, stderr, matvecs, method, curvature)
