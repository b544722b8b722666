"""What each loss change indicator and curvature measure costs, on the benchmark suite's small CNN.

Each call runs once, after a warm-up; one gradient pass is the median of five; the table gives seconds and the same time in
units of one gradient pass (forward + backward over the objective's data), the number that
carries over to other models and machines.

    python benchmarks/indicator_costs.py --threads 1            # CPU
    python benchmarks/indicator_costs.py --device cuda
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

import parashield as ps

sys.path.insert(0, str(Path(__file__).parent))
from run import SmallCNN, _sync  # noqa: E402  (the suite's model, so the numbers compare)


def loss_fn(model: torch.nn.Module, batch) -> torch.Tensor:
    x, y = batch
    return F.cross_entropy(model(x), y)


def timed(fn: Callable[[], object], device: torch.device) -> tuple[float, object]:
    _sync(device)
    t0 = time.perf_counter()
    value = fn()
    _sync(device)
    return time.perf_counter() - t0, value


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--examples", type=int, default=128, help="examples in the objective's one batch")
    p.add_argument("--out", default=None, help="JSON file (default: print only)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    model = SmallCNN().to(device)
    x = torch.randn(args.examples, 1, 28, 28, generator=gen).to(device)
    y = torch.randint(0, 10, (args.examples,), generator=gen).to(device)
    objective = ps.Objective(model, loss_fn, (x, y))
    budget = ps.Budget("l2", 0.05, scale="layer")
    dense_l2 = ps.Budget("l2", 0.05)

    def gradient():
        with objective.probe() as pr:
            return pr.gradient()[0]

    gradient()  # warm-up
    unit = statistics.median(timed(gradient, device)[0] for _ in range(5))
    calls = [
        ("first_order", lambda: ps.loss_change(objective, budget, "first_order")),
        ("one_step", lambda: ps.loss_change(objective, budget, "one_step")),
        ("random (10 trials)", lambda: ps.loss_change(objective, budget, "random", trials=10)),
        ("multi_step (10 steps)", lambda: ps.loss_change(objective, budget, "multi_step", steps=10)),
        ("second_order, dense L2 (50 Lanczos)", lambda: ps.loss_change(objective, dense_l2, "second_order")),
        ("second_order, layer L2 (50 ascent steps x 2)", lambda: ps.loss_change(objective, budget, "second_order")),
        ("layer_vulnerability, first_order", lambda: ps.layer_vulnerability(objective, budget)),
        ("hessian_top_eigenvalue (Lanczos to tol 1e-6)", lambda: ps.hessian_top_eigenvalue(objective)),
        ("hessian_trace (100 samples)", lambda: ps.hessian_trace(objective)),
    ]
    rows = []
    for name, fn in calls:
        seconds, _ = timed(fn, device)
        rows.append({"call": name, "seconds": seconds, "gradient_passes": seconds / unit})
        print(f"{name}: {seconds:.3f} s", flush=True)
    params = sum(p.numel() for p in model.parameters())
    print(f"\nsmall CNN, {params} parameters, {args.examples} examples of 1x28x28, {device}, "
          f"{torch.get_num_threads()} thread(s); one gradient pass = {unit * 1000:.1f} ms\n")
    print("| call | seconds | in gradient passes |")
    print("|---|---|---|")
    for r in rows:
        print(f"| {r['call']} | {r['seconds']:.2f} | {r['gradient_passes']:.0f} |")
    if args.out:
        Path(args.out).write_text(json.dumps({
            "device": str(device), "threads": torch.get_num_threads(), "torch": torch.__version__,
            "python": platform.python_version(), "params": params, "examples": args.examples,
            "gradient_seconds": unit, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
