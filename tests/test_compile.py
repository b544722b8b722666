"""torch.compile: corrupted passes of the defense never move BatchNorm statistics of a compiled
model (the eager hooks do not fire in compiled code), without recompiling it per pass; results of
a compiled model are keyed like the original's and apply to either.

The default runs compile with a counting backend that executes dynamo's captured graph as is
(compiled code, hooks absent, seconds); the inductor case is marked slow."""

import copy

import pytest
import torch
from torch import nn

import parashield as ps

F64 = torch.float64


class CNN(nn.Module):
    """A user's model class (dynamo does not compile ``nn.Sequential`` compiled in place)."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten())
        self.head = nn.Sequential(nn.Linear(4 * 6 * 6, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def cnn() -> nn.Module:
    torch.manual_seed(0)
    return CNN().to(F64)


def data(step: int):
    g = torch.Generator().manual_seed(step)
    return torch.randn(16, 1, 8, 8, generator=g, dtype=F64), torch.randint(0, 3, (16,), generator=g)


class CountingBackend:
    """A dynamo backend that runs the captured graph and counts compilations."""

    def __init__(self) -> None:
        self.graphs = 0

    def __call__(self, gm: torch.fx.GraphModule, inputs):
        self.graphs += 1
        return gm.forward


def train(model: nn.Module, run: nn.Module, make_opt, steps: int = 3) -> None:
    opt = make_opt(run)
    for step in range(steps):
        x, y = data(step)

        def closure():
            opt.zero_grad()
            loss = nn.functional.cross_entropy(run(x), y)
            loss.backward()
            return loss

        opt.step(closure)


def statistics(model: nn.Module) -> list[torch.Tensor]:
    return [b for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
            for b in (m.running_mean, m.running_var, m.num_batches_tracked)]


OPTIMIZERS = {
    "apd": lambda m, **kw: ps.APD(m.parameters(), torch.optim.SGD, steps=3, lr=0.1, **kw),
    "sam": lambda m, **kw: ps.SAM(m.parameters(), torch.optim.SGD, rho=0.1, lr=0.1, **kw),
}


def compiled(model: nn.Module, how: str, backend) -> nn.Module:
    if how == "torch.compile(model)":
        return torch.compile(model, backend=backend)
    model.compile(backend=backend)
    return model


@pytest.mark.parametrize("how", ["torch.compile(model)", "model.compile()"])
@pytest.mark.parametrize("opt", sorted(OPTIMIZERS))
@pytest.mark.parametrize("pass_model", [False, True], ids=["found", "model="])
def test_compiled_model_batchnorm_statistics_equal_eager(how, opt, pass_model):
    torch._dynamo.reset()
    eager = cnn()
    model = copy.deepcopy(eager)
    backend = CountingBackend()
    run = compiled(model, how, backend)
    make = OPTIMIZERS[opt]
    train(model, run, lambda r: make(r, model=r) if pass_model else make(r))
    train(eager, eager, make)
    assert backend.graphs == 1  # compiled once: no recompilation per pass or per step
    assert statistics(model)[2] == 3  # one update per step, from the clean pass only
    for a, b in zip(statistics(model), statistics(eager)):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-10)
    for a, b in zip(model.parameters(), eager.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-10)


@pytest.mark.slow
def test_inductor_compiled_batchnorm_statistics_equal_eager():
    torch._dynamo.reset()
    eager, model = cnn(), cnn()
    run = torch.compile(model)
    train(model, run, OPTIMIZERS["apd"], steps=2)
    train(eager, eager, OPTIMIZERS["apd"], steps=2)
    for a, b in zip(statistics(model), statistics(eager)):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-10)


def test_results_of_a_compiled_model_apply_to_the_original_and_back():
    torch._dynamo.reset()
    model = cnn().eval()
    run = torch.compile(model, backend=CountingBackend())
    x, y = data(0)

    def loss_fn(m, batch):
        return nn.functional.cross_entropy(m(batch[0]), batch[1])

    res = ps.GradientCorruption(ps.Budget("l2", 0.5))(ps.Objective(run, loss_fn, (x, y)))
    assert sorted(res.delta) == sorted(n for n, _ in model.named_parameters())  # no _orig_mod.
    with ps.corrupted(model, res):
        assert loss_fn(model, (x, y)).item() == pytest.approx(res.loss_after, abs=1e-10)
    original = ps.GradientCorruption(ps.Budget("l2", 0.5))(ps.Objective(model, loss_fn, (x, y)))
    with ps.corrupted(run, original):
        assert loss_fn(model, (x, y)).item() == pytest.approx(original.loss_after, abs=1e-10)
    assert ps.select_parameters(run, "_orig_mod.head.0.weight") == ps.select_parameters(run, "head.0.weight")
