"""Bit-flip corruptions: the hardware-fault model of parameter corruption.

Beside the norm-bounded corruptions, the budget here is a count of flipped bits. Flips act on the
int8 codes of a quantized model (:mod:`parashield.quantization`) or directly on the bits of float
weights (float32, float16, bfloat16; sign, exponent or mantissa bits). Results are
:class:`~parashield.corruption.CorruptionResult` objects whose ``values`` hold the exact flipped
weights, so ``ps.corrupted(model, result)`` applies and undoes them bit for bit.

* :class:`RandomBitFlip`: n flips drawn uniformly, without repetition, over the allowed bits.
* :class:`ProgressiveBitSearch`: the bit-flip attack of Rakin et al. (ICCV 2019). Each round ranks
  every (weight, bit) of each layer by the first-order loss gain ``g * (q' - q) * s``, evaluates
  the loss with each layer's best candidates flipped, and keeps the flip that raises the loss
  most; when no single flip raises it, it escalates as the published search does, flipping each
  layer's top-k bits together for k = 2, 3, ... It stops at the flip budget, when the metric falls
  to a target, or when no candidate raises the loss. On large layers it can rank only each
  layer's top-m weights by ``|g s|`` (``prefilter``).

The formulas: docs/method.md, "Bit flips and int8 quantization"; usage: docs/guide.md.
"""

from __future__ import annotations

import math

from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from ._checks import check_count, check_objective, check_seed
from ._progress import progress
from .corruption import CorruptionResult, corrupted
from .objective import Objective, Probe, overflow_to_inf
from .quantization import Int8Quantization
from .selection import parameter_aliases

#: float dtype -> (integer view dtype, exponent bit positions, mantissa bit positions)
_FLOAT_LAYOUT = {
    torch.float32: (torch.int32, range(23, 31), range(0, 23)),
    torch.float16: (torch.int16, range(10, 15), range(0, 10)),
    torch.bfloat16: (torch.int16, range(7, 15), range(0, 7)),
}
Bits = Union[None, int, str, Sequence[Union[int, str]]]
Flip = tuple[str, int, int]  # (parameter name, flat element index, bit position)


@dataclass(frozen=True)
class FlipBudget:
    """The budget of a bit-flip corruption: at most ``flips`` bits among positions ``bits``."""

    flips: int
    bits: tuple[int, ...]


@dataclass(repr=False)
class BitFlipResult(CorruptionResult):
    """A bit-flip corruption: ``flips`` lists (name, flat index, bit) in the order applied,
    ``values`` the flipped parameters; ``history``/``metric_history`` the loss/metric before and
    after each round, ``flips_per_round`` the bits each round flipped (the search: 1, or k where it
    escalated to a group of k bits; a random draw: one round of all its flips); ``stopped`` why
    the search ended: "budget", "target" (the metric reached it), "stuck" (no candidate raised
    the loss) or "overflow" (the loss or its gradient overflowed); None for a random draw."""

    flips: list[Flip] = field(default_factory=list)
    metric_history: list[float] = field(default_factory=list)
    flips_per_round: list[int] = field(default_factory=list)
    stopped: Optional[str] = None

    def as_dict(self) -> dict:
        return {
            "method": self.method,
            "flips": len(self.flips),
            "bits": list(self.budget.bits),
            "loss_before": self.loss_before,
            "loss_after": self.loss_after,
            "loss_change": self.loss_change,
            "history": list(self.history),
            "metric_history": list(self.metric_history),
            "flipped": [list(f) for f in self.flips],
            "flips_per_round": list(self.flips_per_round),
            "stopped": self.stopped,
            "passes": self.passes,
        }

    def _repr_extra(self) -> str:
        shown = ", ".join(f"{n}[{i}] bit {b}" for n, i, b in self.flips[:3]) + (", ..." if len(self.flips) > 3 else "")
        return f", flips={len(self.flips)}: {shown}" if self.flips else ", flips=0"


class _Target:
    """The tensors whose bits are flipped: int8 codes (dequantized through the scales) or the
    float parameters themselves, seen as integers of the same width."""

    def __init__(self, objective: Objective, quantization: Optional[Int8Quantization], bits: Bits) -> None:
        check_objective(objective)
        if quantization is not None:
            if not isinstance(quantization, Int8Quantization):
                raise TypeError(f"quantization must be an Int8Quantization from quantize_(), got {type(quantization).__name__}")
            named = dict(parameter_aliases(objective.model))
            missing = [n for n, p in zip(quantization.names, quantization.params) if named.get(n) is not p]
            if missing:
                raise ValueError(f"quantization does not belong to the objective's model: {missing[:3]}")
            quantization.check_current()
            self.names, self.params, self.q = quantization.names, quantization.params, quantization
            self.ints = quantization.codes
        else:
            floats = [(n, p) for n, p in zip(objective.names, objective.params) if p.dtype in _FLOAT_LAYOUT]
            if not floats:
                raise ValueError("no float32/float16/bfloat16 parameters selected: pass quantization= for int8 "
                                 "weights or select float parameters in the objective")
            dtypes = {p.dtype for _, p in floats}
            if len(dtypes) > 1:
                raise ValueError(f"float bit flips need one dtype across the selection, got {sorted(map(str, dtypes))}")
            self.names, self.params, self.q = [n for n, _ in floats], [p for _, p in floats], None
            self.ints = [p.detach().view(_FLOAT_LAYOUT[p.dtype][0]) for p in self.params]
        self.bits = self._positions(bits)

    def _positions(self, bits: Bits) -> tuple[int, ...]:
        dtype = self.ints[0].dtype
        width = torch.iinfo(dtype).bits
        names = {"sign": [width - 1]}
        if self.q is None:
            _, exponent, mantissa = _FLOAT_LAYOUT[self.params[0].dtype]
            names.update(exponent=list(exponent), mantissa=list(mantissa))
        if bits is None:
            return tuple(range(width))
        out: set[int] = set()
        for b in [bits] if isinstance(bits, (int, str)) else list(bits):
            if isinstance(b, str):
                if b not in names:
                    raise ValueError(f"bits names must be among {sorted(names)} for {self.params[0].dtype} "
                                     f"{'int8 codes' if self.q is not None else 'weights'}, got {b!r}")
                out.update(names[b])
            elif isinstance(b, bool) or not isinstance(b, int) or not 0 <= b < width:
                raise ValueError(f"bits must be positions in 0..{width - 1} (or names {sorted(names)}), got {b!r}")
            else:
                out.add(b)
        if not out:
            raise ValueError("bits selects no bit position")
        return tuple(sorted(out))

    def masks(self, bits: Tensor) -> Tensor:
        """Single-bit masks ``1 << bits`` in the integer dtype (two's complement for the top bit)."""
        width = torch.iinfo(self.ints[0].dtype).bits
        masks = torch.ones((), dtype=torch.int64, device=bits.device).bitwise_left_shift(bits)
        return torch.where(masks >= 2 ** (width - 1), masks - 2**width, masks).to(self.ints[0].dtype)

    def flipped_all(self, ints: Tensor, bits: Tensor) -> Tensor:
        """``ints`` with each of ``bits`` toggled: shape ``(len(bits), *ints.shape)``."""
        masks = self.masks(bits).view(-1, *([1] * ints.dim()))
        return ints.unsqueeze(0).bitwise_xor(masks)

    def toggle(self, value: Tensor, bit: int) -> Tensor:
        return value.bitwise_xor(self.masks(torch.tensor(bit)))

    def values(self, flips: Sequence[Flip]) -> dict[str, Tensor]:
        """The parameters of the touched tensors after applying ``flips`` (in order)."""
        pos = {n: i for i, n in enumerate(self.names)}
        ints: dict[int, Tensor] = {}
        for name, index, bit in flips:
            i = pos[name]
            flat = ints.setdefault(i, self.ints[i].clone(memory_format=torch.contiguous_format)).view(-1)
            flat[index] = self.toggle(flat[index], bit)
        return {self.names[i]: self.q.dequantize_one(i, t) if self.q is not None else t.view(self.params[i].dtype)
                for i, t in ints.items()}

    def result(self, objective: Objective, flips: list[Flip], method: str, loss_before: float, passes: int,
               history: Optional[list[float]] = None, metric_history: Optional[list[float]] = None,
               flips_per_round: Optional[list[int]] = None, stopped: Optional[str] = None) -> BitFlipResult:
        values = self.values(flips)
        named = dict(parameter_aliases(objective.model))
        delta = {n: v - named[n].detach() for n, v in values.items()}
        res = BitFlipResult(delta=delta, values=values, loss_before=loss_before, loss_after=loss_before,
                            budget=FlipBudget(len(flips), self.bits), method=method, passes=passes, flips=flips,
                            metric_history=list(metric_history or []),
                            flips_per_round=list(flips_per_round) if flips_per_round is not None else [len(flips)],
                            stopped=stopped)
        with corrupted(objective.model, res):
            res.loss_after = _loss(objective)
        res.history = list(history) if history is not None else [loss_before, res.loss_after]
        return res


def _loss(objective: Objective) -> float:
    """The loss, +inf where a flipped exponent made it overflow or NaN (not an error here)."""
    with objective.probe() as pr:
        return overflow_to_inf(pr.loss())


class RandomBitFlip:
    """``flips`` bits flipped uniformly at random, without repetition, over positions ``bits`` of
    every element of the int8 codes of ``quantization`` or, without it, of the objective's float
    weights. ``bits``: None (all), a position, a name (``"sign"``, and for floats ``"exponent"``,
    ``"mantissa"``) or a list of them. Seeded: the same seed draws the same flips."""

    def __init__(self, flips: int, quantization: Optional[Int8Quantization] = None, bits: Bits = None, seed: int = 0) -> None:
        self.flips = check_count("flips", flips)
        check_seed(seed)
        self.quantization, self.bits, self.seed = quantization, bits, seed

    def __call__(self, objective: Objective) -> BitFlipResult:
        target = _Target(objective, self.quantization, self.bits)
        nb = len(target.bits)
        sizes = torch.tensor([t.numel() * nb for t in target.ints], dtype=torch.int64)
        total = int(sizes.sum())
        if self.flips > total:
            raise ValueError(f"flips={self.flips} exceeds the {total} flippable bits")
        gen = torch.Generator().manual_seed(self.seed)
        picked = torch.empty(0, dtype=torch.int64)
        while len(picked) < self.flips:  # draw with replacement, keep distinct positions
            picked = torch.cat([picked, torch.randint(total, (2 * self.flips,), generator=gen)]).unique()
        picked = picked[torch.randperm(len(picked), generator=gen)[: self.flips]]
        ends = sizes.cumsum(0)
        offsets = ends - sizes
        tensor = torch.searchsorted(ends, picked, right=True)
        local = picked - offsets[tensor]
        flips = [(target.names[int(i)], int(j), target.bits[int(k)])
                 for i, j, k in zip(tensor, local // nb, local % nb)]
        return target.result(objective, flips, "random_bitflip", _loss(objective), passes=2)


Group = list[tuple[int, int]]  # (flat element index, bit position) flips of one tensor, applied together


class ProgressiveBitSearch:
    """Progressive bit search (the bit-flip attack) on int8 codes.

    Args:
        quantization: the int8 codes to attack (from ``quantize_``).
        max_flips: the flip budget: every flipped bit counts, also those of a group.
        candidates: single flips per layer whose loss is evaluated each round (the top-ranked by
            the first-order gain); the round keeps the best of all layers' candidates.
        metric: optional ``metric(model) -> float`` recorded after every round (e.g. test accuracy).
        target: stop once ``metric`` is at or below this value (needs ``metric``).
        bits: allowed bit positions of the codes (default all 8).
        max_group: the escalation of the published search: when no single flip raises the loss,
            each layer's k top-ranked flips are evaluated together, k = 2, 3, ... up to
            ``max_group`` bits, and the first k whose best layer raises the loss is kept.
            ``None`` (default, as published): up to the flips left in the budget; ``1``: no
            escalation. The search stops when no group up to the cap raises the loss.
        prefilter: rank only the top ``prefilter`` weights of each layer by ``|dL/dq| = |g s|``
            (the gradient with respect to the int8 code; ``|g|`` under one scale per tensor, the
            published search's top-k weights), which cuts the ranking cost of large layers from
            8 values per weight to ``8 * prefilter``; ``None`` (default): rank every weight.

    Each round costs one gradient pass plus ``layers * candidates`` loss passes, and a round that
    escalates one more loss pass per layer for each group size tried.
    """

    def __init__(self, quantization: Int8Quantization, max_flips: int, candidates: int = 1,
                 metric: Optional[Callable[[nn.Module], float]] = None, target: Optional[float] = None,
                 bits: Bits = None, max_group: Optional[int] = None, prefilter: Optional[int] = None) -> None:
        if quantization is None:
            raise ValueError("ProgressiveBitSearch needs quantization= (the int8 codes from quantize_())")
        if target is not None and metric is None:
            raise ValueError("target needs metric=, the function whose value is compared with it")
        if metric is not None and not callable(metric):
            raise TypeError(f"metric must be None or callable as metric(model) -> float, got {type(metric).__name__}")
        if target is not None and (isinstance(target, bool) or not isinstance(target, (int, float))
                                   or not math.isfinite(target)):
            raise ValueError(f"target must be None or a finite number, got {target!r}")
        self.quantization, self.bits = quantization, bits
        self.max_flips = check_count("max_flips", max_flips)
        self.candidates = check_count("candidates", candidates)
        self.max_group = None if max_group is None else check_count("max_group", max_group)
        self.prefilter = None if prefilter is None else check_count("prefilter", prefilter)
        self.metric, self.target = metric, target

    def _gains(self, target: _Target, i: int, grad: Tensor, codes: Tensor) -> tuple[Tensor, Optional[Tensor]]:
        """First-order loss gains ``g (q' - q) s`` of tensor i: one row per allowed bit, one column
        per candidate weight, with the columns' flat indices (None: every weight, in order)."""
        bits = torch.tensor(target.bits, device=codes.device)
        scale = target.q.scales[i].reshape(-1, 1).float()  # (groups, 1): one row per scale
        slope = (grad.reshape(len(scale), -1).float() * scale).reshape(-1)  # dL/dq of each code
        flat, index = codes.reshape(-1), None
        if self.prefilter is not None and self.prefilter < flat.numel():
            index = slope.abs().topk(self.prefilter).indices.sort().values
            flat, slope = flat[index], slope[index]
        change = target.flipped_all(flat, bits).float() - flat.float()  # (bits, weights)
        return change * slope, index

    def _singles(self, target: _Target, i: int, grad: Tensor, codes: Tensor) -> list[Group]:
        """Tensor i's top ``candidates`` single flips: the best bit of each top-ranked weight."""
        gain, index = self._gains(target, i, grad, codes)
        best, rows = gain.max(0)
        cols = best.topk(min(self.candidates, best.numel())).indices
        return [[pair] for pair in self._pairs(target, index, rows[cols], cols)]

    def _top_flips(self, target: _Target, i: int, grad: Tensor, codes: Tensor, n: int) -> Group:
        """Tensor i's ``n`` top-ranked (weight, bit) flips over all pairs, best first (several bits
        of one weight may be among them; fewer where the tensor has fewer)."""
        gain, index = self._gains(target, i, grad, codes)
        order = gain.reshape(-1).topk(min(n, gain.numel())).indices
        return self._pairs(target, index, order // gain.shape[1], order % gain.shape[1])

    @staticmethod
    def _pairs(target: _Target, index: Optional[Tensor], rows: Tensor, cols: Tensor) -> Group:
        """(flat element index, bit) of gain-matrix entries (bit rows, candidate-weight columns)."""
        elements = cols if index is None else index[cols]
        return list(zip(elements.tolist(), [target.bits[r] for r in rows.tolist()]))

    @staticmethod
    def _codes_after(target: _Target, codes: Tensor, group: Group) -> dict[int, Tensor]:
        """The new codes of the weights ``group`` touches (bits of one weight combine)."""
        flat, new = codes.view(-1), {}
        for j, b in group:
            new[j] = target.toggle(new.get(j, flat[j]), b)
        return new

    def _loss_with(self, pr: Probe, target: _Target, i: int, codes: Tensor, group: Group) -> float:
        """The loss with ``group`` flipped in tensor i; the tensor is put back after (and by the
        probe, should the loss raise)."""
        p, saved = target.params[i], []
        for j, code in self._codes_after(target, codes, group).items():
            at = torch.unravel_index(torch.tensor(j), p.shape)  # row-major index, any layout
            saved.append((at, p[at].clone()))
            p[at] = (code.float() * target.q.scale_at(i, j)).to(p.dtype)
        loss = overflow_to_inf(pr.loss())
        for at, old in saved:
            p[at] = old
        return loss

    def _round(self, pr: Probe, target: _Target, grads: list[Tensor], codes: list[Tensor], current: float,
               cap: int) -> tuple[Optional[tuple[float, int, Group]], int]:
        """One round: in-layer search (each layer's candidates flipped alone), cross-layer search
        (the best layer), escalating the group size while no candidate raises the loss above
        ``current``. Returns (loss, tensor, group) of the kept candidate, or None when stuck, and
        the loss passes spent."""
        passes = 0
        ranked: list[Group] = []
        for k in range(1, cap + 1):
            if k == 2:  # each layer's top-cap flips, computed once; the group of k is their first k
                ranked = [self._top_flips(target, i, grads[i], codes[i], cap) for i in range(len(codes))]
            best: Optional[tuple[float, int, Group]] = None
            for i in range(len(codes)):
                groups = self._singles(target, i, grads[i], codes[i]) if k == 1 else [ranked[i][:k]]
                for group in groups:
                    if len(group) < k:
                        continue
                    loss = self._loss_with(pr, target, i, codes[i], group)
                    passes += 1
                    if best is None or loss > best[0]:
                        best = (loss, i, group)
            if best is not None and best[0] > current:
                return best, passes
        return None, passes

    def __call__(self, objective: Objective) -> BitFlipResult:
        target = _Target(objective, self.quantization, self.bits)
        sub = objective.restrict(target.params)
        before = _loss(objective)
        flips: list[Flip] = []
        history, metrics, rounds, passes, stopped = [before], [], [], 1, "budget"
        codes = [c.clone() for c in target.ints]
        with sub.probe() as pr, torch.no_grad():  # the probe restores the parameters on exit
            if self.metric is not None:
                metrics.append(float(self.metric(objective.model)))
            # a round flips at least one bit; the extra pass only checks why the search ends
            for _ in progress(range(self.max_flips + 1), desc="progressive bit search", unit="round", leave=False):
                if metrics and self.target is not None and metrics[-1] <= self.target:
                    stopped = "target"
                    break
                if len(flips) == self.max_flips:
                    break
                loss, grads = pr.gradient(check=False)
                passes += 1
                if float(loss) == math.inf:  # a flip made the loss or its gradient overflow: nothing to rank by
                    stopped = "overflow"
                    break
                left = self.max_flips - len(flips)
                kept, spent = self._round(pr, target, grads, codes, float(loss),
                                          left if self.max_group is None else min(self.max_group, left))
                passes += spent
                if kept is None:
                    stopped = "stuck"
                    break
                loss, i, group = kept
                for j, code in self._codes_after(target, codes[i], group).items():
                    codes[i].view(-1)[j] = code
                target.params[i].copy_(target.q.dequantize_one(i, codes[i]))
                flips += [(target.names[i], j, b) for j, b in group]
                rounds.append(len(group))
                history.append(loss)
                if self.metric is not None:
                    metrics.append(float(self.metric(objective.model)))
        return target.result(objective, flips, "progressive_bit_search", before, passes, history, metrics,
                             rounds, stopped)
