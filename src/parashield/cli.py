"""Command line: ``parashield reproduce | attack | evaluate | indicators | landscape`` (see docs/cli.md).

Arguments are parsed and checked by argparse ``type=`` functions before any work starts; every
bad input ends as ``parashield: error: ...`` with exit status 2, Ctrl-C with status 130.
``attack`` and ``indicators`` print each row and rewrite their JSON file as soon as it is done.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Optional, Sequence

from ._cli_setup import CommandError, Setup, load_task, task_setup, user_setup
from ._cli_types import (
    csv_of,
    default_threads,
    device,
    existing_file,
    factory_ref,
    finite_positive_float,
    int_in,
    output_file,
    output_folder,
    positive_int,
)

if TYPE_CHECKING:
    from .objective import Objective

#: Largest line (``--points``) and plane side (``--surface-points``) of ``landscape``: each
#: point is a loss over the whole train split, and larger grids could only exhaust the memory
#: (a 10^6-point side is a 10^12-point plane, 8 TB of float64) or never finish.
MAX_LINE_POINTS = 100_001
MAX_SURFACE_POINTS = 1_001
#: Largest ``--steps`` / ``--trials``: the corruption keeps one loss per step or trial.
MAX_ITERATIONS = 1_000_000


def _task_names() -> list[str]:
    from .reproduce import TASKS

    return sorted(TASKS)


def _reproduce_methods() -> tuple[str, ...]:
    from .reproduce import METHODS

    return tuple(METHODS)


def cmd_reproduce(args: argparse.Namespace) -> int:
    from .reproduce import QUICK_METHODS, run_task, write_report

    from .reproduce.runner import TimeLimitReached, time_limit

    names = _task_names() if "all" in args.task else list(args.task)
    if args.quick:
        names = ["digits"]
        if args.profile != "cpu":
            raise CommandError("--quick runs the cpu profile (digits); leave out --profile")
    chosen = args.methods or (QUICK_METHODS if args.quick else None)
    out = Path(args.out)
    command = " ".join(["parashield", *sys.argv[1:]])
    results = {"tasks": {}, "command": command, "quick": args.quick, "seeds": args.seeds, "wall_seconds": {}}
    with time_limit(None if args.time_limit is None else 60 * args.time_limit):
        for name in names:
            task = load_task(name, quick=args.quick, profile=args.profile).on(args.device)
            t0 = time.perf_counter()
            seeds = task.seeds if args.seeds is None else args.seeds
            try:
                result = run_task(task, chosen or task.methods, seeds, out)
            except TimeLimitReached as exc:
                print(f"parashield: stopped: {exc}", file=sys.stderr)
                return 75
            results["tasks"][task.name] = {**result, "command": command}
            results["wall_seconds"][task.name] = time.perf_counter() - t0
            print(f"{task.name}: {results['wall_seconds'][task.name]:.0f} s")
    from .reproduce.cache import locked

    with locked(out):  # read when writing, so that tasks run side by side into one folder keep each other's results
        kept = {} if args.quick else _kept_tasks(out / "results.json", list(results["tasks"]))
        if kept:
            print(f"the report keeps the earlier results of {', '.join(sorted(kept))} from {out / 'results.json'}")
        results["tasks"] = {**kept, **results["tasks"]}
        report = write_report(results, out)
    print(report.read_text())
    print(f"wrote {report}, {out / 'results.json'} and plots")
    return 0


def _kept_tasks(path: Path, names: list[str]) -> dict:
    """The tasks of an earlier full (not --quick) ``results.json`` in the output folder that this
    run does not redo: tasks run one at a time, each with its own seeds and methods, add up to one
    report. An unreadable file keeps nothing."""
    from .reproduce.cache import from_strict_json

    try:
        old = from_strict_json(json.loads(path.read_text()))
        tasks = old["tasks"] if isinstance(old, dict) and not old.get("quick") else {}
    except (OSError, ValueError, KeyError, TypeError):
        return {}
    return {k: v for k, v in tasks.items() if k not in names and isinstance(v, dict) and "runs" in v} \
        if isinstance(tasks, dict) else {}


# ------------------------------------------------------------------------------ shared pieces
def _setup(args: argparse.Namespace, splits: tuple[str, ...]) -> Setup:
    """The model, loss and data the command works on, loaded and checked."""
    if args.task is not None:
        return task_setup(args.task, args.checkpoint, args.device)
    return user_setup(args.model, args.data, args.loss, args.checkpoint, args.device, splits)


def _clean_loss(setup: Setup, split: str) -> float:
    """L(w) on ``split``: the check that model, loss and data work together, before any
    corruption is searched."""
    from .objective import NonFiniteLossError

    try:
        return setup.objective(split).loss()
    except CommandError:
        raise
    except NonFiniteLossError as exc:
        raise CommandError(f"the loss of {setup.source} on the {split} split is not finite before any corruption: {exc}") from None
    except Exception as exc:  # the model, loss and data do not fit together: say which and why
        raise CommandError(f"cannot compute the loss of {setup.source} on the {split} split: "
                           f"{type(exc).__name__}: {exc}") from None


def _or_inf(compute: Callable[[], float]) -> float:
    """``compute()``, with a non-finite loss (a corruption that overflowed the model) as +inf."""
    from .objective import NonFiniteLossError, overflow_to_inf

    try:
        return overflow_to_inf(compute())
    except NonFiniteLossError:
        return float("inf")


def _budget(args: argparse.Namespace, eps: float):
    from . import Budget

    return Budget(args.norm, eps, sparsity=args.sparsity, scale=None if args.scale == "none" else args.scale)


def _budget_doc(args: argparse.Namespace) -> dict:
    return {"norm": args.norm, "scale": args.scale, "eps": list(args.eps), "sparsity": args.sparsity}


def _budget_text(args: argparse.Namespace) -> str:
    dense = "dense" if args.sparsity is None else f"at most {args.sparsity} parameters change"
    return f"{args.norm} norm, {args.scale} scale, {dense}, eps {' '.join(f'{e:g}' for e in args.eps)}"


def _split_text(setup: Setup, split: str) -> str:
    n = setup.describe()["splits"][split]
    return f"the {split} split" + ("" if n is None else f" ({n} examples)")


def _print_header(command: str, setup: Setup) -> None:
    info = setup.describe()
    weights = f", weights {info['checkpoint']}" if info["checkpoint"] else ", weights as built"
    print(f"parashield {command}: {info['model']}{weights}, {info['parameters']} parameters, device {info['device']}")


def _write_json(path: Optional[Path], doc: Any) -> None:
    """Replace ``path`` with ``doc`` atomically (a temporary file in the same folder, then
    ``os.replace``), so that a run stopped at any moment leaves the last complete version."""
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(doc, f, indent=1)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class _Table:
    """Rows printed one by one under a header, numbers in ``%g`` style."""

    def __init__(self, columns: Sequence[tuple[str, str]]) -> None:
        self.columns = columns  # (key, title)
        self.widths = [max(11, len(title)) for _, title in columns]
        print("  ".join(f"{title:>{w}}" for (_, title), w in zip(columns, self.widths)))

    def row(self, values: dict) -> None:
        cells = [values.get(key) for key, _ in self.columns]
        text = ["-" if v is None else f"{v:.6g}" if isinstance(v, (int, float)) else str(v) for v in cells]
        print("  ".join(f"{t:>{w}}" for t, w in zip(text, self.widths)), flush=True)


# ------------------------------------------------------------------------------ attack
def cmd_attack(args: argparse.Namespace) -> int:
    from . import corrupted, make_corruption
    from .objective import overflow_to_inf

    setup = _setup(args, ("train", "test"))
    attack, test = setup.objective("train"), setup.objective("test")
    clean_train, clean_test = _clean_loss(setup, "train"), _clean_loss(setup, "test")
    options = {"multi_step": {"steps": args.steps, "restarts": args.restarts, "seed": args.seed},
               "random": {"trials": args.trials, "seed": args.seed}}.get(args.corruption, {})
    metric = setup.metric_name
    doc = {"command": "attack", **setup.describe(), "budget": _budget_doc(args),
           "corruption": {"kind": args.corruption, **options}, "searched_on": "train", "evaluated_on": "test",
           "metric": metric, "clean_train_loss": clean_train, "rows": [], "complete": False}
    _print_header("attack", setup)
    described = "".join(f", {k} {v}" if k in ("restarts", "seed") else f", {v} {k}" for k, v in options.items())
    print(f"corruption: {args.corruption}{described}; budget: {_budget_text(args)}")
    print(f"searched on {_split_text(setup, 'train')}, evaluated on {_split_text(setup, 'test')}")
    columns = [("eps", "eps"), ("loss", "test loss")] + ([(metric, metric)] if metric else [])
    table = _Table(columns + [("train_loss_change", "train loss change")])

    def record(row: dict) -> None:
        doc["rows"].append(row)
        table.row(row)
        _write_json(args.json, doc)

    def scored() -> dict:
        """The metric at the model's current weights (none without a known metric)."""
        return {metric: float(setup.metric(setup.model, setup.test_data))} if metric else {}

    record({"eps": 0.0, "loss": clean_test, **scored(), "train_loss_change": 0.0})
    for eps in args.eps:
        result = make_corruption(args.corruption, _budget(args, eps), **options)(attack)
        with corrupted(setup.model, result):
            record({"eps": eps, "loss": _or_inf(functools.partial(_current_loss, test)), **scored(),
                    "train_loss_change": overflow_to_inf(result.loss_change)})
    doc["complete"] = True
    _write_json(args.json, doc)
    return 0


# ------------------------------------------------------------------------------ evaluate
def cmd_evaluate(args: argparse.Namespace) -> int:
    from . import evaluate_robustness

    setup = _setup(args, ("train", "test"))
    attack, test = setup.objective("train"), setup.objective("test")
    _clean_loss(setup, "train")
    _clean_loss(setup, "test")
    metric = setup.metric_name
    _print_header("evaluate", setup)
    print(f"attack ensemble: Auto-PGD on the loss{' and the DLR margin' if args.classification else ''}, "
          f"{args.steps} steps x {args.restarts} runs per member; budget: {_budget_text(args)}")
    print(f"searched on {_split_text(setup, 'train')}, reported on {_split_text(setup, 'test')}")
    ev = evaluate_robustness(
        attack, _budget(args, args.eps[0]), eps=list(args.eps), classification=args.classification, heldout=test,
        metric=(lambda m: float(setup.metric(m, setup.test_data))) if metric else None,
        steps=args.steps, restarts=args.restarts, seed=args.seed)
    table = _Table([("eps", "eps"), ("attack_loss", "attack loss"), ("test_loss", "test loss")]
                   + ([(metric, metric)] if metric else []) + [("member", "found by")])
    first = ev.results[0]
    table.row({"eps": 0.0, "attack_loss": first.loss_before, "test_loss": first.heldout_before,
               metric: first.metric_before})
    for r in ev.results:
        table.row({"eps": r.eps, "attack_loss": r.loss_after, "test_loss": r.heldout_after, metric: r.metric_after,
                   "member": r.member})
    _write_json(args.json, {"command": "evaluate", **setup.describe(), "budget": _budget_doc(args),
                            "searched_on": "train", "evaluated_on": "test", "metric": metric, **ev.as_dict()})
    return 0


def _current_loss(objective: Objective) -> float:
    """L at the model's current (corrupted) weights, without the finiteness check."""
    with objective.probe() as probe:
        return float(probe.loss())


# ------------------------------------------------------------------------------ indicators
def cmd_indicators(args: argparse.Namespace) -> int:
    from . import hessian_top_eigenvalue, hessian_trace, layer_vulnerability, loss_change

    setup = _setup(args, ("train",))
    attack = setup.objective("train")
    clean = _clean_loss(setup, "train")
    doc: dict = {"command": "indicators", **setup.describe(), "budget": _budget_doc(args), "measured_on": "train",
                 "clean_loss": clean, "methods": list(args.methods), "indicators": [], "layers": None,
                 "complete": False}
    _print_header("indicators", setup)
    print(f"loss change indicators on {_split_text(setup, 'train')}, clean loss {clean:.6g}; budget: {_budget_text(args)}")
    table = _Table([("eps", "eps")] + [(m, m) for m in args.methods])
    for eps in args.eps:
        budget = _budget(args, eps)
        row = {"eps": eps, **{m: _or_inf(functools.partial(loss_change, attack, budget, m)) for m in args.methods}}
        doc["indicators"].append(row)
        table.row(row)
        _write_json(args.json, doc)

    eps = args.eps[0]
    layers = layer_vulnerability(attack, _budget(args, eps))
    doc["layers"] = {"method": "first_order", "eps": eps, "values": [vars(r) for r in layers]}
    shown = layers[: args.layers]
    print(f"\nper-layer vulnerability: first_order loss change with only that layer corrupted, eps {eps:g} "
          f"({args.norm} norm, {args.scale} scale), most vulnerable first ({len(shown)} of {len(layers)} layers)")
    width = max([len("layer")] + [len(r.name) for r in shown])
    print(f"  {'layer':<{width}}  {'parameters':>10}  {'loss change':>11}")
    for r in shown:
        print(f"  {r.name:<{width}}  {r.numel:>10}  {r.value:>11.6g}")
    if args.curvature:
        doc["hessian_top_eigenvalue"] = hessian_top_eigenvalue(attack)
        doc["hessian_trace"] = hessian_trace(attack)
        print(f"\ntop Hessian eigenvalue {doc['hessian_top_eigenvalue']:.6g}, trace {doc['hessian_trace']:.6g} "
              f"on {_split_text(setup, 'train')}")
    doc["complete"] = True
    _write_json(args.json, doc)
    return 0


# ------------------------------------------------------------------------------ landscape
def _landscape_alphas(span: float, points: int) -> list[float]:
    """``points`` values over [-span, span] (an even count is raised by one), symmetric, with
    0 exactly in the middle so that w itself is on the grid."""
    import torch

    half = torch.linspace(0.0, span, points // 2 + 1, dtype=torch.float64)
    return torch.cat([-half[1:].flip(0), half]).tolist()


def _landscape(args: argparse.Namespace, setup: Setup) -> dict:
    """The losses on lines along each corruption kind and, unless ``--surface none``, on a plane."""
    from . import Budget
    from .landscape import corruption_direction, loss_line, loss_surface, random_direction

    attack = setup.objective("train")
    clean = _clean_loss(setup, "train")
    budget = Budget("l2", args.eps, scale="layer")

    def direction(kind: str) -> list:
        """The corruption direction of ``kind``: layer-relative radius eps."""
        return corruption_direction(attack, kind, budget, **({"seed": args.seed} if kind == "random" else {}))

    def filter_random(seed: int) -> list:
        """A filter-normalized random direction scaled by eps: per layer as large as the budget."""
        return [args.eps * d for d in random_direction(attack, seed=seed)]

    alphas = _landscape_alphas(args.span, args.points)
    directions = {kind: direction(kind) for kind in args.directions}
    result: dict = {"command": "landscape", **setup.describe(), "measured_on": "train",
                    "budget": {"norm": "l2", "scale": "layer", "eps": args.eps}, "span": args.span, "seed": args.seed,
                    "clean_loss": clean,
                    "lines": {"directions": list(args.directions), "alphas": alphas,
                              "losses": {k: loss_line(attack, d, alphas).tolist() for k, d in directions.items()}},
                    "surface": None}
    if args.surface != "none":
        if args.surface == "random":
            d1, d2, names = filter_random(args.seed), filter_random(args.seed + 1), ["random", "random"]
        else:
            d1 = directions["multi_step"] if "multi_step" in directions else direction("multi_step")
            d2, names = filter_random(args.seed), ["multi_step", "random"]
        grid = _landscape_alphas(args.span, args.surface_points)
        result["surface"] = {"kind": args.surface, "directions": names, "alphas": grid, "betas": grid,
                             "losses": loss_surface(attack, d1, d2, grid, grid).tolist()}
    return result


def _write_landscape(out: Path, result: dict) -> list[Path]:
    """landscape.json and, where matplotlib is installed, the line and plane plots."""
    from .landscape import plot_line, plot_surface

    out.mkdir(parents=True, exist_ok=True)
    _write_json(out / "landscape.json", result)
    written = [out / "landscape.json"]
    what = f"{result['model']}, loss on the train split, eps={result['budget']['eps']:g}"
    lines, surface = result["lines"], result["surface"]
    try:
        written.append(plot_line(out / "landscape_lines.png", lines["alphas"], lines["losses"], result["clean_loss"],
                                 title=f"{what}: corruption directions"))
        if surface is not None:
            written.append(plot_surface(out / "landscape_surface.png", surface["alphas"], surface["betas"],
                                        surface["losses"], labels=surface["directions"],
                                        title=f"{what}: {surface['kind']} plane"))
    except ImportError as exc:
        print(f"parashield: no plots: {exc}", file=sys.stderr)
    return written


def cmd_landscape(args: argparse.Namespace) -> int:
    setup = _setup(args, ("train",))
    _print_header("landscape", setup)
    print(f"loss on {_split_text(setup, 'train')}; directions: corruptions in an l2 norm, layer scale budget, "
          f"eps {args.eps:g}; alpha in [-{args.span:g}, {args.span:g}]")
    result = _landscape(args, setup)
    print(f"clean loss {result['clean_loss']:.6g}")
    for kind, losses in result["lines"]["losses"].items():
        print(f"  {kind:<10} loss at alpha=-{args.span:g}: {losses[0]:.6g}, at alpha={args.span:g}: {losses[-1]:.6g}")
    print(f"wrote {', '.join(map(str, _write_landscape(args.out, result)))}")
    return 0


# ------------------------------------------------------------------------------ parser
class _Parser(argparse.ArgumentParser):
    """Errors read ``parashield: error: ...`` (exit status 2) in every subcommand."""

    def error(self, message: str):
        self.print_usage(sys.stderr)
        self.exit(2, f"parashield: error: {message}\n")


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Every option's help ends with its default, except where there is none."""

    def _get_help_string(self, action: argparse.Action) -> Optional[str]:
        if action.default is None or action.default is False or action.required:
            return action.help
        return super()._get_help_string(action)


def _add_threads(q: argparse.ArgumentParser) -> None:
    q.add_argument("--threads", type=positive_int, default=default_threads(),
                   help="torch CPU threads; the default is OMP_NUM_THREADS when set, else half the CPUs this "
                        "process may use, from 1 to 8 (torch's own default, every core, can make runs many "
                        "times slower on a machine busy with other jobs)")


def _add_source(q: argparse.ArgumentParser) -> None:
    g = q.add_argument_group("model and data: a built-in task (--task, --checkpoint), or your own code "
                             "(--model, --data, optional --loss and --checkpoint)")
    g.add_argument("--task", choices=_task_names(), help="a built-in task: its model, loss, metric and data")
    g.add_argument("--checkpoint", type=existing_file, metavar="FILE",
                   help="weights: a train.pt written by 'parashield reproduce' or save_checkpoint, or a plain "
                        "state_dict file (read with weights_only=True); required with --task")
    g.add_argument("--model", type=factory_ref, metavar="MODULE:FACTORY",
                   help="your model: factory() -> torch.nn.Module, from an importable module or path/to/file.py")
    g.add_argument("--data", type=factory_ref, metavar="MODULE:FACTORY",
                   help="your data: factory(split) -> one batch, a list of batches or a DataLoader; split is "
                        "'train' (corruptions are searched there) or 'test' (attack evaluates there)")
    g.add_argument("--loss", type=factory_ref, metavar="MODULE:FUNCTION",
                   help="your loss: function(model, batch) -> scalar tensor (the batch mean); default "
                        "cross-entropy of model(x) and y for (x, y) batches, which also reports accuracy")
    g.add_argument("--device", type=device, default="cpu", help="torch device to run on (cpu, cuda, cuda:1, mps)")


def _add_budget(q: argparse.ArgumentParser) -> None:
    g = q.add_argument_group("budget: the set S = {a : ||a||_p <= eps (scaled), at most SPARSITY nonzeros}")
    g.add_argument("--eps", type=finite_positive_float, nargs="+", default=[0.01, 0.05, 0.1],
                   help="corruption radii, finite and > 0 (relative to each layer's norm with --scale layer)")
    g.add_argument("--norm", default="l2", choices=["l1", "l2", "linf"], help="budget norm")
    g.add_argument("--scale", default="layer", choices=["none", "layer", "element"],
                   help="budget scale: absolute (none), relative to each layer's norm, or to each weight")
    g.add_argument("--sparsity", type=positive_int, default=None,
                   help="at most this many parameters change (needs --scale none or element); default dense")
    q.add_argument("--json", type=output_file, default=None, metavar="FILE",
                   help="also write the numbers to this JSON file, rewritten after each row")


def build_parser() -> argparse.ArgumentParser:
    from .corruption import CORRUPTION_KINDS
    from .indicators import METHODS as INDICATORS

    p = _Parser(prog="parashield", formatter_class=_HelpFormatter,
                description="Parameter corruption, loss change indicators and adversarial parameter defense.")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    def command(name: str, func: Callable, text: str) -> argparse.ArgumentParser:
        q = sub.add_parser(name, help=text, description=text, formatter_class=_HelpFormatter)
        q.set_defaults(func=func, parser=q)
        return q

    r = command("reproduce", cmd_reproduce, "train plain/one-step/SAM/APD models and evaluate them under corruption")
    r.add_argument("--task", type=csv_of(_task_names() + ["all"]), default="all",
                   help=f"task name, comma-separated names, or 'all' ({', '.join(_task_names())})")
    r.add_argument("--quick", action="store_true",
                   help="the whole protocol on digits with 2 seeds, short grids and 20 epochs: about a minute on 2 CPU cores")
    r.add_argument("--seeds", type=positive_int, default=None,
                   help="number of seeds (default: each task's own: 10 digits, 5 bbc and fashion, 3 ptb and translation)")
    r.add_argument("--methods", type=csv_of(_reproduce_methods()), default=None,
                   help=f"comma-separated subset of: {', '.join(_reproduce_methods())}; the APD K chosen on "
                   "validation is always added (default: each task's own set; --quick: all but apd2 and apd5)")
    r.add_argument("--out", type=output_folder, default="runs/reproduce", help="output folder (cache, report.md, results.json, plots)")
    r.add_argument("--profile", default="cpu", choices=["cpu", "gpu"],
                   help="task sizes: 'cpu' for two CPU cores; 'gpu' the larger configurations (tasks fashion-gpu, "
                   "ptb-gpu, translation-gpu: a ResNet, a two-layer LSTM on the full corpus, BLEU of a larger Transformer)")
    r.add_argument("--device", type=device, default="cpu",
                   help="torch device for training and evaluation (cpu, cuda, cuda:1); the cache does not depend on it, "
                   "so runs trained on a GPU can be evaluated on the CPU from their checkpoints")
    r.add_argument("--time-limit", type=finite_positive_float, default=None, metavar="MINUTES",
                   help="start no training epoch after this many minutes; every finished epoch is checkpointed and "
                   "the same command resumes (exit status 75 when stopped)")
    _add_threads(r)

    a = command("attack", cmd_attack, "corrupt a model's parameters and report the test loss and metric per eps")
    _add_source(a)
    _add_budget(a)
    a.add_argument("--corruption", default="multi_step", choices=list(CORRUPTION_KINDS), help="corruption type")
    a.add_argument("--steps", type=int_in(1, MAX_ITERATIONS), default=10, help="multi-step corruption steps")
    a.add_argument("--restarts", type=int_in(1, 10_000), default=1,
                   help="multi-step corruption runs, the first from the clean weights and the others from random "
                   "points of the budget; the worst is reported")
    a.add_argument("--trials", type=int_in(1, MAX_ITERATIONS), default=10, help="random corruption trials")
    a.add_argument("--seed", type=int_in(0, 2**63 - 2), default=0, help="seed of the random trials and restarts")
    _add_threads(a)

    e = command("evaluate", cmd_evaluate, "worst-case corruption of a model by the step-size-free attack ensemble")
    _add_source(e)
    _add_budget(e)
    e.add_argument("--classification", action="store_true",
                   help="add the DLR margin member (batches (x, y), model(x) the logits)")
    e.add_argument("--steps", type=int_in(1, MAX_ITERATIONS), default=25, help="most gradient passes of one run")
    e.add_argument("--restarts", type=int_in(1, 10_000), default=4, help="runs per member")
    e.add_argument("--seed", type=int_in(0, 2**63 - 2), default=0, help="seed of the random starts")
    _add_threads(e)

    i = command("indicators", cmd_indicators, "loss change indicators and per-layer vulnerability of a model")
    _add_source(i)
    _add_budget(i)
    i.add_argument("--methods", type=csv_of(INDICATORS), default=",".join(INDICATORS),
                   help=f"comma-separated indicators, of: {', '.join(INDICATORS)}")
    i.add_argument("--layers", type=positive_int, default=10, help="layers shown in the per-layer table (all in --json)")
    i.add_argument("--curvature", action="store_true", help="also the top Hessian eigenvalue and trace")
    _add_threads(i)

    ls = command("landscape", cmd_landscape, "plot the loss of a model on lines and a plane through its parameters")
    _add_source(ls)
    ls.add_argument("--out", type=output_folder, required=True,
                    help="output folder (created): landscape_lines.png, landscape_surface.png, landscape.json")
    ls.add_argument("--directions", type=csv_of(CORRUPTION_KINDS), default=",".join(CORRUPTION_KINDS),
                    help="comma-separated corruption kinds to draw lines along")
    ls.add_argument("--eps", type=finite_positive_float, default=0.05,
                    help="layer-relative L2 radius of the directions: alpha=1 is a corruption of this size")
    ls.add_argument("--points", type=int_in(3, MAX_LINE_POINTS), default=21,
                    help="points per line; an even number is raised by one so that w is on the grid")
    ls.add_argument("--span", type=finite_positive_float, default=2.0, help="alpha (and beta) run over [-span, span]")
    ls.add_argument("--surface", default="random", choices=["random", "adversarial", "none"],
                    help="plane through w: two filter-normalized random directions (random), the multi-step "
                         "corruption and a random direction (adversarial), or none")
    ls.add_argument("--surface-points", type=int_in(3, MAX_SURFACE_POINTS), default=11,
                    help="points per axis of the plane, raised to odd like --points")
    ls.add_argument("--seed", type=int_in(0, 2**63 - 2), default=0, help="seed of the random directions")
    _add_threads(ls)
    return p


def _conflicts(args: argparse.Namespace) -> Optional[str]:
    """What is wrong with a combination of arguments that are each valid, or None."""
    if args.command == "reproduce":
        return None
    if (args.task is None) == (args.model is None):
        return "give either --task (a built-in task) or --model (your own), not both" if args.task else \
            "give --task NAME --checkpoint FILE, or --model MODULE:FACTORY --data MODULE:FACTORY"
    if args.task is not None:
        extra = [o for o in ("data", "loss") if getattr(args, o) is not None]
        if extra:
            return f"--{extra[0]} goes with --model; --task brings its own data and loss"
        if args.checkpoint is None:
            return f"--task {args.task} needs --checkpoint FILE (e.g. a train.pt written by 'parashield reproduce')"
    elif args.data is None:
        return "--model needs --data MODULE:FACTORY, factory(split) -> batches"
    if getattr(args, "sparsity", None) is not None and args.scale == "layer":
        return "--sparsity cannot be combined with --scale layer (per-layer balls have no global top-n); use --scale none or element"
    return None


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run one command; returns 0, or exits with status 2 on bad input and 130 on Ctrl-C."""
    args = build_parser().parse_args(argv)
    problem = _conflicts(args)
    if problem:
        args.parser.error(problem)
    import torch

    torch.set_num_threads(args.threads)
    try:
        return args.func(args)
    except CommandError as exc:
        print(f"parashield: error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    except OSError as exc:  # a file that cannot be read or written after all (disk full, removed folder)
        print(f"parashield: error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    except KeyboardInterrupt:
        print("parashield: error: interrupted (Ctrl-C); files written so far are complete", file=sys.stderr)
        raise SystemExit(130) from None


if __name__ == "__main__":
    raise SystemExit(main())
