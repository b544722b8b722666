"""Progress bars for every loop that can run long, where tqdm is installed (an optional extra).

One switch silences them all: ``parashield.set_progress(False)`` in code, or the environment
variable ``PARASHIELD_PROGRESS=0`` (also ``false``, ``no``, ``off``) for a whole process.
``set_progress(None)`` hands the choice back to the environment variable; the default is on.
A bar appears only once its loop has run for a second, so short calls print nothing.
"""

from __future__ import annotations

import os
from typing import Any, Iterable, Optional

ENV_VAR = "PARASHIELD_PROGRESS"
_OFF = ("0", "false", "no", "off")
_enabled: Optional[bool] = None


def set_progress(enabled: Optional[bool]) -> None:
    """Show (True) or hide (False) parashield's progress bars; None: follow ``PARASHIELD_PROGRESS``."""
    global _enabled
    if enabled is not None and not isinstance(enabled, bool):
        raise TypeError(f"enabled must be True, False or None, got {enabled!r}")
    _enabled = enabled


def progress_enabled() -> bool:
    """Whether bars are shown now: ``set_progress``'s choice, else ``PARASHIELD_PROGRESS``."""
    if _enabled is not None:
        return _enabled
    return os.environ.get(ENV_VAR, "1").strip().lower() not in _OFF


def progress(iterable: Iterable, min_total: int = 0, **kw: Any) -> Iterable:
    """``iterable`` with a tqdm bar (``kw`` passed to tqdm), or plain when bars are off, tqdm is
    missing, or the loop has fewer than ``min_total`` items (a loop run once per training step,
    where a bar's ~0.1 ms would show, needs one only when it is long)."""
    if not progress_enabled():
        return iterable
    if min_total:
        total = kw.get("total", len(iterable) if hasattr(iterable, "__len__") else None)
        if total is not None and total < min_total:
            return iterable
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return iterable
    return tqdm(iterable, **{"mininterval": 1.0, "delay": 1.0, **kw})
