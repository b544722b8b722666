"""Safety: everything the library touches is restored bit for bit, the objective's arithmetic over
batches, argument validation and parameter selection."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import parashield as ps

DEVICES = [pytest.param("cpu")] + (
    [pytest.param("cuda", marks=pytest.mark.cuda)] if torch.cuda.is_available() else []
)


# ------------------------------------------------------------------------------ state helpers
def snapshot(model: nn.Module) -> dict:
    return {
        "params": {n: p.detach().clone() for n, p in model.named_parameters()},
        "grads": {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()},
        "grad_ids": {n: None if p.grad is None else id(p.grad) for n, p in model.named_parameters()},
        "requires_grad": {n: p.requires_grad for n, p in model.named_parameters()},
        "modes": {n: m.training for n, m in model.named_modules()},
        "buffers": {n: b.clone() for n, b in model.named_buffers()},
    }


def assert_same_state(model: nn.Module, before: dict) -> None:
    after = snapshot(model)
    for n, p in before["params"].items():
        assert torch.equal(after["params"][n], p), f"parameter {n} changed"
        assert after["params"][n].dtype == p.dtype
    for n, g in before["grads"].items():
        if g is None:
            assert after["grads"][n] is None, f".grad of {n} was created"
        else:
            assert torch.equal(after["grads"][n], g), f".grad of {n} changed"
            assert after["grad_ids"][n] == before["grad_ids"][n], f".grad of {n} was replaced"
    assert after["requires_grad"] == before["requires_grad"]
    assert after["modes"] == before["modes"]
    for n, b in before["buffers"].items():
        assert torch.equal(after["buffers"][n], b), f"buffer {n} changed"


class StatefulNet(nn.Module):
    """BatchNorm, Dropout, a frozen parameter, an integer buffer counting training forwards."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.fc1 = nn.Linear(4, 6)
        self.bn = nn.BatchNorm1d(6)
        self.drop = nn.Dropout(0.2)
        self.fc2 = nn.Linear(6, 3)
        self.frozen = nn.Parameter(torch.randn(3), requires_grad=False)
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))

    def forward(self, x):
        if self.training:
            self.calls += 1
        return self.fc2(self.drop(torch.relu(self.bn(self.fc1(x))))) + self.frozen


def stateful_setup(seed: int = 0):
    model = StatefulNet(seed)
    # mixed modes: the root in train mode, some children in eval mode
    model.train()
    model.fc1.eval()
    model.drop.eval()
    # some .grad set, some None
    model.fc1.weight.grad = torch.randn_like(model.fc1.weight)
    model.bn.bias.grad = torch.zeros_like(model.bn.bias)
    gen = torch.Generator().manual_seed(seed)
    batches = [
        (torch.randn(n, 4, generator=gen), torch.randint(0, 3, (n,), generator=gen)) for n in (8, 5)
    ]
    return model, batches


def ce(model, batch):
    x, y = batch
    return nn.functional.cross_entropy(model(x), y)


def metric_of(batches):
    def metric(model):
        with torch.no_grad():
            return -sum(float(ce(model, b)) for b in batches)

    return metric


OPERATIONS = {
    "random": lambda obj: ps.RandomCorruption(ps.Budget("l2", 0.1), trials=3, seed=0)(obj),
    "one_step": lambda obj: ps.GradientCorruption(ps.Budget("linf", 0.01, scale="element"))(obj),
    "multi_step": lambda obj: ps.MultiStepCorruption(ps.Budget("l2", 0.05, scale="layer"), steps=3)(obj),
    "multi_step_restarts": lambda obj: ps.MultiStepCorruption(
        ps.Budget("l1", 0.05, sparsity=4), steps=2, restarts=2, random_start=True
    )(obj),
    "multi_step_batch": lambda obj: ps.MultiStepCorruption(ps.Budget("l2", 0.05), steps=3, per_step="batch")(obj),
    "first_order": lambda obj: ps.loss_change(obj, ps.Budget("l2", 0.05), "first_order"),
    "second_order_l2": lambda obj: ps.loss_change(obj, ps.Budget("l2", 0.05), "second_order", iters=4),
    "second_order_linf": lambda obj: ps.loss_change(obj, ps.Budget("linf", 0.01), "second_order", iters=3),
    "loss_change_random": lambda obj: ps.loss_change(obj, ps.Budget("l2", 0.05), "random", trials=2),
    "loss_change_one_step": lambda obj: ps.loss_change(obj, ps.Budget("l2", 0.05), "one_step"),
    "loss_change_multi_step": lambda obj: ps.loss_change(obj, ps.Budget("l2", 0.05), "multi_step", steps=2),
    "top_eigenvalue_lanczos": lambda obj: ps.hessian_top_eigenvalue(obj, iters=4),
    "top_eigenvalue_power": lambda obj: ps.hessian_top_eigenvalue(obj, iters=4, method="power"),
    "trace": lambda obj: ps.hessian_trace(obj, samples=3),
    "layer_first_order": lambda obj: ps.layer_vulnerability(obj, ps.Budget("l2", 0.05)),
    "layer_one_step": lambda obj: ps.layer_vulnerability(obj, ps.Budget("l2", 0.05), "one_step", by="module"),
    "critical_eps": lambda obj: ps.critical_eps(
        obj, ps.Budget("l2", 0.5), metric_of(obj.data), 0.05, corruption="one_step", iters=2
    ),
    "critical_eps_random": lambda obj: ps.critical_eps(
        obj, ps.Budget("l2", 0.5), metric_of(obj.data), 0.05, corruption="random", iters=2, trials=2
    ),
    "objective_loss": lambda obj: obj.loss(),
    "objective_gradient": lambda obj: obj.gradient(),
}


# ------------------------------------------------------------------------------ corrupted
@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("exit_kind", ["normal", "exception", "keyboard_interrupt"])
def test_corrupted_restores_bit_for_bit(device, exit_kind):
    model, batches = stateful_setup()
    model.to(device)
    batches = [(x.to(device), y.to(device)) for x, y in batches]
    obj = ps.Objective(model, ce, batches)
    res = ps.GradientCorruption(ps.Budget("l2", 0.3))(obj)
    before = snapshot(model)
    raised = {"normal": None, "exception": RuntimeError, "keyboard_interrupt": KeyboardInterrupt}[exit_kind]
    for corruption in (res, res.delta):
        try:
            with ps.corrupted(model, corruption) as m:
                assert m is model
                for n, p in model.named_parameters():
                    if n in res.delta:
                        assert torch.equal(p.detach(), before["params"][n] + res.delta[n].to(device))
                        assert not torch.equal(p.detach(), before["params"][n])
                    else:
                        assert torch.equal(p.detach(), before["params"][n])
                if raised is not None:
                    raise raised("boom")
        except (RuntimeError, KeyboardInterrupt) as e:
            assert raised is not None and isinstance(e, raised)
        assert_same_state(model, before)


DETERMINISTIC = ["random", "one_step", "multi_step", "multi_step_restarts", "multi_step_batch", "first_order",
                 "second_order_l2", "second_order_linf", "top_eigenvalue_lanczos", "trace", "critical_eps"]


def _value(out):
    if isinstance(out, ps.CorruptionResult):
        return [out.loss_before, out.loss_after]
    return [float(out)]


@pytest.mark.parametrize("device", DEVICES)
def test_operations_on_device_match_cpu_and_restore(device):
    """Every operation runs on the device, leaves the model as found, and (float64, eval mode)
    gives the CPU's numbers: random draws come from a CPU generator on every device."""
    results = {}
    for dev in dict.fromkeys(["cpu", device]):
        model, batches = stateful_setup()
        model.double().to(dev)
        for p in model.parameters():
            if p.grad is not None:
                p.grad = p.grad.double().to(dev)
        batches = [(x.double().to(dev), y.to(dev)) for x, y in batches]
        before = snapshot(model)
        obj = ps.Objective(model, ce, batches)
        results[dev] = {op: _value(OPERATIONS[op](obj)) for op in DETERMINISTIC}
        res = ps.MultiStepCorruption(ps.Budget("linf", 0.05, scale="element"), steps=3)(obj)
        assert all(d.device.type == dev for d in res.delta.values())
        assert_same_state(model, before)
    for op in DETERMINISTIC:
        assert results[device][op] == pytest.approx(results["cpu"][op], rel=1e-6, abs=1e-9), op


def test_corrupted_validates_its_argument():
    model, _ = stateful_setup()
    before = snapshot(model)
    with pytest.raises(ValueError, match="nope"):
        with ps.corrupted(model, {"nope": torch.zeros(1)}):
            pass
    with pytest.raises(ValueError, match="shape"):
        with ps.corrupted(model, {"fc2.bias": torch.zeros(4)}):
            pass
    with pytest.raises(TypeError, match="corruption"):
        with ps.corrupted(model, [torch.zeros(3)]):
            pass
    assert_same_state(model, before)


# ------------------------------------------------------------------------------ state kept
@pytest.mark.parametrize("train_mode", [False, True])
@pytest.mark.parametrize("op", sorted(OPERATIONS))
def test_operations_leave_model_state_untouched(op, train_mode):
    model, batches = stateful_setup()
    before = snapshot(model)
    obj = ps.Objective(model, ce, batches, train_mode=train_mode)
    OPERATIONS[op](obj)
    assert_same_state(model, before)


def test_train_mode_really_updates_batchnorm_inside():
    """The restore test above has teeth: in train mode the passes do move the buffers."""
    model, batches = stateful_setup()
    seen = []

    def loss_fn(m, batch):
        out = ce(m, batch)
        seen.append((m.bn.running_mean.clone(), int(m.calls), m.training, m.fc1.training, m.drop.training))
        return out

    before = snapshot(model)
    ps.GradientCorruption(ps.Budget("l2", 0.1))(ps.Objective(model, loss_fn, batches, train_mode=True))
    assert not torch.equal(seen[-1][0], before["buffers"]["bn.running_mean"])
    assert seen[-1][1] > 0
    assert all(s[2] and s[3] and s[4] for s in seen)  # every module in train mode
    assert_same_state(model, before)
    seen.clear()
    ps.GradientCorruption(ps.Budget("l2", 0.1))(ps.Objective(model, loss_fn, batches))
    assert all(not (s[2] or s[3] or s[4]) for s in seen)  # every module in eval mode
    assert_same_state(model, before)


def failing_loss(fail_at: int, exc: type):
    calls = {"n": 0}

    def loss_fn(model, batch):
        calls["n"] += 1
        if calls["n"] >= fail_at:
            raise exc("loss_fn failed on purpose")
        return ce(model, batch)

    return loss_fn, calls


@pytest.mark.parametrize("fail_at", [1, 4])
@pytest.mark.parametrize("op", sorted(OPERATIONS))
def test_operations_restore_state_when_loss_fn_raises(op, fail_at):
    model, batches = stateful_setup()
    before = snapshot(model)
    loss_fn, calls = failing_loss(fail_at, RuntimeError)
    obj = ps.Objective(model, loss_fn, batches, train_mode=True)
    try:
        OPERATIONS[op](obj)
    except RuntimeError as e:
        assert "on purpose" in str(e)
        assert calls["n"] == fail_at
    else:
        assert calls["n"] < fail_at  # the operation finished before the failure point
    assert_same_state(model, before)


@pytest.mark.parametrize("op", ["multi_step", "second_order_l2", "trace", "critical_eps"])
def test_operations_restore_state_on_keyboard_interrupt(op):
    model, batches = stateful_setup()
    before = snapshot(model)
    loss_fn, _ = failing_loss(5, KeyboardInterrupt)
    with pytest.raises(KeyboardInterrupt):
        OPERATIONS[op](ps.Objective(model, loss_fn, batches, train_mode=True))
    assert_same_state(model, before)


def test_corruption_results_are_detached_copies():
    model, batches = stateful_setup()
    obj = ps.Objective(model, ce, batches)
    res = ps.MultiStepCorruption(ps.Budget("l2", 0.1), steps=3)(obj)
    assert set(res.delta) == set(obj.names)
    for n, d in res.delta.items():
        assert not d.requires_grad
        assert d.data_ptr() != dict(model.named_parameters())[n].data_ptr()
    assert res.loss_after >= res.loss_before
    assert len(res.history) == 3 + 1 and res.passes == 1 + 3 + 1
    with ps.corrupted(model, res):
        assert obj.loss() == pytest.approx(res.loss_after, rel=1e-6)


# ------------------------------------------------------------------------------ objective
def test_objective_over_batches_is_example_weighted():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1)).double()
    x = torch.randn(12, 3, dtype=torch.float64)
    y = torch.randn(12, 1, dtype=torch.float64)
    sizes = [5, 1, 4, 2]
    batches = list(zip(torch.split(x, sizes), torch.split(y, sizes)))

    def mse(m, b):
        return ((m(b[0]) - b[1]) ** 2).mean()

    full = ps.Objective(model, mse, (x, y))
    split = ps.Objective(model, mse, batches)
    # the plain mean of the batch means is different: the test can tell them apart
    with torch.no_grad():
        naive = sum(float(mse(model, b)) for b in batches) / len(batches)
    assert abs(naive - full.loss()) > 1e-3
    assert split.loss() == pytest.approx(full.loss(), rel=1e-12)
    lf, gf = full.gradient()
    ls, gs = split.gradient()
    direct = torch.autograd.grad(mse(model, (x, y)), split.params)
    for a, b in zip(gf, direct):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
    assert ls == pytest.approx(lf, rel=1e-12)
    for a, b in zip(gs, gf):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
    # the curvature extras agree as well (Hessian-vector products are weighted the same way)
    assert ps.hessian_top_eigenvalue(split) == pytest.approx(ps.hessian_top_eigenvalue(full), rel=1e-9)
    assert ps.hessian_trace(split, samples=5) == pytest.approx(ps.hessian_trace(full, samples=5), rel=1e-9)
    # a DataLoader (re-iterable, last batch smaller) gives the same
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=5)
    assert ps.Objective(model, mse, loader).loss() == pytest.approx(full.loss(), rel=1e-12)
    # a list of tensors is ONE batch; a list of tuples is several
    assert ps.Objective(model, lambda m, b: mse(m, tuple(b)), [x, y]).loss() == pytest.approx(full.loss(), rel=1e-12)
    # gradient at w + delta is the gradient of the shifted model
    delta = [0.01 * torch.ones_like(p) for p in split.params]
    _, g_shift = split.gradient(delta)
    with ps.corrupted(model, dict(zip(split.names, delta))):
        _, g_ref = full.gradient()
    for a, b in zip(g_shift, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


def test_objective_restrict_and_numel():
    model, batches = stateful_setup()
    obj = ps.Objective(model, ce, batches)
    assert obj.names == ["fc1.weight", "fc1.bias", "bn.weight", "bn.bias", "fc2.weight", "fc2.bias"]
    assert obj.numel == 24 + 6 + 6 + 6 + 18 + 3
    sub = obj.restrict("fc2.*")
    assert sub.names == ["fc2.weight", "fc2.bias"] and sub.numel == 21
    assert sub.model is model and sub.data is batches


# ------------------------------------------------------------------------------ errors
def test_non_scalar_loss_names_loss_fn():
    model, batches = stateful_setup()
    obj = ps.Objective(model, lambda m, b: nn.functional.cross_entropy(m(b[0]), b[1], reduction="none"), batches)
    for op in ("random", "one_step", "multi_step", "first_order", "trace", "objective_loss"):
        with pytest.raises(ValueError, match="loss_fn"):
            OPERATIONS[op](obj)
    obj = ps.Objective(model, lambda m, b: 1.0, batches)
    with pytest.raises(TypeError, match="loss_fn"):
        obj.loss()


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize(
    "op", ["random", "one_step", "multi_step", "first_order", "second_order_l2", "second_order_linf",
           "loss_change_random", "top_eigenvalue_lanczos", "top_eigenvalue_power", "trace", "objective_loss",
           "objective_gradient", "layer_first_order", "layer_one_step"],
)
def test_non_finite_loss_raises(op, bad):
    model, batches = stateful_setup()
    before = snapshot(model)
    obj = ps.Objective(model, lambda m, b: ce(m, b) * bad, batches)
    with pytest.raises(ps.NonFiniteLossError):
        OPERATIONS[op](obj)
    assert issubclass(ps.NonFiniteLossError, ValueError)
    assert_same_state(model, before)


@pytest.mark.parametrize("kind", ["random", "one_step", "multi_step"])
def test_loss_becoming_non_finite_under_corruption_is_infinite(kind):
    """Finite at w, NaN once a parameter moves past 1: the corrupted loss is reported as +inf
    (the corruption overflowed the model), never as NaN, and the model is restored."""
    model = nn.Linear(3, 1).double()
    with torch.no_grad():
        model.weight.fill_(0.5)
        model.bias.zero_()

    def loss_fn(m, x):
        out = m(x).mean()
        return torch.where(m.weight.abs().max() > 1.0, torch.full_like(out, float("nan")), out)

    x = torch.ones(4, 3, dtype=torch.float64)
    obj = ps.Objective(model, loss_fn, x)
    before = snapshot(model)
    assert math.isfinite(obj.loss())
    res = ps.make_corruption(kind, ps.Budget("linf", 1.0), **({"steps": 2} if kind == "multi_step" else {}))(obj)
    assert res.loss_after == math.inf and res.loss_change == math.inf
    assert math.isfinite(res.loss_before)
    assert not any(math.isnan(h) for h in res.history)
    assert_same_state(model, before)
    # a small corruption that keeps the loss finite is unaffected
    res = ps.make_corruption(kind, ps.Budget("linf", 0.1), **({"steps": 2} if kind == "multi_step" else {}))(obj)
    assert math.isfinite(res.loss_after)


def test_iterator_data_is_rejected():
    model, batches = stateful_setup()
    with pytest.raises(TypeError, match="data"):
        ps.Objective(model, ce, iter(batches))
    with pytest.raises(TypeError, match="data"):
        ps.Objective(model, ce, (b for b in batches))
    with pytest.raises(TypeError, match="data"):
        ps.Objective(model, ce, 3)
    with pytest.raises(ValueError, match="data is empty"):  # refused when built, not at first use
        ps.Objective(model, ce, [])


def test_objective_arguments_validated():
    model, batches = stateful_setup()
    with pytest.raises(TypeError, match="loss_fn"):
        ps.Objective(model, "ce", batches)
    with pytest.raises(TypeError, match="model"):
        ps.Objective(lambda x: x, ce, batches)
    with pytest.raises(TypeError, match="train_mode"):
        ps.Objective(model, ce, batches, train_mode=1)
    obj = ps.Objective(model, ce, batches)
    with obj.probe() as pr:
        with pytest.raises(ValueError, match="delta"):
            pr.set([torch.zeros(1)])


@pytest.mark.parametrize(
    "make,exc,word",
    [
        (lambda b: ps.RandomCorruption(b, trials=0), ValueError, "trials"),
        (lambda b: ps.RandomCorruption(b, trials=-2), ValueError, "trials"),
        (lambda b: ps.RandomCorruption(b, trials=2.0), TypeError, "trials"),
        (lambda b: ps.RandomCorruption(b, trials=True), TypeError, "trials"),
        (lambda b: ps.RandomCorruption(b, seed=1.5), TypeError, "seed"),
        (lambda b: ps.MultiStepCorruption(b, steps=0), ValueError, "steps"),
        (lambda b: ps.MultiStepCorruption(b, steps=-1), ValueError, "steps"),
        (lambda b: ps.MultiStepCorruption(b, steps=None), TypeError, "steps"),
        (lambda b: ps.MultiStepCorruption(b, restarts=0), ValueError, "restarts"),
        (lambda b: ps.MultiStepCorruption(b, step_size=0.0), ValueError, "step_size"),
        (lambda b: ps.MultiStepCorruption(b, step_size=-0.1), ValueError, "step_size"),
        (lambda b: ps.MultiStepCorruption(b, step_size=float("nan")), ValueError, "step_size"),
        (lambda b: ps.MultiStepCorruption(b, step_size=float("inf")), ValueError, "step_size"),
        (lambda b: ps.MultiStepCorruption(b, step_size="0.1"), ValueError, "step_size"),
        (lambda b: ps.MultiStepCorruption(b, per_step="epoch"), ValueError, "per_step"),
        (lambda b: ps.GradientCorruption(0.1), TypeError, "budget"),
        (lambda b: ps.MultiStepCorruption("l2"), TypeError, "budget"),
        (lambda b: ps.make_corruption("pgd", b), ValueError, "corruption"),
    ],
)
def test_corruption_arguments_validated(make, exc, word):
    with pytest.raises(exc, match=word):
        make(ps.Budget("l2", 0.1))


def test_default_step_size_is_documented_multiple():
    assert ps.MultiStepCorruption(ps.Budget("l2", 0.2), steps=8).step_size == pytest.approx(1.5 * 0.2 / 8)
    assert ps.MultiStepCorruption(ps.Budget("l2", 0.2), steps=8, step_size=0.01).step_size == 0.01


# ------------------------------------------------------------------------------ selection
class SelNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(2, 3)
        self.bn = nn.BatchNorm1d(3)
        self.fc2 = nn.Linear(3, 1)
        self.frozen = nn.Parameter(torch.ones(2), requires_grad=False)
        self.counts = nn.Parameter(torch.zeros(2, dtype=torch.long), requires_grad=False)


def names(model, spec):
    return [n for n, _ in ps.select_parameters(model, spec)]


def test_selection_kinds():
    m = SelNet()
    trainable = ["fc1.weight", "fc1.bias", "bn.weight", "bn.bias", "fc2.weight", "fc2.bias"]
    assert names(m, None) == trainable
    assert names(m, "fc*.weight") == ["fc1.weight", "fc2.weight"]
    assert names(m, "fc1.bias") == ["fc1.bias"]
    assert names(m, ["fc2.bias", "fc1.weight"]) == ["fc1.weight", "fc2.bias"]  # model order
    assert names(m, ["fc2.*", "bn.weight"]) == ["bn.weight", "fc2.weight", "fc2.bias"]
    assert names(m, nn.Linear) == ["fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"]
    assert names(m, nn.BatchNorm1d) == ["bn.weight", "bn.bias"]
    assert names(m, (nn.BatchNorm1d, nn.Linear)) == trainable
    assert names(m, lambda n, p: p.dim() == 1) == ["fc1.bias", "bn.weight", "bn.bias", "fc2.bias"]
    assert names(m, [m.fc2.weight, m.bn.bias]) == ["bn.bias", "fc2.weight"]
    assert names(m, m.parameters()) == trainable
    assert names(m, m.fc2) == ["fc2.weight", "fc2.bias"]  # a submodule instance
    assert names(m, m) == trainable
    sel = ps.select_parameters(m, "fc1.*")
    assert sel[0][1] is m.fc1.weight  # the parameters themselves, not copies
    # an Objective takes the same selectors
    obj = ps.Objective(m, lambda mod, b: mod.fc2(mod.fc1(b)).mean(), torch.ones(2, 2), params=nn.Linear)
    assert obj.names == ["fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"]


def test_frozen_and_integer_tensors_are_never_selected():
    m = SelNet()
    everything = lambda n, p: True  # noqa: E731
    assert "frozen" not in names(m, everything) and "counts" not in names(m, everything)
    assert "frozen" not in names(m, "*") and "counts" not in names(m, "*")
    assert names(m, [m.frozen, m.counts, m.fc1.bias]) == ["fc1.bias"]
    assert names(m, ["frozen", "fc1.bias", "counts"]) == ["fc1.bias"]
    for spec in ("frozen", "counts", ["frozen", "counts"], [m.frozen], lambda n, p: n == "frozen"):
        with pytest.raises(ValueError, match="params"):
            ps.select_parameters(m, spec)
    # frozen parameters are never corrupted
    obj = ps.Objective(m, lambda mod, b: (mod.fc2(mod.fc1(b)) + mod.frozen.sum()).mean(), torch.ones(2, 2), params=everything)
    res = ps.GradientCorruption(ps.Budget("linf", 0.1))(obj)
    assert set(res.delta) == {"fc1.weight", "fc1.bias", "bn.weight", "bn.bias", "fc2.weight", "fc2.bias"}


@pytest.mark.parametrize("spec", ["nothing*", "fc3.weight", [], lambda n, p: False, nn.Conv2d, ["nope", "nada"]])
def test_empty_selection_is_an_error(spec):
    m = SelNet()
    with pytest.raises(ValueError, match="params"):
        ps.select_parameters(m, spec)
    with pytest.raises(ValueError, match="params"):
        ps.Objective(m, lambda mod, b: mod.fc1(b).mean(), torch.ones(2, 2), params=spec)


@pytest.mark.parametrize("spec", [3, 2.5, ["fc1.weight", 3], [object()]])
def test_unknown_selector_is_a_type_error(spec):
    with pytest.raises(TypeError, match="params"):
        ps.select_parameters(SelNet(), spec)


def test_select_parameters_needs_a_module():
    with pytest.raises(TypeError, match="model"):
        ps.select_parameters([torch.zeros(2)], None)


def test_names_with_glob_characters_select_exactly():
    m = nn.ModuleDict({"a[0]": nn.Linear(2, 1), "a0": nn.Linear(2, 1), "b*": nn.Linear(2, 1)})
    assert names(m, "a[0].weight") == ["a[0].weight"]
    assert names(m, ["a[0].bias", "b*.bias"]) == ["a[0].bias", "b*.bias"]
    assert names(m, "a?.weight") == ["a0.weight"]  # still a glob when no name matches exactly
    assert names(m, "b*") == ["b*.weight", "b*.bias"]  # not a name: a glob pattern


def test_an_empty_corruption_is_a_no_op():
    import parashield as ps

    model = torch.nn.Linear(3, 2)
    before = [p.detach().clone() for p in model.parameters()]
    with ps.corrupted(model, {}):
        pass
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
