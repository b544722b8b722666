"""The peer benchmark's smoke run: every row is measured and both sides agree (skipped where a
peer package of the ``bench`` extra is missing)."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

for name in ("pytorch_optimizer", "pyhessian", "hessian_eigenthings", "loss_landscapes"):
    pytest.importorskip(name)

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import peers  # noqa: E402


def test_peers_quick_run_measures_every_row_and_agrees(tmp_path):
    out = tmp_path / "peers.json"
    assert peers.main(["--quick", "--out", str(out)]) == 0
    doc = json.loads(out.read_text())
    # SAM, ASAM; the top eigenvalue against four peer settings; the trace; a line and a plane
    assert len(doc["rows"]) == 9
    for r in doc["rows"]:
        assert r["ratio_time"] is not None and math.isfinite(r["ratio_time"]) and r["ratio_time"] > 0, r
    assert doc["reference_eigenvalue"]["relative_difference"] < 1e-8  # two solvers, one float64 answer
    for r in doc["rows"]:
        agree = r["agreement"]
        if "max_param_difference_after_3_steps" in agree:  # SAM, ASAM: the same steps
            assert agree["max_param_difference_after_3_steps"] < 1e-5
        elif "parashield_worst_error" in agree:  # the top eigenvalue: everyone within the target
            assert agree["parashield_worst_error"] <= peers.TARGET and agree["peer_worst_error"] <= peers.TARGET
        elif "difference_in_joint_standard_errors" in agree:  # the trace, within its error bars
            assert agree["difference_in_joint_standard_errors"] < 4
            assert agree["parashield"][1] <= 1.5 * peers.TRACE_TARGET * abs(agree["parashield"][0])
        else:  # landscapes: the same losses at the same points
            assert agree["max_relative_difference"] < 1e-5
    table = (tmp_path / "peers.md").read_text()
    assert all(f"| {r['row']} | {r['peer']} |" in table for r in doc["rows"])
