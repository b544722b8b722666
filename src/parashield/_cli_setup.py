"""What ``attack``, ``indicators`` and ``landscape`` work on: a model with its loss and data, from a
built-in task (``--task``) or from the user's own code (``--model``, ``--data``, ``--loss``),
with weights from ``--checkpoint``, on ``--device``.

The user's contract (see docs/cli.md):

- ``--model module:factory``: ``factory() -> torch.nn.Module``;
- ``--data module:factory``: ``factory(split) -> batches`` where ``split`` is ``"train"`` (the
  data corruptions are searched on and indicators and landscapes measured on) or ``"test"`` (the
  data ``attack`` evaluates the corrupted model on); batches are one batch, a list of batches or
  a re-iterable loader such as a ``torch.utils.data.DataLoader``;
- ``--loss module:function``: ``function(model, batch) -> scalar tensor``, the batch mean;
  default cross-entropy ``F.cross_entropy(model(x), y)`` for ``(x, y)`` batches, which also
  gives ``attack`` an accuracy column.

Every failure becomes a :class:`CommandError` that names the option and what it accepts.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import pickle
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._cli_types import is_file_ref
from .objective import LossFn, Objective, batch_size, is_single_batch, to_device

Metric = Callable[[nn.Module, Any], float]


class CommandError(Exception):
    """A bad input found by a command; the CLI prints ``parashield: error: <message>``, exit 2."""


@dataclass
class Setup:
    """A model, its loss, the data corruptions are searched on (``attack_data``, the train
    split) and the data they are evaluated on (``test_data``), and a metric where one is known."""

    source: str
    checkpoint: Optional[str]
    model: nn.Module
    loss_fn: LossFn
    attack_data: Any
    test_data: Any
    metric_name: Optional[str]
    metric: Optional[Metric]
    device: str

    def objective(self, split: str = "train") -> Objective:
        """The objective on the ``train`` (attack) or ``test`` split."""
        data = self.attack_data if split == "train" else self.test_data
        try:
            return Objective(self.model, self.loss_fn, data)
        except (TypeError, ValueError) as exc:  # e.g. a data factory that yielded no batch
            raise CommandError(f"the {split} split of {self.source}: {exc}"
                               + ("; the data yielded no batch" if "empty" in str(exc) else "")) from None

    def describe(self) -> dict:
        """Model, weights, device and split sizes, for the printed header and the JSON output."""
        return {"model": self.source, "checkpoint": self.checkpoint, "device": self.device,
                "parameters": sum(p.numel() for p in self.model.parameters() if p.requires_grad),
                "splits": {"train": _examples(self.attack_data), "test": _examples(self.test_data)}}


def _examples(data: Any) -> Optional[int]:
    """Examples in a list of batches (None for a loader or an unloaded split: not counted, since
    counting would read it)."""
    if data is None:
        return None
    if is_single_batch(data):
        return batch_size(data)
    return sum(batch_size(b) for b in data) if isinstance(data, (list, tuple)) else None


# ------------------------------------------------------------------------------ built-in tasks
def load_task(name: str, quick: bool = False, profile: str = "cpu") -> Any:
    """The built-in task ``name`` (a ``reproduce.Task``) in ``profile`` ("cpu" or "gpu"); missing
    data is a CommandError that names the install command."""
    from .reproduce import TASKS

    try:
        return TASKS[name](quick=quick, profile=profile)
    except FileNotFoundError as exc:  # MissingDataError names the install command
        raise CommandError(f"data for task {name!r} is missing: {exc}") from None


def task_setup(name: str, checkpoint: Path, device: str) -> Setup:
    """A built-in task's model (weights from ``checkpoint``), loss, metric and data."""
    task = load_task(name)
    model = task.build_model()
    load_weights(checkpoint, model, f"task {name!r}")
    model.to(device).eval()
    move = (lambda batches: [to_device(b, torch.device(device)) for b in batches]) if device != "cpu" else list
    return Setup(f"task {name!r}", str(checkpoint), model, task.loss_fn, move(task.attack_data), move(task.test_data),
                 task.metric_name, task.metric, device)


# ------------------------------------------------------------------------------ user code
def user_setup(model_ref: str, data_ref: str, loss_ref: Optional[str], checkpoint: Optional[Path], device: str,
               splits: tuple[str, ...]) -> Setup:
    """The user's model factory (weights from ``checkpoint`` when given), data of ``splits``
    and loss (default: cross-entropy on ``(x, y)``)."""
    model = call_user(model_ref, "--model")
    if not isinstance(model, nn.Module):
        raise CommandError(f"--model {model_ref} must return a torch.nn.Module, got {type(model).__name__}")
    if checkpoint is not None:
        load_weights(checkpoint, model, f"the model of {model_ref}")
    model.to(device).eval()
    data = {split: user_data(data_ref, split) if split in splits else None for split in ("train", "test")}
    loss_fn = resolve(loss_ref, "--loss") if loss_ref else cross_entropy
    from .reproduce.tasks import accuracy

    metric = (accuracy, "accuracy") if loss_ref is None else (None, None)
    return Setup(f"{model_ref}", None if checkpoint is None else str(checkpoint), model, loss_fn,
                 data["train"], data["test"], metric[1], metric[0], device)


def user_data(ref: str, split: str) -> Any:
    """``factory(split)``, checked to be one batch or a re-iterable of batches."""
    data = call_user(ref, "--data", split)
    if isinstance(data, Iterator):
        raise CommandError(f"--data {ref} returned an iterator for split {split!r}: it can be read only once; "
                           "return a list of batches or a DataLoader")
    if data is None or not (is_single_batch(data) or hasattr(data, "__iter__")):
        raise CommandError(f"--data {ref} must return a batch, a list of batches or a DataLoader for split "
                           f"{split!r}, got {type(data).__name__}")
    return data


def resolve(ref: str, option: str) -> Callable:
    """The callable named by ``module:attr`` or ``path/to/file.py:attr`` (``attr`` may be dotted).
    Modules are imported with the current folder on ``sys.path``, as ``python -m`` would."""
    where, _, attribute = ref.rpartition(":")
    try:
        module = _import_file(where) if is_file_ref(where) else _import_module(where)
    except ModuleNotFoundError as exc:
        if exc.name != where.split(".")[0] and exc.name != where:
            raise CommandError(f"{option} {ref}: importing {where} failed: {exc}") from None
        raise CommandError(f"{option} {ref}: no module named {where!r} (run from the folder that holds it, "
                           "or give a file: path/to/file.py:function)") from None
    except Exception as exc:  # the user's module failed at import: its own error, named
        raise CommandError(f"{option} {ref}: importing {where} failed: {type(exc).__name__}: {exc}") from None
    obj: Any = module
    for part in attribute.split("."):
        if not hasattr(obj, part):
            raise CommandError(f"{option} {ref}: {where} has no attribute {attribute!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise CommandError(f"{option} {ref}: {attribute!r} is not callable (it is of type {type(obj).__name__})")
    return obj


def _import_module(name: str) -> Any:
    cwd = os.getcwd()
    added = cwd not in sys.path
    if added:
        sys.path.insert(0, cwd)
    try:
        return importlib.import_module(name)
    finally:
        if added:
            sys.path.remove(cwd)


def _import_file(path: str) -> Any:
    resolved = Path(path).resolve()
    name = f"parashield_user_{resolved.stem}_{abs(hash(str(resolved))):x}"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, resolved)
    if spec is None or spec.loader is None:
        raise ImportError(f"{path} is not a Python file")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses and pickling look a module up by name
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[name]
        raise
    return module


def call_user(ref: str, option: str, *args: Any) -> Any:
    """Call the user's factory; an exception it raises becomes a CommandError naming it."""
    fn = resolve(ref, option)
    try:
        return fn(*args)
    except Exception as exc:
        raise CommandError(f"{option} {ref}({', '.join(map(repr, args))}) raised {type(exc).__name__}: {exc}") from None


def cross_entropy(model: nn.Module, batch: Any) -> Tensor:
    """The default loss: ``F.cross_entropy(model(x), y)`` for an ``(x, y)`` batch."""
    if not (isinstance(batch, (tuple, list)) and len(batch) == 2):
        raise CommandError(f"the default loss is cross-entropy on (x, y) batches, but a batch is a "
                           f"{type(batch).__name__}{f' of {len(batch)} items' if isinstance(batch, (tuple, list)) else ''}; "
                           "give --loss module:function with function(model, batch) -> scalar tensor")
    x, y = batch
    return F.cross_entropy(model(x), y)


# ------------------------------------------------------------------------------ checkpoints
def load_weights(path: Path, model: nn.Module, what: str) -> None:
    """Load a parashield checkpoint or a plain state_dict into ``model``, with
    ``weights_only=True``: a file that holds anything but tensors and plain data is refused and
    none of its code runs."""
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CommandError(f"--checkpoint {path} refused: it holds objects other than tensors and plain data, and it "
                           f"is read with weights_only=True, which runs no code from the file ({reason})") from None
    except Exception as exc:  # EOFError for an empty file, RuntimeError for a foreign format, ...
        what = "it is empty" if path.stat().st_size == 0 else f"{type(exc).__name__}: {exc}"
        raise CommandError(f"--checkpoint {path} is not a PyTorch checkpoint ({what})") from None
    is_checkpoint = isinstance(payload, Mapping) and "model" in payload and "rng" in payload
    state = payload["model"] if is_checkpoint else payload
    if not (isinstance(state, Mapping) and any(isinstance(v, Tensor) for v in state.values())):
        raise CommandError(f"--checkpoint {path} holds neither a parashield checkpoint nor a state_dict "
                           f"(a {type(payload).__name__})")
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        raise CommandError(f"--checkpoint {path} does not fit {what}: {exc}") from None
