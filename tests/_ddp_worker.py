"""Worker for test_defense_ddp.py: run in spawned processes (gloo, CPU), one per rank.

Trains a small float64 MLP with APD under DistributedDataParallel, in the default
``distributed="local"`` mode and in ``"sync"`` mode, each rank on its own batches, counting
all-reduces per step (bucket all-reduces through a DDP comm hook, explicit calls by wrapping
``torch.distributed.all_reduce``), and saves the final parameters and counts to ``out_dir``.
"""

from __future__ import annotations

import os
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

import parashield as ps

K = 2
STEPS = 3
LR = 0.1
EPS = 0.3


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3)).double()


def rank_batch(rank: int, step: int, n: int = 8):
    g = torch.Generator().manual_seed(100 * step + rank)
    return torch.randn(n, 5, generator=g, dtype=torch.float64), torch.randn(n, 3, generator=g, dtype=torch.float64)


def make_optimizer(params, **kw):
    return ps.APD(params, torch.optim.SGD, budget=ps.Budget("l2", EPS), steps=K, lr=LR, **kw)


def _train(mode: str, rank: int, world: int) -> dict:
    model = make_model()
    if rank == 1:  # DDP must broadcast rank 0's parameters at construction
        with torch.no_grad():
            for p in model.parameters():
                p.add_(1.0)
    ddp = DDP(model)
    counts = {"hook": 0, "explicit": 0}
    original = dist.all_reduce

    def hook(state, bucket):
        counts["hook"] += 1
        buf = bucket.buffer().div_(world)
        return original(buf, async_op=True).get_future().then(lambda fut: fut.value()[0])

    def counting_all_reduce(*args, **kwargs):
        counts["explicit"] += 1
        return original(*args, **kwargs)

    ddp.register_comm_hook(None, hook)
    dist.all_reduce = counting_all_reduce
    try:
        opt = make_optimizer(ddp.parameters(), distributed=mode, model=ddp)
        per_step = []
        for step in range(STEPS):
            before = dict(counts)
            x, y = rank_batch(rank, step)

            def closure():
                opt.zero_grad()
                loss = ((ddp(x) - y) ** 2).mean()
                loss.backward()
                return loss

            opt.step(closure)
            per_step.append((counts["hook"] - before["hook"], counts["explicit"] - before["explicit"]))
    finally:
        dist.all_reduce = original
    return {"params": [p.detach().clone() for p in model.parameters()], "per_step": per_step}


def run(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=60))
    try:
        result = {mode: _train(mode, rank, world) for mode in ("local", "sync")}
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()
