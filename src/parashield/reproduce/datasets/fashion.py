"""Fashion-MNIST from the Debian package ``dataset-fashion-mnist`` (gzip idx files)."""

from __future__ import annotations

import gzip
import math
import os
import struct
import zlib
from typing import Optional

import numpy as np
import torch
from torch import Tensor

from ._common import (
    DEFAULT_FASHION_MNIST_ROOT,
    ClassificationData,
    IdxFormatError,
    PathLike,
    require_files,
)

# ----------------------------------------------------------------------------------------------
# Fashion-MNIST (Debian dataset-fashion-mnist, gzip idx files)
# ----------------------------------------------------------------------------------------------

FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)  # fmt: skip
FASHION_MNIST_MEAN, FASHION_MNIST_STD = 0.2860, 0.3530


def read_idx(path: PathLike, expected_ndim: Optional[int] = None) -> np.ndarray:
    """Read an idx file (gzip or plain) of unsigned bytes into a uint8 array.

    Header: magic ``00 00 08 ndim``, then ``ndim`` big-endian uint32 dims, then the data.
    Raises :class:`IdxFormatError` on a bad magic number, a wrong ``ndim`` or a size mismatch.
    """
    path = os.fspath(path)
    with open(path, "rb") as f:
        raw = f.read()
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as exc:
            raise IdxFormatError(f"{path}: corrupt gzip stream ({exc})") from exc
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise IdxFormatError(
            f"{path}: not an idx file of unsigned bytes: magic bytes are {raw[:4].hex(' ')!r}, "
            f"expected '00 00 08 <ndim>'"
        )
    ndim = raw[3]
    if ndim == 0 or (expected_ndim is not None and ndim != expected_ndim):
        want = "at least 1" if expected_ndim is None else str(expected_ndim)
        raise IdxFormatError(f"{path}: idx header says {ndim} dimensions, expected {want}")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise IdxFormatError(f"{path}: truncated idx header")
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    n = math.prod(dims)
    if len(raw) - header != n:
        raise IdxFormatError(
            f"{path}: idx header promises {n} bytes for shape {dims}, "
            f"file holds {len(raw) - header}"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def load_fashion_mnist(
    root: PathLike = DEFAULT_FASHION_MNIST_ROOT,
    limit_train: Optional[int] = None,
    limit_test: Optional[int] = None,
    normalize: bool = True,
) -> ClassificationData:
    """Fashion-MNIST: 60,000 train / 10,000 test images, 10 classes.

    ``x`` is float32 ``N x 1 x 28 x 28`` in [0, 1], then (``normalize``) standardized with mean
    0.2860 and std 0.3530; ``y`` int64. ``limit_*`` keep the first N examples of a split.
    """
    root = os.fspath(root)
    names = {
        s: (f"{s}-images-idx3-ubyte.gz", f"{s}-labels-idx1-ubyte.gz") for s in ("train", "t10k")
    }
    paths = [os.path.join(root, n) for pair in names.values() for n in pair]
    require_files(paths, "Fashion-MNIST", "fashion_mnist")

    def split(prefix: str, limit: Optional[int]) -> tuple[Tensor, Tensor]:
        img_name, lab_name = names[prefix]
        images = read_idx(os.path.join(root, img_name), expected_ndim=3)
        labels = read_idx(os.path.join(root, lab_name), expected_ndim=1)
        if len(images) != len(labels):
            raise IdxFormatError(f"{root}/{prefix}: {len(images)} images but {len(labels)} labels")
        if limit is not None:
            images, labels = images[:limit], labels[:limit]
        x = torch.from_numpy(images.copy()).unsqueeze(1).float().div_(255.0)
        if normalize:
            x.sub_(FASHION_MNIST_MEAN).div_(FASHION_MNIST_STD)
        return x, torch.from_numpy(labels.astype(np.int64))

    x_train, y_train = split("train", limit_train)
    x_test, y_test = split("t10k", limit_test)
    return ClassificationData(x_train, y_train, x_test, y_test, 10, FASHION_MNIST_CLASSES)
