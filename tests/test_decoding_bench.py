"""The decoding benchmark's CPU accounting: a process's CPU seconds from /proc, and the ceiling a run's
CPU work puts on the retrieval time an overlap can hide."""

from __future__ import annotations

import itertools
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from decoding import Cores, ProcessGone, annotate, bars, bars_table, hidden, measure, process_cpu_s  # noqa: E402

from lm_worker.decoding.config import GenerateConfig  # noqa: E402
from lm_worker.decoding.stepper_stats import StepperStats  # noqa: E402

BUSY = "import time\nend = time.process_time() + 0.6\nwhile time.process_time() < end:\n    pass\ntime.sleep(30)\n"


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc (Linux)")
def test_process_cpu_seconds_count_a_childs_busy_loop_and_not_its_sleep():
    child = subprocess.Popen([sys.executable, "-c", BUSY])
    try:
        deadline = time.monotonic() + 20
        while process_cpu_s(child.pid) < 0.6 and time.monotonic() < deadline:
            time.sleep(0.05)
        busy = process_cpu_s(child.pid)
        time.sleep(0.5)  # the child sleeps now: its CPU seconds stay put
        assert 0.6 <= busy <= process_cpu_s(child.pid) < busy + 0.2
    finally:
        child.kill()
        child.wait()
    with pytest.raises(ProcessGone, match=f"process {child.pid} exited"):  # its CPU seconds are lost
        process_cpu_s(child.pid)


class Steady:
    """A stepper whose every row always prefers token `token` of 4."""

    def __init__(self, token: int):
        self.token, self.stats = token, StepperStats()

    def start(self, prompt: torch.Tensor) -> torch.Tensor:
        return self.step(prompt[:, -1])

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        log_probs = torch.full((len(tokens), 4), -10.0)
        log_probs[:, self.token] = 0.0
        return log_probs  # (B, 4)


def test_same_tokens_needs_every_run_of_a_variant_to_decode_serials_tokens():
    """Three of a variant's five runs (the warm-up's and two timed) decode serial's tokens, two others: whichever
    run is the median, its tokens are not called serial's, where only the median's used to be compared."""
    flips = itertools.cycle([0, 1, 0, 1, 0])
    variants = {"serial": lambda: Steady(0), "steady": lambda: Steady(0), "flaky": lambda: Steady(next(flips))}
    rows = measure(variants, torch.zeros((2, 3), dtype=torch.long), GenerateConfig(max_new_tokens=3), repeats=4,
                   servers_cpu=lambda: 0.0)
    assert rows["steady"]["tokens_digest"] == rows["serial"]["tokens_digest"] == [[[0, 0, 0], [0, 0, 0]]]
    assert rows["flaky"]["tokens_digest"] == [[[0, 0, 0], [0, 0, 0]], [[1, 1, 1], [1, 1, 1]]]
    assert all(len(r["all_seconds"]) == 4 and "tokens" not in r for r in rows.values())


def run(seconds: float, retrieval_s: float, worker: float, servers: float) -> dict:
    return {"seconds": seconds, "worker_cpu_s": worker, "server_cpu_s": servers,
            "stats": {"retrieval_s": retrieval_s, "retrieval_calls": 64 if retrieval_s else 0}}


def test_the_ceiling_is_the_share_hidden_by_a_run_as_short_as_its_cpu_work_on_its_cores():
    serial = run(seconds=2.0, retrieval_s=1.0, worker=0.8, servers=1.2)
    overlapped = run(seconds=1.8, retrieval_s=2.0, worker=1.5, servers=1.6)
    assert hidden(serial, 1.8) == pytest.approx(0.2)
    pinned = Cores(model=1, servers=1, shared=False)  # the model's process and the servers on a core each
    assert pinned.floor_s(overlapped) == pytest.approx(1.6)  # the servers' core is the busier
    assert hidden(serial, pinned.floor_s(overlapped)) == pytest.approx(0.4)
    assert Cores(model=1, servers=2, shared=False).floor_s(overlapped) == pytest.approx(1.5)
    assert Cores(model=2, servers=2, shared=True).floor_s(overlapped) == pytest.approx((1.5 + 1.6) / 2)

    rows = {"lm": run(0.5, 0.0, 0.5, 0.0), "serial": serial, "overlapped": overlapped}
    annotate(rows, "serial", pinned)
    assert "hidden_fraction" not in rows["lm"]  # no retrieval, nothing to hide
    assert rows["serial"]["hidden_fraction"] == 0.0
    assert rows["serial"]["ceiling"] == pytest.approx(0.8)  # (2.0 - 1.2) / 1.0
    assert rows["overlapped"]["hidden_fraction"] == pytest.approx(0.2)
    assert rows["overlapped"]["ceiling"] == pytest.approx(0.4)


def scenario(tokens_per_s: dict[str, float]) -> dict:
    return {"rows": {name: {"tokens_per_s": v} for name, v in tokens_per_s.items()}}


def test_the_figure_gives_each_decoder_its_tokens_per_second_over_serial_retrieval(tmp_path):
    import json

    from decoding_plot import main, speedups

    knnlm = {"greedy x1": scenario({"lm (no retrieval)": 300.0, "knn-lm serial": 100.0, "knn-lm pipelined": 95.0}),
             "greedy x8": scenario({"lm (no retrieval)": 1600.0, "knn-lm serial": 640.0,
                                    "knn-lm ralmspec lm guess": 768.0})}
    got = speedups(knnlm, "knnlm")
    assert got == {"greedy x1": {"lm (no retrieval)": 3.0, "knn-lm serial": 1.0, "knn-lm pipelined": 0.95},
                   "greedy x8": {"lm (no retrieval)": 2.5, "knn-lm serial": 1.0, "knn-lm ralmspec lm guess": 1.2}}
    retro = {"greedy x8": scenario({"retro (no retrieval)": 5000.0, "retro exact (prefetch 0)": 4000.0,
                                    "retro ralmspec": 4400.0})}
    assert speedups(retro, "retro")["greedy x8"]["retro ralmspec"] == pytest.approx(1.1)

    results = tmp_path / "decoding.json"
    results.write_text(json.dumps({"results": {"knnlm": knnlm, "retro": retro}}))
    main([str(results)])
    png = (tmp_path / "decoding.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 10_000
    (tmp_path / "broken.json").write_text("[]")
    with pytest.raises(SystemExit, match="cannot read the results of"):
        main([str(tmp_path / "broken.json")])
    (tmp_path / "empty.json").write_text('{"results": {}}')
    with pytest.raises(SystemExit, match="does not hold what the figure needs.*no kNN-LM or RETRO results"):
        main([str(tmp_path / "empty.json")])


def decoded(tokens_per_s: float, cpu_ms_per_token: float, same: bool = True) -> dict:
    return {"tokens_per_s": tokens_per_s, "cpu_ms_per_token": cpu_ms_per_token, "same_tokens_as_serial": same}


def test_the_speed_bar_needs_one_exact_decoder_faster_by_half_with_the_same_tokens_and_no_more_cpu():
    rows = {"lm (no retrieval)": decoded(1600.0, 0.6, same=False), "knn-lm serial": decoded(600.0, 1.7),
            "knn-lm early request": decoded(660.0, 1.8),  # faster, but too little and dearer
            "knn-lm pipelined": decoded(950.0, 1.6, same=False),  # fast enough, cheap enough, other tokens
            "knn-lm ralmspec lm guess": decoded(900.0, 1.7)}  # exactly 1.5x, exactly serial's CPU
    found = bars({"knnlm": {"greedy x1": {"rows": {}}, "greedy x8": {"rows": rows}}}, server_cpus=(1,))
    assert [b["pass"] for b in found] == [False, False, True]
    assert all(b["server_cpus"] == [1] for b in found)
    assert found[0]["speedup"] == pytest.approx(1.1) and found[0]["cpu_per_token_vs_serial"] == pytest.approx(1.8 / 1.7)
    assert found[1]["same_tokens"] is False
    table = bars_table(found)
    assert "| knn-lm pipelined | 1.58x | 0.94x | NO | MISS |" in table
    assert "| knn-lm ralmspec lm guess | 1.50x | 1.00x | yes | PASS |" in table
    assert table.endswith("bar met by: knn-lm ralmspec lm guess")

    rows["knn-lm ralmspec lm guess"] = decoded(900.0, 1.71)  # a hair more CPU per token than serial's
    found = bars({"knnlm": {"greedy x8": {"rows": rows}}}, server_cpus=(1,))
    assert not any(b["pass"] for b in found)
    assert bars_table(found).endswith("bar missed by every exact decoder")
    assert bars({"retro": {"greedy x8": {"rows": rows}}}, server_cpus=(1,)) == []
    assert "did not run" in bars_table([])


def test_the_timing_wrapper_leaves_a_retro_stepper_the_calls_it_makes_alone():
    """The benchmark wraps RETRO's stepper to time its start: the overlapped stepper behind it must still
    learn where decoding ends (`expect_positions`), or it prefetches a chunk no step completes: 9 searches
    for the 8 it makes alone."""
    import test_steppers as ts
    from decoding import TimedStart

    from lm_worker.decoding.config import GenerateConfig
    from lm_worker.decoding.generate import generate
    from lm_worker.decoding.retro_stepper import RetroStepper
    from lm_worker.models.retro import Retro, RetroConfig

    torch.manual_seed(1)
    retro = ts.sharpened(Retro(RetroConfig.tiny(vocab_size=ts.V, chunk_len=8, n_neighbours=ts.K)))
    payload = ts.random_tokens((40, 16), seed=4).numpy()
    prompt, config = ts.random_tokens((2, 64), seed=10), GenerateConfig(max_new_tokens=64, eos_id=None)
    searches = []
    for wrap in (False, True):
        retriever = ts.FakeRetriever(ts.FakeEncoder().embed(payload[:, :8]), payload, k=3)
        stepper = RetroStepper(retro, retriever, ts.FakeEncoder(), prefetch=4, overlap=True)
        try:
            generate(TimedStart(stepper) if wrap else stepper, prompt, config)
        finally:
            stepper.close()
        searches.append(len(retriever.calls))
    assert searches[0] == searches[1] == 8, searches


def test_retros_exact_and_ralmspec_rows_are_judged_against_exact_serial_and_prefetch_rows_against_theirs():
    """RaLMSpec's RETRO queries are exact: its share hidden is of exact serial retrieval's time, and exact
    serial itself hides nothing; only the prefetch rows compare with the prefetch serial run."""
    from decoding import annotate_retro

    rows = {"retro (no retrieval)": run(1.0, 0.0, 0.9, 0.0), "retro exact (prefetch 0)": run(1.30, 0.30, 1.2, 0.1),
            "retro prefetch 32 serial": run(1.20, 0.20, 1.1, 0.1),
            "retro prefetch 32 overlapped": run(1.05, 0.20, 1.0, 0.1),
            "retro ralmspec": run(1.15, 0.30, 1.0, 0.1)}
    annotate_retro(rows, "retro prefetch 32 serial", Cores(model=1, servers=1, shared=False))
    assert "hidden_fraction" not in rows["retro (no retrieval)"]
    assert rows["retro exact (prefetch 0)"]["hidden_fraction"] == 0.0  # was -(1.30 - 1.20) / 0.20
    assert rows["retro exact (prefetch 0)"]["ceiling"] == pytest.approx((1.30 - 1.2) / 0.30)
    assert rows["retro ralmspec"]["hidden_fraction"] == pytest.approx((1.30 - 1.15) / 0.30)
    assert rows["retro ralmspec"]["ceiling"] == pytest.approx((1.30 - 1.0) / 0.30)
    assert rows["retro prefetch 32 serial"]["hidden_fraction"] == 0.0
    assert rows["retro prefetch 32 overlapped"]["hidden_fraction"] == pytest.approx((1.20 - 1.05) / 0.20)
    assert rows["retro prefetch 32 overlapped"]["ceiling"] == pytest.approx((1.20 - 1.0) / 0.20)


def test_the_speed_bar_gives_no_verdict_where_the_model_and_the_servers_share_every_core():
    """The bar is judged with the model on one core and the servers on the other (`--server-cpus 1`); a run
    without --server-cpus records its layout and its figures, and neither PASS nor MISS."""
    rows = {"knn-lm serial": decoded(600.0, 1.7), "knn-lm ralmspec lm guess": decoded(900.0, 1.7),
            "knn-lm early request": decoded(660.0, 1.8)}
    found = bars({"knnlm": {"greedy x8": {"rows": rows}}}, server_cpus=())
    assert [(b["decoder"], b["server_cpus"], b["pass"], b["verdict"]) for b in found] == [
        ("knn-lm ralmspec lm guess", [], None, "not the judged configuration"),
        ("knn-lm early request", [], None, "not the judged configuration")]
    table = bars_table(found)
    assert "| knn-lm ralmspec lm guess | 1.50x | 1.00x | yes | not the judged configuration |" in table
    assert "PASS" not in table and "MISS" not in table
    assert table.endswith("no verdict: model and servers shared every core; the bar is judged with the servers on "
                          "cores of their own (--server-cpus 1)")
    judged = bars({"knnlm": {"greedy x8": {"rows": rows}}}, server_cpus=(1,))
    assert [(b["pass"], b["verdict"]) for b in judged] == [(True, "PASS"), (False, "MISS")]
