"""Loss landscapes: grid shapes, the centre is the clean loss, exact values on quadratic and
least-squares models, vmap and loop agree, the model is restored bit for bit (also on errors),
filter normalization and input checks (``parashield landscape`` is tested with the command line)."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from torch import nn

from parashield import Budget, GradientCorruption, Objective
from parashield.landscape import (
    corruption_direction,
    loss_line,
    loss_surface,
    plot_line,
    plot_surface,
    random_direction,
)

ALPHAS = [-1.0, -0.5, 0.0, 0.5, 1.0]


@pytest.fixture
def mlp_objective(models):
    return Objective(models.make_mlp(seed=0, sizes=(3, 5, 4, 2)), models.mse_loss, models.regression_batch())


def snapshot(model: nn.Module) -> list[torch.Tensor]:
    return [t.detach().clone() for t in [*model.parameters(), *model.buffers()]]


def assert_identical(model: nn.Module, saved: list[torch.Tensor]) -> None:
    now = [*model.parameters(), *model.buffers()]
    assert len(now) == len(saved) and all(torch.equal(a, b) for a, b in zip(now, saved))


# ------------------------------------------------------------------------------ shapes and centre
@pytest.mark.parametrize("alphas,betas", [(ALPHAS, [-0.3, 0.0, 0.3]), ([0.0], [0.0]), ([0.0, 2.0], [0.0])])
def test_grid_shapes_and_centre_is_the_clean_loss(mlp_objective, alphas, betas):
    d1, d2 = random_direction(mlp_objective, seed=1), random_direction(mlp_objective, seed=2)
    line = loss_line(mlp_objective, d1, alphas)
    surface = loss_surface(mlp_objective, d1, d2, alphas, betas, batch_size=2)
    assert line.shape == (len(alphas),) and line.dtype == torch.float64
    assert surface.shape == (len(alphas), len(betas))
    clean = mlp_objective.loss()
    assert float(line[alphas.index(0.0)]) == pytest.approx(clean, rel=1e-6)
    assert float(surface[alphas.index(0.0), betas.index(0.0)]) == pytest.approx(clean, rel=1e-6)
    torch.testing.assert_close(surface[:, betas.index(0.0)], line, rtol=1e-10, atol=0)  # beta = 0 is the line


# ------------------------------------------------------------------------------ exact values
def test_quadratic_line_and_surface_match_the_closed_form(models):
    g = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    H = torch.tensor([[2.0, 0.3, 0.0], [0.3, 1.0, -0.4], [0.0, -0.4, 3.0]], dtype=torch.float64)
    w0 = torch.tensor([0.2, -0.1, 0.4], dtype=torch.float64)
    model = models.Quadratic(g, H, w0)
    obj = Objective(model, models.quadratic_loss, torch.zeros(1))
    d1 = random_direction(obj, seed=3, filter_normalized=False)
    d2 = random_direction(obj, seed=4, filter_normalized=False)

    def exact(a: torch.Tensor) -> float:
        return float(g @ a + 0.5 * a @ (model.H @ a))

    alphas, betas = [-2.0, -0.5, 0.0, 1.0, 3.0], [-1.0, 0.0, 0.7]
    line = loss_line(obj, d1, alphas, batch_size=2)
    assert line.tolist() == pytest.approx([exact(a * d1[0]) for a in alphas], rel=1e-12, abs=1e-12)
    surface = loss_surface(obj, d1, d2, alphas, betas)
    want = [[exact(a * d1[0] + b * d2[0]) for b in betas] for a in alphas]
    torch.testing.assert_close(surface, torch.tensor(want, dtype=torch.float64), rtol=1e-12, atol=1e-12)


def test_least_squares_line_matches_the_closed_form():
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(20, 4, generator=gen, dtype=torch.float64), torch.randn(20, 3, generator=gen, dtype=torch.float64)
    model = nn.Linear(4, 3, bias=False).double()
    obj = Objective(model, lambda m, b: ((m(b[0]) - b[1]) ** 2).mean(), (x, y))
    (d,) = random_direction(obj, seed=5)
    W = model.weight.detach()
    alphas = [-1.5, -0.25, 0.0, 0.75, 2.0]
    want = [float(((x @ (W + a * d).T - y) ** 2).mean()) for a in alphas]
    assert loss_line(obj, [d], alphas).tolist() == pytest.approx(want, rel=1e-12)


def test_corruption_direction_at_alpha_one_is_the_corruption(mlp_objective):
    budget = Budget("l2", 0.1, scale="layer")
    d = corruption_direction(mlp_objective, "one_step", budget)
    assert [t.shape for t in d] == [p.shape for p in mlp_objective.params]
    for t, w in zip(d, mlp_objective.params):  # the layer budget is tight for the one-step corruption
        assert float(t.norm()) == pytest.approx(0.1 * float(w.detach().norm()), rel=1e-9)
    after = GradientCorruption(budget)(mlp_objective).loss_after
    assert float(loss_line(mlp_objective, d, [1.0])[0]) == pytest.approx(after, rel=1e-9)
    for kind, kw in (("random", {"trials": 2, "seed": 1}), ("multi_step", {"steps": 2})):
        assert [t.shape for t in corruption_direction(mlp_objective, kind, budget, **kw)] == [t.shape for t in d]


# ------------------------------------------------------------------------------ evaluation paths
def test_vmap_and_loop_agree_over_uneven_chunks(mlp_objective):
    d1, d2 = random_direction(mlp_objective, seed=1), random_direction(mlp_objective, seed=2)
    alphas, betas = torch.linspace(-1, 1, 7), [-0.5, 0.0, 0.5]
    for batch_size in (1, 4, 100):
        batched = loss_surface(mlp_objective, d1, d2, alphas, betas, batch_size=batch_size, vectorize=True)
        looped = loss_surface(mlp_objective, d1, d2, alphas, betas, batch_size=batch_size, vectorize=False)
        torch.testing.assert_close(batched, looped, rtol=1e-10, atol=1e-12)


def test_auto_loops_on_the_cpu_so_an_unvmappable_loss_just_works(models, recwarn):
    """On the CPU ``"auto"`` is the in-place loop (no vmap attempt, no warning): the same numbers
    as ``vectorize=False`` bit for bit, and close to the vmapped points; ``True`` still vmaps,
    and raises where the loss cannot be vmapped."""
    model = models.make_mlp(seed=0)

    def loss_with_item(m, batch):  # .item() cannot be vmapped
        loss = models.mse_loss(m, batch)
        return loss * (1.0 + 0.0 * loss.item())

    obj = Objective(model, loss_with_item, models.regression_batch())
    d = random_direction(obj, seed=1)
    auto = loss_line(obj, d, ALPHAS, batch_size=2)
    assert not [w for w in recwarn if "vmap" in str(w.message)]
    torch.testing.assert_close(auto, loss_line(obj, d, ALPHAS, vectorize=False), rtol=0, atol=0)
    with pytest.raises(RuntimeError):
        loss_line(obj, d, ALPHAS, vectorize=True)
    plain = Objective(model, models.mse_loss, models.regression_batch())
    torch.testing.assert_close(loss_line(plain, d, ALPHAS), loss_line(plain, d, ALPHAS, vectorize=True),
                               rtol=1e-12, atol=1e-14)


def test_the_loop_allocates_nothing_parameter_sized_per_point():
    """The CPU loop sets ``w + sum_k c_k d_k`` with one copy and one fused add per direction:
    the parameter-sized allocations of a call (the probe's copy of w) do not grow with the
    number of points, as a batched chunk of corruptions would."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 256), nn.Tanh(), nn.Linear(256, 2))  # 64k-entry weight
    obj = Objective(model, lambda m, b: m(b).square().mean(), torch.randn(2, 256))
    d1, d2 = random_direction(obj, seed=1), random_direction(obj, seed=2)

    def large_allocations(points: int) -> int:
        alphas = torch.linspace(-1, 1, points)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
            loss_surface(obj, d1, d2, alphas, [0.5])
        return sum(1 for e in prof.events() if e.self_cpu_memory_usage >= 4 * 256 * 256)

    # the probe's copy of w and one finiteness check per direction, whatever the number of points
    assert large_allocations(3) == large_allocations(30) <= 3


def test_a_loss_fn_returning_one_buffer_gives_every_point_its_own_value(mlp_objective):
    """Each point's loss is copied out: a loss_fn that writes into a buffer it reuses (float64,
    where no cast copies it) still gives the line, not the last point everywhere."""
    buffer = torch.zeros((), dtype=torch.float64)
    model, batch = mlp_objective.model, mlp_objective.data

    def reused(m, b):
        return buffer.copy_(((m(b[0]) - b[1]) ** 2).mean())

    d = random_direction(mlp_objective, seed=1)
    expected = loss_line(mlp_objective, d, [-1.0, 0.0, 1.0])
    got = loss_line(Objective(model, reused, batch), d, [-1.0, 0.0, 1.0])
    assert len(set(got.tolist())) == 3
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=0)


@pytest.mark.parametrize("vectorize", [True, False])
def test_non_finite_losses_are_reported_as_inf(vectorize):
    model = nn.Linear(2, 1, bias=False).double()
    with torch.no_grad():
        model.weight.zero_()
    # log(1 - |w|_1): -inf at |w|_1 = 1, NaN beyond.
    obj = Objective(model, lambda m, b: torch.log(1 - m.weight.abs().sum()), torch.zeros(1))
    d = [torch.tensor([[1.0, 0.0]], dtype=torch.float64)]
    line = loss_line(obj, d, [-2.0, -1.0, 0.0, 0.5, 3.0], vectorize=vectorize)
    assert line.tolist() == [math.inf, math.inf, 0.0, pytest.approx(math.log(0.5)), math.inf]


@pytest.mark.parametrize("vectorize", [True, False])
def test_model_is_restored_bit_for_bit_also_after_an_error(models, vectorize):
    model = models.make_mlp(seed=0)
    saved = snapshot(model)
    calls = {"n": 0}

    def flaky(m, batch):
        calls["n"] += 1
        if calls["n"] == 3:
            raise ValueError("boom")
        return models.mse_loss(m, batch)

    obj = Objective(model, flaky, models.regression_batch())
    d = random_direction(obj, seed=1, filter_normalized=False)
    with pytest.raises(ValueError, match="boom"):
        loss_line(obj, d, torch.linspace(-3, 3, 9), batch_size=2, vectorize=vectorize)
    assert calls["n"] == 3
    assert_identical(model, saved)
    loss_surface(obj, d, d, ALPHAS, ALPHAS, vectorize=vectorize)  # and after a full run
    assert_identical(model, saved)


# ------------------------------------------------------------------------------ directions
def test_filter_normalized_direction(mlp_objective):
    d = random_direction(mlp_objective, seed=7)
    for name, t, w in zip(mlp_objective.names, d, mlp_objective.params):
        assert t.shape == w.shape and t.dtype == w.dtype
        if w.dim() >= 2:
            torch.testing.assert_close(t.flatten(1).norm(dim=1), w.detach().flatten(1).norm(dim=1))
        else:
            assert not t.any(), f"{name}: one-dimensional parameters get a zero direction"
    torch.manual_seed(123)  # the global RNG state does not matter
    again = random_direction(mlp_objective, seed=7)
    assert all(torch.equal(a, b) for a, b in zip(d, again))
    other = random_direction(mlp_objective, seed=8)
    assert not torch.equal(d[0], other[0])
    plain = random_direction(mlp_objective, seed=7, filter_normalized=False)
    assert all(t.any() for t in plain)


def test_all_one_dimensional_parameters_warn(models):
    obj = Objective(models.Quadratic(torch.ones(2), torch.eye(2)), models.quadratic_loss, torch.zeros(1))
    with pytest.warns(UserWarning, match="filter_normalized=False"):
        (d,) = random_direction(obj)
    assert not d.any()


# ------------------------------------------------------------------------------ input checks
@pytest.mark.parametrize("alphas,error,match", [
    ([], ValueError, "alphas must be a non-empty 1-D"),
    ([[0.0, 1.0]], ValueError, "alphas must be a non-empty 1-D"),
    (0.5, ValueError, "alphas must be a non-empty 1-D"),
    ([0.0, float("nan")], ValueError, "alphas must be finite"),
    ([0.0, math.inf], ValueError, "alphas must be finite"),
    ("0.5", TypeError, "alphas must be a 1-D sequence of numbers"),
    ([0.0, "x"], TypeError, "alphas must be a 1-D sequence of numbers"),
])
def test_bad_alphas(mlp_objective, alphas, error, match):
    d = random_direction(mlp_objective)
    with pytest.raises(error, match=match):
        loss_line(mlp_objective, d, alphas)
    with pytest.raises(error, match=match.replace("alphas", "betas")):
        loss_surface(mlp_objective, d, d, [0.0], alphas)


def test_bad_directions_and_options(mlp_objective):
    d = random_direction(mlp_objective)
    cases = [
        (d[:-1], ValueError, r"direction has 5 tensors, the objective has 6 parameters"),
        ([d[0].T, *d[1:]], ValueError, r"direction\[0\] has shape \(3, 5\), parameter '0.weight' has \(5, 3\)"),
        ([d[0].tolist(), *d[1:]], TypeError, r"direction\[0\] must be a tensor"),
        ([d[0] * math.inf, *d[1:]], ValueError, r"direction\[0\] has non-finite entries"),
        (d[0], TypeError, "direction must be a list of tensors"),
        (None, TypeError, "direction must be a list of tensors"),
    ]
    for direction, error, match in cases:
        with pytest.raises(error, match=match):
            loss_line(mlp_objective, direction, ALPHAS)
    with pytest.raises(ValueError, match=r"d2 has 1 tensors"):
        loss_surface(mlp_objective, d, d[:1], ALPHAS, ALPHAS)
    with pytest.raises(ValueError, match="batch_size must be an int >= 1"):
        loss_line(mlp_objective, d, ALPHAS, batch_size=0)
    with pytest.raises(ValueError, match="vectorize must be True, False or 'auto'"):
        loss_line(mlp_objective, d, ALPHAS, vectorize="yes")
    with pytest.raises(TypeError, match="seed must be an int"):
        random_direction(mlp_objective, seed=1.5)
    with pytest.raises(ValueError, match="kind must be one of 'random', 'one_step', 'multi_step'"):
        corruption_direction(mlp_objective, "gradient", Budget("l2", 0.1))


def test_plots_write_pngs(tmp_path):
    a = [-1.0, 0.0, 1.0]
    assert plot_line(tmp_path / "l.png", a, {"x": [1.0, 0.5, math.inf]}, clean_loss=0.5).stat().st_size > 0
    z = torch.tensor([[1.0, 2.0, 3.0], [0.5, 0.2, 0.7], [2.0, math.inf, 1.0]])
    assert plot_surface(tmp_path / "s.png", a, a, z).stat().st_size > 0
    with pytest.raises(ValueError, match=r"losses must have shape"):
        plot_surface(tmp_path / "s.png", a, a[:2], z)


def test_no_warnings_on_a_plain_run(mlp_objective):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loss_surface(mlp_objective, random_direction(mlp_objective), random_direction(mlp_objective, seed=1),
                     ALPHAS, ALPHAS)
