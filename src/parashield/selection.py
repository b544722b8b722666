"""Parameter selection: which tensors of a model a corruption or a defense may touch.

Only trainable floating-point parameters are ever selected; frozen (``requires_grad=False``) and
integer tensors are never touched, whatever the selector says.

Usage: docs/guide.md, "The objective".
"""

from __future__ import annotations

import fnmatch
from typing import Callable, Iterable, Union

import torch
from torch import nn

#: What ``params=`` accepts: ``None`` (all trainable float parameters), a name or glob pattern, a
#: list of names/patterns, a module class or a tuple/list of classes, a submodule of the model, a
#: predicate ``(name, param) -> bool`` or an iterable of ``nn.Parameter`` objects of the model.
ParamSpec = Union[
    None,
    str,
    Iterable[str],
    type,
    tuple,
    nn.Module,
    Callable[[str, torch.Tensor], bool],
    Iterable[torch.Tensor],
]

_ACCEPTED = (
    "None, a name or glob pattern, a list of names/patterns, a module class or a tuple/list of classes, "
    "a submodule, a predicate (name, param) -> bool, or an iterable of the model's parameters"
)


def _eligible(p: torch.Tensor) -> bool:
    return p.requires_grad and p.is_floating_point()


def _matching(names: list[str], pattern: str) -> set[str]:
    """The names a pattern selects: the name itself when it is one (names may contain ``[``,
    ``*`` or ``?``, e.g. ``ModuleDict`` keys), else the names matching it as a glob pattern."""
    if pattern in names:
        return {pattern}
    return {n for n in names if fnmatch.fnmatchcase(n, pattern)}


def select_parameters(model: nn.Module, params: ParamSpec = None) -> list[tuple[str, nn.Parameter]]:
    """Return ``[(name, parameter), ...]`` in the model's order for the selector ``params``.

    Raises ``ValueError`` when the selection is empty and ``TypeError`` for an unknown selector.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    named = [(n, p) for n, p in model.named_parameters() if _eligible(p)]
    if params is None:
        chosen = named
    elif isinstance(params, str):
        keep = _matching([n for n, _ in model.named_parameters()], params)
        chosen = [(n, p) for n, p in named if n in keep]
    elif isinstance(params, nn.Module):
        # A module instance (e.g. ``model.fc``): its parameters, submodules included. Checked
        # before the predicate case because modules are callable too.
        ids = {id(p) for p in params.parameters()}
        chosen = [(n, p) for n, p in named if id(p) in ids]
    elif isinstance(params, type) or (
        isinstance(params, tuple) and params and all(isinstance(t, type) for t in params)
    ):
        ids = set()
        for module in model.modules():
            if isinstance(module, params):
                ids.update(id(p) for p in module.parameters(recurse=False))
        chosen = [(n, p) for n, p in named if id(p) in ids]
    elif callable(params):
        chosen = [(n, p) for n, p in named if params(n, p)]
    else:
        try:
            items = list(params)
        except TypeError:
            raise TypeError(f"params must be {_ACCEPTED}; got {type(params).__name__}") from None
        if items and all(isinstance(i, type) for i in items):  # a list of module classes, as a tuple
            return select_parameters(model, tuple(items))
        if items and all(isinstance(i, str) for i in items):
            all_names = [n for n, _ in model.named_parameters()]
            keep = set().union(*(_matching(all_names, pat) for pat in items))
            chosen = [(n, p) for n, p in named if n in keep]
        elif all(isinstance(i, torch.Tensor) for i in items):
            ids = {id(i) for i in items}
            chosen = [(n, p) for n, p in named if id(p) in ids]
        else:
            raise TypeError(f"params must be {_ACCEPTED}; got a list of mixed or unknown items")
    if not chosen:
        raise ValueError(
            f"params selected no trainable floating-point parameter (selector: {params!r}); "
            f"accepted: {_ACCEPTED}"
        )
    return chosen
