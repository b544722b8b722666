"""``accelerate`` with a parashield defense.

A ``prepare``d defense is an ``AcceleratedOptimizer`` around it; ``defense_of`` reaches the
defense for its ``trajectory()``. The loop::

    optimizer = accelerator.prepare(ps.APD(model.parameters(), torch.optim.AdamW, lr=1e-3))
    for x, y in loader:
        for _ in defense_of(optimizer).trajectory():   # K+1 passes, micro-batches inside if any
            accelerator.backward(loss_fn(model(x), y))
        accelerator.clip_grad_norm_(model.parameters(), 1.0)   # once, on the averaged gradient
        optimizer.step()
        optimizer.zero_grad()

``optimizer.step(closure)`` works too. Refused, with an error saying what to write: the plain
``accelerator.backward(loss); optimizer.step()`` (one gradient, not K+1 passes), and
``Accelerator(gradient_accumulation_steps>1)`` with ``accumulate()``, whose optimizer skips
``step`` on all micro-batches but the last (their passes would be lost): accumulate inside the
trajectory body instead.
"""

from __future__ import annotations

from accelerate.state import GradientState

from . import defense_of

__all__ = ["check_no_accumulation", "defense_of"]


def check_no_accumulation() -> None:
    """Raise where accelerate accumulates gradients over micro-batches (``GradientState``'s
    ``num_steps > 1``): the defense would see only the last micro-batch's closure."""
    if GradientState._shared_state and GradientState().num_steps > 1:
        raise ValueError(
            f"Accelerator(gradient_accumulation_steps={GradientState().num_steps}) with a parashield defense: "
            "accelerate calls optimizer.step() only on the last micro-batch of accumulate(), so the others would "
            "be skipped. Use gradient_accumulation_steps=1 and loop over the micro-batches inside the closure or "
            "the trajectory() body (one backward per micro-batch per pass)"
        )
