"""Budgets: the sets S of allowed parameter corruptions.

``S = {a : ||a||_p <= eps, ||a||_0 <= n}`` over all selected tensors seen as one vector, with
p in {1, 2, inf} and optional n-sparsity. Scaled variants make eps scale-invariant:

* ``scale="layer"``: a product of balls, ``||a_l||_p <= eps * ||w_l||_p`` per tensor l;
* ``scale="element"``: ``||a / (|w| + eta)||_p <= eps`` (the adaptive-SAM geometry).

A budget works on lists of tensors (one per selected parameter) with ``torch._foreach_*`` ops, so
no flat copy of the model is made except where the maths needs one (L1, top-n, and the
element-scaled projection).
Every method takes the current parameter values ``params`` because the scaled variants depend on
them. The in-place forms (``steepest_``, ``project_``) are the core; the plain forms copy first.

The formulas (budgets, steepest ascent, projections, sampling) and which projections are exact:
docs/method.md.
"""

from __future__ import annotations

import math
from collections import abc
from dataclasses import dataclass, replace
from typing import Callable, Iterator, Optional, Sequence, Union

import torch
from torch import Tensor

Tensors = list[Tensor]

_NORMS = {"l1": 1.0, "1": 1.0, "l2": 2.0, "2": 2.0, "linf": math.inf, "inf": math.inf}
_SCALES = (None, "layer", "element")


def _canonical_norm(norm: Union[str, int, float]) -> str:
    key = str(norm).lower().replace("_", "").replace("ℓ", "l")
    if key in ("1.0", "2.0"):
        key = key[0]
    if key not in _NORMS:
        raise ValueError(f"norm must be one of 'l1', 'l2', 'linf' (or 1, 2, inf); got {norm!r}")
    return {1.0: "l1", 2.0: "l2", math.inf: "linf"}[_NORMS[key]]


def _check_real(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite non-negative number, got {value!r}")
    return value


def _check_aligned(tensors: Sequence[Tensor], params: Sequence[Tensor], name: str) -> None:
    """One tensor per parameter, at least one: a shorter list would silently leave tensors out."""
    for name_, ts in ((name, tensors), ("params", params)):
        if not isinstance(ts, abc.Sequence) or not all(isinstance(t, Tensor) for t in ts):
            raise TypeError(f"{name_} must be a list of tensors, one per parameter, got {type(ts).__name__}"
                            + ("" if not isinstance(ts, abc.Sequence) else " holding non-tensors"))
    if len(params) == 0:
        raise ValueError("params is empty: a budget needs the parameters (one tensor at least) it is relative to")
    if len(tensors) != len(params):
        raise ValueError(f"{name} has {len(tensors)} tensors, params has {len(params)}: give one per parameter")


def _foreach_norm(ts: Sequence[Tensor], p: float) -> list[Tensor]:
    """Per-tensor norms; float16/bfloat16 are reduced in float32 (a sum of squares of finite
    half values easily overflows)."""
    ts = list(ts)
    if any(t.dtype in (torch.float16, torch.bfloat16) for t in ts):
        return [torch.linalg.vector_norm(t, p, dtype=torch.float32) for t in ts]
    return list(torch._foreach_norm(ts, p))


def _global_norm(ts: Sequence[Tensor], p: float) -> Tensor:
    """Norm of the concatenation of ``ts`` as a 0-dim tensor (no host sync)."""
    norms = torch.stack(_foreach_norm(ts, p))
    if p == math.inf:
        return norms.max()
    if p == 1.0:
        return norms.sum()
    return torch.linalg.vector_norm(norms)


def _stacked_norms(ts: Sequence[Tensor], p: float) -> Tensor:
    """Per-tensor norms as one (L,) tensor, so per-layer factors cost a few kernels, not L."""
    norms = _foreach_norm(ts, p)
    if any(n.dtype != norms[0].dtype for n in norms):
        norms = [n.float() for n in norms]
    return torch.stack(norms)


def _safe_ratio(num: Union[Tensor, float], den: Tensor) -> Tensor:
    """``num / den`` where ``den > 0``, else 0: a zero gradient gives a zero corruption."""
    return torch.where(den > 0, num / den, 0.0)


def _shrink_factor(radius: Union[Tensor, float], norm: Tensor) -> Tensor:
    """``min(1, radius / norm)``: the factor that brings a vector of this norm into the ball."""
    return torch.where(norm > radius, radius / norm, 1.0)


def _flat(ts: Sequence[Tensor]) -> Tensor:
    return torch.cat([t.reshape(-1) for t in ts])


def _unflat_(ts: Sequence[Tensor], flat: Tensor) -> None:
    offset = 0
    for t in ts:
        n = t.numel()
        t.copy_(flat[offset : offset + n].view_as(t))
        offset += n


#: entries per block when scores are computed block by block on the CPU: a block's scores and
#: mask are small reused allocations instead of tensors the size of the parameters (whose page
#: faults cost more there than the arithmetic)
_BLOCK = 1 << 18

Scores = Union[Sequence[Tensor], Callable[[Tensor], Tensor]]


def _blocks(f: Tensor) -> Iterator[tuple[int, Tensor]]:
    step = _BLOCK if f.device.type == "cpu" else max(f.numel(), 1)
    for i in range(0, f.numel(), step):
        yield i, f[i : i + step]


def _sync_free(ts: Sequence[Tensor]) -> bool:
    """Whether the top-n selection of ``ts`` takes the path without host syncs (accelerators)."""
    return ts[0].device.type != "cpu"


def _top_n_indices(ts: Sequence[Tensor], n: int, score: Optional[Callable[[Tensor], Tensor]] = None) -> Optional[list[Tensor]]:
    """Flat (row-major) indices, one sorted tensor per entry of ``ts``, of the n largest scores
    over all of them, ties broken by position (tensor by tensor); None when n covers everything.
    ``score`` maps values (any block of a flattened tensor) to their scores; None: ``ts`` are
    the scores.

    Selection by threshold, not by sorting: on more than a million entries the n-th largest
    value comes from ``kthvalue`` on the candidates above a threshold estimated on a strided
    sample (about 2n of them), with an exact fallback when the sample underestimates. Full-size
    work: one pass that scores each block and compacts the candidates above the threshold; the
    rest runs on the ~2n candidates. A NaN score ranks above every number.
    """
    flats = [t.reshape(-1) for t in ts]
    k = sum(f.numel() for f in flats)
    if n >= k:
        return None
    # NaN scores rank above everything (a NaN corruption must surface, not vanish): candidates
    # are the entries *not below* a threshold, and NaN counts as +inf wherever values are ranked
    scored = score or (lambda v: v)
    ranked = lambda v: torch.nan_to_num(scored(v), nan=math.inf)  # noqa: E731

    def above(low: Tensor) -> tuple[list[Tensor], Tensor]:
        idx = []
        for f in flats:
            parts = [torch.nonzero(~(scored(block) < low)).squeeze(1) + i for i, block in _blocks(f)]
            idx.append(parts[0] if len(parts) == 1 else torch.cat(parts))
        return idx, torch.cat([ranked(f[i]) for f, i in zip(flats, idx)])

    idx = None
    if k > 1_000_000:
        stride = k // 100_000
        sample = torch.cat([ranked(f[::stride]) for f in flats])
        m = sample.numel()
        r = min(m, int(2 * n * m / k) + 16)  # rank in the sample that leaves ~2n candidates above
        idx, values = above(torch.kthvalue(sample, m - r + 1).values)
        if values.numel() < n:
            idx = None
    if idx is None:
        idx, values = above(torch.kthvalue(torch.cat([ranked(f) for f in flats]), k - n + 1).values)
    thr = torch.kthvalue(values, values.numel() - n + 1).values
    keep = values >= thr
    if values.numel() > n:  # drop the candidates below thr and, where values repeat at thr, the last ties
        ties = values == thr
        keep = (values > thr) | (ties & (torch.cumsum(ties, 0) <= n - torch.count_nonzero(values > thr)))
    return [i[kp] for i, kp in zip(idx, keep.split([len(i) for i in idx]))]


def _keep_top_n_static_(ts: Sequence[Tensor], scores: Scores, n: int,
                        transform: Optional[Callable[[Tensor], Tensor]]) -> None:
    """``_keep_top_n_`` with every size known before its kernels run, so that an accelerator
    never waits for the host: the n-th largest score from ``topk``; the positions of the scores
    above it and of the first ties at it by ``nonzero_static`` (n of each at most, padded with
    an out-of-range sentinel), the ties beyond the n - #above needed masked to the sentinel, and
    the n smallest positions kept: ties broken by position, as ``_top_n_indices`` does, with the
    same result bit for bit. Full-size work: the scores and two masks (~6 bytes an entry for
    float32), then the kept values written back through one flat copy."""
    k = sum(t.numel() for t in ts)
    score = torch.cat([scores(t.reshape(-1)) for t in ts] if callable(scores) else [s.reshape(-1) for s in scores])
    score = torch.nan_to_num_(score, nan=math.inf)  # a NaN ranks above every number
    thr = torch.topk(score, n, sorted=False).values.min()
    above, ties = score > thr, score == thr
    del score
    first_above = torch.nonzero_static(above, size=n, fill_value=k).squeeze(1)
    first_ties = torch.nonzero_static(ties, size=n, fill_value=k).squeeze(1)
    wanted = n - above.sum()
    del above, ties
    first_ties = torch.where(torch.arange(n, device=first_ties.device) < wanted, first_ties, k)
    idx = torch.sort(torch.cat([first_above, first_ties])).values[:n]
    flat = _flat(ts)
    new = flat[idx]
    if transform is not None:
        new = transform(new)
    flat.zero_()
    flat[idx] = new.to(flat.dtype)
    _unflat_(ts, flat)


def _keep_top_n_(ts: Sequence[Tensor], scores: Scores, n: int,
                 transform: Optional[Callable[[Tensor], Tensor]] = None) -> None:
    """Zero, in place, every entry of ``ts`` outside the n largest scores; ``scores`` is one
    tensor per entry of ``ts`` or a function computing the scores of values. ``transform`` maps
    the kept values (all tensors' concatenated, a short vector) to what is written back. On the
    CPU by candidates above a sampled threshold, the scores computed block by block, so that
    nothing the size of the parameters is allocated; on an accelerator without a host sync
    (``_keep_top_n_static_``, which holds the scores as one full-size tensor)."""
    if n < sum(t.numel() for t in ts) and _sync_free(ts):
        _keep_top_n_static_(ts, scores, n, transform)
        return
    kept = _top_n_indices(ts, n, scores) if callable(scores) else _top_n_indices(scores, n)
    if kept is None:
        if transform is not None:
            _unflat_(ts, transform(_flat(ts)))
        return
    values = [t.reshape(-1)[i] for t, i in zip(ts, kept)]
    new = torch.cat(values)
    if transform is not None:
        new = transform(new)
    for t, i, v in zip(ts, kept, new.split([len(i) for i in kept])):
        t.zero_()
        v = v.to(t.dtype)  # the concatenation of mixed dtypes is in the widest one
        if t.is_contiguous():
            t.view(-1)[i] = v
        else:
            t[torch.unravel_index(i, t.shape)] = v


def _project_l1_weighted(x: Tensor, r: Union[float, Tensor], c: Optional[Tensor]) -> Tensor:
    """Euclidean projection of flat ``x`` onto ``{a : sum c_i |a_i| <= r}`` (c = 1 when None).

    KKT: ``a_i = sign(x_i) (|x_i| - lam c_i)_+``; lam solves a piecewise-linear equation whose
    breakpoints ``|x_i| / c_i`` are sorted once (Duchi et al. 2008, weighted form).
    """
    ax = x.abs()
    c = torch.ones_like(ax) if c is None else c
    total = (c * ax).sum()
    r = torch.as_tensor(r, dtype=x.dtype, device=x.device)
    breaks = ax / c
    order = torch.argsort(breaks, descending=True)
    b_sorted, c_sorted, x_sorted = breaks[order], c[order], ax[order]
    a_cum = torch.cumsum(c_sorted * x_sorted, 0)
    b_cum = torch.cumsum(c_sorted * c_sorted, 0)
    lam_m = (a_cum - r) / b_cum
    valid = b_sorted > lam_m
    # the last valid breakpoint (0 when none), without a host sync
    m = torch.where(valid, torch.arange(len(valid), device=x.device), 0).max()
    lam = lam_m.gather(0, m.reshape(1)).squeeze(0).clamp_min(0)  # indexing by a tensor would sync
    out = torch.sign(x) * (ax - lam * c).clamp_min(0)
    # |x_i| - lam c_i cancels when r << |x|; a final rescale guarantees feasibility.
    used = (c * out.abs()).sum()
    out = out * _shrink_factor(r, used)
    return torch.where(total <= r, x, out)


def _project_l2_weighted(x: Tensor, r: Union[float, Tensor], s: Tensor, iters: int = 80) -> Tensor:
    """Euclidean projection of flat ``x`` onto the ellipsoid ``{a : ||a / s||_2 <= r}``.

    KKT: ``a_i = x_i s_i^2 / (s_i^2 + lam)``; lam >= 0 found by bisection in float64 on the
    monotone constraint residual, then a final rescale guarantees feasibility.
    """
    xd, sd = x.double(), s.double()
    s2 = sd * sd
    r = torch.as_tensor(r, dtype=torch.float64, device=x.device)
    inside = torch.linalg.vector_norm(xd / sd) <= r
    lo = torch.zeros((), dtype=torch.float64, device=x.device)
    hi = torch.linalg.vector_norm(xd * sd) / r.clamp_min(1e-300)
    for _ in range(iters):
        mid = (lo + hi) / 2
        over = torch.linalg.vector_norm(xd * sd / (s2 + mid)) > r
        lo = torch.where(over, mid, lo)
        hi = torch.where(over, hi, mid)
    a = xd * s2 / (s2 + hi)
    a = a * torch.clamp(r / torch.linalg.vector_norm(a / sd).clamp_min(1e-300), max=1.0)
    return torch.where(inside, xd, a).to(x.dtype)


class Geometry(abc.Sequence):
    """The parameter values ``w`` a budget is relative to, with the scales derived from them
    (element scale ``|w| + eta``, layer norms ``||w_l||_p``) computed once and cached. Pass one to
    the budget's methods in place of a parameter list when calling them repeatedly at the same w
    (each step of an attack), to save the passes over memory that recomputing them costs. Only
    valid while the values of w do not change."""

    def __init__(self, params: Sequence[Tensor]) -> None:
        self.params = [w.detach() for w in params]
        self._scale: dict[float, Tensors] = {}
        self._norms: dict[float, Tensor] = {}

    def refresh(self) -> None:
        """Forget the cached scales: the values of w were changed in place."""
        self._scale.clear()
        self._norms.clear()

    def __getitem__(self, i):  # type: ignore[override]
        return self.params[i]

    def __len__(self) -> int:
        return len(self.params)

    def element_scale(self, eta: float) -> Tensors:
        if eta not in self._scale:
            s = torch._foreach_abs(self.params)
            torch._foreach_add_(s, eta)
            self._scale[eta] = s
        return self._scale[eta]

    def layer_norms(self, p: float) -> Tensor:
        """``||w_l||_p`` of every tensor, stacked: shape (L,)."""
        if p not in self._norms:
            self._norms[p] = _stacked_norms(self.params, p)
        return self._norms[p]


@dataclass(frozen=True)
class Budget:
    """A corruption budget ``{a : ||a||_p <= eps, ||a||_0 <= sparsity}`` (see module docstring).

    Args:
        norm: ``"l1"``, ``"l2"`` or ``"linf"`` (also 1, 2, ``float("inf")``).
        eps: radius, finite and >= 0 (relative to ``||w_l||`` or ``|w| + eta`` when scaled).
        sparsity: at most this many coordinates change, across all selected tensors; ``None``
            for dense corruption. Not combinable with ``scale="layer"``.
        scale: ``None``, ``"layer"`` or ``"element"``.
        eta: the additive constant of the element-relative scale ``|w| + eta``.
    """

    norm: str = "l2"
    eps: float = 0.05
    sparsity: Optional[int] = None
    scale: Optional[str] = None
    eta: float = 0.01

    def __post_init__(self) -> None:
        object.__setattr__(self, "norm", _canonical_norm(self.norm))
        object.__setattr__(self, "eps", _check_real("eps", self.eps))
        object.__setattr__(self, "eta", _check_real("eta", self.eta))
        if self.sparsity is not None:
            if isinstance(self.sparsity, bool) or not isinstance(self.sparsity, int):
                raise TypeError(f"sparsity must be a positive int or None, got {self.sparsity!r}")
            if self.sparsity < 1:
                raise ValueError(f"sparsity must be a positive int or None, got {self.sparsity}")
        if self.scale not in _SCALES:
            raise ValueError(f"scale must be None, 'layer' or 'element'; got {self.scale!r}")
        if self.scale == "layer" and self.sparsity is not None:
            raise ValueError(
                "sparsity cannot be combined with scale='layer' (per-layer balls have no global "
                "top-n); use scale=None or scale='element'"
            )

    # ------------------------------------------------------------------ geometry
    @property
    def p(self) -> float:
        return _NORMS[self.norm]

    @property
    def q(self) -> float:
        """Dual exponent: 1/p + 1/q = 1."""
        return {1.0: math.inf, 2.0: 2.0, math.inf: 1.0}[self.p]

    def with_eps(self, eps: float) -> "Budget":
        return replace(self, eps=eps)

    def _element_scale(self, params: Sequence[Tensor]) -> Tensors:
        geometry = params if isinstance(params, Geometry) else Geometry(params)
        return geometry.element_scale(self.eta)

    def _layer_radii(self, params: Sequence[Tensor], radius: float) -> Tensor:
        """Per-tensor radii ``radius * ||w_l||_p``, shape (L,)."""
        geometry = params if isinstance(params, Geometry) else Geometry(params)
        return geometry.layer_norms(self.p) * radius

    # ------------------------------------------------------------------ steepest ascent
    def steepest_(self, grads: Tensors, params: Sequence[Tensor], radius: Optional[float] = None) -> Tensors:
        """Overwrite ``grads`` with ``argmax_{a in S(radius)} <g, a>`` (radius defaults to eps).

        With q the dual exponent and h = g kept on its n largest |g_i|:
        ``a = r sign(h)|h|^(q-1) / ||h||_q^(q-1)``; a zero gradient gives a zero corruption.
        """
        _check_aligned(grads, params, "grads")
        r = self.eps if radius is None else radius
        s = self._element_scale(params) if self.scale == "element" else None
        if s is not None:
            torch._foreach_mul_(grads, s)
        if self.sparsity is not None:
            _keep_top_n_(grads, torch.abs, self.sparsity)
        if self.scale == "layer":
            radii = self._layer_radii(params, r)
            if self.norm == "linf":
                torch._foreach_sign_(grads)
                torch._foreach_mul_(grads, list(radii.unbind()))
            elif self.norm == "l2":
                torch._foreach_mul_(grads, list(_safe_ratio(radii, _stacked_norms(grads, 2.0)).unbind()))
            else:
                for g, rl in zip(grads, radii.unbind()):
                    # Work on a flat copy and write back: ``reshape`` of a non-contiguous
                    # gradient is a copy, so editing it in place would be lost.
                    flat = g.reshape(-1)
                    i = flat.abs().argmax()
                    out = torch.zeros_like(flat)
                    out[i] = flat[i].sign() * rl
                    g.copy_(out.view(g.shape))
        elif self.norm == "linf":
            torch._foreach_sign_(grads)
            torch._foreach_mul_(grads, r)
        elif self.norm == "l2":
            torch._foreach_mul_(grads, _safe_ratio(r, _global_norm(grads, 2.0)))
        else:
            flat = _flat(grads)
            i = flat.abs().argmax()
            val = flat[i].sign() * r
            flat.zero_()
            flat[i] = val
            _unflat_(grads, flat)
        if s is not None:
            torch._foreach_mul_(grads, s)
        return grads

    def steepest(self, grads: Sequence[Tensor], params: Sequence[Tensor], radius: Optional[float] = None) -> Tensors:
        if radius is not None:
            _check_real("radius", radius)
        _check_aligned(grads, params, "grads")
        return self.steepest_([g.detach().clone() for g in grads], params, radius)

    def ascent_value(self, grads: Sequence[Tensor], params: Sequence[Tensor]) -> Tensor:
        """``max_{a in S} <g, a>``: eps times the dual norm of g in this geometry (0-dim tensor)."""
        d = self.steepest(grads, params)
        return torch.stack([torch.vdot(x.reshape(-1), g.detach().reshape(-1)) for x, g in zip(d, grads)]).sum()

    # ------------------------------------------------------------------ projection
    def project_(self, deltas: Tensors, params: Sequence[Tensor]) -> Tensors:
        """Overwrite ``deltas`` with their Euclidean projection onto S.

        Exact for every norm and scale without sparsity. With sparsity the n coordinates with the
        largest ``|a_i|`` are kept (for L-inf the largest saving ``a_i^2 - (|a_i| - bound_i)_+^2``)
        and then projected onto the ball: exact for L2 and L-inf, a heuristic for L1 and for
        element-scaled L2.
        """
        _check_aligned(deltas, params, "deltas")
        r = self.eps
        s = self._element_scale(params) if self.scale == "element" else None
        if self.scale == "layer":
            radii = self._layer_radii(params, r)
            if self.norm == "linf":
                for a, rl in zip(deltas, radii.unbind()):
                    a.clamp_(-rl, rl)
            elif self.norm == "l2":
                factors = _shrink_factor(radii, _stacked_norms(deltas, 2.0))
                torch._foreach_mul_(deltas, list(factors.unbind()))
            else:
                for a, rl in zip(deltas, radii.unbind()):
                    a.copy_(_project_l1_weighted(a.reshape(-1), rl, None).view_as(a))
            return deltas
        if self.sparsity is None and s is None and self.norm != "l1":
            if self.norm == "linf":
                torch._foreach_clamp_min_(deltas, -r)
                torch._foreach_clamp_max_(deltas, r)
            else:
                torch._foreach_mul_(deltas, _shrink_factor(r, _global_norm(deltas, 2.0)))
            return deltas
        if s is None and self.norm != "l1":  # n-sparse L2 / L-inf ball: in place, no flat copy
            if self.norm == "linf":  # saving of keeping a_i: a_i^2 - (|a_i| - r)_+^2
                _keep_top_n_(deltas, lambda v: v * v - (v.abs() - r).clamp_min(0).square(), self.sparsity,
                             lambda v: v.clamp(-r, r))
            else:  # the norm of the kept values: no pass over the full tensors
                _keep_top_n_(deltas, torch.abs, self.sparsity,
                             lambda v: v * _shrink_factor(r, torch.linalg.vector_norm(v)))
            return deltas
        flat = _flat(deltas)
        sflat = _flat(s) if s is not None else None
        if sflat is not None and self.eta == 0:
            # |w| + 0 = 0: that coordinate may not move; a unit weight keeps the solvers finite.
            frozen = sflat == 0
            flat = torch.where(frozen, 0.0, flat)
            sflat = torch.where(frozen, 1.0, sflat)
        if self.sparsity is not None:
            if self.norm == "linf":
                bound = r if sflat is None else r * sflat
                score = flat.square() - (flat.abs() - bound).clamp_min(0).square()
            else:
                score = flat.abs()
            _keep_top_n_([flat], [score], self.sparsity)
        if self.norm == "linf":
            bound = torch.full_like(flat, r) if sflat is None else r * sflat
            flat = torch.maximum(torch.minimum(flat, bound), -bound)
        elif self.norm == "l2":
            if sflat is None:
                flat.mul_(_shrink_factor(r, torch.linalg.vector_norm(flat)))
            else:
                flat = _project_l2_weighted(flat, r, sflat)
        else:
            flat = _project_l1_weighted(flat, r, None if sflat is None else 1.0 / sflat)
        _unflat_(deltas, flat)
        return deltas

    def project(self, deltas: Sequence[Tensor], params: Sequence[Tensor]) -> Tensors:
        _check_aligned(deltas, params, "deltas")
        return self.project_([a.detach().clone() for a in deltas], params)

    # ------------------------------------------------------------------ measuring and sampling
    def measure(self, deltas: Sequence[Tensor], params: Sequence[Tensor]) -> float:
        """The budget's size of ``deltas``: ``a in S`` iff ``measure(a) <= eps`` (and sparsity)."""
        _check_aligned(deltas, params, "deltas")
        deltas = [a.detach() for a in deltas]
        if self.scale == "layer":
            ratios = [
                (n / wn) if wn > 0 else (0.0 if n == 0 else math.inf)
                for n, wn in zip(_foreach_norm(deltas, self.p), _foreach_norm([w.detach() for w in params], self.p))
            ]
            return float(max(float(x) for x in ratios))
        if self.scale == "element":  # a zero scale (eta = 0, w = 0) admits only a = 0 there
            deltas = [torch.where(sc > 0, a / sc.clamp_min(torch.finfo(sc.dtype).tiny),
                                  torch.where(a == 0, 0.0, math.inf))
                      for a, sc in zip(deltas, self._element_scale(params))]
        return float(_global_norm(deltas, self.p))

    def contains(self, deltas: Sequence[Tensor], params: Sequence[Tensor], rtol: float = 1e-5) -> bool:
        """Whether ``deltas`` lies in S up to a relative tolerance ``rtol``."""
        _check_aligned(deltas, params, "deltas")
        if self.sparsity is not None and sum(int(a.count_nonzero()) for a in deltas) > self.sparsity:
            return False
        return self.measure(deltas, params) <= self.eps * (1 + rtol) + 1e-12

    def sample(
        self, params: Sequence[Tensor], generator: Union[torch.Generator, int, None] = None
    ) -> Tensors:
        """A random corruption on the boundary of S: uniform direction on the p-sphere, on a
        uniformly random support of size n when sparse (each layer on its own sphere when
        ``scale="layer"``). Drawn from ``generator`` on its device (CPU by default), so a seed
        gives the same corruption on every device."""
        return [s[0] for s in self.samples(params, generator, 1)]

    def samples(
        self, params: Sequence[Tensor], generator: Union[torch.Generator, int, None] = None, count: int = 1
    ) -> Tensors:
        """``count`` independent corruptions as :meth:`sample` draws them, stacked: one tensor of
        shape ``(count, *w.shape)`` per parameter. Row i is the i-th of ``count`` successive
        ``sample`` draws; one copy moves all rows to the parameters' device and the scaling runs
        once for all of them, so many random trials cost a few kernels beyond the generator's."""
        _check_aligned(params, params, "params")
        if isinstance(count, bool) or not isinstance(count, int) or count < 1:
            raise ValueError(f"count must be an int >= 1, got {count!r}")
        if not (generator is None or isinstance(generator, (torch.Generator, int)) and not isinstance(generator, bool)):
            raise TypeError(f"generator must be None, a seed (int) or a torch.Generator, got {type(generator).__name__}")
        params = params if isinstance(params, Geometry) else Geometry(params)
        device, dtype = params[0].device, params[0].dtype
        if isinstance(generator, int):
            generator = torch.Generator(device="cpu").manual_seed(generator)
        gen_device = generator.device if generator is not None else torch.device("cpu")
        k = sum(w.numel() for w in params)
        m = k if self.sparsity is None else min(self.sparsity, k)
        direction = self._unit_directions(count, m, k, generator, gen_device)
        uniform = all(w.dtype == dtype for w in params)
        direction = direction.to(device=device, dtype=dtype if uniform else None)  # one copy when it can be
        out, offset = [], 0
        for w in params:
            out.append(direction[:, offset : offset + w.numel()].reshape(count, *w.shape).to(w.dtype))
            offset += w.numel()
        if self.scale == "layer":
            norms = torch.stack([torch.linalg.vector_norm(o.reshape(count, -1), self.p, dim=1) for o in out], 1)
            factors = _safe_ratio(self._layer_radii(params, self.eps), norms)  # (count, L)
            for o, f in zip(out, factors.unbind(1)):
                o.mul_(f.view(count, *([1] * (o.dim() - 1))))
            return out
        torch._foreach_mul_(out, self.eps)
        if self.scale == "element":
            torch._foreach_mul_(out, self._element_scale(params))
        return out

    def _unit_directions(self, count: int, m: int, k: int, generator: Optional[torch.Generator],
                         device: torch.device) -> Tensor:
        """``count`` rows of R^k (float64), each uniform on the unit p-sphere of a random support
        of size m (all of R^k when m = k). Row i uses the generator exactly as the i-th of
        successive single draws would, so the trials do not depend on how they are chunked; the
        normalization runs once for all rows, with no host sync."""
        kw = dict(generator=generator, device=device, dtype=torch.float64)
        u = torch.empty(count, m, dtype=torch.float64, device=device)
        signs = torch.empty(count, m if self.norm == "l1" else 1, dtype=torch.long, device=device)
        faces = torch.empty(count, 1, dtype=torch.long, device=device)  # L-inf only
        supports = []
        for i in range(count):
            if self.norm == "l2":
                torch.randn(m, out=u[i], **kw)
            elif self.norm == "l1":
                torch.rand(m, out=u[i], **kw)
                torch.randint(0, 2, (m,), out=signs[i], generator=generator, device=device)
            else:  # L-inf: one of the 2m faces uniformly (equal areas), uniform on that face
                torch.rand(m, out=u[i], **kw)
                torch.randint(0, m, (1,), out=faces[i], generator=generator, device=device)
                torch.randint(0, 2, (1,), out=signs[i], generator=generator, device=device)
            if m < k:
                supports.append(torch.randperm(k, generator=generator, device=device)[:m])
        if self.norm == "l2":
            u /= torch.linalg.vector_norm(u, dim=1, keepdim=True)
        elif self.norm == "l1":
            # |u| ~ Dirichlet(1,...,1) is uniform on the simplex; random signs cover the sphere.
            e = -torch.log(u.clamp_min_(1e-300))
            u = (signs.double() * 2 - 1) * e / e.sum(1, keepdim=True)
        else:
            u = (u * 2 - 1).scatter_(1, faces, signs.double() * 2 - 1)
        if m == k:
            return u
        full = torch.zeros(count, k, dtype=torch.float64, device=device)
        full.scatter_(1, torch.stack(supports), u)
        return full
