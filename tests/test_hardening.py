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
    rng = torch.get_rng_state()
    torch.manual_seed(123)
    rng = torch.get_rng_state()
    with pytest.raises(ps.CheckpointError, match="does not fit the optimizer"):
        ps.load_checkpoint(path, other, two_groups)
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
