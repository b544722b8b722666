"""Classification helpers shared by the robustness evaluation and the curvature operators: the
route from a batch to (logits, labels), and the difference-of-logits-ratio margin loss.

A ``LogitsFn`` is ``logits_fn(model, batch) -> (logits, labels)`` with logits of shape (N, C) and
integer labels of shape (N,). The default, :func:`xy_logits`, reads a batch ``(x, y)`` and
returns ``(model(x), y)``.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

from torch import Tensor, nn

LogitsFn = Callable[[nn.Module, Any], "tuple[Tensor, Tensor]"]
LossFn = Callable[[nn.Module, Any], Tensor]


def xy_logits(model: nn.Module, batch: Any) -> tuple[Tensor, Tensor]:
    """``(model(x), y)`` for a batch ``(x, y)``: the default classification route."""
    if not isinstance(batch, (tuple, list)) or len(batch) != 2:
        raise TypeError(
            "the default logits_fn expects batches (x, y); pass logits_fn(model, batch) -> (logits, labels) "
            f"for other batches, got {type(batch).__name__}"
        )
    x, y = batch
    return model(x), y


def checked_logits(logits_fn: LogitsFn, model: nn.Module, batch: Any) -> tuple[Tensor, Tensor]:
    """``logits_fn(model, batch)`` with its shapes checked: logits (N, C), labels (N,)."""
    out = logits_fn(model, batch)
    if not (isinstance(out, (tuple, list)) and len(out) == 2 and all(isinstance(t, Tensor) for t in out)):
        raise TypeError("logits_fn must return a pair of tensors (logits, labels)")
    logits, labels = out
    if logits.dim() != 2 or labels.shape != logits.shape[:1]:
        raise ValueError(
            f"logits_fn must return logits of shape (N, C) and labels of shape (N,), got "
            f"{tuple(logits.shape)} and {tuple(labels.shape)}"
        )
    return logits, labels


def dlr(logits: Tensor, labels: Tensor) -> Tensor:
    """Mean difference-of-logits-ratio loss (Croce & Hein, 2020), to be maximized:
    ``-(z_y - max_{i != y} z_i) / (z_(1) - z_(3))`` with ``z_(j)`` the j-th largest logit.
    Invariant to shifting and (positive) scaling of the logits; needs at least 3 classes."""
    if logits.shape[1] < 3:
        raise ValueError(f"the DLR margin needs at least 3 classes, got {logits.shape[1]}")
    top = logits.topk(3, dim=1).values
    true = logits.gather(1, labels.long().view(-1, 1)).squeeze(1)
    others = logits.scatter(1, labels.long().view(-1, 1), float("-inf")).amax(1)
    return (-(true - others) / (top[:, 0] - top[:, 2] + 1e-12)).mean()


def dlr_loss(logits_fn: Optional[LogitsFn] = None) -> LossFn:
    """The DLR margin as a ``loss_fn(model, batch)``; ``logits_fn`` defaults to :func:`xy_logits`."""
    route = xy_logits if logits_fn is None else logits_fn
    if not callable(route):
        raise TypeError(f"logits_fn must be callable as logits_fn(model, batch), got {type(route).__name__}")

    def loss_fn(model: nn.Module, batch: Any) -> Tensor:
        return dlr(*checked_logits(route, model, batch))

    return loss_fn
