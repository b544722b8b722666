"""A reliable robustness evaluation: an attack ensemble with no step size to tune.

The member attack is Auto-PGD (Croce & Hein, ICML 2020) moved to parameter space: projected
ascent with momentum whose step starts at ``2 eps`` and is halved at checkpoints where progress
stalled, the iterate then restarting from the best point found. An evaluation runs it on the
objective's own loss and, for classification, on the scale-invariant DLR margin (or any margin
the user gives), each from ``a = 0`` and from random points of the budget; every candidate is
scored by the objective's loss on the attack data, the worst is kept, and it is reported on
held-out data as well when given.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from ._checks import check_budget, check_count, check_objective, check_seed
from .budget import Budget, Geometry
from .corruption import BestIterate, CorruptionResult, _as_dict, corrupted, random_interior
from .margin import LossFn, dlr_loss
from .objective import Objective, Probe, check_finite, overflow_to_inf, preserved_modes

Tensors = list[Tensor]

#: Auto-PGD's constants: momentum weight, and the fraction of steps since the last checkpoint
#: that must have raised the loss for the step size to be kept.
MOMENTUM = 0.75
SUCCESS_RATE = 0.75
#: A run has converged when, at a checkpoint where the step is halved, the best loss rose by less
#: than this fraction since the previous checkpoint: its remaining passes go to a new start.
CONVERGED = 1e-3


def checkpoints(steps: int) -> list[int]:
    """Auto-PGD's checkpoints ``ceil(p_j steps)``: ``p_0 = 0, p_1 = 0.22``,
    ``p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06)``, so checks start sparse and get denser."""
    p = [0.0, 0.22]
    while p[-1] + max(p[-1] - p[-2] - 0.03, 0.06) <= 1.0:
        p.append(p[-1] + max(p[-1] - p[-2] - 0.03, 0.06))
    return sorted({math.ceil(round(x * steps, 9)) for x in p[1:]} - {0})  # round: 0.57 * 100 is 57.000...01


class AutoPGDCorruption:
    """Auto-PGD in parameter space: the step-size-free member of the robustness evaluation.

    From ``a_0``: ``z = project(a_k + eta * steepest_unit(grad L(w + a_k)))``,
    ``a_{k+1} = project(a_k + 0.75 (z - a_k) + 0.25 (a_k - a_{k-1}))`` (the first step without
    momentum), with ``eta = 2 eps`` at first. At each checkpoint (see :func:`checkpoints`) eta is
    halved and the iterate restarted from the best point when fewer than 75% of the steps since
    the last checkpoint raised the loss, or when eta was not halved at the last checkpoint and the
    best loss has not moved since. The best iterate is kept.

    A call spends ``steps * restarts`` gradient passes: runs of at most ``steps`` passes, the
    first from ``a = 0``, the others from random points inside the budget (seeded). A run that
    has converged (the step was halved and the best loss rose by less than a relative 1e-3 since
    the previous checkpoint) ends early and leaves its passes to further starts: in parameter
    space a run typically settles on a local maximum within a few steps, and more starts find
    higher ones.

    Args:
        budget: the constraint set (any norm, sparsity or scale).
        steps: the most gradient passes of one run.
        restarts: the gradient passes of a call, in units of ``steps``.
        seed: seed of the random starts.
    """

    def __init__(self, budget: Budget, steps: int = 25, restarts: int = 4, seed: int = 0) -> None:
        self.budget = check_budget(budget)
        self.steps = check_count("steps", steps)
        self.restarts = check_count("restarts", restarts)
        self.seed = check_seed(seed)

    def __repr__(self) -> str:
        return f"AutoPGDCorruption(budget={self.budget}, steps={self.steps}, restarts={self.restarts}, seed={self.seed})"

    def _run(self, pr: Probe, geometry: Geometry, delta: Tensors, steps: int) -> tuple[BestIterate, list[float], int]:
        """One run of at most ``steps`` gradient passes from ``delta`` (modified in place); returns
        the best iterate, the loss at every iterate and the gradient passes spent (a run that
        ends at ``steps`` adds one loss pass at its last iterate)."""
        budget, marks = self.budget, set(checkpoints(steps))
        eta, halved_last, best_at_mark, last_mark, raised = 2.0 * budget.eps, False, -math.inf, 0, 0
        best, history, grad_best = BestIterate(), [], None
        previous: Optional[Tensors] = None
        for k in range(steps):
            pr.set(delta)
            loss, grads = pr.gradient(check=False)
            history.append(float(loss))
            if k > 0 and history[-1] > history[-2]:
                raised += 1
            if best.offer(delta, history[-1]):
                if grad_best is None:
                    grad_best = [g.clone() for g in grads]
                else:
                    torch._foreach_copy_(grad_best, grads)
            if history[-1] == math.inf:  # the loss overflowed: nothing left to climb
                return best, history, k + 1
            if k in marks:
                stalled = raised < SUCCESS_RATE * (k - last_mark)
                flat = not halved_last and best.loss <= best_at_mark
                halved_last = stalled or flat
                if halved_last and best.loss - best_at_mark <= CONVERGED * abs(best.loss):
                    return best, history, k + 1
                if halved_last:
                    eta /= 2.0
                    torch._foreach_copy_(delta, best.delta)
                    torch._foreach_copy_(grads, grad_best)
                    previous = None  # momentum restarts with the iterate
                best_at_mark, last_mark, raised = best.loss, k, 0
            step = budget.steepest_(grads, geometry, radius=eta)
            z = budget.project_(torch._foreach_add(delta, step), geometry)
            del step
            if previous is None:
                previous = [a.clone() for a in delta]
                torch._foreach_copy_(delta, z)
            else:  # a + 0.75 (z - a) + 0.25 (a - a_prev), and a_prev <- a
                torch._foreach_mul_(z, MOMENTUM)
                torch._foreach_add_(z, delta, alpha=2.0 * (1.0 - MOMENTUM))
                torch._foreach_add_(z, previous, alpha=-(1.0 - MOMENTUM))
                torch._foreach_copy_(previous, delta)
                torch._foreach_copy_(delta, z)
            del z
            budget.project_(delta, geometry)
        pr.set(delta)
        history.append(overflow_to_inf(pr.loss()))
        best.offer(delta, history[-1])
        return best, history, steps

    def runs(self, objective: Objective) -> Iterator[CorruptionResult]:
        """One result per run, each with the best iterate of its run and its loss. Between
        results the parameters are at w (the caller may evaluate the model there)."""
        gen = torch.Generator().manual_seed(self.seed)
        with objective.probe() as pr:
            before = check_finite(pr.loss(), "loss at w")
            geometry = Geometry(pr.clean)
            left, first = self.steps * self.restarts, True
            while left > 0:
                start = [torch.zeros_like(p) for p in pr.clean] if first else random_interior(
                    self.budget, pr.clean, gen)
                best, history, spent = self._run(pr, geometry, start, min(self.steps, left))
                pr.set(None)
                left = 0 if best.loss == math.inf else left - spent  # nothing beats an overflow
                yield CorruptionResult(_as_dict(objective, best.delta), before, best.loss, self.budget, "apgd",
                                       history, passes=len(history) + first)
                first = False

    def __call__(self, objective: Objective) -> CorruptionResult:
        results = list(self.runs(check_objective(objective)))
        worst = max(results, key=lambda r: r.loss_after)
        history = [x for r in results for x in r.history]
        return CorruptionResult(worst.delta, worst.loss_before, worst.loss_after, self.budget, "apgd", history,
                                passes=sum(r.passes for r in results))


# ---------------------------------------------------------------------------- the evaluation
@dataclass(frozen=True)
class EpsEvaluation:
    """The worst case the ensemble found at one eps.

    ``loss_before``/``loss_after``: the objective's loss on the attack data at w and at the worst
    corruption; ``member``: which member found it (``"apgd-loss"``, ``"apgd-dlr"``, ...);
    ``member_losses``: each member's best loss on the attack data; ``heldout_*`` and
    ``metric_*``: the same comparison on held-out data and for the metric, where given.
    """

    eps: float
    loss_before: float
    loss_after: float
    member: str
    corruption: CorruptionResult = field(repr=False)
    member_losses: dict[str, float]
    passes: int
    heldout_before: Optional[float] = None
    heldout_after: Optional[float] = None
    metric_before: Optional[float] = None
    metric_after: Optional[float] = None

    @property
    def loss_change(self) -> float:
        return self.loss_after - self.loss_before

    def as_dict(self) -> dict:
        """JSON-ready summary (no tensors)."""
        keys = ("eps", "loss_before", "loss_after", "member", "passes", "heldout_before", "heldout_after",
                "metric_before", "metric_after")
        return {**{k: getattr(self, k) for k in keys}, "member_losses": dict(self.member_losses)}


@dataclass(frozen=True)
class RobustnessEvaluation:
    """The result of :func:`evaluate_robustness`: one :class:`EpsEvaluation` per eps."""

    budget: Budget
    members: tuple[str, ...]
    results: tuple[EpsEvaluation, ...]

    @property
    def passes(self) -> int:
        return sum(r.passes for r in self.results)

    def at(self, eps: float) -> EpsEvaluation:
        """The evaluation at ``eps``."""
        for r in self.results:
            if r.eps == eps:
                return r
        raise KeyError(f"eps {eps!r} was not evaluated; evaluated: {[r.eps for r in self.results]}")

    def as_dict(self) -> dict:
        return {"norm": self.budget.norm, "sparsity": self.budget.sparsity, "scale": self.budget.scale,
                "members": list(self.members), "results": [r.as_dict() for r in self.results]}

    def __repr__(self) -> str:
        b = self.budget
        head = f"RobustnessEvaluation({b.norm}, scale={b.scale}, sparsity={b.sparsity}; members {', '.join(self.members)})"
        lines = [head]
        for r in self.results:
            line = f"  eps={r.eps:g}: loss {r.loss_before:.4g} -> {r.loss_after:.4g} by {r.member}"
            if r.heldout_after is not None:
                line += f"; held-out {r.heldout_before:.4g} -> {r.heldout_after:.4g}"
            if r.metric_after is not None:
                line += f"; metric {r.metric_before:.4g} -> {r.metric_after:.4g}"
            lines.append(line + f" ({r.passes} passes)")
        return "\n".join(lines)


def _loss_at(objective: Objective, delta: Optional[dict[str, Tensor]]) -> float:
    """The objective's loss at ``w + delta`` (inf where it overflows); one forward pass."""
    with objective.probe() as pr:
        pr.set(None if delta is None else [delta[n] for n in objective.names])
        return overflow_to_inf(pr.loss())


def _heldout(objective: Objective, heldout: Any) -> Optional[Objective]:
    if heldout is None or isinstance(heldout, Objective):
        if isinstance(heldout, Objective) and heldout.names != objective.names:
            raise ValueError("heldout must select the same parameters as objective")
        return heldout
    return Objective(objective.model, objective.loss_fn, heldout, objective.params, train_mode=objective.train_mode)


def evaluate_robustness(
    objective: Objective,
    budget: Budget,
    eps: Union[float, Sequence[float], None] = None,
    *,
    classification: bool = False,
    margin_fn: Optional[LossFn] = None,
    heldout: Any = None,
    metric: Optional[Callable[[nn.Module], float]] = None,
    steps: int = 25,
    restarts: int = 4,
    seed: int = 0,
) -> RobustnessEvaluation:
    """Worst-case corruption per eps by an ensemble that needs no step size.

    Members: Auto-PGD (:class:`AutoPGDCorruption`) on the objective's loss and, with
    ``classification=True`` or a ``margin_fn``, on a second, scale-invariant loss; each runs
    ``restarts`` times (from 0, then from random points of the budget) for ``steps`` gradient
    passes. Every run's best point is scored by the objective's loss on its own (attack) data,
    and the highest wins.

    Args:
        objective: the model, loss and the attack data the corruption is searched on.
        budget: the constraint set; its eps is used unless ``eps`` is given.
        eps: a radius or radii to evaluate (each a separate search); default the budget's.
        classification: add the DLR margin member (:func:`parashield.margin.dlr_loss`) on batches
            ``(x, y)`` with ``model(x)`` the logits; for other batches pass
            ``margin_fn=dlr_loss(logits_fn)``.
        margin_fn: a second attack loss ``margin_fn(model, batch) -> scalar`` to maximize.
        heldout: held-out data (or an Objective over the same parameters) on which the worst
            corruption is reported; never used to choose it.
        metric: ``metric(model) -> float`` (e.g. held-out accuracy) measured in eval mode at w and
            at the worst corruption.
        steps: ascent steps per run of each member, as :class:`AutoPGDCorruption`.
        restarts: runs per member. The default, 4 runs of 25 steps per member, spends fewer
            passes than 50-step ascent with 5 restarts; in parameter space short runs converge to
            a local maximum quickly, and more starts find higher ones (see the evaluation page of
            the docs).
        seed: seed of the random starts.
    """
    if not isinstance(objective, Objective):
        raise TypeError(f"objective must be a parashield.Objective, got {type(objective).__name__}")
    check_budget(budget)
    if not isinstance(classification, bool):
        raise TypeError(f"classification must be a bool, got {classification!r}")
    if classification and margin_fn is not None:
        raise ValueError("give classification=True (the DLR margin) or a margin_fn, not both")
    if margin_fn is not None and not callable(margin_fn):
        raise TypeError(f"margin_fn must be callable as margin_fn(model, batch), got {type(margin_fn).__name__}")
    if metric is not None and not callable(metric):
        raise TypeError(f"metric must be callable as metric(model), got {type(metric).__name__}")
    if eps is None:
        eps = [budget.eps]
    elif isinstance(eps, (int, float)) and not isinstance(eps, bool):
        eps = [eps]
    radii = [budget.with_eps(e).eps for e in eps]
    if not radii:
        raise ValueError("eps must hold at least one radius")
    check_count("steps", steps)
    check_count("restarts", restarts)
    check_seed(seed)
    held = _heldout(objective, heldout)
    members: dict[str, Objective] = {"apgd-loss": objective}
    if classification:
        members["apgd-dlr"] = Objective(objective.model, dlr_loss(), objective.data, objective.params,
                                        train_mode=objective.train_mode)
    elif margin_fn is not None:
        members["apgd-margin"] = Objective(objective.model, margin_fn, objective.data, objective.params,
                                           train_mode=objective.train_mode)
    model = objective.model
    with preserved_modes(model, False):
        metric_before = None if metric is None else float(metric(model))
    heldout_before = None if held is None else _loss_at(held, None)
    results = []
    for r in radii:
        b = budget.with_eps(r)
        before, passes, member_losses = math.nan, 0, {}
        worst_score, worst_run, worst_by = -math.inf, None, ""
        for name, member_obj in members.items():
            member_losses[name] = -math.inf
            for run in AutoPGDCorruption(b, steps, restarts, seed).runs(member_obj):
                passes += run.passes
                if member_obj is objective:
                    score, before = run.loss_after, run.loss_before
                else:  # scored by the objective's loss, like every candidate
                    score = _loss_at(objective, run.delta)
                    passes += 1
                member_losses[name] = max(member_losses[name], score)
                if worst_run is None or score > worst_score:
                    worst_score, worst_run, worst_by = score, run, name
        worst = CorruptionResult(worst_run.delta, before, worst_score, b, worst_by, worst_run.history,
                                 worst_run.passes)
        heldout_after = None if held is None else _loss_at(held, worst.delta)
        metric_after = None
        if metric is not None:
            with preserved_modes(model, False), corrupted(model, worst):
                metric_after = float(metric(model))
        results.append(EpsEvaluation(r, before, worst.loss_after, worst_by, worst, member_losses, passes,
                                     heldout_before, heldout_after, metric_before, metric_after))
    return RobustnessEvaluation(budget, tuple(members), tuple(results))
