"""The scale benchmark below its smallest size, through the same code path as its full run: 50,000 rows
drawn around real MiniLM keys, built in two shards by the Ray build, served by `LocalDeployment`,
queried through the router."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from scale import ScaleConfig, build_cores, earlier_results, phase_table, run, size_folder  # noqa: E402

from retriever_server.datastore.build_inputs import BuildConfig, bytes_per_row, check_inputs  # noqa: E402
from retriever_server.datastore.manifest import read_manifest  # noqa: E402

pytestmark = [pytest.mark.ray, pytest.mark.real, pytest.mark.slow]  # ~30 s; real MiniLM keys (shared cache)
ROWS = 50_000


@pytest.fixture(scope="module")
def real():
    from lm_worker.encoders.stdlib_vectors import stdlib_vectors

    vectors = stdlib_vectors(3000, 200)  # the cache test_search.py uses
    return np.asarray(vectors.keys, dtype=np.float32), np.asarray(vectors.queries, dtype=np.float32)


def test_small_scale_run_measures_every_figure_and_recall_holds(ray_cluster, real, tmp_path):
    config = ScaleConfig(sizes=(ROWS,), out=tmp_path, seconds_per_cell=0.1, reference_rows=ROWS)
    (result,) = run(config, vectors=real)
    folder = size_folder(tmp_path, ROWS, len(real[0]))
    manifest = read_manifest(folder / "ds")
    assert manifest.ntotal == ROWS and len(manifest.shards) == 2 and result.factory == manifest.factory
    # recall at the datastore's defaults, against exact search over the same rows
    assert result.recall_rerank >= 0.9 and result.recall_plain <= result.recall_rerank
    # the build's phases and the reference
    assert result.train_s > 0 and result.add_s > 0 and result.train_s + result.add_s <= result.build_s  # phases
    assert result.add_rows_per_s_per_core > 0 and result.faiss_add_rows_per_s > 0
    assert result.faiss_add_rows_per_s_per_core > 0
    assert result.peak_build_anon_gib > 0
    # each shard task's seconds by phase, FAISS's add among them, within the add phase
    assert len(result.shard_phases) == 2 and all(p["add"] > 0 for p in result.shard_phases)
    assert all(sum(p.values()) <= result.add_s + 0.01 for p in result.shard_phases)
    assert len(phase_table([result]).splitlines()) == 2 + 2
    # disk: what the build's free-space check expects per row, within the files' headers
    config_used = BuildConfig(keys=folder / "keys" / "keys.parts.json", out=tmp_path / "x",
                              factory=manifest.factory, keep_keys=True)
    expected = bytes_per_row(check_inputs(config_used), keep_keys=True)
    assert expected <= result.disk_bytes_per_row <= 1.1 * expected
    # serving: both shards up, index pages file-backed, every query cell measured
    assert len(result.shard_anon_mib) == 2 and min(result.shard_file_mib) > 0
    assert result.serve_ready_s > 0 and result.cold_ms > 0 and result.warm_ms > 0
    assert {(c["nq"], c["k"]) for c in result.queries} == {(1, 10), (1, 1024), (64, 10), (64, 1024)}
    assert all(c["qps"] > 0 and c["cpu_ms"] > 0 for c in result.queries)
    # the in-process reference on the same shards, cell for cell: FAISS alone costs less than the service
    assert [(c["nq"], c["k"]) for c in result.in_process] == [(c["nq"], c["k"]) for c in result.queries]
    assert all(0 < f["cpu_ms"] < c["cpu_ms"] for f, c in zip(result.in_process, result.queries))
    # the report
    saved = json.loads((tmp_path / "scale.json").read_text())
    assert saved["results"][0]["recall_rerank"] == result.recall_rerank
    assert (tmp_path / "scale.png").stat().st_size > 10_000
    # --keep-others: an earlier run's sizes other than this run's are kept, as they were measured
    assert earlier_results(tmp_path, (ROWS,)) == [] and earlier_results(tmp_path, (1,)) == [result]


def test_add_rates_per_core_count_the_cores_a_build_keeps_busy():
    """Two shard tasks of max(1, cpus // 2) CPUs each: on one CPU they run one after the other, on three
    they use two."""
    assert [build_cores(cpus) for cpus in (1, 2, 3, 4, 16)] == [1, 2, 2, 4, 16]
