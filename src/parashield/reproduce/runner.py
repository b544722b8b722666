"""The reproduction protocol: choose on validation, train every method over seeds, evaluate on test.

1. References: the task's classical baselines, fitted on train, tuned on validation, scored on test.
2. Selection (seed 0, scored on validation only): plain training's learning rate by clean
   validation metric; each defense's radius (and SAM's rho) at that rate by the validation
   robustness score, the mean of the oriented validation metric clean and under the multi-step
   corruption at every evaluation eps, then, where the task lists ``per_method_lrs``, the
   defense's own learning rate at that radius by the same score (plain training then also picks
   from those rates); APD's headline K the same way. Every run keeps the epoch with the best clean
   validation metric (early stopping on validation).
3. Final runs: every method with its chosen settings over all seeds (seed 0 reuses the
   selection run), evaluated on test: clean, random, one-step and multi-step corruption with 10
   and 50 steps and 50 steps with 5 restarts, the indicators on the attack data, the Taylor
   sweep and a per-layer table measured by corrupting one tensor at a time.

Each run lives in ``<out>/cache/<task>/<run>/seed<k>/``: ``train.pt`` (checkpoint after every
epoch, so an interrupted run resumes), ``valid.json`` and ``eval.json`` (plain's seed-0 run also
``weight_norm.json``, which scales SAM's rho grid); see :mod:`.cache`.
Several processes may share one output folder (e.g. one per core, each with ``--threads 1``):
the loops over runs (selection candidates, final runs, every later evaluation but the seed-0
Hessian densities) take first the runs no other process is working on (:func:`shared_map`).
"""

from __future__ import annotations

import math
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence, TypeVar

import torch
from torch import nn

from .._progress import progress
from ..budget import Budget
from ..checkpoint import load_checkpoint, save_checkpoint
from ..corruption import CorruptionResult, GradientCorruption, MultiStepCorruption, RandomCorruption, corrupted
from ..defense import APD, SAM, OneStepDefense
from ..indicators import loss_change
from ..objective import Objective, preserved_modes
from . import cache
from .tasks import Task

#: bump when what a run computes changes, so that older cache entries are recomputed
SCHEMA = 2


class TimeLimitReached(RuntimeError):
    """Training stopped at an epoch boundary because this invocation's time limit passed; every
    finished epoch is in the run's checkpoint, and the same command resumes from it."""


_deadline: Optional[float] = None  #: time.monotonic() after which no training epoch starts


@contextmanager
def time_limit(seconds: Optional[float]) -> Iterator[None]:
    """Within the block, no training epoch and no cached evaluation starts once ``seconds`` have
    passed (None: no limit): :class:`TimeLimitReached` is raised instead, so that long runs
    proceed in slices (a GPU lent for minutes at a time). Work already started (an epoch, one
    evaluation) runs to its end and is saved."""
    global _deadline
    before = _deadline
    _deadline = None if seconds is None else time.monotonic() + seconds
    try:
        yield
    finally:
        _deadline = before


def _check_deadline(where: str) -> None:
    if _deadline is not None and time.monotonic() >= _deadline:
        raise TimeLimitReached(f"time limit reached {where}")


@dataclass(frozen=True)
class Spec:
    """What one training run is: the method's family and its settings."""

    method: str  #: "plain" | "one_step" | "sam" | "sam_layer" | "apd"
    lr: float
    eps: Optional[float] = None  #: layer-relative L2 radius (rho for "sam", absolute)
    steps: int = 0  #: APD's K
    include_clean: bool = True
    #: compute-matched runs train this many times the epochs (rounded to whole epochs)
    epochs_factor: float = 1
    norm: str = "l2"  #: the defense budget's norm (layer-relative): "l2" or "linf"
    #: n-sparse defense budget: at most this many coordinates, ``eps`` an absolute radius
    sparsity: Optional[int] = None

    def key(self) -> dict:
        """The spec in cache keys: a field added after the cache existed enters only when it
        differs from its default, so that earlier runs stay valid."""
        return {k: v for k, v in asdict(self).items() if not (k == "norm" and v == "l2")
                and not (k == "sparsity" and v is None)}

    @property
    def passes(self) -> int:
        """Forward/backward passes per optimizer step: K + 1 for every defense (the clean pass
        builds the first corruption whether or not its loss enters the average)."""
        return {"plain": 1, "one_step": 2, "sam": 2, "sam_layer": 2}.get(self.method, self.steps + 1)

    @property
    def compute(self) -> float:
        """Gradient passes of the whole training run, in units of plain training's."""
        return self.passes * self.epochs_factor

    def name(self) -> str:
        """A short readable folder name."""
        parts = [self.method, f"lr{self.lr:g}"]
        if self.eps is not None:
            parts.append(f"eps{self.eps:.4g}")
        if self.method == "apd":
            parts.append(f"K{self.steps}" + ("" if self.include_clean else "-noclean"))
        if self.epochs_factor != 1:
            parts.append(f"x{self.epochs_factor:g}")
        if self.norm != "l2":
            parts.append(self.norm)
        if self.sparsity is not None:
            parts.append(f"n{self.sparsity}")
        return "_".join(parts)


#: the methods of the final comparison: label and how they are built from the selection
METHODS = {
    "plain": "plain training",
    "plain_matched": "plain training, compute-matched to the headline APD",
    "one_step": "one-step corruption-resistant training (APD K=1)",
    "sam": "SAM (absolute rho)",
    "sam_layer": "layer-relative SAM (K=1, clean loss excluded)",
    "apd2": "APD K=2",
    "apd3": "APD K=3",
    "apd5": "APD K=5",
    "apd3_noclean": "APD K=3 without the clean loss",
}
QUICK_METHODS = ("plain", "plain_matched", "one_step", "sam", "sam_layer", "apd3", "apd3_noclean")


def _oriented(task: Task, value: float) -> float:
    """Larger is better: the metric, or minus the log of a perplexity."""
    if task.higher_is_better:
        return value
    return -math.log(value) if value > 0 and math.isfinite(value) else -math.inf


def build_optimizer(spec: Spec, model: nn.Module, task: Task) -> torch.optim.Optimizer:
    if task.optimizer == "sgd":
        base, kw = torch.optim.SGD, dict(lr=spec.lr, momentum=task.momentum, weight_decay=task.weight_decay)
    else:
        base, kw = torch.optim.Adam, dict(lr=spec.lr, weight_decay=task.weight_decay)
    params = model.parameters()
    if spec.method == "plain":
        return base(params, **kw)
    if spec.method == "sam":
        return SAM(params, base, rho=spec.eps, **kw)
    if spec.sparsity is None:
        budget = Budget(spec.norm, spec.eps, scale="layer")
    else:
        budget = Budget(spec.norm, spec.eps, sparsity=spec.sparsity)
    if spec.method == "one_step":
        return OneStepDefense(params, base, budget=budget, **kw)
    if spec.method == "sam_layer":
        return APD(params, base, budget=budget, steps=1, include_clean=False, **kw)
    return APD(params, base, budget=budget, steps=spec.steps, include_clean=spec.include_clean, **kw)


def _metric(task: Task, model: nn.Module, data: list) -> float:
    with preserved_modes(model, False):
        return float(task.metric(model, data))


class Run:
    """One (task, spec, seed): trains on demand (resuming from its checkpoint) and caches its
    validation and test evaluations."""

    def __init__(self, task: Task, spec: Spec, seed: int, out: Path) -> None:
        self.task, self.spec, self.seed = task, spec, seed
        self.folder = out / "cache" / task.name / spec.name() / f"seed{seed}"
        self.key = cache.config_hash({"schema": SCHEMA, "task": task.run_config(), "spec": spec.key(), "seed": seed})
        self._model: Optional[nn.Module] = None

    def model(self) -> nn.Module:
        """The trained model (trained or loaded under the folder's lock)."""
        if self._model is None:
            with cache.locked(self.folder):
                self._model = self._train()
        return self._model

    def _train(self) -> nn.Module:
        """Train for ``epochs x epochs_factor`` epochs, keeping the epoch with the best clean
        validation metric; resumes from ``train.pt``."""
        task, spec = self.task, self.spec
        torch.manual_seed(self.seed)
        model = task.build_model()
        epochs = round(task.epochs * spec.epochs_factor)
        opt = build_optimizer(spec, model, task)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs)
        ckpt = self.folder / "train.pt"
        log: dict = {"epochs": [], "seconds": 0.0, "best_epoch": 0, "best_valid": -math.inf, "best_state": None}
        start = 0
        if ckpt.exists() and _checkpoint_key(ckpt) == self.key:
            extra = load_checkpoint(ckpt, model, opt, sched)
            log, start = extra["log"], extra["epoch"]
        for epoch in progress(range(start, epochs), desc=f"{task.name}/{spec.name()}/seed{self.seed}", initial=start,
                              total=epochs, unit="epoch"):
            _check_deadline(f"before epoch {epoch + 1} of {self.folder}; {epoch} epochs are checkpointed and the same "
                            "command resumes there")
            gen = torch.Generator().manual_seed(self.seed * 1000 + epoch)
            model.train()
            t0 = time.perf_counter()
            total, count = 0.0, 0
            for batch in task.train_epoch(gen):
                def closure(batch=batch):
                    opt.zero_grad()
                    loss = task.loss_fn(model, batch)
                    loss.backward()
                    return loss

                total += float(opt.step(closure).detach())
                count += 1
            sched.step()
            log["seconds"] += time.perf_counter() - t0
            valid = _oriented(task, _metric(task, model, task.valid_data))
            log["epochs"].append({"epoch": epoch + 1, "train_loss": total / max(count, 1), "valid": valid})
            if valid > log["best_valid"]:
                log.update(best_epoch=epoch + 1, best_valid=valid,
                           best_state={k: v.detach().clone() for k, v in model.state_dict().items()})
            save_checkpoint(ckpt, model, opt, sched, key=self.key, log=log, epoch=epoch + 1)
        if log["best_state"] is not None:
            model.load_state_dict(log["best_state"])
        self.log = {k: v for k, v in log.items() if k != "best_state"}
        return model.eval()

    def cached(self, kind: str, compute: Callable[[nn.Module], dict], extra_key: Any = None) -> dict:
        """The ``<kind>.json`` entry of this run ("valid", "eval", "bitflips"), computed once from
        the trained model; ``extra_key`` adds settings of that computation to the run's key."""
        path = self.folder / f"{kind}.json"
        key = self.key if extra_key is None else cache.config_hash({"run": self.key, "extra": extra_key})
        data = cache.load(path, key)
        if data is not None:
            return data
        with cache.locked(self.folder):
            data = cache.load(path, key)  # another process may have finished it meanwhile
            if data is None:
                _check_deadline(f"before computing {path}")
                if self._model is None:
                    self._model = self._train()
                t0 = time.perf_counter()
                data = {**compute(self._model), "train": self.log, "seconds": time.perf_counter() - t0}
                cache.store(path, key, data)
        return data


J = TypeVar("J")
R = TypeVar("R")


def shared_map(jobs: Sequence[J], run_of: Callable[[J], Run], work: Callable[[J, Run], R], desc: str) -> list[R]:
    """``[work(job, run_of(job)) for job in jobs]``, in the jobs' order, but computed taking first
    the jobs whose run folder no other process holds, so that several ``parashield reproduce``
    processes on one output folder share the work instead of queueing behind each other's locks
    (when every remaining run is held, the first is waited for). Each job's ``Run``, and the model
    it loads, lives only while its work runs. Not for use while this process holds a run lock:
    ``held_elsewhere`` cannot tell this process's own locks from another's."""
    folders = [run_of(job).folder for job in jobs]
    pending = list(range(len(jobs)))
    done: dict[int, R] = {}
    for _ in progress(range(len(jobs)), desc=desc, unit="run"):
        i = next((i for i in pending if not cache.held_elsewhere(folders[i])), pending[0])
        pending.remove(i)
        done[i] = work(jobs[i], run_of(jobs[i]))
    return [done[i] for i in range(len(jobs))]


def _checkpoint_key(path: Path) -> Optional[str]:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)["extra"].get("key")
    except Exception:  # unreadable or not ours: treated as stale
        return None


# ---------------------------------------------------------------------------- evaluations
def validation_score(task: Task, model: nn.Module, budget_at: Optional[Callable[[float], Budget]] = None) -> dict:
    """Clean validation metric and validation metric under the multi-step corruption (computed
    on the attack data) at every evaluation eps; ``score`` is their oriented mean.
    ``budget_at(eps)`` is the corruption's budget (default: the layer-relative L2 ball)."""
    budget_at = budget_at or (lambda eps: Budget("l2", eps, scale="layer"))
    attack = Objective(model, task.loss_fn, task.attack_data)
    clean = _metric(task, model, task.valid_data)
    under = []
    for eps in task.eval_eps:
        res = MultiStepCorruption(budget_at(eps), steps=task.multi_steps)(attack)
        with corrupted(model, res):
            under.append(_metric(task, model, task.valid_data))
    values = [_oriented(task, v) for v in [clean, *under]]
    return {"clean": clean, "multi_step": under, "score": sum(values) / len(values)}


def attacks(task: Task, budget: Budget, seed: int, objective: Objective) -> dict[str, CorruptionResult]:
    """The corruptions of the evaluation at one budget, by name, computed on ``objective``. The
    restarts' attack reuses the plain 50-step run as its first restart (the one from 0): the same
    result as ``MultiStepCorruption(restarts=...)`` with 50 fewer gradient passes."""
    strong = MultiStepCorruption(budget, steps=task.strong_steps)(objective)
    best = strong
    if task.strong_restarts > 1:
        others = MultiStepCorruption(budget, steps=task.strong_steps, random_start=True,
                                     restarts=task.strong_restarts - 1, seed=seed)(objective)
        best = others if others.loss_after > strong.loss_after else strong  # first best kept, as within one call
    return {"one_step": GradientCorruption(budget)(objective),
            "multi_step": MultiStepCorruption(budget, steps=task.multi_steps)(objective),
            "multi_step_50": strong, "multi_step_50x5": best}


def test_evaluation(task: Task, model: nn.Module, seed: int) -> dict:
    """Everything the findings read, on test data (corruptions computed on the attack data)."""
    test, data = task.test_data, task.corrupted_data
    attack = Objective(model, task.loss_fn, task.attack_data)
    test_obj = Objective(model, task.loss_fn, data)
    out: dict = {"clean": {"metric": _metric(task, model, test), "corrupted_subset_metric": _metric(task, model, data),
                           "loss": test_obj.loss(), "attack_loss": attack.loss()}, "grid": []}
    for eps in progress(task.eval_eps, desc=f"evaluate {task.name}", unit="eps"):
        budget = Budget("l2", eps, scale="layer")
        row: dict = {"eps": eps, "indicators": {"first_order": loss_change(attack, budget, "first_order")}}
        rc = RandomCorruption(budget, trials=task.random_trials, seed=seed)
        losses, metrics = [], []
        for delta in rc.samples(attack):
            with corrupted(model, dict(zip(attack.names, delta))):
                losses.append(test_obj.loss())
                metrics.append(_metric(task, model, data))
        row["random"] = {"loss": sum(losses) / len(losses), "metric": sum(metrics) / len(metrics)}
        row["indicators"]["random"] = rc(attack).mean_change
        for kind, res in attacks(task, budget, seed, attack).items():
            with corrupted(model, res):
                row[kind] = {"loss": test_obj.loss(), "metric": _metric(task, model, data)}
            row["indicators"][kind] = res.loss_change
        if task.curvature:
            row["indicators"]["second_order"] = loss_change(attack, budget, "second_order", iters=task.curvature_iters)
        out["grid"].append(row)
    out["sweep"] = []
    for eps in task.sweep_eps:
        budget = Budget("l2", eps, scale="layer")
        out["sweep"].append({"eps": eps, "first_order": loss_change(attack, budget, "first_order"),
                             "one_step": GradientCorruption(budget)(attack).loss_change})
    mid = task.eval_eps[len(task.eval_eps) // 2]
    out["layers_eps"], out["layers"] = mid, []
    for i, name in enumerate(attack.names):  # measured: one tensor corrupted at a time
        if task.layer_table == "matrices" and attack.params[i].dim() < 2:
            continue
        sub = attack.restrict([attack.params[i]])
        res = MultiStepCorruption(Budget("l2", mid, scale="layer"), steps=task.multi_steps)(sub)
        with corrupted(model, res):
            out["layers"].append({"name": name, "numel": attack.params[i].numel(),
                                  "metric": _metric(task, model, data), "loss_change": res.loss_change})
    return out


# ---------------------------------------------------------------------------- the protocol
def _norm(model: nn.Module) -> float:
    return float(torch.sqrt(sum((p.detach().double() ** 2).sum() for p in model.parameters())))


def select(task: Task, out: Path, methods: tuple[str, ...]) -> tuple[dict[str, Spec], dict]:
    """Choose every setting on validation (seed 0); returns the final specs by method and the
    ``selection`` record (candidates, their validation scores, the pick)."""
    record: dict = {}

    def valid(specs: list[Spec], what: str) -> list[dict]:
        """The validation entries of seed-0 runs of ``specs`` (trained and scored on demand)."""
        return shared_map(specs, lambda s: Run(task, s, 0, out),
                          lambda s, r: r.cached("valid", lambda m: validation_score(task, m)), f"{task.name} {what}")

    def pick(what: str, specs: list[Spec], score: Callable[[dict], float], candidates: list) -> Spec:
        scores = [score(v) for v in valid(specs, what)]
        best = max(range(len(specs)), key=lambda i: scores[i])
        record[what] = {"candidates": candidates, "validation": scores, "pick": candidates[best],
                        "selected_on": "validation",
                        "criterion": "clean validation metric" if what == "lr" else
                        "mean oriented validation metric, clean and under multi-step corruption at every eval eps"}
        return specs[best]

    rates = [*task.lr_grid, *(r for r in task.per_method_lrs if r not in task.lr_grid)]
    plain = pick("lr", [Spec("plain", r) for r in rates], lambda v: _oriented(task, v["clean"]), rates)
    lr = plain.lr
    robust = lambda v: v["score"]  # noqa: E731

    def defense(what: str, specs: list[Spec], radii: list) -> Spec:
        """The radius at plain's learning rate, then (``per_method_lrs``) the rate at that radius."""
        spec = pick(f"{what}_rho" if what == "sam" else f"{what}_eps", specs, robust, radii)
        if task.per_method_lrs:
            own = [lr, *(r for r in rates if r != lr)]
            spec = pick(f"{what}_lr", [replace(spec, lr=r) for r in own], robust, own)
        return spec

    eps_of = lambda method, steps=0: defense(  # noqa: E731
        f"{method}{steps or ''}", [Spec(method, lr, e, steps) for e in task.eps_grid], list(task.eps_grid))
    specs: dict[str, Spec] = {"plain": plain}
    if "one_step" in methods:
        specs["one_step"] = eps_of("one_step")
    if "sam_layer" in methods:
        specs["sam_layer"] = eps_of("sam_layer")
    if "sam" in methods:  # absolute rho spanning the layer-relative radii: eps * ||w|| of trained plain
        # cached beside the run, so that a resumed selection needs no checkpoint of plain
        w = Run(task, plain, 0, out).cached("weight_norm", lambda m: {"norm": _norm(m)})["norm"]
        rhos = [round(e * w, 6) for e in task.eps_grid]
        specs["sam"] = defense("sam", [Spec("sam", lr, r) for r in rhos], rhos)
        record["sam_rho"]["plain_weight_norm"] = w
    if methods == ("plain",):  # plain training alone (e.g. to see first whether a task can mean anything)
        return specs, record
    apd_ks = sorted({int(m[3]) for m in methods if m.startswith("apd")} | set(task.k_grid))
    for k in apd_ks:
        specs[f"apd{k}"] = eps_of("apd", k)
    if "apd3_noclean" in methods:
        specs["apd3_noclean"] = replace(specs["apd3"], include_clean=False)
    heads = [k for k in task.k_grid]
    scores = [robust(v) for v in valid([specs[f"apd{k}"] for k in heads], "headline_k")]
    head = heads[max(range(len(heads)), key=lambda i: scores[i])]
    record["headline_k"] = {"candidates": heads, "validation": scores, "pick": head, "selected_on": "validation",
                            "criterion": "validation robustness score of each K at its chosen eps"
                                         + (" and learning rate" if task.per_method_lrs else "")}
    specs["apd"] = specs[f"apd{head}"]
    if "plain_matched" in methods:
        specs["plain_matched"] = replace(plain, epochs_factor=specs["apd"].passes)
    return specs, record


def final_methods(task: Task, out: Path, methods: tuple[str, ...]
                  ) -> tuple[dict[str, Spec], dict, Optional[str], tuple[str, ...]]:
    """The selection on validation (:func:`select`), the headline APD's method (K chosen on
    validation; None for plain training alone) and the methods of the final runs (``methods``
    and the headline)."""
    specs, selection = select(task, out, methods)
    headline = f"apd{selection['headline_k']['pick']}" if "headline_k" in selection else None
    return specs, selection, headline, methods if headline in (None, *methods) else (*methods, headline)


def eval_entry(task: Task, run: Run) -> dict:
    """The run's ``eval.json`` entry: its test evaluation (computed on first use)."""
    return run.cached("eval", lambda m: test_evaluation(task, m, run.seed))


def run(task: Task, methods: Optional[tuple[str, ...]], seeds: int, out: Path) -> dict:
    """The whole protocol for one task: references, selection, final runs over ``seeds``. The
    headline APD (K chosen on validation) joins any methods but ``("plain",)`` alone."""
    methods = tuple(methods or task.methods or METHODS)
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"methods must be among {sorted(METHODS)}, got {unknown}")
    ref_key = cache.config_hash({"schema": SCHEMA, "task": task.run_config(), "references": True})
    ref_path = out / "cache" / task.name / "references.json"
    references = cache.load(ref_path, ref_key)
    if references is None:
        references = task.references()
        cache.store(ref_path, ref_key, references)
    specs, selection, headline, methods = final_methods(task, out, methods)

    def final(job: tuple[int, str], r: Run) -> dict:
        seed, method = job
        spec = specs[method]
        return {"method": method, "seed": seed, "spec": asdict(spec), "passes": spec.passes, "compute": spec.compute,
                "folder": str(r.folder.relative_to(out)), "eval": eval_entry(task, r)}

    jobs = [(seed, m) for seed in range(seeds) for m in methods]
    runs = shared_map(jobs, lambda job: Run(task, specs[job[1]], job[0], out), final, f"{task.name} runs")
    return {"task": task.name, "config": task.config(), "higher_is_better": task.higher_is_better,
            "chance": task.chance, "point": task.point, "references": references, "selection": selection,
            "headline": headline, "methods": list(methods), "seeds": seeds,
            "runs": runs}
