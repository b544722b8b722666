"""Argument checks shared by the public classes: each error names the argument and what it accepts."""

from __future__ import annotations

import math
import sys
from typing import Iterable

from torch import Tensor

from .budget import Budget


def check_count(name: str, value: object) -> int:
    """An int >= 1 (bools are refused)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int >= 1, got {value!r}")
    if value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value}")
    return value


def check_seed(value: object) -> int:
    """An int (bools are refused)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"seed must be an int, got {value!r}")
    return value


def check_vectorize(value: object) -> object:
    if not (value is True or value is False or value == "auto"):  # 1, 1.0 and 0 are refused too
        raise ValueError(f"vectorize must be True, False or 'auto', got {value!r}")
    return value


def check_budget(budget: object) -> Budget:
    if not isinstance(budget, Budget):
        raise TypeError(f"budget must be a parashield.Budget, got {type(budget).__name__}")
    return budget


def step_size_or_default(step_size: object, budget: Budget, steps: int) -> float:
    """alpha of a multi-step trajectory: a finite positive number, default ``1.5 * eps / steps``
    (the choice of the only public code near the papers: K steps can travel 1.5 times across
    the ball)."""
    if step_size is None:
        return 1.5 * budget.eps / steps
    if isinstance(step_size, bool) or not isinstance(step_size, (int, float)) or not (
        math.isfinite(step_size) and step_size > 0
    ):
        raise ValueError(f"step_size must be a finite positive number or None, got {step_size!r}")
    return float(step_size)


def check_not_sharded(params: Iterable[Tensor], what: str) -> None:
    """Refuse sharded (``DTensor``) parameters, as FSDP2's ``fully_shard`` makes them: norms,
    top-n supports and layer radii would be taken over each rank's shard instead of the whole
    tensor, and the bookkeeping mixes them with plain tensors. Looked up only where
    ``torch.distributed.tensor`` is loaded (it is wherever a DTensor exists)."""
    module = sys.modules.get("torch.distributed.tensor")
    if module is not None and any(isinstance(p, module.DTensor) for p in params):
        raise NotImplementedError(
            f"{what} does not support sharded (DTensor) parameters such as FSDP2's fully_shard makes: its norms "
            "and supports must span whole tensors. Train with DistributedDataParallel (see APD's distributed=), "
            "or analyse a full copy of the model (e.g. from torch.distributed.checkpoint.state_dict."
            "get_model_state_dict(model, options=StateDictOptions(full_state_dict=True)))"
        )
