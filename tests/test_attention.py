"""Curvature (Hessian-vector products, double backward) on attention models: the fused
``scaled_dot_product_attention`` kernels have no double backward, so the HVP passes run the math
backend, and the user's backend choice is left as it was."""

import math

import pytest
import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

import parashield as ps


class Attention(nn.Module):
    """One self-attention layer and a linear readout; ``fused`` uses ``F.scaled_dot_product_attention``,
    otherwise the same maths written out (the reference, which has a double backward)."""

    def __init__(self, fused: bool, dim: int = 8) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, 2)
        self.fused = fused

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = (t.unflatten(-1, (2, -1)).transpose(1, 2) for t in self.qkv(x).chunk(3, dim=-1))  # 2 heads
        if self.fused:
            h = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            mask = torch.ones(x.shape[1], x.shape[1], dtype=torch.bool).tril()
            scores = (q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])).masked_fill(~mask, -math.inf)
            h = scores.softmax(-1) @ v
        return self.out(h.transpose(1, 2).flatten(2).mean(1))


def objective(fused: bool, dtype=torch.float64) -> ps.Objective:
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(4, 5, 8, generator=g, dtype=torch.float64).to(dtype), torch.randint(0, 2, (4,), generator=g)
    model = Attention(fused).to(dtype)
    return ps.Objective(model, lambda m, b: nn.functional.cross_entropy(m(b[0]), b[1]), (x, y))


def flags() -> tuple:
    b = torch.backends.cuda
    return (b.flash_sdp_enabled(), b.mem_efficient_sdp_enabled(), b.math_sdp_enabled(), b.cudnn_sdp_enabled())


INDICATORS = {
    "hessian_top_eigenvalue": lambda o: ps.hessian_top_eigenvalue(o, iters=30, seed=0),
    "hessian_trace": lambda o: ps.hessian_trace(o, samples=5, seed=0),
    "second_order": lambda o: ps.loss_change(o, ps.Budget("l2", 0.1), method="second_order", iters=20, seed=0),
}


def test_fused_attention_has_no_double_backward_by_default():
    """The premise: without the switch, a Hessian-vector product through the fused CPU kernel fails."""
    obj = objective(True, torch.float32)
    loss = obj.loss_fn(obj.model, obj.data)
    grads = torch.autograd.grad(loss, obj.params, create_graph=True)
    with pytest.raises(RuntimeError, match="derivative for .* is not implemented"):
        torch.autograd.grad(sum(g.sum() for g in grads), obj.params)


@pytest.mark.parametrize("name", sorted(INDICATORS))
def test_curvature_through_sdpa_equals_written_out_attention(name):
    before = flags()
    with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]):  # the user's choice
        inside = flags()
        value = INDICATORS[name](objective(True))
        assert flags() == inside
    assert flags() == before
    assert value == pytest.approx(INDICATORS[name](objective(False)), rel=1e-9, abs=1e-10)


def test_float32_sdpa_model_gets_its_curvature():
    value = ps.hessian_top_eigenvalue(objective(True, torch.float32), iters=30, seed=0)
    assert value == pytest.approx(ps.hessian_top_eigenvalue(objective(False), iters=30, seed=0), rel=1e-4)
