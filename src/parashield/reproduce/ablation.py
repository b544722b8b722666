"""Budget ablation of the reproduction: the final models of the controls and the headline APD
(all trained with a layer-relative L2 budget) attacked with other budget shapes, an L-inf
layer-relative ball and an n-sparse L2 ball holding the same total L2 radius on 1% of the
parameters. Cached per run in ``budgets.json``."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from torch import nn

from ..budget import Budget
from ..corruption import MultiStepCorruption, corrupted
from ..objective import Objective
from .findings import CONTROLS
from .runner import Run, Spec, _metric, _norm, shared_map
from .tasks import Task

#: share of the parameters an n-sparse corruption may change
SPARSE_SHARE = 0.01


def budgets(task: Task, model: nn.Module, eps: float) -> dict[str, Budget]:
    """The ablation's budgets at one layer-relative eps of the evaluation grid."""
    n = max(1, int(SPARSE_SHARE * sum(p.numel() for p in model.parameters() if p.requires_grad)))
    return {"linf layer": Budget("linf", eps, scale="layer"),
            "l2 sparse 1%": Budget("l2", eps * _norm(model), sparsity=n)}


def budget_evaluate(task: Task, model: nn.Module) -> dict:
    """Test metric under the 10-step corruption of every ablation budget at every eval eps."""
    attack = Objective(model, task.loss_fn, task.attack_data)
    data = task.corrupted_data
    rows = []
    for eps in task.eval_eps:
        for name, budget in budgets(task, model, eps).items():
            res = MultiStepCorruption(budget, steps=task.multi_steps)(attack)
            with corrupted(model, res):
                rows.append({"budget": name, "eps": eps, "metric": _metric(task, model, data),
                             "loss_change": res.loss_change})
    return {"clean_subset_metric": _metric(task, model, data), "rows": rows}


def budgets_entry(task: Task, run: Run) -> dict:
    """The run's ``budgets.json`` entry (computed on first use)."""
    return run.cached("budgets", lambda m: budget_evaluate(task, m), extra_key={"sparse_share": SPARSE_SHARE})


def ablated(method: str, headline: Optional[str]) -> bool:
    """Whether the ablation attacks a method's final runs: the controls and the headline APD."""
    return method in (*CONTROLS, headline)


def run_budget_ablation(task: Task, result: dict, out: Path) -> list[dict]:
    """The ablation for the controls and the headline APD of a finished protocol result."""
    jobs = [r for r in result["runs"] if ablated(r["method"], result["headline"])]

    def one(r: dict, run: Run) -> dict:
        return {"method": r["method"], "seed": r["seed"], **budgets_entry(task, run)}

    return shared_map(jobs, lambda r: Run(task, Spec(**r["spec"]), r["seed"], out), one,
                      f"budget ablation {task.name}")
