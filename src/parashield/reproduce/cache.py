"""The reproduction's run folders: JSON entries written atomically under unique temporary names,
each with the key of the configuration that made it and a checksum of its content, and a lock so
that two processes sharing one output folder never compute or write the same run twice
(:func:`held_elsewhere` lets them pick different runs instead of queueing on one).

An entry that cannot be read, whose key differs or whose checksum does not match its content is
stale: a warning says why and the run is computed again."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import math
import os
import tempfile
import warnings
from pathlib import Path
from typing import Any, Iterator, Optional


def config_hash(obj: Any) -> str:
    """A short, stable hash of JSON-able data (sorted keys)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a uniquely named temporary file in the same folder
    (fsync, then rename), with the permissions of a plainly created file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_json(path: Path, data: Any) -> None:
    """Atomic JSON write (numbers that JSON lacks, such as numpy floats, written as floats)."""
    atomic_write(Path(path), json.dumps(data, indent=1, sort_keys=True, default=float).encode())


#: how :func:`strict_json` writes the numbers JSON has no literal for
NONFINITE = {math.inf: "inf", -math.inf: "-inf"}


def strict_json(data: Any) -> Any:
    """``data`` with every non-finite float replaced by the string ``"inf"``, ``"-inf"`` or
    ``"nan"``, so that strict JSON parsers (jq, JavaScript's JSON.parse) read the file;
    :func:`from_strict_json` turns them back into floats."""
    if isinstance(data, float) and not math.isfinite(data):
        return NONFINITE.get(data, "nan")
    if isinstance(data, dict):
        return {k: strict_json(v) for k, v in data.items()}
    if isinstance(data, (list, tuple)):
        return [strict_json(v) for v in data]
    return data


def from_strict_json(data: Any) -> Any:
    """The inverse of :func:`strict_json` (every string ``"inf"``, ``"-inf"``, ``"nan"`` becomes a float)."""
    if isinstance(data, str) and data in ("inf", "-inf", "nan"):
        return float(data)
    if isinstance(data, dict):
        return {k: from_strict_json(v) for k, v in data.items()}
    if isinstance(data, list):
        return [from_strict_json(v) for v in data]
    return data


def _checksum(data: Any) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=float).encode()).hexdigest()


def store(path: Path, key: str, data: Any) -> None:
    """Write one cache entry: ``data`` with its configuration ``key`` and checksum."""
    write_json(path, {"key": key, "sha256": _checksum(data), "data": data})


def load(path: Path, key: str) -> Optional[Any]:
    """The data of the entry at ``path`` if it is readable, was made by configuration ``key`` and
    matches its checksum; None otherwise (with a warning when an entry exists but is unusable)."""
    if not path.exists():
        return None
    try:
        entry = json.loads(path.read_text())
        if not isinstance(entry, dict) or not {"key", "sha256", "data"} <= entry.keys():
            raise ValueError("not a parashield cache entry")
    except (OSError, ValueError) as exc:
        warnings.warn(f"cache entry {path} is unreadable ({exc}); computing it again", stacklevel=2)
        return None
    if entry["key"] != key:
        return None  # another configuration: silently recomputed
    if entry["sha256"] != _checksum(entry["data"]):
        warnings.warn(f"cache entry {path} does not match its checksum (edited or damaged); computing it again",
                      stacklevel=2)
        return None
    return entry["data"]


@contextlib.contextmanager
def locked(folder: Path) -> Iterator[None]:
    """Hold the folder's lock (waiting for another process that holds it) and clear temporary
    files that an interrupted writer left behind."""
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / ".lock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            for orphan in folder.glob(".*.tmp"):
                with contextlib.suppress(FileNotFoundError):
                    orphan.unlink()
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def held_elsewhere(folder: Path) -> bool:
    """Whether another process holds the folder's lock at this moment (a hint for scheduling: the
    answer may change right after; :func:`locked` is what guarantees exclusive work)."""
    path = folder / ".lock"
    if not path.exists():
        return False
    with open(path, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(handle, fcntl.LOCK_UN)
    return False
