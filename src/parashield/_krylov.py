"""Krylov and randomized linear algebra on a symmetric operator given only by ``matvec``: Lanczos
with full reorthogonalization, top/bottom eigenpairs with tolerance-based stopping, stochastic
Lanczos quadrature, and Hutchinson / Hutch++ trace estimates.

Everything works on flat vectors (float64 on the operator's device) and knows nothing about
models, so each algorithm is tested on explicit matrices.
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import torch
from torch import Tensor

from ._progress import progress

MatVec = Callable[[Tensor], Tensor]
#: which eigenvalues: algebraically largest, smallest, or largest in magnitude
WHICH = ("largest", "smallest", "magnitude")


def _orthogonalize(w: Tensor, Q: Tensor) -> Tensor:
    """``w`` orthogonal to the rows of Q: one classical Gram-Schmidt pass, and a second one only
    when the first shrank w below 1/sqrt(2) of its norm (the criterion of Daniel, Gragg, Kaufman
    & Stewart 1976; twice is enough)."""
    before = torch.linalg.vector_norm(w)
    w = w.addmv(Q.T, Q @ w, alpha=-1)
    if float(torch.linalg.vector_norm(w)) < math.sqrt(0.5) * float(before):
        w.addmv_(Q.T, Q @ w, alpha=-1)  # in place: no new parameter-sized buffer per step
    return w


def tridiagonal(alphas: list[Tensor], betas: list[Tensor]) -> Tensor:
    """The symmetric tridiagonal matrix with diagonal ``alphas`` and off-diagonal ``betas``."""
    T = torch.diag(torch.stack(alphas))
    if len(alphas) > 1:
        off = torch.stack(betas[: len(alphas) - 1])
        T = T + torch.diag(off, 1) + torch.diag(off, -1)
    return T


def lanczos(
    matvec: MatVec,
    start: Tensor,
    iters: int,
    generator: Optional[torch.Generator] = None,
    stop: Optional[Callable[[Tensor, float], bool]] = None,
) -> tuple[Tensor, Tensor]:
    """Lanczos with full reorthogonalization. Returns the tridiagonal T (m x m) and the basis Q
    (m x n), m <= ``iters``.

    ``stop(T, beta)``, called after each step with the current T and the norm of the next
    residual, ends the iteration when it returns True. On an invariant subspace the iteration
    stops (exact for the start's components) or, when a ``generator`` is given, goes on from a
    random vector orthogonal to the basis with a zero coupling (T block diagonal), so that
    ``iters >= n`` always spans the whole space (eigenvectors the start is orthogonal to).
    """
    from ._checks import check_memory  # noqa: PLC0415 (the checks import the objective; keep this module light)

    n = start.numel()
    m_max = min(iters, n)
    # the basis and a product with it: two (m, n) matrices
    check_memory(2 * start.element_size() * m_max * n, f"{m_max} Lanczos vectors of {n} parameters (iters={iters})",
                 start.device)
    # the basis in the rows of one preallocated matrix: its first j+1 rows are a view, not a copy
    basis = start.new_empty(m_max, n)
    basis[0] = start / torch.linalg.vector_norm(start)
    alphas: list[Tensor] = []
    betas: list[Tensor] = []
    for j in progress(range(m_max), desc="Lanczos", unit="hvp", leave=False):
        w = matvec(basis[j])
        alpha = torch.dot(w, basis[j])
        alphas.append(alpha)
        # the three-term recurrence first, then full reorthogonalization of what rounding left
        w = w.addcmul(basis[j], alpha, value=-1)  # w is the operator's; it may keep a reference
        if j > 0:
            w.addcmul_(basis[j - 1], betas[j - 1], value=-1)
        Q = basis[: j + 1]
        w = _orthogonalize(w, Q)
        beta = torch.linalg.vector_norm(w)
        if j == m_max - 1 or (stop is not None and stop(tridiagonal(alphas, betas), float(beta))):
            break
        if beta <= 1e-10 * max(1.0, abs(float(alpha))):
            if generator is None:
                break
            w = torch.randn(n, generator=generator, dtype=torch.float64).to(device=start.device, dtype=start.dtype)
            w = _orthogonalize(w, Q)
            nw = torch.linalg.vector_norm(w)
            if float(nw) <= 1e-8:
                break
            betas.append(torch.zeros_like(beta))
            basis[j + 1] = w / nw
            continue
        betas.append(beta)
        torch.div(w, beta, out=basis[j + 1])
    m = len(alphas)
    return tridiagonal(alphas, betas), basis[:m] if m == m_max else basis[:m].clone()  # frees the unused rows


def _pick(values: Tensor, k: int, which: str) -> Tensor:
    """Indices of the k wanted values, in the order they are reported."""
    if which == "largest":
        return torch.argsort(values, descending=True)[:k]
    if which == "smallest":
        return torch.argsort(values)[:k]
    return torch.argsort(values.abs(), descending=True)[:k]


#: what ``tol`` bounds in :func:`eigenpairs`: the Ritz pair's residual, or the Ritz value's error
BOUNDS = ("residual", "value")


def eigenpairs(
    matvec: MatVec, start: Tensor, k: int, which: str = "largest", tol: float = 1e-6, max_iters: int = 200,
    generator: Optional[torch.Generator] = None, bound: str = "residual",
) -> tuple[Tensor, Tensor, int]:
    """The k wanted eigenpairs (values (k,), vectors (n, k)) and the number of matvecs.

    Each wanted Ritz pair (theta, y) has residual ``r = ||A y - theta y|| = beta |s_m|``. With
    ``bound="residual"`` the iteration stops when every ``r <= tol * max|theta|``: the pair is
    then accurate (the eigenvalue error is at most r, the vector's angle about r / gap). With
    ``bound="value"`` it stops when every ``min(r, r^2 / gap) <= tol * max|theta|``, ``gap`` the
    distance from theta to the nearest other Ritz value: the eigenvalue error bound of Kato and
    Temple (Parlett, *The Symmetric Eigenvalue Problem*, 11.7), which for the values alone stops
    several products earlier (the value converges twice as fast as the vector). At least
    ``min(n, 2k + 4)`` steps are taken, so that a start nearly orthogonal to a wanted eigenvector
    does not stop on a wrong one.
    """
    if bound not in BOUNDS:
        raise ValueError(f"bound must be one of {BOUNDS}, got {bound!r}")
    n = start.numel()
    least = min(n, 2 * k + 4)

    def converged(T: Tensor, beta: float) -> bool:
        m = T.shape[0]
        if m < least:
            return False
        theta, S = torch.linalg.eigh(T.cpu())
        idx = _pick(theta, k, which)
        scale = max(float(theta.abs().max()), 1e-300)
        r = beta * S[-1, idx].abs()
        if bound == "value" and m > 1:
            others = (theta[idx, None] - theta[None, :]).abs()
            others[torch.arange(k), idx] = math.inf  # a value's distance to itself
            r = torch.minimum(r, r * r / others.min(1).values)
        return bool((r <= tol * scale).all())

    T, Q = lanczos(matvec, start, max_iters, generator=generator, stop=converged)
    theta, S = torch.linalg.eigh(T.cpu())
    idx = _pick(theta, k, which)
    vectors = Q.T @ S[:, idx].to(Q)
    return theta[idx], vectors, T.shape[0]


def quadrature(T: Tensor) -> tuple[Tensor, Tensor]:
    """Gauss quadrature of the spectral measure ``v^T f(A) v`` from Lanczos' T on a unit start v:
    nodes (the Ritz values) and weights (squared first components of T's eigenvectors)."""
    theta, S = torch.linalg.eigh(T.cpu())
    return theta, S[0] ** 2


def gaussian_start(n: int, seed: int, device: torch.device) -> tuple[Tensor, torch.Generator]:
    """A Gaussian start vector for Lanczos (float64, on ``device``) drawn from a CPU generator
    seeded with ``seed``, and that generator, to draw any restart vectors after it (one stream
    per seed, the same on every device). Its direction is uniform on the sphere, so its overlap
    with the top eigenvector has the same law for every seed and every spectrum."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(n, generator=generator, dtype=torch.float64).to(device), generator


def rademacher(n: int, generator: torch.Generator, device: torch.device, count: Optional[int] = None) -> Tensor:
    """Random +-1 vector (or (n, count) matrix), float64, drawn on the CPU generator."""
    shape = (n,) if count is None else (n, count)
    return (torch.randint(0, 2, shape, generator=generator).double() * 2 - 1).to(device)


def hutchinson(matvec: MatVec, n: int, samples: int, generator: torch.Generator, device: torch.device
               ) -> tuple[float, float]:
    """Hutchinson's ``mean(v^T A v)`` over Rademacher v: the trace estimate and its standard error
    (sample standard deviation over sqrt(samples); inf with one sample)."""
    values = []
    for _ in range(samples):
        v = rademacher(n, generator, device)
        values.append(float(v @ matvec(v)))
    return _mean_stderr(values)


def _mean_stderr(values: list[float]) -> tuple[float, float]:
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, math.inf
    var = sum((x - mean) ** 2 for x in values) / (len(values) - 1)
    return mean, math.sqrt(var / len(values))


def hutchpp(matvec: MatVec, n: int, matvecs: int, generator: torch.Generator, device: torch.device
            ) -> tuple[float, float]:
    """Hutch++ (Meyer, Musco, Musco & Woodruff, 2021) with ``matvecs`` products (>= 3): a third
    sketch A S whose range Q takes the top of the spectrum exactly (``tr(Q^T A Q)``), a third for
    ``A Q``, and a third for Hutchinson on the deflated rest ``(I - QQ^T) A (I - QQ^T)``. Returns
    the estimate and the standard error of its Hutchinson part (the deflated part is exact)."""
    third = matvecs // 3
    if third < 1:
        raise ValueError(f"matvecs must be at least 3 for Hutch++ (three sketches), got {matvecs}")
    S = rademacher(n, generator, device, third)
    AS = torch.stack([matvec(S[:, i]) for i in range(third)], 1)
    Q, _ = torch.linalg.qr(AS)
    top = sum(float(Q[:, i] @ matvec(Q[:, i])) for i in range(Q.shape[1]))
    values = []
    for _ in range(matvecs - 2 * third):
        g = rademacher(n, generator, device)
        g = g - Q @ (Q.T @ g)
        values.append(float(g @ matvec(g)))
    rest, stderr = _mean_stderr(values)
    return top + rest, stderr
