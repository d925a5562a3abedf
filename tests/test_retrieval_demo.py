"""`lm-worker retrieval-demo` in a folder where a run of another size left its vectors: it builds and
searches its own, not the other run's."""

from __future__ import annotations

import numpy as np
import pytest

from lm_worker.retrieval.demo import DemoConfig, run_demo
from retriever_server.datastore.manifest import read_manifest


@pytest.mark.slow  # a build and a served datastore of real MiniLM vectors: ~8 s
def test_a_rerun_with_fewer_keys_builds_and_searches_those_keys(ray_cluster, tmp_path):
    (tmp_path / "source").mkdir()
    np.save(tmp_path / "source" / "keys.npy", np.zeros((800, 384), dtype=np.float32))  # a run of 800 keys'
    report = run_demo(DemoConfig(out=tmp_path, n_keys=700, n_queries=20, nprobe_sweep=(1, 17), num_cpus=1))
    manifest = read_manifest(tmp_path / "datastore")
    assert manifest.ntotal == 700 and manifest.nlist == 17  # IVF17,Flat
    assert np.load(tmp_path / "source" / "keys.npy", mmap_mode="r").shape[0] == 700
    assert report.recall[1][0] < report.recall[17][0] == 1.0  # every list probed: exact, as the reference
