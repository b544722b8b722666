"""Fuzz suite: every public callable, one argument at a time, given bad values from a registry
(wrong types, NaN/inf/negative/zero/huge numbers, empty data, wrong shapes and dtypes, foreign
objects). Each call must end in a named error (ValueError, TypeError or one of parashield's
errors, FileNotFoundError for a missing file) and leave the model's parameters, ``.grad``,
buffers, modes and ``requires_grad`` flags as they were, bit for bit.

The registry's explicit examples run in full; hypothesis draws more from each category's
strategy (a few examples per argument, so the suite stays fast)."""

from __future__ import annotations

import atexit
import copy
import math
import pathlib
import re
import shutil
import tempfile
from dataclasses import dataclass
from typing import Any, Callable, Optional

import numpy as np
import pytest
import torch
from torch import nn

import parashield as ps

from test_safety import assert_same_state, ce, metric_of, snapshot, stateful_setup

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

#: What a bad argument may raise: the named errors.
NAMED = (ValueError, TypeError, ps.NonFiniteGradientError, FileNotFoundError)


# ------------------------------------------------------------------------------ the environment
class Env:
    """A stateful model (BatchNorm, dropout, a frozen parameter, a counter buffer, mixed modes,
    some ``.grad`` set) quantized to int8, its batches and objective, and files for checkpoints."""

    files: Optional[pathlib.Path] = None

    def __init__(self) -> None:
        self.model, self.batches = stateful_setup()
        self.quantization = ps.quantize_(self.model)
        self.objective = ps.Objective(self.model, ce, self.batches)

    @classmethod
    def folder(cls) -> pathlib.Path:
        if cls.files is None:
            cls.files = pathlib.Path(tempfile.mkdtemp(prefix="parashield-fuzz-"))
            atexit.register(shutil.rmtree, cls.files, ignore_errors=True)
            (cls.files / "notes.txt").write_text("not a checkpoint")
            (cls.files / "empty.pt").write_bytes(b"")
            torch.save(nn.Linear(2, 2).state_dict(), cls.files / "state_dict.pt")
            ps.save_checkpoint(cls.files / "other.pt", nn.Linear(2, 2))
            torch.save([1, 2, 3], cls.files / "list.pt")
        return cls.files


@dataclass(frozen=True)
class Lazy:
    """A bad value built from the environment at call time (tensors of the model's shapes...)."""

    name: str
    build: Callable[[Env], Any]

    def __repr__(self) -> str:
        return self.name


def resolve(value: Any, env: Env) -> Any:
    return value.build(env) if isinstance(value, Lazy) else value


MODEL = Lazy("the model itself", lambda env: env.model)


def wrong_shapes(env: Env) -> list:
    return [torch.zeros(p.numel() + 1) for p in env.objective.params]


def non_finite(env: Env) -> list:
    out = [torch.zeros_like(p) for p in env.objective.params]
    out[0].view(-1)[0] = math.nan
    return out


# ------------------------------------------------------------------------------ the registry
not_finite_positive = st.floats().filter(lambda x: not (math.isfinite(x) and x > 0))
junk = st.one_of(st.none(), st.booleans(), st.text(max_size=3), st.just([1]), st.just({}))

REGISTRY: dict[str, tuple[list, Any]] = {
    # category: (explicit examples, hypothesis strategy)
    "count": ([0, -1, 1.5, "3", None, True, math.nan, math.inf, [1], np.float64(2.0)],
              st.one_of(st.integers(max_value=0), st.floats(), junk)),
    "count_or_none": ([0, -1, 1.5, "3", True, math.nan, [1]],
                      st.one_of(st.integers(max_value=0), st.floats(), st.booleans(), st.text(max_size=3))),
    "seed": ([None, 1.5, "0", True, 2**64, -(2**63) - 1, 2**70, math.nan],
             st.one_of(st.floats(), junk, st.integers(min_value=2**64), st.integers(max_value=-(2**63) - 1))),
    "positive": ([0, 0.0, -1, -1e-9, math.nan, math.inf, -math.inf, "0.1", None, True],
                 st.one_of(not_finite_positive, st.integers(max_value=0), junk)),
    "positive_or_none": ([0, -1, math.nan, math.inf, "0.1", True],
                         st.one_of(not_finite_positive, st.integers(max_value=0), st.text(max_size=3))),
    "non_negative": ([-1, -1e-300, math.nan, math.inf, -math.inf, "0", None, True],
                     st.one_of(st.floats().filter(lambda x: not (math.isfinite(x) and x >= 0)),
                               st.integers(max_value=-1), junk)),
    "finite_or_none": ([math.nan, math.inf, -math.inf, "1", True],
                       st.one_of(st.floats().filter(lambda x: not math.isfinite(x)), st.text(max_size=3))),
    "bool": ([1, 0, "yes", None, 1.0, [True]],
             st.one_of(st.integers(), st.floats(), st.text(max_size=3), st.none())),
    "choice": (["", "foo", None, 3, 1.5, ["l2"], "L 2"],
               st.one_of(st.text(max_size=6), st.integers(min_value=3), st.floats(), st.none())),
    "budget": (["l2", 0.1, {}, ("l2", 0.1), 3, ps.FlipBudget(1, (0,))],
               st.one_of(st.text(max_size=3), st.floats(), st.integers())),
    "objective": ([MODEL, None, "objective", 3, (MODEL, ce)], st.one_of(st.just(MODEL), junk, st.integers())),
    "model": ([None, "x", 3, [MODEL]], st.one_of(junk, st.integers())),
    "data": ([(), {}, [], None, 3, "abc", iter([]), b"",
              Lazy("float64 batches for a float32 model", lambda env: [(x.double(), y) for x, y in env.batches])],
             st.one_of(st.integers(), st.none(), st.just(()))),
    "loss_fn": ([None, 3, "ce", nn.CrossEntropyLoss(), nn.functional.cross_entropy,
                 lambda output, target: nn.functional.cross_entropy(output, target),
                 lambda m, b: m(b[0]).argmax(), lambda m, b: ce(m, b).detach(), lambda m, b: m(b[0]),
                 lambda m, b: 1.0, lambda m, b: torch.tensor(math.nan), lambda: 0.0],
                st.one_of(junk, st.integers())),
    "params": (["nomatch*", [], 3, [1, "a"], (lambda n, p: False), ["frozen"], nn.Linear(2, 2),
                [torch.zeros(2)], "calls"],
               st.one_of(st.text(min_size=1, max_size=4).map(lambda s: "zz" + s), st.integers(), st.floats())),
    "tensors": ([[], None, "d", Lazy("wrong shapes", wrong_shapes), Lazy("a NaN entry", non_finite),
                 Lazy("one tensor short", lambda env: non_finite(env)[1:]), [1.0, 2.0]],
                st.one_of(st.none(), st.text(max_size=2), st.lists(st.floats(), max_size=3))),
    "coords": ([[], "ab", [[1.0, 2.0]], None, [math.nan], [math.inf, 0.0], [0.0, "x"], torch.zeros(2, 2)],
               st.lists(st.floats(), min_size=1, max_size=4).filter(lambda xs: not all(map(math.isfinite, xs)))),
    "mapping": ([None, "x", [1], {"nope": torch.zeros(1)}, {"fc1.weight": 0.5}, {"fc1.weight": torch.zeros(2)},
                 {"fc1.weight": np.zeros((6, 4))}],
                st.dictionaries(st.text(max_size=4), st.floats(), min_size=1, max_size=2)),
    "quantization": ([None, "q", 3, Lazy("a foreign quantization", lambda env: ps.quantize_(copy.deepcopy(env.model)))],
                     st.one_of(junk, st.integers())),
    "bits": ([-1, 8, 99, "exponent", "foo", [], 1.5, [None], True],
             st.one_of(st.integers(max_value=-1), st.integers(min_value=8), st.text(min_size=1, max_size=4)
                       .filter(lambda s: s != "sign"), st.floats())),
    "callable": ([3, "acc", [len]], st.one_of(st.integers(), st.text(max_size=3), st.floats())),
    "optimizer_class": ([None, "SGD", nn.Linear, 3, Lazy("an optimizer instance",
                                                         lambda env: torch.optim.SGD(env.model.parameters(), lr=0.1))],
                        st.one_of(junk, st.integers())),
    "param_list": ([[], 3, "abc", None], st.one_of(st.just([]), st.integers(), st.none())),
    "path": ([Lazy(n, lambda env, n=n: Env.folder() / n) for n in
              ("notes.txt", "empty.pt", "state_dict.pt", "other.pt", "list.pt", "missing.pt")] + [3, None],
             st.one_of(st.integers(), st.none())),
    "plain": ([np.zeros(2), pathlib.Path("/tmp/x"), object(), {"k": object()}, [np.ones(1)]],
              st.one_of(st.just(object()), st.builds(pathlib.Path, st.text(max_size=3)))),
    "optimizer": (["sgd", 3, [1]], st.one_of(st.integers(), st.text(max_size=3))),
    "fixed": ([None], st.just(None)),  # the entry's call holds its bad input itself
}

DEFAULT_BUDGET = ps.Budget("l2", 0.05)


# ------------------------------------------------------------------------------ the public callables
@dataclass(frozen=True)
class Entry:
    """One argument of one public callable: ``call(env, bad)`` passes ``bad`` in that argument
    and valid values everywhere else; ``valid`` lists values of the category that are fine there."""

    name: str
    category: str
    call: Callable[[Env, Any], Any]
    valid: tuple = ()
    owns_grads: bool = False


def budget(**kw: Any) -> Callable[[Env, Any], Any]:
    (arg,) = kw
    return lambda env, bad: ps.Budget(**{**dict(norm="l2", eps=0.1), arg: bad})


def apd(**kw: Any) -> Callable[[Env, Any], Any]:
    (arg,) = kw
    return lambda env, bad: ps.APD(env.model.parameters(), torch.optim.SGD, **{"lr": 0.1, arg: bad})


def apd_step(env: Env, closure: Any) -> Any:
    opt = ps.APD(env.model.parameters(), torch.optim.SGD, lr=0.1)
    opt.zero_grad()  # a step starts from cleared gradients (left-over ones are refused, not a bad closure)
    return opt.step(closure)


def non_scalar_closure(env: Env) -> Callable[[], Any]:
    """A closure that runs backward but returns the per-example losses."""

    def closure():
        x, y = env.batches[0]
        losses = nn.functional.cross_entropy(env.model(x), y, reduction="none")
        losses.mean().backward()
        return losses

    return closure


ENTRIES = [
    Entry("Budget.norm", "choice", budget(norm=None), valid=(1, 2, 1.0, 2.0, math.inf, "1", "2", "inf")),
    Entry("Budget.eps", "non_negative", budget(eps=None)),
    Entry("Budget.sparsity", "count_or_none", budget(sparsity=None)),
    Entry("Budget.scale", "choice", budget(scale=None), valid=(None, "layer", "element")),
    Entry("Budget.eta", "non_negative", budget(eta=None)),
    Entry("Budget.contains.deltas", "tensors", lambda env, bad: DEFAULT_BUDGET.contains(bad, env.objective.params)),
    Entry("Budget.project.deltas", "tensors", lambda env, bad: DEFAULT_BUDGET.project(bad, env.objective.params)),
    Entry("Budget.sample.generator", "plain", lambda env, bad: DEFAULT_BUDGET.sample(env.objective.params, bad),
          valid=(None,)),
    Entry("Budget.samples.count", "count", lambda env, bad: DEFAULT_BUDGET.samples(env.objective.params, 0, bad)),
    Entry("Budget.steepest.radius", "non_negative",
          lambda env, bad: DEFAULT_BUDGET.steepest([torch.ones_like(p) for p in env.objective.params],
                                                   env.objective.params, bad), valid=(None,)),
    Entry("Objective.model", "model", lambda env, bad: ps.Objective(resolve(bad, env), ce, env.batches)),
    Entry("Objective.loss_fn", "loss_fn",
          lambda env, bad: ps.loss_change(ps.Objective(env.model, bad, env.batches), DEFAULT_BUDGET)),
    Entry("Objective.data", "data", lambda env, bad: ps.Objective(env.model, ce, resolve(bad, env)).loss()),
    Entry("Objective.params", "params", lambda env, bad: ps.Objective(env.model, ce, env.batches, params=bad)),
    Entry("Objective.train_mode", "bool", lambda env, bad: ps.Objective(env.model, ce, env.batches, train_mode=bad)),
    Entry("select_parameters.params", "params", lambda env, bad: ps.select_parameters(env.model, bad)),
    Entry("RandomCorruption.budget", "budget", lambda env, bad: ps.RandomCorruption(bad)(env.objective)),
    Entry("RandomCorruption.trials", "count", lambda env, bad: ps.RandomCorruption(DEFAULT_BUDGET, trials=bad)),
    Entry("RandomCorruption.seed", "seed", lambda env, bad: ps.RandomCorruption(DEFAULT_BUDGET, seed=bad)),
    Entry("RandomCorruption.vectorize", "bool", lambda env, bad: ps.RandomCorruption(DEFAULT_BUDGET, vectorize=bad),
          valid=(1, 0, 1.0, 0.0)),  # equal to True/False, refused as well, but == makes them look valid
    Entry("RandomCorruption.chunk_size", "count", lambda env, bad: ps.RandomCorruption(DEFAULT_BUDGET, chunk_size=bad)),
    Entry("RandomCorruption.draw_on", "choice", lambda env, bad: ps.RandomCorruption(DEFAULT_BUDGET, draw_on=bad),
          valid=("cpu", "device")),
    Entry("RandomCorruption()(objective)", "objective",
          lambda env, bad: ps.RandomCorruption(DEFAULT_BUDGET, trials=2)(resolve(bad, env))),
    Entry("GradientCorruption.budget", "budget", lambda env, bad: ps.GradientCorruption(bad)),
    Entry("GradientCorruption()(objective)", "objective",
          lambda env, bad: ps.GradientCorruption(DEFAULT_BUDGET)(resolve(bad, env))),
    Entry("MultiStepCorruption.steps", "count", lambda env, bad: ps.MultiStepCorruption(DEFAULT_BUDGET, steps=bad)),
    Entry("MultiStepCorruption.step_size", "positive_or_none",
          lambda env, bad: ps.MultiStepCorruption(DEFAULT_BUDGET, step_size=bad)),
    Entry("MultiStepCorruption.restarts", "count",
          lambda env, bad: ps.MultiStepCorruption(DEFAULT_BUDGET, restarts=bad)),
    Entry("MultiStepCorruption.random_start", "bool",
          lambda env, bad: ps.MultiStepCorruption(DEFAULT_BUDGET, random_start=bad)),
    Entry("MultiStepCorruption.keep_best", "bool",
          lambda env, bad: ps.MultiStepCorruption(DEFAULT_BUDGET, keep_best=bad)),
    Entry("MultiStepCorruption.per_step", "choice",
          lambda env, bad: ps.MultiStepCorruption(DEFAULT_BUDGET, per_step=bad), valid=("full", "batch")),
    Entry("MultiStepCorruption.seed", "seed", lambda env, bad: ps.MultiStepCorruption(DEFAULT_BUDGET, seed=bad)),
    Entry("MultiStepCorruption()(objective)", "objective",
          lambda env, bad: ps.MultiStepCorruption(DEFAULT_BUDGET, steps=2)(resolve(bad, env))),
    Entry("make_corruption.kind", "choice", lambda env, bad: ps.make_corruption(bad, DEFAULT_BUDGET),
          valid=("random", "one_step", "multi_step")),
    Entry("corrupted.model", "model", lambda env, bad: ps.corrupted(resolve(bad, env), {}).__enter__()),
    Entry("corrupted.corruption", "mapping", lambda env, bad: ps.corrupted(env.model, bad).__enter__()),
    Entry("loss_change.objective", "objective", lambda env, bad: ps.loss_change(resolve(bad, env), DEFAULT_BUDGET)),
    Entry("loss_change.budget", "budget", lambda env, bad: ps.loss_change(env.objective, bad)),
    Entry("loss_change.method", "choice", lambda env, bad: ps.loss_change(env.objective, DEFAULT_BUDGET, bad),
          valid=("first_order", "second_order", "random", "one_step", "multi_step")),
    Entry("loss_change.second_order.iters", "count",
          lambda env, bad: ps.loss_change(env.objective, DEFAULT_BUDGET, "second_order", iters=bad)),
    Entry("loss_change.second_order.seed", "seed",
          lambda env, bad: ps.loss_change(env.objective, DEFAULT_BUDGET, "second_order", seed=bad)),
    Entry("hessian_top_eigenvalue.objective", "objective", lambda env, bad: ps.hessian_top_eigenvalue(resolve(bad, env))),
    Entry("hessian_top_eigenvalue.iters", "count", lambda env, bad: ps.hessian_top_eigenvalue(env.objective, iters=bad)),
    Entry("hessian_top_eigenvalue.tol", "non_negative",
          lambda env, bad: ps.hessian_top_eigenvalue(env.objective, iters=2, tol=bad)),
    Entry("hessian_top_eigenvalue.method", "choice",
          lambda env, bad: ps.hessian_top_eigenvalue(env.objective, iters=2, method=bad), valid=("lanczos", "power")),
    Entry("hessian_top_eigenvalue.seed", "seed", lambda env, bad: ps.hessian_top_eigenvalue(env.objective, seed=bad)),
    Entry("hessian_trace.samples", "count", lambda env, bad: ps.hessian_trace(env.objective, samples=bad)),
    Entry("hessian_trace.seed", "seed", lambda env, bad: ps.hessian_trace(env.objective, seed=bad)),
    Entry("layer_vulnerability.budget", "budget", lambda env, bad: ps.layer_vulnerability(env.objective, bad)),
    Entry("layer_vulnerability.method", "choice",
          lambda env, bad: ps.layer_vulnerability(env.objective, DEFAULT_BUDGET, bad),
          valid=("first_order", "second_order", "random", "one_step", "multi_step")),
    Entry("layer_vulnerability.by", "choice",
          lambda env, bad: ps.layer_vulnerability(env.objective, DEFAULT_BUDGET, by=bad), valid=("parameter", "module")),
    Entry("critical_eps.metric", "callable", lambda env, bad: ps.critical_eps(env.objective, DEFAULT_BUDGET, bad, 0.1)),
    Entry("critical_eps.drop", "positive",
          lambda env, bad: ps.critical_eps(env.objective, DEFAULT_BUDGET, metric_of(env.batches), bad)),
    Entry("critical_eps.eps_start", "positive_or_none",
          lambda env, bad: ps.critical_eps(env.objective, DEFAULT_BUDGET, metric_of(env.batches), 0.1, eps_start=bad)),
    Entry("critical_eps.corruption", "choice",
          lambda env, bad: ps.critical_eps(env.objective, DEFAULT_BUDGET, metric_of(env.batches), 0.1, corruption=bad),
          valid=("random", "one_step", "multi_step")),
    Entry("critical_eps.max_doublings", "count",
          lambda env, bad: ps.critical_eps(env.objective, DEFAULT_BUDGET, metric_of(env.batches), 0.1,
                                           max_doublings=bad)),
    Entry("critical_eps.metric NaN", "fixed",
          lambda env, bad: ps.critical_eps(env.objective, DEFAULT_BUDGET, lambda m: math.nan, 0.1)),
    Entry("random_direction.seed", "seed", lambda env, bad: ps.random_direction(env.objective, seed=bad)),
    Entry("random_direction.filter_normalized", "bool",
          lambda env, bad: ps.random_direction(env.objective, filter_normalized=bad)),
    Entry("corruption_direction.kind", "choice",
          lambda env, bad: ps.corruption_direction(env.objective, bad, DEFAULT_BUDGET),
          valid=("random", "one_step", "multi_step")),
    Entry("loss_line.direction", "tensors", lambda env, bad: ps.loss_line(env.objective, resolve(bad, env), [0.0, 1.0])),
    Entry("loss_line.alphas", "coords",
          lambda env, bad: ps.loss_line(env.objective, [torch.zeros_like(p) for p in env.objective.params], bad)),
    Entry("loss_line.batch_size", "count_or_none",
          lambda env, bad: ps.loss_line(env.objective, [torch.zeros_like(p) for p in env.objective.params], [0.0],
                                        batch_size=bad)),
    Entry("loss_surface.betas", "coords",
          lambda env, bad: ps.loss_surface(env.objective, *[[torch.zeros_like(p) for p in env.objective.params]] * 2,
                                           [0.0], bad)),
    Entry("quantize_.params", "params", lambda env, bad: ps.quantize_(env.model, params=bad)),
    Entry("quantize_.granularity", "choice", lambda env, bad: ps.quantize_(env.model, granularity=bad),
          valid=("tensor", "channel")),
    Entry("RandomBitFlip.flips", "count", lambda env, bad: ps.RandomBitFlip(bad)),
    Entry("RandomBitFlip.seed", "seed", lambda env, bad: ps.RandomBitFlip(1, seed=bad)),
    Entry("RandomBitFlip.quantization", "quantization",
          lambda env, bad: ps.RandomBitFlip(1, quantization=resolve(bad, env))(env.objective), valid=(None,)),
    Entry("RandomBitFlip.bits", "bits",
          lambda env, bad: ps.RandomBitFlip(1, quantization=env.quantization, bits=bad)(env.objective)),
    Entry("ProgressiveBitSearch.quantization", "quantization",
          lambda env, bad: ps.ProgressiveBitSearch(resolve(bad, env), 1)(env.objective)),
    Entry("ProgressiveBitSearch.max_flips", "count",
          lambda env, bad: ps.ProgressiveBitSearch(env.quantization, bad)),
    Entry("ProgressiveBitSearch.candidates", "count",
          lambda env, bad: ps.ProgressiveBitSearch(env.quantization, 1, candidates=bad)),
    Entry("ProgressiveBitSearch.max_group", "count_or_none",
          lambda env, bad: ps.ProgressiveBitSearch(env.quantization, 1, max_group=bad)),
    Entry("ProgressiveBitSearch.prefilter", "count_or_none",
          lambda env, bad: ps.ProgressiveBitSearch(env.quantization, 1, prefilter=bad)),
    Entry("ProgressiveBitSearch.metric", "callable",
          lambda env, bad: ps.ProgressiveBitSearch(env.quantization, 1, metric=bad)),
    Entry("ProgressiveBitSearch.target", "finite_or_none",
          lambda env, bad: ps.ProgressiveBitSearch(env.quantization, 1, metric=metric_of(env.batches), target=bad)),
    Entry("ProgressiveBitSearch()(objective)", "objective",
          lambda env, bad: ps.ProgressiveBitSearch(env.quantization, 1)(resolve(bad, env))),
    Entry("APD.params", "param_list", lambda env, bad: ps.APD(bad, torch.optim.SGD, lr=0.1)),
    Entry("APD.base_optimizer", "optimizer_class",
          lambda env, bad: ps.APD(env.model.parameters(), resolve(bad, env), lr=0.1)),
    Entry("APD.budget", "budget", apd(budget=None)),
    Entry("APD.steps", "count", apd(steps=None)),
    Entry("APD.step_size", "positive_or_none", apd(step_size=None)),
    Entry("APD.include_clean", "bool", apd(include_clean=None)),
    Entry("APD.corruption", "choice", apd(corruption=None), valid=("adversarial", "random")),
    Entry("APD.distributed", "choice", apd(distributed=None), valid=("local", "sync")),
    Entry("APD.model", "model", apd(model=None), valid=(None,)),
    Entry("APD.corrupt", "param_list", apd(corrupt=None), valid=(None,)),
    Entry("APD.seed", "seed", apd(seed=None)),
    Entry("APD.release_buffers", "bool", apd(release_buffers=None), valid=(None,)),
    Entry("APD.lr", "non_negative", apd(lr=None)),
    Entry("APD.step(closure)", "callable", apd_step, owns_grads=True),
    Entry("APD.step(closure -> non-scalar)", "fixed", lambda env, bad: apd_step(env, non_scalar_closure(env)),
          owns_grads=True),
    Entry("AutoPGDCorruption.steps", "count", lambda env, bad: ps.AutoPGDCorruption(DEFAULT_BUDGET, steps=bad)),
    Entry("AutoPGDCorruption.restarts", "count", lambda env, bad: ps.AutoPGDCorruption(DEFAULT_BUDGET, restarts=bad)),
    Entry("AutoPGDCorruption.seed", "seed", lambda env, bad: ps.AutoPGDCorruption(DEFAULT_BUDGET, seed=bad)),
    Entry("AutoPGDCorruption()(objective)", "objective",
          lambda env, bad: ps.AutoPGDCorruption(DEFAULT_BUDGET, steps=2)(resolve(bad, env))),
    Entry("evaluate_robustness.objective", "objective", lambda env, bad: ps.evaluate_robustness(resolve(bad, env), DEFAULT_BUDGET)),
    Entry("evaluate_robustness.budget", "budget", lambda env, bad: ps.evaluate_robustness(env.objective, resolve(bad, env))),
    Entry("evaluate_robustness.steps", "count", lambda env, bad: ps.evaluate_robustness(env.objective, DEFAULT_BUDGET, steps=bad)),
    Entry("dlr_loss.logits_fn", "callable", lambda env, bad: ps.dlr_loss(bad)),
    Entry("hessian_eigenpairs.objective", "objective", lambda env, bad: ps.hessian_eigenpairs(resolve(bad, env))),
    Entry("hessian_eigenpairs.k", "count", lambda env, bad: ps.hessian_eigenpairs(env.objective, bad)),
    Entry("hessian_density.objective", "objective", lambda env, bad: ps.hessian_density(resolve(bad, env))),
    Entry("hessian_density.probes", "count", lambda env, bad: ps.hessian_density(env.objective, probes=bad)),
    Entry("hessian_trace_estimate.objective", "objective", lambda env, bad: ps.hessian_trace_estimate(resolve(bad, env))),
    Entry("hessian_trace_estimate.matvecs", "count", lambda env, bad: ps.hessian_trace_estimate(env.objective, bad)),
    Entry("GSAM.alpha", "non_negative", lambda env, bad: ps.GSAM(env.model.parameters(), torch.optim.SGD, alpha=bad, lr=0.1)),
    Entry("ASAM.rho", "non_negative", lambda env, bad: ps.ASAM(env.model.parameters(), torch.optim.SGD, rho=bad, lr=0.1)),
    Entry("IntervalSAM.interval", "count",
          lambda env, bad: ps.IntervalSAM(env.model.parameters(), torch.optim.SGD, interval=bad, lr=0.1)),
    Entry("weight_tensors.model", "model", lambda env, bad: ps.weight_tensors(bad)),
    Entry("SAM.rho", "non_negative", lambda env, bad: ps.SAM(env.model.parameters(), torch.optim.SGD, rho=bad, lr=0.1)),
    Entry("SAM.adaptive", "bool",
          lambda env, bad: ps.SAM(env.model.parameters(), torch.optim.SGD, adaptive=bad, lr=0.1)),
    Entry("SAM.steps", "count", lambda env, bad: ps.SAM(env.model.parameters(), torch.optim.SGD, steps=bad, lr=0.1)),
    Entry("OneStepDefense.steps", "count",
          lambda env, bad: ps.OneStepDefense(env.model.parameters(), torch.optim.SGD, steps=bad, lr=0.1)),
    Entry("OneStepDefense.budget", "budget",
          lambda env, bad: ps.OneStepDefense(env.model.parameters(), torch.optim.SGD, budget=bad, lr=0.1)),
    Entry("RandomWeightPerturbation.steps", "count",
          lambda env, bad: ps.RandomWeightPerturbation(env.model.parameters(), torch.optim.SGD, steps=bad, lr=0.1)),
    Entry("RandomWeightPerturbation.corruption", "choice",
          lambda env, bad: ps.RandomWeightPerturbation(env.model.parameters(), torch.optim.SGD, corruption=bad, lr=0.1)),
    Entry("save_checkpoint.model", "model",
          lambda env, bad: ps.save_checkpoint(Env.folder() / "out.pt", resolve(bad, env))),
    Entry("save_checkpoint.optimizer", "optimizer",
          lambda env, bad: ps.save_checkpoint(Env.folder() / "out.pt", env.model, bad)),
    Entry("save_checkpoint.extra", "plain",
          lambda env, bad: ps.save_checkpoint(Env.folder() / "out.pt", env.model, extra=bad)),
    Entry("load_checkpoint.path", "path", lambda env, bad: ps.load_checkpoint(resolve(bad, env), env.model)),
    Entry("load_checkpoint.model", "model",
          lambda env, bad: ps.load_checkpoint(Env.folder() / "other.pt", resolve(bad, env))),
    Entry("load_checkpoint.restore_rng", "bool",
          lambda env, bad: ps.load_checkpoint(Env.folder() / "other.pt", env.model, restore_rng=bad)),
    Entry("set_progress.enabled", "bool", lambda env, bad: ps.set_progress(bad), valid=(None,)),
]


def is_valid(value: Any, valid: tuple) -> bool:
    """Whether ``value`` is one of the values that are fine for this argument."""
    for v in valid:
        try:
            if type(value) is type(v) and bool(value == v) or (value is v):
                return True
        except Exception:
            continue
    return False


def check(entry: Entry, bad: Any) -> None:
    """``entry`` called with ``bad``: a named error, and the model exactly as it was."""
    env = Env()
    Env.folder()  # made once, before the RNG is read: building its files draws from it
    before = snapshot(env.model)
    rng = torch.get_rng_state()
    try:
        with pytest.raises(NAMED):
            entry.call(env, bad)
    finally:
        ps.set_progress(None)
    if entry.owns_grads:  # an optimizer step starts from zero_grad(): .grad is its to set
        before["grads"] = {n: p.grad for n, p in env.model.named_parameters()}
        before["grad_ids"] = {n: None if g is None else id(g) for n, g in before["grads"].items()}
    assert_same_state(env.model, before)
    assert torch.equal(torch.get_rng_state(), rng), "the global RNG was used or restored wrongly"


def explicit_cases() -> list:
    cases = []
    for entry in ENTRIES:
        for i, bad in enumerate(REGISTRY[entry.category][0]):
            if not is_valid(bad, entry.valid):
                cases.append(pytest.param(entry, bad, id=f"{entry.name}-{i}"))
    return cases


@pytest.mark.parametrize("entry, bad", explicit_cases())
def test_registry_values_get_named_errors_and_leave_the_model_as_found(entry, bad):
    check(entry, bad)


@pytest.mark.parametrize("entry", ENTRIES, ids=[e.name for e in ENTRIES])
@settings(max_examples=6, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
@given(data=st.data())
def test_drawn_values_get_named_errors_and_leave_the_model_as_found(entry, data):
    bad = data.draw(REGISTRY[entry.category][1])
    hypothesis.assume(not is_valid(bad, entry.valid))
    check(entry, bad)


#: Public names that are records or errors, built by the library rather than called with user input.
RECORDS = {"BitFlipResult", "CorruptionResult", "RandomCorruptionResult", "LayerVulnerability", "Int8Quantization",
           "FlipBudget", "Geometry", "NonFiniteLossError", "NonFiniteGradientError", "CheckpointError",
           "Eigenpairs", "EpsEvaluation", "RobustnessEvaluation", "SpectralDensity", "TraceEstimate"}
def test_every_public_callable_is_fuzzed():
    """A new public callable must get registry entries."""
    fuzzed = {re.split(r"[.( ]", e.name)[0] for e in ENTRIES}
    public = {n for n in ps.__all__ if callable(getattr(ps, n))}
    assert public - RECORDS - fuzzed == set()
