"""Aggregate runs over seeds into ``results.json``, ``report.md`` and PNG plots, and decide the
papers' four findings from the numbers."""

from __future__ import annotations

import math
import platform
from pathlib import Path
from typing import Any, Optional

import torch

from .. import __version__
from .runner import CORRUPTIONS, METHODS, mean_std, write_json


def _fmt(m: float, s: Optional[float] = None, digits: int = 3) -> str:
    if m is None or math.isnan(m):
        return "n/a"
    if math.isinf(m):
        return "inf" if m > 0 else "-inf"
    if abs(m) >= 1e6:  # an exploded perplexity or loss: fixed point would print dozens of digits
        return f"{m:.3e}" if s is None else f"{m:.3e} ± {s:.2e}"
    text = f"{m:.{digits}f}"
    return text if s is None else f"{text} ± {s:.{digits}f}"


def _fmt_sig(m: float, s: float) -> str:
    """Mean ± std with 3 significant digits (eps values span decades)."""
    if m is None or math.isnan(m) or math.isinf(m):
        return _fmt(m)
    return f"{m:.3g} ± {s:.2g}"


def summarize(task_result: dict) -> dict:
    """Mean and std over seeds of every number, keyed by method."""
    by_method: dict[str, list[dict]] = {}
    for r in task_result["runs"]:
        by_method.setdefault(r["method"], []).append(r["eval"])
    summary: dict[str, Any] = {}
    for method, evals in by_method.items():
        s: dict[str, Any] = {
            "seeds": len(evals),
            "clean_metric": mean_std([e["clean"]["metric"] for e in evals]),
            "clean_loss": mean_std([e["clean"]["loss"] for e in evals]),
            "grid": [],
            "critical_eps": {k: mean_std([e["critical_eps"][k] for e in evals]) for k in evals[0]["critical_eps"]},
        }
        for i, row in enumerate(evals[0]["grid"]):
            rows = [e["grid"][i] for e in evals]
            entry = {"scale": row["scale"], "eps": row["eps"]}
            for kind in CORRUPTIONS:
                entry[kind] = {"metric": mean_std([r[kind]["metric"] for r in rows]),
                               "loss": mean_std([r[kind]["loss"] for r in rows])}
            entry["indicators"] = {k: mean_std([r["indicators"][k] for r in rows]) for k in row["indicators"]}
            s["grid"].append(entry)
        s["layers"] = evals[0]["layers"]
        s["sweep"] = [{"eps": row["eps"], "first_order": mean_std([e["sweep"][i]["first_order"] for e in evals]),
                       "one_step": mean_std([e["sweep"][i]["one_step"] for e in evals])}
                      for i, row in enumerate(evals[0].get("sweep", []))]
        if "hessian" in evals[0]:
            s["hessian"] = {k: mean_std([e["hessian"][k] for e in evals]) for k in evals[0]["hessian"]}
        summary[method] = s
    return summary


def findings(task_result: dict, summary: dict) -> list[dict]:
    """The four findings, each with its verdict and the numbers that decide it."""
    out = []
    hib = task_result.get("higher_is_better", task_result["config"]["metric_name"] != "perplexity")
    plain = summary.get("plain")
    if plain:
        grid = plain["grid"]
        ratios = [(g["indicators"]["one_step"][0], g["indicators"]["random"][0], g) for g in grid]
        dec = [f"{g['scale']} eps={g['eps']}: one-step ΔL={a:.4f}, random ΔL={b:.4f}" for a, b, g in ratios]
        ok = all(a > 5 * max(b, 0) and a > 0 for a, b, _ in ratios)
        out.append({"finding": "1. random corruption barely moves the loss; gradient corruption of the same norm raises it far more",
                    "confirmed": ok, "evidence": dec, "rule": "one-step ΔL > 5 × random ΔL at every eps (plain model)"})
        pairs = [(g["indicators"]["multi_step"][0], g["indicators"]["one_step"][0], g) for g in grid]
        ok = all(m >= o - 1e-6 for m, o, _ in pairs) and any(m > 1.05 * o for m, o, _ in pairs)
        out.append({"finding": "2. multi-step corruption beats one-step at the same eps",
                    "confirmed": ok,
                    "evidence": [f"{g['scale']} eps={g['eps']}: multi-step ΔL={m:.4f}, one-step ΔL={o:.4f}" for m, o, g in pairs],
                    "rule": "multi-step ΔL >= one-step ΔL at every eps and > 1.05× at some eps"})
        sweep = plain.get("sweep", [])
        if len(sweep) >= 2:
            rel = [abs(r["first_order"][0] - r["one_step"][0]) / max(abs(r["one_step"][0]), 1e-12) for r in sweep]
            ok = rel[0] < 0.1 and rel[0] <= rel[-1]
            out.append({"finding": "3. the first-order indicator matches the true loss change as eps -> 0",
                        "confirmed": ok,
                        "evidence": [f"layer eps={r['eps']}: first-order={r['first_order'][0]:.3g}, one-step ΔL={r['one_step'][0]:.3g}, "
                                     f"rel. error={e:.3f}" for r, e in zip(sweep, rel)],
                        "rule": "relative error < 0.1 at the smallest eps and not larger than at the largest (plain model)"})
    apds = [m for m in summary if m.startswith("apd")]
    if plain and apds:
        best = max(apds, key=lambda m: summary[m]["clean_metric"][0] * (1 if hib else -1))
        b, p = summary[best], plain
        sign = 1 if hib else -1
        clean_gain = sign * (b["clean_metric"][0] - p["clean_metric"][0])
        under = []
        for gb, gp in zip(b["grid"], p["grid"]):
            under.append((gb["scale"], gb["eps"], gb["multi_step"]["metric"][0], gp["multi_step"]["metric"][0]))
        wins = sum(1 for _, _, x, y in under if sign * (x - y) > 0)
        one = summary.get("one_step")
        one_wins = None
        if one:
            one_wins = sum(1 for gb, go in zip(b["grid"], one["grid"]) if sign * (gb["multi_step"]["metric"][0] - go["multi_step"]["metric"][0]) > 0)
        ok = clean_gain >= 0 and wins >= len(under) * 0.75 and (one_wins is None or one_wins >= len(under) * 0.5)
        ev = [f"clean {task_result['config']['metric_name']}: {best} {b['clean_metric'][0]:.4f} vs plain {p['clean_metric'][0]:.4f}"
              + (f" vs one-step {one['clean_metric'][0]:.4f}" if one else "")
              + (f" vs SAM {summary['sam']['clean_metric'][0]:.4f}" if "sam" in summary else "")]
        ev += [f"{s} eps={e}: under multi-step {best} {x:.4f} vs plain {y:.4f}" for s, e, x, y in under]
        ev.append(f"{best} beats plain under multi-step corruption at {wins}/{len(under)} eps"
                  + (f", beats one-step at {one_wins}/{len(under)}" if one_wins is not None else ""))
        out.append({"finding": "4. APD gives better clean metrics and much better metrics under corruption than plain and one-step training",
                    "confirmed": ok, "evidence": ev,
                    "rule": "clean metric >= plain, better than plain under multi-step corruption at >= 75% of eps, better than one-step at >= 50%"})
    return out


def write_report(results: dict, out: Path) -> Path:
    """Write ``results.json``, ``report.md`` and the plots for every task in ``results``."""
    out.mkdir(parents=True, exist_ok=True)
    results = dict(results)
    results["versions"] = {"parashield": __version__, "torch": torch.__version__, "python": platform.python_version()}
    lines = []
    for name, tr in results["tasks"].items():
        summary = tr["summary"] = summarize(tr)
        tr["findings"] = findings(tr, summary)
        if tr.get("bitflips"):
            tr["bitflip_summary"] = bitflip_summary(tr)
            tr["bitflip_verdict"] = bitflip_verdict(tr["bitflip_summary"])
        lines += _task_markdown(name, tr, summary)
        _plots(name, tr, summary, out)
        lines += [f"![{name}: metric vs eps]({name}_metric_vs_eps.png)", "",
                  f"![{name}: first-order indicator vs measured loss change]({name}_indicator.png)", "",
                  f"![{name}: per-layer vulnerability]({name}_layers.png)", ""]
        if tr.get("bitflips"):
            _bitflip_plot(name, tr, out)
            lines += [f"![{name}: {tr['config']['metric_name']} under bit flips]({name}_bitflips.png)", ""]
    header = ["# parashield reproduction report", "",
              f"parashield {__version__}, torch {torch.__version__}, Python {platform.python_version()}.", "",
              "## Summary", "", *summary_table(results), ""]
    write_json(out / "results.json", results)
    (out / "report.md").write_text("\n".join(header + lines) + "\n")
    return out / "report.md"


def summary_table(results: dict) -> list[str]:
    """One row per task and method: the clean metric and the metric under the multi-step
    corruption at the middle and largest layer-relative eps (mean ± std over seeds); reads
    each task's ``summary``."""
    lines = ["| task | method | clean | multi-step, layer eps (mid) | multi-step, layer eps (max) |",
             "|---|---|---|---|---|"]
    for name, tr in results["tasks"].items():
        metric = tr["config"]["metric_name"]
        for method, s in tr["summary"].items():
            rows = sorted((g for g in s["grid"] if g["scale"] == "layer"), key=lambda g: g["eps"])
            if not rows:
                continue
            mid, top = rows[len(rows) // 2], rows[-1]
            lines.append(f"| {name} ({metric}) | {METHODS.get(method, method)} | {_fmt(*s['clean_metric'], digits=4)} | "
                         f"{_fmt(*mid['multi_step']['metric'], digits=4)} (eps {mid['eps']}) | "
                         f"{_fmt(*top['multi_step']['metric'], digits=4)} (eps {top['eps']}) |")
    return lines


def _task_markdown(name: str, tr: dict, summary: dict) -> list[str]:
    cfg = tr["config"]
    metric = cfg["metric_name"]
    seeds = max(s["seeds"] for s in summary.values())
    lines = [f"## Task `{name}`", "",
             f"Metric: {metric} on held-out data; mean ± std over {seeds} seed(s). Corruptions are L2, computed on "
             f"training data ({cfg['multi_steps']}-step multi-step, {cfg['random_trials']} random trials) and "
             f"evaluated on test data. Defenses train with a layer-relative L2 budget eps={cfg['train_eps']} "
             f"(SAM rho={cfg['sam_rho']}); {cfg['epochs']} epochs, {cfg['optimizer']} lr={cfg['lr']}. {cfg['info']}", ""]
    train_times = {m: mean_std([r["train"]["seconds"] for r in tr["runs"] if r["method"] == m])[0] for m in summary}
    compute = sum(r["train"]["seconds"] + r.get("eval_seconds", 0.0) for r in tr["runs"])
    compute += sum(r["search"]["seconds"] for r in tr.get("bitflips", []))
    lines += [f"Compute: {compute / 60:.1f} min of training and evaluation over {len(tr['runs'])} runs "
              f"(as measured when each run was made; cached runs cost nothing to report again).", ""]
    lines += ["| method | clean " + metric + " | clean loss | train s/run |", "|---|---|---|---|"]
    for m, s in summary.items():
        lines.append(f"| {METHODS.get(m, m)} | {_fmt(*s['clean_metric'], digits=4)} | {_fmt(*s['clean_loss'])} | {train_times.get(m, 0):.1f} |")
    grid0 = next(iter(summary.values()))["grid"]
    header = "| method | corruption | " + " | ".join(f"{g['scale']} {g['eps']}" for g in grid0) + " |"
    for field, title, digits in (("metric", metric, 4), ("loss", "test loss", 3)):
        lines += ["", f"### {title} under corruption", "", header, "|---|---|" + "---|" * len(grid0)]
        for m, s in summary.items():
            for kind in CORRUPTIONS:
                cells = " | ".join(_fmt(*g[kind][field], digits=digits) for g in s["grid"])
                lines.append(f"| {METHODS.get(m, m)} | {kind} | {cells} |")
    lines += ["", "### Loss change indicators (training data)", ""]
    kinds = list(grid0[0]["indicators"])
    lines += ["| method | eps | " + " | ".join(kinds) + " |", "|---|---|" + "---|" * len(kinds)]
    for m, s in summary.items():
        for g in s["grid"]:
            lines.append(f"| {METHODS.get(m, m)} | {g['scale']} {g['eps']} | " + " | ".join(_fmt(*g["indicators"][k], digits=4) for k in kinds) + " |")
    kinds_c = list(next(iter(summary.values()))["critical_eps"])
    lines += ["", f"### Critical eps ({tr['runs'][0]['eval']['critical_eps_definition']})", "",
              "| method | " + " | ".join(kinds_c) + " |", "|---|" + "---|" * len(kinds_c)]
    for m, s in summary.items():
        lines.append(f"| {METHODS.get(m, m)} | " + " | ".join(_fmt_sig(*s["critical_eps"][k]) for k in kinds_c) + " |")
    if any("hessian" in s for s in summary.values()):
        lines += ["", "### Curvature (training data)", "", "| method | top Hessian eigenvalue | Hessian trace |", "|---|---|---|"]
        for m, s in summary.items():
            if "hessian" in s:
                lines.append(f"| {METHODS.get(m, m)} | {_fmt(*s['hessian']['top_eigenvalue'])} | {_fmt(*s['hessian']['trace'])} |")
    plain = summary.get("plain") or next(iter(summary.values()))
    eps_l = tr["runs"][0]["eval"]["layers_eps"]
    lines += ["", f"### Per-layer vulnerability (first-order indicator, layer-relative L2 eps={eps_l}, seed 0, "
              f"{'plain' if 'plain' in summary else next(iter(summary))})", "", "| layer | size | indicator |", "|---|---|---|"]
    for row in plain["layers"][:12]:
        lines.append(f"| {row['name']} | {row['numel']} | {row['value']:.5f} |")
    if tr.get("bitflips"):
        lines += _bitflip_markdown(tr)
    lines += ["", "### Findings", ""]
    if not tr["findings"]:
        lines.append("- not decided: findings 1-3 need the plain method, finding 4 plain and an APD method")
    for f in tr["findings"]:
        lines.append(f"- **{f['finding']}**: {'CONFIRMED' if f['confirmed'] else 'NOT CONFIRMED'} (rule: {f['rule']})")
        lines += [f"  - {e}" for e in f["evidence"]]
    return lines + [""]


def _plots(name: str, tr: dict, summary: dict, out: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    metric = tr["config"]["metric_name"]
    scales = sorted({g["scale"] for g in next(iter(summary.values()))["grid"]})
    fig, axes = plt.subplots(len(scales), len(CORRUPTIONS), figsize=(4 * len(CORRUPTIONS), 3.2 * len(scales)), squeeze=False)
    for i, scale in enumerate(scales):
        for j, kind in enumerate(CORRUPTIONS):
            ax = axes[i][j]
            for m, s in summary.items():
                rows = [g for g in s["grid"] if g["scale"] == scale]
                eps = [g["eps"] for g in rows]
                mean = [g[kind]["metric"][0] for g in rows]
                std = [g[kind]["metric"][1] for g in rows]
                ax.errorbar(eps, mean, yerr=std, marker="o", capsize=2, label=METHODS.get(m, m))
            ax.set_xscale("log")
            ax.set_title(f"{kind}, {scale} eps")
            ax.set_xlabel("eps")
            ax.set_ylabel(metric)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / f"{name}_metric_vs_eps.png", dpi=110)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(5, 4))
    for m, s in summary.items():
        pts = [(g["indicators"]["first_order"][0], g["indicators"]["one_step"][0]) for g in s["grid"]]
        pts += [(r["first_order"][0], r["one_step"][0]) for r in s["sweep"]]
        ax.scatter([p[0] for p in pts], [p[1] for p in pts], label=METHODS.get(m, m), s=18)
    xs = [p for s in summary.values() for g in s["grid"] for p in [g["indicators"]["first_order"][0]]]
    xs += [r["first_order"][0] for s in summary.values() for r in s["sweep"]]
    xs = [x for x in xs if math.isfinite(x) and x > 0]
    if xs:
        lo, hi = max(min(xs), 1e-9), max(xs)
        ax.plot([lo, hi], [lo, hi], "k--", lw=1, label="y = x")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("first-order indicator eps·||g||")
    ax.set_ylabel("measured loss change (one-step)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / f"{name}_indicator.png", dpi=110)
    plt.close(fig)

    plain = summary.get("plain") or next(iter(summary.values()))
    rows = plain["layers"][:20]
    fig, ax = plt.subplots(figsize=(6, 0.3 * len(rows) + 1.2))
    ax.barh([r["name"] for r in rows][::-1], [r["value"] for r in rows][::-1])
    ax.set_xlabel("first-order indicator (layer corrupted alone)")
    fig.tight_layout()
    fig.savefig(out / f"{name}_layers.png", dpi=110)
    plt.close(fig)


AFTER = (1, 5, 20)  # searched-flip counts reported in the table


def bitflip_summary(tr: dict) -> dict:
    """Per method, over seeds: int8 clean metric, metric under each random flip count, searched
    flips needed to halve the metric (seeds where the budget did not suffice are counted apart;
    ``lower_bound`` counts them at the budget) and the metric after 1, 5 and 20 searched flips
    (a search stops once the metric is halved and keeps that value)."""
    out: dict = {}
    for m in dict.fromkeys(r["method"] for r in tr["bitflips"]):
        runs = [r for r in tr["bitflips"] if r["method"] == m]
        halves = [r["search"]["flips_to_halve"] for r in runs]
        budget = tr.get("bitflip_config", {}).get("search_flips") or max(len(r["search"]["metric_history"]) - 1 for r in runs)

        def after(n: int) -> tuple[float, float]:
            return mean_std([r["search"]["metric_history"][min(n, len(r["search"]["metric_history"]) - 1)] for r in runs])

        out[m] = {"seeds": len(runs), "quantized": mean_std([r["quantized_metric"] for r in runs]),
                  "random": {row["flips"]: mean_std([x for r in runs for x in r["random"][i]["metrics"]])
                             for i, row in enumerate(runs[0]["random"])},
                  "flips_to_halve": mean_std([h for h in halves if h is not None]),
                  "lower_bound": mean_std([budget if h is None else h for h in halves])[0],
                  "halved": sum(h is not None for h in halves), "after": {n: after(n) for n in AFTER},
                  "budget": budget}
    return out


def _halve_text(s: dict) -> str:
    """Searched flips needed to halve the metric: mean over the seeds that got there."""
    if not s["halved"]:
        return f"> {s['budget']} (no seed halved)"
    return f"{_fmt(*s['flips_to_halve'], digits=1)} ({s['halved']}/{s['seeds']} seeds halved within {s['budget']})"


def bitflip_verdict(summary: dict) -> Optional[dict]:
    """Whether APD's robustness carries over to bit flips, against plain training: searched flips
    to halve the metric (seeds never halved counted at the budget) and the metric under the
    largest number of random flips."""
    apds = [m for m in summary if m.startswith("apd")]
    if "plain" not in summary or not apds:
        return None
    p, a = summary["plain"], summary[apds[0]]
    top = list(p["random"])[-1]
    if not p["halved"] and not a["halved"]:
        searched = None  # no model halved within the budget: no decision from the search
    else:
        searched = a["lower_bound"] > p["lower_bound"]
    random = a["random"][top][0] >= p["random"][top][0]
    parts = [x for x in (searched, random) if x is not None]
    verdict = ("carries over" if all(parts) else "does not carry over" if not any(parts) else "partly carries over")
    return {"method": apds[0], "verdict": verdict, "searched": searched, "random": random, "top": top}


def _bitflip_markdown(tr: dict) -> list[str]:
    summary = tr["bitflip_summary"]
    metric = tr["config"]["metric_name"]
    counts = list(next(iter(summary.values()))["random"])
    lines = ["", f"### {metric} under bit flips (int8 weights, per-channel scales)", "",
             f"Random: n bits flipped uniformly over all int8 weight bits (mean ± std over seeds × draws). Searched: "
             f"progressive bit search on one training batch, stopping when {metric} falls to half its int8 value "
             f"(a stopped search keeps that value in the later columns).", "",
             "| method | int8 clean | " + " | ".join(f"random {n}" for n in counts)
             + " | searched flips to halve | " + " | ".join(f"after {n} searched" for n in AFTER) + " |",
             "|---|---|" + "---|" * (len(counts) + 1 + len(AFTER))]
    for m, s in summary.items():
        lines.append(f"| {METHODS.get(m, m)} | {_fmt(*s['quantized'], digits=4)} | "
                     + " | ".join(_fmt(*s["random"][n], digits=4) for n in counts)
                     + f" | {_halve_text(s)} | " + " | ".join(_fmt(*s["after"][n], digits=4) for n in AFTER) + " |")
    v = tr["bitflip_verdict"]
    if v is not None:
        a, p, top = summary[v["method"]], summary["plain"], v["top"]
        searched = ("undecided: no model halved within the budget" if v["searched"] is None
                    else "more robust" if v["searched"] else "not more robust")
        lines += ["", f"Does APD's robustness to norm-bounded corruption carry over to bit flips? It **{v['verdict']}** here. "
                  f"Searched flips to halve {metric} (rule: more than plain, never-halved seeds counted at the budget): "
                  f"{v['method']} {_halve_text(a)} vs plain {_halve_text(p)}: {searched}. "
                  f"{metric} after {top} random flips (rule: no lower than plain): {v['method']} "
                  f"{_fmt(*a['random'][top], digits=4)} vs plain {_fmt(*p['random'][top], digits=4)}: "
                  f"{'yes' if v['random'] else 'no'}."]
    return lines


def _bitflip_plot(name: str, tr: dict, out: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    metric = tr["config"]["metric_name"]
    summary = tr["bitflip_summary"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.8))
    for k, (m, s) in enumerate(summary.items()):
        color = f"C{k}"
        counts = list(s["random"])
        ax1.errorbar(counts, [s["random"][n][0] for n in counts], yerr=[s["random"][n][1] for n in counts],
                     marker="o", capsize=2, color=color, label=METHODS.get(m, m))
        for i, r in enumerate(x for x in tr["bitflips"] if x["method"] == m):
            hist = r["search"]["metric_history"]
            ax2.plot(range(len(hist)), hist, color=color, alpha=0.7, label=METHODS.get(m, m) if i == 0 else None)
    ax1.set_xscale("log")
    ax1.set_xlabel("random bit flips")
    ax2.set_xlabel("searched bit flips (progressive bit search)")
    for ax in (ax1, ax2):
        ax.set_ylabel(f"test {metric}")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / f"{name}_bitflips.png", dpi=110)
    plt.close(fig)
