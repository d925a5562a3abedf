"""`lm-worker retrieval-demo` run twice in one folder: a second run of another size builds from its own
vectors, not from the first run's."""

from __future__ import annotations

import numpy as np
import pytest

from lm_worker.retrieval.demo import DemoConfig, run_demo
from retriever_server.datastore.manifest import read_manifest


@pytest.mark.slow  # two builds and two served datastores of real MiniLM vectors: ~15 s
def test_a_rerun_with_fewer_keys_builds_and_searches_those_keys(ray_cluster, tmp_path):
    for n_keys in (800, 700):  # IVF20,Flat then IVF17,Flat
        report = run_demo(DemoConfig(out=tmp_path, n_keys=n_keys, n_queries=20, nprobe_sweep=(1, 17, 20), num_cpus=1))
        assert read_manifest(tmp_path / "datastore").ntotal == n_keys
        assert np.load(tmp_path / "source" / "keys.npy", mmap_mode="r").shape[0] == n_keys
        nlist = read_manifest(tmp_path / "datastore").nlist
        assert report.recall[1][0] < report.recall[nlist][0] == 1.0  # every list probed: exact, as the reference
