"""FSDP2 (``fully_shard``, DTensor parameters) is refused with an error saying what to use
instead, before any parameter moves: the defenses' and corruptions' norms, top-n supports and
layer radii would otherwise be taken per shard. Run in a fresh process (gloo, CPU, world of 1:
the parameters are DTensors all the same)."""

import subprocess
import sys
import textwrap

import pytest
import torch.distributed as dist

CODE = textwrap.dedent('''
    import os, socket
    import torch, torch.distributed as dist
    from torch import nn
    from torch.distributed.fsdp import fully_shard
    import parashield as ps

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1")
    dist.init_process_group("gloo")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3))
    for layer in (model[0], model[2], model):
        fully_shard(layer)
    w = [p.full_tensor().clone() for p in model.parameters()]
    x, y = torch.randn(4, 5), torch.randn(4, 3)
    loss_fn = lambda m, b: ((m(b[0]) - b[1]) ** 2).mean()
    calls = []

    def closure():
        calls.append(1)
        loss = loss_fn(model, (x, y))
        loss.backward()
        return loss

    attempts = {
        "sam": lambda: ps.SAM(model.parameters(), torch.optim.SGD, lr=0.1).step(closure),
        "apd": lambda: ps.APD(model.parameters(), torch.optim.SGD, lr=0.1).step(closure),
        "multi_step": lambda: ps.MultiStepCorruption(ps.Budget("l2", 0.1))(ps.Objective(model, loss_fn, (x, y))),
        "corrupted": lambda: ps.corrupted(model, {"0.weight": torch.zeros(8, 5)}).__enter__(),
    }
    for name, attempt in attempts.items():
        try:
            attempt()
            print(name, "ran")
        except NotImplementedError as e:
            print(name, "refused", "DistributedDataParallel" in str(e) and "full_state_dict" in str(e))
    print("closure calls", len(calls))
    print("unchanged", all(torch.equal(p.full_tensor(), c) for p, c in zip(model.parameters(), w)))
    dist.destroy_process_group()
''')


def test_fsdp2_sharded_parameters_are_refused_before_anything_moves():
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    out = subprocess.run([sys.executable, "-c", CODE], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.strip().splitlines()
    assert lines == ["sam refused True", "apd refused True", "multi_step refused True", "corrupted refused True",
                     "closure calls 0", "unchanged True"]
