"""APD trained with the other budget shapes the ablation attacks with: the papers' defense in an
L-inf ball and in an n-sparse ball. The headline K is trained with

* ``apd_linf``: a layer-relative L-inf ball, ``||a_l||_inf <= eps ||w_l||_inf`` per tensor;
* ``apd_sparse``: an n-sparse L2 ball, ``||a||_2 <= rho`` with at most n = 1% of the parameters
  changed (the ablation's sparse attack), rho = eps ||w|| of the seed-0 plain model (as SAM's
  rho) so that the radii span the layer-relative ones;

its eps chosen from the task's grid on validation under corruption of the same shape (the
ablation's budget of that shape), then trained over all seeds; each final model is measured
under the ablation's attacks (:mod:`.ablation`), so that it can be compared, on drops, with the
L2-trained models there. Cached per run in ``budgets.json``."""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable

from torch import nn

from .ablation import SPARSE_SHARE, budget_evaluate, budgets
from .runner import Run, Spec, _norm, shared_map, validation_score
from .tasks import Task


@dataclass(frozen=True)
class Shape:
    """One budget shape of the defense: how a candidate eps becomes a training spec (given the
    headline spec and the seed-0 plain model) and which ablation budget scores it on validation."""

    label: str
    attack: str  #: the ablation budget (:func:`.ablation.budgets`) of the validation score
    spec: Callable[[Spec, float, nn.Module], Spec]


def _sparse(head: Spec, eps: float, plain: nn.Module) -> Spec:
    n = max(1, int(SPARSE_SHARE * sum(p.numel() for p in plain.parameters() if p.requires_grad)))
    return replace(head, eps=round(eps * _norm(plain), 6), sparsity=n)


SHAPES = {
    "apd_linf": Shape("APD trained with an L-inf budget", "linf layer",
                      lambda head, eps, plain: replace(head, eps=eps, norm="linf")),
    "apd_sparse": Shape("APD trained with an n-sparse budget", "l2 sparse 1%", _sparse),
}


def _spec_of(result: dict, method: str) -> Spec:
    return Spec(**next(r["spec"] for r in result["runs"] if r["method"] == method and r["seed"] == 0))


def select(task: Task, result: dict, out: Path, method: str) -> dict:
    """The eps of one shaped APD from the task's eps grid by the validation robustness score under
    corruption of its shape (seed 0); the record as in ``selection``, with the spec."""
    shape = SHAPES[method]
    head, plain = _spec_of(result, result["headline"]), Run(task, _spec_of(result, "plain"), 0, out).model()
    specs = [shape.spec(head, e, plain) for e in task.eps_grid]

    def score(model: nn.Module) -> dict:
        return validation_score(task, model, lambda eps: budgets(task, model, eps)[shape.attack])

    scores = shared_map(specs, lambda s: Run(task, s, 0, out), lambda s, r: r.cached("valid", score)["score"],
                        f"{method} {task.name} selection")
    best = max(range(len(specs)), key=lambda i: scores[i])
    return {"candidates": list(task.eps_grid), "validation": scores, "pick": task.eps_grid[best],
            "selected_on": "validation", "spec": asdict(specs[best]),
            "criterion": f"mean oriented validation metric, clean and under 10-step {shape.attack} corruption "
                         "at every eval eps"}


def run_shaped_defenses(task: Task, result: dict, out: Path) -> dict:
    """For every shape the task lists: selection, then every seed at the pick, each measured
    under the ablation budgets. Returns ``{method: {"selection", "runs"}}``."""
    done = {}
    for method in task.shaped_defenses:
        choice = select(task, result, out, method)
        spec = Spec(**choice["spec"])

        def one(seed: int, run: Run, method: str = method) -> dict:
            data = run.cached("budgets", lambda m: budget_evaluate(task, m), extra_key={"sparse_share": SPARSE_SHARE})
            return {"method": method, "seed": seed, **data}

        rows = shared_map(range(result["seeds"]), lambda seed, spec=spec: Run(task, spec, seed, out), one,
                          f"{method} {task.name}")
        done[method] = {"label": SHAPES[method].label, "selection": choice, "runs": rows}
    return done
