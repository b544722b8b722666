"""The paper reproduction: a tiny end-to-end run of every task, the run cache
and the resume after an interruption, and the report writer on hand-written results."""

from __future__ import annotations

import dataclasses
import json
import math
import statistics

import pytest
import torch
from torch import nn

import parashield
from parashield.reproduce.datasets import MissingDataError
from parashield.reproduce import METHODS, TASKS, run, runner, write_report
from parashield.reproduce.report import _fmt, findings, summarize
from parashield.reproduce.runner import mean_std
from parashield.reproduce.runner import CORRUPTIONS

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
PLOTS = ("metric_vs_eps", "indicator", "layers")


def tiny(name: str, **kw):
    """``TASKS[name]().shrink(**kw)``, or a skip naming the install command of missing data."""
    try:
        task = TASKS[name]()
    except MissingDataError as exc:
        pytest.skip(f"data of task {name!r} not installed; install it with: {exc.install_command}")
    return task.shrink(**kw)


def canonical(obj) -> str:
    """JSON text of results as the cache stores them (tuples become lists, NaN compares equal)."""
    return json.dumps(json.loads(json.dumps(obj, default=float)), sort_keys=True)


def without_timings(result: dict) -> dict:
    r = json.loads(json.dumps(result, default=float))
    for k in ("eval_seconds", "train_seconds_this_session"):
        r.pop(k)
    r["train"].pop("seconds")
    return r


@pytest.fixture(scope="module")
def digits_tiny():
    return tiny("digits")


# ------------------------------------------------------------------------------ end to end
@pytest.mark.parametrize("name", sorted(TASKS))
def test_tiny_end_to_end(name, tmp_path):
    task = tiny(name)
    result = run(task, ("plain", "apd2"), 1, tmp_path)

    assert result["task"] == name and result["higher_is_better"] == task.higher_is_better
    assert result["config"] == task.config()
    assert [(r["method"], r["seed"]) for r in result["runs"]] == [("plain", 0), ("apd2", 0)]
    keys = {r["key"] for r in result["runs"]}
    assert len(keys) == 2  # the method is part of the key
    indicator_kinds = {"first_order", "random", "one_step", "multi_step"} | ({"second_order"} if task.curvature else set())
    for r in result["runs"]:
        folder = tmp_path / "runs" / name / r["method"] / "seed0"
        assert (folder / "train.pt").is_file()
        cached = json.loads((folder / "eval.json").read_text())
        assert canonical(cached) == canonical(r)
        assert {"key", "task", "method", "seed", "train", "eval", "eval_seconds", "train_seconds_this_session"} <= set(cached)
        assert [e["epoch"] for e in cached["train"]["epochs"]] == [1]
        assert math.isfinite(cached["train"]["epochs"][0]["train_loss"])
        ev = cached["eval"]
        assert {"clean", "grid", "sweep", "layers", "layers_eps", "critical_eps", "critical_eps_definition"} <= set(ev)
        assert ("hessian" in ev) == task.curvature
        assert set(ev["clean"]) == {"loss", "metric", "attack_loss"}
        assert all(math.isfinite(v) for v in ev["clean"].values())
        metric = ev["clean"]["metric"]
        assert (0 <= metric <= 1) if task.metric_name == "accuracy" else (0 <= metric <= 100) if task.metric_name == "bleu" else metric >= 1
        assert [(g["scale"], g["eps"]) for g in ev["grid"]] == [(s, e) for s, v in task.eval_eps.items() for e in v]
        for g in ev["grid"]:
            assert set(g) == {"scale", "eps", "indicators", *CORRUPTIONS}
            assert set(g["random"]) == {"loss", "loss_std", "metric", "metric_std"}
            assert set(g["one_step"]) == set(g["multi_step"]) == {"loss", "metric"}
            assert set(g["indicators"]) == indicator_kinds
            assert g["indicators"]["one_step"] > 0  # the gradient corruption raises the attack loss
        assert [s["eps"] for s in ev["sweep"]] == list(task.sweep_eps)
        assert set(ev["critical_eps"]) == set(task.critical_kinds)
        assert all(c > 0 for c in ev["critical_eps"].values())
        assert ev["layers"] and {"name", "numel", "value"} == set(ev["layers"][0])
        assert sum(row["numel"] for row in ev["layers"]) == sum(p.numel() for p in task.build_model().parameters())

    report = write_report({"tasks": {name: result}}, tmp_path / "report")
    assert report == tmp_path / "report" / "report.md"
    text = report.read_text()
    for heading in (f"## Task `{name}`", f"### {task.metric_name} under corruption", "### Loss change indicators",
                    "### Critical eps", "### Per-layer vulnerability", "### Findings"):
        assert heading in text
    assert ("### Curvature" in text) == task.curvature
    for label in (METHODS["plain"], METHODS["apd2"]):
        assert f"| {label} |" in text
        for kind in CORRUPTIONS:
            assert f"| {label} | {kind} |" in text
    verdicts = [line for line in text.splitlines() if line.startswith("- **")]
    assert len(verdicts) == 4 and all("CONFIRMED" in v for v in verdicts)
    results = json.loads((tmp_path / "report" / "results.json").read_text())
    assert results["versions"] == {"parashield": parashield.__version__, "torch": torch.__version__,
                                   "python": results["versions"]["python"]}
    assert set(results["tasks"][name]["summary"]) == {"plain", "apd2"}
    assert len(results["tasks"][name]["findings"]) == 4
    pytest.importorskip("matplotlib")
    for plot in PLOTS:
        png = tmp_path / "report" / f"{name}_{plot}.png"
        assert png.read_bytes()[:8] == PNG_MAGIC
        assert f"({name}_{plot}.png)" in text


# ------------------------------------------------------------------------------ cache
def test_second_run_is_served_from_the_cache(digits_tiny, tmp_path, monkeypatch):
    first = run(digits_tiny, ("plain", "apd2"), 1, tmp_path)

    def boom(*args, **kwargs):
        raise AssertionError("a cached run was recomputed")

    monkeypatch.setattr(runner, "train", boom)
    monkeypatch.setattr(runner, "evaluate", boom)
    second = run(digits_tiny, ("plain", "apd2"), 1, tmp_path)
    assert canonical(second) == canonical(first)


def test_changed_config_invalidates_the_cache(digits_tiny, tmp_path, monkeypatch):
    first = run(digits_tiny, ("plain",), 1, tmp_path)["runs"][0]
    folder = tmp_path / "runs" / "digits" / "plain" / "seed0"
    trained = torch.load(folder / "train.pt", weights_only=True)["model"]
    changed = dataclasses.replace(digits_tiny, lr=digits_tiny.lr * 2)
    assert changed.config() != digits_tiny.config()

    real_train = runner.train
    calls = []

    def counting_train(task, method, seed, folder, key):
        calls.append(key)
        return real_train(task, method, seed, folder, key)

    monkeypatch.setattr(runner, "train", counting_train)
    second = run(changed, ("plain",), 1, tmp_path)["runs"][0]
    assert calls == [second["key"]] and second["key"] != first["key"]
    # trained from scratch for one epoch, not resumed from the stale checkpoint of the other lr
    assert [e["epoch"] for e in second["train"]["epochs"]] == [1]
    retrained = torch.load(folder / "train.pt", weights_only=True)
    assert retrained["extra"]["key"] == second["key"]
    assert any(not torch.equal(trained[k], retrained["model"][k]) for k in trained)
    assert json.loads((folder / "eval.json").read_text())["key"] == second["key"]


def test_cache_key_covers_shrink_data_seed_and_method(digits_tiny):
    full = TASKS["digits"]()
    assert full.config() != digits_tiny.config()
    assert full.shrink(batches=3).config() != digits_tiny.config()
    assert full.shrink(examples=16).config() != digits_tiny.config()
    assert TASKS["digits"](seed=1).shrink().config() != digits_tiny.config()
    assert TASKS["digits"]().shrink().config() == digits_tiny.config()  # deterministic
    key = lambda task, method, seed: runner.config_hash(  # noqa: E731 - the key run() uses
        {"task": task.config(), "method": method, "seed": seed, "version": parashield.__version__})
    assert len({key(digits_tiny, "plain", 0), key(digits_tiny, "apd2", 0), key(digits_tiny, "plain", 1)}) == 3


def test_stale_checkpoint_of_another_model_is_not_loaded(digits_tiny, tmp_path):
    """A config change that changes the model's shape must start over, not crash on load."""
    from parashield.reproduce.models import MLP

    run(digits_tiny, ("plain",), 1, tmp_path)
    other = dataclasses.replace(digits_tiny, build_model=lambda: MLP(64, hidden=(16,), num_classes=10),
                                info={**digits_tiny.info, "model": "MLP 64-16-10"})
    result = run(other, ("plain",), 1, tmp_path)["runs"][0]
    params = torch.load(tmp_path / "runs" / "digits" / "plain" / "seed0" / "train.pt", weights_only=True)["model"]
    assert any(t.shape == (16, 64) for t in params.values())
    assert [e["epoch"] for e in result["train"]["epochs"]] == [1]


# ------------------------------------------------------------------------------ resume
def dropout_digits(task):
    """Three epochs of three shuffled batches with a dropout model: resuming must restore the
    optimizer, the scheduler, the shuffling and the global RNG (dropout masks)."""
    return dataclasses.replace(
        task, epochs=3,
        build_model=lambda: nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Dropout(0.3), nn.Linear(32, 10)),
        info={**task.info, "model": "MLP 64-32-10 with dropout"},
    )


@pytest.mark.parametrize("method", list(METHODS))
def test_interrupted_run_resumes_to_the_uninterrupted_result(method, tmp_path, monkeypatch):
    task = dropout_digits(tiny("digits", batches=3, examples=32))
    reference = run(task, (method,), 1, tmp_path / "a")["runs"][0]

    real_save = runner.save_checkpoint
    saved = []

    def save_then_interrupt(*args, **kwargs):
        real_save(*args, **kwargs)
        saved.append(kwargs["epoch"])
        raise KeyboardInterrupt

    monkeypatch.setattr(runner, "save_checkpoint", save_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        run(task, (method,), 1, tmp_path / "b")
    assert saved == [1]
    folder = tmp_path / "b" / "runs" / "digits" / method / "seed0"
    assert (folder / "train.pt").is_file() and not (folder / "eval.json").exists()
    monkeypatch.setattr(runner, "save_checkpoint", real_save)

    epochs_trained = []
    base_epoch = task.train_epoch

    def counting_epoch(gen):
        epochs_trained.append(1)
        return base_epoch(gen)

    resumed = run(dataclasses.replace(task, train_epoch=counting_epoch), (method,), 1, tmp_path / "b")["runs"][0]
    assert len(epochs_trained) == 2  # epoch 1 was not trained again
    assert resumed["key"] == reference["key"]
    assert [e["epoch"] for e in resumed["train"]["epochs"]] == [1, 2, 3]
    assert resumed["train"]["epochs"] == reference["train"]["epochs"]  # same losses, bit for bit

    a = torch.load(tmp_path / "a" / "runs" / "digits" / method / "seed0" / "train.pt", weights_only=True)
    b = torch.load(folder / "train.pt", weights_only=True)
    assert a["model"].keys() == b["model"].keys()
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    assert a["extra"]["epoch"] == b["extra"]["epoch"] == 3
    assert canonical(without_timings(resumed)) == canonical(without_timings(reference))


def test_finished_training_without_evaluation_is_not_retrained(digits_tiny, tmp_path, monkeypatch):
    first = run(digits_tiny, ("plain",), 1, tmp_path)["runs"][0]
    (tmp_path / "runs" / "digits" / "plain" / "seed0" / "eval.json").unlink()
    calls = []
    base_epoch = digits_tiny.train_epoch
    task = dataclasses.replace(digits_tiny, train_epoch=lambda gen: calls.append(1) or base_epoch(gen))
    again = run(task, ("plain",), 1, tmp_path)["runs"][0]
    assert calls == []
    assert canonical(without_timings(again)) == canonical(without_timings(first))


# ------------------------------------------------------------------------------ report on a fixture
GRID = (("absolute", 0.5), ("layer", 0.05))
SWEEP = (1e-3, 1e-2)


def fake_eval(clean, under, indicators, sweep, critical, layers_value=0.5):
    """One run's ``eval``: ``under[kind]`` and ``indicators[kind]`` hold one value per GRID eps,
    ``sweep`` (first-order, one-step) pairs per SWEEP eps."""
    grid = []
    for i, (scale, eps) in enumerate(GRID):
        row = {"scale": scale, "eps": eps,
               "random": {"loss": 1.0, "loss_std": 0.0, "metric": under["random"][i], "metric_std": 0.0},
               "one_step": {"loss": 2.0, "metric": under["one_step"][i]},
               "multi_step": {"loss": 3.0, "metric": under["multi_step"][i]},
               "indicators": {k: v[i] for k, v in indicators.items()}}
        grid.append(row)
    return {
        "clean": {"loss": 0.5, "metric": clean, "attack_loss": 0.4},
        "grid": grid,
        "sweep": [{"eps": e, "first_order": fo, "one_step": os} for e, (fo, os) in zip(SWEEP, sweep)],
        "layers": [{"name": "fc.weight", "numel": 640, "value": layers_value}, {"name": "fc.bias", "numel": 10, "value": 0.01}],
        "layers_eps": 0.05,
        "critical_eps": dict(critical),
        "critical_eps_definition": "layer-relative L2 eps at which the metric worsens by 0.1",
    }


def fake_run(method, seed, ev, seconds=10.0):
    return {"key": f"{method}{seed}", "task": "fake", "method": method, "seed": seed,
            "train": {"epochs": [{"epoch": 1, "train_loss": 0.3}], "seconds": seconds}, "eval": ev,
            "eval_seconds": 1.0, "train_seconds_this_session": seconds}


def fake_config(metric_name="accuracy"):
    return {"name": "fake", "metric_name": metric_name, "epochs": 1, "optimizer": "sgd", "lr": 0.1,
            "train_eps": 0.05, "sam_rho": 0.05, "multi_steps": 10, "random_trials": 5, "info": {"model": "fake"}}


# ΔL indicators of the plain model, per GRID eps: the papers' findings hold
PLAIN_IND = {"first_order": [0.9, 1.9], "random": [0.01, 0.02], "one_step": [1.0, 2.0], "multi_step": [1.5, 2.5]}
APD_IND = {"first_order": [0.3, 0.6], "random": [0.005, 0.01], "one_step": [0.3, 0.7], "multi_step": [0.4, 0.9]}
GOOD_SWEEP = [(0.0100, 0.0101), (0.105, 0.12)]  # relative error 1% at the smallest eps, 12.5% at the largest


def fixture_results(plain_ind=PLAIN_IND, metric_name="accuracy", plain_clean=(0.80, 0.90), apd_clean=(0.86, 0.90),
                    plain_under=None, apd_under=None, methods=("plain", "apd3")):
    """Two methods x two seeds (the second seed's numbers shifted a little)."""
    plain_under = plain_under or {"random": [0.79, 0.78], "one_step": [0.5, 0.4], "multi_step": [0.3, 0.2]}
    apd_under = apd_under or {"random": [0.85, 0.84], "one_step": [0.8, 0.7], "multi_step": [0.7, 0.6]}
    crit = {"plain": [{"random": math.inf, "one_step": 0.2, "multi_step": 0.1},
                      {"random": 0.4, "one_step": 0.3, "multi_step": 0.1}],
            "apd3": [{"random": math.inf, "one_step": 0.2, "multi_step": 0.2},
                     {"random": math.inf, "one_step": 0.3, "multi_step": 0.4}]}
    runs = []
    for seed in (0, 1):
        shift = 0.01 * seed
        for method in methods:
            ind, under, clean = (plain_ind, plain_under, plain_clean) if method == "plain" else (APD_IND, apd_under, apd_clean)
            ev = fake_eval(clean[seed], {k: [x + shift for x in v] for k, v in under.items()},
                           {k: [x * (1 + shift) for x in v] for k, v in ind.items()}, GOOD_SWEEP, crit[method][seed])
            runs.append(fake_run(method, seed, ev, seconds=10.0 * (seed + 1)))
    return {"task": "fake", "config": fake_config(metric_name), "runs": runs}


def ms(xs, digits=4):
    return f"{statistics.mean(xs):.{digits}f} ± {statistics.stdev(xs):.{digits}f}"


def verdicts(tr):
    return [f["confirmed"] for f in findings(tr, summarize(tr))]


def test_summary_mean_and_std_over_seeds():
    tr = fixture_results()
    s = summarize(tr)
    assert set(s) == {"plain", "apd3"} and s["plain"]["seeds"] == 2
    m, sd = s["plain"]["clean_metric"]
    assert m == pytest.approx(0.85) and sd == pytest.approx(statistics.stdev([0.80, 0.90]))
    m, sd = s["apd3"]["grid"][1]["multi_step"]["metric"]
    assert m == pytest.approx(0.605) and sd == pytest.approx(statistics.stdev([0.6, 0.61]))
    assert s["plain"]["grid"][0]["indicators"]["one_step"][0] == pytest.approx(1.005)
    assert s["plain"]["critical_eps"]["multi_step"] == (pytest.approx(0.1), pytest.approx(0.0))
    assert s["plain"]["critical_eps"]["random"][0] == math.inf  # a seed that never reached the drop


def test_report_tables_show_mean_and_std(tmp_path):
    tr = fixture_results()
    write_report({"tasks": {"fake": tr}}, tmp_path)
    text = (tmp_path / "report.md").read_text()
    lines = text.splitlines()
    # clean table: metric, loss (same 0.5 everywhere: std 0) and the mean training time per run
    assert f"| plain training | {ms([0.80, 0.90])} | 0.500 ± 0.000 | 15.0 |" in lines
    assert f"| APD K=3 | {ms([0.86, 0.90])} | 0.500 ± 0.000 | 15.0 |" in lines
    # metric under corruption, one column per GRID eps
    assert "| method | corruption | absolute 0.5 | layer 0.05 |" in lines
    assert f"| plain training | multi_step | {ms([0.3, 0.31])} | {ms([0.2, 0.21])} |" in lines
    assert f"| APD K=3 | random | {ms([0.85, 0.86])} | {ms([0.84, 0.85])} |" in lines
    # indicators
    assert f"| plain training | absolute 0.5 | {ms([0.9, 0.909])} | {ms([0.01, 0.0101])} | {ms([1.0, 1.01])} | {ms([1.5, 1.515])} |" in lines
    # critical eps: an infinite seed makes the mean inf
    assert "| plain training | inf | 0.25 ± 0.071 | 0.1 ± 0 |" in lines
    assert "| APD K=3 | inf | 0.25 ± 0.071 | 0.3 ± 0.14 |" in lines
    assert "| fc.weight | 640 | 0.50000 |" in lines
    assert "mean ± std over 2 seed(s)" in text
    results = json.loads((tmp_path / "results.json").read_text())
    assert set(results["versions"]) == {"parashield", "torch", "python"}
    assert results["tasks"]["fake"]["summary"]["plain"]["clean_metric"][0] == pytest.approx(0.85)
    pytest.importorskip("matplotlib")
    for plot in PLOTS:
        assert (tmp_path / f"fake_{plot}.png").read_bytes()[:8] == PNG_MAGIC


def test_findings_confirmed(tmp_path):
    tr = fixture_results()
    assert verdicts(tr) == [True, True, True, True]
    write_report({"tasks": {"fake": tr}}, tmp_path)
    text = (tmp_path / "report.md").read_text()
    assert text.count(": CONFIRMED (rule:") == 4 and "NOT CONFIRMED" not in text


def test_finding_2_not_confirmed_when_multi_step_is_weaker(tmp_path):
    ind = dict(PLAIN_IND, multi_step=[1.5, 1.9])  # below one-step at the second eps
    tr = fixture_results(plain_ind=ind)
    assert verdicts(tr) == [True, False, True, True]
    write_report({"tasks": {"fake": tr}}, tmp_path)
    line = next(x for x in (tmp_path / "report.md").read_text().splitlines() if x.startswith("- **2."))
    assert "NOT CONFIRMED" in line
    # equal everywhere is not "beats" either
    assert verdicts(fixture_results(plain_ind=dict(PLAIN_IND, multi_step=PLAIN_IND["one_step"])))[1] is False


def test_findings_1_and_3_not_confirmed():
    assert verdicts(fixture_results(plain_ind=dict(PLAIN_IND, random=[0.5, 0.02])))[0] is False
    tr = fixture_results()
    for r in tr["runs"]:
        r["eval"]["sweep"][0]["first_order"] = 0.02  # 100% off at the smallest eps
    assert verdicts(tr)[2] is False


def test_finding_4_orientation_accuracy_and_perplexity(tmp_path):
    # APD worse than plain under corruption: not confirmed
    worse = {"random": [0.7, 0.7], "one_step": [0.3, 0.3], "multi_step": [0.1, 0.1]}
    assert verdicts(fixture_results(apd_under=worse))[3] is False
    assert verdicts(fixture_results(apd_clean=(0.7, 0.7)))[3] is False  # worse clean accuracy

    # perplexity: lower is better, and a plain model whose perplexity overflowed (inf) loses
    plain = {"random": [140.0, 150.0], "one_step": [300.0, 900.0], "multi_step": [500.0, math.inf]}
    apd = {"random": [125.0, 130.0], "one_step": [200.0, 400.0], "multi_step": [250.0, 600.0]}
    ppl = fixture_results(metric_name="perplexity", plain_clean=(130.0, 131.0), apd_clean=(120.0, 121.0),
                          plain_under=plain, apd_under=apd)
    ppl["higher_is_better"] = False
    assert verdicts(ppl) == [True, True, True, True]
    del ppl["higher_is_better"]  # older results: the metric name decides
    assert verdicts(ppl)[3] is True
    # the same numbers read as "higher is better" are a failure
    ppl["higher_is_better"] = True
    assert verdicts(ppl)[3] is False
    # an infinite perplexity is reported and plotted without error
    ppl["higher_is_better"] = False
    write_report({"tasks": {"lm": ppl}}, tmp_path)
    assert f"| plain training | multi_step | {ms([500.0, 500.01])} | inf |" in (tmp_path / "report.md").read_text().splitlines()


def test_finding_4_against_one_step():
    tr = fixture_results()
    for r in [r for r in tr["runs"] if r["method"] == "apd3"]:
        clone = json.loads(json.dumps(r))
        clone["method"] = "one_step"
        for g in clone["eval"]["grid"]:
            g["multi_step"]["metric"] += 0.05  # one-step training beats APD under corruption
        tr["runs"].append(clone)
    assert verdicts(tr)[3] is False
    text = [f for f in findings(tr, summarize(tr)) if f["finding"].startswith("4.")][0]["evidence"][-1]
    assert "beats one-step at 0/2" in text


def test_report_with_a_missing_method(tmp_path):
    only_apd = fixture_results(methods=("apd3",))
    only_plain = fixture_results(methods=("plain",))
    assert verdicts(only_apd) == [] and verdicts(only_plain) == [True, True, True]
    write_report({"tasks": {"a": only_apd, "p": only_plain}}, tmp_path)
    text = (tmp_path / "report.md").read_text()
    assert "## Task `a`" in text and "## Task `p`" in text
    assert "not decided" in text
    assert "plain training" not in text.split("## Task `a`")[1].split("## Task `p`")[0]
    summary = text.split("## Task `a`")[0]  # the headline table lists each task's methods
    assert "| a (accuracy) | APD K=3 |" in summary and "| p (accuracy) | plain training |" in summary


def test_stats_and_format_edge_cases():
    assert mean_std([0.5]) == (0.5, 0.0)  # one seed: std 0
    assert mean_std([1.0, None, math.nan, 3.0]) == (2.0, pytest.approx(math.sqrt(2)))  # missing values left out
    assert all(math.isnan(v) for v in mean_std([math.nan, None]))
    m, s = mean_std([1.0, math.inf])
    assert m == math.inf and math.isnan(s)
    assert _fmt(math.inf, math.nan) == "inf" and _fmt(-math.inf) == "-inf" and _fmt(math.nan, math.nan) == "n/a"
    assert _fmt(0.12345, 0.01) == "0.123 ± 0.010"


def test_report_with_one_seed_and_infinite_values(tmp_path):
    tr = fixture_results()
    tr["runs"] = [r for r in tr["runs"] if r["seed"] == 0]
    for r in tr["runs"]:
        r["eval"]["grid"][1]["multi_step"]["loss"] = math.inf
    write_report({"tasks": {"fake": tr}}, tmp_path)
    text = (tmp_path / "report.md").read_text()
    assert "mean ± std over 1 seed(s)" in text and "| plain training | 0.8000 ± 0.0000 |" in text
    results = json.loads((tmp_path / "results.json").read_text())  # Infinity is read back
    assert results["tasks"]["fake"]["summary"]["plain"]["grid"][1]["multi_step"]["loss"][0] == math.inf


def test_perplexity_overflow_is_inf():
    """A corrupted language model whose mean loss exceeds ~709 nats has perplexity inf, not an
    OverflowError that would abort the evaluation."""
    from parashield.reproduce.tasks import perplexity

    class Confident(nn.Module):  # certain of the wrong word
        def forward(self, x):
            logits = torch.zeros(*x.shape, 3)
            logits[..., 0] = 1e4
            return logits, None

    x, y = torch.zeros(4, 2, dtype=torch.long), torch.ones(4, 2, dtype=torch.long)
    assert perplexity(Confident(), [(x, y)]) == math.inf
    Confident.forward = lambda self, x: (torch.zeros(*x.shape, 3), None)  # uniform: perplexity 3
    assert perplexity(Confident(), [(x, y)]) == pytest.approx(3.0)


# ------------------------------------------------------------------------------ bit flips
@pytest.mark.parametrize("name", ["digits", "bbc", "fashion"])
def test_bitflip_experiments_are_cached_and_reported(name, tmp_path, monkeypatch):
    from parashield.reproduce import faults

    task = tiny(name)
    assert task.bitflips and task.bitflips["search_flips"] == 2  # shrink() keeps them tiny
    result = run(task, ("plain", "apd2", "sam"), 1, tmp_path)
    partial = faults.run_bitflips(task, ("apd2", "sam"), 2, tmp_path)  # apd2: not a flip method; seed 1: not trained
    assert [(r["method"], r["seed"]) for r in partial] == [("sam", 0)]
    flips = faults.run_bitflips(task, ("plain", "sam"), 1, tmp_path)
    assert [(r["method"], r["seed"]) for r in flips] == [("plain", 0), ("sam", 0)]
    for r in flips:
        hist = r["search"]["metric_history"]
        assert 2 <= len(hist) <= 3 and len(r["search"]["flips"]) == len(hist) - 1
        assert hist[0] == r["quantized_metric"] and [x["flips"] for x in r["random"]] == [1]
        assert (r["search"]["flips_to_halve"] is None) == (min(hist) > hist[0] / 2)
    assert json.loads((tmp_path / "runs" / name / "plain" / "seed0" / "bitflips.json").read_text()) == json.loads(json.dumps(flips[0]))
    monkeypatch.setattr(faults, "flip_evaluate", lambda *a: pytest.fail("cached flip results were recomputed"))
    assert faults.run_bitflips(task, ("plain", "sam"), 1, tmp_path) == json.loads(json.dumps(flips))
    result["bitflips"] = flips
    report = write_report({"tasks": {name: result}}, tmp_path / "report")
    text = report.read_text()
    assert "under bit flips (int8 weights" in text and "searched flips to halve" in text
    assert (tmp_path / "report" / f"{name}_bitflips.png").read_bytes().startswith(PNG_MAGIC)


def _flip_summary(halves, budget, random_top):
    halved = [h for h in halves if h is not None]
    return {"seeds": len(halves), "halved": len(halved), "budget": budget,
            "flips_to_halve": (sum(halved) / len(halved), 0.0) if halved else (math.nan, math.nan),
            "lower_bound": sum(budget if h is None else h for h in halves) / len(halves),
            "random": {10: (0.9, 0.0), 1000: (random_top, 0.0)}}


@pytest.mark.parametrize("plain,apd,expected", [
    (([50, 60, 40], 0.90), ([None, None, None], 0.91), ("carries over", True, True)),  # digits-like
    (([None] * 3, 0.97), ([None] * 3, 0.96), ("does not carry over", None, False)),  # nobody halved
    (([2, 3, 2], 0.53), ([2, 1, 3], 0.60), ("partly carries over", False, True)),  # fashion-like
    (([None, 5, 5], 0.50), ([4, 4, 4], 0.40), ("does not carry over", False, False)),  # a never-halved seed counts at the budget
])
def test_bitflip_verdict_rules(plain, apd, expected):
    from parashield.reproduce.report import bitflip_verdict

    summary = {"plain": _flip_summary(plain[0], 150, plain[1]), "sam": _flip_summary([1, 1, 1], 150, 0.5),
               "apd3": _flip_summary(apd[0], 150, apd[1])}
    v = bitflip_verdict(summary)
    assert (v["verdict"], v["searched"], v["random"]) == expected and v["method"] == "apd3" and v["top"] == 1000
    assert bitflip_verdict({"plain": summary["plain"]}) is None

