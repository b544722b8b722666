"""The fusion benchmark computes the library's per-pass update: its compiled loops must give
the parameters APD's eager bookkeeping gives (up to the order of roundings)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import fusion  # noqa: E402


@pytest.mark.slow
def test_fused_update_matches_the_eager_bookkeeping(tmp_path, monkeypatch):
    monkeypatch.setattr(fusion, "SETS", {"large": [(300, 200), (300,)], "small": [(8, 8), (8,)] * 3})
    assert fusion.main(["--rounds", "1", "--out", str(tmp_path / "f.json")]) == 0
    rows = json.loads((tmp_path / "f.json").read_text())["rows"]
    for r in rows.values():
        assert r["max_abs_difference"] < 1e-5 and r["eager_median_s"] > 0 and r["fused_median_s"] > 0
