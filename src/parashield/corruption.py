"""Parameter corruptions: random, gradient (one-step) and multi-step adversarial,
and ``corrupted``, the context manager that applies one and restores the model bit for bit.

The formulas and defaults (the multi-step step size 1.5 eps / K): docs/method.md, "Corruptions".
"""

from __future__ import annotations

import math
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator, Mapping, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from ._checks import (
    check_bool,
    check_budget,
    check_count,
    check_memory,
    check_not_sharded,
    check_objective,
    check_seed,
    check_vectorize,
    step_size_or_default,
)
from ._progress import progress
from .budget import Budget, Geometry
from .objective import NO_EXAMPLE, Objective, Probe, _unstack, batch_size, check_finite, overflow_to_inf
from .selection import resolve_names

Tensors = list[Tensor]


@dataclass(repr=False)
class CorruptionResult:
    """What a corruption found.

    ``delta`` maps parameter names to corruption tensors; ``loss_before``/``loss_after`` are the
    objective's loss at w and at w + delta; ``history`` is the loss per step (multi-step: the loss
    at each iterate a_0..a_K; random: the loss of each trial, see ``trial_changes``).
    ``values``, where set, are the exact corrupted parameters, applied instead of ``w + delta``
    (bit flips, whose result is not always representable as a float sum).
    """

    delta: dict[str, Tensor]
    loss_before: float
    loss_after: float
    budget: Budget
    method: str
    history: list[float] = field(default_factory=list)
    passes: int = 0
    values: Optional[dict[str, Tensor]] = None

    @property
    def loss_change(self) -> float:
        return self.loss_after - self.loss_before

    def _repr_extra(self) -> str:
        """What a subclass adds to the summary."""
        return ""

    def __repr__(self) -> str:
        """A one-line summary; the tensors are in ``delta`` / ``values``."""
        entries = sum(d.numel() for d in self.delta.values())
        return (f"{type(self).__name__}(method={self.method!r}, budget={self.budget}, loss {self.loss_before:.6g} -> "
                f"{self.loss_after:.6g} (change {self.loss_change:+.6g}), {len(self.delta)} tensors / {entries} entries, "
                f"passes={self.passes}{self._repr_extra()})")

    def as_dict(self) -> dict:
        """JSON-ready summary (no tensors)."""
        return {
            "method": self.method,
            "norm": self.budget.norm,
            "eps": self.budget.eps,
            "sparsity": self.budget.sparsity,
            "scale": self.budget.scale,
            "loss_before": self.loss_before,
            "loss_after": self.loss_after,
            "loss_change": self.loss_change,
            "history": list(self.history),
            "passes": self.passes,
        }


@dataclass(repr=False)
class RandomCorruptionResult(CorruptionResult):
    """Random trials: ``delta``/``loss_after`` are the worst trial; the statistics cover all."""

    @property
    def trial_changes(self) -> list[float]:
        return [x - self.loss_before for x in self.history]

    @property
    def mean_change(self) -> float:
        c = self.trial_changes
        return sum(c) / len(c)

    @property
    def std_change(self) -> float:
        c = self.trial_changes
        m = self.mean_change
        return math.sqrt(sum((x - m) ** 2 for x in c) / max(len(c) - 1, 1))

    def as_dict(self) -> dict:
        out = super().as_dict()
        out.update(mean_change=self.mean_change, std_change=self.std_change, worst_change=self.loss_change)
        return out

    def _repr_extra(self) -> str:
        return f", trials={len(self.history)}, mean change {self.mean_change:+.6g} (std {self.std_change:.3g})"


def _as_dict(objective: Objective, delta: Sequence[Tensor]) -> dict[str, Tensor]:
    return {n: a.detach().clone() for n, a in zip(objective.names, delta)}


def random_interior(budget: Budget, params: Sequence[Tensor], gen: torch.Generator) -> Tensors:
    """A random point inside the budget: a boundary sample shrunk by a uniform factor (the random
    start of the multi-step attacks)."""
    delta = budget.sample(params, gen)
    torch._foreach_mul_(delta, float(torch.rand((), generator=gen)))
    return delta


class BestIterate:
    """The highest-loss iterate seen so far, kept in one buffer: the first offer clones, later
    improvements are one fused copy each (no allocation per improvement)."""

    def __init__(self) -> None:
        self.delta: Optional[Tensors] = None
        self.loss = -math.inf

    def offer(self, delta: Sequence[Tensor], loss: float) -> bool:
        """Keep ``delta`` if its loss is higher than the best so far; says whether it was kept."""
        if not loss > self.loss:
            return False
        if self.delta is None:
            self.delta = [a.detach().clone() for a in delta]
        else:
            torch._foreach_copy_(self.delta, list(delta))
        self.loss = loss
        return True


class RandomCorruption:
    """``trials`` random corruptions on the boundary of the budget (seeded).

    Trials are drawn ``chunk_size`` at a time (``Budget.samples``: one generator call and one
    copy per chunk). ``vectorize`` evaluates a chunk at once with ``vmap`` over the stacked
    parameter sets (``Probe.stacked_losses``): ``True`` always, ``False`` never (apply, evaluate,
    restore per trial), ``"auto"`` (default) in eval mode, falling back to the loop with a
    warning where the model cannot be vmapped. Both paths evaluate the same corruptions.
    ``draw_on``: ``"cpu"`` (default) draws with a CPU generator, so a seed gives the same trials
    on every device; ``"device"`` draws on the parameters' device (much faster on a GPU; the
    trials then depend on the device type).
    """

    def __init__(self, budget: Budget, trials: int = 10, seed: int = 0, vectorize: Union[bool, str] = "auto",
                 chunk_size: int = 32, draw_on: str = "cpu") -> None:
        self.budget = check_budget(budget)
        self.trials = check_count("trials", trials)
        check_seed(seed)
        if draw_on not in ("cpu", "device"):
            raise ValueError(f"draw_on must be 'cpu' or 'device', got {draw_on!r}")
        self.seed = seed
        self.vectorize = check_vectorize(vectorize)
        self.chunk_size = check_count("chunk_size", chunk_size)
        self.draw_on = draw_on

    def sample_chunks(self, objective: Objective) -> Iterator[Tensors]:
        """The trial corruptions, stacked ``chunk_size`` at a time (the same ones every call).

        Scaled budgets size them from the parameters as they are at the first draw: the caller
        may move the parameters to ``w + a`` between draws (``__call__`` does), and the next trial
        must still be relative to ``w``.
        """
        params = Geometry([p.detach().clone() for p in objective.params])  # scales cached across chunks
        device = objective.device if self.draw_on == "device" else torch.device("cpu")
        gen = torch.Generator(device=device).manual_seed(self.seed)
        for start in range(0, self.trials, self.chunk_size):
            yield self.budget.samples(params, gen, min(self.chunk_size, self.trials - start))

    def samples(self, objective: Objective) -> Iterator[Tensors]:
        """The trial corruptions one by one, as tensor lists."""
        for chunk in self.sample_chunks(objective):
            yield from _unstack(chunk)

    def __call__(self, objective: Objective) -> RandomCorruptionResult:
        check_objective(objective)
        chunk = min(self.chunk_size, self.trials)  # float64 directions, then the stacked parameter sets
        check_memory(16 * chunk * objective.numel, f"a chunk of {chunk} trials (chunk_size)", objective.device)
        with objective.probe() as pr:
            before = check_finite(pr.loss(), "loss at w")
            losses: list[float] = []
            chunks = progress(pr.stacked_losses_of(self.sample_chunks(objective), self.vectorize, "random trials"),
                              total=-(-self.trials // self.chunk_size), desc="random trials", unit="chunk", leave=False)
            worst, worst_loss = None, -math.inf
            for chunk, values in chunks:
                chunk_losses = [overflow_to_inf(v) for v in values.tolist()]
                i = max(range(len(chunk_losses)), key=chunk_losses.__getitem__)  # the first worst
                if chunk_losses[i] > worst_loss:
                    worst, worst_loss = [s[i] for s in chunk], chunk_losses[i]
                losses.extend(chunk_losses)
        return RandomCorruptionResult(
            _as_dict(objective, worst), before, worst_loss, self.budget, "random", losses,
            passes=self.trials + 1,
        )


class GradientCorruption:
    """One-step corruption ``a = steepest(grad L(w))``: first-order optimal."""

    def __init__(self, budget: Budget) -> None:
        self.budget = check_budget(budget)

    def __call__(self, objective: Objective) -> CorruptionResult:
        check_objective(objective)
        with objective.probe() as pr:
            loss, grads = pr.gradient()
            delta = self.budget.steepest_(grads, pr.clean)
            pr.set(delta)
            after = overflow_to_inf(pr.loss())
        before = float(loss)
        return CorruptionResult(
            _as_dict(objective, delta), before, after, self.budget, "one_step", [before, after], passes=2
        )


class MultiStepCorruption:
    """Multi-step adversarial corruption: projected gradient ascent on the parameters.

    ``a_0 = 0`` (or a random point of the budget), ``a_{t+1} = project(a_t + alpha *
    steepest_unit(grad L(w + a_t)))`` for t < steps; the highest-loss iterate is kept.

    Args:
        budget: the constraint set.
        steps: number of ascent steps K (>= 1).
        step_size: alpha, relative like eps (a fraction of ``||w_l||`` or ``|w| + eta`` when the
            budget is scaled). Default ``1.5 * eps / steps``, the choice of the only public code
            near the papers: K steps can travel 1.5 times across the ball.
        random_start: start from a random point inside the budget instead of 0.
        restarts: independent runs (the first from 0 unless ``random_start``, the others from
            random points); the best is returned.
        keep_best: return the iterate with the highest loss rather than the last one (measured
            on the whole data, so only with ``per_step="full"``).
        per_step: ``"full"`` takes the gradient over all the objective's data at every step
            (exact); ``"batch"`` takes one batch per step, cycling through the data (stochastic,
            cheaper on large data). The final loss is always measured on all the data.
        seed: seed of the random starts.
    """

    def __init__(
        self,
        budget: Budget,
        steps: int = 10,
        step_size: Optional[float] = None,
        random_start: bool = False,
        restarts: int = 1,
        keep_best: bool = True,
        per_step: str = "full",
        seed: int = 0,
    ) -> None:
        self.budget = check_budget(budget)
        self.steps = check_count("steps", steps)
        self.restarts = check_count("restarts", restarts)
        if per_step not in ("full", "batch"):
            raise ValueError(f"per_step must be 'full' or 'batch', got {per_step!r}")
        self.step_size = step_size_or_default(step_size, self.budget, self.steps)
        check_seed(seed)
        self.random_start = check_bool("random_start", random_start)
        self.keep_best = check_bool("keep_best", keep_best)
        self.per_step = per_step
        self.seed = seed

    def _start(self, pr: Probe, restart: int, gen: torch.Generator) -> Tensors:
        if restart == 0 and not self.random_start:
            return [torch.zeros_like(p) for p in pr.clean]
        return random_interior(self.budget, pr.clean, gen)

    def _step_data(self, objective: Objective) -> Iterator:
        if self.per_step == "full":
            while True:
                yield None
        while True:
            yielded = False
            for batch in objective.batches():
                if batch_size(batch) > 0:  # a batch of 0 rows has no gradient to step along
                    yielded = True
                    yield batch
            if not yielded:
                raise ValueError(NO_EXAMPLE)

    def __call__(self, objective: Objective) -> CorruptionResult:
        check_objective(objective)
        gen = torch.Generator().manual_seed(self.seed)
        exact = self.per_step == "full"
        with objective.probe() as pr:
            before = check_finite(pr.loss(), "loss at w")
            best, history = BestIterate(), []
            passes = 1
            data = self._step_data(objective)
            geometry = Geometry(pr.clean)  # w is fixed during the attack: scales computed once
            for restart in range(self.restarts):
                delta = self._start(pr, restart, gen)
                desc = f"multi-step corruption, restart {restart + 1}/{self.restarts}"
                for t in progress(range(self.steps), desc=desc, unit="step", leave=False):
                    pr.set(delta)
                    loss, grads = pr.gradient(next(data), check=False)
                    passes += 1
                    history.append(float(loss))
                    if exact and self.keep_best:
                        best.offer(delta, history[-1])
                    if history[-1] == math.inf:  # the loss overflowed: no ascent direction left
                        break
                    step = self.budget.steepest_(grads, geometry, radius=self.step_size)
                    torch._foreach_add_(delta, step)
                    self.budget.project_(delta, geometry)
                pr.set(delta)
                final = overflow_to_inf(pr.loss())
                passes += 1
                history.append(final)
                best.offer(delta, final)  # without keep_best, only final iterates compete
        return CorruptionResult(
            _as_dict(objective, best.delta), before, best.loss, self.budget, "multi_step", history, passes=passes
        )


_KINDS = {"random": RandomCorruption, "one_step": GradientCorruption, "multi_step": MultiStepCorruption}
#: The corruptions ``make_corruption`` builds, by name.
CORRUPTION_KINDS = tuple(_KINDS)


def make_corruption(kind: str, budget: Budget, **kwargs) -> Union[RandomCorruption, GradientCorruption, MultiStepCorruption]:
    """Build a corruption from its name: ``"random"``, ``"one_step"`` or ``"multi_step"``."""
    if kind not in _KINDS:
        raise ValueError(f"corruption must be one of {sorted(_KINDS)}, got {kind!r}")
    return _KINDS[kind](budget, **kwargs)


def _version(t: Tensor) -> int:
    """The version counter of ``t``; -1 for an inference tensor, which has none (never reported:
    such a tensor cannot be trained anyway)."""
    return -1 if t.is_inference() else t._version


def _same_bits(a: Tensor, b: Tensor) -> bool:
    """Bitwise equality (NaN payloads included, which ``torch.equal`` calls different)."""
    ints = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
    if a.dtype != b.dtype or a.shape != b.shape or a.is_complex() or a.element_size() not in ints:
        return a.dtype == b.dtype and torch.equal(a, b)
    return torch.equal(a.view(ints[a.element_size()]), b.view(ints[a.element_size()]))


@contextmanager
def corrupted(
    model: nn.Module, corruption: Union[CorruptionResult, Mapping[str, Tensor]]
) -> Iterator[nn.Module]:
    """Apply a corruption (a result or ``{name: delta}``) to ``model``'s parameters in place, and
    restore every touched parameter bit for bit on exit (exceptions and KeyboardInterrupt too).

    The block is for evaluating the corrupted model: a change made to the touched parameters inside
    it (an optimizer step, say) is undone on exit with the rest, while what it left elsewhere (the
    optimizer's momentum) stays; such a change is reported with a ``RuntimeWarning``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    exact = isinstance(corruption, CorruptionResult) and corruption.values is not None
    if isinstance(corruption, CorruptionResult):
        delta = corruption.values if exact else corruption.delta
    else:
        delta = corruption
    if not isinstance(delta, Mapping):
        raise TypeError(f"corruption must be a CorruptionResult or a mapping name -> tensor, got {type(corruption).__name__}")
    wrong = [f"{n!r}: {type(v).__name__}" for n, v in delta.items() if not isinstance(v, Tensor)]
    if wrong:
        raise TypeError(f"corruption values must be tensors, got {', '.join(wrong[:3])}")
    params = resolve_names(model, delta, "corruption")
    check_not_sharded(params, "corrupted")
    for n, p in zip(delta, params):
        if tuple(delta[n].shape) != tuple(p.shape):
            raise ValueError(f"corruption of {n!r} has shape {tuple(delta[n].shape)}, parameter has {tuple(p.shape)}")
    if not params:  # an empty corruption (e.g. a bit search that stopped before its first flip)
        yield model
        return
    saved = [p.detach().clone() for p in params]
    versions: list[int] = []
    try:
        with torch.no_grad():
            moved = [delta[n].to(device=p.device, dtype=p.dtype) for n, p in zip(delta, params)]
            (torch._foreach_copy_ if exact else torch._foreach_add_)(params, moved)
        versions = [_version(p) for p in params]  # in-place changes inside the block bump them
        yield model
    finally:
        with torch.no_grad():  # a version bump alone may be a probe that moved and restored the parameters
            changed = [n for n, p, v, m, s in zip(delta, params, versions, moved, saved)
                       if _version(p) != v and not _same_bits(p, m if exact else s + m)] if versions else []
            torch._foreach_copy_(params, saved)
        if changed:
            warnings.warn(
                f"parameters {changed[:3]} were changed inside corrupted(): the change is discarded on exit, when the "
                "clean values come back (an optimizer step there is lost while its momentum/state is kept); train "
                "outside the block", RuntimeWarning, stacklevel=3)
