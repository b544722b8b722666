"""Strength of ``evaluate_robustness`` against fixed-step projected ascent (MultiStepCorruption)
with 10 and 50 steps, and 50 steps with 5 restarts, on a digits MLP and (when the data is
installed) a small Fashion-MNIST CNN trained for one epoch on a subset. Every attack searches on
the same attack set; the worst loss there is what each maximizes, the accuracy is measured on a
held-out set.

    PYTHONPATH=src python benchmarks/evaluation_strength.py [--out benchmarks/evaluation-strength]
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np
import torch
from torch import nn

import parashield as ps

FASHION = "/usr/share/datasets/fashion-mnist"


def ce(model: nn.Module, batch) -> torch.Tensor:
    x, y = batch
    return nn.functional.cross_entropy(model(x), y)


def accuracy(batch):
    def metric(model: nn.Module) -> float:
        with torch.no_grad():
            return float((model(batch[0]).argmax(1) == batch[1]).float().mean())

    return metric


def train(model: nn.Module, batches, epochs: int, lr: float) -> nn.Module:
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    for _ in range(epochs):
        for batch in batches:
            opt.zero_grad()
            ce(model, batch).backward()
            opt.step()
    for p in model.parameters():
        p.grad = None
    return model.eval()


def digits_task():
    from sklearn.datasets import load_digits

    X, y = load_digits(return_X_y=True)
    order = np.random.default_rng(0).permutation(len(X))
    X = torch.tensor(X[order] / 16.0, dtype=torch.float32)
    y = torch.tensor(y[order], dtype=torch.long)
    torch.manual_seed(0)
    model = train(nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10)), [(X[:1200], y[:1200])], 150, 1e-2)
    return model, (X[1200:1500], y[1200:1500]), (X[1500:], y[1500:])


def fashion_task():
    from parashield.reproduce.datasets.fashion import load_fashion_mnist

    data = load_fashion_mnist(FASHION, limit_train=10000, limit_test=1512)
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 8, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(8, 16, 3), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(16 * 5 * 5, 10),
    )
    batches = list(zip(data.x_train.split(100), data.y_train.split(100)))
    train(model, batches, 1, 2e-3)
    return model, (data.x_test[:512], data.y_test[:512]), (data.x_test[512:], data.y_test[512:])


BUDGETS = [
    ps.Budget("l2", 0.05, scale="layer"), ps.Budget("l2", 0.02, scale="layer"), ps.Budget("l2", 1.0),
    ps.Budget("linf", 0.05, scale="element"), ps.Budget("linf", 0.02, scale="layer"), ps.Budget("linf", 0.3, scale="layer"),
    ps.Budget("l1", 2.0), ps.Budget("l2", 1.0, sparsity=20),
]


def rows(name: str, model: nn.Module, attack, heldout):
    obj = ps.Objective(model, ce, attack)
    metric = accuracy(heldout)
    out = []
    for budget in BUDGETS:
        row = {"task": name, "budget": f"{budget.norm} eps={budget.eps:g} scale={budget.scale} sparsity={budget.sparsity}"}
        for label, attack_ in [("pgd10", ps.MultiStepCorruption(budget, steps=10)),
                               ("pgd50", ps.MultiStepCorruption(budget, steps=50)),
                               ("pgd50x5", ps.MultiStepCorruption(budget, steps=50, restarts=5))]:
            t = time.perf_counter()
            res = attack_(obj)
            with ps.corrupted(model, res):
                acc = metric(model)
            row[label] = {"loss": res.loss_after, "acc": acc, "passes": res.passes, "s": time.perf_counter() - t}
        t = time.perf_counter()
        ev = ps.evaluate_robustness(obj, budget, classification=True, metric=metric).results[0]
        row["evaluate"] = {"loss": ev.loss_after, "acc": ev.metric_after, "passes": ev.passes,
                           "s": time.perf_counter() - t, "member": ev.member}
        row["clean"] = {"loss": ev.loss_before, "acc": ev.metric_before}
        out.append(row)
        print(format_row(row), flush=True)
    return out


def format_row(r: dict) -> str:
    cells = " | ".join(f"{r[k]['loss']:.4g} / {r[k]['acc']:.3f} ({r[k]['passes']})"
                       for k in ("pgd10", "pgd50", "pgd50x5", "evaluate"))
    return f"| {r['task']} | {r['budget']} | {r['clean']['loss']:.3g} / {r['clean']['acc']:.3f} | {cells} | {r['evaluate']['member']} |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="benchmarks/evaluation-strength")
    args = parser.parse_args()
    torch.set_num_threads(1)
    header = ("| task | budget | clean loss / acc | pgd-10 | pgd-50 | pgd-50 x 5 restarts | evaluate_robustness | "
              "found by |\n|---|---|---|---|---|---|---|---|")
    print(header)
    results = rows("digits-mlp", *digits_task())
    if os.path.isdir(FASHION):
        results += rows("fashion-cnn", *fashion_task())
    with open(args.out + ".json", "w") as f:
        json.dump(results, f, indent=1)
    with open(args.out + ".md", "w") as f:
        f.write("Cells: worst loss on the attack set / held-out accuracy (passes).\n\n" + header + "\n")
        f.write("\n".join(format_row(r) for r in results) + "\n")


if __name__ == "__main__":
    main()
