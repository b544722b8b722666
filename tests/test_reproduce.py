"""The reproduction protocol: statistics against scipy, every verdict rule decided both ways on
fixtures, the references, validation-only selection (a poisoned test split changes no choice),
the cache (stale, damaged and concurrent writers) and a tiny end-to-end run of every task whose
data is installed."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from parashield.reproduce import TASKS, run, run_task, write_report
from parashield.reproduce import cache, findings
from parashield.reproduce.datasets import MissingDataError
from parashield.reproduce.references import KneserNeyBigram, kneser_ney_bigram
from parashield.reproduce.stats import paired, ranks, sign_flip_p, spearman

scipy_stats = pytest.importorskip("scipy.stats")


def _task(name: str = "digits", **kw):
    try:
        return TASKS[name](quick=True, **kw) if name == "digits" else TASKS[name](**kw)
    except MissingDataError as exc:
        pytest.skip(f"{name} data not installed; install it with: {exc.install_command}")


@pytest.fixture(scope="module")
def tiny():
    return _task().shrink(batches=3, examples=48)


# ---------------------------------------------------------------------------- statistics
@pytest.mark.parametrize("seed", range(5))
def test_paired_interval_and_p_match_scipy(seed):
    g = random.Random(seed)
    a = [g.gauss(0.3, 1) for _ in range(7)]
    b = [x + g.gauss(0.4, 0.5) for x in a]
    p = paired(a, b)
    ref = scipy_stats.ttest_rel(a, b)
    ci = ref.confidence_interval(0.95)
    assert p.p_t == pytest.approx(ref.pvalue, rel=1e-9)
    assert (p.low, p.high) == pytest.approx((ci.low, ci.high), rel=1e-9)
    d = [x - y for x, y in zip(a, b)]
    perm = scipy_stats.permutation_test((d,), lambda x, axis: abs(x.mean(axis=axis)), permutation_type="samples",
                                        alternative="greater", n_resamples=10**6)
    assert p.p_perm == pytest.approx(perm.pvalue, rel=1e-9)


def test_sign_flip_p_by_hand():
    assert sign_flip_p([1.0, 1.0, 1.0]) == pytest.approx(2 / 8)  # all + or all - reach |sum| 3
    assert sign_flip_p([1.0, -1.0]) == 1.0
    # above 20 pairs the 2**n patterns are sampled: all 25 differences positive leaves only the
    # two extreme patterns, which 100k samples almost never draw: p = (hits + 1) / (samples + 1)
    assert sign_flip_p([1.0] * 25) == pytest.approx(1 / 100_001)
    big = [0.3, -0.1, 0.2, 0.05, -0.2, 0.1] * 4
    assert paired(big, [0.0] * len(big)).p_perm == pytest.approx(
        scipy_stats.permutation_test((big,), lambda x, axis: abs(x.mean(axis=axis)), permutation_type="samples",
                                     alternative="greater", n_resamples=10**6, random_state=0).pvalue, abs=0.01)


@pytest.mark.parametrize("seed", range(5))
def test_spearman_matches_scipy_with_ties(seed):
    g = random.Random(seed)
    x = [g.choice([1, 2, 3, 4, 5]) for _ in range(12)]
    y = [xi + g.gauss(0, 2) for xi in x]
    r = spearman(x, y)
    ref = scipy_stats.spearmanr(x, y)
    assert r.rho == pytest.approx(ref.statistic, rel=1e-9)
    assert r.p == pytest.approx(ref.pvalue, rel=1e-7)  # 12 pairs: the t approximation, as scipy
    assert r.low < r.rho < r.high
    assert ranks([3, 1, 3, 2]) == [3.5, 1.0, 3.5, 2.0]
    small = spearman(x[:6], y[:6])  # 6 pairs: the exact permutation p
    exact = scipy_stats.permutation_test((x[:6],), lambda v: scipy_stats.spearmanr(v, y[:6]).statistic,
                                         permutation_type="pairings", n_resamples=math.inf)
    assert small.p == pytest.approx(exact.pvalue, rel=1e-9)


def test_spearman_at_rho_one_decides_by_the_exact_p():
    five = spearman([1, 2, 3, 4, 5], [2, 4, 6, 8, 10])
    assert five.rho == 1.0 and five.p == pytest.approx(2 / 120) and five.call == "agrees"
    assert math.isnan(five.low) and math.isnan(five.high)  # no Fisher-z interval at |rho| = 1
    four = spearman([1, 2, 3, 4], [4, 3, 2, 1])
    assert four.p == pytest.approx(2 / 24) and four.call == "undecided"


def test_calls_both_ways_and_ties():
    assert paired([1.1, 1.2, 1.3, 1.15], [1.0, 1.0, 1.0, 1.0]).call == "better"
    assert paired([1.0, 1.0, 1.0, 1.0], [1.1, 1.2, 1.3, 1.15]).call == "worse"
    assert paired([1.0, 1.2, 0.9, 1.1], [1.05, 1.0, 1.0, 1.0]).call == "tie"
    assert paired([1.0, 1.0], [0.0, 0.0]).call == "too few pairs"  # a zero-width interval decides nothing
    assert paired([math.inf, 1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 0.0]).n == 3  # the overflowed pair is dropped
    assert spearman([1, 2, 3, 4, 5, 6, 7, 8], [8, 7, 6, 5, 4, 3, 2, 1]).call == "backwards"
    assert spearman([1, 2, 3, 4, 5, 6, 7, 8], [1, 2, 3, 4, 5, 6, 7, 8]).call == "agrees"
    assert spearman([1, 2, 3], [1, 1, 1]).call == "undecided"
    with pytest.raises(ValueError, match="equal lengths"):
        paired([1.0], [1.0, 2.0])


# ---------------------------------------------------------------------------- verdict rules
def _eval(clean: float, corrupted: list[float], loss: float = 0.5, ind: float = 1.0) -> dict:
    grid = [{"eps": e, "indicators": {k: ind * (i + 1) for k in ("first_order", "random", "one_step", "multi_step")},
             **{a: {"metric": c, "loss": loss + (clean - c)} for a in (*findings.ATTACKS, "random", "one_step")}}
            for i, (e, c) in enumerate(zip((0.01, 0.1), corrupted))]
    return {"clean": {"metric": clean, "corrupted_subset_metric": clean, "loss": loss}, "grid": grid,
            "sweep": [{"eps": 1e-4, "first_order": 1.0, "one_step": 1.0}], "layers": [], "layers_eps": 0.01}


def _result(per_method: dict, higher: bool = True, chance: float = 0.1) -> dict:
    runs = [{"method": m, "seed": s, "passes": 1, "eval": e} for m, es in per_method.items() for s, e in enumerate(es)]
    return {"higher_is_better": higher, "chance": chance, "point": 0.01, "methods": list(per_method), "runs": runs,
            "headline": "apd3", "references": {"linear": {"metric": 0.5, "selection": {}}}}


def test_finding_4_better_on_drops_not_levels():
    plain = [_eval(0.90 + 0.001 * s, [0.80, 0.50]) for s in range(5)]
    apd = [_eval(0.93 + 0.001 * s, [0.88 + 0.002 * s, 0.70 + 0.003 * s]) for s in range(5)]
    tr = _result({"plain": plain, "apd3": apd})
    f4 = findings.finding_4(tr, "multi_step", [])
    c = f4["comparisons"][0]
    assert c["clean"]["call"] == "better" and c["robust"] == "better"
    # decided only against every control the finding names
    assert f4["verdict"].startswith("NOT DECIDED") and f4["missing_controls"] == ["plain_matched", "one_step", "sam"]
    every = _result({"plain": plain, "plain_matched": plain, "one_step": plain, "sam": plain, "apd3": apd})
    assert findings.finding_4(every, "multi_step", [])["verdict"] == "CONFIRMED"
    two_seeds = _result({"plain": plain, "plain_matched": plain, "one_step": plain, "sam": plain[:2], "apd3": apd})
    assert findings.finding_4(two_seeds, "multi_step", [])["missing_controls"] == ["sam"]
    # a clean gain with the same drop: better clean, not more robust (the level gap does not leak)
    apd_same_drop = [_eval(0.95, [0.85 + j, 0.55 - j]) for j in (0.01, -0.01, 0.02, -0.02, 0.0)]
    plain = [_eval(0.90, [0.80, 0.50]) for _ in range(5)]
    c = findings.finding_4(_result({"plain": plain, "apd3": apd_same_drop}), "multi_step", [])["comparisons"][0]
    assert c["clean"]["call"] == "better" and c["robust"] == "tie"


def test_finding_4_ties_are_not_wins_and_worse_is_reported():
    noisy = [_eval(0.9, [0.8 + d, 0.5 - d]) for d in (0.01, -0.01, 0.02, -0.02, 0.0)]
    plain = [_eval(0.9, [0.8, 0.5]) for _ in range(5)]
    c = findings.compare(_result({"plain": plain, "apd3": noisy}), "apd3", "plain", "multi_step", [])
    assert c["robust"] == "tie" and c["clean"]["call"] == "tie"
    worse = [_eval(0.9, [0.7 - 0.001 * s, 0.4 - 0.001 * s]) for s in range(5)]
    c = findings.compare(_result({"plain": plain, "apd3": worse}), "apd3", "plain", "multi_step", [])
    assert c["robust"] == "worse"


def test_comparisons_pair_by_seed_when_a_method_misses_seeds():
    plain = [_eval(0.90 + 0.01 * s, [0.80 + 0.01 * s, 0.50]) for s in range(6)]
    apd = [_eval(0.91 + 0.01 * s, [0.85 + 0.01 * s, 0.60]) for s in range(6)]  # per seed: +0.01 clean, drop 0.05 less
    tr = _result({"plain": plain, "apd3": apd})
    tr["runs"] = [r for r in tr["runs"] if not (r["method"] == "apd3" and r["seed"] == 2)]  # a partial run
    c = findings.compare(tr, "apd3", "plain", "multi_step", [])
    assert c["seeds"] == 5 and c["unpaired"] == {"plain": [2]}
    assert c["clean"]["mean"] == pytest.approx(0.01) and c["clean"]["high"] - c["clean"]["low"] < 1e-9
    assert c["rows"][0]["drop"]["mean"] == pytest.approx(0.04)  # by position it would mix seeds


def test_collapse_is_decided_on_validation_and_kept_out_of_every_robustness_number():
    plain = [_eval(0.9, [0.8, 0.5]) for _ in range(4)]
    apd = [_eval(0.92, [0.85, 0.6]) for _ in range(4)]
    apd[1] = _eval(0.1, [0.1, 0.1])  # at chance: nothing left to lose
    for e in [*plain, *apd]:
        e["train"] = {"best_valid": e["clean"]["metric"]}
    tr = _result({"plain": plain, "apd3": apd})
    assert [(c["method"], c["seed"], c["decided_on"]) for c in findings.collapsed(tr)] == [("apd3", 1, "validation")]
    strength = findings.attack_strength(tr)
    row = next(r for r in strength["rows"] if r["method"] == "apd3" and r["eps"] == 0.1)
    assert row["multi_step"]["metric"] == pytest.approx(0.6)  # the collapsed seed would pull it to 0.43
    assert len(findings.evals(tr, "apd3", alive=True)) == 3 and len(findings.evals(tr, "apd3")) == 4
    apd[2]["train"]["best_valid"] = 0.1  # validation says collapsed although the test metric does not
    assert ("apd3", 2) in {(c["method"], c["seed"]) for c in findings.collapsed(tr)}


def test_finding_3b_skips_excluded_points():
    plain = [_eval(0.9 + 0.001 * s, [0.8 - 0.01 * s, 0.1], ind=1.0 + s) for s in range(5)]
    tr = _result({"plain": plain})
    f = findings.finding_3b(tr, "multi_step", [1])
    assert {r["eps"] for r in f["rows"]} == {0.01} and f["excluded"] == 1


def test_censored_flip_counts_pair_only_where_the_order_is_known():
    t = findings.censored_sign_test([None, None, None, None, None, 30, None], [10, 20, 5, 7, 9, 40, None])
    assert (t["a_more"], t["b_more"], t["equal"], t["unknown"]) == (5, 1, 0, 1)
    assert t["p"] == pytest.approx(2 * 7 / 64) and t["call"] == "tie"  # 5 of 6: p = 0.22
    t = findings.censored_sign_test([None] * 7, [3, 4, 5, 6, 7, 8, 9])
    assert t["p"] == pytest.approx(2 / 128) and t["call"] == "better"
    assert findings.censored_sign_test([None, None, None], [None, None, 3])["call"] == "too few pairs"


def test_verdicts_use_the_worst_case_of_every_attack_per_cell():
    evs = []
    for s_ in range(3):
        e = _eval(0.9, [0.8, 0.5])
        e["grid"][0]["ensemble"] = {"metric": 0.7, "loss": 0.6}  # the ensemble is worst at the first eps
        e["grid"][1]["ensemble"] = {"metric": 0.55, "loss": 2.0}
        e["grid"][1]["multi_step_50x5"] = {"metric": 0.45, "loss": 0.9}  # the restarts at the second
        evs.append(e)
    tr = _result({"plain": evs})
    dec = findings.decide(tr)
    assert dec["attack_strength"]["verdict_attack"] == findings.WORST
    cells = [g[findings.WORST] for g in tr["runs"][0]["eval"]["grid"]]
    assert [(c["metric"], c["metric_from"]) for c in cells] == [(0.7, "ensemble"), (0.45, "multi_step_50x5")]
    assert (cells[1]["loss"], cells[1]["loss_from"]) == (2.0, "ensemble")  # each quantity at its own worst


def test_attack_strength_on_perplexity_ignores_excluded_overflowed_points():
    plain = [_eval(100.0, [150.0, math.inf]) for _ in range(3)]
    for e in plain:
        for g in e["grid"]:
            g["multi_step_50x5"] = {"metric": g["multi_step"]["metric"] * 1.2, "loss": g["multi_step"]["loss"]}
    tr = _result({"plain": plain}, higher=False, chance=10000.0)
    s = findings.attack_strength(tr)
    assert findings.excluded_points(tr, "multi_step") == [1]
    assert s["verdict_attack"] == "multi_step_50x5"
    assert s["mean_metric"]["multi_step"] == pytest.approx(150.0) and s["mean_metric"]["multi_step_50x5"] == pytest.approx(180.0)


def test_results_json_is_strict_json_and_reads_back():
    data = {"a": [math.inf, -math.inf, 1.5], "b": {"c": math.nan, "d": "x"}}
    text = json.dumps(cache.strict_json(data), allow_nan=False)  # strict parsers accept it
    back = cache.from_strict_json(json.loads(text))
    assert back["a"] == [math.inf, -math.inf, 1.5] and math.isnan(back["b"]["c"]) and back["b"]["d"] == "x"


def test_points_at_chance_are_excluded_and_counted():
    plain = [_eval(0.9, [0.8, 0.105]) for _ in range(5)]
    apd = [_eval(0.9, [0.85 + 0.001 * s, 0.11]) for s in range(5)]
    tr = _result({"plain": plain, "apd3": apd})
    assert findings.excluded_points(tr, "multi_step") == [1]
    c = findings.compare(tr, "apd3", "plain", "multi_step", [1])
    assert [r["eps"] for r in c["rows"]] == [0.01] and c["excluded"] == 1 and c["robust"] == "better"


def test_perplexity_orientation():
    plain = [_eval(100.0, [150.0, 400.0]) for _ in range(5)]
    apd = [_eval(95.0 - s, [120.0 - s, 300.0 - s]) for s in range(5)]
    c = findings.compare(_result({"plain": plain, "apd3": apd}, higher=False, chance=10000.0), "apd3", "plain", "multi_step", [])
    assert c["clean"]["call"] == "better" and c["robust"] == "better"


def test_not_meaningful_decides_nothing():
    tr = _result({"plain": [_eval(0.4, [0.3, 0.2]) for _ in range(5)], "apd3": [_eval(0.6, [0.5, 0.4]) for _ in range(5)]})
    dec = findings.decide(tr)
    assert not dec["meaningful"]["meaningful"] and dec["findings"] == [] and "NOT MEANINGFUL" in dec["note"]


def test_attack_strength_switches_to_the_stronger_attack():
    def strong(e: dict, delta: float) -> dict:
        for g in e["grid"]:
            g["multi_step_50x5"] = {"metric": g["multi_step"]["metric"] - delta, "loss": g["multi_step"]["loss"]}
        return e

    same = _result({"plain": [strong(_eval(0.9, [0.8, 0.5]), 0.005) for _ in range(3)]})
    assert findings.attack_strength(same)["verdict_attack"] == "multi_step"
    lower = _result({"plain": [strong(_eval(0.9, [0.8, 0.5]), 0.02) for _ in range(3)]})
    assert findings.attack_strength(lower)["verdict_attack"] == "multi_step_50x5"

    def ensemble(e: dict, delta: float) -> dict:
        for g in e["grid"]:
            g["ensemble"] = {"metric": g["multi_step"]["metric"] - delta, "loss": g["multi_step"]["loss"]}
        return e

    both = _result({"plain": [ensemble(strong(_eval(0.9, [0.8, 0.5]), 0.02), 0.05) for _ in range(3)]})
    assert findings.attack_strength(both)["verdict_attack"] == "ensemble"  # the strongest of the stronger ones


def test_search_histories_per_flip_count_a_group_once_complete():
    from parashield.reproduce.faults import per_flip

    assert per_flip([0.9, 0.8, 0.4, 0.3], [1, 3, 1]) == [0.9, 0.8, 0.8, 0.8, 0.4, 0.3]
    assert per_flip([0.9], []) == [0.9]


def test_bitflip_comparison_on_drops():
    def flips(q: float, random_metric: float, halve) -> dict:
        return {"quantized_metric": q, "random": [{"flips": 100, "metrics": [random_metric] * 3}],
                "search": {"metric_history": [q, q - 0.1, q / 2], "flips_to_halve": halve}}

    rows = [{"method": "plain", "seed": s, **flips(0.9, 0.6, 5 + s % 2)} for s in range(6)]
    rows += [{"method": "apd3", "seed": s, **flips(0.8, 0.75 - 0.001 * s, None if s else 30)} for s in range(6)]
    tr = {"bitflips": rows, "headline": "apd3", "bitflip_config": {"search_flips": 40}, "runs": [],
          "higher_is_better": True, "chance": 0.1, "point": 0.01}
    c = findings.bitflip_comparisons(tr)[0]
    assert c["rows"]["random 100"]["call"] == "better"  # APD drops 0.05, plain 0.3: on drops, despite a lower level
    halve = c["rows"]["flips to halve"]  # APD needed more on all 6 pairs (5 censored at the budget): p = 2/64
    assert halve["a_more"] == 6 and halve["p"] == pytest.approx(2 / 64) and halve["call"] == "better"
    assert c["never_halved"]["apd3"] == 5 and c["robust"] in ("better", "tie") and not c["excluded"]
    at_chance = [{**r, "random": [{"flips": 100, "metrics": [0.1] * 3}]} for r in rows]
    c = findings.bitflip_comparisons({**tr, "bitflips": at_chance})[0]
    assert c["excluded"] == ["random 100"]  # every model at chance there: decides nothing


# ---------------------------------------------------------------------------- references
def test_kneser_ney_is_a_distribution_and_beats_unigram():
    g = random.Random(0)
    vocab = 30
    tokens = [g.randrange(vocab) if g.random() < 0.3 else 7 for _ in range(3000)]
    for i in range(1, len(tokens)):  # a strong bigram dependency
        if tokens[i - 1] == 7 and g.random() < 0.7:
            tokens[i] = 8
    kn = KneserNeyBigram(tokens[:2500], vocab)
    for v in (7, 8, 3, 99):  # 99: a history never seen
        assert sum(kn.prob(v, w) for w in range(vocab)) == pytest.approx(1.0, abs=1e-12)
    counts = [tokens[:2500].count(w) for w in range(vocab)]
    unigram_ppl = math.exp(-sum(math.log(counts[w] / 2500) for w in tokens[2501:]) / (len(tokens) - 2501))
    ref = kneser_ney_bigram(tokens[:2000], tokens[2000:2500], tokens[2500:], vocab)
    assert ref["metric"] < unigram_ppl and ref["selection"]["pick"] in ref["selection"]["candidates"]
    with pytest.raises(ValueError, match="discount"):
        KneserNeyBigram(tokens, vocab, discount=1.5)


def test_logistic_regression_reference_on_digits():
    task = _task()
    refs = task.references()
    assert 0.9 < refs["logistic regression"]["metric"] <= 1.0
    assert refs["logistic regression"]["selection"]["pick"] in refs["logistic regression"]["selection"]["candidates"]


# ---------------------------------------------------------------------------- protocol
def test_poisoned_test_split_changes_no_choice(tiny, tmp_path):
    tiny = dataclasses.replace(tiny, per_method_lrs=(0.01,))
    clean = run(tiny, ("plain", "sam", "apd2"), 1, tmp_path / "a")
    x, y = tiny.test_data[0]
    poisoned = dataclasses.replace(tiny, test_data=[(torch.randn_like(x) * 100, (y + 1) % 10)])
    bad = run(poisoned, ("plain", "sam", "apd2"), 1, tmp_path / "b")
    assert bad["selection"] == clean["selection"] and bad["headline"] == clean["headline"]
    assert all(s["selected_on"] == "validation" for s in clean["selection"].values())
    assert [r["eval"]["clean"]["metric"] for r in bad["runs"]] != [r["eval"]["clean"]["metric"] for r in clean["runs"]]


def test_every_method_picks_its_learning_rate_on_validation(tiny, tmp_path):
    from parashield.reproduce.runner import Run, Spec

    task = dataclasses.replace(tiny, per_method_lrs=(0.01, tiny.lr_grid[0]))
    res = run(task, ("plain", "one_step", "sam", "apd2"), 1, tmp_path)
    sel, plain_lr = res["selection"], res["selection"]["lr"]["pick"]
    rates = [tiny.lr_grid[0], 0.01]  # lr_grid, then the per-method rates not in it
    assert sel["lr"]["candidates"] == rates and plain_lr == rates[sel["lr"]["validation"].index(max(sel["lr"]["validation"]))]
    specs = {r["method"]: r["spec"] for r in res["runs"]}
    assert specs["plain"]["lr"] == plain_lr
    for what, method, radius in (("one_step", "one_step", "eps"), ("sam", "sam", "rho"), ("apd2", "apd2", "eps")):
        lr = sel[f"{what}_lr"]
        assert lr["candidates"] == [plain_lr, *(r for r in rates if r != plain_lr)] and lr["selected_on"] == "validation"
        assert lr["pick"] == lr["candidates"][max(range(2), key=lambda i: lr["validation"][i])]
        assert specs[method]["lr"] == lr["pick"] and specs[method]["eps"] == sel[f"{what}_{radius}"]["pick"]
    assert sel["headline_k"]["validation"] == [max(sel["apd2_lr"]["validation"])]
    # a selection grid is not part of any run's cache key: runs cached without it stay valid
    assert "per_method_lrs" not in task.run_config() and "per_method_lrs" in task.config()
    spec = Spec("plain", plain_lr)
    assert Run(task, spec, 0, tmp_path).key == Run(tiny, spec, 0, tmp_path).key


def test_compute_matched_plain_gets_the_headline_passes(tiny, tmp_path):
    res = run(tiny, ("plain", "plain_matched", "apd2"), 1, tmp_path)
    passes = {r["method"]: r["passes"] for r in res["runs"]}
    matched = next(r for r in res["runs"] if r["method"] == "plain_matched")
    assert matched["spec"]["epochs_factor"] == passes[res["headline"]] == int(res["headline"][3:]) + 1
    assert len(matched["eval"]["train"]["epochs"]) == passes[res["headline"]] * tiny.epochs


def test_sam_rho_grid_spans_the_layer_relative_radius(tiny, tmp_path):
    res = run(tiny, ("plain", "sam"), 1, tmp_path)
    s = res["selection"]["sam_rho"]
    w = s["plain_weight_norm"]
    assert s["candidates"] == [round(e * w, 6) for e in tiny.eps_grid]


def test_a_resumed_selection_needs_no_checkpoint(tiny, tmp_path, monkeypatch):
    """SAM's rho grid scales with plain's weight norm: cached beside the run, so that a selection
    resumed where the checkpoints are gone (e.g. runs brought back from another machine) neither
    retrains plain nor moves the grid."""
    first = run(tiny, ("plain", "sam"), 1, tmp_path)
    for ckpt in tmp_path.rglob("train.pt"):
        ckpt.unlink()
    from parashield.reproduce import runner

    monkeypatch.setattr(runner.Run, "_train", lambda self: pytest.fail("a cached run was trained again"))
    again = run(tiny, ("plain", "sam"), 1, tmp_path)
    assert again["selection"] == first["selection"] and again["runs"] == first["runs"]


def test_finishing_runs_one_at_a_time_writes_the_entries_the_protocol_reads(tiny, tmp_path, monkeypatch):
    """scripts/finish_runs.py (for short GPU leases) computes every final run's evaluation,
    ensemble and budget ablation run by run; the protocol then trains nothing but the runs it
    was told to skip, and reads the same entries."""
    import importlib.util

    from parashield.reproduce import runner
    from parashield.reproduce.ablation import run_budget_ablation
    from parashield.reproduce.ensemble import run_ensemble

    spec = importlib.util.spec_from_file_location("finish_runs", Path(__file__).parents[1] / "scripts" / "finish_runs.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    task = dataclasses.replace(tiny, methods=("plain", "one_step"), seeds=2)
    script.finish(task, tmp_path, skip=frozenset({("one_step", 1)}))
    trained = []
    train = runner.Run._train
    monkeypatch.setattr(runner.Run, "_train", lambda self: trained.append((self.spec.method, self.seed)) or train(self))
    result = run(task, task.methods, task.seeds, tmp_path)
    run_ensemble(task, result, tmp_path)
    run_budget_ablation(task, result, tmp_path)
    assert set(trained) == {("one_step", 1)}  # trained once, then loaded by each later phase
    assert {(r["method"], r["seed"]) for r in result["runs"]} == {(m, s) for s in (0, 1) for m in ("plain", "one_step", result["headline"])}


def test_second_run_is_served_from_the_cache(tiny, tmp_path, monkeypatch):
    first = run(tiny, ("plain", "apd2"), 1, tmp_path)
    from parashield.reproduce import runner

    monkeypatch.setattr(runner.Run, "_train", lambda self: pytest.fail("a cached run was trained again"))
    assert run(tiny, ("plain", "apd2"), 1, tmp_path)["runs"] == first["runs"]


def test_damaged_and_edited_cache_entries_are_recomputed(tiny, tmp_path):
    first = run(tiny, ("plain",), 1, tmp_path)
    path = tmp_path / first["runs"][0]["folder"] / "eval.json"
    entry = json.loads(path.read_text())
    entry["data"]["clean"]["metric"] = 2.0  # edited under the same key
    path.write_text(json.dumps(entry))
    with pytest.warns(UserWarning, match="checksum"):
        again = run(tiny, ("plain",), 1, tmp_path)
    assert again["runs"][0]["eval"]["clean"]["metric"] == first["runs"][0]["eval"]["clean"]["metric"]
    for text in ("", "[]", '{"key": "x"'):
        path.write_text(text)
        with pytest.warns(UserWarning, match="unreadable"):
            again = run(tiny, ("plain",), 1, tmp_path)["runs"][0]["eval"]
        assert (again["clean"], again["grid"]) == (first["runs"][0]["eval"]["clean"], first["runs"][0]["eval"]["grid"])


def test_cache_write_is_atomic_unique_and_follows_the_umask(tmp_path):
    cache.store(tmp_path / "x.json", "k", {"a": 1})
    assert cache.load(tmp_path / "x.json", "k") == {"a": 1} and cache.load(tmp_path / "x.json", "other") is None
    mask = os.umask(0)
    os.umask(mask)
    assert (tmp_path / "x.json").stat().st_mode & 0o777 == 0o666 & ~mask
    (tmp_path / ".train.pt.abc.tmp").write_text("orphan of a killed writer")
    with cache.locked(tmp_path):
        assert not list(tmp_path.glob(".*.tmp"))
    assert not list(tmp_path.glob("*.tmp"))


_SCRIPT = """
import sys, json
from pathlib import Path
from parashield.reproduce import TASKS, run
task = TASKS["digits"](quick=True).shrink(batches=3, examples=48)
res = run(task, ("plain", "apd2"), 2, Path(sys.argv[1]))
print(json.dumps([r["eval"]["clean"] for r in res["runs"]]))
"""


def _protocol(out: Path, **kw) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    return subprocess.Popen([sys.executable, "-c", _SCRIPT, str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env, **kw)


def test_two_concurrent_runs_into_one_folder(tmp_path):
    _task()
    a, b = _protocol(tmp_path), _protocol(tmp_path)
    (oa, ea), (ob, eb) = a.communicate(timeout=300), b.communicate(timeout=300)
    assert a.returncode == 0, ea
    assert b.returncode == 0, eb
    assert json.loads(oa) == json.loads(ob)
    assert not list(tmp_path.rglob("*.tmp"))
    for entry in tmp_path.rglob("*.json"):
        json.loads(entry.read_text())  # every entry whole


_HOLD = """
import fcntl, sys, time
handle = open(sys.argv[1], "a")
fcntl.flock(handle, fcntl.LOCK_EX)
print("held", flush=True)
time.sleep(float(sys.argv[2]))
"""


def _hold(folder: Path, seconds: float) -> subprocess.Popen:
    """Another process holding ``folder``'s run lock for ``seconds``."""
    folder.mkdir(parents=True, exist_ok=True)
    p = subprocess.Popen([sys.executable, "-c", _HOLD, str(folder / ".lock"), str(seconds)], stdout=subprocess.PIPE,
                         text=True)
    assert p.stdout.readline().strip() == "held"
    return p


def test_processes_sharing_a_folder_take_runs_no_other_process_holds(tmp_path):
    from types import SimpleNamespace

    from parashield.reproduce.runner import shared_map
    folders = [tmp_path / f"run{i}" for i in range(4)]
    assert not cache.held_elsewhere(folders[0])  # no lock file yet
    holder = _hold(folders[1], 60)
    try:
        assert cache.held_elsewhere(folders[1]) and not cache.held_elsewhere(folders[2])
        order = []

        def work(i, run):
            order.append(i)
            if i == 3:  # the free runs are done; the holder lets go, and run1 comes last
                holder.kill()
                holder.wait()
            return i * 10

        out = shared_map(range(4), lambda i: SimpleNamespace(folder=folders[i]), work, "test")
    finally:
        holder.kill()
        holder.wait()
    assert out == [0, 10, 20, 30]  # results in the jobs' order
    assert order == [0, 2, 3, 1]  # the held run last
    assert not cache.held_elsewhere(folders[1])


@pytest.mark.slow
def test_killed_runs_finish_equal_to_an_uninterrupted_run(tmp_path):
    _task()
    ref = _protocol(tmp_path / "ref")
    expected = json.loads(ref.communicate(timeout=300)[0])
    g = random.Random(0)
    for _ in range(20):
        p = _protocol(tmp_path / "killed", start_new_session=True)
        time.sleep(g.uniform(1.0, 6.0))
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
            p.communicate()
            continue
        out, err = p.communicate()
        assert p.returncode == 0, err
        assert json.loads(out) == expected
        break
    else:
        final = _protocol(tmp_path / "killed")
        assert json.loads(final.communicate(timeout=300)[0]) == expected


# ---------------------------------------------------------------------------- end to end
@pytest.mark.parametrize("name", [n if n == "digits" else pytest.param(n, marks=pytest.mark.slow) for n in TASKS])
def test_tiny_end_to_end_with_report(name, tmp_path):
    """Every task end to end on a few examples (the real datasets load in full: slow but digits)."""
    task = _task(name).shrink(batches=2, examples=8)
    methods = ("plain", "plain_matched", "one_step", "sam", "sam_layer", f"apd{task.k_grid[0]}")
    res = run_task(task, methods, 3, tmp_path)
    assert set(res["references"]) and {r["method"] for r in res["runs"]} == set(methods)
    assert {r["method"] for r in res["budget_ablation"]} == set(methods)  # the controls and the headline APD
    assert bool(res.get("bitflips")) == bool(task.bitflips)
    for r in res.get("bitflips") or []:  # float32 exponent flips beside the int8 ones
        assert [row["flips"] for row in r["float32_exponent"]["random"]] == [1, 3, 10]
    assert bool(res.get("hessian_density")) == task.spectrum
    for d in res.get("hessian_density", {}).values():  # a density on its grid, integrating to about 1
        step = d["grid"][1] - d["grid"][0]
        assert sum(d["density"]) * step == pytest.approx(1.0, abs=0.05) and d["bottom"] <= d["top"]
    # a few examples train no model that beats the classical references: nothing may be decided
    write_report({"tasks": {name: dict(res)}}, tmp_path)
    undecided = json.loads((tmp_path / "results.json").read_text())["tasks"][name]
    if not undecided["decision"]["meaningful"]["meaningful"]:
        assert not undecided["decision"]["findings"]
        assert not any(k in undecided for k in ("bitflip_comparisons", "budget_comparisons", "equal_compute_comparisons",
                                                "shaped_defense_comparisons"))
    # with a reference every model beats, the whole report is decided and written
    res["references"] = {"worst possible": {"metric": -1.0 if res["higher_is_better"] else math.inf, "selection": {}}}
    report = write_report({"tasks": {name: res}}, tmp_path)
    text = report.read_text()
    assert f"## Task `{name}`" in text and "selected_on" not in text and "References" in text
    data = json.loads((tmp_path / "results.json").read_text())
    assert data["tasks"][name]["decision"]["attack_strength"]["verdict_attack"] in (*findings.ATTACKS, "ensemble", findings.WORST)
    assert all("ensemble" in g for r in res["runs"] for g in r["eval"]["grid"])
    assert (tmp_path / f"{name}_drop_vs_eps.png").is_file()
    if task.equal_compute:  # one-step and the headline K, trained with the same gradient passes
        runs = res["equal_compute"]
        assert {r["k"] for r in runs} == {1, task.k_grid[0]} and len({r["compute"] for r in runs}) == 1
        assert "APD's K at equal compute" in text and data["tasks"][name]["equal_compute_comparisons"][0]["a"] == task.k_grid[0]
    # the headline K again with other budget shapes, compared under the ablation budgets
    assert set(res.get("shaped_defenses", {})) == set(task.shaped_defenses)
    for method, d in res.get("shaped_defenses", {}).items():
        sel, spec = d["selection"], d["selection"]["spec"]
        assert sel["selected_on"] == "validation" and spec["steps"] == int(res["headline"][3:])
        assert (spec["norm"], spec["sparsity"] is None) == {"apd_linf": ("linf", True), "apd_sparse": ("l2", False)}[method]
        assert {c["b"] for c in data["tasks"][name]["shaped_defense_comparisons"][method]} == {"plain", res["headline"]}
        assert d["label"] in text
    ablation = [f"{r['budget']} eps {r['eps']}" for r in res["budget_ablation"][0]["rows"]]
    assert ablation[0].startswith("linf layer")
    comps = data["tasks"][name]["budget_comparisons"]
    if not comps:  # a tiny model can sit at chance clean (tiny PTB): such runs are left out of drops
        assert any(findings.at_chance(res, r["clean_subset_metric"]) for r in res["budget_ablation"])
    for comp in comps:  # every ablation point compared or listed as at chance
        points = [f"{r['budget']} eps {r['eps']}" for r in comp["rows"]] + comp["excluded"]
        assert sorted(points) == sorted(ablation)


def test_report_without_matplotlib_links_no_images(tiny, tmp_path, monkeypatch):
    res = run(tiny, ("plain", "apd2"), 3, tmp_path)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    text = write_report({"tasks": {"digits": res}}, tmp_path / "r").read_text()
    assert "matplotlib is not installed" in text and ".png" not in text


def test_budget_ablation_excludes_points_at_chance():
    def rows(metrics):
        return [{"budget": "linf layer", "eps": e, "metric": m} for e, m in zip((0.05, 0.2), metrics)]

    ab = [{"method": "plain", "seed": s, "clean_subset_metric": 0.9, "rows": rows([0.7, 0.105])} for s in range(4)]
    ab += [{"method": "apd3", "seed": s, "clean_subset_metric": 0.9, "rows": rows([0.8 + 0.01 * s, 0.11])} for s in range(4)]
    tr = {"budget_ablation": ab, "headline": "apd3", "higher_is_better": True, "chance": 0.1, "point": 0.01}
    (c,) = findings.budget_comparisons(tr)
    assert [r["eps"] for r in c["rows"]] == [0.05] and c["excluded"] == ["linf layer eps 0.2"]
    assert c["rows"][0]["drop"]["call"] == "better"


@pytest.mark.parametrize("gain, call", [(0.05, "better"), (-0.05, "worse"), (0.0, "tie")])
def test_equal_compute_comparisons_decide_both_ways_and_exclude_chance(gain, call):
    def run(k, s, clean, attacked):
        return {"k": k, "seed": s, "clean": clean, "clean_subset_metric": clean,
                "ensemble": [{"eps": 0.05, "metric": attacked}, {"eps": 0.2, "metric": 0.105}]}

    noise = [0.01, -0.01, 0.02, -0.02, 0.0]
    rows = [run(1, s, 0.95, 0.7 + noise[s]) for s in range(5)]
    rows += [run(3, s, 0.95 + gain / 5, 0.7 + gain + noise[s] / 2) for s in range(5)]
    tr = {"equal_compute": rows, "higher_is_better": True, "chance": 0.1, "point": 0.01}
    (c,) = findings.equal_compute_comparisons(tr)
    assert (c["a"], c["b"], c["seeds"], c["excluded"]) == (3, 1, 5, ["ensemble eps 0.2"])
    assert [r["eps"] for r in c["rows"]] == [0.05] and c["rows"][0]["drop"]["call"] == call
    assert c["clean"]["call"] == call


def test_the_defense_budget_shape_reaches_the_optimizer_and_keeps_old_cache_keys():
    from parashield.budget import Budget
    from parashield.reproduce.runner import Spec, build_optimizer

    task = _task("digits")
    spec = Spec("apd", 0.02, 0.1, 2, norm="linf")
    assert build_optimizer(spec, task.build_model(), task).budget == Budget("linf", 0.1, scale="layer")
    sparse = Spec("apd", 0.02, 1.5, 2, sparsity=170)
    assert build_optimizer(sparse, task.build_model(), task).budget == Budget("l2", 1.5, sparsity=170)
    assert {"norm", "sparsity"}.isdisjoint(Spec("apd", 0.02, 0.1, 2).key())
    assert spec.key()["norm"] == "linf" and sparse.key()["sparsity"] == 170
    assert spec.name() == "apd_lr0.02_eps0.1_K2_linf" and sparse.name() == "apd_lr0.02_eps1.5_K2_n170"


def test_a_run_collapsed_to_chance_counts_for_clean_but_not_for_robustness():
    """A model at chance has nothing left to lose: its zero drop must not make its method look
    robust; its clean metric still counts against the method."""
    def ev(clean, attacked):
        return {"clean": {"metric": clean, "corrupted_subset_metric": clean, "loss": 0.3},
                "grid": [{"eps": 0.1, "ensemble": {"metric": attacked, "loss": 1.0}}]}

    runs = [{"method": "plain", "seed": s, "eval": ev(0.9, 0.5 + 0.01 * s)} for s in range(4)]
    runs += [{"method": "apd2", "seed": s, "eval": ev(0.9, 0.6 + 0.02 * s)} for s in range(3)]
    runs += [{"method": "apd2", "seed": 3, "eval": ev(0.1, 0.1)}]  # collapsed: drop 0
    tr = {"runs": runs, "higher_is_better": True, "chance": 0.1, "point": 0.01}
    assert findings.collapsed(tr) == [{"method": "apd2", "seed": 3, "metric": 0.1, "decided_on": "test", "decided_by": 0.1}]
    c = findings.compare(tr, "apd2", "plain", "ensemble", [])
    assert (c["seeds"], c["robust_seeds"]) == (4, 3) and c["clean"]["mean"] == pytest.approx(-0.2)
    assert c["rows"][0]["drop"]["mean"] == pytest.approx(0.11)  # plain's drops 0.40/0.39/0.38, APD's 0.30/0.28/0.26
    without = findings.compare({**tr, "runs": runs[:7] + [{"method": "apd2", "seed": 3, "eval": ev(0.9, 0.66)}]},
                               "apd2", "plain", "ensemble", [])
    assert without["robust_seeds"] == 4


# ---------------------------------------------------------------------------- profiles, devices, slices
@pytest.mark.parametrize("name", ["fashion", pytest.param("ptb", marks=pytest.mark.slow),
                                  pytest.param("translation", marks=pytest.mark.slow)])
def test_gpu_profile_tasks_train_evaluate_and_keep_their_own_cache(name, tmp_path):
    """The larger configurations run end to end (tiny, on the CPU) under their own names, so
    that their runs never share cache entries with the cpu profile's."""
    gpu = _task(name, profile="gpu")
    assert gpu.name == f"{name}-gpu" and gpu.run_config() != _task(name).run_config()
    tiny = gpu.shrink(batches=2, examples=8)
    if name == "fashion":  # its reference is the cpu task's logistic regression (slow end-to-end test)
        tiny = dataclasses.replace(tiny, references=lambda: {"stub": {"metric": 0.5, "selection": {}}})
    res = run(tiny, ("plain",), 1, tmp_path)
    assert res["task"] == f"{name}-gpu" and math.isfinite(res["runs"][0]["eval"]["clean"]["metric"])
    (ref,) = res["references"].values()
    assert math.isfinite(ref["metric"])
    assert (tmp_path / "cache" / f"{name}-gpu").is_dir()


def test_profiles_are_checked():
    with pytest.raises(ValueError, match="profile must be one of"):
        TASKS["fashion"](profile="tpu")


def test_shift_flip_moves_each_image_within_its_padding_and_mirrors_about_half():
    from parashield.reproduce.tasks import _shift_flip

    gen = torch.Generator().manual_seed(0)
    x = torch.arange(64 * 4 * 5, dtype=torch.float32).reshape(64, 1, 4, 5) + 1
    same, _ = _shift_flip((x, None), gen, pad=0)
    mirrored = [bool(torch.equal(a, b.flip(-1))) for a, b in zip(same, x)]
    assert all(m or torch.equal(a, b) for m, a, b in zip(mirrored, same, x)) and 16 < sum(mirrored) < 48
    one = torch.zeros(256, 1, 9, 9)
    one[:, :, 4, 3] = 1.0  # a single pixel off the vertical axis
    out, _ = _shift_flip((one, None), gen, pad=2)
    where = [divmod(int(o.flatten().argmax()), 9) for o in out]
    assert all(float(o.sum()) == 1.0 for o in out)  # never pushed out of the image here
    assert {r for r, _ in where} == {2, 3, 4, 5, 6} and {c for _, c in where} == set(range(1, 8))
    dark = torch.full((64, 1, 6, 6), -0.8)  # a standardized black image: the fill is the background
    shifted, _ = _shift_flip((dark, None), gen, pad=2, fill=-0.8)
    assert torch.equal(shifted, dark)


def test_fashion_gpu_augmentation_fills_with_the_standardized_background():
    task = _task("fashion", profile="gpu")
    x, _ = task.train_epoch(torch.Generator().manual_seed(0))[0]
    background = float(x.min())
    assert background < -0.5 and not bool((x == 0).any())  # a 0 fill would be the mean grey, in no real image
    assert float((x == background).float().mean()) > 0.5


def test_task_on_a_device_moves_data_and_models_and_keeps_the_batch_order():
    task = _task()
    meta = task.on("meta")
    assert task.on("cpu") is task
    assert all(b[0].device.type == "meta" for b in meta.attack_data + meta.valid_data + meta.test_data)
    assert all(p.device.type == "meta" for p in meta.build_model().parameters())
    assert all(b[1].device.type == "meta" for b in meta.train_epoch(torch.Generator().manual_seed(3)))
    assert meta.run_config() == task.run_config()  # the device keys nothing: runs move between devices


def test_task_on_a_device_draws_the_same_batches_in_the_same_order(monkeypatch):
    import parashield.objective as objective

    moved = []
    monkeypatch.setattr(objective, "to_device", lambda b, device: moved.append(b) or b)
    task = _task()
    other = task.on("meta")  # every transfer is recorded and left on the CPU
    cpu_epoch = task.train_epoch(torch.Generator().manual_seed(3))
    moved.clear()
    epoch = list(other.train_epoch(torch.Generator().manual_seed(3)))
    assert len(epoch) == len(cpu_epoch) == len(moved)
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(epoch, cpu_epoch))


def test_time_limited_training_stops_at_an_epoch_boundary_and_resumes_to_the_same_model(tiny, tmp_path, monkeypatch):
    from parashield.reproduce import runner

    task = dataclasses.replace(tiny, epochs=4)
    spec = runner.Spec("apd", tiny.lr_grid[0], 0.05, 2)
    whole = runner.Run(task, spec, 0, tmp_path / "whole").model()
    clock = iter(range(100))  # each epoch's check reads the clock once
    monkeypatch.setattr(runner.time, "monotonic", lambda: next(clock))
    with runner.time_limit(2.5), pytest.raises(runner.TimeLimitReached, match="before epoch 3 .* 2 epochs"):
        runner.Run(task, spec, 0, tmp_path / "sliced").model()
    clock = iter(range(100))
    monkeypatch.setattr(runner.time, "monotonic", lambda: next(clock))
    with runner.time_limit(0.5), pytest.raises(runner.TimeLimitReached, match="before computing .*eval.json"):
        runner.Run(task, spec, 0, tmp_path / "whole").cached("eval", lambda m: {"x": 1})  # trained: only the evaluation is left
    assert not (tmp_path / "whole" / "cache").exists() or not list((tmp_path / "whole").rglob("eval.json"))
    monkeypatch.undo()
    resumed = runner.Run(task, spec, 0, tmp_path / "sliced")
    model = resumed.model()
    assert len(resumed.log["epochs"]) == 4
    for a, b in zip(whole.state_dict().values(), model.state_dict().values()):
        assert torch.equal(a, b)


def test_a_results_json_from_before_the_sparse_defense_keeps_its_linf_section(tiny, tmp_path):
    res = run_task(dataclasses.replace(tiny, shaped_defenses=("apd_linf",)), ("plain", "apd2"), 3, tmp_path)
    old = {k: v for k, v in res.items() if k != "shaped_defenses"}
    old["linf_defense"] = {k: v for k, v in res["shaped_defenses"]["apd_linf"].items() if k != "label"}
    old["references"] = {"worst possible": {"metric": -1.0, "selection": {}}}  # decided, so compared
    text = write_report({"tasks": {"digits": old}}, tmp_path).read_text()
    assert "APD trained with an L-inf budget" in text


def test_picks_at_the_edge_of_a_grid_are_flagged():
    from parashield.reproduce.report import _at_grid_edge

    assert _at_grid_edge({"candidates": [0.01, 0.02, 0.05, 0.1], "pick": 0.1})
    assert _at_grid_edge({"candidates": [3, 2, 5], "pick": 2})
    assert not _at_grid_edge({"candidates": [0.01, 0.02, 0.05, 0.1], "pick": 0.05})
    assert not _at_grid_edge({"candidates": [0.01, 0.02], "pick": 0.02})  # two values have no middle
    assert not _at_grid_edge({"candidates": ["a", "b", "c"], "pick": "a"})


def test_the_restarts_attack_reusing_the_50_step_run_equals_one_call_with_restarts():
    from types import SimpleNamespace

    import parashield as ps
    from parashield.corruption import MultiStepCorruption
    from parashield.reproduce.runner import attacks

    task = SimpleNamespace(multi_steps=1, strong_steps=2, strong_restarts=3)
    winners = set()
    for seed in range(6):
        torch.manual_seed(seed)
        model = torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
        data = [(torch.randn(16, 5), torch.randint(0, 3, (16,)))]
        obj = ps.Objective(model, lambda m, b: torch.nn.functional.cross_entropy(m(b[0]), b[1]), data)
        budget = ps.Budget("l2", 2.0, scale="layer")
        got = attacks(task, budget, seed, obj)
        ref = MultiStepCorruption(budget, steps=2, restarts=3, seed=seed)(obj)
        assert got["multi_step_50x5"].loss_after == ref.loss_after
        assert all(torch.equal(got["multi_step_50x5"].delta[n], ref.delta[n]) for n in ref.delta)
        alone = MultiStepCorruption(budget, steps=2)(obj)
        assert all(torch.equal(got["multi_step_50"].delta[n], alone.delta[n]) for n in ref.delta)
        winners.add(got["multi_step_50x5"] is got["multi_step_50"])
    assert winners == {True, False}  # both branches were taken: restart 0 and a random restart won


def test_the_layer_table_can_cover_weight_matrices_only_and_keeps_older_keys(tiny):
    from parashield.reproduce.runner import test_evaluation

    task = dataclasses.replace(tiny, layer_table="matrices")
    torch.manual_seed(0)
    model = task.build_model()
    names = [r["name"] for r in test_evaluation(task, model, 0)["layers"]]
    matrices = [n for n, p in model.named_parameters() if p.dim() >= 2]
    assert names == matrices and len(matrices) < len(list(model.parameters()))
    assert "layer_table" not in tiny.run_config() and task.run_config()["layer_table"] == "matrices"
    with pytest.raises(ValueError, match="layer_table must be"):
        dataclasses.replace(tiny, layer_table="biases")


def test_a_broken_run_counts_as_maximally_damaged_not_as_missing():
    plain = [_eval(100.0, [150.0, 400.0]) for _ in range(4)]
    apd = [_eval(100.0, [120.0, 300.0]) for _ in range(4)]
    apd[3]["grid"][1]["multi_step"]["metric"] = math.inf  # overflowed: past chance
    tr = _result({"plain": plain, "apd3": apd}, higher=False, chance=10000.0)
    assert findings.drop(tr, apd[3], 1, "multi_step") == pytest.approx(10000.0 - 100.0)  # capped at chance
    row = findings.compare(tr, "apd3", "plain", "multi_step", [])["rows"][1]["drop"]
    assert row["n"] == 4  # the overflowed seed stays in the pairing
    acc = _result({"plain": [_eval(0.9, [0.8, math.nan])]})
    assert findings.drop(acc, acc["runs"][0]["eval"], 1, "multi_step") == pytest.approx(0.8)  # NaN counts as chance


def test_finding_4_is_not_decided_without_included_points_and_ignores_undecided_extra_controls():
    plain = [_eval(0.90 + 0.001 * s, [0.80, 0.50]) for s in range(5)]
    apd = [_eval(0.93 + 0.001 * s, [0.88 + 0.002 * s, 0.70 + 0.003 * s]) for s in range(5)]
    every = {"plain": plain, "plain_matched": plain, "one_step": plain, "sam": plain, "apd3": apd}
    assert findings.finding_4(_result(every), "multi_step", [0, 1])["verdict"].startswith("NOT DECIDED")
    f4 = findings.finding_4(_result({**every, "sam_layer": plain[:2]}), "multi_step", [])
    assert f4["verdict"] == "CONFIRMED (not decided against sam_layer)"


def test_spearman_up_to_8_pairs_is_called_by_its_exact_p():
    r = spearman([1, 2, 3, 4, 5], [1, 2, 3, 5, 4])  # rho 0.9, exact p 1/12: the Fisher-z interval excludes 0
    assert r.rho == pytest.approx(0.9) and r.low > 0 and r.p == pytest.approx(1 / 12) and r.call == "undecided"


def test_shared_map_keeps_no_run_alive():
    import gc
    import weakref
    from parashield.reproduce.runner import shared_map

    class FakeRun:
        def __init__(self, folder: Path) -> None:
            self.folder = folder

    made = []

    def run_of(i):
        r = FakeRun(Path("/nonexistent") / str(i))
        made.append(weakref.ref(r))
        return r

    assert shared_map(range(3), run_of, lambda i, r: i, "test") == [0, 1, 2]
    gc.collect()
    assert made and all(ref() is None for ref in made)


def test_hessian_negative_mass_counts_curvature_below_a_share_of_the_largest():
    """A quadratic with Hessian diag(10, 1, -0.05, -0.5): Lanczos is exact in 4 steps and a
    Rademacher probe puts weight 1/4 on each eigenvalue, so the mass below -0.01 x 10 is 1/4
    (only -0.5), where counting every node below 0 would give 1/2."""
    import types

    from parashield.reproduce.spectrum import NEGATIVE_SHARE, density_evaluate

    h = torch.tensor([10.0, 1.0, -0.05, -0.5], dtype=torch.float64)
    model = torch.nn.Module()
    model.w = torch.nn.Parameter(torch.tensor([0.3, -0.2, 0.1, 0.4], dtype=torch.float64))
    task = types.SimpleNamespace(loss_fn=lambda m, batch: 0.5 * (h * m.w**2).sum(), attack_data=[torch.zeros(1)])
    d = density_evaluate(task, model)
    assert NEGATIVE_SHARE == 0.01 and d["negative_share"] == NEGATIVE_SHARE
    assert d["top"] == pytest.approx(10.0) and d["bottom"] == pytest.approx(-0.5)
    assert d["negative_mass"] == pytest.approx(0.25)
    nodes, weights = torch.tensor(d["nodes"]), torch.tensor(d["weights"])
    assert float((weights * (nodes < 0)).sum(1).mean()) == pytest.approx(0.5)


def test_a_widened_grid_keeps_the_cached_runs_and_trains_only_new_candidates(tiny, tmp_path, monkeypatch):
    first = run(tiny, ("plain", "one_step"), 1, tmp_path)
    wide = dataclasses.replace(tiny, eps_grid=(*tiny.eps_grid, 2 * tiny.eps_grid[-1]),
                               key_grids={"eps_grid": tiny.eps_grid})
    assert wide.run_config() == tiny.run_config() and wide.config()["eps_grid"] == wide.eps_grid
    from parashield.reproduce import runner

    trained = []
    train = runner.Run._train
    monkeypatch.setattr(runner.Run, "_train", lambda self: trained.append(self.spec) or train(self))
    again = run(wide, ("plain", "one_step"), 1, tmp_path)
    assert trained and all(s.eps == wide.eps_grid[-1] for s in trained)  # the new candidates alone
    assert again["selection"]["one_step_eps"]["candidates"] == list(wide.eps_grid)
    assert again["selection"]["lr"] == first["selection"]["lr"]
    with pytest.raises(ValueError, match="key_grids"):
        dataclasses.replace(tiny, key_grids={"eval_eps": (0.1,)})
