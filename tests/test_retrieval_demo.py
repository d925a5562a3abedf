"""`lm-worker retrieval-demo` in a folder where a run of another size left its vectors: it builds and
searches its own, not the other run's."""

from __future__ import annotations

import hashlib

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


@pytest.mark.slow  # two builds of real MiniLM vectors: ~12 s
def test_a_datastore_of_other_keys_of_the_same_size_is_built_again(ray_cluster, tmp_path, capfd):
    """The datastore is reused only when it records the digest of the keys it was built from: one of 700 other
    vectors (another Python's stdlib gives other chunks, of the same shapes) used to be reused, its answers
    then measured against keys it does not hold. Without progress (`--no-progress`) it draws no bars."""
    from retriever_server.datastore.build import BuildConfig, build_datastore

    config = DemoConfig(out=tmp_path, n_keys=700, n_queries=20, nprobe_sweep=(17,), num_cpus=1, progress=False)
    other = tmp_path / "other.npy"
    np.save(other, np.random.default_rng(0).standard_normal((700, 384)).astype(np.float32))
    build_datastore(BuildConfig(keys=other, out=tmp_path / "datastore", shards=2, keep_keys=True), num_cpus=1,
                    progress=False)
    capfd.readouterr()
    report = run_demo(config)
    assert "%|" not in capfd.readouterr().err  # the encoding's and the build's bars drew regardless
    manifest = read_manifest(tmp_path / "datastore")
    assert manifest.metadata["keys"] == hashlib.sha256((tmp_path / "source" / "keys.npy").read_bytes()).hexdigest()[:16]
    assert report.recall[17][0] == 1.0  # every list probed: exact against the demo's own keys
