"""Exclusions read from a request into flat arrays, against the same sets built row by row: merged
ranges, the part within a shard, each query's key and row count, and the overfetched candidates a
query keeps."""

from __future__ import annotations

import numpy as np
import pytest

from retrieval.v1 import retriever_pb2 as pb
from retriever_server.serving.client import Exclude, make_request
from retriever_server.serving.overfetch import drop_excluded
from retriever_server.wire.exclusions import ExclusionError, ExclusionKey, Exclusions, merge_ranges

Q = np.zeros((1, 4), dtype=np.float32)


def test_overlapping_and_adjacent_ranges_merge():
    assert merge_ranges([(5, 9), (0, 2), (2, 3), (8, 12), (20, 20)]).tolist() == [[0, 3], [5, 12]]
    rng = np.random.default_rng(0)
    for _ in range(300):
        ranges = rng.integers(0, 200, (int(rng.integers(0, 40)), 2))
        merged = merge_ranges(ranges)
        want, got = np.zeros(201, bool), np.zeros(201, bool)
        for a, b in ranges:
            want[a:b] = True
        for a, b in merged:
            got[a:b] = True
        assert np.array_equal(got, want)
        assert (merged[:, 1] > merged[:, 0]).all() and (merged[1:, 0] > merged[:-1, 1]).all()


def test_an_exclusion_within_a_shard_keeps_its_rows_alone():
    key = ExclusionKey.of(ids=[3, 50, 99, 100, 3], ranges=[(0, 10), (95, 120), (200, 300)])
    part = key.within(50, 100)
    assert part.ids.tolist() == [50, 99] and part.ranges.tolist() == [[95, 100]]
    assert not key.within(120, 200) and key.within(120, 200) == ExclusionKey()


def random_request(rng: np.random.Generator, nq: int, n: int) -> tuple[pb.SearchRequest, list[set[int]]]:
    """A request with a request-wide and per-query exclusions over ids [0, n), and each query's set."""
    def one() -> Exclude:
        ids = rng.integers(0, n, int(rng.integers(0, 12))).tolist()
        ranges = [(int(s), int(s) + int(rng.integers(0, 25))) for s in rng.integers(0, n, int(rng.integers(0, 4)))]
        return Exclude(ids=ids, ranges=ranges)

    common, per_query = one(), [one() for _ in range(nq)]
    per_query[0] = Exclude(ids=[n + (1 << 41)], ranges=[(n, 1 << 62)])  # past any datastore: harmless
    request = make_request(np.zeros((nq, 4), dtype=np.float32), k=5, exclude=common, exclude_per_query=per_query)

    def rows(e: Exclude) -> set[int]:
        return {i for i in e.ids if i < n} | {i for s, t in e.ranges for i in range(s, min(t, n))}

    return request, [rows(common) | rows(e) for e in per_query]


def test_flat_exclusions_match_each_query_built_alone():
    rng = np.random.default_rng(2)
    n = 300
    for _ in range(50):
        request, want = random_request(rng, int(rng.integers(1, 20)), n)
        exclusions = Exclusions.parse(request, len(want))
        for lo, hi in ((0, n), (40, 170)):
            part = exclusions.within(lo, hi)
            for q, rows in enumerate(want):
                key = part.key(q)
                got = set(key.ids.tolist()) | {i for s, t in key.ranges.tolist() for i in range(s, t)}
                assert got == {r for r in rows if lo <= r < hi}
                assert part.rows()[q] >= len(got)


def test_overfetched_candidates_lose_exactly_their_excluded_rows():
    """drop_excluded against a row-by-row check, on some of the queries, with missing candidates."""
    rng = np.random.default_rng(1)
    n, m, k = 300, 40, 10
    request, want = random_request(rng, 30, n)
    exclusions = Exclusions.parse(request, len(want))
    rows = np.flatnonzero(rng.random(len(want)) < 0.6)
    ids = rng.integers(0, n, (len(rows), m))
    ids[rng.random(ids.shape) < 0.05] = -1
    distances = np.sort(rng.random(ids.shape).astype(np.float32), axis=1)
    full = next(i for i, q in enumerate(rows) if want[q])  # a row whose every candidate is excluded
    ids[full] = rng.choice(sorted(want[rows[full]]), m)
    got_d, got_i, short = drop_excluded(distances, ids, exclusions, rows, k, np.inf)
    for i, q in enumerate(rows):
        kept = [j for j in range(m) if ids[i, j] < 0 or ids[i, j] not in want[q]][:k]
        assert short[i] == (len(kept) < k and ids[i, -1] >= 0)
        want_i, want_d = np.full(k, -1), np.full(k, np.inf, dtype=np.float32)
        want_i[:len(kept)], want_d[:len(kept)] = ids[i, kept], distances[i, kept]
        np.testing.assert_array_equal(got_i[i], want_i)
        np.testing.assert_array_equal(got_d[i], want_d)
    assert short[full]


@pytest.mark.parametrize("per_query, field", [
    ([Exclude(), Exclude(), Exclude(ids=[4, -1])], "exclude_per_query[2].ids must be non-negative"),
    ([Exclude(), Exclude(ranges=[(0, 1), (5, 3)]), Exclude()], r"exclude_per_query[1].ranges[1] must satisfy"),
])
def test_a_bad_exclusion_is_named_by_its_field(per_query, field):
    request = make_request(np.zeros((3, 4), dtype=np.float32), k=5, exclude_per_query=per_query)
    with pytest.raises(ExclusionError) as raised:
        Exclusions.parse(request, 3)
    assert str(raised.value).startswith(field)


def test_lone_ranges_are_found_and_nothing_else():
    request = make_request(np.zeros((4, 4), dtype=np.float32), k=5, exclude_per_query=[
        Exclude(ranges=[(5, 9)]), Exclude(ranges=[(1, 2), (4, 6)]), Exclude(ids=[3], ranges=[(7, 8)]), Exclude()])
    exclusions = Exclusions.parse(request, 4)
    assert exclusions.lone_ranges(np.arange(4)).tolist() == [[5, 9], [-1, -1], [-1, -1], [-1, -1]]
    assert exclusions.lone_ranges(np.array([2, 0])).tolist() == [[-1, -1], [5, 9]]


def test_side_by_side_bitmaps_hold_each_query_alone():
    """Selectors marked in one bitmap for several queries against each query's own key."""
    from retriever_server.datastore import index as ix

    rng = np.random.default_rng(3)
    n = 300
    request, want = random_request(rng, 12, n)
    exclusions = Exclusions.parse(request, len(want)).within(0, n)
    rows = np.array([1, 4, 5, 9, 11])
    selectors = ix.bitmap_selectors(len(rows), n, *exclusions.side_by_side(rows, n))
    for row, selector in zip(rows, selectors):
        got = {i for i in range(n) if not selector.is_member(i)}
        assert got == want[row]


def test_a_querys_own_selector_excludes_what_its_key_holds():
    """The selector of a query's ranges and ids (for shards whose bitmaps would span too many ids)
    excludes exactly what the query's key holds, the request-wide part included, at ids far past 2^32."""
    from retriever_server.datastore import index as ix

    rng = np.random.default_rng(5)
    n = 300
    request, want = random_request(rng, 12, n)
    exclusions = Exclusions.parse(request, len(want)).within(0, n)
    for row in range(12):
        key = exclusions.key(row)
        selector = ix.exclusion_selector(key.ids, key.ranges)
        got = {i for i in range(n) if selector is not None and not selector.is_member(i)}
        assert got == want[row]
    far = 5 << 32
    selector = ix.exclusion_selector(np.array([far + 3]), np.array([[far + 10, far + 20]]))
    assert [i - far for i in range(far, far + 25) if not selector.is_member(i)] == [3, *range(10, 20)]
    assert ix.exclusion_selector(np.array([], dtype=np.int64), np.zeros((0, 2), dtype=np.int64)) is None


@pytest.mark.parametrize("n", [7, 9, 300, 1500, 1501])
def test_a_range_that_runs_into_the_next_querys_row_still_excludes_all_of_it(n):
    """A range that ends at a shard's end, beside the next query's range from 0, joins it side by side:
    each query's selector must still exclude the whole of its own, for widths not a multiple of 8."""
    from retriever_server.datastore import index as ix

    cases = [Exclude(ranges=[(0, n)]), Exclude(ranges=[(n - 3, n)]), Exclude(ranges=[(0, 2), (n - 1, n)]),
             Exclude(ids=[0, n - 1]), Exclude(ranges=[(0, n)])]
    request = make_request(np.zeros((len(cases), 4), dtype=np.float32), k=5, exclude_per_query=cases,
                           exclude=Exclude(ids=[1]))
    exclusions = Exclusions.parse(request, len(cases)).within(0, n)
    rows = np.arange(len(cases))
    selectors = ix.bitmap_selectors(len(rows), n, *exclusions.side_by_side(rows, n))
    for case, selector in zip(cases, selectors):
        want = {1} | set(case.ids) | {i for a, b in case.ranges for i in range(a, b)}
        assert {i for i in range(n) if not selector.is_member(i)} == want


def test_a_query_fetches_more_neighbours_by_what_it_excludes():
    from retriever_server.serving.overfetch import overfetch

    sizes = np.array([0, 1, 32, 33, 100, 129, 5000, 50000])
    assert overfetch(sizes, 100_000, 128).tolist() == [0, 32, 32, 64, 128, 32, 32, 128]
    assert overfetch(sizes, 100_000, 40).tolist() == [0, 32, 32, 32, 32, 32, 32, 32]
    assert overfetch(sizes, 100_000, 0).tolist() == [0] * 8
    assert overfetch(sizes, 100_000, -1).tolist() == [0] * 8  # a GPU shard asked past its 2048: none more


def test_a_gpu_shard_takes_k_up_to_what_a_faiss_gpu_search_returns(caplog):
    """--max-k past 2048 on a GPU shard is lowered to 2048 (and said so): a larger k is refused by name
    rather than failing inside FAISS; a CPU shard keeps its limit."""
    from pathlib import Path

    from retriever_server.serving.shard import ShardOptions
    from retriever_server.serving.shard_server import ShardServerConfig, ShardService
    from retriever_server.wire.request import Limits

    def served(gpu: bool) -> int:
        config = ShardServerConfig(Path("unused"), 0, limits=Limits(max_k=4096), options=ShardOptions(gpu=gpu))
        service = ShardService(config)
        service.pool.shutdown()
        return service.limits.max_k

    assert served(gpu=False) == 4096
    assert served(gpu=True) == 2048 and "takes k up to 2048" in caplog.text
