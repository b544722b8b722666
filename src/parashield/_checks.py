"""Argument checks shared by the public classes: each error names the argument and what it accepts."""

from __future__ import annotations

import math
import os
import sys
from typing import TYPE_CHECKING, Iterable

import torch
from torch import Tensor, nn

from .budget import Budget

if TYPE_CHECKING:  # the objective module uses these checks itself
    from .objective import Objective


def check_count(name: str, value: object) -> int:
    """An int >= 1 (bools are refused)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int >= 1, got {value!r}")
    if value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value}")
    return value


def check_bool(name: str, value: object) -> bool:
    """True or False (1, 0, "yes" and None are refused: a flag is not guessed)."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be True or False, got {value!r}")
    return value


def check_real(name: str, value: object, positive: bool = False) -> float:
    """A finite real number >= 0 (> 0 with ``positive``; bools are refused)."""
    what = "a finite positive number" if positive else "a finite number >= 0"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be {what}, got {value!r}")
    if not math.isfinite(value) or value < 0 or (positive and value == 0):
        raise ValueError(f"{name} must be {what}, got {value!r}")
    return float(value)


#: The seeds ``torch.Generator.manual_seed`` accepts.
SEED_RANGE = (-(2**63), 2**64)


def check_seed(value: object) -> int:
    """An int that seeds a ``torch.Generator`` (bools are refused)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"seed must be an int, got {value!r}")
    if not SEED_RANGE[0] <= value < SEED_RANGE[1]:
        raise ValueError(f"seed must be an int in [-2**63, 2**64), got {value}")
    return value


def memory_of(device: torch.device) -> int:
    """Total memory in bytes of ``device`` (RAM for the CPU); ``sys.maxsize`` when unknown."""
    try:
        if device.type == "cuda":
            return torch.cuda.get_device_properties(device).total_memory
        if device.type == "cpu":
            return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError, RuntimeError):
        pass
    return sys.maxsize


def check_memory(nbytes: float, what: str, device: torch.device) -> None:
    """Refuse up front a size that can only exhaust the memory: ``what`` (naming the argument
    that sets it) would need ``nbytes``, more than ``device`` has in all."""
    have = memory_of(device)
    if nbytes > have:
        raise ValueError(f"{what} would need {nbytes / 2**30:,.1f} GiB, more than the {have / 2**30:,.1f} GiB "
                         f"of memory of the {device.type} device")


def check_objective(objective: object) -> Objective:
    """An Objective; a model in its place gets an error saying how to build one."""
    from .objective import Objective

    if isinstance(objective, Objective):
        return objective
    hint = ""
    if isinstance(objective, nn.Module):
        hint = ": wrap the model as ps.Objective(model, loss_fn, data), with loss_fn(model, batch) -> scalar loss"
    raise TypeError(f"objective must be a parashield.Objective, got {type(objective).__name__}{hint}")


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
