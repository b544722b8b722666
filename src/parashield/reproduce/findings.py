"""The papers' findings decided from a task's runs, each with its rule, its per-seed paired numbers
and a verdict. Robustness is always the *drop* from a model's own clean metric; a difference
counts only when its 95% interval excludes zero; ties are not wins; grid points where every
model sits at chance decide nothing and are counted as excluded."""

from __future__ import annotations

import math
from typing import Optional

from .stats import paired, spearman

ATTACKS = ("multi_step", "multi_step_50", "multi_step_50x5")  #: projected ascent, in every evaluation
INDICATORS = ("first_order", "second_order", "random", "one_step", "multi_step")
#: the controls APD is compared with in finding 4
CONTROLS = ("plain", "plain_matched", "one_step", "sam", "sam_layer")


def _sign(tr: dict) -> float:
    return 1.0 if tr["higher_is_better"] else -1.0


def evals(tr: dict, method: str) -> list[dict]:
    """The test evaluations of ``method``, ordered by seed."""
    return [r["eval"] for r in sorted((r for r in tr["runs"] if r["method"] == method), key=lambda r: r["seed"])]


def _mean(xs: list[float]) -> float:
    xs = [x for x in xs if x is not None and not math.isnan(x)]
    return sum(xs) / len(xs) if xs else math.nan


def drop(tr: dict, e: dict, i: int, attack: str) -> float:
    """Oriented drop of the metric at grid point ``i`` under ``attack``, from the model's own
    clean metric on the same test examples (positive: worse)."""
    return _sign(tr) * (e["clean"]["corrupted_subset_metric"] - e["grid"][i][attack]["metric"])


def loss_rise(e: dict, i: int, attack: str) -> float:
    return e["grid"][i][attack]["loss"] - e["clean"]["loss"]


def at_chance(tr: dict, value: float) -> bool:
    """A metric at chance: within two points of it for accuracy-like metrics, within 10% of the
    chance perplexity (or NaN)."""
    if math.isnan(value):
        return True
    return value <= tr["chance"] + 2 * tr["point"] if tr["higher_is_better"] else value >= 0.9 * tr["chance"]


def collapsed(tr: dict) -> list[dict]:
    """Final runs whose clean test metric is at chance: training failed. They count in every
    clean comparison (a collapse is the method's failure) but not in robustness ones, where a
    model at chance has nothing left to lose and would look robust."""
    return [{"method": r["method"], "seed": r["seed"], "metric": r["eval"]["clean"]["metric"]}
            for r in tr.get("runs", []) if at_chance(tr, r["eval"]["clean"]["metric"])]


def _failed(tr: dict) -> set:
    return {(c["method"], c["seed"]) for c in collapsed(tr)}


def meaningful(tr: dict) -> dict:
    """Does the plain model beat every classical reference on the test split?"""
    plain = _mean([e["clean"]["metric"] for e in evals(tr, "plain")])
    beats = {name: _sign(tr) * (plain - ref["metric"]) > 0 for name, ref in tr["references"].items()}
    return {"plain": plain, "beats": beats, "meaningful": bool(beats) and all(beats.values())}


def attack_strength(tr: dict) -> dict:
    """Mean test metric and loss of every method under the 10-step, 50-step and 50-step x 5
    restarts projected ascent and, where run, the step-size-free ensemble; the attack every
    verdict uses. A stronger attack is one that lowers some method's metric by more than one
    point (or raises its loss by more than 5%) against 10 steps; of the stronger ones the verdicts
    use the one with the lowest mean oriented metric over all methods and eps, else 10 steps."""
    first = evals(tr, tr["methods"][0])[0]["grid"][0]
    attacks = [a for a in (*ATTACKS, "ensemble") if a in first]
    rows, stronger = [], {a: False for a in attacks[1:]}
    sign = _sign(tr)
    for m in tr["methods"]:
        es = evals(tr, m)
        if not es:
            continue
        for i, g in enumerate(es[0]["grid"]):
            cells = {a: {"metric": _mean([e["grid"][i][a]["metric"] for e in es]),
                         "loss": _mean([e["grid"][i][a]["loss"] for e in es])} for a in attacks}
            base = cells["multi_step"]
            for a in stronger:
                gain = sign * (base["metric"] - cells[a]["metric"])
                rise = cells[a]["loss"] / base["loss"] - 1 if base["loss"] > 0 else 0.0
                stronger[a] |= gain > tr["point"] or rise > 0.05
            rows.append({"method": m, "eps": g["eps"], **cells})
    level = {a: _mean([sign * r[a]["metric"] for r in rows]) for a in attacks}
    chosen = min((a for a, s in stronger.items() if s), key=lambda a: level[a], default="multi_step")
    return {"rows": rows, "attacks": attacks, "mean_metric": level, "verdict_attack": chosen,
            "rule": "an attack is stronger when it lowers any method's metric by more than one point or raises its "
                    "loss by more than 5% against the 10-step projected ascent; the strongest of those (lowest mean "
                    "metric over every method and eps) decides every verdict"}


def excluded_points(tr: dict, attack: str) -> list[int]:
    """Grid indices at which every method's mean corrupted metric is at chance (within two
    points for accuracy-like metrics, within 10% of the chance perplexity)."""
    out = []
    grid = evals(tr, "plain")[0]["grid"]
    for i in range(len(grid)):
        flags = []
        for m in tr["methods"]:
            v = _mean([e["grid"][i][attack]["metric"] for e in evals(tr, m)])
            flags.append(v <= tr["chance"] + 2 * tr["point"] if tr["higher_is_better"] else v >= 0.9 * tr["chance"])
        if all(flags):
            out.append(i)
    return out


def _all_calls(calls: list[str]) -> str:
    return "better" if calls and all(c == "better" for c in calls) else "worse" if any(c == "worse" for c in calls) else "tie"


def finding_1(tr: dict) -> dict:
    es = evals(tr, "plain")
    rows = []
    for i, g in enumerate(es[0]["grid"]):
        p = paired([e["grid"][i]["indicators"]["one_step"] for e in es], [e["grid"][i]["indicators"]["random"] for e in es])
        ratio = _mean([e["grid"][i]["indicators"]["one_step"] for e in es]) / max(
            abs(_mean([e["grid"][i]["indicators"]["random"] for e in es])), 1e-12)
        rows.append({"eps": g["eps"], "diff": p.as_dict(), "ratio": ratio})
    call = _all_calls([r["diff"]["call"] for r in rows])
    return {"finding": "1. random corruption barely moves the loss; gradient corruption of the same norm raises it far more",
            "rule": "on plain models, the paired difference one-step ΔL - random ΔL (attack data) has a 95% interval above 0 at every eps",
            "rows": rows, "verdict": "CONFIRMED" if call == "better" else "NOT CONFIRMED"}


def finding_2(tr: dict) -> dict:
    es = evals(tr, "plain")
    rows = [{"eps": g["eps"], "diff": paired([e["grid"][i]["indicators"]["multi_step"] for e in es],
                                             [e["grid"][i]["indicators"]["one_step"] for e in es]).as_dict()}
            for i, g in enumerate(es[0]["grid"])]
    calls = [r["diff"]["call"] for r in rows]
    ok = "better" in calls and "worse" not in calls
    return {"finding": "2. multi-step corruption beats one-step at the same eps",
            "rule": "on plain models, multi-step ΔL - one-step ΔL (attack data, 10 steps) is above 0 (95% interval) at "
                    "one eps at least and below 0 at none",
            "rows": rows, "verdict": "CONFIRMED" if ok else "NOT CONFIRMED"}


def finding_3a(tr: dict) -> dict:
    es = evals(tr, "plain")
    rows = []
    for i, s in enumerate(es[0]["sweep"]):
        fo = _mean([e["sweep"][i]["first_order"] for e in es])
        one = _mean([e["sweep"][i]["one_step"] for e in es])
        rows.append({"eps": s["eps"], "first_order": fo, "one_step": one, "rel_error": abs(fo - one) / max(abs(one), 1e-12)})
    ok = bool(rows) and rows[0]["rel_error"] < 0.1 and rows[0]["rel_error"] <= rows[-1]["rel_error"]
    return {"finding": "3a. the first-order indicator eps·||g|| matches the measured loss change as eps -> 0",
            "rule": "plain models: relative error against the one-step loss change below 0.1 at the smallest eps and "
                    "not larger than at the largest",
            "rows": rows, "verdict": "CONFIRMED" if ok else "NOT CONFIRMED"}


def finding_3b(tr: dict, attack: str) -> dict:
    """Spearman correlation, over every trained model (methods x seeds), between each indicator
    and the measured drop of the test metric under ``attack``, per eps."""
    failed = _failed(tr)
    models = [r["eval"] for r in tr["runs"] if (r["method"], r["seed"]) not in failed]
    rows = []
    for i, g in enumerate(models[0]["grid"]):
        measured = [drop(tr, e, i, attack) for e in models]
        for ind in INDICATORS:
            if ind not in g["indicators"]:
                continue
            rank = spearman([e["grid"][i]["indicators"][ind] for e in models], measured)
            rows.append({"eps": g["eps"], "indicator": ind, **rank.as_dict()})
    backwards = [f"{r['indicator']} at eps {r['eps']}" for r in rows if r["call"] == "backwards"]
    agrees = sum(r["call"] == "agrees" for r in rows)
    return {"finding": "3b. each indicator ranks the trained models in the order of their measured robustness",
            "rule": f"Spearman rho (95% Fisher-z interval) between the indicator on the attack data and the measured "
                    f"test-metric drop under the verdict attack, over the {len(models)} trained models not collapsed "
                    f"to chance, per eps",
            "rows": rows, "backwards": backwards,
            "verdict": f"agrees at {agrees}/{len(rows)} (indicator, eps) pairs; ranks backwards at "
                       + (", ".join(backwards) if backwards else "none")}


def compare(tr: dict, a: str, b: str, attack: str, excluded: list[int]) -> Optional[dict]:
    """Method ``a`` against ``b`` over shared seeds: clean metric (oriented a - b) and, per
    included eps, the drop of b minus the drop of a (positive: a more robust) and b's loss rise
    minus a's."""
    ea, eb = evals(tr, a), evals(tr, b)
    n = min(len(ea), len(eb))
    if n == 0:
        return None
    ea, eb = ea[:n], eb[:n]
    sign = _sign(tr)
    clean = paired([sign * e["clean"]["metric"] for e in ea], [sign * e["clean"]["metric"] for e in eb])
    failed = _failed(tr)
    keep = [s for s in range(n) if (a, s) not in failed and (b, s) not in failed]  # evals are in seed order
    ra, rb = [ea[s] for s in keep], [eb[s] for s in keep]
    rows = []
    for i, g in enumerate(ea[0]["grid"]):
        if i in excluded:
            continue
        d = paired([drop(tr, e, i, attack) for e in rb], [drop(tr, e, i, attack) for e in ra])
        l = paired([loss_rise(e, i, attack) for e in rb], [loss_rise(e, i, attack) for e in ra])
        rows.append({"eps": g["eps"], "drop": d.as_dict(), "loss_rise": l.as_dict()})
    calls = [r["drop"]["call"] for r in rows]
    robust = ("better" if calls and calls.count("better") * 2 >= len(calls) and "worse" not in calls
              else "worse" if calls and calls.count("worse") * 2 >= len(calls) and "better" not in calls else "tie")
    return {"a": a, "b": b, "seeds": n, "robust_seeds": len(keep), "clean": clean.as_dict(), "rows": rows,
            "robust": robust, "excluded": len(excluded)}


def finding_4(tr: dict, attack: str, excluded: list[int]) -> Optional[dict]:
    head = tr["headline"]
    if head is None:
        return None
    comps = [c for c in (compare(tr, head, m, attack, excluded) for m in CONTROLS if m in tr["methods"]) if c]
    clean_wins = [c["b"] for c in comps if c["clean"]["call"] == "better"]
    robust_wins = [c["b"] for c in comps if c["robust"] == "better"]
    both = [c["b"] for c in comps if c["clean"]["call"] == "better" and c["robust"] == "better"]
    return {"finding": f"4. APD ({head}, K chosen on validation) gives better clean metrics and better metrics under "
                       "corruption than plain, compute-matched plain, one-step training and tuned SAM",
            "rule": "per control, paired over seeds: clean metric better when the interval of (APD - control) is above 0; "
                    "more robust when the interval of (control's drop - APD's drop) is above 0 at half of the included eps "
                    "or more and below 0 at none",
            "comparisons": comps, "clean_better_than": clean_wins, "more_robust_than": robust_wins,
            "verdict": "CONFIRMED" if comps and len(both) == len(comps) else
                       f"NOT CONFIRMED (clean better than: {', '.join(clean_wins) or 'none'}; "
                       f"more robust than: {', '.join(robust_wins) or 'none'})"}


def decide(tr: dict) -> dict:
    """Everything the report shows about one task's findings."""
    status = meaningful(tr)
    strength = attack_strength(tr)
    attack = strength["verdict_attack"]
    excluded = excluded_points(tr, attack)
    out = {"meaningful": status, "attack_strength": strength, "collapsed": collapsed(tr),
           "excluded_points": [evals(tr, "plain")[0]["grid"][i]["eps"] for i in excluded]}
    if not status["meaningful"]:
        out["findings"] = []
        out["note"] = "NOT MEANINGFUL: the plain model does not beat every classical reference; no finding is decided"
        return out
    out["findings"] = [f for f in (finding_1(tr), finding_2(tr), finding_3a(tr), finding_3b(tr, attack),
                                   finding_4(tr, attack, excluded)) if f is not None]
    out["k_ablation"] = [c for c in (compare(tr, m, "plain", attack, excluded) for m in tr["methods"]
                                     if m.startswith("apd")) if c]
    return out


AFTER = (1, 5, 20)  #: searched-flip counts whose metric the bit-flip comparison reports


def _after(row: dict, n: int) -> float:
    hist = row["search"]["metric_history"]
    return hist[min(n, len(hist) - 1)]  # a search stopped at half keeps that value


def bitflip_comparisons(tr: dict) -> list[dict]:
    """The headline APD against each control under int8 bit flips, paired over seeds, on drops
    from each model's own int8 metric: after the largest random flip count, after 1/5/20
    searched flips, and the searched flips needed to halve the metric (seeds never halved are
    counted at the budget, so that row is a lower bound)."""
    flips = tr.get("bitflips") or []
    by = {}
    for r in flips:
        by.setdefault(r["method"], {})[r["seed"]] = r
    head = tr["headline"]
    out = []
    for c in CONTROLS:
        if c not in by or head not in by:
            continue
        failed = _failed(tr)
        seeds = sorted(s for s in set(by[c]) & set(by[head]) if (c, s) not in failed and (head, s) not in failed)
        if not seeds:
            continue
        a, b = [by[head][s] for s in seeds], [by[c][s] for s in seeds]
        top = a[0]["random"][-1]["flips"]

        def random_drop(r: dict) -> float:
            return r["quantized_metric"] - _mean(r["random"][-1]["metrics"])

        budget = tr["bitflip_config"]["search_flips"]
        halve = lambda r: budget if r["search"]["flips_to_halve"] is None else r["search"]["flips_to_halve"]  # noqa: E731
        rows = {f"random {top}": paired([random_drop(r) for r in b], [random_drop(r) for r in a]).as_dict()}
        for n in AFTER:
            rows[f"after {n} searched"] = paired([r["quantized_metric"] - _after(r, n) for r in b],
                                                 [r["quantized_metric"] - _after(r, n) for r in a]).as_dict()
        rows["flips to halve (lower bound)"] = paired([halve(r) for r in a], [halve(r) for r in b]).as_dict()
        if "float32_exponent" in a[0]:
            for i, row in enumerate(a[0]["float32_exponent"]["random"]):
                def fdrop(r: dict, i: int = i) -> float:
                    f = r["float32_exponent"]
                    return f["float_metric"] - _mean(f["random"][i]["metrics"])

                rows[f"float32 exponent {row['flips']}"] = paired([fdrop(r) for r in b], [fdrop(r) for r in a]).as_dict()
        out.append({"a": head, "b": c, "seeds": len(seeds), "rows": rows,
                    "never_halved": {head: sum(r["search"]["flips_to_halve"] is None for r in a),
                                     c: sum(r["search"]["flips_to_halve"] is None for r in b)}})
    return out


def _ablation_pairs(tr: dict, rows: list[dict], a, controls: list) -> list[dict]:
    """``a`` against each control, paired over seeds: the clean metric (``clean`` where a row has
    it, else ``clean_subset_metric``; positive: ``a`` better) over every seed, and per (budget,
    eps) point the drop from each model's own ``clean_subset_metric`` (positive: ``a`` drops less)
    over the seeds where neither run collapsed to chance; points where every method's mean sits at
    chance are excluded and listed. Rows: ``{"method", "seed", "clean_subset_metric", "rows":
    [{"budget", "eps", "metric"}]}``."""
    by: dict = {}
    for r in rows:
        by.setdefault(r["method"], {})[r["seed"]] = r
    sign, out = _sign(tr), []
    if a not in by:
        return out
    first = next(iter(by[a].values()))["rows"]

    def everyone_at_chance(i: int) -> bool:  # every method's mean metric at chance, as for the main grid
        means = [_mean([r["rows"][i]["metric"] for r in runs.values()]) for runs in by.values()]
        return all(at_chance(tr, v) for v in means)

    def clean(r: dict) -> float:
        return sign * r.get("clean", r["clean_subset_metric"])

    excluded = [i for i in range(len(first)) if everyone_at_chance(i)]
    for c in controls:
        if c not in by or c == a:
            continue
        seeds = sorted(set(by[c]) & set(by[a]))
        alive = [s for s in seeds if not any(at_chance(tr, by[m][s]["clean_subset_metric"]) for m in (a, c))]
        ra, rb = [by[a][s] for s in alive], [by[c][s] for s in alive]
        pairs = []
        for i, row in enumerate(first):
            if i in excluded:
                continue
            d = lambda r: sign * (r["clean_subset_metric"] - r["rows"][i]["metric"])  # noqa: E731
            pairs.append({"budget": row["budget"], "eps": row["eps"],
                          "drop": paired([d(r) for r in rb], [d(r) for r in ra]).as_dict()})
        out.append({"a": a, "b": c, "seeds": len(seeds), "robust_seeds": len(alive), "rows": pairs,
                    "clean": paired([clean(by[a][s]) for s in seeds], [clean(by[c][s]) for s in seeds]).as_dict(),
                    "excluded": [f"{first[i]['budget']} eps {first[i]['eps']}" for i in excluded]})
    return out


def budget_comparisons(tr: dict) -> list[dict]:
    """The headline APD against each control under the ablation budgets (see _ablation_pairs)."""
    return _ablation_pairs(tr, tr.get("budget_ablation") or [], tr["headline"], list(CONTROLS))


def shaped_defense_comparisons(tr: dict) -> dict[str, list[dict]]:
    """Each APD trained with another budget shape against plain training and the L2-trained
    headline APD, under the ablation budgets (see _ablation_pairs); by shaped method."""
    ablation = tr.get("budget_ablation") or []
    return {m: _ablation_pairs(tr, [*ablation, *d["runs"]], m, ["plain", tr["headline"]])
            for m, d in (tr.get("shaped_defenses") or {}).items()}


def equal_compute_comparisons(tr: dict) -> list[dict]:
    """Each K at equal compute against the smallest K (one-step training), with the rules of the
    budget ablation (see _ablation_pairs): clean test metric over every seed, drops under the
    attack ensemble at every eval eps where neither run collapsed."""
    rows = [{"method": r["k"], "seed": r["seed"], "clean": r["clean"], "clean_subset_metric": r["clean_subset_metric"],
             "rows": [{"budget": "ensemble", **e} for e in r["ensemble"]]} for r in tr.get("equal_compute") or []]
    ks = sorted({r["method"] for r in rows})
    return [c for k in ks[1:] for c in _ablation_pairs(tr, rows, k, ks[:1])]
