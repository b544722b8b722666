"""The papers' findings decided from a task's runs, each with its rule, its per-seed paired numbers
and a verdict. Robustness is always the *drop* from a model's own clean metric; a difference
counts only when its 95% interval excludes zero; ties are not wins; grid points where every
model sits at chance decide nothing and are counted as excluded."""

from __future__ import annotations

import math
from typing import Optional

from .stats import LEVEL, MIN_PAIRS, TOO_FEW, paired, spearman

ATTACKS = ("multi_step", "multi_step_50", "multi_step_50x5")  #: projected ascent, in every evaluation
#: per run and eps, the worst of every attack run there (see add_worst_case)
WORST = "worst_case"
INDICATORS = ("first_order", "second_order", "random", "one_step", "multi_step")
#: the controls APD is compared with in finding 4
CONTROLS = ("plain", "plain_matched", "one_step", "sam", "sam_layer")


def _sign(tr: dict) -> float:
    return 1.0 if tr["higher_is_better"] else -1.0


def by_seed(tr: dict, method: str, alive: bool = False) -> dict[int, dict]:
    """The test evaluations of ``method`` by seed; ``alive``: without the runs that collapsed
    (see :func:`collapsed`)."""
    failed = _failed(tr) if alive else set()
    return {r["seed"]: r["eval"] for r in sorted(tr["runs"], key=lambda r: r["seed"])
            if r["method"] == method and (method, r["seed"]) not in failed}


def evals(tr: dict, method: str, alive: bool = False) -> list[dict]:
    """The test evaluations of ``method``, ordered by seed; ``alive``: without collapsed runs,
    as every robustness table, ranking and plot must be (a model at chance has nothing left to
    lose and would look robust)."""
    return list(by_seed(tr, method, alive).values())


def run_methods(tr: dict) -> list[str]:
    """The task's methods that have at least one run."""
    return [m for m in tr["methods"] if any(r["method"] == m for r in tr["runs"])]


def _mean(xs: list[float]) -> float:
    xs = [x for x in xs if x is not None and not math.isnan(x)]
    return sum(xs) / len(xs) if xs else math.nan


def capped(tr: dict, value: float) -> float:
    """A corrupted metric no worse than chance: a NaN metric or a perplexity past chance (an
    overflowed one is inf) counts as chance, the most a corruption can take, so that a broken run
    stays in every comparison as maximally damaged instead of dropping out as non-finite."""
    if math.isnan(value):
        return tr["chance"]
    return value if tr["higher_is_better"] else min(value, tr["chance"])


def drop(tr: dict, e: dict, i: int, attack: str) -> float:
    """Oriented drop of the metric at grid point ``i`` under ``attack``, from the model's own
    clean metric on the same test examples (positive: worse), the corrupted metric capped at
    chance (see :func:`capped`)."""
    return _sign(tr) * (e["clean"]["corrupted_subset_metric"] - capped(tr, e["grid"][i][attack]["metric"]))


def loss_rise(e: dict, i: int, attack: str) -> float:
    return e["grid"][i][attack]["loss"] - e["clean"]["loss"]


def at_chance(tr: dict, value: float) -> bool:
    """A metric at chance: within two points of it for accuracy-like metrics, within 10% of the
    chance perplexity (or NaN)."""
    if math.isnan(value):
        return True
    return value <= tr["chance"] + 2 * tr["point"] if tr["higher_is_better"] else value >= 0.9 * tr["chance"]


def _valid_metric(tr: dict, entry: dict) -> Optional[float]:
    """The best clean validation metric in the training log of a cached entry (``run["eval"]``
    or an ablation row; the log keeps it oriented: minus the log of a perplexity), or None for
    entries written before it was logged."""
    best = (entry.get("train") or {}).get("best_valid")
    if best is None:
        return None
    if tr["higher_is_better"]:
        return best
    return math.exp(-best) if best > -math.inf else math.inf


def _collapse_evidence(tr: dict, entry: dict, test_metric: float) -> tuple[float, str]:
    """The metric a collapse is read off and its split: the best validation metric, or the test
    metric for entries written before it was logged."""
    valid = _valid_metric(tr, entry)
    return (valid, "validation") if valid is not None else (test_metric, "test")


def collapsed(tr: dict) -> list[dict]:
    """Final runs whose training failed: the best clean validation metric at chance (decided on
    validation, like every other choice; the test metric where no validation metric was logged).
    They count in every clean comparison (a collapse is the method's failure) but not in
    robustness ones, where a model at chance has nothing left to lose and would look robust."""
    out = []
    for r in tr.get("runs", []):
        value, split = _collapse_evidence(tr, r["eval"], r["eval"]["clean"]["metric"])
        if at_chance(tr, value):
            out.append({"method": r["method"], "seed": r["seed"], "metric": r["eval"]["clean"]["metric"],
                        "decided_on": split, "decided_by": value})
    return out


def _failed(tr: dict) -> set:
    return {(c["method"], c["seed"]) for c in collapsed(tr)}


def meaningful(tr: dict) -> dict:
    """Does the plain model beat every classical reference on the test split?"""
    plain = _mean([e["clean"]["metric"] for e in evals(tr, "plain")])
    beats = {name: _sign(tr) * (plain - ref["metric"]) > 0 for name, ref in tr["references"].items()}
    return {"plain": plain, "beats": beats, "meaningful": bool(beats) and all(beats.values())}


def _level(tr: dict, value: float) -> float:
    """A metric on the scale the attacks are ranked on, larger better: accuracy itself; minus
    the log of a perplexity capped at chance (past chance every model is equally broken, and an
    overflowed perplexity is inf)."""
    value = capped(tr, value)
    return value if tr["higher_is_better"] else -math.log(value)


def _unlevel(tr: dict, level: float) -> float:
    return level if tr["higher_is_better"] else math.exp(-level)


def add_worst_case(tr: dict) -> None:
    """Give every grid cell of every run the worst case over the attacks run there (projected
    ascent with 10, 50 and 50 x 5 steps, the ensemble), as an adversary holding all of them
    would reach it: the lowest oriented metric and the highest loss, each with the attack that
    reached it. Per cell it is at least as strong as every attack, so when any attack passes the
    strength check this is the one the verdicts use (AutoAttack's worst case over its members)."""
    sign = _sign(tr)

    def badness(g: dict, a: str) -> float:
        v = g[a]["metric"]
        return math.inf if math.isnan(v) else -sign * v

    for r in tr.get("runs", []):
        for g in r["eval"]["grid"]:
            attacks = [a for a in (*ATTACKS, "ensemble") if a in g]
            if len(attacks) < 2:
                continue
            m = max(attacks, key=lambda a: badness(g, a))
            lo = max(attacks, key=lambda a: g[a]["loss"] if not math.isnan(g[a]["loss"]) else math.inf)
            g[WORST] = {"metric": g[m]["metric"], "loss": g[lo]["loss"], "metric_from": m, "loss_from": lo}


def attack_strength(tr: dict) -> dict:
    """Mean test metric and loss of every method under the 10-step, 50-step and 50-step x 5
    restarts projected ascent and, where run, the step-size-free ensemble; the attack every
    verdict uses. Runs that collapsed are left out, and grid points where every method sits at
    chance under 10 steps (so under every attack) decide nothing. A stronger attack is one that
    lowers some method's metric by more than one point (or raises its loss by more than 5%)
    against 10 steps at an included point; of the stronger ones the verdicts use the one with the
    lowest mean metric over every method and included eps (perplexity: log scale, capped at
    chance), else 10 steps."""
    methods = run_methods(tr)
    first = evals(tr, methods[0])[0]["grid"][0]
    attacks = [a for a in (*ATTACKS, "ensemble", WORST) if a in first]
    excluded = set(excluded_points(tr, "multi_step"))
    rows, stronger = [], {a: False for a in attacks[1:]}
    sign = _sign(tr)
    levels: dict = {a: [] for a in attacks}
    for m in methods:
        es = evals(tr, m, alive=True)
        if not es:
            continue
        for i, g in enumerate(es[0]["grid"]):
            cells = {a: {"metric": _mean([e["grid"][i][a]["metric"] for e in es]),
                         "loss": _mean([e["grid"][i][a]["loss"] for e in es])} for a in attacks}
            rows.append({"method": m, "eps": g["eps"], "excluded": i in excluded, **cells})
            if i in excluded:
                continue
            base = cells["multi_step"]
            for a in stronger:
                gain = sign * (base["metric"] - cells[a]["metric"])
                rise = cells[a]["loss"] / base["loss"] - 1 if base["loss"] > 0 and math.isfinite(base["loss"]) else 0.0
                stronger[a] |= gain > tr["point"] or rise > 0.05
            for a in attacks:
                levels[a].append(_mean([_level(tr, e["grid"][i][a]["metric"]) for e in es]))
    level = {a: _mean(v) for a, v in levels.items()}
    chosen = min((a for a, s in stronger.items() if s), key=lambda a: level[a], default="multi_step")
    return {"rows": rows, "attacks": attacks, "mean_metric": {a: _unlevel(tr, v) for a, v in level.items()},
            "verdict_attack": chosen,
            "rule": "an attack is stronger when it lowers any method's metric by more than one point or raises its "
                    "loss by more than 5% against the 10-step projected ascent at an included eps; the strongest of "
                    "those (lowest mean metric over every method and included eps"
                    + ("" if tr["higher_is_better"] else ", geometric mean of perplexities capped at chance")
                    + ") decides every verdict; collapsed runs are left out"}


def excluded_points(tr: dict, attack: str) -> list[int]:
    """Grid indices at which every method's mean corrupted metric (over the runs that did not
    collapse) is at chance (within two points for accuracy-like metrics, within 10% of the chance
    perplexity)."""
    out = []
    methods = [m for m in run_methods(tr) if evals(tr, m, alive=True)]
    grid = evals(tr, "plain")[0]["grid"]
    for i in range(len(grid)):
        if all(at_chance(tr, _mean([e["grid"][i][attack]["metric"] for e in evals(tr, m, alive=True)]))
               for m in methods):
            out.append(i)
    return out


def _all_calls(calls: list[str]) -> str:
    return "better" if calls and all(c == "better" for c in calls) else "worse" if any(c == "worse" for c in calls) else "tie"


def finding_1(tr: dict) -> Optional[dict]:
    es = evals(tr, "plain", alive=True)
    if not es:
        return None
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


def finding_2(tr: dict) -> Optional[dict]:
    es = evals(tr, "plain", alive=True)
    if not es:
        return None
    rows = [{"eps": g["eps"], "diff": paired([e["grid"][i]["indicators"]["multi_step"] for e in es],
                                             [e["grid"][i]["indicators"]["one_step"] for e in es]).as_dict()}
            for i, g in enumerate(es[0]["grid"])]
    calls = [r["diff"]["call"] for r in rows]
    ok = "better" in calls and "worse" not in calls
    return {"finding": "2. multi-step corruption beats one-step at the same eps",
            "rule": "on plain models, multi-step ΔL - one-step ΔL (attack data, 10 steps) is above 0 (95% interval) at "
                    "one eps at least and below 0 at none",
            "rows": rows, "verdict": "CONFIRMED" if ok else "NOT CONFIRMED"}


def finding_3a(tr: dict) -> Optional[dict]:
    es = evals(tr, "plain", alive=True)
    if not es:
        return None
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


def finding_3b(tr: dict, attack: str, excluded: list[int]) -> Optional[dict]:
    """Spearman correlation, over every trained model (methods x seeds), between each indicator
    and the measured drop of the test metric under ``attack``, per included eps (where every
    model sits at chance the drop is only the clean metric's distance to chance)."""
    failed = _failed(tr)
    models = [r["eval"] for r in tr["runs"] if (r["method"], r["seed"]) not in failed]
    if not models:
        return None
    rows = []
    for i, g in enumerate(models[0]["grid"]):
        if i in excluded:
            continue
        measured = [drop(tr, e, i, attack) for e in models]
        for ind in INDICATORS:
            if ind not in g["indicators"]:
                continue
            rank = spearman([e["grid"][i]["indicators"][ind] for e in models], measured)
            rows.append({"eps": g["eps"], "indicator": ind, **rank.as_dict()})
    backwards = [f"{r['indicator']} at eps {r['eps']}" for r in rows if r["call"] == "backwards"]
    agrees = sum(r["call"] == "agrees" for r in rows)
    return {"finding": "3b. each indicator ranks the trained models in the order of their measured robustness",
            "rule": f"Spearman rho (95% Fisher-z interval; at |rho| = 1 the exact p decides) between the indicator on "
                    f"the attack data and the measured test-metric drop under the verdict attack, over the {len(models)} "
                    f"trained models not collapsed to chance, per included eps ({len(excluded)} excluded)",
            "rows": rows, "backwards": backwards, "excluded": len(excluded),
            "verdict": f"agrees at {agrees}/{len(rows)} (indicator, eps) pairs; ranks backwards at "
                       + (", ".join(backwards) if backwards else "none")}


def compare(tr: dict, a: str, b: str, attack: str, excluded: list[int]) -> Optional[dict]:
    """Method ``a`` against ``b`` over the seeds both have, paired by seed: clean metric
    (oriented a - b) over every shared seed and, per included eps, the drop of b minus the drop
    of a (positive: a more robust) and b's loss rise minus a's over the shared seeds where
    neither run collapsed. Seeds only one method has are listed, never paired."""
    ea, eb = by_seed(tr, a), by_seed(tr, b)
    seeds = sorted(set(ea) & set(eb))
    if not seeds:
        return None
    sign = _sign(tr)
    clean = paired([sign * ea[s]["clean"]["metric"] for s in seeds], [sign * eb[s]["clean"]["metric"] for s in seeds])
    failed = _failed(tr)
    keep = [s for s in seeds if (a, s) not in failed and (b, s) not in failed]
    ra, rb = [ea[s] for s in keep], [eb[s] for s in keep]
    rows = []
    for i, g in enumerate(ea[seeds[0]]["grid"]):
        if i in excluded:
            continue
        d = paired([drop(tr, e, i, attack) for e in rb], [drop(tr, e, i, attack) for e in ra])
        l = paired([loss_rise(e, i, attack) for e in rb], [loss_rise(e, i, attack) for e in ra])
        rows.append({"eps": g["eps"], "drop": d.as_dict(), "loss_rise": l.as_dict()})
    robust = _verdict([r["drop"]["call"] for r in rows])
    return {"a": a, "b": b, "seeds": len(seeds), "robust_seeds": len(keep), "clean": clean.as_dict(), "rows": rows,
            "robust": robust, "excluded": len(excluded),
            "unpaired": {m: sorted(set(e) - set(seeds)) for m, e in ((a, ea), (b, eb)) if set(e) - set(seeds)}}


#: the controls finding 4 must be decided against (the papers' claim); others run are shown too
REQUIRED = ("plain", "plain_matched", "one_step", "sam")


def finding_4(tr: dict, attack: str, excluded: list[int]) -> Optional[dict]:
    head = tr["headline"]
    if head is None:
        return None
    comps = [c for c in (compare(tr, head, m, attack, excluded) for m in CONTROLS if m in run_methods(tr)) if c]
    clean_wins = [c["b"] for c in comps if c["clean"]["call"] == "better"]
    robust_wins = [c["b"] for c in comps if c["robust"] == "better"]
    both = [c["b"] for c in comps if c["clean"]["call"] == "better" and c["robust"] == "better"]
    decided = [c for c in comps if c["clean"]["call"] != TOO_FEW and c["robust"] != TOO_FEW]
    missing = [m for m in REQUIRED if m not in {c["b"] for c in decided}]
    undecided = [c["b"] for c in comps if c not in decided]
    if missing:
        verdict = (f"NOT DECIDED (no comparison on {MIN_PAIRS} or more seeds and an included eps with: "
                   f"{', '.join(missing)}; clean better than: {', '.join(clean_wins) or 'none'}; more robust than: "
                   f"{', '.join(robust_wins) or 'none'})")
    elif all(c["b"] in both for c in decided):
        verdict = "CONFIRMED" + (f" (not decided against {', '.join(undecided)})" if undecided else "")
    else:
        verdict = (f"NOT CONFIRMED (clean better than: {', '.join(clean_wins) or 'none'}; "
                   f"more robust than: {', '.join(robust_wins) or 'none'})")
    return {"finding": f"4. APD ({head}, K chosen on validation) gives better clean metrics and better metrics under "
                       "corruption than plain, compute-matched plain, one-step training and tuned SAM",
            "rule": "per control, paired by seed: clean metric better when the interval of (APD - control) is above 0; "
                    "more robust when the interval of (control's drop - APD's drop) is above 0 at half of the included eps "
                    f"or more and below 0 at none; decided only when every one of {', '.join(REQUIRED)} was run on "
                    f"{MIN_PAIRS} seeds or more, and confirmed only when APD is better on both counts against every "
                    "control decided",
            "comparisons": comps, "clean_better_than": clean_wins, "more_robust_than": robust_wins,
            "missing_controls": missing, "undecided_controls": undecided, "verdict": verdict}


def decide(tr: dict) -> dict:
    """Everything the report shows about one task's findings."""
    add_worst_case(tr)
    status = meaningful(tr)
    strength = attack_strength(tr)
    attack = strength["verdict_attack"]
    excluded = excluded_points(tr, attack)
    out = {"meaningful": status, "attack_strength": strength, "collapsed": collapsed(tr),
           "excluded_points": [evals(tr, "plain")[0]["grid"][i]["eps"] for i in excluded],
           "methods_without_runs": [m for m in tr["methods"] if m not in run_methods(tr)]}
    if not status["meaningful"]:
        out["findings"] = []
        out["note"] = "NOT MEANINGFUL: the plain model does not beat every classical reference; no finding is decided"
        return out
    out["findings"] = [f for f in (finding_1(tr), finding_2(tr), finding_3a(tr), finding_3b(tr, attack, excluded),
                                   finding_4(tr, attack, excluded)) if f is not None]
    out["k_ablation"] = [c for c in (compare(tr, m, "plain", attack, excluded) for m in run_methods(tr)
                                     if m.startswith("apd")) if c]
    return out


AFTER = (1, 5, 20)  #: searched-flip counts whose metric the bit-flip comparison reports


def _after(row: dict, n: int) -> float:
    hist = row["search"]["metric_history"]
    return hist[min(n, len(hist) - 1)]  # a search stops once the metric halved and keeps that value


def censored_sign_test(a: list[Optional[int]], b: list[Optional[int]]) -> dict:
    """Paired comparison of counts censored at a budget (None: the budget was reached first, so
    the true count is larger than every observed one): per pair, which needed more, where that
    is known (both censored: unknown); an exact two-sided sign test on the known, unequal pairs.
    The call: better (a needed more) or worse when p < 0.05, else tie; too few pairs when even a
    unanimous outcome could not reach 0.05 (fewer than 6 known unequal pairs)."""
    more = less = equal = unknown = 0
    for x, y in zip(a, b):
        if x is None and y is None:
            unknown += 1
        elif x is None or (y is not None and x > y):
            more += 1
        elif y is None or x < y:
            less += 1
        else:
            equal += 1
    n = more + less
    p = float(_binom_p(more, n)) if n else 1.0
    # below 6 known unequal pairs even a unanimous outcome has p >= 2/32: the test cannot decide
    call = (TOO_FEW if _binom_p(n, n) >= 1 - LEVEL else
            "better" if p < 1 - LEVEL and more > less else "worse" if p < 1 - LEVEL and less > more else "tie")
    return {"kind": "censored", "a_more": more, "b_more": less, "equal": equal, "unknown": unknown, "p": p,
            "call": call}


def _binom_p(k: int, n: int) -> float:
    """Two-sided exact sign-test p of k successes in n fair trials."""
    tail = sum(math.comb(n, i) for i in range(0, min(k, n - k) + 1)) / 2 ** n
    return min(1.0, 2 * tail)


def _verdict(calls: list[str]) -> str:
    """The finding-4 rule over a list of calls: better at half or more and worse at none."""
    decided = [c for c in calls if c != TOO_FEW]
    if not decided:
        return TOO_FEW
    if decided.count("better") * 2 >= len(decided) and "worse" not in decided:
        return "better"
    if decided.count("worse") * 2 >= len(decided) and "better" not in decided:
        return "worse"
    return "tie"


def bitflip_comparisons(tr: dict) -> list[dict]:
    """The headline APD against each control under int8 bit flips, paired by seed over the seeds
    where neither run collapsed, on drops from each model's own int8 metric: after the largest
    random flip count and after 1/5/20 searched flips (a search stops once the metric halved, so
    a weak model's drop there is capped at half its metric), and the searched flips needed to
    halve it (censored at the search budget: a sign test on the pairs whose order is known).
    Rows where every method's mean metric sits at chance are excluded; the verdict per control
    follows finding 4's rule over the int8 rows (float32 exponent flips: their own verdict)."""
    flips = tr.get("bitflips") or []
    by: dict = {}
    for r in flips:
        by.setdefault(r["method"], {})[r["seed"]] = r
    head, sign = tr["headline"], _sign(tr)
    failed = _failed(tr)
    alive = {m: [r for s, r in rs.items() if (m, s) not in failed] for m, rs in by.items()}

    def everyone_at_chance(value) -> bool:
        return all(at_chance(tr, _mean([value(r) for r in rs])) for rs in alive.values() if rs)

    out = []
    for c in CONTROLS:
        if c not in by or head not in by:
            continue
        seeds = sorted(s for s in set(by[c]) & set(by[head]) if (c, s) not in failed and (head, s) not in failed)
        if not seeds:
            continue
        a, b = [by[head][s] for s in seeds], [by[c][s] for s in seeds]
        top = a[0]["random"][-1]["flips"]
        rows, excluded = {}, []

        def add(name: str, level, drop) -> None:  # level(r): the metric after the flips; drop(r): clean - level
            rows[name] = paired([sign * drop(r) for r in b], [sign * drop(r) for r in a]).as_dict()
            if everyone_at_chance(level):
                excluded.append(name)

        def random_level(r: dict) -> float:
            return _mean(r["random"][-1]["metrics"])

        add(f"random {top}", random_level, lambda r: r["quantized_metric"] - random_level(r))
        for n in AFTER:
            add(f"after {n} searched", lambda r, n=n: _after(r, n), lambda r, n=n: r["quantized_metric"] - _after(r, n))
        rows["flips to halve"] = censored_sign_test([r["search"]["flips_to_halve"] for r in a],
                                                    [r["search"]["flips_to_halve"] for r in b])
        int8 = [k for k in rows if k not in excluded]
        floats = []
        if "float32_exponent" in a[0]:
            for i, row in enumerate(a[0]["float32_exponent"]["random"]):
                def flevel(r: dict, i: int = i) -> float:
                    return _mean(r["float32_exponent"]["random"][i]["metrics"])

                name = f"float32 exponent {row['flips']}"
                add(name, flevel, lambda r, f=flevel: r["float32_exponent"]["float_metric"] - f(r))
                if name not in excluded:
                    floats.append(name)
        out.append({"a": head, "b": c, "seeds": len(seeds), "rows": rows, "excluded": excluded,
                    "robust": _verdict([rows[k]["call"] for k in int8]),
                    "robust_float32": _verdict([rows[k]["call"] for k in floats]) if floats else None,
                    "never_halved": {head: sum(r["search"]["flips_to_halve"] is None for r in a),
                                     c: sum(r["search"]["flips_to_halve"] is None for r in b)}})
    return out


def _row_collapsed(tr: dict, row: dict) -> bool:
    """An ablation row's run collapsed: its best validation metric at chance (its test
    ``clean_subset_metric`` where no training log came with it)."""
    return at_chance(tr, _collapse_evidence(tr, row, row["clean_subset_metric"])[0])


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
        alive = [s for s in seeds if not any(_row_collapsed(tr, by[m][s]) for m in (a, c))]
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
             "train": r.get("train"), "rows": [{"budget": "ensemble", **e} for e in r["ensemble"]]} for r in tr.get("equal_compute") or []]
    ks = sorted({r["method"] for r in rows})
    return [c for k in ks[1:] for c in _ablation_pairs(tr, rows, k, ks[:1])]
