"""APD under DistributedDataParallel: 2 processes, gloo backend, CPU, spawned by the test.

(a) the default ``distributed="local"`` mode: every rank builds its corruption from its local
    gradients, one all-reduce per step in total, identical parameters on all ranks, and the update
    equals the mean over ranks of each rank's local APD gradient;
(b) ``distributed="sync"``: equals single-process APD on the union of the ranks' batches.
"""

from __future__ import annotations

import socket
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import _ddp_worker as W

WORLD = 2


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ddp_results(tmp_path_factory):
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    out = tmp_path_factory.mktemp("ddp")
    ctx = mp.start_processes(W.run, args=(WORLD, _free_port(), str(out)), nprocs=WORLD, join=False,
                             start_method="spawn")
    deadline = time.monotonic() + 120
    while not ctx.join(timeout=2):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail("DDP workers did not finish within 120 s")
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]


def _single_process_local_reference():
    """Mean over ranks of each rank's own APD gradient (no communication in the passes)."""
    model = W.make_model()
    for step in range(W.STEPS):
        grads = []
        for rank in range(WORLD):
            replica = W.make_model()
            replica.load_state_dict(model.state_dict())
            opt = W.make_optimizer(replica.parameters())
            x, y = W.rank_batch(rank, step)
            for _ in opt.trajectory():
                ((replica(x) - y) ** 2).mean().backward()
            grads.append([p.grad.clone() for p in replica.parameters()])
        with torch.no_grad():
            for i, p in enumerate(model.parameters()):
                p.sub_(W.LR * sum(g[i] for g in grads) / WORLD)
    return [p.detach() for p in model.parameters()]


def _single_process_union_reference():
    model = W.make_model()
    opt = W.make_optimizer(model.parameters())
    for step in range(W.STEPS):
        xs, ys = zip(*(W.rank_batch(rank, step) for rank in range(WORLD)))
        x, y = torch.cat(xs), torch.cat(ys)

        def closure():
            opt.zero_grad()
            loss = ((model(x) - y) ** 2).mean()
            loss.backward()
            return loss

        opt.step(closure)
    return [p.detach() for p in model.parameters()]


def test_ddp_local_mode_one_all_reduce_per_step_and_identical_ranks(ddp_results):
    r0, r1 = (r["local"] for r in ddp_results)
    for p0, p1 in zip(r0["params"], r1["params"]):
        assert torch.equal(p0, p1)
    # per step: no bucket all-reduce during the K+1 passes, one explicit all-reduce of the average
    for r in (r0, r1):
        assert r["per_step"] == [(0, 1)] * W.STEPS, r["per_step"]
        assert all(h + e == 1 for h, e in r["per_step"])
    ref = _single_process_local_reference()
    for p, q in zip(r0["params"], ref):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-9)


def test_ddp_sync_mode_matches_single_process_on_union(ddp_results):
    r0, r1 = (r["sync"] for r in ddp_results)
    for p0, p1 in zip(r0["params"], r1["params"]):
        assert torch.equal(p0, p1)
    for r in (r0, r1):  # DDP averages every pass; APD adds no all-reduce of its own
        assert r["per_step"] == [(W.K + 1, 0)] * W.STEPS, r["per_step"]
    ref = _single_process_union_reference()
    for p, q in zip(r0["params"], ref):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-6)
    # the two modes are different algorithms: the comparison above can fail
    local = ddp_results[0]["local"]["params"]
    assert max(float((a - b).abs().max()) for a, b in zip(local, r0["params"])) > 1e-6
