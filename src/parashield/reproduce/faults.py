"""Bit-flip experiments of the reproduction: each trained model is quantized to int8 (one scale
per output channel) and its test metric measured under random bit flips and under the
progressive bit search. Results are cached per run in ``bitflips.json`` beside ``train.pt``,
keyed by the run's configuration and the flip settings, so they are added to finished runs
without retraining."""

from __future__ import annotations

import copy
import functools
import json
import time
from pathlib import Path

from torch import nn

from .._progress import progress
from ..bitflip import ProgressiveBitSearch, RandomBitFlip
from ..checkpoint import load_checkpoint
from ..corruption import corrupted
from ..objective import Objective
from ..quantization import quantize_
from .runner import _metric, config_hash, run_key, write_json
from .tasks import Task


def flip_evaluate(task: Task, model: nn.Module, seed: int) -> dict:
    """Metric of the int8 model under ``task.bitflips["random"]`` random flips (``trials`` draws
    each) and after each flip of the progressive search, which stops at ``search_flips`` or when
    the metric falls to half its clean int8 value. The given model is not changed (a copy is
    quantized)."""
    cfg = task.bitflips
    if not cfg or not task.higher_is_better:
        raise ValueError(f"task {task.name!r} has no bit-flip settings for a higher-is-better metric "
                         "(flip experiments halve an accuracy-like metric)")
    model = copy.deepcopy(model).eval()
    q = quantize_(model, granularity="channel")

    metric = functools.partial(_metric, task)
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
    search = ProgressiveBitSearch(q, cfg["search_flips"], candidates=cfg["candidates"], metric=metric,
                                  target=clean / 2)(attack)
    halved = next((i for i, v in enumerate(search.metric_history) if v <= clean / 2), None)
    out["search"] = {"metric_history": search.metric_history, "loss_history": search.history,
                     "flips": [list(f) for f in search.flips], "flips_to_halve": halved,
                     "seconds": time.perf_counter() - t0}
    return out


def run_bitflips(task: Task, methods: tuple[str, ...], seeds: int, out: Path) -> list[dict]:
    """Flip experiments for every finished (method, seed) run of ``task`` under ``out``, reusing
    cached ones; runs without a finished training are skipped."""
    results = []
    jobs = [(seed, m) for seed in range(seeds) for m in methods if m in task.bitflip_methods]
    for seed, method in progress(jobs, desc=f"bit flips {task.name}", unit="run"):
        folder = out / "runs" / task.name / method / f"seed{seed}"
        train_key = run_key(task, method, seed)
        key = config_hash({"run": train_key, "bitflips": task.bitflips})
        cache = folder / "bitflips.json"
        cached = json.loads(cache.read_text()) if cache.exists() else {}
        if cached.get("key") == key:
            results.append(cached)
            continue
        done = folder / "eval.json"
        if not done.exists() or json.loads(done.read_text()).get("key") != train_key:
            continue
        model = task.build_model()
        load_checkpoint(folder / "train.pt", model, restore_rng=False)
        result = {"key": key, "method": method, "seed": seed, **flip_evaluate(task, model, seed)}
        write_json(cache, result)
        results.append(result)
    return results
