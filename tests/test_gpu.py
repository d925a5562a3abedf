"""The GPU path: `--gpu` holds the shard's index on a GPU (faiss GPU build); skipped without one."""

import faiss
import numpy as np
import pytest
from conftest import build, serve, synthetic, unsharded_reference

from retriever_server.datastore import index as ix
from retriever_server.serving.client import RetrieverClient
from retriever_server.serving.shard import ShardOptions

HAS_GPU = hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


def test_gpu_option_without_a_gpu_says_so():
    if HAS_GPU:
        pytest.skip("this machine has a GPU")
    with pytest.raises(RuntimeError, match="--gpu needs the faiss GPU build and a visible GPU"):
        ix.to_gpu(faiss.IndexFlatL2(4))


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
