"""Hessian spectra of the reproduction's models: the stochastic-Lanczos density of the loss's
Hessian on the attack data for the seed-0 model of plain training, SAM and the headline APD
(tasks whose ``spectrum`` is set: digits, fashion). Flatter minima have their mass nearer 0 and a smaller top
eigenvalue. Cached per run in ``density.json``."""

from __future__ import annotations

from pathlib import Path

from torch import nn

from ..curvature import hessian_density
from ..objective import Objective
from .runner import Run, Spec
from .tasks import Task

#: stochastic Lanczos quadrature: probe vectors and Lanczos steps per probe
SETTINGS = {"probes": 4, "iters": 60}
#: negative curvature counts from -NEGATIVE_SHARE x the largest Ritz value down: the quadrature
#: mass of the near-zero bulk falls on both sides of 0, and counting every node below 0 measured
#: where that bulk's nodes land more than negative curvature
NEGATIVE_SHARE = 0.01


def density_evaluate(task: Task, model: nn.Module) -> dict:
    """The smoothed density, the extreme Ritz values, the quadrature nodes and weights per probe,
    and the mass below ``-NEGATIVE_SHARE`` x the largest Ritz value (mean over probes)."""
    d = hessian_density(Objective(model, task.loss_fn, task.attack_data), seed=0, **SETTINGS)
    top = float(d.nodes.max())
    return {"grid": d.grid.tolist(), "density": d.density.tolist(), "top": top, "bottom": float(d.nodes.min()),
            "nodes": d.nodes.tolist(), "weights": d.weights.tolist(), "negative_share": NEGATIVE_SHARE,
            "negative_mass": float((d.weights * (d.nodes < -NEGATIVE_SHARE * top)).sum(1).mean())}


def run_density(task: Task, result: dict, out: Path) -> dict:
    """Densities of the seed-0 plain, SAM and headline APD models (where they were run)."""
    wanted = [m for m in ("plain", "sam", result["headline"]) if m in result["methods"]]
    rows = {}
    for r in result["runs"]:
        if r["seed"] == 0 and r["method"] in wanted:
            run = Run(task, Spec(**r["spec"]), 0, out)
            rows[r["method"]] = run.cached("density", lambda m: density_evaluate(task, m),
                                           extra_key={**SETTINGS, "negative_share": NEGATIVE_SHARE})
    return rows
