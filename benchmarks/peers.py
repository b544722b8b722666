"""parashield beside the peer packages, on one trained ~100k-parameter network and its data.

Each row is a ratio parashield / peer (below 1: parashield is faster or needs fewer Hessian-vector
products), with the agreement of the two answers next to it:

* SAM and ASAM steps against pytorch-optimizer's ``SAM`` (``adaptive=True`` for ASAM), timed
  interleaved as in ``run.py`` (its ``ratio``), after checking both take the same steps;
* the top Hessian eigenvalue to 1e-3 relative error against a float64 reference (long Lanczos
  on a float64 copy of the network, cross-checked with hessian-eigenthings' Lanczos): parashield
  stops on its own (``tol=1e-3``); each peer gets, per seed, the fewest products with which its
  answer is within 1e-3 (read off an instrumented run: a setting a user cannot know in advance,
  so the peers' best case); for hessian-eigenthings' Lanczos, which has no stopping rule, also
  the one ``max_iter`` that reaches 1e-3 on every seed. Every setting is then timed per seed,
  interleaved with the others (median of 5 rounds);
* the Hessian trace to 1% relative standard error: Hutchinson with Rademacher probes in both,
  the number of probes from a pilot run;
* a loss line and a loss plane against loss-landscapes' ``linear_interpolation`` and
  ``planar_interpolation`` at the same points (``deepcopy_model=True``: without it the peer leaves
  the model at the far end of the line).

    python benchmarks/peers.py            # writes benchmarks/peers-cpu.json and peers-cpu.md
    python benchmarks/peers.py --quick    # a small network, few seeds and rounds (the smoke test)
"""

from __future__ import annotations

import argparse
import copy
import importlib
import json
import math
import platform
import statistics
import sys
import time
from importlib.metadata import version
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

import parashield as ps

sys.path.insert(0, str(Path(__file__).parent))
from run import closure_of, numel, ratio  # noqa: E402  (the suite's timing, so the numbers compare)

PEERS = ("pytorch_optimizer", "pyhessian", "hessian_eigenthings", "loss_landscapes")
TARGET = 1e-3  # relative error of the top eigenvalue
TRACE_TARGET = 0.01  # relative standard error of the trace


def loss_fn(model: nn.Module, batch) -> torch.Tensor:
    x, y = batch
    return F.cross_entropy(model(x), y)


def problem(quick: bool) -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """A tanh MLP (64 -> 300 -> 256 -> 10, 99k parameters; 64 -> 48 -> 32 -> 10 quick) trained
    100 Adam steps on a seeded synthetic 10-class task: a Hessian with a cluster of outlier
    eigenvalues over a bulk near zero, as in trained networks."""
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    n, widths = (64, (48, 32)) if quick else (256, (300, 256))
    x = torch.randn(n, 64, generator=gen)
    y = (x @ torch.randn(64, 10, generator=gen) + 0.5 * torch.randn(n, 10, generator=gen)).argmax(1)
    model = nn.Sequential(nn.Linear(64, widths[0]), nn.Tanh(), nn.Linear(*widths), nn.Tanh(), nn.Linear(widths[1], 10))
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    for _ in range(100):
        opt.zero_grad()
        loss_fn(model, (x, y)).backward()
        opt.step()
    return model, x, y


def timed(fn: Callable[[], object]) -> tuple[float, object]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def max_difference(a: nn.Module, b: nn.Module) -> float:
    return max(float((p - q).detach().abs().max()) for p, q in zip(a.parameters(), b.parameters()))


# ------------------------------------------------------------------------------------ SAM, ASAM
def bench_sam_family(model, x, y, rounds: int) -> list[dict]:
    import pytorch_optimizer as po

    rows = []
    for name, ours, theirs in (
        ("SAM step", lambda p: ps.SAM(p, torch.optim.SGD, rho=0.05, lr=0.01, momentum=0.9),
         lambda p: po.SAM(p, torch.optim.SGD, rho=0.05, lr=0.01, momentum=0.9)),
        ("ASAM step", lambda p: ps.ASAM(p, torch.optim.SGD, rho=0.5, eta=0.0, lr=0.01, momentum=0.9),
         lambda p: po.SAM(p, torch.optim.SGD, rho=0.5, adaptive=True, lr=0.01, momentum=0.9)),
    ):
        m1, m2 = copy.deepcopy(model), copy.deepcopy(model)
        o1, o2 = ours(m1.parameters()), theirs(m2.parameters())
        c1, c2 = closure_of(m1, x, y, o1), closure_of(m2, x, y, o2)

        def peer_step():
            c2()  # pytorch-optimizer wants the gradient at w before step(closure)
            o2.step(c2)

        for _ in range(3):  # the same steps first, from the same weights
            o1.step(c1)
            peer_step()
        diff = max_difference(m1, m2)
        out = ratio(lambda: o1.step(c1), peer_step, torch.device("cpu"), rounds)
        rows.append({"row": name, "peer": "pytorch-optimizer SAM" + (" (adaptive=True)" if "ASAM" in name else ""),
                     "ratio_time": out["ratio"], "parashield_s": out["a_median_s"], "peer_s": out["b_median_s"],
                     "rounds": rounds, "agreement": {"max_param_difference_after_3_steps": diff}})
    return rows


# ------------------------------------------------------------------------------------ eigenvalue
class Recorder:
    """A peer's eigenvalue estimate after each of its products, recorded by a wrapper."""

    def __init__(self) -> None:
        self.estimates: list[float] = []

    def first_within(self, reference: float) -> int | None:
        """The fewest products after which the estimate is within TARGET of ``reference``."""
        for i, v in enumerate(self.estimates):
            if abs(v - reference) <= TARGET * abs(reference):
                return i + 1
        return None


def reference_eigenvalue(model, x, y) -> dict:
    """The dominant eigenvalue of a float64 copy: parashield's Lanczos at tol 1e-12 and
    hessian-eigenthings' Lanczos with 120 steps, which must agree."""
    import hessian_eigenthings as he

    m64 = copy.deepcopy(model).double()
    batch = (x.double(), y)
    ours = ps.hessian_eigenpairs(ps.Objective(m64, loss_fn, batch), which="magnitude", tol=1e-12, max_iters=300)
    op = he.HessianOperator(m64, [batch], he.supervised_loss(F.cross_entropy))
    theirs = he.lanczos(op, k=1, max_iter=min(120, op.size - 1), which="LM", seed=12345)
    value, peer = ours.values[0], float(theirs.eigenvalues[0])
    return {"value": value, "products": ours.matvecs, "hessian_eigenthings_120_steps": peer,
            "relative_difference": abs(value - peer) / abs(value)}


def interleaved(fns: dict[str, Callable[[], object]], rounds: int) -> dict[str, tuple[float, object]]:
    """Median time of each call over ``rounds`` rounds, the order rotating every round (a load
    change on a shared machine hits every call alike), and each call's last result."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    out: dict[str, object] = {}
    names = list(fns)
    for r in range(rounds):
        for k in names[r % len(names):] + names[: r % len(names)]:
            t, out[k] = timed(fns[k])
            times[k].append(t)
    return {k: (statistics.median(times[k]), out[k]) for k in names}


def bench_eigenvalue(model, x, y, seeds: int, ref: float, rounds: int) -> tuple[list[dict], dict]:
    import hessian_eigenthings as he
    ph = importlib.import_module("pyhessian.hessian")  # the module (the package's name 'hessian' is its class)

    obj = ps.Objective(model, loss_fn, (x, y))
    op = he.HessianOperator(model, [(x, y)], he.supervised_loss(F.cross_entropy))
    err = lambda v: abs(v - ref) / abs(ref)  # noqa: E731
    cap = 400  # products allowed to the power iterations

    # 1. products: what parashield needs on its own, and each peer's fewest per seed
    counts: list[dict[str, int | None]] = []
    for seed in range(seeds):
        c: dict[str, int | None] = {}
        c["parashield"] = ps.hessian_eigenpairs(obj, which="magnitude", tol=TARGET, bound="value", seed=seed).matvecs
        # parashield's own fewest (the same start, so each run is a prefix of the next)
        c["parashield_fewest"] = next(m for m in range(1, 200) if err(ps.hessian_eigenpairs(
            obj, which="magnitude", tol=1e-15, max_iters=m, seed=seed).values[0]) <= TARGET)

        # hessian-eigenthings' Lanczos: its tridiagonal from its own start
        gen = torch.Generator(device="cpu").manual_seed(seed)
        td = he.lanczos_tridiagonal(op, torch.randn(op.size, dtype=op.dtype, generator=gen), 40)
        rec = Recorder()
        for m in range(1, td.iterations + 1):
            T = torch.diag(td.alphas[:m]) + torch.diag(td.betas[: m - 1], 1) + torch.diag(td.betas[: m - 1], -1)
            ev = torch.linalg.eigvalsh(T.double())
            rec.estimates.append(float(ev[ev.abs().argmax()]))
        c["eigenthings_lanczos"] = rec.first_within(ref)

        # hessian-eigenthings' power iteration: the Rayleigh quotient of each iterate
        rec = Recorder()

        def recording(v, rec=rec):
            av = op.matvec(v)
            rec.estimates.append(float(v @ av) / float(v @ v))
            return av

        he.power_iteration_one(he.LambdaOperator(recording, op.size, dtype=op.dtype), max_iter=cap, tol=0.0, seed=seed)
        c["eigenthings_power"] = rec.first_within(ref)

        # PyHessian's power iteration (its start from the global RNG)
        rec = Recorder()
        plain = ph.hessian_vector_product

        def recording_hvp(gradsH, params, v, rec=rec):
            hv = plain(gradsH, params, v)
            rec.estimates.append(float(sum((a * b).sum() for a, b in zip(hv, v))))
            return hv

        ph.hessian_vector_product = recording_hvp
        try:
            torch.manual_seed(seed)
            ph.hessian(model, F.cross_entropy, data=(x, y), cuda=False).eigenvalues(maxIter=cap, tol=0.0)
        finally:
            ph.hessian_vector_product = plain
            model.zero_grad(set_to_none=True)  # PyHessian leaves .grad (with a graph) on the model
        c["pyhessian_power"] = rec.first_within(ref)
        counts.append(c)
    # hessian-eigenthings' Lanczos has no stopping rule: one max_iter must serve every seed
    fixed = max(c["eigenthings_lanczos"] for c in counts)

    # 2. time: every setting per seed, interleaved
    def pyhessian_run(seed: int, m: int) -> float:
        torch.manual_seed(seed)
        value = ph.hessian(model, F.cross_entropy, data=(x, y), cuda=False).eigenvalues(maxIter=m, tol=0.0)[0][0]
        model.zero_grad(set_to_none=True)
        return value

    runs: dict[str, list[dict]] = {k: [] for k in ("parashield", "eigenthings_lanczos", "eigenthings_power",
                                                   "pyhessian_power", "eigenthings_lanczos_fixed")}
    for seed, c in enumerate(counts):
        fns: dict[str, Callable[[], float]] = {
            "parashield": lambda: ps.hessian_eigenpairs(obj, which="magnitude", tol=TARGET, bound="value",
                                                        seed=seed).values[0],
            "eigenthings_lanczos": lambda: float(he.lanczos(op, k=1, max_iter=c["eigenthings_lanczos"], which="LM",
                                                            seed=seed).eigenvalues[0]),
            "eigenthings_lanczos_fixed": lambda: float(he.lanczos(op, k=1, max_iter=fixed, which="LM",
                                                                  seed=seed).eigenvalues[0]),
        }
        if c["eigenthings_power"] is not None:
            fns["eigenthings_power"] = lambda: he.power_iteration_one(op, max_iter=c["eigenthings_power"], tol=0.0,
                                                                      seed=seed)[0]
        if c["pyhessian_power"] is not None:
            fns["pyhessian_power"] = lambda: pyhessian_run(seed, c["pyhessian_power"])
        measured = interleaved(fns, rounds)
        for key in runs:
            products = fixed if key == "eigenthings_lanczos_fixed" else c[key]
            t, value = measured.get(key, (None, None))
            runs[key].append({"seed": seed, "seconds": t, "products": products,
                              "error": None if value is None else err(value)})
        runs["parashield"][-1]["fewest_products"] = c["parashield_fewest"]

    # the peers' defaults, for the record
    defaults = {"hessian_eigenthings_lanczos_k1_error": err(float(he.lanczos(op, k=1, seed=0).eigenvalues[0])),
                "pyhessian_eigenvalues_error": err(_pyhessian_default(ph, model, x, y))}

    ours = runs["parashield"]
    total = lambda rs, key: sum(r[key] for r in rs)  # noqa: E731
    rows = []
    for key, label in (("eigenthings_lanczos", "hessian-eigenthings Lanczos, fewest steps per seed"),
                       ("eigenthings_lanczos_fixed", f"hessian-eigenthings Lanczos, one max_iter ({fixed}) for all seeds"),
                       ("eigenthings_power", "hessian-eigenthings power iteration, fewest steps per seed"),
                       ("pyhessian_power", "PyHessian power iteration, fewest steps per seed")):
        theirs = runs[key]
        if any(r["products"] is None for r in theirs):
            rows.append({"row": "top eigenvalue to 1e-3", "peer": label, "ratio_time": None, "ratio_products": None,
                         "note": f"the peer did not reach 1e-3 within {cap} products on every seed"})
            continue
        rows.append({"row": "top eigenvalue to 1e-3", "peer": label,
                     "ratio_time": total(ours, "seconds") / total(theirs, "seconds"),
                     "ratio_products": total(ours, "products") / total(theirs, "products"),
                     "parashield_products_per_seed": [r["products"] for r in ours],
                     "parashield_fewest_products_per_seed": [r["fewest_products"] for r in ours],
                     "peer_products_per_seed": [r["products"] for r in theirs],
                     "parashield_s": total(ours, "seconds") / seeds, "peer_s": total(theirs, "seconds") / seeds,
                     "rounds": rounds,
                     "agreement": {"parashield_worst_error": max(r["error"] for r in ours),
                                   "peer_worst_error": max(r["error"] for r in theirs)}})
    return rows, {"runs": runs, "peer_defaults": defaults}


def _pyhessian_default(ph, model, x, y) -> float:
    """PyHessian's ``eigenvalues()`` with its defaults (maxIter=100, tol=1e-3), seed 0."""
    torch.manual_seed(0)
    value = ph.hessian(model, F.cross_entropy, data=(x, y), cuda=False).eigenvalues()[0][0]
    model.zero_grad(set_to_none=True)
    return value


# ------------------------------------------------------------------------------------ trace
def bench_trace(model, x, y, rounds: int, pilot: int) -> dict:
    ph = importlib.import_module("pyhessian.hessian")  # the module (the package's name 'hessian' is its class)

    obj = ps.Objective(model, loss_fn, (x, y))
    first = ps.hessian_trace_estimate(obj, pilot, seed=1000)
    probes = max(pilot, math.ceil(pilot * (first.stderr / (TRACE_TARGET * abs(first.value))) ** 2))

    def peer():
        torch.manual_seed(0)
        samples = ph.hessian(model, F.cross_entropy, data=(x, y), cuda=False).trace(maxIter=probes, tol=0.0)
        model.zero_grad(set_to_none=True)
        return samples

    out = ratio(lambda: ps.hessian_trace_estimate(obj, probes, seed=1), peer, torch.device("cpu"), rounds, warmup=1)
    ours, samples = ps.hessian_trace_estimate(obj, probes, seed=1), peer()  # other probes than the peer's
    mean = statistics.fmean(samples)
    stderr = statistics.stdev(samples) / math.sqrt(len(samples))
    z = abs(ours.value - mean) / math.hypot(ours.stderr, stderr)
    return {"row": f"Hessian trace to {TRACE_TARGET:.0%} standard error ({probes} Rademacher probes)",
            "peer": "PyHessian Hutchinson", "ratio_time": out["ratio"], "ratio_products": 1.0,
            "parashield_s": out["a_median_s"], "peer_s": out["b_median_s"], "rounds": rounds,
            "agreement": {"parashield": [ours.value, ours.stderr], "peer": [mean, stderr],
                          "difference_in_joint_standard_errors": z}}


# ------------------------------------------------------------------------------------ landscapes
def bench_landscapes(model, x, y, rounds: int, line_steps: int, plane_steps: int) -> list[dict]:
    """The line gets three times ``rounds`` (it is short, so its timings are noisier)."""
    import loss_landscapes as ll
    from loss_landscapes.metrics import Loss

    obj = ps.Objective(model, loss_fn, (x, y))
    d1, d2 = ps.random_direction(obj, seed=1), ps.random_direction(obj, seed=2)
    ends = []
    for d in (d1, d2):
        end = copy.deepcopy(model)
        with torch.no_grad():
            for p, t in zip(end.parameters(), d):
                p.add_(t)
        ends.append(end)
    metric = Loss(F.cross_entropy, x, y)
    rows = []

    # the line: the peer evaluates at i / steps for i = 1..steps
    alphas = [i / line_steps for i in range(1, line_steps + 1)]
    out = ratio(lambda: ps.loss_line(obj, d1, alphas),
                lambda: ll.linear_interpolation(model, ends[0], metric, steps=line_steps, deepcopy_model=True),
                torch.device("cpu"), 3 * rounds, warmup=1)
    ours = ps.loss_line(obj, d1, alphas)
    theirs = torch.as_tensor(ll.linear_interpolation(model, ends[0], metric, steps=line_steps, deepcopy_model=True),
                             dtype=torch.float64)
    loop = ratio(lambda: ps.loss_line(obj, d1, alphas, vectorize=False),
                 lambda: ll.linear_interpolation(model, ends[0], metric, steps=line_steps, deepcopy_model=True),
                 torch.device("cpu"), 3 * rounds, warmup=1)
    rows.append({"row": f"loss line, {line_steps} points", "peer": "loss-landscapes linear_interpolation",
                 "ratio_time": out["ratio"], "ratio_time_vectorize_false": loop["ratio"],
                 "parashield_s": out["a_median_s"], "peer_s": out["b_median_s"],
                 "rounds": 3 * rounds,
                 "agreement": {"max_relative_difference": float(((ours - theirs).abs() / theirs.abs()).max())}})

    # the plane: the peer's column i (along d1) holds j / steps along d2 for j = 1..steps when i is
    # even and j = 0..steps-1 when i is odd (it walks the grid back and forth); parashield's grid
    # has both sets of points, and times the same number (steps x steps)
    coords = [i / plane_steps for i in range(plane_steps)]
    betas = [j / plane_steps for j in range(1, plane_steps + 1)]
    out = ratio(lambda: ps.loss_surface(obj, d1, d2, coords, betas),
                lambda: ll.planar_interpolation(model, ends[0], ends[1], metric, steps=plane_steps, deepcopy_model=True),
                torch.device("cpu"), rounds, warmup=1)
    ours = ps.loss_surface(obj, d1, d2, coords, [0.0] + betas)
    theirs = torch.as_tensor(ll.planar_interpolation(model, ends[0], ends[1], metric, steps=plane_steps,
                                                     deepcopy_model=True), dtype=torch.float64)
    same = torch.stack([ours[i, 1:] if i % 2 == 0 else ours[i, :-1] for i in range(plane_steps)])
    loop = ratio(lambda: ps.loss_surface(obj, d1, d2, coords, betas, vectorize=False),
                 lambda: ll.planar_interpolation(model, ends[0], ends[1], metric, steps=plane_steps, deepcopy_model=True),
                 torch.device("cpu"), rounds, warmup=1)
    rows.append({"row": f"loss plane, {plane_steps} x {plane_steps} points", "peer": "loss-landscapes planar_interpolation",
                 "ratio_time": out["ratio"], "ratio_time_vectorize_false": loop["ratio"],
                 "parashield_s": out["a_median_s"], "peer_s": out["b_median_s"],
                 "rounds": rounds, "agreement": {"max_relative_difference": float(((same - theirs).abs() / theirs.abs()).max())}})
    return rows


# ------------------------------------------------------------------------------------ report
def markdown(doc: dict) -> str:
    fmt = lambda v, spec: "n/a" if v is None else format(v, spec)  # noqa: E731
    lines = [f"parashield / peer on {doc['params']:,} parameters, {doc['examples']} examples, "
             f"{doc['threads']} CPU thread, torch {doc['torch']} (below 1: parashield leads)", "",
             "| row | peer | time ratio | products ratio | agreement |", "|---|---|---|---|---|"]
    for r in doc["rows"]:
        agree = ", ".join(f"{k.replace('_', ' ')} {v:.2g}" if isinstance(v, float) else f"{k} {v}"
                          for k, v in r.get("agreement", {}).items() if not isinstance(v, list))
        if "parashield" in r.get("agreement", {}):
            (a, sa), (b, sb) = r["agreement"]["parashield"], r["agreement"]["peer"]
            agree = f"{a:.4g} +- {sa:.2g} vs {b:.4g} +- {sb:.2g} ({agree})"
        lines.append(f"| {r['row']} | {r['peer']} | {fmt(r['ratio_time'], '.2f')} | "
                     f"{fmt(r.get('ratio_products'), '.2f')} | {agree or r.get('note', '')} |")
    ref = doc["reference_eigenvalue"]
    lines += ["", f"Reference top eigenvalue (float64): {ref['value']:.10g}; hessian-eigenthings' 120-step Lanczos "
              f"on the same float64 network differs by {ref['relative_difference']:.1e} (relative)."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="a small network, 3 seeds, few rounds (smoke test)")
    p.add_argument("--out", default=None, help="JSON path (default benchmarks/peers-cpu.json; --quick: no file "
                   "unless given); the table goes next to it as .md")
    args = p.parse_args(argv)
    missing = []
    for name in PEERS:
        try:
            __import__(name)
        except ImportError:
            missing.append(name)
    if missing:
        print(f"missing peer packages {missing}: pip install -e '.[bench]'", file=sys.stderr)
        return 2
    torch.set_num_threads(1)
    q = args.quick
    model, x, y = problem(q)
    t0 = time.perf_counter()
    ref = reference_eigenvalue(model, x, y)
    rows = bench_sam_family(model, x, y, rounds=4 if q else 30)
    eig_rows, eig_runs = bench_eigenvalue(model, x, y, seeds=3 if q else 10, ref=ref["value"], rounds=1 if q else 5)
    rows += eig_rows
    rows.append(bench_trace(model, x, y, rounds=2 if q else 5, pilot=10 if q else 30))
    rows += bench_landscapes(model, x, y, rounds=2 if q else 7, line_steps=10 if q else 50, plane_steps=5 if q else 20)
    seconds = time.perf_counter() - t0
    doc = {"params": numel(model), "examples": len(y), "threads": torch.get_num_threads(), "torch": torch.__version__,
           "python": platform.python_version(), "machine": platform.machine(), "quick": q,
           "peers": {n: version(n) for n in ("pytorch-optimizer", "PyHessian", "hessian-eigenthings", "loss-landscapes")},
           "seconds": seconds, "reference_eigenvalue": ref, "rows": rows, "eigenvalue_runs": eig_runs}
    table = markdown(doc)
    print(table)
    out = args.out or (None if q else str(Path(__file__).parent / "peers-cpu.json"))
    if out:
        Path(out).write_text(json.dumps(doc, indent=1) + "\n")
        Path(out).with_suffix(".md").write_text(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
