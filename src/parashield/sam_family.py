"""The SAM family as presets of the APD core (each a small subclass of ``SAM``, whose trajectory
is APD's with K = 1 and an L2 ascent of radius rho):

* ``GSAM``: surrogate gap guided SAM (Zhuang et al., ICLR 2022);
* ``ASAM``: adaptive SAM (Kwon et al., ICML 2021), optionally with the reference code's
  convention of scaling only the tensors named ``weight``;
* ``IntervalSAM``: the ascent every ``interval`` steps, its perturbation reused in between, so
  that most steps cost one pass instead of two.
"""

from __future__ import annotations

import math
from typing import Any, Iterable, Iterator, Optional, Union

import torch
from torch import Tensor, nn

from ._checks import check_count
from .budget import Geometry
from .defense import SAM, NonFiniteGradientError, _corrupt_ids, _finiteness_probe, _FlatBuffer, _Workspace

Tensors = list[Tensor]


class GSAM(SAM):
    """Surrogate gap guided SAM (Zhuang et al., ICLR 2022).

    With g the clean gradient and g_p the gradient at ``w + rho g / ||g||`` (SAM's), the base
    optimizer steps with ``g_p - alpha g_perp``, where ``g_perp = g - (<g, g_p> / ||g_p||^2) g_p``
    is the part of g orthogonal to g_p: descending along it lowers the surrogate gap
    ``L(w + e) - L(w)`` without changing the perturbed loss to first order. Two passes per step, as
    SAM; one extra parameter-sized buffer holds g. The paper's rho schedule (rho proportional to
    the learning rate) is not built in: rho is fixed.

    Args:
        rho: radius of the ascent step, as for :class:`parashield.SAM`.
        adaptive: element-relative (ASAM) radius, as for :class:`parashield.SAM`.
        eta: offset of the element scale, as for :class:`parashield.SAM`.
        alpha: weight of the orthogonal component (the paper's alpha, >= 0).
    """

    def __init__(self, params: Iterable, base_optimizer: type, rho: float = 0.05, alpha: float = 0.4,
                 adaptive: bool = False, eta: float = 0.01, **kwargs: Any) -> None:
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not (math.isfinite(alpha) and alpha >= 0):
            raise ValueError(f"alpha must be a finite number >= 0, got {alpha!r}")
        super().__init__(params, base_optimizer, rho=rho, adaptive=adaptive, eta=eta, **kwargs)
        self.alpha = float(alpha)
        self._clean_grad: Optional[Tensors] = None

    @torch.no_grad()
    def _next_corruption(self, t: int, ws: _Workspace, grads: Tensors, per_tensor: Tensors) -> None:
        if t == 0:  # keep g before the ascent turns it into the perturbation
            if self._clean_grad is None or [g.shape for g in self._clean_grad] != [g.shape for g in per_tensor]:
                self._clean_grad = [g.clone() for g in per_tensor]
            else:
                torch._foreach_copy_(self._clean_grad, per_tensor)
        super()._next_corruption(t, ws, grads, per_tensor)

    def _trajectory(self, scaler: Any, losses: Optional[list]) -> Iterator[int]:
        yield from super()._trajectory(scaler, losses)
        with torch.no_grad():
            pairs = [(p.grad, g) for p, g in zip(self._workspace.corrupted, self._clean_grad) if p.grad is not None]
            perturbed, clean = [gp for gp, _ in pairs], [g for _, g in pairs]
            inner = torch.stack([torch.vdot(a.reshape(-1), b.reshape(-1)) for a, b in pairs]).sum()
            squared = torch.stack([torch.vdot(a.reshape(-1), a.reshape(-1)) for a in perturbed]).sum()
            along = torch.where(squared > 0, inner / squared, 0.0)
            # g_p - alpha (g - along g_p) = (1 + alpha along) g_p - alpha g
            torch._foreach_mul_(perturbed, list((1 + self.alpha * along).expand(len(perturbed)).unbind()))
            torch._foreach_add_(perturbed, clean, alpha=-self.alpha)


class _PartlyScaledGeometry(Geometry):
    """Element scale ``|w| + eta`` where ``scaled`` says so and 1 elsewhere; ``scaled`` holds one
    bool per tensor, or one 0/1 mask per tensor where the budget sees flat buffers."""

    def __init__(self, params: Tensors, scaled: list[Union[bool, Tensor]]) -> None:
        super().__init__(params)
        self.scaled = scaled

    def element_scale(self, eta: float) -> Tensors:
        if eta not in self._scale:
            for s, keep in zip(super().element_scale(eta), self.scaled):
                if keep is False:
                    s.fill_(1.0)
                elif keep is not True:
                    s.copy_(torch.where(keep > 0, s, 1.0))
        return self._scale[eta]


def weight_tensors(model: nn.Module) -> list[Tensor]:
    """The parameters whose name contains ``weight``: the tensors the reference ASAM code scales."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    return [p for n, p in model.named_parameters() if "weight" in n]


class ASAM(SAM):
    """Adaptive SAM (Kwon et al., ICML 2021): ``e = rho T^2 g / ||T g||`` with ``T = |w| + eta``.

    Args:
        rho: radius (the paper's default 0.5).
        eta: the additive constant of T.
        scaled: ``None`` scales every tensor (the paper's formula); an iterable of parameters scales
            only those and uses T = 1 on the others. ``scaled=weight_tensors(model)`` is the
            reference code's convention (only tensors named ``weight``, biases unscaled).
    """

    def __init__(self, params: Iterable, base_optimizer: type, rho: float = 0.5, eta: float = 0.01,
                 scaled: Optional[Iterable[Tensor]] = None, **kwargs: Any) -> None:
        super().__init__(params, base_optimizer, rho=rho, adaptive=True, eta=eta, **kwargs)
        self._scaled_ids = None if scaled is None else _corrupt_ids(scaled, self.param_groups, "scaled")

    def _workspace_for(self, params: Tensors) -> _Workspace:
        ws = super()._workspace_for(params)
        if self._scaled_ids is not None and not isinstance(ws.geometry, _PartlyScaledGeometry):
            flags = [id(p) in self._scaled_ids for p in ws.corrupted]
            if ws.work is None:
                ws.geometry = _PartlyScaledGeometry(ws.budget_clean, flags)
            else:  # the budget sees one flat buffer per (device, dtype): a 0/1 mask laid out alike
                masks = _FlatBuffer(ws.corrupted)
                for view, flag in zip(masks.views, flags):
                    view.fill_(float(flag))
                ws.geometry = _PartlyScaledGeometry(ws.budget_clean, masks.flats)
        return ws


class IntervalSAM(SAM):
    """SAM with the ascent every ``interval`` steps (steps 0, k, 2k, ...: two passes); in between
    the gradient is taken at ``w + e`` with the last ascent's perturbation e (one pass), so a step
    costs ``1 + 1/interval`` passes on average. ``interval=1`` is SAM.

    The in-between pass runs at ``w + e`` with BatchNorm statistics updated as in a plain step
    (it is the step's only pass); the parameters are restored to w bit for bit. One extra
    parameter-sized buffer holds e. After ``load_state_dict`` the next step runs the ascent.
    """

    def __init__(self, params: Iterable, base_optimizer: type, rho: float = 0.05, interval: int = 5,
                 adaptive: bool = False, eta: float = 0.01, **kwargs: Any) -> None:
        super().__init__(params, base_optimizer, rho=rho, adaptive=adaptive, eta=eta, **kwargs)
        self.interval = check_count("interval", interval)
        self._perturbation: Optional[Tensors] = None
        self._perturbation_key: Optional[tuple] = None
        self._count = 0

    @torch.no_grad()
    def _next_corruption(self, t: int, ws: _Workspace, grads: Tensors, per_tensor: Tensors) -> None:
        super()._next_corruption(t, ws, grads, per_tensor)  # per_tensor now holds e = a_1
        if self._perturbation is None or self._perturbation_key != ws.key:
            self._perturbation = [e.clone() for e in per_tensor]
            self._perturbation_key = ws.key
        else:
            torch._foreach_copy_(self._perturbation, per_tensor)

    def _trajectory(self, scaler: Any, losses: Optional[list]) -> Iterator[int]:
        params = self._parameters()
        ws = self._workspace_for(params) if params else None
        reuse = self._count % self.interval != 0 and ws is not None and self._perturbation_key == ws.key
        yield from (self._reused(ws, params, scaler, losses) if reuse else super()._trajectory(scaler, losses))
        self._count += 1

    def _reused(self, ws: _Workspace, params: Tensors, scaler: Any, losses: Optional[list]) -> Iterator[int]:
        """One pass at ``w + e``; ``ws.clean`` keeps w meanwhile."""
        self._ready = False
        self.zero_grad()
        with torch.no_grad():
            ws.hold_clean()
            torch._foreach_copy_(ws.clean.views, ws.corrupted)
            torch._foreach_add_(ws.corrupted, self._perturbation)
        self._in_trajectory = True
        try:
            yield 0
        finally:
            self._in_trajectory = False
            with torch.no_grad():
                torch._foreach_copy_(ws.corrupted, ws.clean.views)
            ws.free_clean()
        grads = [p.grad for p in params if p.grad is not None]
        if not grads:
            raise ValueError("the pass produced no gradient: did the closure call backward()?")
        if scaler is None:
            values = [_finiteness_probe([g.detach() for g in grads]).double().cpu()]
            values += [v.detach().double().cpu().reshape(()) for v in (losses or []) if isinstance(v, Tensor)]
            if not bool(torch.isfinite(torch.stack(values)).all()):
                raise NonFiniteGradientError(
                    "non-finite loss or gradient at w + e (the reused perturbation); the parameters were "
                    "restored to the clean w and no step was taken"
                )
        self._ready = True
