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


_COMPILE_WRAPPER = "_orig_mod"  # the attribute under which torch.compile's OptimizedModule holds the model


def parameter_name(path: str) -> str:
    """A parameter's name as results key it: its path with ``torch.compile``'s wrapper segment
    (``_orig_mod``) dropped, so that results of a compiled model apply to the original and the
    other way round."""
    return ".".join(part for part in path.split(".") if part != _COMPILE_WRAPPER)


def parameter_aliases(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """Every name of every parameter, in the model's order: a shared (tied) parameter appears
    once per module holding it (GPT-2's ``transformer.wte.weight`` and ``lm_head.weight``)."""
    return [(parameter_name(n), p) for n, p in model.named_parameters(remove_duplicate=False)]


def named_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """Each parameter once, under its first name (``parameter_name``), in the model's order."""
    seen: set[int] = set()
    out = []
    for n, p in parameter_aliases(model):
        if id(p) not in seen:
            seen.add(id(p))
            out.append((n, p))
    return out


def resolve_names(model: nn.Module, names: Iterable[str], what: str) -> list[nn.Parameter]:
    """The parameters that ``names`` (any alias, with or without ``_orig_mod``) denote, one per
    name; raises ``ValueError`` naming ``what`` for unknown names and for two names of one
    (tied) parameter, which would apply it twice."""
    aliases = dict(parameter_aliases(model))
    names = list(names)
    unknown = [n for n in names if parameter_name(n) not in aliases]
    if unknown:
        raise ValueError(f"{what} names parameters the model does not have: {unknown[:5]}")
    params = [aliases[parameter_name(n)] for n in names]
    first: dict[int, str] = {}
    for n, p in zip(names, params):
        if id(p) in first:
            raise ValueError(f"{what} names one shared (tied) parameter twice, as {first[id(p)]!r} and {n!r}: give it once")
        first[id(p)] = n
    return params


def _matching(names: list[str], pattern: str) -> set[str]:
    """The names a pattern selects: the name itself when it is one (names may contain ``[``,
    ``*`` or ``?``, e.g. ``ModuleDict`` keys), else the names matching it as a glob pattern."""
    if pattern in names:
        return {pattern}
    return {n for n in names if fnmatch.fnmatchcase(n, pattern)}


def select_parameters(model: nn.Module, params: ParamSpec = None) -> list[tuple[str, nn.Parameter]]:
    """Return ``[(name, parameter), ...]`` in the model's order for the selector ``params``.

    Names are those of ``named_parameters``: each parameter once, ``torch.compile``'s
    ``_orig_mod`` dropped. Names, patterns and predicates see every alias of a tied parameter,
    and any alias selects it. Raises ``ValueError`` when the selection is empty and
    ``TypeError`` for an unknown selector.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    named = [(n, p) for n, p in named_parameters(model) if _eligible(p)]
    aliases = parameter_aliases(model)

    def by_names(patterns: list[str]) -> list[tuple[str, nn.Parameter]]:
        all_names = [n for n, _ in aliases]
        keep = set().union(*(_matching(all_names, parameter_name(pat)) for pat in patterns))
        ids = {id(p) for n, p in aliases if n in keep}
        return [(n, p) for n, p in named if id(p) in ids]

    if params is None:
        chosen = named
    elif isinstance(params, str):
        chosen = by_names([params])
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
        ids = {id(p) for n, p in aliases if _eligible(p) and params(n, p)}
        chosen = [(n, p) for n, p in named if id(p) in ids]
    else:
        try:
            items = list(params)
        except TypeError:
            raise TypeError(f"params must be {_ACCEPTED}; got {type(params).__name__}") from None
        if items and all(isinstance(i, type) for i in items):  # a list of module classes, as a tuple
            return select_parameters(model, tuple(items))
        if items and all(isinstance(i, str) for i in items):
            chosen = by_names(items)
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
