"""Checkpoints: model, optimizer, scheduler and every RNG state, written atomically and loaded
with ``weights_only=True``, so that a resumed run continues bit for bit (on CPU).

What is saved is checked at save time: everything must be data that a ``weights_only`` load can
read back (tensors, Python numbers, strings, bytes, None, and lists, tuples, dicts and sets of
them); NumPy scalars are converted to the equal Python number, anything else is refused with a
``TypeError`` naming where it sits. Loading checks the whole file against the given objects
before it changes any of them.

Usage: docs/guide.md, "Checkpoints".
"""

from __future__ import annotations

import collections
import os
import pickle
import random
import tempfile
import zipfile
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
import torch
from torch import Tensor, nn


def rng_state() -> dict[str, Any]:
    """The states of Python's, NumPy's, torch's (and CUDA's) global generators."""
    np_state = np.random.get_state()
    py_version, py_keys, py_gauss = random.getstate()
    state = {
        "python": list(py_keys) + [-1 if py_gauss is None else py_gauss],
        "python_version": py_version,
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": np_state[2],
                  "has_gauss": np_state[3], "cached_gaussian": np_state[4]},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    py = list(state["python"])
    gauss = py.pop()
    random.setstate((state["python_version"], tuple(py), None if gauss == -1 else gauss))
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), int(n["pos"]), int(n["has_gauss"]),
                         float(n["cached_gaussian"])))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class CheckpointError(ValueError, RuntimeError):
    """A file that is not a ``save_checkpoint`` checkpoint, or one that does not fit the given
    model or optimizer. A RuntimeError too, as ``load_state_dict``'s own mismatch errors are."""


#: Leaf types a ``weights_only=True`` load accepts (exact types: subclasses pickle by their class).
_PLAIN_LEAVES = (type(None), bool, int, float, complex, str, bytes, bytearray, torch.Size, torch.dtype,
                 torch.device, torch.layout, torch.memory_format)
_PLAIN_MAPPINGS = (dict, collections.OrderedDict, collections.Counter)


def _plain(value: Any, where: str) -> Any:
    """``value`` as data a ``weights_only`` load reads back: NumPy scalars become Python numbers,
    containers are rebuilt with their items checked; anything else raises TypeError naming
    ``where``."""
    kind = type(value)
    if kind in _PLAIN_LEAVES or kind in (Tensor, nn.Parameter):
        return value
    if isinstance(value, np.generic) and not isinstance(value, (np.void, np.object_)):
        return value.item()  # the equal Python bool/int/float/complex/str
    if kind in _PLAIN_MAPPINGS:
        items = {_plain(k, f"{where} key {k!r}"): _plain(v, f"{where}[{k!r}]") for k, v in value.items()}
        if all(a is b for pair in zip(items.items(), value.items()) for a, b in zip(*pair)):
            return value  # nothing converted: the object itself (a state_dict keeps its _metadata)
        out = kind(items)
        if hasattr(value, "_metadata"):
            out._metadata = value._metadata
        return out
    if kind in (list, tuple, set):
        items = [_plain(v, f"{where}[{i}]") for i, v in enumerate(value)]
        return value if all(a is b for a, b in zip(items, value)) else kind(items)
    hint = {np.ndarray: "torch.from_numpy(value)"}.get(kind, "str(value)" if isinstance(value, os.PathLike) else None)
    raise TypeError(
        f"{where} is a {kind.__module__}.{kind.__qualname__}, which a weights_only load refuses: a checkpoint holds "
        "tensors, Python numbers, str, bytes, None, and lists/tuples/dicts/sets of them"
        + (f"; save {hint} instead" if hint else "")
    )


def _state_dict_of(obj: Any, name: str) -> Optional[dict]:
    if obj is None:
        return None
    if not callable(getattr(obj, "state_dict", None)):
        raise TypeError(f"{name} must have a state_dict() method (or be None), got {type(obj).__name__}")
    return obj.state_dict()


def save_checkpoint(
    path: Union[str, os.PathLike],
    model: nn.Module,
    optimizer: Optional[torch.optim.Optimizer] = None,
    scheduler: Optional[Any] = None,
    **extra: Any,
) -> Path:
    """Write model, optimizer, scheduler, RNG states and ``extra`` (plain data) to ``path``
    atomically: a temporary file in the same folder, fsync, then ``os.replace``.

    Raises TypeError, before anything is written, for what a ``weights_only`` load could not
    read back (a ``pathlib.Path``, a NumPy array, a custom object: see the module docstring);
    NumPy scalars are stored as the equal Python numbers."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"path must be a str or os.PathLike, got {type(path).__name__}")
    path = Path(path)
    payload = _plain({
        "model": model.state_dict(),
        "optimizer": _state_dict_of(optimizer, "optimizer"),
        "scheduler": _state_dict_of(scheduler, "scheduler"),
        "rng": rng_state(),
        "extra": extra,
    }, "checkpoint")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        mask = os.umask(0)
        os.umask(mask)
        os.chmod(tmp, 0o666 & ~mask)  # mkstemp creates 0600; the checkpoint follows the umask like any file
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _read(path: Union[str, os.PathLike], map_location: Any) -> dict[str, Any]:
    """The payload of a ``save_checkpoint`` file; CheckpointError for any other file."""
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, zipfile.BadZipFile, UnicodeDecodeError,
            ValueError, AttributeError, ImportError, IndexError, KeyError) as exc:
        raise CheckpointError(f"{os.fspath(path)} is not a checkpoint that loads with weights_only=True: {exc}") from exc
    keys = ("model", "optimizer", "scheduler", "rng", "extra")
    if not isinstance(payload, dict) or not all(k in payload for k in keys):
        found = sorted(map(str, payload))[:5] if isinstance(payload, dict) else type(payload).__name__
        raise CheckpointError(
            f"{os.fspath(path)} was not written by parashield.save_checkpoint (found {found}); a plain "
            "state_dict loads with model.load_state_dict(torch.load(path, weights_only=True))"
        )
    return payload


def _check_model_state(state: Any, model: nn.Module) -> None:
    """The checks of a strict ``load_state_dict``, made before anything is copied."""
    if not isinstance(state, dict):
        raise CheckpointError(f"the checkpoint's model state is a {type(state).__name__}, not a state_dict")
    own = model.state_dict()
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    if missing or unexpected:
        raise CheckpointError(f"the checkpoint does not fit the model: missing keys {missing[:5]}, "
                         f"unexpected keys {unexpected[:5]}")
    for k, v in own.items():
        if isinstance(v, Tensor) and (not isinstance(state[k], Tensor) or state[k].shape != v.shape):
            got = tuple(state[k].shape) if isinstance(state[k], Tensor) else type(state[k]).__name__
            raise CheckpointError(f"the checkpoint does not fit the model: {k} is {got} in the checkpoint, "
                             f"{tuple(v.shape)} in the model")


def _check_optimizer_state(state: Any, optimizer: torch.optim.Optimizer) -> None:
    """The checks of ``Optimizer.load_state_dict``, made before anything is copied."""
    groups = state.get("param_groups") if isinstance(state, dict) else None
    if not isinstance(groups, list) or not isinstance(state.get("state"), dict):
        raise CheckpointError("the checkpoint's optimizer state is not an optimizer state_dict")
    sizes = [len(g["params"]) for g in optimizer.param_groups]
    saved = [len(g.get("params", ())) if isinstance(g, dict) else -1 for g in groups]
    if sizes != saved:
        raise CheckpointError(f"the checkpoint does not fit the optimizer: parameter groups of sizes {saved} "
                         f"in the checkpoint, {sizes} in the optimizer")


def load_checkpoint(
    path: Union[str, os.PathLike],
    model: nn.Module,
    optimizer: Optional[torch.optim.Optimizer] = None,
    scheduler: Optional[Any] = None,
    restore_rng: bool = True,
    map_location: Union[str, torch.device, None] = "cpu",
) -> dict[str, Any]:
    """Load a checkpoint written by ``save_checkpoint`` (``weights_only=True``) into the given
    objects; returns its ``extra`` data.

    Everything is checked before anything changes: a file that is not such a checkpoint (also one
    that the ``weights_only`` unpickler refuses), or whose model or optimizer state does not fit
    the given ones, raises ``CheckpointError`` with the model, optimizer, scheduler and RNGs
    untouched."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    for name, obj in (("optimizer", optimizer), ("scheduler", scheduler)):
        if obj is not None and not callable(getattr(obj, "load_state_dict", None)):
            raise TypeError(f"{name} must have a load_state_dict() method (or be None), got {type(obj).__name__}")
    if not isinstance(restore_rng, bool):
        raise TypeError(f"restore_rng must be True or False, got {restore_rng!r}")
    payload = _read(path, map_location)
    _check_model_state(payload["model"], model)
    if optimizer is not None and payload["optimizer"] is not None:
        _check_optimizer_state(payload["optimizer"], optimizer)
    if restore_rng and not isinstance(payload["rng"], dict):
        raise CheckpointError("the checkpoint's RNG state is not a dict")
    model.load_state_dict(payload["model"])
    if optimizer is not None and payload["optimizer"] is not None:
        optimizer.load_state_dict(payload["optimizer"])
    if scheduler is not None and payload["scheduler"] is not None:
        scheduler.load_state_dict(payload["scheduler"])
    if restore_rng:
        set_rng_state(payload["rng"])
    return payload["extra"]
