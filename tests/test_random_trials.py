"""Batched (vmap) random trials give the same numbers as one evaluation per trial."""

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import parashield as ps


def _objective(batches: int = 1, dtype=torch.float64):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 3)).to(dtype)
    data = [(torch.randn(n, 8, dtype=dtype), torch.randint(0, 3, (n,))) for n in (20, 13, 7)[:batches]]
    loss = lambda m, b: F.cross_entropy(m(b[0]), b[1])  # noqa: E731
    return ps.Objective(model, loss, data if batches > 1 else data[0])


@pytest.mark.parametrize("batches", [1, 3])
@pytest.mark.parametrize("scale", [None, "layer", "element"])
def test_vectorized_equals_loop(batches, scale):
    obj = _objective(batches)
    budget = ps.Budget("l2", 0.3, scale=scale)
    loop = ps.RandomCorruption(budget, trials=40, seed=1, vectorize=False)(obj)
    fast = ps.RandomCorruption(budget, trials=40, seed=1, vectorize=True, chunk_size=16)(obj)
    assert fast.history == pytest.approx(loop.history, rel=1e-10, abs=1e-12)
    assert fast.loss_before == loop.loss_before
    assert all(torch.equal(fast.delta[n], loop.delta[n]) for n in loop.delta)


def test_vectorized_float32_close_to_loop():
    obj = _objective(1, torch.float32)
    budget = ps.Budget("linf", 0.05)
    loop = ps.RandomCorruption(budget, trials=8, seed=0, vectorize=False)(obj)
    fast = ps.RandomCorruption(budget, trials=8, seed=0, vectorize=True)(obj)
    assert fast.history == pytest.approx(loop.history, rel=1e-5)


def test_auto_falls_back_when_loss_cannot_be_vmapped():
    obj = _objective(1)
    obj.loss_fn = lambda m, b: F.cross_entropy(m(b[0]), b[1]) * (1.0 + 0 * float(m(b[0]).sum().item()))
    budget = ps.Budget("l2", 0.3)
    with pytest.warns(UserWarning, match="fall back"):
        auto = ps.RandomCorruption(budget, trials=5, seed=0)(obj)
    loop = ps.RandomCorruption(budget, trials=5, seed=0, vectorize=False)(obj)
    assert auto.history == pytest.approx(loop.history, rel=1e-12)
    with pytest.raises(RuntimeError):
        ps.RandomCorruption(budget, trials=5, seed=0, vectorize=True)(obj)


def test_train_mode_uses_the_loop_and_no_warning():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Linear(6, 2)).double()
    batch = (torch.randn(10, 4, dtype=torch.float64), torch.randint(0, 2, (10,)))
    obj = ps.Objective(model, lambda m, b: F.cross_entropy(m(b[0]), b[1]), batch, train_mode=True)
    before = [b.clone() for b in model.buffers()]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ps.RandomCorruption(ps.Budget("l2", 0.1), trials=3)(obj)
    assert all(torch.equal(a, b) for a, b in zip(before, model.buffers()))


def test_bad_vectorize_and_chunk_size():
    for bad in ("yes", 1, 1.0, 0.0):
        with pytest.raises(ValueError, match="vectorize"):
            ps.RandomCorruption(ps.Budget(), vectorize=bad)
    with pytest.raises(ValueError, match="chunk_size"):
        ps.RandomCorruption(ps.Budget(), chunk_size=0)


@pytest.mark.parametrize("norm", ["l1", "l2", "linf"])
@pytest.mark.parametrize("sparsity,scale", [(None, None), (None, "layer"), (5, None), (5, "element")])
def test_stacked_samples_equal_successive_draws(norm, sparsity, scale):
    """``Budget.samples`` draws row i exactly as the i-th ``sample`` call: trials do not depend on
    the chunking, and each row lies on the budget's boundary."""
    torch.manual_seed(2)
    params = [torch.randn(4, 3), torch.randn(6)]
    budget = ps.Budget(norm, 0.2, sparsity=sparsity, scale=scale)
    gen = torch.Generator().manual_seed(7)
    single = [budget.sample(params, gen) for _ in range(5)]
    stacked = budget.samples(params, torch.Generator().manual_seed(7), 5)
    assert [tuple(s.shape) for s in stacked] == [(5, 4, 3), (5, 6)]
    for i, one in enumerate(single):
        assert all(torch.equal(s[i], x) for s, x in zip(stacked, one))
        assert budget.contains(one, params)
        assert budget.measure(one, params) == pytest.approx(0.2, rel=1e-5)
    assert not torch.equal(stacked[0][0], stacked[0][1])


def test_trials_do_not_depend_on_chunk_size_and_draw_on_is_checked():
    obj = _objective(1)
    budget = ps.Budget("l1", 0.3, sparsity=20)
    a = ps.RandomCorruption(budget, trials=11, seed=4, chunk_size=3)(obj)
    b = ps.RandomCorruption(budget, trials=11, seed=4, chunk_size=32)(obj)
    assert a.history == pytest.approx(b.history, rel=1e-12)
    on_device = ps.RandomCorruption(budget, trials=11, seed=4, draw_on="device")(obj)  # CPU here
    assert on_device.history == pytest.approx(a.history, rel=1e-12)
    with pytest.raises(ValueError, match="draw_on"):
        ps.RandomCorruption(budget, draw_on="gpu")


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_draws_on_device_batched_equals_loop():
    obj = _objective(1, torch.float32)
    obj.model.cuda()
    obj.data = tuple(t.cuda() for t in obj.data)
    budget = ps.Budget("l2", 0.3, scale="layer")
    loop = ps.RandomCorruption(budget, trials=40, seed=1, vectorize=False, draw_on="device")(obj)
    fast = ps.RandomCorruption(budget, trials=40, seed=1, vectorize=True, draw_on="device", chunk_size=16)(obj)
    assert fast.history == pytest.approx(loop.history, rel=1e-5)
    assert all(d.is_cuda for d in fast.delta.values())
