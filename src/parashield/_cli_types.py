"""Argument types of the command line: ``type=`` callables for argparse.

Each one parses one string or raises ``argparse.ArgumentTypeError`` with a message that says what
is accepted; argparse then exits with ``parashield: error: argument --NAME: MESSAGE`` (status 2)
before any work starts.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import tempfile
from pathlib import Path
from typing import Callable, Iterable, Optional

_IDENTIFIER_PATH = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*")


def _named(name: str, parse: Callable) -> Callable:
    """``parse`` under ``name``: argparse shows a type's ``__name__`` in its default messages."""
    parse.__name__ = parse.__qualname__ = name
    return parse


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None


def int_in(low: int, high: Optional[int] = None, why: str = "") -> Callable[[str], int]:
    """An integer in ``[low, high]`` (``high=None``: no upper bound); ``why`` explains the bound
    in the message."""

    def parse(text: str) -> int:
        value = _int(text)
        if value < low or (high is not None and value > high):
            accepted = f">= {low}" if high is None else f"in [{low}, {high}]"
            raise argparse.ArgumentTypeError(f"must be an integer {accepted}, got {value}{why}")
        return value

    return _named("int_in", parse)


positive_int = _named("positive_int", int_in(1))


def finite_positive_float(text: str) -> float:
    """A finite number > 0 (``nan``, ``inf`` and values that overflow to inf are refused)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text!r}")
    return value


def csv_of(choices: Iterable[str]) -> Callable[[str], tuple[str, ...]]:
    """A comma-separated, non-empty list of names from ``choices``, as a tuple (duplicates
    dropped, order kept)."""
    allowed = tuple(choices)

    def parse(text: str) -> tuple[str, ...]:
        names = [n.strip() for n in text.split(",")]
        unknown = [n for n in names if n not in allowed]
        if unknown:
            raise argparse.ArgumentTypeError(
                f"unknown name(s) {', '.join(map(repr, unknown))}; give a comma-separated list of {', '.join(allowed)}"
            )
        return tuple(dict.fromkeys(names))

    return _named("csv_of", parse)


def factory_ref(text: str) -> str:
    """``module:attribute`` or ``path/to/file.py:attribute`` (the attribute may be dotted, as in
    ``models:Net.build``); a file must exist. Imported later, by the command."""
    where, sep, attribute = text.rpartition(":")
    if not sep or not where or not _IDENTIFIER_PATH.fullmatch(attribute):
        raise argparse.ArgumentTypeError(
            f"expected module:function or path/to/file.py:function, got {text!r}"
        )
    if is_file_ref(where):
        if not Path(where).is_file():
            raise argparse.ArgumentTypeError(f"no file {where!r} (in {text!r})")
    elif not _IDENTIFIER_PATH.fullmatch(where):
        raise argparse.ArgumentTypeError(f"{where!r} is neither a module name nor a path to a .py file (in {text!r})")
    return text


def is_file_ref(where: str) -> bool:
    """Whether the part of a factory reference before ``:`` names a file rather than a module."""
    return where.endswith(".py") or "/" in where or os.sep in where


def existing_file(text: str) -> Path:
    """A path to an existing regular file."""
    path = Path(text)
    if not path.is_file():
        raise argparse.ArgumentTypeError(f"{text!r} is a folder, not a file" if path.is_dir() else f"no file {text!r}")
    return path


def _writable_folder(folder: Path, text: str) -> None:
    """``folder`` (or, when it does not exist yet, its nearest existing parent, where it will be
    created) is a folder this process may write to."""
    probe = folder
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        raise argparse.ArgumentTypeError(f"cannot write under {text!r}: {str(probe)!r} is a file, not a folder")
    try:  # os.access says yes to root everywhere, also on a read-only file system
        with tempfile.TemporaryFile(dir=probe):
            pass
    except OSError as exc:
        raise argparse.ArgumentTypeError(f"cannot write under {text!r}: {exc.strerror or exc} in {str(probe)!r}") from None


def output_folder(text: str) -> Path:
    """A folder to write into: an existing writable folder, or one that can be created."""
    path = Path(text)
    if path.exists() and not path.is_dir():
        raise argparse.ArgumentTypeError(f"{text!r} is a file; give a folder")
    _writable_folder(path, text)
    return path


def output_file(text: str) -> Path:
    """A file to write: not a folder, in a folder that exists or can be created."""
    path = Path(text)
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{text!r} is a folder; give a file name")
    if path.exists() and not os.access(path, os.W_OK):
        raise argparse.ArgumentTypeError(f"cannot write {text!r}: no write permission")
    _writable_folder(path.parent, text)
    return path


def device(text: str) -> str:
    """A torch device that exists on this machine: ``cpu``, ``cuda``, ``cuda:1``, ``mps``."""
    import torch

    try:
        dev = torch.device(text)
    except (RuntimeError, ValueError):
        raise argparse.ArgumentTypeError(f"not a torch device: {text!r} (e.g. cpu, cuda, cuda:1, mps)") from None
    if dev.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise argparse.ArgumentTypeError(f"{text!r}: CUDA is not available on this machine (torch {torch.__version__})")
        if dev.index is not None and dev.index >= count:
            raise argparse.ArgumentTypeError(f"{text!r}: this machine has {count} CUDA device(s), numbered from 0")
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise argparse.ArgumentTypeError(f"{text!r}: MPS is not available on this machine")
    elif dev.type not in ("cpu", "cuda", "mps"):
        raise argparse.ArgumentTypeError(f"{text!r}: the command line runs on cpu, cuda or mps")
    return str(dev)


def default_threads() -> int:
    """CPU threads of a command when ``--threads`` is not given: ``OMP_NUM_THREADS`` when it is
    set to a positive integer, else half the CPUs this process may run on, from 1 to 8.

    torch's own default is every core; on a machine busy with other jobs its threads wait for
    each other at every parallel region, and a run can become many times slower than with one
    thread. Half the CPUs leaves room for the rest of the machine.
    """
    env = os.environ.get("OMP_NUM_THREADS", "")
    if env.isdigit() and int(env) >= 1:
        return int(env)
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(8, cpus // 2))
