"""Finish a task's final runs one run at a time: train it (or load it), then its test evaluation,
attack ensemble and budget ablation while the model is loaded, writing the cache entries that
``parashield reproduce`` reads. Meant for a short lease of a GPU: ``parashield reproduce`` works
phase by phase (every run trained and evaluated, then every run's ensemble, ...), so a lease that
ends mid-way leaves no run finished, and checkpoints too large to bring back are lost with it.

Several processes may share the output folder. ``--skip method:seed`` leaves runs to another
machine (e.g. runs whose checkpoints exist only there). Afterwards ``parashield reproduce --task
<task> --out <out>`` finds the entries and writes the report.

    python scripts/finish_runs.py ptb --out results --device cuda --minutes 7 --skip one_step:0
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from parashield._cli_setup import load_task
from parashield.reproduce.ablation import ablated, budgets_entry
from parashield.reproduce.ensemble import ensemble_entry
from parashield.reproduce.runner import (
    METHODS,
    Run,
    TimeLimitReached,
    eval_entry,
    final_methods,
    shared_map,
    time_limit,
)
from parashield.reproduce.tasks import Task


def finish(task: Task, out: Path, skip: frozenset = frozenset()) -> None:
    """Select on validation (cached), then finish every final run of ``task`` but ``skip``
    ((method, seed) pairs), one run at a time."""
    specs, _, headline, methods = final_methods(task, out, tuple(task.methods or METHODS))
    jobs = [(seed, m) for seed in range(task.seeds) for m in methods if (m, seed) not in skip]

    def one(job: tuple[int, str], run: Run) -> None:
        eval_entry(task, run)
        ensemble_entry(task, run)
        if ablated(job[1], headline):
            budgets_entry(task, run)

    shared_map(jobs, lambda job: Run(task, specs[job[1]], job[0], out), one, f"{task.name} finish")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("task")
    p.add_argument("--out", default="results")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--minutes", type=float, default=None, help="stop cleanly (between epochs) after this long")
    p.add_argument("--skip", nargs="*", default=[], help="runs left out, as method:seed")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    skip = frozenset((m, int(s)) for m, s in (x.split(":") for x in args.skip))
    try:
        with time_limit(None if args.minutes is None else 60 * args.minutes):
            finish(load_task(args.task).on(args.device), Path(args.out), skip)
    except TimeLimitReached as exc:
        print(f"stopped: {exc}")
        return 75
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
