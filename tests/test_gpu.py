"""The GPU path: `serve --gpu` holds the shard's index on a GPU, `build --gpu` runs k-means and the
rows' list assignment there (faiss GPU build); skipped without one, except the errors that say so."""

import subprocess
import sys

import faiss
import numpy as np
import pytest
from conftest import build, serve, synthetic, unsharded_reference

from retriever_server.datastore import index as ix
from retriever_server.datastore.coarse import quantizer_stand_in
from retriever_server.serving.client import RetrieverClient
from retriever_server.serving.shard import ShardOptions

HAS_GPU = hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


def test_gpu_option_without_a_gpu_says_so():
    if HAS_GPU:
        pytest.skip("this machine has a GPU")
    with pytest.raises(RuntimeError, match="--gpu needs the faiss GPU build and a visible GPU"):
        ix.to_gpu(faiss.IndexFlatL2(4))
    with pytest.raises(RuntimeError, match="--gpu needs the faiss GPU build"):
        ix.new_trained_index("IVF4,Flat", "l2", synthetic(200, 8, seed=1), seed=0, gpu=True)


def test_build_gpu_without_a_gpu_is_refused_before_any_work(tmp_path):
    if HAS_GPU:
        pytest.skip("this machine has a GPU")
    np.save(tmp_path / "keys.npy", synthetic(500, 8, seed=2))
    done = subprocess.run([sys.executable, "-m", "retriever_server.cli", "build", str(tmp_path / "keys.npy"),
                           "--out", str(tmp_path / "ds"), "--gpu", "--no-progress"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    assert "--gpu needs the faiss GPU build and a visible GPU" in done.stderr
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "ds").exists() and not (tmp_path / ".ds.partial").exists()


def test_rows_assigned_through_a_stand_in_quantizer_give_the_same_index(tmp_path):
    """What `build --gpu` does to each shard's index, with a CPU flat index standing in for the GPU one:
    a copy of the centroids assigns the rows, the index keeps its own quantizer, and the saved file is
    the same, byte for byte, as the index filled by its own quantizer."""
    x = synthetic(6000, 32, seed=3)
    trained = ix.new_trained_index("IVF32,SQ8", "l2", x[:3000], seed=0)
    own, by_stand_in = faiss.clone_index(trained), faiss.clone_index(trained)
    own.add_with_ids(x, np.arange(len(x), dtype=np.int64))
    stand_in = faiss.IndexFlatL2(32)
    stand_in.add(trained.quantizer.reconstruct_n(0, 32))
    quantizer = by_stand_in.quantizer
    with quantizer_stand_in(faiss.downcast_index(by_stand_in), stand_in):
        by_stand_in.add_with_ids(x, np.arange(len(x), dtype=np.int64))
    assert by_stand_in.quantizer.this == quantizer.this and stand_in.ntotal == 32
    faiss.write_index(own, str(tmp_path / "own.faiss"))
    faiss.write_index(by_stand_in, str(tmp_path / "stand_in.faiss"))
    assert (tmp_path / "own.faiss").read_bytes() == (tmp_path / "stand_in.faiss").read_bytes()


@pytest.mark.gpu
@pytest.mark.ray
@pytest.mark.skipif(not HAS_GPU, reason="needs the faiss GPU build and a GPU")
def test_gpu_shards_match_the_cpu_reference(ray_cluster, aio, tmp_path):
    keys = synthetic(20000, 64, seed=4)
    datastore = build(tmp_path, keys, "gpu", shards=2, factory="IVF64,PQ16")
    reference = unsharded_reference(datastore, keys)
    ref_d, ref_i = ix.search(reference, keys[:200], 10, 16)
    with serve(aio, datastore, 2, options=ShardOptions(gpu=True)) as served, RetrieverClient(served.address) as c:
        assert c.info().gpu  # the router passes on its shards' description
        got = c.search(keys[:200], k=10, nprobe=16)
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(got.ids, ref_i)])
    assert recall > 0.95, recall  # GPU PQ tables use float16: near-identical, not bit-identical
    np.testing.assert_allclose(got.distances, ref_d, rtol=1e-2, atol=1e-2)


@pytest.mark.gpu
@pytest.mark.ray
@pytest.mark.skipif(not HAS_GPU, reason="needs the faiss GPU build and a GPU")
def test_a_gpu_build_searches_like_a_cpu_build(ray_cluster, tmp_path):
    keys = synthetic(20000, 64, seed=6)
    on_gpu = build(tmp_path, keys, "gpu-built", shards=2, factory="IVF64,SQ8", gpu=True)
    on_cpu = build(tmp_path, keys, "cpu-built", shards=2, factory="IVF64,SQ8")
    flat = faiss.IndexFlatL2(64)
    flat.add(keys)
    _, truth = flat.search(keys[:200], 10)
    for datastore in (on_gpu, on_cpu):  # the shards' own files, searched and merged
        found = [ix.search(faiss.read_index(str(shard / "index.faiss")), keys[:200], 10, 16)
                 for shard in sorted(datastore.glob("shard-*"))]
        distances, ids = np.hstack([d for d, _ in found]), np.hstack([i for _, i in found])
        top = np.take_along_axis(ids, np.argsort(distances, axis=1)[:, :10], axis=1)
        assert np.mean([len(set(a) & set(b)) / 10 for a, b in zip(top, truth)]) > 0.9
