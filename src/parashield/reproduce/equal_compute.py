"""APD's K at equal compute: does a longer trajectory help when the extra passes could have been
more epochs instead? Every K of the protocol (one-step training as K = 1) is trained for
``epochs x (K_max + 1) / (K + 1)`` epochs, so every run makes the gradient passes of the largest
K at the task's epochs, each at the eps chosen on validation for its K, over all seeds; each final
model is measured clean and under the attack ensemble. Cached per run in ``equal_compute.json``."""

from __future__ import annotations

from dataclasses import asdict
from fractions import Fraction
from pathlib import Path

from torch import nn

from .ensemble import ensemble_evaluate
from .runner import Run, Spec, _metric, shared_map
from .tasks import Task


def specs(task: Task, selection: dict) -> dict[int, Spec]:
    """One spec per K whose eps (and learning rate) was chosen on validation (``one_step_*`` for K = 1)."""
    picks = {int(k[3:-4]): v["pick"] for k, v in selection.items() if k.startswith("apd") and k.endswith("_eps")
             and k[3:-4].isdigit()}
    if "one_step_eps" in selection:
        picks[1] = selection["one_step_eps"]["pick"]
    if len(picks) < 2:
        return {}
    top = max(picks) + 1
    out = {}
    for k, eps in sorted(picks.items()):
        factor = Fraction(top, k + 1)
        method = "one_step" if k == 1 else "apd"
        lr = selection.get("one_step_lr" if k == 1 else f"apd{k}_lr", selection["lr"])["pick"]
        out[k] = Spec(method, lr, eps, 0 if k == 1 else k,
                      epochs_factor=int(factor) if factor.denominator == 1 else float(factor))
    return out


def compute_evaluate(task: Task, model: nn.Module, seed: int) -> dict:
    return {"clean": _metric(task, model, task.test_data),
            "clean_subset_metric": _metric(task, model, task.corrupted_data),
            "ensemble": ensemble_evaluate(task, model, seed)["rows"]}


def run_equal_compute(task: Task, result: dict, out: Path) -> list[dict]:
    """The runs of every K at equal compute over the result's seeds (a K = K_max run is the
    protocol's own, reused from the cache)."""
    jobs = [(k, spec, seed) for k, spec in specs(task, result["selection"]).items() for seed in range(result["seeds"])]
    settings = {"steps": task.ensemble_steps, "restarts": task.ensemble_restarts}

    def one(job: tuple[int, Spec, int], run: Run) -> dict:
        k, spec, seed = job
        data = run.cached("equal_compute", lambda m: compute_evaluate(task, m, seed), extra_key=settings)
        return {"k": k, "seed": seed, "spec": asdict(spec), "compute": spec.compute,
                "epochs": len(data["train"]["epochs"]), **data}

    return shared_map(jobs, lambda job: Run(task, job[1], job[2], out), one, f"K at equal compute {task.name}")
