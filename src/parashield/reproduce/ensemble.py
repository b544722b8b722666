"""The step-size-free attack ensemble (:func:`parashield.evaluate_robustness`) on every final
model of the reproduction, beside its projected-ascent attacks: searched on the attack data,
reported on the same test examples as the other corruptions. Cached per run in
``ensemble.json``; :func:`merge` adds it to each evaluation's grid as the attack ``"ensemble"``."""

from __future__ import annotations

from pathlib import Path

from torch import nn

from ..budget import Budget
from ..evaluation import evaluate_robustness
from ..objective import Objective
from .runner import Run, Spec, _metric, shared_map
from .tasks import Task

def ensemble_evaluate(task: Task, model: nn.Module, seed: int) -> dict:
    attack = Objective(model, task.loss_fn, task.attack_data)
    test = Objective(model, task.loss_fn, task.corrupted_data)
    ev = evaluate_robustness(attack, Budget("l2", task.eval_eps[0], scale="layer"), eps=list(task.eval_eps),
                             classification=task.metric_name == "accuracy", heldout=test,
                             metric=lambda m: _metric(task, m, task.corrupted_data), seed=seed,
                             steps=task.ensemble_steps, restarts=task.ensemble_restarts)
    return {"rows": [{"eps": r.eps, "metric": r.metric_after, "loss": r.heldout_after, "member": r.member,
                      "attack_loss_change": r.loss_change, "passes": r.passes} for r in ev.results]}


def ensemble_entry(task: Task, run: Run) -> dict:
    """The run's ``ensemble.json`` entry (computed on first use)."""
    return run.cached("ensemble", lambda m: ensemble_evaluate(task, m, run.seed),
                      extra_key={"steps": task.ensemble_steps, "restarts": task.ensemble_restarts})


def run_ensemble(task: Task, result: dict, out: Path) -> list[dict]:
    """The ensemble for every final run of a protocol result."""

    def one(r: dict, run: Run) -> dict:
        return {"method": r["method"], "seed": r["seed"], **ensemble_entry(task, run)}

    return shared_map(result["runs"], lambda r: Run(task, Spec(**r["spec"]), r["seed"], out), one,
                      f"attack ensemble {task.name}")


def merge(result: dict, rows: list[dict]) -> None:
    """Put each run's ensemble result into its evaluation grid as the attack ``"ensemble"``."""
    by = {(r["method"], r["seed"]): r for r in rows}
    for run in result["runs"]:
        for g, e in zip(run["eval"]["grid"], by[(run["method"], run["seed"])]["rows"]):
            g["ensemble"] = {"metric": e["metric"], "loss": e["loss"], "member": e["member"]}
