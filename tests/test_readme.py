"""The README as a user meets it: its example runs and does what it says, its commands come first,
and every relative link points at a file of the repository."""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text(encoding="utf-8")


def test_readme_opens_with_the_two_commands() -> None:
    block = re.search(r"```sh\n(.*?)```", README, re.S)
    assert block is not None and README.index("```sh") < README.index("\n## ")
    commands = [line.split("#")[0].strip() for line in block.group(1).splitlines()]
    assert commands == [
        "bash scripts/setup.sh && .venv/bin/parashield reproduce --quick",
        "bash scripts/setup.sh && .venv/bin/python -m pytest",
    ]


def test_readme_example_runs() -> None:
    blocks = re.findall(r"```python\n(.*?)```", README, re.S)
    assert len(blocks) == 1, "the README has one complete example; this test runs it"
    namespace: dict = {"__name__": "readme_example"}
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(blocks[0], "README.md", "exec"), namespace)
    clean = namespace["accuracy"](namespace["model"])
    assert clean > 0.9  # APD trained the toy model
    assert namespace["corrupted_accuracy"] < clean  # the corruption hurts, and was undone on exit
    res = namespace["res"]
    assert res.loss_after > res.loss_before
    assert res.budget.contains([res.delta[n] for n, _ in namespace["model"].named_parameters()],
                               [p for _, p in namespace["model"].named_parameters()])
    printed = out.getvalue()
    assert f"accuracy {clean:.3f} -> {namespace['corrupted_accuracy']:.3f}" in printed
    assert "eps costing 10 points of accuracy:" in printed


def test_readme_links_exist() -> None:
    links = re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", README)
    local = [link for link in links if "://" not in link]
    assert local, "the README links to its documentation pages"
    missing = [link for link in local if not (ROOT / link).exists()]
    assert not missing, f"README links to missing files: {missing}"


def test_readme_results_table_is_the_reports_summary() -> None:
    """The README's results table is the summary that results.json gives (no hand-copied number)."""
    import json

    from parashield.reproduce.cache import from_strict_json
    from parashield.reproduce.report import summary_table

    results = from_strict_json(json.loads((ROOT / "results" / "results.json").read_text()))
    lines = summary_table(results)
    assert len(lines) == 2 + len(results["tasks"])
    missing = [line for line in lines if line not in README]
    assert not missing, f"README's results table differs from results/results.json: {missing}"
