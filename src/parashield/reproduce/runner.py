"""Train each method, evaluate it under corruption, cache every run by its configuration.

A run is one (task, method, seed). Its folder holds ``train.pt`` (checkpoint after each epoch, so
an interrupted run resumes) and ``eval.json`` (the finished evaluation); both carry a hash of the
configuration, and a folder whose hash differs is recomputed.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from pathlib import Path
from typing import Any, Optional

import torch
from torch import nn

from .. import __version__
from .._progress import progress
from ..budget import Budget
from ..checkpoint import load_checkpoint, save_checkpoint
from ..corruption import (
    CORRUPTION_KINDS,
    GradientCorruption,
    MultiStepCorruption,
    RandomCorruption,
    corrupted,
)
from ..defense import APD, SAM, OneStepDefense
from ..indicators import (
    critical_eps,
    hessian_top_eigenvalue,
    hessian_trace,
    layer_vulnerability,
    loss_change,
)
from ..objective import Objective, preserved_modes
from .tasks import Task

#: method name -> (label, APD steps or None for plain training)
METHODS = {
    "plain": "plain training",
    "one_step": "one-step corruption-resistant training (K=1)",
    "sam": "SAM",
    "apd2": "APD K=2",
    "apd3": "APD K=3",
    "apd5": "APD K=5",
}
QUICK_METHODS = ("plain", "one_step", "sam", "apd3")
CORRUPTIONS = CORRUPTION_KINDS


def config_hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def run_key(task: Task, method: str, seed: int) -> str:
    """Cache key of one (task, method, seed) run: everything that changes its results."""
    return config_hash({"task": task.config(), "method": method, "seed": seed, "version": __version__})


def write_json(path: Path, data: Any) -> None:
    """Atomic JSON write (temp file + rename)."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True, default=float))
    os.replace(tmp, path)


def build_optimizer(method: str, model: nn.Module, task: Task) -> torch.optim.Optimizer:
    if method not in METHODS:
        raise ValueError(f"method must be one of {sorted(METHODS)}, got {method!r}")
    if task.optimizer == "sgd":
        base, kw = torch.optim.SGD, dict(lr=task.lr, momentum=task.momentum, weight_decay=task.weight_decay)
    else:
        base, kw = torch.optim.Adam, dict(lr=task.lr, weight_decay=task.weight_decay)
    params = model.parameters()
    budget = Budget("l2", task.train_eps, scale="layer")
    if method == "plain":
        return base(params, **kw)
    if method == "one_step":
        return OneStepDefense(params, base, budget=budget, **kw)
    if method == "sam":
        return SAM(params, base, rho=task.sam_rho, **kw)
    return APD(params, base, budget=budget, steps=int(method[3:]), **kw)


def train(task: Task, method: str, seed: int, folder: Path, key: str) -> tuple[nn.Module, dict]:
    """Train (or resume, or load) one run; returns the model and its training log."""
    torch.manual_seed(seed)
    model = task.build_model()
    opt = build_optimizer(method, model, task)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=task.epochs)
    ckpt = folder / "train.pt"
    log: dict = {"epochs": [], "seconds": 0.0}
    start = 0
    # A checkpoint of another configuration (maybe another model shape) is never loaded: start over.
    if ckpt.exists() and _checkpoint_key(ckpt) == key:
        extra = load_checkpoint(ckpt, model, opt, sched)
        log, start = extra["log"], extra["epoch"]
    gen = torch.Generator().manual_seed(seed * 1000 + start)
    for epoch in progress(range(start, task.epochs), desc=f"{task.name}/{method}/seed{seed}", initial=start,
                           total=task.epochs, unit="epoch"):
        model.train()
        t0 = time.perf_counter()
        total, count = 0.0, 0
        for batch in task.train_epoch(gen):
            def closure(batch=batch):
                opt.zero_grad()
                loss = task.loss_fn(model, batch)
                loss.backward()
                return loss

            loss = opt.step(closure)
            total += float(loss.detach())
            count += 1
        sched.step()
        log["seconds"] += time.perf_counter() - t0
        log["epochs"].append({"epoch": epoch + 1, "train_loss": total / max(count, 1)})
        gen = torch.Generator().manual_seed(seed * 1000 + epoch + 1)
        save_checkpoint(ckpt, model, opt, sched, key=key, log=log, epoch=epoch + 1)
    model.eval()
    return model, log


def _checkpoint_key(path: Path) -> Optional[str]:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)["extra"].get("key")
    except Exception:  # unreadable or not ours: treated as stale
        return None


def _metric(task: Task, model: nn.Module) -> float:
    with preserved_modes(model, False):
        return float(task.metric(model, task.test_data))


def evaluate(task: Task, model: nn.Module, seed: int) -> dict:
    """Clean and corrupted test metrics over the eps grid, indicators, per-layer table, critical eps."""
    test = Objective(model, task.loss_fn, task.test_data)
    attack = Objective(model, task.loss_fn, task.attack_data)
    clean_loss, clean_metric = test.loss(), _metric(task, model)
    out: dict = {"clean": {"loss": clean_loss, "metric": clean_metric, "attack_loss": attack.loss()}, "grid": []}
    grid = [(s, e) for s, values in task.eval_eps.items() for e in values]
    for scale, eps in progress(grid, desc=f"evaluate {task.name}", unit="eps"):
        budget = Budget("l2", eps, scale="layer" if scale == "layer" else None)
        row: dict = {"scale": scale, "eps": eps}
        rc = RandomCorruption(budget, trials=task.random_trials, seed=seed)
        losses, metrics = [], []
        for delta in rc.samples(attack):
            with corrupted(model, dict(zip(attack.names, delta))):
                losses.append(test.loss())
                metrics.append(_metric(task, model))
        (loss_mean, loss_std), (metric_mean, metric_std) = mean_std(losses), mean_std(metrics)
        row["random"] = {"loss": loss_mean, "loss_std": loss_std, "metric": metric_mean, "metric_std": metric_std}
        indicators = {"first_order": loss_change(attack, budget, "first_order")}
        for kind, corr in (("one_step", GradientCorruption(budget)),
                           ("multi_step", MultiStepCorruption(budget, steps=task.multi_steps))):
            res = corr(attack)
            with corrupted(model, res):
                row[kind] = {"loss": test.loss(), "metric": _metric(task, model)}
            indicators[kind] = res.loss_change
        indicators["random"] = rc(attack).mean_change
        if task.curvature:
            indicators["second_order"] = loss_change(attack, budget, "second_order", iters=task.curvature_iters)
        row["indicators"] = indicators
        out["grid"].append(row)
    out["sweep"] = []  # finding 3: first-order indicator vs the measured one-step change as eps -> 0
    for eps in task.sweep_eps:
        budget = Budget("l2", eps, scale="layer")
        out["sweep"].append({"eps": eps, "first_order": loss_change(attack, budget, "first_order"),
                             "one_step": GradientCorruption(budget)(attack).loss_change})
    mid = task.eval_eps["layer"][len(task.eval_eps["layer"]) // 2]
    out["layers"] = [vars(r) for r in layer_vulnerability(attack, Budget("l2", mid, scale="layer"))]
    out["layers_eps"] = mid
    drop = task.metric_drop
    sign = 1.0 if task.higher_is_better else -1.0
    out["critical_eps"] = {
        kind: critical_eps(attack, Budget("l2", task.eval_eps["layer"][0], scale="layer"),
                           lambda m: sign * task.metric(m, task.test_data), drop, corruption=kind,
                           iters=task.critical_iters, max_doublings=task.critical_doublings,
                           **({"steps": 5} if kind == "multi_step" else {"trials": 3, "seed": seed} if kind == "random" else {}))
        for kind in task.critical_kinds
    }
    out["critical_eps_definition"] = f"layer-relative L2 eps at which {task.metric_name} worsens by {drop}"
    if task.curvature:
        out["hessian"] = {"top_eigenvalue": hessian_top_eigenvalue(attack, iters=task.curvature_iters),
                          "trace": hessian_trace(attack, samples=task.trace_samples, seed=seed)}
    return out


def mean_std(xs: list[float]) -> tuple[float, float]:
    """Mean and sample std (0 for one value). Missing values (None, NaN) are left out; an
    infinite value (a loss or perplexity that overflowed, a critical eps never reached) makes
    the mean infinite and the std NaN."""
    xs = [float(x) for x in xs if x is not None and not math.isnan(x)]
    if not xs:
        return math.nan, math.nan
    if any(math.isinf(x) for x in xs):
        return sum(xs) / len(xs), math.nan  # +-inf (NaN if both signs occur)
    m = sum(xs) / len(xs)
    s = math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else 0.0
    return m, s


def run(task: Task, methods: tuple[str, ...], seeds: int, out: Path) -> dict:
    """Train and evaluate every (method, seed), reusing cached runs; returns all run results."""
    runs = []
    for seed in range(seeds):
        for method in methods:
            key = run_key(task, method, seed)
            folder = out / "runs" / task.name / method / f"seed{seed}"
            folder.mkdir(parents=True, exist_ok=True)
            done = folder / "eval.json"
            if done.exists():
                cached = json.loads(done.read_text())
                if cached.get("key") == key:
                    runs.append(cached)
                    continue
            t0 = time.perf_counter()
            model, log = train(task, method, seed, folder, key)
            t1 = time.perf_counter()
            result = {"key": key, "task": task.name, "method": method, "seed": seed, "train": log,
                      "eval": evaluate(task, model, seed), "eval_seconds": time.perf_counter() - t1,
                      "train_seconds_this_session": t1 - t0}
            write_json(done, result)
            runs.append(result)
    return {"task": task.name, "config": task.config(), "higher_is_better": task.higher_is_better, "runs": runs}
