"""Shared fixtures for the parashield core tests: tiny models with known losses.

The builders are exposed as session-scoped fixtures returning factories, so that hypothesis tests
can use them without function-scoped-fixture warnings.
"""

from __future__ import annotations

import os
from typing import Optional

import pytest
import torch
from torch import nn


@pytest.fixture(scope="session", autouse=True)
def _torch_threads():
    """One intra-op thread by default (override with PARASHIELD_TEST_THREADS): the test models are
    tiny, and on a small, shared CPU OpenMP threads that spin while waiting for each other make
    them tens of times slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(int(os.environ.get("PARASHIELD_TEST_THREADS", "1")))
    yield
    torch.set_num_threads(before)

# ------------------------------------------------------------------------------ quadratic
class Quadratic(nn.Module):
    """``L(w) = g.(w - w0) + (w - w0).H.(w - w0) / 2``, with ``w`` starting at ``w0``.

    At the start the gradient is exactly ``g`` and the Hessian exactly ``H``, and the loss change
    of a corruption ``a`` is exactly ``g.a + a.H.a / 2``.
    """

    def __init__(self, g: torch.Tensor, H: torch.Tensor, w0: Optional[torch.Tensor] = None) -> None:
        super().__init__()
        g = torch.as_tensor(g, dtype=torch.float64)
        H = torch.as_tensor(H, dtype=torch.float64)
        w0 = torch.zeros_like(g) if w0 is None else torch.as_tensor(w0, dtype=torch.float64)
        self.w = nn.Parameter(w0.clone())
        self.register_buffer("g", g.clone())
        self.register_buffer("H", 0.5 * (H + H.T))
        self.register_buffer("w0", w0.clone())

    def forward(self) -> torch.Tensor:
        d = self.w - self.w0
        return self.g @ d + 0.5 * d @ (self.H @ d)


def quadratic_loss(model: nn.Module, batch) -> torch.Tensor:
    return model()


# ------------------------------------------------------------------------------ linear
class LinearModel(nn.Module):
    """``y = x1 . a + sum(x2 * B)`` with two parameter tensors ``a`` (3,) and ``B`` (2, 2).

    With ``loss = mean(y)`` the loss is linear in the parameters: the gradient is the batch mean of
    the inputs and any corruption changes the loss by exactly ``<g, delta>``.
    """

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(seed)
        self.a = nn.Parameter(torch.randn(3, generator=gen, dtype=torch.float64))
        self.B = nn.Parameter(torch.randn(2, 2, generator=gen, dtype=torch.float64))

    def forward(self, x1: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
        return x1 @ self.a + (x2 * self.B).sum(dim=(1, 2))


def linear_loss(model: nn.Module, batch) -> torch.Tensor:
    x1, x2 = batch
    return model(x1, x2).mean()


def linear_batch(seed: int = 1, n: int = 7):
    gen = torch.Generator().manual_seed(seed)
    return (
        torch.randn(n, 3, generator=gen, dtype=torch.float64),
        torch.randn(n, 2, 2, generator=gen, dtype=torch.float64),
    )


# ------------------------------------------------------------------------------ MLPs
def make_mlp(seed: int = 0, sizes=(3, 4, 2), dtype=torch.float64, act=nn.Tanh) -> nn.Sequential:
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(act())
    return nn.Sequential(*layers).to(dtype)


def regression_batch(seed: int = 1, n: int = 12, d_in: int = 3, d_out: int = 2, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d_in, generator=gen, dtype=dtype)
    y = torch.randn(n, d_out, generator=gen, dtype=dtype)
    return x, y


def mse_loss(model: nn.Module, batch) -> torch.Tensor:
    x, y = batch
    return ((model(x) - y) ** 2).mean()


# ------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="session")
def make_quadratic():
    return Quadratic


@pytest.fixture(scope="session")
def models():
    """Namespace of the builders above."""

    class _NS:
        Quadratic = Quadratic
        quadratic_loss = staticmethod(quadratic_loss)
        LinearModel = LinearModel
        linear_loss = staticmethod(linear_loss)
        linear_batch = staticmethod(linear_batch)
        make_mlp = staticmethod(make_mlp)
        regression_batch = staticmethod(regression_batch)
        mse_loss = staticmethod(mse_loss)

    return _NS
