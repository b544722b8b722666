"""Classical baselines measured by the project on each task's own splits. A neural model that does
not beat them is undertrained, and a task whose plain model loses to any of them decides nothing.

Every reference fits on the training split, picks its one hyperparameter on the validation split
and is scored once on the test split, in the task's metric and direction."""

from __future__ import annotations

import math
from collections import Counter
from typing import Sequence

import numpy as np
import torch

#: regularization strengths tried on validation by the linear references
C_GRID = (0.01, 0.1, 1.0, 10.0)


def _pick_on_validation(fit, candidates: Sequence[float], valid_score) -> tuple[object, dict]:
    """Fit one model per candidate, keep the one with the best validation score."""
    scores, models = {}, {}
    for c in candidates:
        models[c] = fit(c)
        scores[c] = valid_score(models[c])
    best = max(scores, key=scores.get)
    return models[best], {"candidates": list(candidates), "validation": [scores[c] for c in candidates], "pick": best}


def logistic_regression(x_tr: torch.Tensor, y_tr: torch.Tensor, x_va: torch.Tensor, y_va: torch.Tensor,
                        x_te: torch.Tensor, y_te: torch.Tensor) -> dict:
    """Multinomial logistic regression on the flattened inputs; C chosen on validation."""
    from sklearn.linear_model import LogisticRegression

    flat = lambda x: x.reshape(len(x), -1).numpy()  # noqa: E731
    xtr, xva, xte = flat(x_tr), flat(x_va), flat(x_te)

    def fit(c: float):
        return LogisticRegression(C=c, max_iter=300, tol=1e-3).fit(xtr, y_tr.numpy())

    model, sel = _pick_on_validation(fit, C_GRID, lambda m: m.score(xva, y_va.numpy()))
    return {"metric": float(model.score(xte, y_te.numpy())), "selection": sel}


def _counts(x: torch.Tensor, vocab: int) -> "object":
    """Sparse bag-of-words counts of padded token ids (ids 0 = padding and 1 = unknown dropped)."""
    from scipy.sparse import csr_matrix

    rows, cols = torch.nonzero(x > 1, as_tuple=True)
    data = np.ones(len(rows), dtype=np.float64)
    return csr_matrix((data, (rows.numpy(), x[rows, cols].numpy())), shape=(len(x), vocab))


def tfidf_linear(x_tr: torch.Tensor, y_tr: torch.Tensor, x_va: torch.Tensor, y_va: torch.Tensor,
                 x_te: torch.Tensor, y_te: torch.Tensor, vocab: int) -> dict:
    """TF-IDF (sublinear tf, fitted on train) + multinomial logistic regression; C on validation."""
    from sklearn.feature_extraction.text import TfidfTransformer
    from sklearn.linear_model import LogisticRegression

    tfidf = TfidfTransformer(sublinear_tf=True).fit(_counts(x_tr, vocab))
    xtr, xva, xte = (tfidf.transform(_counts(x, vocab)) for x in (x_tr, x_va, x_te))

    def fit(c: float):
        return LogisticRegression(C=c * 100, max_iter=500).fit(xtr, y_tr.numpy())

    model, sel = _pick_on_validation(fit, C_GRID, lambda m: m.score(xva, y_va.numpy()))
    sel["candidates"] = [c * 100 for c in sel["candidates"]]
    sel["pick"] *= 100
    return {"metric": float(model.score(xte, y_te.numpy())), "selection": sel}


class KneserNeyBigram:
    """Interpolated Kneser-Ney bigram model with absolute discount ``d``:
    P(w|v) = max(c(v,w) - d, 0)/c(v) + d N1+(v,.)/c(v) * P_cont(w), with the continuation
    probability P_cont(w) = N1+(.,w)/N1+(.,.) interpolated with a uniform floor 1/V so that
    every word of the vocabulary has a probability. A history never seen uses P_cont alone."""

    def __init__(self, tokens: Sequence[int], vocab: int, discount: float = 0.75) -> None:
        if not 0 < discount < 1:
            raise ValueError(f"discount must be in (0, 1), got {discount!r}")
        self.vocab, self.d = vocab, discount
        self.bigrams = Counter(zip(tokens[:-1], tokens[1:]))
        self.history = Counter(tokens[:-1])
        self.followers = Counter(v for v, _ in self.bigrams)
        cont = Counter(w for _, w in self.bigrams)
        total = len(self.bigrams)
        lam = discount * len(cont) / total  # weight left for the uniform floor
        self.cont = {w: (max(c - discount, 0.0) / total) for w, c in cont.items()}
        self.floor = lam / vocab

    def p_cont(self, w: int) -> float:
        return self.cont.get(w, 0.0) + self.floor

    def prob(self, v: int, w: int) -> float:
        c_v = self.history.get(v, 0)
        if c_v == 0:
            return self.p_cont(w)
        c_vw = self.bigrams.get((v, w), 0)
        return max(c_vw - self.d, 0.0) / c_v + self.d * self.followers[v] / c_v * self.p_cont(w)

    def perplexity(self, tokens: Sequence[int]) -> float:
        nll = -sum(math.log(self.prob(v, w)) for v, w in zip(tokens[:-1], tokens[1:]))
        return math.exp(nll / (len(tokens) - 1))


def kneser_ney_bigram(train: Sequence[int], valid: Sequence[int], test: Sequence[int], vocab: int) -> dict:
    """Perplexity of the interpolated Kneser-Ney bigram on the test tokens; discount on validation."""
    grid = (0.5, 0.75, 0.9)
    models = {d: KneserNeyBigram(train, vocab, d) for d in grid}
    ppl = {d: models[d].perplexity(valid) for d in grid}
    best = min(ppl, key=ppl.get)
    return {"metric": models[best].perplexity(test),
            "selection": {"candidates": list(grid), "validation": [ppl[d] for d in grid], "pick": best}}


def nearest_sources(train: Sequence[torch.Tensor], queries: Sequence[torch.Tensor]) -> list[int]:
    """For each query sentence (token ids), the index of the training sentence nearest to it by
    cosine similarity of TF-IDF vectors (sublinear tf, fitted on train): the look-up of a
    translation memory, whose output is that training sentence's translation."""
    from sklearn.feature_extraction.text import TfidfVectorizer

    def doc(ids: torch.Tensor) -> str:
        return " ".join(map(str, ids.tolist()))

    vec = TfidfVectorizer(token_pattern=r"\S+", sublinear_tf=True, lowercase=False)
    bank = vec.fit_transform([doc(s) for s in train])
    return np.asarray((vec.transform([doc(q) for q in queries]) @ bank.T).argmax(axis=1)).ravel().tolist()
