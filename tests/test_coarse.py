"""The coarse quantizer of large IVF indexes: two-level k-means against flat k-means, graph-assisted
assignment against flat assignment, and the index a build saves."""

from __future__ import annotations

import faiss
import numpy as np
from conftest import synthetic

from retriever_server.datastore import coarse
from retriever_server.datastore.coarse import graph_assignment, proportional_shares, two_level_centroids


def unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def test_shares_split_the_lists_in_proportion_and_fit_each_cluster():
    sizes = np.array([1000, 10, 1, 500, 3], dtype=np.int64)
    shares = proportional_shares(sizes, 60)
    assert shares.sum() == 60 and (shares >= 1).all() and (shares <= sizes).all()
    assert shares[0] > shares[3] > shares[1]


def test_two_level_centroids_quantize_about_as_well_as_flat_kmeans():
    """Mean inner product of each row with its nearest centroid: within 2% of flat k-means'."""
    x = unit(synthetic(40_000, 64, seed=3, clusters=400))
    nlist = 256
    two = two_level_centroids(x, nlist, spherical=True, seed=0)
    assert two.shape == (nlist, 64) and np.allclose(np.linalg.norm(two, axis=1), 1, atol=1e-4)
    flat = faiss.Kmeans(64, nlist, niter=10, seed=0, spherical=True)
    flat.train(x)
    fit_two = faiss.knn(x, two, 1, metric=faiss.METRIC_INNER_PRODUCT)[0].mean()
    fit_flat = faiss.knn(x, flat.centroids, 1, metric=faiss.METRIC_INNER_PRODUCT)[0].mean()
    assert fit_two >= 0.98 * fit_flat


def test_the_largest_seed_a_build_takes_trains_two_levels():
    """--seed goes to 2^31 - 2; the sub-clusters were seeded seed + 1 + c, past FAISS's C int (OverflowError,
    a traceback from the CLI). They wrap now."""
    from retriever_server.datastore.build_inputs import MAX_SEED

    x = synthetic(3000, 8, seed=4)
    assert two_level_centroids(x, 64, spherical=False, seed=MAX_SEED).shape == (64, 8)


def ivf_flat(centroids: np.ndarray) -> faiss.IndexIVFFlat:
    d = centroids.shape[1]
    quantizer = faiss.IndexFlatIP(d)
    quantizer.add(centroids)
    index = faiss.IndexIVFFlat(quantizer, d, len(centroids), faiss.METRIC_INNER_PRODUCT)
    index.own_fields = True
    quantizer.this.disown()
    return index


def list_of_each_row(index: faiss.IndexIVF) -> np.ndarray:
    lists = np.empty(index.ntotal, dtype=np.int64)
    for i in range(index.nlist):
        n = index.invlists.list_size(i)
        if n:
            lists[faiss.rev_swig_ptr(index.invlists.get_ids(i), n)] = i
    return lists


def test_graph_assignment_puts_rows_in_their_nearest_list_and_keeps_the_flat_quantizer(tmp_path, monkeypatch):
    monkeypatch.setattr(coarse, "LARGE_NLIST", 256)  # a large index at test size
    x = unit(synthetic(30_000, 64, seed=5, clusters=300))
    centroids = two_level_centroids(x[:20_000], 512, spherical=True, seed=1)
    by_graph, by_flat = ivf_flat(centroids), ivf_flat(centroids)
    with graph_assignment(by_graph):
        assert isinstance(faiss.downcast_index(by_graph.quantizer), faiss.IndexHNSWFlat)
        by_graph.add(x)
    by_flat.add(x)
    assert isinstance(faiss.downcast_index(by_graph.quantizer), faiss.IndexFlatIP)
    agree = (list_of_each_row(by_graph) == list_of_each_row(by_flat)).mean()
    assert agree >= 0.99
    # what a build saves reads back with the flat quantizer and searches like the flat-assigned index
    faiss.write_index(by_graph, str(tmp_path / "index.faiss"))
    again = faiss.read_index(str(tmp_path / "index.faiss"))
    assert isinstance(faiss.downcast_index(again.quantizer), faiss.IndexFlatIP)
    again.nprobe = by_flat.nprobe = 16
    _, got = again.search(x[:200], 10)
    _, want = by_flat.search(x[:200], 10)
    assert np.mean([len(set(a) & set(b)) / 10 for a, b in zip(got, want)]) >= 0.98


def test_graph_assignment_leaves_small_indexes_alone():
    index = ivf_flat(unit(synthetic(64, 16, seed=2)))
    quantizer = index.quantizer
    with graph_assignment(index):
        assert index.quantizer.this == quantizer.this


def test_auto_sizes_lists_and_picks_its_codec():
    from retriever_server.datastore.index import resolve_factory

    assert resolve_factory("auto", 10 ** 6, 384) == "IVF4096,SQ8"
    assert resolve_factory("auto", 10 ** 7, 384) == "IVF16384_HNSW32,SQ8"  # a graph finds the lists
    assert resolve_factory("auto", 5000, 64) == "IVF128,Flat"  # too few rows for a codec
    assert resolve_factory("auto", 10 ** 5, 63) == "IVF1024,SQ8"  # an odd width too (it was IVF-Flat: 4x the bytes)
    assert resolve_factory("IVF8,PQ4", 10 ** 6, 384) == "IVF8,PQ4"


def test_a_graph_quantizer_is_searched_wide_enough_to_find_the_nprobe_nearest_lists():
    """`auto`'s large indexes find a query's lists through an HNSW graph: searched with `ivf_params`
    (breadth 2·nprobe) it probes the lists the flat quantizer would, so results match the flat one's;
    with the breadth saved for adding rows (16) alone, it would not."""
    from retriever_server.datastore import index as ix

    x = unit(synthetic(40_000, 64, seed=7, clusters=500))
    centroids = two_level_centroids(x[:30_000], 512, spherical=True, seed=0)
    flat = ivf_flat(centroids)
    graph_quantizer = faiss.IndexHNSWFlat(64, coarse.GRAPH_M, faiss.METRIC_INNER_PRODUCT)
    graph_quantizer.add(centroids)
    graph_quantizer.hnsw.efSearch = coarse.GRAPH_EF
    by_graph = faiss.IndexIVFFlat(graph_quantizer, 64, 512, faiss.METRIC_INNER_PRODUCT)
    flat.add(x)
    by_graph.add(x)
    queries, nprobe = x[:300] + 0.01, 48

    def overlap(a, b):
        return np.mean([len(set(u) & set(v)) / len(u) for u, v in zip(a, b)])

    _, want = flat.quantizer.search(queries, nprobe)
    _, lists = by_graph.quantizer.search(queries, nprobe, params=coarse.graph_params(by_graph, nprobe))
    assert overlap(lists, want) >= 0.99
    _, narrow = by_graph.quantizer.search(queries, nprobe)
    assert overlap(narrow, want) < overlap(lists, want)
    _, got = ix.search(by_graph, queries, 10, nprobe)
    _, ref = ix.search(flat, queries, 10, nprobe)
    assert overlap(got, ref) >= 0.99
    assert coarse.graph_params(flat, nprobe) is None


def test_a_stand_in_quantizer_is_freed_with_its_python_object():
    """Setting it as the quantizer disowned it, so each large shard's HNSW graph was never freed (about
    120 MB a shard at 65,536 lists of 384-d, in a Ray worker that builds shard after shard)."""
    from retriever_server.datastore.coarse import quantizer_stand_in

    flat = faiss.IndexFlatL2(8)
    index = faiss.IndexIVFFlat(flat, 8, 4)
    graph = faiss.IndexHNSWFlat(8, 8)
    with quantizer_stand_in(index, graph):
        assert faiss.downcast_index(index.quantizer).this == graph.this
    assert graph.this.own()  # Python frees it
    assert faiss.downcast_index(index.quantizer).this == flat.this
