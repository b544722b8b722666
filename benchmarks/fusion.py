"""Is a fused per-pass update worth it on this machine? APD's bookkeeping between two passes
(finiteness probe, gradient sum, steepest ascent, recovery of a_t, projection, moving the
parameters; layer-relative L2 budget, t > 0) as the library runs it, eager ``torch._foreach_*``
calls, against the same update as three ``torch.compile``d loops (a reduction pass, one fused
elementwise pass with its norm, the move): about 10 memory passes instead of about 21.

Two parameter sets: a few large tensors (memory-bound, where fusion should pay) and many small
ones (launch-bound). Reports the median time of each, the compile time, and the largest
difference between the parameters the two produce (fusion changes the order of roundings).

    python benchmarks/fusion.py          # writes benchmarks/fusion-cpu.json
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

import parashield as ps
from parashield.defense import _finiteness_probe

SETS = {"large": [(2048, 1024), (2048,), (2048, 2048), (2048,), (1024, 2048), (1024,)],
        "small": [(128, 128), (128,)] * 21}


def _stats(gs: list[torch.Tensor], sums: list[torch.Tensor]) -> torch.Tensor:
    out = []
    for g, s in zip(gs, sums):
        s.add_(g)
        out.append(torch.stack([g.abs().amax(), (g * g).sum()]))
    return torch.stack(out)


def _step(ps_: list[torch.Tensor], gs: list[torch.Tensor], ws: list[torch.Tensor], c: torch.Tensor) -> torch.Tensor:
    out = []
    for i, (p, g, w) in enumerate(zip(ps_, gs, ws)):
        g.copy_((p - w) + c[i] * g)
        out.append((g * g).sum())
    return torch.stack(out)


def _move(ps_: list[torch.Tensor], gs: list[torch.Tensor], ws: list[torch.Tensor], f: torch.Tensor) -> None:
    for i, (p, g, w) in enumerate(zip(ps_, gs, ws)):
        p.copy_(w + f[i] * g)


def measure(shapes: list[tuple], rounds: int) -> dict:
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
    opt = ps.APD(params, torch.optim.SGD, budget=ps.Budget("l2", 0.05, scale="layer"), steps=2, lr=0.1)
    ws = opt._workspace_for(params)
    with torch.no_grad():
        torch._foreach_copy_(ws.clean.views, ws.corrupted)
        ws.geometry.refresh()
        a1 = [0.01 * torch.randn_like(p) for p in params]
        torch._foreach_add_(params, a1)  # the parameters at w + a_1
    start = [p.detach().clone() for p in params]
    grads0 = [torch.randn_like(p) for p in params]
    norms = ws.geometry.layer_norms(2.0)  # ||w_l||: the steepest step has radius alpha ||w_l||, the ball eps ||w_l||
    radii, step = norms * opt.budget.eps, norms * opt.step_size
    compiled = [torch.compile(f, dynamic=False) for f in (_stats, _step, _move)]

    def reset() -> list[torch.Tensor]:
        with torch.no_grad():
            torch._foreach_copy_(params, start)
        return [g.clone() for g in grads0]

    @torch.no_grad()
    def eager(g: list[torch.Tensor]) -> None:
        _finiteness_probe(g)
        torch._foreach_add_(ws.sum_into, g)
        opt._next_corruption(1, ws, g, g)

    @torch.no_grad()
    def fused(g: list[torch.Tensor]) -> None:
        st = compiled[0](g, ws.sum_into)
        n = compiled[1](params, g, ws.clean.views, step / st[:, 1].sqrt()).sqrt()
        compiled[2](params, g, ws.clean.views, torch.clamp(radii / n, max=1.0))

    out: dict = {"parameters": sum(p.numel() for p in params), "tensors": len(params)}
    results = {}
    for name, fn in (("eager", eager), ("fused", fused)):
        g = reset()
        t0 = time.perf_counter()
        fn(g)
        out[f"{name}_first_call_s"] = time.perf_counter() - t0
        results[name] = [p.detach().clone() for p in params]
    out["max_abs_difference"] = max(float((a - b).abs().max()) for a, b in zip(results["eager"], results["fused"]))
    times: dict = {"eager": [], "fused": []}
    for _ in range(rounds):  # interleaved, so that machine noise hits both alike
        for name, fn in (("eager", eager), ("fused", fused)):
            g = reset()
            t0 = time.perf_counter()
            fn(g)
            times[name].append(time.perf_counter() - t0)
    out.update({f"{k}_median_s": statistics.median(v) for k, v in times.items()})
    out["fused_over_eager"] = out["fused_median_s"] / out["eager_median_s"]
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", type=Path, default=Path(__file__).with_name("fusion-cpu.json"))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    rows = {name: measure(shapes, args.rounds) for name, shapes in SETS.items()}
    doc = {"threads": args.threads, "torch": torch.__version__, "machine": platform.processor() or platform.machine(),
           "rows": rows}
    args.out.write_text(json.dumps(doc, indent=1))
    for name, r in rows.items():
        print(f"{name}: {r['parameters']} parameters in {r['tensors']} tensors: fused/eager {r['fused_over_eager']:.2f} "
              f"(eager {1e3 * r['eager_median_s']:.2f} ms, fused {1e3 * r['fused_median_s']:.2f} ms, compile "
              f"{r['fused_first_call_s']:.1f} s, max |difference| {r['max_abs_difference']:.2e})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
