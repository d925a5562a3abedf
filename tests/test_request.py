"""Request checking and the wire format, without servers: each bad field gets its own message."""

import grpc
import numpy as np
import pytest

from retrieval.v1 import retriever_pb2 as pb
from retriever_server.serving.client import Exclude, make_request
from retriever_server.serving.merge import merge_results
from retriever_server.wire.request import DatastoreView, Limits, RequestError, parse_search
from retriever_server.wire.result import SearchResult
from retriever_server.wire.tensors import from_tensor, to_tensor

VIEW = DatastoreView(dimension=8, nlist=16, default_nprobe=2, has_keys=True,
                     payload_row_bytes={"values": 4}, version="v1")
LIMITS = Limits(max_k=100, max_batch=50, max_excluded=10)
Q = np.zeros((3, 8), dtype=np.float32)


def refused(request: pb.SearchRequest, view: DatastoreView = VIEW) -> RequestError:
    with pytest.raises(RequestError) as caught:
        parse_search(request, view, LIMITS)
    return caught.value


@pytest.mark.parametrize("dtype", [np.float32, np.float16, np.int64, np.uint8, np.float64])
def test_tensor_round_trip(dtype):
    array = (np.arange(24).reshape(2, 3, 4) % 7).astype(dtype)
    back = from_tensor(to_tensor(array))
    assert back.dtype == array.dtype and np.array_equal(back, array)


def test_float16_queries_are_accepted_as_float32():
    spec = parse_search(make_request(Q.astype(np.float16) + 1, k=5), VIEW, LIMITS)
    assert spec.queries.dtype == np.float32 and np.all(spec.queries == 1)
    assert spec.nprobe == VIEW.default_nprobe


@pytest.mark.parametrize(
    "mutate, code, words",
    [
        (lambda r: r.ClearField("queries"), "INVALID_ARGUMENT", "queries is required"),
        (lambda r: r.queries.CopyFrom(to_tensor(np.zeros((3, 7), np.float32))), "INVALID_ARGUMENT", "dimension 7"),
        (lambda r: setattr(r.queries, "data", r.queries.data[:-4]), "INVALID_ARGUMENT", "queries.data has"),
        (lambda r: setattr(r.queries, "dtype", 42), "INVALID_ARGUMENT", "queries.dtype"),
        (lambda r: r.queries.CopyFrom(to_tensor(np.zeros((3, 8), np.int64))), "INVALID_ARGUMENT", "queries.dtype"),
        (lambda r: r.queries.CopyFrom(to_tensor(np.zeros((0, 8), np.float32))), "INVALID_ARGUMENT", "empty batch"),
        (lambda r: r.queries.CopyFrom(to_tensor(np.zeros((51, 8), np.float32))), "RESOURCE_EXHAUSTED", "batch limit"),
        (lambda r: r.queries.CopyFrom(to_tensor(np.zeros(8, np.float32))), "INVALID_ARGUMENT", "(nq, d)"),
        (lambda r: setattr(r, "k", 0), "INVALID_ARGUMENT", "k must be"),
        (lambda r: setattr(r, "k", 101), "INVALID_ARGUMENT", "k must be"),
        (lambda r: setattr(r, "nprobe", 17), "INVALID_ARGUMENT", "nprobe must be"),
        (lambda r: setattr(r, "nprobe", -1), "INVALID_ARGUMENT", "nprobe must be"),
        (lambda r: setattr(r, "rerank_candidates", 2), "INVALID_ARGUMENT", "rerank_candidates"),
        (lambda r: r.payloads.append("nope"), "INVALID_ARGUMENT", "'nope'"),
        (lambda r: r.exclude.ranges.append(pb.IdRange(start=5, end=2)), "INVALID_ARGUMENT", "exclude.ranges[0]"),
        (lambda r: r.exclude.ids.append(-3), "INVALID_ARGUMENT", "exclude.ids"),
        (lambda r: r.exclude_per_query.append(pb.Exclusion()), "INVALID_ARGUMENT", "exclude_per_query has 1"),
        (lambda r: r.exclude.ids.extend(range(11)), "RESOURCE_EXHAUSTED", "excludes 11 ids"),
        (lambda r: setattr(r, "expected_datastore_version", "v0"), "FAILED_PRECONDITION", "version v1"),
    ],
)
def test_each_bad_field_is_named(mutate, code, words):
    request = make_request(Q, k=5)
    mutate(request)
    error = refused(request)
    assert error.code == getattr(grpc.StatusCode, code)
    assert words in error.message


@pytest.mark.parametrize("value", [np.nan, np.inf, -np.inf])
def test_nan_and_inf_are_refused_with_the_row(value):
    queries = Q.copy()
    queries[2, 3] = value
    error = refused(make_request(queries, k=5))
    assert error.code == grpc.StatusCode.INVALID_ARGUMENT and "row 2" in error.message


def test_the_answer_size_and_keys_are_checked_before_the_queries_are_read():
    """Every limit before any query is read (converted, scanned for NaN), as parse_search says."""
    queries = np.full((40, 8), np.nan, dtype=np.float16)  # read, these would be refused for their NaN
    small = Limits(max_k=100, max_batch=50, max_response_bytes=1 << 10)
    with pytest.raises(RequestError) as caught:
        parse_search(make_request(queries, k=10, return_keys=True), VIEW, small)
    assert caught.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED and "the answer would take" in caught.value.message
    without_keys = DatastoreView(dimension=8, nlist=16, default_nprobe=2, has_keys=False, payload_row_bytes={},
                                 version="v1")
    error = refused(make_request(queries, k=5, return_keys=True), without_keys)
    assert error.code == grpc.StatusCode.FAILED_PRECONDITION and "return_keys needs stored keys" in error.message


@pytest.mark.parametrize("argument, value, error, words", [
    ("k", 2.5, TypeError, "k must be an integer, got 2.5"),
    ("nprobe", True, TypeError, "nprobe must be an integer, got True"),
    ("k", 2 ** 40, ValueError, "k must fit in 32 bits, got 1099511627776"),
    ("successors", -2 ** 31 - 1, ValueError, "successors must fit in 32 bits"),
])
def test_a_count_the_request_cannot_carry_is_named(argument, value, error, words):
    with pytest.raises(error, match=words):
        make_request(np.zeros((1, 4), np.float32), **{argument: value})
    assert make_request(np.zeros((1, 4), np.float32), k=np.int64(7), rerank_candidates=np.int32(9)).k == 7


@pytest.mark.parametrize("exclude, words", [
    (Exclude(ranges=[5, 10]), r"Exclude.ranges\[0\] must be a \(start, end\) pair of integers, got 5"),
    (Exclude(ranges=[(1, 2), (1, 2, 3)]), r"Exclude.ranges\[1\] must be a \(start, end\) pair"),
    (Exclude(ids=[4, 1.5]), r"Exclude.ids\[1\] must be an integer, got 1.5"),
])
def test_a_badly_shaped_exclusion_is_named(exclude, words):
    with pytest.raises(TypeError, match=words):
        make_request(Q, k=5, exclude=exclude)
    shaped = make_request(Q, k=5, exclude=Exclude(ids=np.array([3, 4]), ranges=[np.array([7, 9]), (np.int64(1), 2)]))
    assert list(shaped.exclude.ids) == [3, 4] and [(r.start, r.end) for r in shaped.exclude.ranges] == [(7, 9), (1, 2)]


def test_one_payload_name_as_a_string_and_big_endian_float64_queries():
    with pytest.raises(TypeError, match=r"payloads must be a list of names, got the string 'values': "
                                        r"write \['values'\]"):
        make_request(Q, k=5, payloads="values")
    big_endian = make_request(Q.astype(">f8"), k=5)  # float64 in either byte order is sent as float32
    assert np.array_equal(parse_search(big_endian, VIEW, LIMITS).queries, Q.astype(np.float32))


def test_rerank_without_keys_is_a_failed_precondition():
    view = DatastoreView(8, 16, 2, False, {}, "v1")
    error = refused(make_request(Q, k=5, exact_rerank=True), view)
    assert error.code == grpc.StatusCode.FAILED_PRECONDITION and "--keep-keys" in error.message


def test_exclusions_merge_request_wide_and_per_query():
    request = make_request(Q, k=5, exclude=Exclude(ids=[9], ranges=[(0, 2)]),
                           exclude_per_query=[Exclude(ids=[1]), Exclude(), Exclude(ranges=[(4, 6)])])
    spec = parse_search(request, VIEW, LIMITS)
    keys = [spec.exclusions.key(q) for q in range(3)]
    got = [(e.ids.tolist(), e.ranges.tolist()) for e in keys]
    assert got == [([1, 9], [[0, 2]]), ([9], [[0, 2]]), ([9], [[0, 2], [4, 6]])]
    assert keys[1] == keys[1].union(keys[1])  # equal keys group together


@pytest.mark.parametrize("metric", ["l2", "inner_product"])
def test_merge_equals_brute_force_top_k(metric):
    rng = np.random.default_rng(1)
    distances = rng.integers(0, 20, (4, 30)).astype(np.float32)  # many ties
    ids = rng.permutation(30 * 4).reshape(4, 30).astype(np.int64)
    values = ids.astype(np.int32) * 10
    parts = []
    for s in range(3):
        cols = slice(10 * s, 10 * s + 10)
        parts.append(SearchResult(ids[:, cols], distances[:, cols], {"values": values[:, cols]},
                                  successor_ids=ids[:, cols, None] + np.arange(1, 3)))
    merged = merge_results(parts, 7, metric)
    assert np.array_equal(merged.successor_ids, merged.ids[:, :, None] + np.arange(1, 3))
    for row in range(4):
        key = distances[row] if metric == "l2" else -distances[row]
        expect = sorted(range(30), key=lambda j: (key[j], ids[row, j]))[:7]
        assert merged.ids[row].tolist() == ids[row, expect].tolist()
        assert merged.distances[row].tolist() == distances[row, expect].tolist()
    assert np.array_equal(merged.payloads["values"], merged.ids * 10)


@pytest.mark.parametrize("metric", ["l2", "inner_product"])
@pytest.mark.parametrize("k", [7, 10])
def test_ranking_rows_mostly_in_order_equals_a_full_sort(metric, k):
    """`rank_neighbours` skips the rows already in order (as FAISS returns them): rows in order, rows
    out of order only by ties or a missing neighbour, and shuffled rows all come out as the
    reference order, row by row, payloads following."""
    from retriever_server.serving.merge import rank_neighbours

    rng = np.random.default_rng(5)
    nq, m = 60, 10
    distances = rng.choice(np.array([-1.0, 0.0, 0.5, 2.0], np.float32), (nq, m))
    ids = rng.permutation(nq * m).reshape(nq, m).astype(np.int64)
    ids[rng.random((nq, m)) < 0.1] = -1
    sign = 1 if metric == "l2" else -1

    def reference(row: int) -> list[int]:
        key = [(np.inf, np.inf) if i < 0 else (sign * float(d), i) for d, i in zip(distances[row], ids[row])]
        return sorted(range(m), key=lambda j: key[j])

    for row in range(0, nq, 2):  # every other row in order already
        order = reference(row)
        ids[row], distances[row] = ids[row, order], distances[row, order]
    ranked = rank_neighbours(SearchResult(ids, distances, {"values": ids * 10}), k, metric)
    for row in range(nq):
        assert ranked.ids[row].tolist() == ids[row, reference(row)[:k]].tolist()
    assert np.array_equal(ranked.payloads["values"], ranked.ids * 10)


def test_merge_puts_missing_neighbours_last():
    a = SearchResult(np.array([[3, -1]]), np.array([[1.0, np.inf]], dtype=np.float32))
    b = SearchResult(np.array([[-1, -1]]), np.array([[np.inf, np.inf]], dtype=np.float32))
    merged = merge_results([b, a], 2, "l2")
    assert merged.ids.tolist() == [[3, -1]]


@pytest.mark.parametrize("metric", ["l2", "inner_product"])
@pytest.mark.parametrize("offset", [0, 2**40])
def test_fast_neighbour_order_equals_two_key_sort(metric, offset):
    """The packed-key sort (ids < 2**32) and the lexsort fallback give the reference order."""
    from retriever_server.serving.merge import sort_neighbours

    rng = np.random.default_rng(7)
    distances = rng.choice(np.array([-2.5, -0.0, 0.0, 0.5, 1e-8, 3.0, np.inf], np.float32), (50, 40))
    ids = rng.permutation(50 * 40).reshape(50, 40).astype(np.int64) + offset
    ids[rng.random((50, 40)) < 0.1] = -1
    order = sort_neighbours(ids, distances, metric)
    for row in range(50):
        sign = 1 if metric == "l2" else -1
        key = [(np.inf if i < 0 else sign * float(d) + 0.0, np.inf if i < 0 else i)
               for d, i in zip(distances[row], ids[row])]
        expect = sorted(range(40), key=lambda j: key[j])
        assert ids[row, order[row]].tolist() == ids[row, expect].tolist()


@pytest.mark.parametrize("metric", ["l2", "inner_product"])
@pytest.mark.parametrize("ranked", [False, True])
@pytest.mark.parametrize("attached", [True, False])
@pytest.mark.parametrize("missing", [0.03, 0.0])
def test_merge_of_shard_answers_equals_brute_force_top_k(metric, ranked, attached, missing):
    """Shard answers (each ranked, over its own id range, many ties, some rows short of neighbours,
    parts in any order) merge by FAISS's heap merge to the reference top-k; payloads and keys follow
    (`attached`: merged by position; else ids and distances alone, the ids as FAISS's labels); with
    and without missing neighbours."""
    from retriever_server.serving.merge import rank_neighbours

    rng = np.random.default_rng(11)
    nq, m, k, shards = 70, 12, 9, 3
    parts = []
    for s in range(shards):
        ids = (s * 1000 + rng.permutation(1000)[:nq * m]).reshape(nq, m).astype(np.int64)
        ids[rng.random((nq, m)) < missing] = -1
        distances = rng.choice(np.array([-1.0, -0.0, 0.0, 0.5, 2.0], np.float32), (nq, m))
        raw = SearchResult(ids, distances, {"values": ids.astype(np.int32) * 10},
                           keys=np.repeat(ids[:, :, None].astype(np.float32), 2, axis=2),
                           successor_ids=ids[:, :, None] * 10 + np.arange(1, 4),
                           successor_payloads={"values": (ids[:, :, None] * 100 + np.arange(3)).astype(np.int32)})
        parts.append(rank_neighbours(raw, m, metric))
    if not attached:
        parts = [SearchResult(p.ids, p.distances) for p in parts]
    parts = [parts[2], parts[0], parts[1]]
    merged = merge_results(parts, k, metric, ranked=ranked)
    ids = np.concatenate([p.ids for p in parts], axis=1)
    distances = np.concatenate([p.distances for p in parts], axis=1)
    sign = 1 if metric == "l2" else -1
    for row in range(nq):
        key = [(np.inf, np.inf) if i < 0 else (sign * float(d) + 0.0, i) for d, i in zip(distances[row], ids[row])]
        expect = sorted(range(shards * m), key=lambda j: key[j])[:k]
        assert merged.ids[row].tolist() == ids[row, expect].tolist()
        assert merged.distances[row].tolist() == distances[row, expect].tolist()
        assert np.signbit(merged.distances[row]).tolist() == np.signbit(distances[row, expect]).tolist()  # -0.0 kept
    if not attached:
        assert not merged.payloads and merged.keys is None and merged.successor_ids is None
        return
    assert np.array_equal(merged.payloads["values"], np.where(merged.ids < 0, 0, merged.ids * 10))
    assert np.array_equal(merged.keys[..., 0], merged.ids.astype(np.float32))
    assert np.array_equal(merged.successor_ids, merged.ids[:, :, None] * 10 + np.arange(1, 4))
    assert np.array_equal(merged.successor_payloads["values"], merged.ids[:, :, None] * 100 + np.arange(3))


@pytest.mark.parametrize("metric", ["l2", "inner_product"])
def test_a_merge_of_few_neighbours_equals_brute_force_and_the_large_merge(metric):
    """A few neighbours without payloads (merged in Python) come out as the reference order and as
    the same parts merged with payloads attached (merged in numpy): ties, -0.0 and missing included."""
    rng = np.random.default_rng(13)
    sign = 1 if metric == "l2" else -1
    for trial in range(40):
        nq, k, widths = int(rng.integers(1, 4)), int(rng.integers(1, 12)), rng.integers(3, 11, 2).tolist()
        parts = []
        for s, m in enumerate(widths):
            ids = (s * 1000 + rng.permutation(1000)[:nq * m]).reshape(nq, m).astype(np.int64)
            ids[rng.random((nq, m)) < 0.15] = -1
            distances = rng.choice(np.array([-1.0, -0.0, 0.0, 0.5, 2.0], np.float32), (nq, m))
            parts.append(SearchResult(ids, distances, datastore_version="v"))
        merged = merge_results(parts, k, metric)
        with_payloads = merge_results([SearchResult(p.ids, p.distances, {"values": p.ids * 10}) for p in parts],
                                      k, metric)
        ids = np.concatenate([p.ids for p in parts], axis=1)
        distances = np.concatenate([p.distances for p in parts], axis=1)
        for row in range(nq):
            key = [(np.inf, np.inf) if i < 0 else (sign * float(d) + 0.0, i) for d, i in zip(distances[row], ids[row])]
            expect = sorted(range(sum(widths)), key=lambda j: key[j])[:k]
            assert merged.ids[row].tolist() == ids[row, expect].tolist(), trial
            assert merged.distances[row].tolist() == distances[row, expect].tolist(), trial
        assert np.array_equal(merged.ids, with_payloads.ids) and merged.datastore_version == "v"
        assert merged.distances.dtype == np.float32 and merged.ids.dtype == np.int64


@pytest.mark.parametrize("metric", ["l2", "inner_product"])
def test_rows_in_strict_order_are_told_apart_from_the_others(metric):
    """`rows_out_of_order` answers as the full check does for rows strictly in order (its quick
    path), rows with a tie, a -0.0 next to 0.0, a NaN (no pair compares worse), a missing neighbour,
    and rows out of order."""
    from retriever_server.serving.merge import rows_out_of_order

    sign = 1.0 if metric == "l2" else -1.0
    rows = [[0.1, 0.2, 0.3], [0.1, 0.1, 0.3], [-0.0, 0.0, 0.3], [0.1, np.nan, 0.3], [0.1, 0.2, 0.3],
            [0.3, 0.2, 0.1], [0.0, -0.0, 0.3]]
    ids = np.array([[1, 2, 3], [2, 1, 3], [2, 1, 3], [1, 2, 3], [1, 2, -1], [1, 2, 3], [1, 2, 3]])
    distances = (sign * np.array(rows)).astype(np.float32)

    def reference(row: int) -> bool:
        key = [(np.inf, np.inf) if i < 0 else (sign * float(d) + 0.0, i) for d, i in zip(distances[row], ids[row])]
        return any(b[0] < a[0] or (b[0] == a[0] and b[1] < a[1]) for a, b in zip(key, key[1:]))

    assert rows_out_of_order(ids[:1], distances[:1], metric).tolist() == [False]  # every row strict: quick
    assert rows_out_of_order(ids, distances, metric).tolist() == [reference(r) for r in range(len(ids))]


def test_a_merge_of_no_queries_is_empty():
    parts = [SearchResult(np.zeros((0, 5), np.int64), np.zeros((0, 5), np.float32)) for _ in range(2)]
    merged = merge_results(parts, 5, "l2")
    assert merged.ids.shape == (0, 5) and merged.distances.shape == (0, 5)


@pytest.mark.parametrize("value, error, words", [
    (0, ValueError, r"timeout must be a number of seconds in \(0, 1e\+06\] \(or None: no deadline\), got 0"),
    (-1.5, ValueError, "got -1.5"),
    (float("nan"), ValueError, "got nan"),
    (float("inf"), ValueError, "got inf"),
    (1e12, ValueError, "got 1000000000000.0"),  # past about 1e10 s gRPC's deadline overflows: every call would fail
    (10 ** 400, ValueError, "got 1000000000000000000000000000000000000000$"),  # past a float: cut
    ("5", TypeError, "timeout must be a number of seconds or None, got '5'"),
    (True, TypeError, "got True"),
])
def test_a_timeout_that_is_no_deadline_in_seconds_is_refused_by_name(value, error, words):
    """A timeout of 0 is a call that cannot succeed, not the client's default: refused, as are the
    other values that are no number of seconds, by the constructor, `search` and `info`, before any call."""
    from retriever_server.serving.client import RetrieverClient

    with pytest.raises(error, match=words):
        RetrieverClient("127.0.0.1:9", timeout=value)
    for target in ("127.0.0.1:9", ["127.0.0.1:9", "127.0.0.1:10"]):
        with RetrieverClient(target, timeout=None) as client:
            assert client.timeout is None
            with pytest.raises(error, match=words):
                client.search(Q, k=1, timeout=value)
            with pytest.raises(error, match=words):
                client.info(timeout=value)
    assert RetrieverClient("127.0.0.1:9", timeout=np.float32(2.5)).timeout == 2.5
