"""tqdm progress bars where tqdm is installed (an optional extra); plain iteration otherwise."""

from __future__ import annotations

from typing import Any, Iterable


def progress(iterable: Iterable, **kw: Any) -> Iterable:
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return iterable
    return tqdm(iterable, **{"mininterval": 1.0, **kw})
