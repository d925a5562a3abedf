"""The mixing benchmark: both sides mix the same inputs, agree bit for bit, and it writes its table."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from mixing import main  # noqa: E402


def test_mixing_benchmark_compares_equal_sides(tmp_path, capsys):
    assert main(["--vocab", "300", "--k", "8", "--batches", "1,5", "--seconds", "0.06", "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "mixing.json").read_text())["rows"]
    assert [r["batch"] for r in rows] == [1, 5] and all(r["equal"] for r in rows)
    assert all(r["dense_us"] > 0 and r["sparse_us"] > 0 for r in rows)
    assert "| 5 | 300 | 8 |" in capsys.readouterr().out


def test_mixing_benchmark_refuses_bad_batches(tmp_path):
    with pytest.raises(SystemExit):
        main(["--batches", "0", "--out", str(tmp_path)])
