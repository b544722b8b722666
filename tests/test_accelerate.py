"""parashield's defenses with ``accelerate``: a ``prepare``d defense in the documented loop equals
the plain loop; the usual ``backward(); step()`` shape and gradient accumulation are refused with
errors that say what to write."""

import copy

import pytest
import torch
from torch import nn

import parashield as ps

accelerate = pytest.importorskip("accelerate")
from accelerate.state import AcceleratorState, GradientState  # noqa: E402

from parashield.integrations.accelerate import defense_of  # noqa: E402

STEPS, CLIP = 3, 0.3


@pytest.fixture(autouse=True)
def fresh_state():
    """accelerate keeps its state in process-wide singletons: each test starts and ends clean."""
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    yield
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def network() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 3)).double()


def batches(n: int = STEPS):
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(8, 5, generator=g, dtype=torch.float64), torch.randint(0, 3, (8,), generator=g))
            for _ in range(n)]


def make_defense(params):
    return ps.APD(params, torch.optim.SGD, budget=ps.Budget("l2", 0.2), steps=2, lr=0.5, momentum=0.9)


def loss_fn(model, x, y):
    return nn.functional.cross_entropy(model(x), y)


def plain(model, shape: str) -> None:
    """The same maths without accelerate (a closure step has no place for clipping)."""
    opt = make_defense(model.parameters())
    sched = torch.optim.lr_scheduler.StepLR(opt, 1, gamma=0.5)
    for x, y in batches():
        if shape == "trajectory":
            for _ in opt.trajectory():
                loss_fn(model, x, y).backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
            opt.step()
        else:
            def closure():
                opt.zero_grad()
                loss = loss_fn(model, x, y)
                loss.backward()
                return loss

            opt.step(closure)
        sched.step()


@pytest.mark.parametrize("shape", ["trajectory", "closure"])
def test_prepared_defense_equals_plain_loop(shape):
    model = network()
    ref = copy.deepcopy(model)
    accelerator = accelerate.Accelerator(cpu=True)
    opt = make_defense(model.parameters())
    model, opt, sched = accelerator.prepare(model, opt, torch.optim.lr_scheduler.StepLR(opt, 1, gamma=0.5))
    for x, y in batches():
        if shape == "trajectory":
            for _ in defense_of(opt).trajectory():
                accelerator.backward(loss_fn(model, x, y))
            accelerator.clip_grad_norm_(model.parameters(), CLIP)
            opt.step()
        else:
            def closure():
                opt.zero_grad()
                loss = loss_fn(model, x, y)
                accelerator.backward(loss)
                return loss

            opt.step(closure)
        sched.step()
        opt.zero_grad()
    plain(ref, shape)
    for (name, a), b in zip(model.state_dict().items(), ref.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-10, msg=name)


def test_usual_backward_then_step_is_refused_saying_what_to_write():
    model = network()
    accelerator = accelerate.Accelerator(cpu=True)
    model, opt = accelerator.prepare(model, make_defense(model.parameters()))
    x, y = batches(1)[0]
    accelerator.backward(loss_fn(model, x, y))
    with pytest.raises(RuntimeError, match=r"optimizer.step\(closure\).*trajectory\(\)"):
        opt.step()


@pytest.mark.parametrize("shape", ["trajectory", "closure"])
def test_gradient_accumulation_is_refused_before_any_step(shape):
    model = network()
    w = copy.deepcopy(model.state_dict())
    accelerator = accelerate.Accelerator(cpu=True, gradient_accumulation_steps=2)
    model, opt = accelerator.prepare(model, make_defense(model.parameters()))
    error = (RuntimeError, "before step.. took the last one") if shape == "trajectory" else \
        (ValueError, "gradient_accumulation_steps=2.*inside the closure or the trajectory")
    with pytest.raises(error[0], match=error[1]):
        for x, y in batches(4):
            with accelerator.accumulate(model):
                if shape == "trajectory":
                    for _ in defense_of(opt).trajectory():
                        accelerator.backward(loss_fn(model, x, y))
                    opt.step()
                else:
                    opt.step(lambda: accelerator.backward(loss_fn(model, x, y)))
                opt.zero_grad()
    for (name, a), b in zip(model.state_dict().items(), w.values()):
        if not name.endswith(("running_mean", "running_var", "num_batches_tracked")):
            assert torch.equal(a, b), name  # no step was taken
