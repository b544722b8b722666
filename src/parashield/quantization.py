"""Symmetric int8 weight quantization: the integer codes that bit-flip corruptions act on.

A weight tensor w is stored as codes q in [-127, 127] (int8) and a scale s, ``w ~ q * s``, with
one scale per tensor or per output channel (dim 0). The model itself stays a float model: its
parameters hold the dequantized values ``q * s``, so every other part of parashield (objectives,
corruptions, defenses) works on the quantized model unchanged.

The formulas: docs/method.md, "Bit flips and int8 quantization".
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .selection import ParamSpec, select_parameters

GRANULARITIES = ("tensor", "channel")
QMAX = 127  # symmetric: -127..127, so that -q is representable; a flipped bit may still give -128


def _scale(w: Tensor, granularity: str) -> Tensor:
    """max|w| / 127 over the tensor or over each output channel (a zero group gets scale 1)."""
    w = w.detach().float()
    if granularity == "channel" and w.dim() >= 2:
        amax = w.abs().flatten(1).amax(1).view(-1, *([1] * (w.dim() - 1)))
    else:
        amax = w.abs().amax()
    return torch.where(amax > 0, amax / QMAX, torch.ones_like(amax))


@dataclass
class Int8Quantization:
    """The int8 codes and scales of quantized parameters.

    ``params[i] == dequantize()[i]`` holds after :func:`quantize_`; ``codes[i]`` is int8 with the
    shape of ``params[i]``, ``scales[i]`` float32 broadcastable to it (shape ``()`` per tensor,
    ``(out, 1, ...)`` per channel).
    """

    names: list[str]
    params: list[nn.Parameter]
    codes: list[Tensor]
    scales: list[Tensor]
    granularity: str

    @property
    def numel(self) -> int:
        return sum(c.numel() for c in self.codes)

    @property
    def bits(self) -> int:
        """Number of bits of the int8 codes: the population random bit flips draw from."""
        return 8 * self.numel

    def dequantize(self) -> list[Tensor]:
        """``codes * scale`` in each parameter's dtype."""
        return [self.dequantize_one(i, c) for i, c in enumerate(self.codes)]

    def scale_at(self, i: int, index: int) -> Tensor:
        """The scale of element ``index`` (row-major) of tensor i."""
        s = self.scales[i].reshape(-1)
        return s[index // (self.codes[i].numel() // len(s))]

    def dequantize_one(self, i: int, codes: Tensor) -> Tensor:
        """``codes * scale`` of tensor i, in its parameter's dtype."""
        return (codes.float() * self.scales[i]).to(self.params[i].dtype)

    def check_current(self) -> None:
        """Raise ValueError if a parameter no longer holds its dequantized codes (it was trained,
        loaded or edited after ``quantize_``): flips of stale codes would write old weights back."""
        with torch.no_grad():
            stale = [n for i, (n, p) in enumerate(zip(self.names, self.params))
                     if not torch.equal(p.detach(), self.dequantize_one(i, self.codes[i]))]
        if stale:
            raise ValueError(f"the quantization is stale: parameters {stale[:3]} changed since quantize_(); "
                             "call quantize_() again on the current weights")

    def __repr__(self) -> str:
        return (f"Int8Quantization({len(self.codes)} tensors, {self.numel} codes, granularity={self.granularity!r}, "
                f"names={self.names[:3] + (['...'] if len(self.names) > 3 else [])})")


def quantize_(model: nn.Module, params: ParamSpec = None, granularity: str = "channel") -> Int8Quantization:
    """Quantize the selected weights of ``model`` to symmetric int8, in place: each parameter is
    overwritten by its dequantized value, and the codes and scales are returned.

    Args:
        params: which parameters (see ``select_parameters``); default every trainable float
            parameter with at least 2 dimensions (the weights of linear, convolution and
            embedding layers; biases and norm scales stay float, as in int8 deployments).
        granularity: ``"channel"`` (one scale per output channel, dim 0; 1-D tensors get one
            scale) or ``"tensor"`` (one scale per tensor).

    The rounding error is at most half a scale step per element: ``|w - q*s| <= s/2``.
    """
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")
    named = select_parameters(model, params)
    if params is None:
        named = [(n, p) for n, p in named if p.dim() >= 2]
    if not named:
        raise ValueError("no parameters selected for quantization: pass params= naming float weights")
    names, plist = [n for n, _ in named], [p for _, p in named]
    meta = [n for n, p in named if p.is_meta]
    if meta:
        raise ValueError(f"parameters {meta[:3]} are on the meta device (no values to quantize): "
                         "materialize the model first")
    finite = torch.stack([torch.isfinite(p.detach()).all().cpu() for p in plist])
    if not bool(finite.all()):  # one NaN would make its scale 1 and every code 0; one inf, its channel NaN
        bad = [n for n, ok in zip(names, finite.tolist()) if not ok]
        raise ValueError(f"parameters {bad[:3]} hold NaN or infinite values, which int8 codes cannot represent; "
                         "nothing was quantized")
    scales = [_scale(p, granularity) for p in plist]
    # Codes are contiguous whatever the parameter's layout: flips address them by row-major index.
    codes = [torch.round(p.detach().float() / s).clamp_(-QMAX, QMAX).to(torch.int8).contiguous()
             for p, s in zip(plist, scales)]
    q = Int8Quantization(names, plist, codes, scales, granularity)
    with torch.no_grad():
        torch._foreach_copy_(plist, q.dequantize())
    return q
