"""English (KJV) - Spanish (Reina-Valera 1909) verse pairs read from SWORD zText modules
(Debian ``sword-text-kjv sword-text-sparv``), held out by whole books."""

from __future__ import annotations

import html
import os
import re
import struct
import zlib
from collections import Counter
from dataclasses import dataclass
from typing import Iterable, Optional, Sequence, Union

import numpy as np
import torch

from ._common import (
    DEFAULT_SWORD_ROOT,
    INSTALL_COMMANDS,
    MissingDataError,
    ParallelSplit,
    PathLike,
    TranslationData,
    Vocab,
    tokenize,
)

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
