"""The benchmark scripts tell their user what went wrong: the chaos run names the bars it missed (its
exit status alone did not), and a missing input is one line, not a traceback."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from chaos import report  # noqa: E402


def chaos_results(ratio: float, wrong: int = 0) -> dict:
    return {"faults": [{"fault": "a shard killed", "sent": 10, "failed": 0, "wrong": wrong, "detail": ""}],
            "exclusions": [{"case": "many ids", "nq": 8, "excluded_ids": 32, "excluded_ranges": 0, "plain_ms": 1.0,
                            "excluded_ms": ratio, "ratio": ratio, "queries_with_an_excluded_row": 0}],
            "deadline": {"code": "DEADLINE_EXCEEDED", "busy_after_deadline_ms": 10.0, "bar_met": True,
                         "shard_cpu_after_deadline_ms": 1.0},
            "security_cpu_ms": {}}


def test_the_chaos_report_names_every_bar_it_missed(capsys):
    assert report(chaos_results(1.5))
    out = capsys.readouterr().out
    assert "| 1.50 | 0 | met |" in out and out.rstrip().endswith("every bar met")
    assert not report(chaos_results(2.2, wrong=1))
    out = capsys.readouterr().out
    assert "| 2.20 | 0 | MISSED |" in out
    assert out.rstrip().endswith("bars missed (exit status 1): fault row 'a shard killed'; exclusions 'many ids'")


@pytest.mark.parametrize("script, args, words", [
    ("scale_plan.py", ["--scale", "/nonexistent/scale.json"], "/nonexistent/scale.json not found: run python "
                                                              "benchmarks/scale.py --quick"),
    ("add_loop.py", ["--datastore", "/nonexistent"], "--datastore /nonexistent: /nonexistent/manifest.json not found"),
    ("eval_workers.py", ["--run", "/nonexistent"], "--run /nonexistent is not a run folder with a held-out split"),
    ("decoding.py", ["--run", "/nonexistent"], "/nonexistent is not a complete run directory"),
])
def test_a_missing_input_is_one_line(script, args, words):
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode != 0 and "Traceback" not in done.stderr, done.stderr
    assert words in done.stderr


def test_gpu_scale_takes_help_and_refuses_unknown_options():
    helped = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_scale.sh"), "--help"], capture_output=True,
                            text=True, timeout=60)
    assert helped.returncode == 0 and "bash benchmarks/gpu_scale.sh [OUT]" in helped.stdout
    refused = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_scale.sh"), "--out"], capture_output=True,
                             text=True, timeout=60)
    assert refused.returncode == 2 and "unknown option --out" in refused.stderr


def test_chaos_quick_keeps_the_options_given():
    from chaos import QUICK, ChaosConfig, parse_args

    assert parse_args(["--quick"]) == QUICK
    assert parse_args(["--quick", "--kills", "5", "--out", "o"]) == dataclasses.replace(QUICK, kills=5, out=Path("o"))
    assert parse_args(["--tokens", "100"]) == ChaosConfig(tokens=100)


def test_decoding_quick_keeps_the_repeats_given(tmp_path):
    from decoding import parse_args

    run = ["--run", str(tmp_path), "--knn-temperature", "1.0"]
    assert parse_args([*run]).repeats == 5 and parse_args([*run, "--quick"]).repeats == 2
    assert parse_args([*run, "--quick", "--repeats", "3"]).repeats == 3


def test_the_search_service_bars_hold_the_services_recall_to_both_references():
    from search_service import bars

    rows = [{"nprobe": 8, "reference": 0.78, "sharded_reference": 0.78, "service": 0.78},
            {"nprobe": 16, "reference": 0.87, "sharded_reference": 0.87, "service": 0.86}]
    found = bars([], rows)
    assert [b["pass"] for b in found] == [True, False]
    assert found[1]["value"] == "0.8600 vs 0.8700 / 0.8700" and "nprobe=16" in found[1]["bar"]
