"""APD trained with an L-inf budget: the papers' defense in the other budget shape the
ablation attacks with. The headline K with a layer-relative L-inf ball ``||a_l||_inf <= eps
||w_l||_inf``, its eps chosen on validation under L-inf corruption, over all seeds; each final
model is measured under the budget ablation's attacks (:mod:`.ablation`), so that it can be
compared, on drops, with the L2-trained models there. Cached per run in ``budgets.json``."""

from __future__ import annotations

from dataclasses import asdict, replace
from pathlib import Path

from .._progress import progress
from .ablation import SPARSE_SHARE, budget_evaluate
from .runner import Run, Spec, validation_score
from .tasks import Task

METHOD = "apd_linf"


def select(task: Task, result: dict, out: Path) -> dict:
    """The eps of the L-inf APD from the task's eps grid, by the validation robustness score
    under L-inf corruption (seed 0); the record as in ``selection``."""
    head = Spec(**result["runs"][[r["method"] for r in result["runs"]].index(result["headline"])]["spec"])
    specs = [replace(head, eps=e, norm="linf") for e in task.eps_grid]
    scores = [Run(task, s, 0, out).cached("valid", lambda m: validation_score(task, m, "linf"))["score"] for s in specs]
    best = max(range(len(specs)), key=lambda i: scores[i])
    return {"candidates": list(task.eps_grid), "validation": scores, "pick": task.eps_grid[best],
            "selected_on": "validation", "spec": asdict(specs[best]),
            "criterion": "mean oriented validation metric, clean and under 10-step L-inf corruption at every eval eps"}


def run_linf_defense(task: Task, result: dict, out: Path) -> dict:
    """Selection, then every seed at the pick, each measured under the ablation budgets."""
    choice = select(task, result, out)
    spec = Spec(**choice["spec"])
    rows = []
    for seed in progress(range(result["seeds"]), desc=f"L-inf APD {task.name}", unit="run"):
        data = Run(task, spec, seed, out).cached("budgets", lambda m: budget_evaluate(task, m),
                                                  extra_key={"sparse_share": SPARSE_SHARE})
        rows.append({"method": METHOD, "seed": seed, **data})
    return {"selection": choice, "runs": rows}
