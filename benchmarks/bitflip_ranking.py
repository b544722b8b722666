"""What the progressive bit search's pre-filter saves on a large layer.

A 2048 x 2048 linear layer (4.2M int8 weights, one scale per output channel) under a
cross-entropy loss on 64 examples. Two timings, each the median of ``--repeats`` runs after a
warm-up: the ranking of one round (first-order gains of every allowed bit of the candidate
weights, and the best single flips), and a whole one-flip search (loss, gradient, ranking, one
candidate's loss), without the pre-filter and with ``prefilter=m``.

    python benchmarks/bitflip_ranking.py --threads 1
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import parashield as ps
from parashield.bitflip import ProgressiveBitSearch, _Target


def median_seconds(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=2048)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", type=Path, default=None, help="write the rows as JSON here")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(args.width, args.width), nn.ReLU(), nn.Linear(args.width, 10))
    x, y = torch.randn(64, args.width), torch.randint(0, 10, (64,))
    q = ps.quantize_(model, params="0.weight")
    objective = ps.Objective(model, lambda m, b: F.cross_entropy(m(b[0]), b[1]), (x, y))
    target = _Target(objective, q, None)
    _, (grad,) = objective.restrict(q.params).gradient()
    rows = []
    for m in (None, 100_000, 1_000, 10):
        search = ProgressiveBitSearch(q, max_flips=1, prefilter=m)
        ranking = median_seconds(lambda: search._singles(target, 0, grad, q.codes[0]), args.repeats)
        whole = median_seconds(lambda: search(objective), args.repeats)
        flip = search(objective).flips[0]
        rows.append({"prefilter": m, "ranking_s": ranking, "search_s": whole, "flip": list(flip)})
        print(f"prefilter={m!s:>7}  ranking {ranking * 1e3:8.1f} ms  one-flip search {whole * 1e3:8.1f} ms  flip {flip}")
    print(f"{q.codes[0].numel()} weights, torch {torch.__version__}, {torch.get_num_threads()} threads")
    if args.out:
        args.out.write_text(json.dumps({"weights": q.codes[0].numel(), "threads": torch.get_num_threads(),
                                        "torch": torch.__version__, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
