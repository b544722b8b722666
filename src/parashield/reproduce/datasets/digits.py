"""The 8x8 handwritten digits shipped with scikit-learn (1,797 images, 10 classes)."""

from __future__ import annotations

import numpy as np
import torch

from ._common import ClassificationData, import_or_missing, stratified_split

# ----------------------------------------------------------------------------------------------
# 8x8 digits (scikit-learn, embedded)
# ----------------------------------------------------------------------------------------------


def load_digits(seed: int = 0, test_fraction: float = 0.2) -> ClassificationData:
    """scikit-learn's embedded 8x8 digits (1,797 x 64, 10 classes), never downloaded.

    Seeded stratified split; features standardized with the train split's per-pixel mean and
    std (constant pixels get std 1). ``x`` is float32 ``N x 64``.
    """
    datasets = import_or_missing("sklearn.datasets", "scikit-learn (8x8 digits)", "digits")
    bunch = datasets.load_digits()
    x = np.asarray(bunch.data, dtype=np.float32)
    y = np.asarray(bunch.target, dtype=np.int64)
    train_idx, test_idx = stratified_split(y, test_fraction, seed)
    mean = x[train_idx].mean(0)
    std = x[train_idx].std(0)
    std[std < 1e-6] = 1.0
    x = (x - mean) / std
    return ClassificationData(
        x_train=torch.from_numpy(np.ascontiguousarray(x[train_idx])),
        y_train=torch.from_numpy(y[train_idx]),
        x_test=torch.from_numpy(np.ascontiguousarray(x[test_idx])),
        y_test=torch.from_numpy(y[test_idx]),
        num_classes=10,
        class_names=tuple(str(i) for i in range(10)),
    )
