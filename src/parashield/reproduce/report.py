"""``results.json``, ``report.md`` and PNG plots from the protocol's results: references, the
choices made on validation, clean and corrupted metrics, the attack-strength check, and every
finding with its rule, paired numbers, interval and verdict."""

from __future__ import annotations

import math
import platform
from pathlib import Path
from typing import Optional

import torch

from .. import __version__
from .cache import strict_json, write_json
from .findings import (_row_collapsed, bitflip_comparisons, budget_comparisons, decide, drop, equal_compute_comparisons,
                       evals, run_methods, shaped_defense_comparisons)
from .runner import METHODS

#: one colour per method in every figure
COLORS = {m: f"C{i}" for i, m in enumerate(METHODS)}


def _fmt(x: Optional[float], digits: int = 4) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    if abs(x) >= 1e5 or (x != 0 and abs(x) < 10 ** -digits):
        return f"{x:.3g}"
    return f"{x:.{digits}f}"


def _ms(xs: list[float], digits: int = 4) -> str:
    xs = [x for x in xs if x is not None and not math.isnan(x)]
    if not xs:
        return "n/a"
    m = sum(xs) / len(xs)
    if len(xs) < 2 or any(math.isinf(x) for x in xs):
        return _fmt(m, digits)
    s = math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))
    return f"{_fmt(m, digits)} ± {_fmt(s, digits)}"


def _pair(p: dict, digits: int = 4) -> str:
    """Mean difference [95% interval], p (t) / p (sign flip), call."""
    return (f"{_fmt(p['mean'], digits)} [{_fmt(p['low'], digits)}, {_fmt(p['high'], digits)}], "
            f"p={_fmt(p['p_t'], 3)}/{_fmt(p['p_perm'], 3)}, **{p['call']}**")


def _label(m: str) -> str:
    return METHODS.get(m, m)


def _minus(tr: dict, a: str, b: str) -> str:
    """How an oriented difference reads in the metric's own terms: ``a - b`` when higher is
    better, ``b - a`` for perplexity (positive favours ``a`` either way)."""
    return f"{a} - {b}" if tr["higher_is_better"] else f"{b} - {a}"


def _damage(tr: dict) -> str:
    return "Drop" if tr["higher_is_better"] else "Rise"


def task_markdown(name: str, tr: dict, images: bool) -> list[str]:
    cfg, dec = tr["config"], tr["decision"]
    metric = cfg["metric_name"]
    lines = [f"## Task `{name}`", "",
             f"{', '.join(f'{k} {v}' for k, v in cfg['info'].items())}. Metric: test {metric} ({'higher' if tr['higher_is_better'] else 'lower'} is better; chance "
             f"{_fmt(tr['chance'])}). {tr['seeds']} seeds per method, paired by seed. Training: {cfg['epochs']} epochs of "
             f"{cfg['optimizer']} with a cosine schedule, keeping the epoch with the best clean validation metric. "
             f"Corruptions: layer-relative L2 (||a_l|| <= eps ||w_l|| per tensor), computed on a fixed subset of the "
             f"training data and evaluated on test data." + (f" Methods: {', '.join(tr['methods'])}." if tr.get("methods") else "")
             + (f" Command: `{tr['command']}`." if tr.get("command") else ""), ""]
    st = dec["meaningful"]
    lines += ["### References (classical baselines on the same splits)", "",
              f"| model | test {metric} | chosen on validation |", "|---|---|---|",
              f"| plain network (mean over seeds) | {_fmt(st['plain'])} | learning rate {tr['selection']['lr']['pick']} |"]
    for ref, r in tr["references"].items():
        lines.append(f"| {ref} | {_fmt(r['metric'])} | {r['selection'].get('pick', '-')} |")
    lines += ["", f"**Status: {'meaningful' if st['meaningful'] else 'NOT MEANINGFUL'}** (the plain network "
              f"{'beats' if st['meaningful'] else 'does not beat'} every reference).", ""]
    lines += ["### Choices made on validation (seed 0)", "", "| choice | candidates | validation score | pick |", "|---|---|---|---|"]
    edges = []
    for what, s in tr["selection"].items():
        edge = _at_grid_edge(s)
        edges += [what] if edge else []
        lines.append(f"| {what} | {', '.join(map(str, s['candidates']))} | "
                     f"{', '.join(_fmt(v) for v in s['validation'])} | **{s['pick']}**{' (edge)' if edge else ''} |")
    if edges:
        lines += ["", f"Picked at the edge of a grid of three or more values (a wider grid might pick further out): "
                      f"{', '.join(edges)}."]
    lines += ["", "Scores: clean validation metric for plain training's learning rate (`lr`); otherwise the mean (oriented) validation metric "
              "clean and under the 10-step corruption at every evaluation eps. SAM's rho grid is the defenses' eps grid times "
              "the plain model's weight norm, so that it spans APD's radius. APD includes the clean loss in its average "
              "unless the method says otherwise.", ""]
    lines += ["### Clean test metric", "", f"| method | passes per step | training compute (x plain) | {metric} | test loss |",
              "|---|---|---|---|---|"]
    methods = run_methods(tr)
    for m in methods:
        es = evals(tr, m)
        run = next(r for r in tr["runs"] if r["method"] == m)
        lines.append(f"| {_label(m)} | {run['passes']} | {run['compute']} | {_ms([e['clean']['metric'] for e in es])} | "
                     f"{_ms([e['clean']['loss'] for e in es], 3)} |")
    if dec.get("collapsed"):
        lines += ["", "**Collapsed runs** (training failed: the best clean validation metric at chance; test metric "
                  "in brackets): "
                  + ", ".join(f"{_label(c['method'])} seed {c['seed']} ({_fmt(c['metric'])})" for c in dec["collapsed"])
                  + ". They count in every clean "
                  "comparison and are left out of everything about robustness (drops, the attack-strength check, "
                  "rankings, per-layer, bit-flip and budget tables, plots), where a model at chance would look robust."]
    if dec.get("methods_without_runs"):
        lines += ["", f"Methods listed but not run: {', '.join(map(_label, dec['methods_without_runs']))}."]
    eps = [g["eps"] for g in evals(tr, "plain")[0]["grid"]]
    strength = dec["attack_strength"]
    names = {"multi_step": "10 steps", "multi_step_50": "50 steps", "multi_step_50x5": "50 steps x 5 restarts",
             "ensemble": "ensemble (Auto-PGD, loss + margin)" if metric == "accuracy" else "ensemble (Auto-PGD, loss)",
             "worst_case": "worst case of all attacks"}
    attacks = strength["attacks"]
    lines += ["", "### Attack strength", "", strength["rule"][0].upper() + strength["rule"][1:]
              + f": verdicts use **{names[strength['verdict_attack']]}**.", "",
              "| method | eps | " + " | ".join(f"{metric}: {names[a]}" for a in attacks) + " | "
              + " | ".join(f"loss: {names[a]}" for a in attacks) + " |", "|---|---|" + "---|" * (2 * len(attacks))]
    for r in strength["rows"]:
        lines.append(f"| {_label(r['method'])} | {r['eps']}{' (every model at chance under 10 steps)' if r.get('excluded') else ''} | "
                     + " | ".join(_fmt(r[a]['metric']) for a in attacks)
                     + " | " + " | ".join(_fmt(r[a]['loss'], 3) for a in attacks) + " |")
    mean_kind = "mean" if tr["higher_is_better"] else "geometric mean (capped at chance)"
    lines += ["", f"{mean_kind[0].upper() + mean_kind[1:]} over every method and included eps: "
              + ", ".join(f"{names[a]} {_fmt(strength['mean_metric'][a])}" for a in attacks) + "."]
    attack = dec["attack_strength"]["verdict_attack"]
    lines += ["", f"### {_damage(tr)} of {metric} from each model's own clean value ({attack}, test data, runs that "
              "did not collapse)", "",
              "| method | " + " | ".join(f"eps {e}" for e in eps) + " |", "|---|" + "---|" * len(eps)]
    for m in methods:
        es = evals(tr, m, alive=True)
        if not es:
            continue
        cells = [_ms([drop(tr, e, i, attack) for e in es]) for i in range(len(eps))]
        lines.append(f"| {_label(m)} | " + " | ".join(cells) + " |")
    plain = evals(tr, "plain", alive=True)
    if plain:
        lines += ["", "Random and one-step corruption at the same eps (plain models, test metric): "
                  + "; ".join(f"eps {g['eps']}: random {_ms([e['grid'][i]['random']['metric'] for e in plain])}, "
                              f"one-step {_ms([e['grid'][i]['one_step']['metric'] for e in plain])}"
                              for i, g in enumerate(plain[0]["grid"])) + ".", ""]
    if dec["excluded_points"]:
        lines += [f"Excluded (every model at chance): eps {', '.join(map(str, dec['excluded_points']))}.", ""]
    lines += ["### Findings", ""]
    if not dec["findings"]:
        lines += [f"- {dec['note']}" + (" (nor is any comparison made under bit flips, other budgets or at equal "
                                         "compute)" if "NOT MEANINGFUL" in dec["note"] else ""), ""]
    for f in dec["findings"]:
        lines += [f"#### {f['finding']}", "", f"Rule: {f['rule']}. **Verdict: {f['verdict']}**", ""]
        lines += _finding_rows(tr, f)
    if dec.get("k_ablation"):
        lines += ["#### APD's K against plain training (same rules as finding 4)", "",
                  f"| method | clean ({_minus(tr, 'APD', 'plain')}) | robust | {_damage(tr).lower()}s (plain - APD) per eps |",
                  "|---|---|---|---|"]
        for c in dec["k_ablation"]:
            lines.append(f"| {_label(c['a'])} | {_pair(c['clean'])} | {c['robust']} | "
                         + "; ".join(f"{r['eps']}: {_fmt(r['drop']['mean'])} ({r['drop']['call']})" for r in c["rows"]) + " |")
        lines.append("")
    if tr.get("equal_compute_comparisons"):
        lines += _equal_compute_markdown(tr)
    lines += _layers_markdown(tr)
    if tr.get("budget_comparisons"):
        lines += _budget_markdown(tr)
    for method, comps in (tr.get("shaped_defense_comparisons") or {}).items():
        lines += _shaped_defense_markdown(tr, method, comps)
    if tr.get("hessian_density"):
        share = next(iter(tr["hessian_density"].values())).get("negative_share", 0)
        below = f"-{share:g} x the largest" if share else "0"
        lines += ["#### Hessian spectrum (seed 0, attack data, stochastic Lanczos quadrature)", "",
                  f"| method | largest Ritz value | smallest | quadrature mass below {below} |", "|---|---|---|---|"]
        failed = {(c["method"], c["seed"]) for c in dec.get("collapsed", [])}
        lines += [f"| {_label(m)}{' (seed 0 collapsed)' if (m, 0) in failed else ''} | {_fmt(d['top'])} | "
                  f"{_fmt(d['bottom'])} | {_fmt(d['negative_mass'])} |" for m, d in tr["hessian_density"].items()]
        lines.append("")
    if tr.get("bitflips"):
        lines += _bitflip_markdown(tr)
    if images:
        lines += [f"![{name}: drop vs eps]({name}_drop_vs_eps.png)", "", f"![{name}: first-order vs measured]({name}_indicator.png)", "",
                  f"![{name}: measured per-layer vulnerability]({name}_layers.png)", ""]
        if tr.get("bitflips"):
            lines += [f"![{name}: bit flips]({name}_bitflips.png)", ""]
        if tr.get("hessian_density"):
            lines += [f"![{name}: Hessian density]({name}_hessian_density.png)", ""]
    return lines


def _finding_rows(tr: dict, f: dict) -> list[str]:
    if "comparisons" in f:
        lines = [f"| control | seeds | clean ({_minus(tr, 'APD', 'control')}) | robust | {_damage(tr).lower()} (control - APD) "
                 "and loss rise (control - APD) per included eps |",
                 "|---|---|---|---|---|"]
        for c in f["comparisons"]:
            cells = "<br>".join(f"eps {r['eps']}: {_damage(tr).lower()} {_pair(r['drop'])}; loss {_fmt(r['loss_rise']['mean'], 3)} "
                                f"({r['loss_rise']['call']})" for r in c["rows"]) or "no included eps"
            seeds = c["seeds"] if c.get("robust_seeds", c["seeds"]) == c["seeds"] else f"{c['seeds']} ({c['robust_seeds']} for drops)"
            if c.get("unpaired"):
                seeds = f"{seeds}; unpaired: " + ", ".join(f"{_label(m)} seeds {', '.join(map(str, ss))}"
                                                          for m, ss in c["unpaired"].items())
            lines.append(f"| {_label(c['b'])} | {seeds} | {_pair(c['clean'])} | **{c['robust']}** | {cells} |")
        return lines + [""]
    rows = f["rows"]
    if not rows:
        return ["No included grid point: every model sits at chance at every eps.", ""]
    if "indicator" in rows[0]:
        lines = ["| eps | indicator | Spearman rho [95%] | p | call |", "|---|---|---|---|---|"]
        lines += [f"| {r['eps']} | {r['indicator']} | {_fmt(r['rho'], 3)} [{_fmt(r['low'], 3)}, {_fmt(r['high'], 3)}] | "
                  f"{_fmt(r['p'], 3)} | {r['call']} |" for r in rows]
        return lines + [""]
    if "rel_error" in rows[0]:
        lines = ["| eps | first-order | one-step ΔL | relative error |", "|---|---|---|---|"]
        lines += [f"| {r['eps']} | {_fmt(r['first_order'], 5)} | {_fmt(r['one_step'], 5)} | {_fmt(r['rel_error'], 3)} |" for r in rows]
        return lines + [""]
    lines = ["| eps | paired difference [95%], p (t / sign flip), call |" + (" ratio |" if "ratio" in rows[0] else ""),
             "|---|---|" + ("---|" if "ratio" in rows[0] else "")]
    lines += [f"| {r['eps']} | {_pair(r['diff'])} |" + (f" {_fmt(r['ratio'], 1)} |" if "ratio" in r else "") for r in rows]
    return lines + [""]


def _layers_markdown(tr: dict) -> list[str]:
    methods = [m for m in ("plain", tr["headline"]) if m and evals(tr, m, alive=True)]
    if not methods:
        return []
    first = evals(tr, methods[0], alive=True)[0]
    which = "weight matrix" if tr["config"].get("layer_table") == "matrices" else "tensor"
    lines = [f"#### Per-layer vulnerability, measured (one {which} corrupted alone, 10-step, layer eps "
             f"{first['layers_eps']}, test metric, mean over seeds)", "", "| tensor | size | " + " | ".join(_label(m) for m in methods) + " |",
             "|---|---|" + "---|" * len(methods)]
    for i, row in enumerate(first["layers"]):
        lines.append(f"| {row['name']} | {row['numel']} | "
                     + " | ".join(_ms([e["layers"][i]["metric"] for e in evals(tr, m, alive=True)]) for m in methods) + " |")
    return lines + [""]


def _equal_compute_markdown(tr: dict) -> list[str]:
    metric = tr["config"]["metric_name"]
    by: dict = {}
    for r in tr["equal_compute"]:
        if not _row_collapsed(tr, r):
            by.setdefault(r["k"], []).append(r)
    eps = [e["eps"] for e in tr["equal_compute"][0]["ensemble"]]
    lines = ["#### APD's K at equal compute", "",
             f"Every K trained with the gradient passes of the largest K at {tr['config']['epochs']} epochs "
             "(fewer passes per step, more epochs; K = 1 is one-step training), each at its eps chosen on validation; "
             f"test {metric} clean and under the attack ensemble (runs that collapsed left out).", "",
             "| K | epochs | eps | clean | " + " | ".join(f"eps {e}" for e in eps) + " |",
             "|---|---|---|---|" + "---|" * len(eps)]
    for k, rs in sorted(by.items()):
        lines.append(f"| {k} | {rs[0]['epochs']} | {rs[0]['spec']['eps']} | {_ms([r['clean'] for r in rs])} | "
                     + " | ".join(_ms([r["ensemble"][i]["metric"] for r in rs]) for i in range(len(eps))) + " |")
    comps = tr["equal_compute_comparisons"]
    lines += ["", f"Each K against K = {comps[0]['b']}, paired over seeds (positive favours the larger K):", "",
              "| K | clean | " + " | ".join(f"drop at eps {r['eps']}" for r in comps[0]["rows"]) + " |",
              "|---|---|" + "---|" * len(comps[0]["rows"])]
    for c in comps:
        lines.append(f"| {c['a']} | {_pair(c['clean'])} | " + " | ".join(_pair(r["drop"]) for r in c["rows"]) + " |")
    if comps[0]["excluded"]:
        lines += ["", f"Excluded (every K at chance): {', '.join(comps[0]['excluded'])}."]
    return lines + [""]


#: how each shaped defense's budget reads in the report
_SHAPE_BUDGETS = {"apd_linf": "||a_l||_inf <= eps ||w_l||_inf",
                  "apd_sparse": "||a||_2 <= eps ||w_plain||_2 on at most 1% of the parameters"}


def _at_grid_edge(choice: dict) -> bool:
    """Whether a numeric pick is the smallest or largest of three or more candidates."""
    values = choice.get("candidates") or []
    if len(values) < 3 or not all(isinstance(v, (int, float)) for v in values):
        return False
    return choice["pick"] in (min(values), max(values))


def _shaped_defense_markdown(tr: dict, method: str, comps: list[dict]) -> list[str]:
    d = tr["shaped_defenses"][method]
    sel = d["selection"]
    lines = [f"#### {d['label']}", "",
             f"The headline APD (K={sel['spec']['steps']}) trained with {_SHAPE_BUDGETS[method]}; eps chosen on "
             f"validation under corruption of that shape from {', '.join(map(str, sel['candidates']))} (scores "
             f"{', '.join(_fmt(v) for v in sel['validation'])}): **{sel['pick']}**"
             f"{' (the edge of the grid)' if _at_grid_edge(sel) else ''}. Measured under the budgets above; "
             "positive differences favour this APD.", "",
             "| against | clean (corrupted-subset) | budget | eps | drop (other - this APD) |", "|---|---|---|---|---|"]
    for c in comps:
        for i, r in enumerate(c["rows"]):
            lines.append(f"| {_label(c['b'])} | {_pair(c['clean']) if i == 0 else ''} | {r['budget']} | {r['eps']} | "
                         f"{_pair(r['drop'])} |")
    return lines + [""]


def _budget_markdown(tr: dict) -> list[str]:
    metric = tr["config"]["metric_name"]
    lines = [f"#### Other budget shapes (10-step corruption; {_damage(tr).lower()} of test {metric}, control's - APD's)", "",
             "L-inf layer: ||a_l||_inf <= eps ||w_l||_inf per tensor. L2 sparse 1%: ||a||_2 <= eps ||w||_2 with at most 1% of "
             "the parameters changed. Every model was trained with the layer-relative L2 budget.", "",
             f"| control | budget | eps | {_damage(tr).lower()} (control - APD) |", "|---|---|---|---|"]
    for c in tr["budget_comparisons"]:
        for r in c["rows"]:
            lines.append(f"| {_label(c['b'])} | {r['budget']} | {r['eps']} | {_pair(r['drop'])} |")
    excluded = tr["budget_comparisons"][0]["excluded"] if tr["budget_comparisons"] else []
    if excluded:
        lines += ["", f"Excluded (every model at chance): {', '.join(excluded)}."]
    return lines + [""]


def _alive_flips(tr: dict) -> list[dict]:
    """Bit-flip rows of the runs that did not collapse."""
    failed = {(c["method"], c["seed"]) for c in tr["decision"].get("collapsed", [])}
    return [r for r in tr["bitflips"] if (r["method"], r["seed"]) not in failed]


def _flip_cell(p: dict) -> str:
    if p.get("kind") == "censored":
        return (f"APD more {p['a_more']}, control more {p['b_more']}, equal {p['equal']}, unknown {p['unknown']}; "
                f"sign test p={_fmt(p['p'], 3)}, **{p['call']}**")
    return _pair(p, 3)


def _bitflip_markdown(tr: dict) -> list[str]:
    metric = tr["config"]["metric_name"]
    by: dict = {}
    for r in _alive_flips(tr):
        by.setdefault(r["method"], []).append(r)
    if not by:
        return []
    counts = [row["flips"] for row in tr["bitflips"][0]["random"]]
    lines = [f"### {metric} under int8 bit flips (per-channel scales; runs that did not collapse)", "",
             "| method | int8 clean | " + " | ".join(f"random {n}" for n in counts)
             + " | searched flips to halve (mean of the seeds that halved) | never halved within the budget |",
             "|---|---|" + "---|" * (len(counts) + 2)]
    for m, rs in by.items():
        halves = [r["search"]["flips_to_halve"] for r in rs]
        lines.append(f"| {_label(m)} | {_ms([r['quantized_metric'] for r in rs])} | "
                     + " | ".join(_ms([x for r in rs for x in r['random'][i]['metrics']]) for i in range(len(counts)))
                     + f" | {_ms([h for h in halves if h is not None], 1)} | {sum(h is None for h in halves)}/{len(rs)} |")
    if "float32_exponent" in tr["bitflips"][0]:
        fcounts = [row["flips"] for row in tr["bitflips"][0]["float32_exponent"]["random"]]
        lines += ["", f"{metric} of the float32 model under random exponent-bit flips of its weights:", "",
                  "| method | float32 clean | " + " | ".join(f"{n} exponent flips" for n in fcounts) + " |",
                  "|---|---|" + "---|" * len(fcounts)]
        for m, rs in by.items():
            lines.append(f"| {_label(m)} | {_ms([r['float32_exponent']['float_metric'] for r in rs])} | "
                         + " | ".join(_ms([x for r in rs for x in r["float32_exponent"]["random"][i]["metrics"]])
                                      for i in range(len(fcounts))) + " |")
    comps = tr.get("bitflip_comparisons")
    if not comps:
        return lines + [""]
    names = list(comps[0]["rows"])
    lines += ["", f"Headline APD against each control, paired by seed, on drops from each model's own int8 {metric} "
              f"(float32 rows: from its float32 {metric}); verdict by finding 4's rule over the int8 rows "
              "(float32 rows: their own):", "",
              "| control | seeds | int8 verdict | float32 verdict | " + " | ".join(names) + " |",
              "|---|---|---|---|" + "---|" * len(names)]
    for c in comps:
        lines.append(f"| {_label(c['b'])} | {c['seeds']} | **{c['robust']}** | {c.get('robust_float32') or '-'} | "
                     + " | ".join(_flip_cell(c["rows"][k]) + (" (excluded: every model at chance)" if k in c.get("excluded", [])
                                                               else "") for k in names) + " |")
    budget = tr.get("bitflip_config", {}).get("search_flips")
    return lines + ["", "Positive differences favour APD (a smaller drop). The progressive search stops once a model's "
                    "metric has halved, so after that its metric stays at the halved value: the 'after n searched' rows "
                    "understate the drops of the models that halved early. Flips to halve are censored at the search "
                    f"budget ({budget} flips): a pair in which neither model halved has an unknown order and is left out "
                    "of the sign test.", ""]


def summary_table(results: dict) -> list[str]:
    lines = ["| task | status | plain | best reference | headline APD | clean, APD vs plain (positive favours APD) | "
             "more robust than plain? |",
             "|---|---|---|---|---|---|---|"]
    for name, tr in results["tasks"].items():
        dec = tr["decision"]
        refs = tr["references"]
        best = max(refs.items(), key=lambda kv: (1 if tr["higher_is_better"] else -1) * kv[1]["metric"])
        head = _ms([e["clean"]["metric"] for e in evals(tr, tr["headline"])]) if tr["headline"] else "not run"
        f4 = next((f for f in dec["findings"] if "comparisons" in f), None)
        vs = next((c for c in f4["comparisons"] if c["b"] == "plain"), None) if f4 else None
        lines.append(f"| {name} ({tr['config']['metric_name']}, {tr['seeds']} seeds) | {'meaningful' if dec['meaningful']['meaningful'] else 'NOT MEANINGFUL'} | "
                     f"{_ms([e['clean']['metric'] for e in evals(tr, 'plain')])} | {best[0]} {_fmt(best[1]['metric'])} | "
                     f"{tr['headline'] + ': ' if tr['headline'] else ''}{head} | {_pair(vs['clean']) if vs else 'not decided'} | {vs['robust'] if vs else 'not decided'} |")
    return lines


def _plots(name: str, tr: dict, out: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    metric = tr["config"]["metric_name"]
    attack = tr["decision"]["attack_strength"]["verdict_attack"]
    sign = 1 if tr["higher_is_better"] else -1
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), sharex=True)
    for m in run_methods(tr):
        es = evals(tr, m, alive=True)
        if not es:
            continue
        eps = [g["eps"] for g in es[0]["grid"]]
        for ax, what in zip(axes, ("metric", "loss")):
            if what == "metric":
                ys = [[drop(tr, e, i, attack) for e in es] for i in range(len(eps))]
            else:
                ys = [[e["grid"][i][attack]["loss"] - e["clean"]["loss"] for e in es] for i in range(len(eps))]
            mean = [sum(y) / len(y) for y in ys]
            sd = [math.sqrt(sum((v - mu) ** 2 for v in y) / max(len(y) - 1, 1)) for y, mu in zip(ys, mean)]
            ax.errorbar(eps, mean, yerr=sd, marker="o", capsize=2, color=COLORS.get(m), label=_label(m))
    axes[0].set_ylabel(f"drop of test {metric}")
    axes[1].set_ylabel("rise of test loss")
    axes[1].set_yscale("symlog", linthresh=1e-2)
    grid_eps = [g["eps"] for g in evals(tr, "plain")[0]["grid"]]
    for ax in axes:
        ax.set_xscale("log")
        ax.set_xticks(grid_eps, [f"{e:g}" for e in grid_eps])
        ax.minorticks_off()
        ax.set_xlabel("layer-relative eps")
    axes[0].legend(fontsize=6)
    fig.suptitle(f"{name}: {attack} corruption (mean ± sd over seeds)")
    fig.tight_layout()
    fig.savefig(out / f"{name}_drop_vs_eps.png", dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(5, 4))
    for m in run_methods(tr):
        pts = [(s["first_order"], s["one_step"]) for e in evals(tr, m, alive=True) for s in e["sweep"]]
        pts = [p for p in pts if p[0] > 0 and p[1] > 0]
        ax.scatter([p[0] for p in pts], [p[1] for p in pts], s=12, color=COLORS.get(m), label=_label(m))
    lims = ax.get_xlim()
    ax.plot(lims, lims, "k--", lw=1, label="y = x")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("first-order indicator eps·||g||")
    ax.set_ylabel("measured one-step loss change")
    ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(out / f"{name}_indicator.png", dpi=110)
    plt.close(fig)

    methods = [m for m in ("plain", tr["headline"]) if m and evals(tr, m, alive=True)]
    names = [r["name"] for r in evals(tr, methods[0], alive=True)[0]["layers"]] if methods else []
    fig, ax = plt.subplots(figsize=(7, 0.35 * len(names) + 1.5))
    h = 0.8 / max(len(methods), 1)
    for j, m in enumerate(methods):
        es = evals(tr, m, alive=True)
        vals = [sum(sign * (e["clean"]["corrupted_subset_metric"] - e["layers"][i]["metric"]) for e in es) / len(es) for i in range(len(names))]
        ax.barh([i + j * h for i in range(len(names))], vals, height=h, color=COLORS.get(m), label=_label(m))
    ax.set_yticks([i + h * (len(methods) - 1) / 2 for i in range(len(names))], names, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel(f"drop of test {metric}, one tensor corrupted")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / f"{name}_layers.png", dpi=110)
    plt.close(fig)

    if tr.get("hessian_density"):
        fig, ax = plt.subplots(figsize=(6, 3.8))
        for m, d in tr["hessian_density"].items():
            ax.plot(d["grid"], [max(v, 1e-8) for v in d["density"]], color=COLORS.get(m), label=_label(m))
        ax.set_yscale("log")
        ax.set_xlabel("Hessian eigenvalue")
        ax.set_ylabel("density")
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / f"{name}_hessian_density.png", dpi=110)
        plt.close(fig)

    if tr.get("bitflips") and _alive_flips(tr):
        fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.8), sharey=True)
        flips = _alive_flips(tr)
        for m in dict.fromkeys(r["method"] for r in flips):
            rs = [r for r in flips if r["method"] == m]
            counts = [row["flips"] for row in rs[0]["random"]]
            a1.plot(counts, [sum(sum(r["random"][i]["metrics"]) / len(r["random"][i]["metrics"]) for r in rs) / len(rs)
                             for i in range(len(counts))], marker="o", color=COLORS.get(m), label=_label(m))
            for k, r in enumerate(rs):
                hist = r["search"]["metric_history"]
                a2.plot(range(len(hist)), hist, color=COLORS.get(m), alpha=0.6, label=_label(m) if k == 0 else None)
        a1.set_xscale("log")
        a1.set_xlabel("random bit flips")
        a2.set_xlabel("searched bit flips")
        a1.set_ylabel(f"test {metric} (int8)")
        a1.legend(fontsize=6)
        fig.tight_layout()
        fig.savefig(out / f"{name}_bitflips.png", dpi=110)
        plt.close(fig)
    return True


def write_report(results: dict, out: Path) -> Path:
    """Decide every task's findings and write ``results.json``, ``report.md`` and the plots."""
    out.mkdir(parents=True, exist_ok=True)
    results = dict(results)
    results["versions"] = {"parashield": __version__, "torch": torch.__version__, "python": platform.python_version()}
    body, plotted = [], True
    for name, tr in results["tasks"].items():
        tr["decision"] = decide(tr)
        if "linf_defense" in tr and "shaped_defenses" not in tr:  # a results.json from before the n-sparse defense
            tr["shaped_defenses"] = {"apd_linf": {"label": "APD trained with an L-inf budget", **tr.pop("linf_defense")}}
        for key in ("bitflip_comparisons", "budget_comparisons", "equal_compute_comparisons", "shaped_defense_comparisons"):
            tr.pop(key, None)  # recomputed below, or absent where nothing may be decided
        if tr["decision"]["meaningful"]["meaningful"]:  # a task that decides nothing compares nothing
            if tr.get("bitflips"):
                tr["bitflip_comparisons"] = bitflip_comparisons(tr)
            if tr.get("budget_ablation"):
                tr["budget_comparisons"] = budget_comparisons(tr)
            if tr.get("equal_compute"):
                tr["equal_compute_comparisons"] = equal_compute_comparisons(tr)
            if tr.get("shaped_defenses"):
                tr["shaped_defense_comparisons"] = shaped_defense_comparisons(tr)
        images = _plots(name, tr, out)
        plotted &= images
        body += task_markdown(name, tr, images)
    header = ["# parashield reproduction report", "",
              f"parashield {__version__}, torch {torch.__version__}, Python {platform.python_version()}. "
              "Every choice was made on validation data; test data is read only by the final evaluation. "
              "Differences are per-seed paired: mean [95% t interval], p-values of the paired t-test and the exact "
              "sign-flip test, and the call (better / worse only when the interval excludes 0).", ""]
    if not plotted:
        header += ["matplotlib is not installed: no plots were drawn.", ""]
    header += ["## Summary", "", *summary_table(results), ""]
    write_json(out / "results.json", strict_json(results))
    (out / "report.md").write_text("\n".join(header + body) + "\n")
    return out / "report.md"
