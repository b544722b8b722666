"""parashield benchmark suite: overheads as ratios against the plain forward/backward.

Every comparison runs A and B interleaved in one process (warm-up first, alternating order each
round) and reports the median of the per-round ratios A/B, never an absolute time as a verdict.

    python benchmarks/run.py                 # CPU, writes benchmarks/results-cpu.json
    python benchmarks/run.py --device cuda   # same suite on a GPU
    python benchmarks/run.py --quick         # fewer rounds (smoke test)
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

import parashield as ps


# ------------------------------------------------------------------------------------ timing
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time(fn: Callable[[], object], device: torch.device) -> float:
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - t0


def ratio(a: Callable[[], object], b: Callable[[], object], device: torch.device, rounds: int, warmup: int = 2) -> dict:
    """Median over interleaved rounds of time(a) / time(b)."""
    for _ in range(warmup):
        a()
        b()
    ratios, ta, tb = [], [], []
    for r in range(rounds):
        if r % 2:
            x, y = _time(b, device), _time(a, device)
            x, y = y, x
        else:
            x, y = _time(a, device), _time(b, device)
        ta.append(x)
        tb.append(y)
        ratios.append(x / y)
    return {"ratio": statistics.median(ratios), "a_median_s": statistics.median(ta), "b_median_s": statistics.median(tb),
            "rounds": rounds}


# ------------------------------------------------------------------------------------ models
class SmallCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(1, 32, 3), nn.Conv2d(32, 64, 3)
        self.f1, self.f2 = nn.Linear(64 * 12 * 12, 128), nn.Linear(128, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.c2(F.relu(self.c1(x)))), 2)
        return self.f2(F.relu(self.f1(x.flatten(1))))


class ResidualBlock(nn.Module):
    """Pre-norm residual MLP block: x + W2 relu(W1 LN(x)); six parameter tensors."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.norm, self.f1, self.f2 = nn.LayerNorm(width), nn.Linear(width, width), nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.f2(F.relu(self.f1(self.norm(x))))


def residual_mlp(blocks: int, width: int, d_in: int = 64, classes: int = 10) -> nn.Module:
    """A deep network of many small tensors that trains (and has gradients of normal size: a plain
    60-layer MLP's first-layer gradients are ~1e-26, denormal floats whose arithmetic is ~50x
    slower on x86 CPUs, so every elementwise op on them measures the CPU's denormal microcode,
    not the code)."""
    return nn.Sequential(nn.Linear(d_in, width), *[ResidualBlock(width) for _ in range(blocks)],
                         nn.LayerNorm(width), nn.Linear(width, classes))


def deep_mlp(depth: int, width: int, d_in: int = 64, classes: int = 10) -> nn.Module:
    layers: list[nn.Module] = [nn.Linear(d_in, width), nn.ReLU()]
    for _ in range(depth - 2):
        layers += [nn.Linear(width, width), nn.ReLU()]
    layers.append(nn.Linear(width, classes))
    return nn.Sequential(*layers)


def numel(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def setup(model: nn.Module, x: torch.Tensor, device: torch.device):
    model = model.to(device)
    x = x.to(device)
    y = torch.randint(0, 10, (x.shape[0],), generator=torch.Generator().manual_seed(1)).to(device)
    return model, x, y


# ------------------------------------------------------------------------------------ reference SAM
class ReferenceSAM(torch.optim.Optimizer):
    """SAM as the popular single-file port does it: per-tensor loops, a clone of each parameter per
    step, ``p.data`` rebinding."""

    def __init__(self, params, base_optimizer, rho=0.05, **kwargs):
        super().__init__(params, dict(rho=rho, **kwargs))
        self.base_optimizer = base_optimizer(self.param_groups, **kwargs)
        self.param_groups = self.base_optimizer.param_groups

    @torch.no_grad()
    def first_step(self):
        grad_norm = torch.norm(torch.stack([p.grad.norm(p=2) for g in self.param_groups for p in g["params"] if p.grad is not None]), p=2)
        for group in self.param_groups:
            scale = group["rho"] / (grad_norm + 1e-12)
            for p in group["params"]:
                if p.grad is None:
                    continue
                self.state[p]["old_p"] = p.data.clone()
                p.add_(p.grad * scale.to(p))
        self.zero_grad()

    @torch.no_grad()
    def second_step(self):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                p.data = self.state[p]["old_p"]
        self.base_optimizer.step()
        self.zero_grad()


# ------------------------------------------------------------------------------------ benchmarks
def closure_of(model, x, y, opt):
    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss

    return closure


def bench_apd(model, x, y, device, rounds, steps=3, sam=False) -> dict:
    """A defense step / its passes plus one base step (plain SGD with momentum): APD with K =
    ``steps`` (K + 1 passes), or SAM (2 passes)."""
    torch.manual_seed(0)
    if sam:
        opt = ps.SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=1e-4, momentum=0.9)
    else:
        opt = ps.APD(model.parameters(), torch.optim.SGD, budget=ps.Budget("l2", 0.05), steps=steps, lr=1e-4,
                     momentum=0.9)
    base = torch.optim.SGD(model.parameters(), lr=1e-4, momentum=0.9)
    ca, cb = closure_of(model, x, y, opt), closure_of(model, x, y, base)
    passes = 2 if sam else steps + 1

    def plain():
        for _ in range(passes):
            cb()
        base.step()
        base.zero_grad()  # the defense refuses to start over another optimizer's gradients

    out = ratio(lambda: opt.step(ca), plain, device, rounds)
    out.update(params=numel(model), tensors=len(list(model.parameters())), passes=passes)
    if not sam:
        out["K"] = steps
    return out


def bench_sam(model, x, y, device, rounds) -> dict:
    import copy

    m2 = copy.deepcopy(model)
    sam = ps.SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=1e-3)
    ref = ReferenceSAM(m2.parameters(), torch.optim.SGD, rho=0.05, lr=1e-3)
    ca, cr = closure_of(model, x, y, sam), closure_of(m2, x, y, ref)

    def ref_step():
        cr()
        ref.first_step()
        cr()
        ref.second_step()

    # Same result first (a few steps from identical weights), then the timing.
    for _ in range(3):
        sam.step(ca)
        ref_step()
    diff = max(float((a - b).detach().abs().max()) for a, b in zip(model.parameters(), m2.parameters()))
    out = ratio(lambda: sam.step(ca), ref_step, device, rounds)
    out.update(max_param_difference_after_3_steps=diff, params=numel(model), tensors=len(list(model.parameters())))
    return out


def bench_multistep(model, x, y, device, rounds, steps=10) -> dict:
    loss_fn = lambda m, b: F.cross_entropy(m(b[0]), b[1])  # noqa: E731
    obj = ps.Objective(model, loss_fn, (x, y))
    attack = ps.MultiStepCorruption(ps.Budget("l2", 0.05, scale="layer"), steps=steps)

    def passes():
        with obj.probe() as pr:
            for _ in range(steps + 1):
                pr.gradient()

    out = ratio(lambda: attack(obj), passes, device, rounds)
    out.update(params=numel(model), steps=steps)
    return out


def bench_sparse_projection(device, rounds, k_target=10_000_000) -> dict:
    width = int(math.sqrt(k_target / 3))
    model = deep_mlp(5, width, d_in=width)  # 3 hidden width x width layers + in/out: >= 10M
    x = torch.randn(128, width)
    model, x, y = setup(model, x, device)
    params = [p.detach() for p in model.parameters()]
    k = sum(p.numel() for p in params)
    budget = ps.Budget("l2", 1.0, sparsity=k // 100)
    deltas = [torch.randn_like(p) for p in params]

    def project():
        budget.project(deltas, params)

    def fwd_bwd():
        model.zero_grad()
        F.cross_entropy(model(x), y).backward()

    out = ratio(project, fwd_bwd, device, rounds)
    out.update(params=k, sparsity=k // 100)
    return out


def bench_random_trials(device, rounds, trials=32) -> dict:
    torch.manual_seed(0)
    model, x, y = setup(deep_mlp(3, 128), torch.randn(512, 64), device)
    loss_fn = lambda m, b: F.cross_entropy(m(b[0]), b[1])  # noqa: E731
    obj = ps.Objective(model, loss_fn, (x, y))
    budget = ps.Budget("l2", 0.5)
    draw_on = "cpu" if device.type == "cpu" else "device"  # both paths draw the same trials
    batched = ps.RandomCorruption(budget, trials=trials, seed=0, vectorize=True, draw_on=draw_on)
    naive = ps.RandomCorruption(budget, trials=trials, seed=0, vectorize=False, draw_on=draw_on)
    ra, rb = batched(obj), naive(obj)
    diff = max(abs(a - b) for a, b in zip(ra.history, rb.history))
    out = ratio(lambda: naive(obj), lambda: batched(obj), device, rounds)
    out = {"speedup": out["ratio"], **{k: v for k, v in out.items() if k != "ratio"}}
    out.update(trials=trials, max_loss_difference=diff, params=numel(model), draw_on=draw_on)
    return out


def bench_memory(device) -> dict:
    """Persistent APD buffers in parameter-sized units, and (CUDA) the measured peak difference."""
    torch.manual_seed(0)
    model, x, y = setup(deep_mlp(6, 1024), torch.randn(64, 64), device)
    pbytes = sum(p.numel() * p.element_size() for p in model.parameters())
    apd = ps.APD(model.parameters(), torch.optim.SGD, budget=ps.Budget("l2", 0.05), steps=3, lr=1e-4)
    apd.step(closure_of(model, x, y, apd))
    ws = apd._workspace  # gsum ends as the averaged .grad, but holds the partial sum during passes
    held = ws.clean.flats + ws.gsum.flats + ([] if ws.work is None else ws.work.flats)
    persistent = sum(f.numel() * f.element_size() for f in held) / pbytes
    out = {"persistent_buffers_in_param_units": persistent, "params": numel(model)}
    if device.type == "cuda":
        base = torch.optim.SGD(model.parameters(), lr=1e-4)
        cb = closure_of(model, x, y, base)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated()
        for _ in range(4):
            cb()
        base.step()
        plain_peak = torch.cuda.max_memory_allocated() - start
        model.zero_grad(set_to_none=True)
        del apd
        apd = ps.APD(model.parameters(), torch.optim.SGD, budget=ps.Budget("l2", 0.05), steps=3, lr=1e-4)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated()
        apd.step(closure_of(model, x, y, apd))
        apd_peak = torch.cuda.max_memory_allocated() - start
        out["cuda_peak_extra_in_param_units"] = (apd_peak - plain_peak) / pbytes
    return out


PEAK_OPTIMIZERS = {
    "adamw": lambda params: torch.optim.AdamW(params, lr=1e-4),
    "sam": lambda params: ps.SAM(params, torch.optim.AdamW, rho=0.05, lr=1e-4),
    "apd_k3": lambda params: ps.APD(params, torch.optim.AdamW, budget=ps.Budget("l2", 0.05), steps=3, lr=1e-4),
    "sam_released": lambda params: ps.SAM(params, torch.optim.AdamW, rho=0.05, lr=1e-4, release_buffers=True),
    "apd_k3_released": lambda params: ps.APD(params, torch.optim.AdamW, budget=ps.Budget("l2", 0.05), steps=3, lr=1e-4,
                                             release_buffers=True),
    "sam_port": lambda params: ReferenceSAM(params, torch.optim.AdamW, rho=0.05, lr=1e-4),
}


def _status_bytes(field: str) -> int:
    """A memory figure of this process from /proc/self/status (Linux), in bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def _peak_rss_child(name: str, width: int, queue) -> None:
    """In a fresh process: how far the resident set peaks above its level before 3 training
    steps, in bytes (the model and data exist before, every optimizer's state is made during).
    The peak is the address space's high-water mark (VmHWM), reset to the current level first;
    ``ru_maxrss`` would not do, Linux carries it over from the parent across exec."""
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model, x, y = setup(deep_mlp(4, width), torch.randn(32, 64), torch.device("cpu"))
    opt = PEAK_OPTIMIZERS[name](model.parameters())
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the high-water mark to the current resident set
    before = _status_bytes("VmRSS")
    for _ in range(3):
        if isinstance(opt, ps.APD):
            opt.step(closure_of(model, x, y, opt))
        elif isinstance(opt, ReferenceSAM):
            closure_of(model, x, y, opt)()
            opt.first_step()
            closure_of(model, x, y, opt)()
            opt.second_step()
        else:
            closure_of(model, x, y, opt)()
            opt.step()
    queue.put((_status_bytes("VmHWM") - before, sum(p.numel() * p.element_size() for p in model.parameters()),
               numel(model)))


def bench_peak_rss(width: int = 2048) -> dict:
    """Peak memory of the defenses above plain AdamW, in parameter-sized units: each optimizer
    trains the same MLP in its own fresh process (CPU, Linux peak resident set; with glibc's mmap
    threshold fixed, large tensors are mmap'd and returned on free, so the peak follows the live
    tensors)."""
    import multiprocessing as mp

    import os

    ctx = mp.get_context("spawn")
    peaks = {}
    saved = os.environ.get("MALLOC_MMAP_THRESHOLD_")
    os.environ["MALLOC_MMAP_THRESHOLD_"] = str(1 << 16)  # fixed: glibc would raise it to freed sizes
    try:
        for name in PEAK_OPTIMIZERS:
            queue = ctx.Queue()
            proc = ctx.Process(target=_peak_rss_child, args=(name, width, queue))
            proc.start()
            peaks[name], pbytes, count = queue.get()
            proc.join()
    finally:
        if saved is None:
            del os.environ["MALLOC_MMAP_THRESHOLD_"]
        else:
            os.environ["MALLOC_MMAP_THRESHOLD_"] = saved
    out = {"params": count, "peak_growth_adamw_in_param_units": peaks["adamw"] / pbytes}
    for name in PEAK_OPTIMIZERS.keys() - {"adamw"}:
        out[f"{name}_peak_above_adamw_in_param_units"] = (peaks[name] - peaks["adamw"]) / pbytes
    return out


def bench_scaling(device, rounds, large: bool = False) -> list:
    """APD, SAM and multi-step overheads on one residual MLP family, ~10x more parameters per
    row: 13k to 10M, and 100M with ``large`` (~1.3 GB for the model, gradients and buffers)."""
    rows = []
    for width in (32, 100, 320, 1000, *((3162,) if large else ())):
        torch.manual_seed(0)
        model, x, y = setup(residual_mlp(5, width), torch.randn(128, 64), device)
        n = rounds if width < 3162 else 3
        apd = bench_apd(model, x, y, device, n)
        sam = bench_apd(model, x, y, device, n, sam=True)
        ms = bench_multistep(model, x, y, device, max(3, n // 2))
        rows.append({"params": numel(model), "apd_ratio": apd["ratio"], "sam_ratio": sam["ratio"],
                     "multistep_ratio": ms["ratio"]})
        del model, x, y
    return rows


TARGETS = {
    "apd_cnn": ("<=", 1.05), "apd_many_tensors": ("<=", 1.05), "sam_vs_reference": ("<=", 0.90),
    "multistep": ("<=", 1.10), "sparse_projection": ("<=", 0.2), "random_trials": (">=", 3.0),
}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", default=None)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--large", action="store_true", help="scaling up to 100M parameters (minutes more)")
    p.add_argument("--only", default=None, help="comma-separated benchmarks to run (default: all)")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    rounds = 5 if args.quick else 15
    torch.manual_seed(0)
    results: dict = {"device": str(device), "torch": torch.__version__, "python": platform.python_version(),
                     "threads": torch.get_num_threads(), "rounds": rounds}
    if device.type == "cuda":
        results["gpu"] = torch.cuda.get_device_name(device)
    cnn = setup(SmallCNN(), torch.randn(128, 1, 28, 28), device)
    many = setup(residual_mlp(20, 64), torch.randn(128, 64), device)  # 126 tensors
    steps = [
        ("apd_cnn", lambda: bench_apd(*cnn, device, rounds)),
        ("apd_many_tensors", lambda: bench_apd(*many, device, rounds)),
        ("sam_vs_reference", lambda: bench_sam(*many, device, rounds)),
        ("multistep", lambda: bench_multistep(*cnn, device, max(3, rounds // 2))),
        ("sparse_projection", lambda: bench_sparse_projection(device, max(3, rounds // 2))),
        ("random_trials", lambda: bench_random_trials(device, rounds)),
        ("memory", lambda: bench_memory(device)),
        *([("peak_rss", bench_peak_rss)] if device.type == "cpu" and sys.platform == "linux" else []),
        ("scaling", lambda: bench_scaling(device, max(3, rounds // 3), args.large)),
    ]
    if args.only:
        steps = [s for s in steps if s[0] in args.only.split(",")]
    for name, fn in steps:
        t0 = time.perf_counter()
        results[name] = fn()
        results[name + "_seconds"] = time.perf_counter() - t0
        print(f"{name}: {json.dumps(results[name])}", flush=True)
    print()
    print(f"| benchmark ({device}) | measured | target | met |")
    print("|---|---|---|---|")
    for name, (op, target) in TARGETS.items():
        if name not in results:
            continue
        value = results[name]["speedup" if name == "random_trials" else "ratio"]
        met = value <= target if op == "<=" else value >= target
        results[name]["target"] = f"{op} {target}"
        results[name]["met"] = met
        print(f"| {name} | {value:.3f} | {op} {target} | {'yes' if met else 'NO'} |")
    mem = results.get("memory", {})
    for key, label in (("persistent_buffers_in_param_units", "persistent APD buffers"),
                       ("cuda_peak_extra_in_param_units", "CUDA peak extra")):
        if key in mem:  # judged at the printed precision: a few 0-dim tensors are not a buffer
            print(f"| memory: {label} | {mem[key]:.2f} x params | <= 2 | {'yes' if round(mem[key], 2) <= 2 else 'NO'} |")
    if "peak_rss" in results:
        peak = results["peak_rss"]
        for name, label, target in (("sam", "SAM", 1), ("sam_released", "SAM, release_buffers=True", 1),
                                    ("sam_port", "popular-port SAM", None), ("apd_k3", "APD K=3", 2),
                                    ("apd_k3_released", "APD K=3, release_buffers=True", 2)):
            value = peak[f"{name}_peak_above_adamw_in_param_units"]
            met = "" if target is None else ("yes" if round(value, 2) <= target else "NO")
            print(f"| memory: {label} peak above AdamW | {value:.2f} x params | {f'<= {target}' if target else ''} | {met} |")
    for row in results.get("scaling", []):
        print(f"| scaling: {row['params']} params | APD {row['apd_ratio']:.3f}, SAM {row['sam_ratio']:.3f}, "
              f"multi-step {row['multistep_ratio']:.3f} | flat | |")
    out = Path(args.out or Path(__file__).parent / f"results-{device.type}.json")
    out.write_text(json.dumps(results, indent=1))
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
