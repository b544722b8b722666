"""Statistics of the reproduction's verdicts: per-seed paired differences with a 95% interval and
p-values, Spearman rank correlation with an interval, and the three-way call "better / worse / tie"
that every finding uses (a difference counts only when its interval excludes zero)."""

from __future__ import annotations

import itertools
import math
from dataclasses import asdict, dataclass
from typing import Sequence

from scipy import stats as _scipy

#: confidence level of every interval in the report
LEVEL = 0.95
#: fewest pairs on which a difference can be called
MIN_PAIRS = 3
#: the call of a comparison with fewer than MIN_PAIRS pairs: neither a win nor a loss
TOO_FEW = "too few pairs"
#: the exact sign-flip test enumerates 2**n patterns up to this n, and samples them above it
EXACT_SIGN_FLIPS = 20


@dataclass(frozen=True)
class Paired:
    """Paired comparison of two methods over the same seeds: ``diff = a - b`` per seed."""

    n: int
    mean: float
    low: float
    high: float
    p_t: float  #: two-sided paired t-test
    p_perm: float  #: two-sided sign-flip permutation test (exact up to 20 pairs, sampled above)

    @property
    def call(self) -> str:
        """``"better"`` when the interval lies above 0, ``"worse"`` below, else ``"tie"``;
        ``"too few pairs"`` below :data:`MIN_PAIRS` pairs (two equal differences give a
        zero-width interval that says nothing), which decides nothing either way."""
        if self.n < MIN_PAIRS:
            return TOO_FEW
        if not math.isfinite(self.low) or not math.isfinite(self.high):
            return "tie"
        return "better" if self.low > 0 else "worse" if self.high < 0 else "tie"

    def as_dict(self) -> dict:
        return {**asdict(self), "call": self.call}


def paired(a: Sequence[float], b: Sequence[float]) -> Paired:
    """Mean of ``a[i] - b[i]``, its t-based 95% interval, the paired t-test p-value and the exact
    sign-flip permutation p-value. Pairs with a non-finite member are dropped (an overflowed
    perplexity cannot be differenced); fewer than two pairs give an infinite interval."""
    if len(a) != len(b):
        raise ValueError(f"paired samples need equal lengths, got {len(a)} and {len(b)}")
    d = [float(x) - float(y) for x, y in zip(a, b) if math.isfinite(float(x)) and math.isfinite(float(y))]
    n = len(d)
    if n == 0:
        return Paired(0, math.nan, -math.inf, math.inf, math.nan, math.nan)
    mean = sum(d) / n
    if n < 2:
        return Paired(n, mean, -math.inf, math.inf, math.nan, math.nan)
    sd = math.sqrt(sum((x - mean) ** 2 for x in d) / (n - 1))
    se = sd / math.sqrt(n)
    half = _scipy.t.ppf(0.5 + LEVEL / 2, n - 1) * se
    if se == 0.0:
        p_t = 1.0 if mean == 0.0 else 0.0
    else:
        p_t = float(2 * _scipy.t.sf(abs(mean / se), n - 1))
    return Paired(n, mean, mean - half, mean + half, p_t, sign_flip_p(d))


def sign_flip_p(d: Sequence[float], samples: int = 100_000) -> float:
    """Two-sided permutation p-value of ``mean(d) = 0`` under sign symmetry: the share of sign
    patterns whose |sum| is at least the observed one; exact (all 2**n patterns) for n <= 20,
    else estimated from ``samples`` seeded random patterns as (hits + 1) / (samples + 1)."""
    observed = abs(sum(d)) - 1e-12 * (1 + sum(abs(x) for x in d))
    if len(d) <= EXACT_SIGN_FLIPS:
        hits = sum(abs(sum(s * x for s, x in zip(signs, d))) >= observed
                   for signs in itertools.product((1, -1), repeat=len(d)))
        return hits / 2 ** len(d)
    import numpy as np

    signs = np.random.default_rng(0).choice((-1.0, 1.0), size=(samples, len(d)))
    hits = int((np.abs(signs @ np.asarray(d, dtype=float)) >= observed).sum())
    return (hits + 1) / (samples + 1)


#: up to this many pairs Spearman's p is exact (all n! orderings), above it the t approximation
EXACT_SPEARMAN = 8


@dataclass(frozen=True)
class Rank:
    """Spearman rank correlation with a Fisher-z 95% interval (standard error 1.06/sqrt(n-3)). Up
    to 8 pairs the call follows the exact permutation p instead (the interval, an approximation,
    is shown but does not decide; at |rho| = 1 it does not exist and is NaN)."""

    n: int
    rho: float
    low: float
    high: float
    p: float  #: two-sided: exact permutation p for n <= 8, else the t approximation (as scipy.stats.spearmanr)

    @property
    def call(self) -> str:
        """``"agrees"`` (interval above 0), ``"backwards"`` (below 0) or ``"undecided"``; up to 8
        pairs by the exact p below 0.05 and the sign of rho."""
        if self.n <= EXACT_SPEARMAN:
            if math.isnan(self.p) or self.p >= 1 - LEVEL:
                return "undecided"
            return "agrees" if self.rho > 0 else "backwards"
        if not (math.isfinite(self.low) and math.isfinite(self.high)):
            return "undecided"
        return "agrees" if self.low > 0 else "backwards" if self.high < 0 else "undecided"

    def as_dict(self) -> dict:
        return {**asdict(self), "call": self.call}


def ranks(x: Sequence[float]) -> list[float]:
    """1-based ranks, ties given their average rank."""
    order = sorted(range(len(x)), key=lambda i: x[i])
    out = [0.0] * len(x)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and x[order[j + 1]] == x[order[i]]:
            j += 1
        for k in range(i, j + 1):
            out[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return out


def spearman(x: Sequence[float], y: Sequence[float]) -> Rank:
    """Spearman's rho of paired observations (pairs with a non-finite member dropped)."""
    pairs = [(float(a), float(b)) for a, b in zip(x, y) if math.isfinite(float(a)) and math.isfinite(float(b))]
    n = len(pairs)
    if n < 3:
        return Rank(n, math.nan, -math.inf, math.inf, math.nan)
    rx, ry = ranks([p[0] for p in pairs]), ranks([p[1] for p in pairs])
    mx, my = sum(rx) / n, sum(ry) / n
    sxy = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    sxx, syy = sum((a - mx) ** 2 for a in rx), sum((b - my) ** 2 for b in ry)
    if sxx == 0 or syy == 0:  # a constant variable has no ranking
        return Rank(n, math.nan, -math.inf, math.inf, math.nan)
    rho = max(-1.0, min(1.0, sxy / math.sqrt(sxx * syy)))
    if n <= EXACT_SPEARMAN:
        p = _exact_spearman_p(rx, ry, sxy)
    elif abs(rho) == 1.0:
        p = 0.0
    else:
        t = rho * math.sqrt((n - 2) / (1 - rho * rho))
        p = float(2 * _scipy.t.sf(abs(t), n - 2))
    if n <= 3:
        return Rank(n, rho, -math.inf, math.inf, p)
    if abs(rho) == 1.0:
        return Rank(n, rho, math.nan, math.nan, p)
    z, half = math.atanh(rho), _scipy.norm.ppf(0.5 + LEVEL / 2) * 1.06 / math.sqrt(n - 3)
    return Rank(n, rho, math.tanh(z - half), math.tanh(z + half), p)


def _exact_spearman_p(rx: list[float], ry: list[float], sxy: float) -> float:
    """Two-sided exact p of Spearman's rho: the share of the n! orderings of ``ry`` whose
    centred rank covariance with ``rx`` is at least as far from 0 as the observed ``sxy``."""
    n = len(rx)
    mx, my = sum(rx) / n, sum(ry) / n
    cx = [a - mx for a in rx]
    observed = abs(sxy) - 1e-9
    hits = total = 0
    for perm in itertools.permutations([b - my for b in ry]):
        total += 1
        hits += abs(sum(a * b for a, b in zip(cx, perm))) >= observed
    return hits / total
