"""Requests from a hostile or broken caller, on real servers on loopback: bytes that do not parse,
fuzzed requests, unknown fields, untrusted strings, floods of refusals and long searches. Servers
answer each with a status naming what is wrong (never UNKNOWN or INTERNAL), log it in one line,
keep serving, and give the same answers afterwards."""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
from conftest import build, damaged_copy, serve, synthetic

from retrieval.v1 import retriever_pb2 as pb
from retriever_server.datastore import index as ix
from retriever_server.serving import shard as shard_module
from retriever_server.serving.client import make_request
from retriever_server.serving.grpc_setup import health_status
from retriever_server.serving.shard import ShardOptions
from retriever_server.serving.shard_server import ShardServerConfig, start_shard_server
from retriever_server.wire.request import Limits

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from fuzz import ANSWERED, SEARCH, call, fuzzed  # noqa: E402

pytestmark = pytest.mark.ray
N, D = 3000, 8


@pytest.fixture(scope="module")
def keys():
    return synthetic(N, D, seed=3)


@pytest.fixture(scope="module")
def datastore(ray_cluster, keys, tmp_path_factory):
    return build(tmp_path_factory.mktemp("bounds"), keys, "ds", shards=2, factory="IVF8,Flat", keep_keys=True,
                 payload_arrays={"values": np.arange(N, dtype=np.int32)})


def valid(keys) -> pb.SearchRequest:
    return make_request(keys[:3], k=5, nprobe=4, payloads=["values"])


@pytest.mark.slow
def test_a_fuzz_of_malformed_requests_leaves_the_servers_serving_and_unchanged(aio, keys, datastore, caplog):
    rng = np.random.default_rng(0)
    base = valid(keys).SerializeToString()
    with serve(aio, datastore, 2) as served:
        targets = [served.address, served.shards[0][0].address]
        channels = [grpc.insecure_channel(a) for a in targets]
        try:
            before = [call(c, base) for c in channels]
            with caplog.at_level(logging.INFO):
                seen: dict[grpc.StatusCode, int] = {}
                for i in range(2400):
                    code, message = call(channels[i % 2], fuzzed(rng, base))
                    assert code in ANSWERED, (code, message)
                    assert "\n" not in message and len(message) < 600, message
                    seen[code] = seen.get(code, 0) + 1
            assert seen[grpc.StatusCode.INVALID_ARGUMENT] > 500, seen
            assert "Traceback" not in caplog.text and "\nFAKE" not in caplog.text
            assert len(caplog.records) < 100  # refusals are counted, not logged one by one
            for target in targets:
                assert health_status(target) == "SERVING"
            original = channels[0].unary_unary(SEARCH)(base, timeout=10)
            assert [call(c, base) for c in channels] == before and original == \
                channels[0].unary_unary(SEARCH)(base, timeout=10)
        finally:
            for channel in channels:
                channel.close()


def test_bytes_that_do_not_parse_are_invalid_argument_in_one_line(aio, datastore, caplog):
    with serve(aio, datastore, 2) as served, grpc.insecure_channel(served.address) as router, \
            grpc.insecure_channel(served.shards[1][0].address) as shard:
        with caplog.at_level(logging.INFO):
            for channel in (router, shard):
                code, message = call(channel, b"\xff\xff\xff\xff not a protobuf")
                assert code == grpc.StatusCode.INVALID_ARGUMENT and "not a SearchRequest" in message
                with pytest.raises(grpc.RpcError) as caught:
                    channel.unary_unary("/retrieval.v1.Retriever/GetInfo")(b"\xff\xff", timeout=5)
                assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "Traceback" not in caplog.text


def test_untrusted_strings_are_cut_and_escaped_in_statuses_and_logs(aio, keys, datastore, caplog):
    request = valid(keys)
    request.payloads[:] = ["values\nFAKE LOG LINE " + "x" * 10_000]
    with serve(aio, datastore, 2, limits=Limits(max_string=100_000)) as served, \
            grpc.insecure_channel(served.address) as channel, caplog.at_level(logging.INFO):
        code, message = call(channel, request.SerializeToString())
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "unknown payload 'values\\nFAKE LOG LINE xx" in message
        assert "\n" not in message and len(message) < 300 and "(10021 characters)" in message
        version = valid(keys)
        version.expected_datastore_version = "v1\r\nFAKE" * 20
        code, message = call(channel, version.SerializeToString())
        assert code == grpc.StatusCode.FAILED_PRECONDITION and "\\r\\nFAKE" in message and len(message) < 300
    assert not any("\n" in r.getMessage() for r in caplog.records)


@pytest.fixture
def received(monkeypatch) -> list[bytes]:
    """The raw requests that reach the shard servers, in order (recorded, then parsed as before)."""
    from retriever_server.serving.shard_server import ShardService

    seen = []
    decode = ShardService._parse

    def recording(self, raw):
        seen.append(raw)
        return decode(self, raw)

    monkeypatch.setattr(ShardService, "_parse", recording)
    return seen


def unpacked_exclusions_and_a_secret(keys) -> bytes:
    """A request as long as protobuf writes it, though it holds an unknown field: each query's one
    excluded id written unpacked (a byte shorter than packed) makes room for the field's bytes."""
    request = make_request(keys[:9], k=5, nprobe=4, payloads=["values"])
    body = request.SerializeToString()
    request.exclude_per_query.extend(pb.Exclusion(ids=[i]) for i in range(9))
    entries = b"".join(bytes([0x4A, 2, 0x08, i]) for i in range(9))  # field 9, each {ids: i} unpacked
    secret = bytes([0xFA, 0x07, 0x06]) + b"secret"  # field 127, unknown: the 9 bytes the entries saved
    assert len(body + entries + secret) == request.ByteSize()
    return body + entries + secret


@pytest.mark.parametrize("body", ["appended", "as long as canonical"])
def test_the_router_forwards_known_fields_alone(aio, keys, datastore, monkeypatch, received, body):
    """An unknown field of a valid request is dropped by the router: the shards never see it, even in a
    request as long as protobuf writes the known fields."""
    seen = []
    original = shard_module.Shard.search

    def spying(self, spec, stop=None):  # records what reaches the shard, then searches
        seen.append(spec)
        return original(self, spec, stop)

    monkeypatch.setattr(shard_module.Shard, "search", spying)
    raw = valid(keys).SerializeToString() + bytes([0xFA, 0x07, 0x06]) + b"secret" if body == "appended" \
        else unpacked_exclusions_and_a_secret(keys)
    with serve(aio, datastore, 2) as served, grpc.insecure_channel(served.address) as channel:
        assert call(channel, raw)[0] == grpc.StatusCode.OK
    assert len(received) == 2 and all(b"secret" not in r for r in received)
    assert len(seen) == 2  # both shards searched the request the router re-encoded


def test_the_router_passes_a_request_on_as_it_came_with_its_own_fields_after_it(aio, keys, datastore, received):
    """A request of known fields is forwarded as its own bytes (the queries not converted), followed by
    allow_partial false and the datastore's version, which the shards read: the caller's allow_partial
    and a version left out do not reach them."""
    request = valid(keys)
    request.allow_partial = True
    body = request.SerializeToString()
    with serve(aio, datastore, 2) as served, grpc.insecure_channel(served.address) as channel:
        assert call(channel, body)[0] == grpc.StatusCode.OK
        info = channel.unary_unary("/retrieval.v1.Retriever/GetInfo")(b"")
    version = pb.InfoResponse.FromString(info).datastore_version
    assert len(received) == 2 and all(raw.startswith(body) and len(raw) > len(body) for raw in received)
    forwarded = pb.SearchRequest.FromString(received[0])
    assert not forwarded.allow_partial and forwarded.expected_datastore_version == version
    request.allow_partial, request.expected_datastore_version = False, version
    assert forwarded == request


def test_a_request_the_router_accepts_is_never_too_big_for_its_shards(aio, keys, datastore):
    """A request just under the router's limit grows by the version the router adds; with shards at the
    same limit (a standalone router's mistake), the router refuses it itself, naming the shards' limit."""
    request = make_request(np.repeat(keys[:1], 500, axis=0), k=5, nprobe=4)
    size = request.ByteSize()
    with serve(aio, datastore, 2, limits=Limits(max_request_bytes=size + 4)) as served, \
            grpc.insecure_channel(served.address) as channel:
        code, message = call(channel, request.SerializeToString())
        assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and "as sent to the shards" in message, message
        smaller = make_request(np.repeat(keys[:1], 400, axis=0), k=5, nprobe=4)
        assert call(channel, smaller.SerializeToString())[0] == grpc.StatusCode.OK


def test_a_flood_of_refusals_is_logged_as_counts(aio, keys, datastore, caplog):
    with serve(aio, datastore, 2) as served, grpc.insecure_channel(served.address) as channel, \
            caplog.at_level(logging.INFO):
        bad = valid(keys)
        bad.k = 0
        for _ in range(300):
            assert call(channel, bad.SerializeToString())[0] == grpc.StatusCode.INVALID_ARGUMENT
        served.router.counters[0].flush()  # as the server does every 10 s
    refused = [r.getMessage() for r in caplog.records if "refused a search" in r.getMessage()]
    assert 1 <= len(refused) <= 3, refused  # the first one, then a count
    assert any("more in the last" in m for m in refused) or len(refused) == 1


def test_a_search_stops_at_its_deadline(aio, keys, datastore, monkeypatch):
    """A search of many chunks, each slowed to 30 ms (fault injection): with a 0.3 s deadline the
    shard stops within a chunk of it, rather than searching on for the caller that has gone."""
    chunks: list[float] = []
    original = shard_module.Shard._search_index

    def slow(self, queries, m, nprobe):
        chunks.append(time.monotonic())
        time.sleep(0.03)
        return original(self, queries, m, nprobe)

    monkeypatch.setattr(shard_module.Shard, "_search_index", slow)
    monkeypatch.setattr(shard_module, "FIRST_CHUNK", 1)
    monkeypatch.setattr(shard_module, "MAX_CHUNK", 1)
    request = make_request(np.repeat(keys[:1], 200, axis=0), k=5, nprobe=2)
    with serve(aio, datastore, 2) as served, grpc.insecure_channel(served.shards[0][0].address) as channel:
        started = time.monotonic()
        code, _ = call(channel, request.SerializeToString(), timeout=0.3)
        assert code == grpc.StatusCode.DEADLINE_EXCEEDED
        time.sleep(0.5)  # what the shard does after the caller's deadline, if anything
    late = [t for t in chunks if t > started + 0.3]
    assert len(chunks) < 40 and all(t < started + 0.3 + 0.1 for t in late), (len(chunks), late)


@pytest.mark.parametrize("rerank", [True, False], ids=["re-rank", "gathers"])
def test_the_stop_check_covers_the_re_rank_and_the_gathers_after_the_search(keys, datastore, rerank):
    """A caller gone once the candidate search is done: the shard stops before re-ranking (or before
    gathering payloads and keys) instead of doing that work for nobody."""
    from retriever_server.serving.shard import SearchStopped, Shard
    from retriever_server.wire.request import parse_search

    shard = Shard.open(datastore, 0)
    request = make_request(keys[:40], k=5, nprobe=4, exact_rerank=rerank, rerank_candidates=50 if rerank else 0,
                           payloads=["values"])
    spec = parse_search(request, shard.view(), Limits())
    checks: list[int] = []

    def gone_after_the_search() -> bool:
        checks.append(1)
        return len(checks) > 1  # the search's one chunk checks first; everything after finds the caller gone

    with pytest.raises(SearchStopped):
        shard.search(spec, gone_after_the_search)
    assert len(checks) == 2
    full = shard.search(spec, lambda: False)  # a caller that stays gets the whole answer
    assert full.ids.shape == (40, 5) and set(full.payloads) == {"values"}


def test_without_verification_a_corrupt_index_is_found_and_never_answers_again(aio, keys, datastore, tmp_path):
    """--no-verify: a bit flipped among the vectors passes the size and header checks, so the shard
    starts; the sha256 check that follows finds it, and from then on the shard is NOT_SERVING and
    answers UNAVAILABLE (a router or client moves to another replica)."""
    copy = damaged_copy(datastore, tmp_path / "copy", "shard-00000/index.faiss", mask=0x40)
    config = ShardServerConfig(copy, 0, metrics_port=None, options=ShardOptions(verify=False))
    running = aio.run(start_shard_server(config))
    try:
        deadline = time.monotonic() + 30
        while health_status(running.address) == "SERVING" and time.monotonic() < deadline:
            time.sleep(0.05)
        assert health_status(running.address) == "NOT_SERVING"
        with grpc.insecure_channel(running.address) as channel:
            code, message = call(channel, valid(keys).SerializeToString())
        assert code == grpc.StatusCode.UNAVAILABLE and "index.faiss checksum does not match" in message, message
    finally:
        aio.run(running.drain(grace=0))


def test_an_exclusion_bitmap_excludes_exactly_what_it_is_given():
    rng = np.random.default_rng(1)
    for _ in range(200):
        n = int(rng.integers(1, 5000))
        cuts = np.sort(rng.choice(n + 1, size=min(2 * int(rng.integers(0, 80)), n + 1) // 2 * 2, replace=False))
        ranges = tuple((int(a), int(b)) for a, b in zip(cuts[::2], cuts[1::2]) if b > a)
        ids = tuple(int(i) for i in rng.integers(0, n, int(rng.integers(0, 30))))
        want = np.zeros(n + 16, bool)
        for a, b in ranges:
            want[a:b] = True
        want[list(ids)] = True
        selector = ix.id_selector(ids, ranges)
        got = np.zeros(n + 16, bool) if selector is None else \
            np.array([not selector.is_member(i) for i in range(n + 16)])
        assert np.array_equal(got, want)


def test_each_kind_of_exclusion_gives_the_filtered_search_of_its_query(datastore, keys):
    """Queries with no exclusion, narrow and wide ones (searched in batches that fetch more neighbours),
    and some excluding their own 200 nearest rows (too many for a batch: searched again alone with a
    selector), in one request, against a filtered FAISS search of each query by itself."""
    from retriever_server.serving.client import Exclude
    from retriever_server.serving.shard import Shard
    from retriever_server.wire.request import parse_search

    shard = Shard.open(datastore, 0)
    rng = np.random.default_rng(4)
    nearest = ix.search(shard.index, keys[:50], 200, 4)[1]
    kinds = [lambda q, s: Exclude(), lambda q, s: Exclude(ids=[s + 3], ranges=[(s, s + 10)]),
             lambda q, s: Exclude(ranges=[(s, s + 40)]), lambda q, s: Exclude(ranges=[(s, s + 1200)]),
             lambda q, s: Exclude(ids=rng.integers(0, 1500, 30).tolist(), ranges=[(s, s + 700), (s + 750, s + 1100)]),
             lambda q, s: Exclude(ids=nearest[q].tolist())]
    excludes = [kinds[q % len(kinds)](q, int(rng.integers(0, 300))) for q in range(50)]
    request = make_request(keys[:50], k=10, nprobe=4, exclude_per_query=excludes)
    got = shard.search(parse_search(request, shard.view(), Limits(max_excluded_per_query=256)))
    for q, exclude in enumerate(excludes):
        selector = ix.id_selector(sorted(set(exclude.ids)), sorted(exclude.ranges))
        want_d, want_i = ix.search(shard.index, keys[q:q + 1], 10, 4, selector)
        np.testing.assert_array_equal(got.ids[q], want_i[0])
        np.testing.assert_allclose(got.distances[q], want_d[0], rtol=1e-5)


def test_a_tie_as_wide_as_the_shard_is_searched_within_the_tie_budget(keys, tmp_path, monkeypatch):
    """Zero queries against inner product: every row scores 0, one tie the size of the shard. Ties at the
    k-th place are searched wider until they end, which here means the whole shard: past TIE_BUDGET
    candidates the search stops widening and keeps FAISS's pick, so no request within the limits makes a
    shard fetch every row for each query. Under the budget, the tie still comes back by smallest id."""
    from retriever_server.serving.shard import Shard
    from retriever_server.wire.request import parse_search

    datastore = build(tmp_path, keys[:1000], "tied", shards=1, factory="IVF4,Flat", metric="ip")
    shard = Shard.open(datastore, 0)
    widths = []
    search_rows = shard._search_rows
    monkeypatch.setattr(shard, "_search_rows", lambda q, m, *rest: widths.append(m) or search_rows(q, m, *rest))
    request = make_request(np.zeros((4, D), dtype=np.float32), k=2, nprobe=4)
    whole = shard.search(parse_search(request, shard.view(), Limits()))
    assert widths[-1] == 1000 and np.array_equal(whole.ids, np.tile([0, 1], (4, 1)))  # every tied row by id
    widths.clear()
    monkeypatch.setattr(shard_module, "TIE_BUDGET", 200)
    bounded = shard.search(parse_search(request, shard.view(), Limits()))
    assert widths == [18, 36] and 4 * widths[-1] <= 200  # 4 x 72 would pass the budget: no wider search
    assert np.array_equal(bounded.distances, whole.distances)  # a tie all the same: every row scores 0
    assert all(len(set(row)) == 2 and 0 <= row.min() and row.max() < 1000 for row in bounded.ids)


def test_exclusion_entries_past_the_batch_limit_are_refused_before_they_are_counted():
    """An exclude_per_query longer than any batch is refused by its length alone, naming the field, before
    the per-entry counts that take time in proportion to it (they used to run first)."""
    from retriever_server.wire.request import DatastoreView, RequestError, parse_search

    view = DatastoreView(dimension=D, nlist=1, default_nprobe=1, has_keys=False, payload_row_bytes={}, version="")
    request = make_request(np.zeros((1, D), dtype=np.float32), k=1)
    for _ in range(5):
        request.exclude_per_query.add().ids.extend(range(100))  # 500 ids: past max_excluded too
    with pytest.raises(RequestError) as refused:
        parse_search(request, view, Limits(max_batch=4, max_excluded=10))
    assert refused.value.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "exclude_per_query has 5 entries, more than the batch limit of 4" in str(refused.value)
