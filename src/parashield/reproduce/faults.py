"""Bit-flip experiments of the reproduction: each final model is quantized to int8 (one scale per
output channel) and its test metric measured under random bit flips and along the progressive bit
search; and, on the float32 weights themselves, under random flips of exponent bits (the faults
that turn a weight into a huge number). Cached per run in ``bitflips.json`` and
``float_flips.json`` beside ``train.pt``."""

from __future__ import annotations

import bisect
import copy
import itertools
import time
from pathlib import Path

from torch import nn

from ..bitflip import ProgressiveBitSearch, RandomBitFlip
from ..corruption import corrupted
from ..objective import Objective
from ..quantization import quantize_
from .findings import CONTROLS
from .runner import Run, Spec, _metric, shared_map
from .tasks import Task


def per_flip(history: list[float], flips_per_round: list[int]) -> list[float]:
    """A search's per-round history as one value per flip count 0, 1, ..., total: after n flips,
    the value of the last round ended within n flips (a round that escalated to a group of k bits
    counts once all k are flipped)."""
    done = list(itertools.accumulate(flips_per_round, initial=0))  # flips after each round
    return [history[bisect.bisect_right(done, n) - 1] for n in range(done[-1] + 1)]


def flip_evaluate(task: Task, model: nn.Module, seed: int) -> dict:
    """Metric of the int8 model under ``task.bitflips["random"]`` random flips (``trials`` draws
    each) and along the progressive search, which stops at ``search_flips`` or when the metric
    falls to half its clean int8 value (histories per flip, see :func:`per_flip`). The given model
    is not changed (a copy is quantized)."""
    cfg = task.bitflips
    if not cfg or not task.higher_is_better:
        raise ValueError(f"task {task.name!r} has no bit-flip settings for a higher-is-better metric "
                         "(flip experiments halve an accuracy-like metric)")
    model = copy.deepcopy(model).eval()
    q = quantize_(model, granularity="channel")
    data = task.corrupted_data

    def metric(m: nn.Module) -> float:
        return _metric(task, m, data)

    attack = Objective(model, task.loss_fn, task.attack_data[: cfg["search_batches"]])
    clean = metric(model)
    out: dict = {"quantized_metric": clean, "bits": q.bits, "random": []}
    for n in cfg["random"]:
        values = []
        for t in range(cfg["trials"]):
            res = RandomBitFlip(n, quantization=q, seed=seed * 1000 + t)(attack)
            with corrupted(model, res):
                values.append(metric(model))
        out["random"].append({"flips": n, "metrics": values})
    t0 = time.perf_counter()
    search = ProgressiveBitSearch(q, cfg["search_flips"], candidates=cfg["candidates"], max_group=cfg["max_group"],
                                  metric=metric, target=clean / 2)(attack)
    metrics = per_flip(search.metric_history, search.flips_per_round)
    halved = next((n for n, v in enumerate(metrics) if v <= clean / 2), None)
    out["search"] = {"metric_history": metrics, "loss_history": per_flip(search.history, search.flips_per_round),
                     "flips": [list(f) for f in search.flips], "flips_per_round": search.flips_per_round,
                     "stopped": search.stopped, "flips_to_halve": halved, "seconds": time.perf_counter() - t0}
    return out


#: random float32 exponent-bit flips: flip counts, and draws of each
FLOAT_FLIPS = {"random": (1, 3, 10), "trials": 5}


def float_flip_evaluate(task: Task, model: nn.Module, seed: int) -> dict:
    """Test metric of the float model under random flips of exponent bits of its weights."""
    attack = Objective(model, task.loss_fn, task.attack_data[:1])
    data = task.corrupted_data
    out = {"float_metric": _metric(task, model, data), "random": []}
    for n in FLOAT_FLIPS["random"]:
        values = []
        for t in range(FLOAT_FLIPS["trials"]):
            res = RandomBitFlip(n, bits="exponent", seed=seed * 1000 + t)(attack)
            with corrupted(model, res):
                values.append(_metric(task, model, data))
        out["random"].append({"flips": n, "metrics": values})
    return out


def run_bitflips(task: Task, result: dict, out: Path) -> list[dict]:
    """Flip experiments for the plain model, the controls and the headline APD of a finished
    :func:`.runner.run` result, over its seeds."""
    wanted = {*CONTROLS, result["headline"]}
    jobs = [r for r in result["runs"] if r["method"] in wanted]

    def one(r: dict, run: Run) -> dict:
        data = run.cached("bitflips", lambda m: flip_evaluate(task, m, r["seed"]), extra_key=task.bitflips)
        floats = run.cached("float_flips", lambda m: float_flip_evaluate(task, m, r["seed"]), extra_key=FLOAT_FLIPS)
        return {"method": r["method"], "seed": r["seed"], **data, "float32_exponent": floats}

    return shared_map(jobs, lambda r: Run(task, Spec(**r["spec"]), r["seed"], out), one, f"bit flips {task.name}")
