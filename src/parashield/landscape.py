"""Loss landscapes: the loss of an ``Objective`` on lines and planes through the current
parameters w, ``L(w + alpha d)`` and ``L(w + alpha d1 + beta d2)``.

A direction is a list of tensors aligned with ``objective.params``, like a corruption's delta:
a random one, filter-normalized after Li et al. (NeurIPS 2018) so that landscapes of differently
scaled networks compare, or the direction of a corruption (``alpha = 1`` is that corruption).
On the CPU the grid points are evaluated one after another, the parameters moved in place; on
an accelerator in chunks with one batched ``vmap`` pass each (``Probe.stacked_losses``). The
model is restored bit for bit afterwards.

The formulas: docs/method.md, "Loss landscapes"; usage: docs/guide.md.
"""

from __future__ import annotations

import math
import os
import warnings
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence, Union

import torch
from torch import Tensor

from ._checks import check_bool, check_count, check_memory, check_objective, check_seed, check_vectorize
from ._progress import progress
from .budget import Budget
from .corruption import CORRUPTION_KINDS, make_corruption
from .objective import Objective

Tensors = list[Tensor]
DEFAULT_BATCH_SIZE = 16


# ------------------------------------------------------------------------------ directions
def random_direction(objective: Objective, seed: int = 0, filter_normalized: bool = True) -> Tensors:
    """A Gaussian direction, drawn in float64 from a CPU generator seeded with ``seed`` (the same
    direction on every device, whatever the global RNG state) and cast to each parameter.

    With ``filter_normalized`` (Li et al. 2018) every filter of a parameter with two or more
    dimensions (a slice along dim 0: a conv filter, a row of a linear weight) is rescaled to the
    norm of the same filter of w, and parameters with one dimension (biases, norm layers) get a
    zero direction, the usual convention: their scale is not comparable to the weights'.
    """
    check_objective(objective)
    check_seed(seed)
    check_bool("filter_normalized", filter_normalized)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    out = []
    for w in objective.params:
        d = torch.randn(w.shape, generator=gen, dtype=torch.float64)
        if filter_normalized:
            if w.dim() < 2:
                d.zero_()
            else:
                w_norms = torch.linalg.vector_norm(w.detach().double().flatten(1), dim=1).cpu()
                d_norms = torch.linalg.vector_norm(d.flatten(1), dim=1)
                d.mul_((w_norms / d_norms.clamp_min(torch.finfo(d.dtype).tiny)).reshape(-1, *[1] * (d.dim() - 1)))
        out.append(d.to(device=w.device, dtype=w.dtype))
    if filter_normalized and all(w.dim() < 2 for w in objective.params):
        warnings.warn("every selected parameter has one dimension: the filter-normalized direction is zero; "
                      "pass filter_normalized=False")
    return out


def corruption_direction(objective: Objective, kind: str, budget: Budget, **kwargs: Any) -> Tensors:
    """The delta of the corruption ``make_corruption(kind, budget, **kwargs)`` finds on
    ``objective``, in ``objective.params`` order: ``alpha = 1`` is that corruption."""
    check_objective(objective)
    if kind not in CORRUPTION_KINDS:
        raise ValueError(f"kind must be one of {', '.join(map(repr, CORRUPTION_KINDS))}; got {kind!r}")
    result = make_corruption(kind, budget, **kwargs)(objective)
    return [result.delta[n].to(p) for n, p in zip(objective.names, objective.params)]


# ------------------------------------------------------------------------------ evaluation
def _check_direction(objective: Objective, direction: object, name: str) -> Tensors:
    """``direction`` as detached tensors on each parameter's device and dtype, checked."""
    check_objective(objective)
    if not isinstance(direction, Sequence):
        raise TypeError(f"{name} must be a list of tensors aligned with objective.params, got {type(direction).__name__}")
    if len(direction) != len(objective.params):
        raise ValueError(f"{name} has {len(direction)} tensors, the objective has {len(objective.params)} parameters")
    out = []
    for i, (d, p) in enumerate(zip(direction, objective.params)):
        if not isinstance(d, Tensor):
            raise TypeError(f"{name}[{i}] must be a tensor, got {type(d).__name__}")
        if d.shape != p.shape:
            raise ValueError(f"{name}[{i}] has shape {tuple(d.shape)}, parameter {objective.names[i]!r} has {tuple(p.shape)}")
        out.append(d.detach().to(p))
    finite = torch.stack([torch.isfinite(d).all().to(out[0].device) for d in out])
    if not bool(finite.all()):  # one host sync for all tensors; the index only on failure
        raise ValueError(f"{name}[{int((~finite).nonzero()[0])}] has non-finite entries")
    return out


def _check_coords(values: object, name: str) -> Tensor:
    """``values`` as a non-empty 1-D float64 tensor of finite numbers."""
    if isinstance(values, (str, bytes)):
        raise TypeError(f"{name} must be a 1-D sequence of numbers, got {type(values).__name__}")
    try:
        out = torch.as_tensor(values, dtype=torch.float64).cpu()
    except (TypeError, ValueError, RuntimeError) as exc:
        raise TypeError(f"{name} must be a 1-D sequence of numbers: {exc}") from None
    if out.dim() != 1 or len(out) == 0:
        raise ValueError(f"{name} must be a non-empty 1-D sequence of numbers, got shape {tuple(out.shape)}")
    if not bool(torch.isfinite(out).all()):
        raise ValueError(f"{name} must be finite, got {out.tolist()}")
    return out


def _losses_at(objective: Objective, directions: Sequence[Tensors], coords: Tensor,
               batch_size: Optional[int], vectorize: Union[bool, str], desc: str) -> Tensor:
    """Losses at ``w + sum_k coords[i, k] * directions[k]`` for every row i (float64, CPU).

    ``vectorize``: ``True`` evaluates chunks of ``batch_size`` points with ``vmap``; ``False``
    one point at a time, moving the parameters in place (no per-point allocation); ``"auto"``
    batches on accelerators in eval mode (falling back to the loop, with one warning, where the
    model cannot be vmapped) and loops on the CPU, where a batch costs the same arithmetic as
    the loop and its activations, ``batch_size`` times larger, fall out of the cache.
    Non-finite losses become +inf.
    """
    size = DEFAULT_BATCH_SIZE if batch_size is None else check_count("batch_size", batch_size)
    check_vectorize(vectorize)
    if vectorize is False or (vectorize == "auto" and objective.device.type == "cpu"):
        with objective.probe() as pr:
            values = []
            for row in progress(coords.tolist(), desc=desc, unit="point", leave=False):
                pr.set_along(directions, row)
                values.append(pr.loss().cpu().reshape(1))
    else:
        chunk = min(size, len(coords))
        check_memory(8 * chunk * objective.numel, f"a chunk of {chunk} points (batch_size)", objective.device)
        # Per parameter the directions stacked (K, *shape): a chunk of points is one tensordot each.
        stacked = [torch.stack(column) for column in zip(*directions)]

        def chunks():
            for start in progress(range(0, len(coords), size), desc=desc, unit="chunk", leave=False):
                rows = coords[start : start + size]
                yield [torch.tensordot(rows.to(d), d, dims=1) for d in stacked]

        with objective.probe() as pr:
            values = [v.detach().double().cpu() for _, v in pr.stacked_losses_of(chunks(), vectorize, "landscape points")]
    out = torch.cat(values)
    return torch.where(torch.isfinite(out), out, math.inf)


def loss_line(objective: Objective, direction: Sequence[Tensor], alphas: Sequence[float],
              batch_size: Optional[int] = None, vectorize: Union[bool, str] = "auto") -> Tensor:
    """``L(w + alpha * direction)`` for each alpha: shape ``(len(alphas),)``, float64.

    On the CPU (``vectorize="auto"``) the points are evaluated one after another, the parameters
    moved in place; on an accelerator ``batch_size`` at a time (default 16) in one ``vmap`` pass
    each (``vectorize=True`` forces that, ``False`` the loop). A loss that is not finite (a far point where the
    model overflows) is reported as +inf rather than raised.
    """
    d = _check_direction(objective, direction, "direction")
    a = _check_coords(alphas, "alphas")
    return _losses_at(objective, [d], a[:, None], batch_size, vectorize, "loss line")


def loss_surface(objective: Objective, d1: Sequence[Tensor], d2: Sequence[Tensor], alphas: Sequence[float],
                 betas: Sequence[float], batch_size: Optional[int] = None,
                 vectorize: Union[bool, str] = "auto") -> Tensor:
    """``L(w + alpha * d1 + beta * d2)`` on the grid: shape ``(len(alphas), len(betas))``,
    float64; evaluation and non-finite losses as in ``loss_line``."""
    dirs = [_check_direction(objective, d1, "d1"), _check_direction(objective, d2, "d2")]
    a, b = _check_coords(alphas, "alphas"), _check_coords(betas, "betas")
    # the grid's coordinates, losses and their copies: ~48 bytes a point
    check_memory(48 * len(a) * len(b), f"a grid of {len(a)} x {len(b)} points (alphas x betas)", torch.device("cpu"))
    grid = torch.cartesian_prod(a, b)  # row-major: alpha i, beta j is row i * len(b) + j
    return _losses_at(objective, dirs, grid, batch_size, vectorize, "loss surface").reshape(len(a), len(b))


# ------------------------------------------------------------------------------ plots
def _figure():
    """A matplotlib figure that draws with Agg, without pyplot's global state or backend."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise ImportError("the landscape plots need matplotlib: pip install matplotlib") from None
    return Figure(figsize=(5.5, 4.2), layout="constrained")


def plot_line(path: Union[str, os.PathLike], alphas: Sequence[float], losses: Mapping[str, Sequence[float]],
              clean_loss: Optional[float] = None, title: str = "loss along directions through w") -> Path:
    """Write a PNG of loss against alpha, one curve per ``losses`` entry (label -> losses at
    ``alphas``); w is marked at alpha = 0 (at ``clean_loss`` if given). Returns the path."""
    fig = _figure()
    ax = fig.subplots()
    a = _check_coords(alphas, "alphas").numpy()
    for label, values in losses.items():
        ax.plot(a, torch.as_tensor(values, dtype=torch.float64).numpy(), marker=".", label=label)
    ax.axvline(0.0, color="grey", lw=0.8, ls=":")
    if clean_loss is not None:
        ax.plot([0.0], [clean_loss], "k*", ms=10, label="w")
    ax.set(xlabel="alpha", ylabel="loss", title=title)
    ax.legend()
    fig.savefig(path, dpi=110)
    return Path(path)


def plot_surface(path: Union[str, os.PathLike], alphas: Sequence[float], betas: Sequence[float],
                 losses: Union[Tensor, Sequence[Sequence[float]]], labels: tuple[str, str] = ("d1", "d2"),
                 title: str = "loss on a plane through w") -> Path:
    """Write a PNG of filled loss contours over ``(alpha, beta)`` (``losses`` of shape
    ``(len(alphas), len(betas))``, +inf points left blank), with a colorbar and w marked at the
    centre. Returns the path."""
    import numpy as np

    a, b = _check_coords(alphas, "alphas").numpy(), _check_coords(betas, "betas").numpy()
    z = torch.as_tensor(losses, dtype=torch.float64).numpy()
    if z.shape != (len(a), len(b)):
        raise ValueError(f"losses must have shape (len(alphas), len(betas)) = {(len(a), len(b))}, got {z.shape}")
    fig = _figure()
    ax = fig.subplots()
    filled = ax.contourf(a, b, np.ma.masked_invalid(z).T, levels=20, cmap="viridis")
    fig.colorbar(filled, ax=ax, label="loss")
    ax.plot([0.0], [0.0], "w*", ms=12, mec="k", label="w")
    ax.set(xlabel=f"alpha ({labels[0]})", ylabel=f"beta ({labels[1]})", title=title)
    ax.legend(loc="upper right")
    fig.savefig(path, dpi=110)
    return Path(path)
