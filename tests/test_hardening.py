"""Regression tests of the hardening round: data that could be lost or corrupted, results that
were silently wrong, inputs that ended in an internal traceback, state that was not restored."""

from __future__ import annotations

import math
import pathlib
import warnings

import numpy as np
import pytest
import torch
from torch import nn

import parashield as ps

from test_safety import assert_same_state, snapshot


def mlp(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))


def batch(n: int = 8, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, 4, generator=gen), torch.randint(0, 3, (n,), generator=gen)


def ce(model: nn.Module, b) -> torch.Tensor:
    x, y = b
    return nn.functional.cross_entropy(model(x), y)


# ------------------------------------------------------------------------------ checkpoints
def test_save_checkpoint_converts_numpy_scalars_and_loads_with_weights_only(tmp_path):
    model = mlp()
    path = ps.save_checkpoint(tmp_path / "c.pt", model, best_acc=np.float64(0.97), epoch=np.int64(3),
                              done=np.bool_(True), nested={"a": [np.float32(0.5), (1, "x")]})
    extra = ps.load_checkpoint(path, mlp(1))
    assert extra == {"best_acc": 0.97, "epoch": 3, "done": True, "nested": {"a": [0.5, (1, "x")]}}
    assert type(extra["best_acc"]) is float and type(extra["epoch"]) is int


@pytest.mark.parametrize("value, where, hint", [
    (np.zeros(3), "['bad']", "torch.from_numpy"),
    (pathlib.Path("/tmp/x"), "['bad']", "str(value)"),
    (object(), "['bad']", ""),
    ({"deep": [1, pathlib.Path("a")]}, "['bad']['deep'][1]", "str(value)"),
])
def test_save_checkpoint_refuses_what_weights_only_cannot_load(tmp_path, value, where, hint):
    with pytest.raises(TypeError, match="weights_only") as info:
        ps.save_checkpoint(tmp_path / "c.pt", mlp(), bad=value)
    assert where in str(info.value) and hint in str(info.value)
    assert list(tmp_path.iterdir()) == []  # nothing written, no temporary left


@pytest.mark.parametrize("kwargs, match", [
    (dict(model="x"), "model must be a torch.nn.Module"),
    (dict(model=nn.Linear(2, 2), optimizer="sgd"), "optimizer must have a state_dict"),
])
def test_save_checkpoint_argument_types(tmp_path, kwargs, match):
    with pytest.raises(TypeError, match=match):
        ps.save_checkpoint(tmp_path / "c.pt", **kwargs)


def test_load_checkpoint_validates_everything_before_changing_anything(tmp_path):
    model = mlp(0)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    path = ps.save_checkpoint(tmp_path / "c.pt", model, opt)
    other = mlp(1)
    two_groups = torch.optim.SGD([{"params": [other[0].weight]}, {"params": list(other[2].parameters())}], lr=0.1)
    before = snapshot(other)
    torch.manual_seed(123)  # differs from the checkpoint's generator state
    rng = torch.get_rng_state()
    with pytest.raises(RuntimeError, match="does not fit the optimizer") as info:  # as load_state_dict raises
        ps.load_checkpoint(path, other, two_groups)
    assert isinstance(info.value, ps.CheckpointError) and isinstance(info.value, ValueError)
    assert_same_state(other, before)  # the model did not take the checkpoint's weights
    assert torch.equal(torch.get_rng_state(), rng)
    with pytest.raises(ps.CheckpointError, match="does not fit the model"):
        ps.load_checkpoint(path, nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 2)))


def test_load_checkpoint_names_foreign_files(tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("hello")
    with pytest.raises(ps.CheckpointError, match="not a checkpoint"):
        ps.load_checkpoint(text, mlp())
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    with pytest.raises(ps.CheckpointError, match="not a checkpoint"):
        ps.load_checkpoint(empty, mlp())
    plain = tmp_path / "state.pt"
    torch.save(mlp().state_dict(), plain)
    with pytest.raises(ps.CheckpointError, match="plain state_dict loads with model.load_state_dict"):
        ps.load_checkpoint(plain, mlp())
    with pytest.raises(TypeError, match="model must be"):
        ps.load_checkpoint(plain, "model")


# ------------------------------------------------------------------------------ APD refused step
def test_refused_apd_step_restores_batchnorm_statistics():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 1))
    opt = ps.APD(model.parameters(), torch.optim.SGD, lr=0.1, steps=2)
    x = torch.randn(6, 3)
    x[0, 0] = math.nan
    before = snapshot(model)

    def closure():
        opt.zero_grad()
        loss = model(x).pow(2).mean()
        loss.backward()
        return loss

    with pytest.raises(ps.NonFiniteGradientError):
        opt.step(closure)
    after = snapshot(model)  # .grad holds the refused gradient, as after any backward
    for kind in ("params", "buffers"):  # running_mean not NaN, num_batches_tracked not advanced
        assert all(torch.equal(before[kind][n], after[kind][n]) for n in before[kind]), kind
    model.eval()
    assert torch.isfinite(model(torch.randn(2, 3))).all()


def test_completed_apd_step_keeps_the_clean_pass_statistics():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 1))
    opt = ps.APD(model.parameters(), torch.optim.SGD, lr=0.1, steps=2)
    x = torch.randn(6, 3)

    def closure():
        opt.zero_grad()
        loss = model(x).pow(2).mean()
        loss.backward()
        return loss

    opt.step(closure)
    assert int(model[1].num_batches_tracked) == 1  # the clean pass only


# ------------------------------------------------------------------------------ quantization
@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_quantize_refuses_non_finite_weights(bad):
    model = mlp()
    with torch.no_grad():
        model[0].weight[1, 2] = bad
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match="NaN or infinite"):
        ps.quantize_(model)
    assert all(torch.equal(a.view(torch.int32), b.view(torch.int32)) for a, b in zip(model.parameters(), before))


def test_quantize_refuses_meta_parameters():
    with pytest.raises(ValueError, match="meta device"):
        ps.quantize_(nn.Linear(3, 2, device="meta"))


@pytest.mark.parametrize("attack", [
    lambda q: ps.RandomBitFlip(1, quantization=q),
    lambda q: ps.ProgressiveBitSearch(q, max_flips=1),
])
def test_stale_quantization_is_refused(attack):
    model = mlp()
    q = ps.quantize_(model)
    with torch.no_grad():
        model[0].weight.add_(0.01)  # trained after quantize_
    obj = ps.Objective(model, ce, batch())
    before = snapshot(model)
    with pytest.raises(ValueError, match="stale"):
        attack(q)(obj)
    assert_same_state(model, before)
    q = ps.quantize_(model)  # re-quantized: accepted
    assert len(attack(q)(obj).flips) == 1


# ------------------------------------------------------------------------------ silently wrong
def test_critical_eps_refuses_a_nan_metric_and_overflowing_doublings():
    model = mlp()
    obj = ps.Objective(model, ce, batch())
    with pytest.raises(ValueError, match="metric returned NaN on the clean model"):
        ps.critical_eps(obj, ps.Budget(), lambda m: math.nan, drop=0.1)
    calls = []

    def nan_when_corrupted(m):
        calls.append(1)
        return 1.0 if len(calls) == 1 else math.nan

    with pytest.raises(ValueError, match=r"NaN on eps = 0.05"):
        ps.critical_eps(obj, ps.Budget(), nan_when_corrupted, drop=0.1, corruption="one_step")
    with pytest.raises(ValueError, match="max_doublings=1000000 .* at most 1028"):
        ps.critical_eps(obj, ps.Budget(eps=0.05), lambda m: 1.0, drop=0.1, max_doublings=10**6)
    with pytest.raises(ValueError, match="eps_start"):
        ps.critical_eps(obj, ps.Budget(), lambda m: 1.0, drop=0.1, eps_start=-1.0)


@pytest.mark.parametrize("method", ["contains", "project", "measure"])
def test_budget_refuses_fewer_tensors_than_parameters(method):
    w = [torch.randn(3), torch.randn(2)]
    budget = ps.Budget("l2", 0.1, scale="layer")
    with pytest.raises(ValueError, match="deltas has 1 tensors, params has 2"):
        getattr(budget, method)([torch.zeros(3)], w)  # a layer-scaled contains said True
    with pytest.raises(ValueError, match="deltas has 0 tensors"):
        getattr(budget, method)([], w)
    with pytest.raises(ValueError, match="params is empty"):
        getattr(budget, method)([], [])


def test_zero_row_batch_weighs_zero():
    model = mlp()
    x, y = batch()
    batches = [(x[:5], y[:5]), (x[:0], y[:0]), (x[5:], y[5:])]
    whole = ps.Objective(model, ce, (x, y))
    split = ps.Objective(model, ce, batches)
    assert math.isclose(split.loss(), whole.loss(), rel_tol=1e-6)
    assert math.isclose(ps.loss_change(split, ps.Budget()), ps.loss_change(whole, ps.Budget()), rel_tol=1e-5)
    steps = ps.MultiStepCorruption(ps.Budget(), steps=3, per_step="batch")(split)
    assert all(math.isfinite(v) for v in steps.history)
    with pytest.raises(ValueError, match="no batch with at least one example"):
        ps.Objective(model, ce, [(x[:0], y[:0])]).loss()


class Counting(nn.Module):
    """A forward that counts its calls in a buffer, also in eval mode, and replaces the tensor."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc = nn.Linear(4, 3)
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))
        self.register_buffer("total", torch.zeros(()))

    def forward(self, x):
        self.calls += 1
        self.total = self.total + x.sum().detach()  # a new tensor object
        return self.fc(x)


@pytest.mark.parametrize("attack", [
    lambda obj: ps.MultiStepCorruption(ps.Budget(), steps=3)(obj),
    lambda obj: ps.RandomCorruption(ps.Budget(), trials=3, vectorize=False)(obj),
    lambda obj: ps.loss_change(obj, ps.Budget(), "second_order", iters=3),
    lambda obj: ps.hessian_trace(obj, samples=2),
])
def test_buffers_changed_by_an_eval_forward_are_restored(attack):
    model = Counting()
    total = model.total
    before = snapshot(model)
    attack(ps.Objective(model, ce, batch()))
    assert_same_state(model, before)
    assert model.total is total


def test_optimizer_step_inside_corrupted_warns():
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    x, y = batch()
    delta = {"0.weight": torch.full((5, 4), 0.01)}
    with pytest.warns(RuntimeWarning, match=r"changed inside corrupted\(\).*momentum"):
        with ps.corrupted(model, delta):
            ce(model, (x, y)).backward()
            opt.step()
    obj = ps.Objective(model, ce, (x, y))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # evaluating, probes included, is what the block is for
        with ps.corrupted(model, delta):
            obj.loss()
            ps.MultiStepCorruption(ps.Budget(), steps=2)(obj)


# ------------------------------------------------------------------------------ named errors
def test_loss_functions_outside_the_contract_get_named_errors():
    model = mlp()
    b = batch()
    budget = ps.Budget()
    for loss_fn in (lambda m, b: m(b[0]).argmax().float().detach(), lambda m, b: ce(m, b).detach()):
        obj = ps.Objective(model, loss_fn, b)
        for call in (lambda: ps.loss_change(obj, budget), lambda: ps.GradientCorruption(budget)(obj),
                     lambda: ps.MultiStepCorruption(budget, steps=2)(obj), lambda: ps.hessian_trace(obj, samples=1),
                     lambda: ps.hessian_top_eigenvalue(obj, iters=2), lambda: ps.layer_vulnerability(obj, budget)):
            with pytest.raises(ValueError, match="does not require grad.*detach"):
                call()
    with pytest.raises(TypeError, match="int64 tensor: the loss must be a real floating-point"):
        ps.Objective(model, lambda m, b: m(b[0]).argmax(), b).loss()
    with pytest.raises(TypeError, match=r"CrossEntropyLoss takes \(output, target\).*loss_fn\(model, batch\)"):
        ps.Objective(model, nn.CrossEntropyLoss(), b)
    with pytest.raises(TypeError, match=r"looks like a function of the model's output.*loss_fn\(model, batch\)"):
        ps.Objective(model, lambda output, target: nn.functional.cross_entropy(output, target), b)

    def mine(a, b):
        return nn.functional.cross_entropy(a, b)

    with pytest.raises(TypeError, match=r"failed on the model .*loss_fn\(model, batch\)"):
        ps.Objective(model, mine, b).loss()


@pytest.mark.parametrize("call", [
    lambda m: ps.loss_change(m, ps.Budget()),
    lambda m: ps.GradientCorruption(ps.Budget())(m),
    lambda m: ps.RandomCorruption(ps.Budget())(m),
    lambda m: ps.MultiStepCorruption(ps.Budget())(m),
    lambda m: ps.hessian_trace(m),
    lambda m: ps.hessian_top_eigenvalue(m),
    lambda m: ps.layer_vulnerability(m, ps.Budget()),
    lambda m: ps.critical_eps(m, ps.Budget(), lambda model: 1.0, drop=0.1),
    lambda m: ps.RandomBitFlip(1)(m),
    lambda m: ps.random_direction(m),
    lambda m: ps.loss_line(m, [], [0.0]),
])
def test_a_model_where_an_objective_belongs_says_how_to_build_one(call):
    with pytest.raises(TypeError, match=r"write|wrap the model as ps.Objective\(model, loss_fn, data\)"):
        call(mlp())


@pytest.mark.parametrize("call, error, match", [
    (lambda o: ps.hessian_trace(o, seed=None), TypeError, "seed must be an int"),
    (lambda o: ps.hessian_top_eigenvalue(o, seed=1.5), TypeError, "seed must be an int"),
    (lambda o: ps.loss_change(o, ps.Budget(), "second_order", seed=None), TypeError, "seed must be an int"),
    (lambda o: ps.RandomBitFlip(1, seed=2**70), ValueError, r"seed must be an int in \[-2\*\*63, 2\*\*64\)"),
    (lambda o: ps.hessian_top_eigenvalue(o, tol=math.nan), ValueError, "tol"),
])
def test_seeds_and_tolerances_are_checked(call, error, match):
    with pytest.raises(error, match=match):
        call(ps.Objective(mlp(), ce, batch()))


def test_data_of_another_dtype_than_the_model_says_what_to_convert():
    x, y = batch()
    with pytest.raises(TypeError, match="batch holds float64 tensors, the model's parameters are float32"):
        ps.Objective(mlp(), ce, (x.double(), y)).loss()


@pytest.mark.parametrize("data", [(), {}, []])
def test_empty_data_is_refused_when_the_objective_is_built(data):
    with pytest.raises(ValueError, match="data is empty"):
        ps.Objective(mlp(), ce, data)


def test_meta_parameters_are_refused():
    with pytest.raises(ValueError, match="meta device"):
        ps.Objective(nn.Linear(4, 3, device="meta"), ce, batch())


@pytest.mark.parametrize("norm", ["l1", "l2", "linf"])
@pytest.mark.parametrize("kind", ["random", "one_step", "multi_step"])
def test_mixed_float64_and_float32_parameters_with_sparsity(norm, kind):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 5).double(), nn.Linear(5, 3))

    def loss(m, b):
        return nn.functional.cross_entropy(m[1](m[0](b[0].double()).float()), b[1])

    obj = ps.Objective(model, loss, batch())
    before = snapshot(model)
    budget = ps.Budget(norm, 0.1, sparsity=3)
    result = ps.make_corruption(kind, budget)(obj)
    assert all(result.delta[n].dtype == p.dtype for n, p in model.named_parameters())
    assert sum(int(d.count_nonzero()) for d in result.delta.values()) <= 3
    assert budget.contains([result.delta[n] for n in obj.names], obj.params)
    assert_same_state(model, before)


def test_non_tensor_corruption_values_are_refused():
    model = mlp()
    before = snapshot(model)
    with pytest.raises(TypeError, match="values must be tensors, got '0.weight': float"):
        with ps.corrupted(model, {"0.weight": 0.5}):
            pass
    assert_same_state(model, before)


def test_apd_presets_say_which_arguments_they_fix():
    params = list(mlp().parameters())
    with pytest.raises(TypeError, match="SAM does not take steps=.*APD"):
        ps.SAM(params, torch.optim.SGD, lr=0.1, steps=3)
    with pytest.raises(TypeError, match="OneStepDefense does not take include_clean="):
        ps.OneStepDefense(params, torch.optim.SGD, lr=0.1, include_clean=False)
    with pytest.raises(TypeError, match="RandomWeightPerturbation does not take corruption="):
        ps.RandomWeightPerturbation(params, torch.optim.SGD, lr=0.1, corruption="adversarial")
    for kwargs in (dict(lr=math.nan), dict(lr=0.1, momentum=math.inf), dict(lr=0.1, betas=(0.9, math.nan))):
        with pytest.raises(ValueError, match="must be finite"):
            ps.APD(params, torch.optim.Adam if "betas" in kwargs else torch.optim.SGD, **kwargs)


def test_apd_closure_returning_a_non_scalar_fails_at_the_first_pass():
    model = mlp()
    opt = ps.APD(model.parameters(), torch.optim.SGD, lr=0.1, steps=3)
    x, y = batch()
    calls = []
    before = snapshot(model)

    def closure():
        calls.append(1)
        opt.zero_grad()
        losses = nn.functional.cross_entropy(model(x), y, reduction="none")
        losses.mean().backward()
        return losses

    with pytest.raises(ValueError, match=r"closure must return the scalar loss .* shape \(8,\) in pass t = 0"):
        opt.step(closure)
    assert len(calls) == 1
    after = snapshot(model)
    assert all(torch.equal(before["params"][n], after["params"][n]) for n in before["params"])


def test_a_parameter_frozen_after_the_objective_is_built_is_skipped():
    model = mlp()
    obj = ps.Objective(model, ce, batch())
    model[0].weight.requires_grad_(False)
    before = snapshot(model)
    for result in (ps.GradientCorruption(ps.Budget())(obj), ps.MultiStepCorruption(ps.Budget(), steps=2)(obj),
                   ps.RandomCorruption(ps.Budget(), trials=2)(obj)):
        assert "0.weight" not in result.delta and "2.weight" in result.delta
    assert math.isfinite(ps.loss_change(obj, ps.Budget(), "second_order", iters=3))
    assert math.isfinite(ps.hessian_trace(obj, samples=2))
    assert_same_state(model, before)
    for p in model.parameters():
        p.requires_grad_(False)
    with pytest.raises(ValueError, match="every parameter of the objective was frozen"):
        obj.loss()


def test_params_accepts_a_list_of_module_classes():
    model = nn.Sequential(nn.Conv1d(2, 3, 3), nn.Flatten(), nn.Linear(3, 2))
    as_list = ps.Objective(model, ce, batch(), params=[nn.Conv1d]).names
    as_tuple = ps.Objective(model, ce, batch(), params=(nn.Conv1d,)).names
    assert as_list == as_tuple == ["0.weight", "0.bias"]


# ------------------------------------------------------------------------------ long work shows progress
class RecordedBar:
    """Stands in for tqdm: records each bar's description, iterates like the plain iterable."""

    made: list = []

    def __init__(self, iterable, **kw) -> None:
        self.iterable = iterable
        RecordedBar.made.append(kw.get("desc"))

    def __iter__(self):
        return iter(self.iterable)


@pytest.fixture
def bars(monkeypatch):
    tqdm_auto = pytest.importorskip("tqdm.auto")
    monkeypatch.setattr(tqdm_auto, "tqdm", RecordedBar)
    monkeypatch.delenv("PARASHIELD_PROGRESS", raising=False)
    RecordedBar.made = []
    yield RecordedBar.made
    ps.set_progress(None)


LONG_LOOPS = [
    ("random trials", lambda obj, q: ps.RandomCorruption(ps.Budget(), trials=3)(obj)),
    ("multi-step corruption, restart 1/1", lambda obj, q: ps.MultiStepCorruption(ps.Budget(), steps=2)(obj)),
    ("Hessian trace", lambda obj, q: ps.hessian_trace(obj, samples=2)),
    ("Lanczos", lambda obj, q: ps.hessian_top_eigenvalue(obj, iters=2)),
    ("power iteration", lambda obj, q: ps.hessian_top_eigenvalue(obj, iters=2, method="power")),
    ("second-order ascent", lambda obj, q: ps.loss_change(obj, ps.Budget("linf", 0.01), "second_order", iters=2)),
    ("progressive bit search", lambda obj, q: ps.ProgressiveBitSearch(q, max_flips=1)(obj)),
    ("layer vulnerability (one_step)", lambda obj, q: ps.layer_vulnerability(obj, ps.Budget(), "one_step")),
    ("critical eps: doubling", lambda obj, q: ps.critical_eps(obj, ps.Budget(), lambda m: 1.0, drop=0.5,
                                                              corruption="one_step", max_doublings=2)),
]


@pytest.mark.parametrize("desc, run", LONG_LOOPS, ids=[d for d, _ in LONG_LOOPS])
def test_long_loops_show_a_bar_and_one_switch_silences_them(bars, monkeypatch, desc, run):
    model = mlp()
    q = ps.quantize_(model)
    obj = ps.Objective(model, ce, batch())
    run(obj, q)
    assert desc in bars
    bars.clear()
    ps.set_progress(False)
    run(obj, q)
    assert bars == []
    ps.set_progress(None)
    monkeypatch.setenv("PARASHIELD_PROGRESS", "0")
    run(obj, q)
    assert bars == []


def test_apd_shows_a_bar_only_for_long_trajectories(bars):
    x, y = batch()
    for steps, shown in ((3, False), (60, True)):
        model = mlp()  # a fresh model: another optimizer's averaged gradient in .grad is refused
        opt = ps.APD(model.parameters(), torch.optim.SGD, lr=0.01, steps=steps)
        bars.clear()
        opt.step(lambda: (opt.zero_grad(), ce(model, (x, y)).backward())[0] or ce(model, (x, y)))
        assert ("APD passes" in bars) == shown


def test_set_progress_takes_a_bool_or_none():
    with pytest.raises(TypeError, match="True, False or None"):
        ps.set_progress(0)


@pytest.mark.parametrize("call, match", [
    (lambda obj, d: ps.hessian_top_eigenvalue(obj, iters=10**9), r"Lanczos vectors .* would need"),
    (lambda obj, d: ps.RandomCorruption(ps.Budget(), trials=10**12, chunk_size=10**12)(obj), "chunk_size"),
    (lambda obj, d: ps.loss_surface(obj, d, d, torch.zeros(10**6 + 1), torch.zeros(10**6 + 1)), "alphas x betas"),
    # the batched evaluation (accelerators' default) holds a chunk of points; the CPU's loop holds one
    (lambda obj, d: ps.loss_line(obj, d, torch.zeros(10**6), batch_size=10**12, vectorize=True), "batch_size"),
])
def test_sizes_that_can_only_exhaust_memory_are_refused_up_front(call, match):
    model = nn.Linear(2000, 2000)  # 4 million parameters
    obj = ps.Objective(model, lambda m, b: m(b).pow(2).mean(), torch.randn(2, 2000))
    d = [torch.zeros_like(p) for p in obj.params]
    with pytest.raises(ValueError, match=match + r".*GiB, more than the"):
        call(obj, d)


# ------------------------------------------------------------------------------ summaries
def test_results_print_as_summaries_not_tensors():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(40, 40), nn.Linear(40, 3))
    obj = ps.Objective(model, ce, (torch.randn(8, 40), torch.randint(0, 3, (8,))))
    q = ps.quantize_(model)
    shown = {
        "Objective": repr(obj),
        "CorruptionResult": repr(ps.MultiStepCorruption(ps.Budget(), steps=2)(obj)),
        "RandomCorruptionResult": repr(ps.RandomCorruption(ps.Budget(), trials=3)(obj)),
        "Int8Quantization": repr(q),
        "BitFlipResult": repr(ps.RandomBitFlip(5, quantization=q)(obj)),
        "LayerVulnerability": repr(ps.layer_vulnerability(obj, ps.Budget())[0]),
    }
    for name, text in shown.items():
        assert text.startswith(name + "(") and "tensor(" not in text and len(text) < 400, text
    assert "loss " in shown["CorruptionResult"] and "3 tensors" not in shown["CorruptionResult"]
    assert "trials=3, mean change" in shown["RandomCorruptionResult"]
    assert "flips=5: " in shown["BitFlipResult"] and ", ..." in shown["BitFlipResult"]
    assert "2 tensors, 1720 codes" in shown["Int8Quantization"]


def test_corrupted_works_on_inference_tensors():
    with torch.inference_mode():  # parameters without version counters
        model = mlp()
        x, _ = batch()
        clean = model(x)
        with ps.corrupted(model, {"0.weight": torch.full((5, 4), 0.5)}):
            assert not torch.equal(model(x), clean)
        assert torch.equal(model(x), clean)
