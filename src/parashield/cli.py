"""Command line: ``parashield reproduce | attack | evaluate | indicators | landscape``."""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Optional, Sequence


def _task_names() -> list[str]:
    from .reproduce import TASKS

    return sorted(TASKS)


def _load_task(name: str, quick: bool = False):
    from .reproduce import TASKS

    if name not in TASKS:
        raise SystemExit(f"parashield: error: unknown task {name!r}; choose from {', '.join(sorted(TASKS))}")
    try:
        return TASKS[name](quick=quick)
    except FileNotFoundError as exc:  # MissingDataError names the install command
        raise SystemExit(f"parashield: error: data for task {name!r} is missing: {exc}") from None


def cmd_reproduce(args: argparse.Namespace) -> int:
    import torch

    from .reproduce import METHODS, QUICK_METHODS, run_task, write_report

    if args.threads is not None:
        if args.threads < 1:
            raise SystemExit("parashield: error: --threads must be >= 1")
        torch.set_num_threads(args.threads)

    names = _task_names() if args.task == "all" else args.task.split(",")
    unknown_tasks = [n for n in names if n not in _task_names()]
    if unknown_tasks:  # before --quick replaces the names, and before any task is run
        raise SystemExit(f"parashield: error: unknown task(s) {', '.join(map(repr, unknown_tasks))}; "
                         f"choose from {', '.join(_task_names())}")
    if args.quick:
        names = ["digits"]
    chosen = tuple(args.methods.split(",")) if args.methods else (QUICK_METHODS if args.quick else None)
    unknown = [m for m in chosen or () if m not in METHODS]
    if unknown:
        raise SystemExit(f"parashield: error: unknown method(s) {unknown}; choose from {', '.join(METHODS)}")
    out = Path(args.out)
    results = {"tasks": {}, "command": " ".join(sys.argv), "quick": args.quick, "seeds": args.seeds, "wall_seconds": {}}
    for name in names:
        task = _load_task(name, quick=args.quick)
        methods = chosen or task.methods
        t0 = time.perf_counter()
        seeds = task.seeds if args.seeds is None else args.seeds
        results["tasks"][name] = run_task(task, methods, seeds, out)
        results["wall_seconds"][name] = time.perf_counter() - t0
        print(f"{name}: {results['wall_seconds'][name]:.0f} s")
    report = write_report(results, out)
    print(report.read_text())
    print(f"wrote {report}, {out / 'results.json'} and plots")
    return 0


def _objective_from_checkpoint(args: argparse.Namespace):
    from . import Objective, load_checkpoint

    task = _load_task(args.task)
    if not Path(args.checkpoint).is_file():
        raise SystemExit(f"parashield: error: checkpoint {args.checkpoint} not found")
    model = task.build_model()
    try:
        load_checkpoint(args.checkpoint, model, restore_rng=False)
    except (RuntimeError, KeyError) as exc:
        raise SystemExit(f"parashield: error: {args.checkpoint} is not a checkpoint of task {args.task!r}: {exc}") from None
    model.eval()
    return task, model, Objective(model, task.loss_fn, task.attack_data)


def _budget(args: argparse.Namespace, eps: float):
    from . import Budget

    return Budget(args.norm, eps, sparsity=args.sparsity, scale=None if args.scale == "none" else args.scale)


def cmd_attack(args: argparse.Namespace) -> int:
    from . import Objective, corrupted, make_corruption

    task, model, attack = _objective_from_checkpoint(args)
    test = Objective(model, task.loss_fn, task.test_data)
    rows = [{"eps": 0.0, "loss": test.loss(), task.metric_name: task.metric(model, task.test_data)}]
    for eps in args.eps:
        kw = {"steps": args.steps} if args.corruption == "multi_step" else {"trials": args.trials} if args.corruption == "random" else {}
        res = make_corruption(args.corruption, _budget(args, eps), **kw)(attack)
        with corrupted(model, res):
            rows.append({"eps": eps, "loss": test.loss(), task.metric_name: task.metric(model, task.test_data),
                         "train_loss_change": res.loss_change})
    print(f"{'eps':>8} {'test loss':>10} {task.metric_name:>10}")
    for r in rows:
        print(f"{r['eps']:>8g} {r['loss']:>10.4f} {r[task.metric_name]:>10.4f}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


def _positive_int(text: str) -> int:
    """argparse type: an int >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an int >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an int >= 1, got {value}")
    return value


def cmd_evaluate(args: argparse.Namespace) -> int:
    from . import evaluate_robustness

    task, model, attack = _objective_from_checkpoint(args)
    ev = evaluate_robustness(
        attack, _budget(args, args.eps[0]), eps=args.eps, classification=args.classification,
        heldout=task.test_data, metric=lambda m: task.metric(m, task.test_data),
        steps=args.steps, restarts=args.restarts, seed=args.seed,
    )
    print(f"{'eps':>8} {'attack loss':>12} {'test loss':>10} {task.metric_name:>10}  found by")
    first = ev.results[0]
    print(f"{0:>8g} {first.loss_before:>12.4f} {first.heldout_before:>10.4f} {first.metric_before:>10.4f}")
    for r in ev.results:
        print(f"{r.eps:>8g} {r.loss_after:>12.4f} {r.heldout_after:>10.4f} {r.metric_after:>10.4f}  {r.member}")
    if args.json:
        Path(args.json).write_text(json.dumps({**ev.as_dict(), "metric": task.metric_name}, indent=1))
    return 0


def cmd_indicators(args: argparse.Namespace) -> int:
    from . import hessian_top_eigenvalue, hessian_trace, layer_vulnerability, loss_change

    task, model, attack = _objective_from_checkpoint(args)
    out: dict = {"indicators": []}
    for eps in args.eps:
        b = _budget(args, eps)
        row = {"eps": eps}
        for method in args.methods.split(","):
            row[method] = loss_change(attack, b, method)
        out["indicators"].append(row)
        print(" ".join(f"{k}={v:.5g}" for k, v in row.items()))
    out["layers"] = [vars(r) for r in layer_vulnerability(attack, _budget(args, args.eps[0]))]
    for r in out["layers"][:10]:
        print(f"  {r['name']:<40} {r['numel']:>9} {r['value']:.5g}")
    if args.curvature:
        out["hessian_top_eigenvalue"] = hessian_top_eigenvalue(attack)
        out["hessian_trace"] = hessian_trace(attack)
        print(f"top Hessian eigenvalue {out['hessian_top_eigenvalue']:.5g}, trace {out['hessian_trace']:.5g}")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
    return 0


def _landscape_alphas(span: float, points: int) -> list[float]:
    """``points`` values over [-span, span] (an even count is raised by one), symmetric, with
    0 exactly in the middle so that w itself is on the grid."""
    import torch

    half = torch.linspace(0.0, span, points // 2 + 1, dtype=torch.float64)
    return torch.cat([-half[1:].flip(0), half]).tolist()


def cmd_landscape(args: argparse.Namespace) -> int:
    from . import Budget
    from .landscape import CORRUPTION_KINDS, corruption_direction, loss_line, loss_surface, plot_line, plot_surface, random_direction

    kinds = args.directions.split(",")
    unknown = [k for k in kinds if k not in CORRUPTION_KINDS]
    if unknown:
        raise SystemExit(f"parashield: error: unknown direction kind(s) {', '.join(map(repr, unknown))}; "
                         f"choose from {', '.join(CORRUPTION_KINDS)}")
    for name, value in (("--points", args.points), ("--surface-points", args.surface_points)):
        if value < 3:
            raise SystemExit(f"parashield: error: {name} must be >= 3, got {value}")
    for name, value in (("--eps", args.eps), ("--span", args.span)):
        if not (math.isfinite(value) and value > 0):
            raise SystemExit(f"parashield: error: {name} must be a finite number > 0, got {value}")
    task, model, attack = _objective_from_checkpoint(args)
    budget = Budget("l2", args.eps, scale="layer")

    def direction(kind: str) -> list:
        """The corruption direction of ``kind``: layer-relative radius eps."""
        return corruption_direction(attack, kind, budget, **({"seed": args.seed} if kind == "random" else {}))

    def filter_random(seed: int) -> list:
        """A filter-normalized random direction scaled by eps: per layer as large as the budget."""
        return [args.eps * d for d in random_direction(attack, seed=seed)]

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    alphas = _landscape_alphas(args.span, args.points)
    clean = attack.loss()
    directions = {kind: direction(kind) for kind in kinds}
    lines = {kind: loss_line(attack, d, alphas).tolist() for kind, d in directions.items()}
    result: dict = {"task": args.task, "checkpoint": str(args.checkpoint), "eps": args.eps, "span": args.span,
                    "seed": args.seed, "clean_loss": clean,
                    "lines": {"directions": kinds, "alphas": alphas, "losses": lines}, "surface": None}
    print(f"clean loss {clean:.5g}")
    for kind, losses in lines.items():
        print(f"  {kind:<10} loss at alpha=-{args.span:g}: {losses[0]:.5g}, at alpha={args.span:g}: {losses[-1]:.5g}")
    if args.surface != "none":
        if args.surface == "random":
            d1, d2, names = filter_random(args.seed), filter_random(args.seed + 1), ["random", "random"]
        else:
            d1 = directions["multi_step"] if "multi_step" in directions else direction("multi_step")
            d2, names = filter_random(args.seed), ["multi_step", "random"]
        grid = _landscape_alphas(args.span, args.surface_points)
        losses = loss_surface(attack, d1, d2, grid, grid)
        result["surface"] = {"kind": args.surface, "directions": names, "alphas": grid, "betas": grid,
                             "losses": losses.tolist()}
    (out / "landscape.json").write_text(json.dumps(result, indent=1))
    written = [out / "landscape.json"]
    try:
        written.append(plot_line(out / "landscape_lines.png", alphas, lines, clean,
                                 title=f"{args.task}: loss along corruption directions (eps={args.eps:g})"))
        if result["surface"] is not None:
            written.append(plot_surface(out / "landscape_surface.png", grid, grid, losses, labels=names,
                                        title=f"{args.task}: {args.surface} plane (eps={args.eps:g})"))
    except ImportError as exc:
        print(f"parashield: no plots: {exc}", file=sys.stderr)
    print(f"wrote {', '.join(map(str, written))}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="parashield", description="Parameter corruption, loss change indicators and adversarial parameter defense.")
    sub = p.add_subparsers(dest="command", required=True)

    r = sub.add_parser("reproduce", help="train plain/one-step/SAM/APD models and evaluate them under corruption")
    r.add_argument("--task", default="all", help="task name, comma-separated names, or 'all' (digits, fashion, ptb, translation, bbc)")
    r.add_argument("--quick", action="store_true", help="digits only, fewer epochs: a few minutes on 2 CPU cores")
    r.add_argument("--seeds", type=int, default=None, help="number of seeds (default: each task's own, 3 but 2 for translation)")
    r.add_argument("--methods", default=None, help="comma-separated subset of: plain, one_step, sam, apd2, apd3, apd5 "
                   "(default: each task's own set, all six where a full run fits the hour; --quick: plain, one_step, sam, apd3)")
    r.add_argument("--out", default="runs/reproduce", help="output folder (cache, report.md, results.json, plots)")
    r.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    r.set_defaults(func=cmd_reproduce)

    def common(q: argparse.ArgumentParser) -> None:
        q.add_argument("--task", required=True, help="the task whose model, loss and data the checkpoint belongs to")
        q.add_argument("--checkpoint", required=True, help="a train.pt written by 'parashield reproduce'")
        q.add_argument("--eps", type=float, nargs="+", default=[0.01, 0.05, 0.1], help="corruption radii")
        q.add_argument("--norm", default="l2", choices=["l1", "l2", "linf"], help="budget norm")
        q.add_argument("--scale", default="layer", choices=["none", "layer", "element"], help="budget scale")
        q.add_argument("--sparsity", type=int, default=None, help="at most this many parameters change")
        q.add_argument("--json", default=None, help="also write the numbers to this JSON file")

    a = sub.add_parser("attack", help="corrupt a saved model's parameters and report the test metric")
    common(a)
    a.add_argument("--corruption", default="multi_step", choices=["random", "one_step", "multi_step"],
                   help="corruption type (default multi_step)")
    a.add_argument("--steps", type=int, default=10, help="multi-step corruption steps")
    a.add_argument("--trials", type=int, default=10, help="random corruption trials")
    a.set_defaults(func=cmd_attack)

    e = sub.add_parser("evaluate", help="worst-case corruption of a saved model by the step-size-free attack ensemble")
    common(e)
    e.add_argument("--classification", action="store_true",
                   help="add the DLR margin member (batches (x, y), model(x) the logits)")
    e.add_argument("--steps", type=_positive_int, default=25, help="most gradient passes of one run (default 25)")
    e.add_argument("--restarts", type=_positive_int, default=4,
                   help="gradient passes per member in units of --steps (default 4)")
    e.add_argument("--seed", type=int, default=0, help="seed of the random starts (default 0)")
    e.set_defaults(func=cmd_evaluate)

    i = sub.add_parser("indicators", help="loss change indicators and per-layer vulnerability of a saved model")
    common(i)
    i.add_argument("--methods", default="first_order,second_order,random,one_step,multi_step",
                   help="comma-separated indicators (default: all of first_order, second_order, random, one_step, multi_step)")
    i.add_argument("--curvature", action="store_true", help="also the top Hessian eigenvalue and trace")
    i.set_defaults(func=cmd_indicators)

    ls = sub.add_parser("landscape", help="plot the loss of a saved model on lines and a plane through its parameters")
    ls.add_argument("--task", required=True, help="the task whose model, loss and data the checkpoint belongs to")
    ls.add_argument("--checkpoint", required=True, help="a train.pt written by 'parashield reproduce'")
    ls.add_argument("--out", required=True,
                    help="output folder (created): landscape_lines.png, landscape_surface.png, landscape.json")
    ls.add_argument("--directions", default="random,one_step,multi_step",
                    help="comma-separated corruption kinds to draw lines along (default: random,one_step,multi_step)")
    ls.add_argument("--eps", type=float, default=0.05,
                    help="layer-relative L2 radius of the directions: alpha=1 is a corruption of this size (default 0.05)")
    ls.add_argument("--points", type=int, default=21,
                    help="points per line, >= 3; an even number is raised by one so that w is on the grid (default 21)")
    ls.add_argument("--span", type=float, default=2.0, help="alpha (and beta) run over [-span, span] (default 2)")
    ls.add_argument("--surface", default="random", choices=["random", "adversarial", "none"],
                    help="plane through w: two filter-normalized random directions (random), the multi-step "
                         "corruption and a random direction (adversarial), or none (default random)")
    ls.add_argument("--surface-points", type=int, default=11,
                    help="points per axis of the plane, >= 3, raised to odd like --points (default 11)")
    ls.add_argument("--seed", type=int, default=0, help="seed of the random directions (default 0)")
    ls.set_defaults(func=cmd_landscape)
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "seeds", None) is not None and args.seeds < 1:
        raise SystemExit("parashield: error: --seeds must be >= 1")
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
