"""The paper reproduction: tasks (datasets, models, references), the protocol runner with its
cache, the bit-flip and budget experiments, the statistics and findings, and the report writer."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from .runner import METHODS, QUICK_METHODS, run
from .tasks import TASKS, Task


def run_task(task: Task, methods: Optional[tuple[str, ...]], seeds: int, out: Path) -> dict:
    """The protocol (:func:`run`) with the attack ensemble beside its projected-ascent attacks,
    then the bit-flip experiments (tasks that define them), the budget ablation and (tasks with
    ``spectrum``) the Hessian spectra of its final models; everything cached under ``out``."""
    from .ablation import run_budget_ablation
    from .ensemble import merge, run_ensemble
    from .faults import run_bitflips

    result = run(task, methods, seeds, out)
    merge(result, run_ensemble(task, result, out))
    if task.bitflips:
        result["bitflips"] = run_bitflips(task, result, out)
        result["bitflip_config"] = task.bitflips
    result["budget_ablation"] = run_budget_ablation(task, result, out)
    if task.shaped_defenses:
        from .shaped_defense import run_shaped_defenses

        result["shaped_defenses"] = run_shaped_defenses(task, result, out)
    if task.equal_compute:
        from .equal_compute import run_equal_compute

        result["equal_compute"] = run_equal_compute(task, result, out)
    if task.spectrum:
        from .spectrum import run_density

        result["hessian_density"] = run_density(task, result, out)
    return result


def write_report(results: dict, out):  # the report imports plotting lazily; keep the import light
    from .report import write_report as _write

    return _write(results, out)


__all__ = ["METHODS", "QUICK_METHODS", "TASKS", "Task", "run", "run_task", "write_report"]
