"""`encode_search_response` writes what protobuf writes for the same SearchResponse, and servers that
answer with those bytes are read by any client as ordinary SearchResponses."""

from __future__ import annotations

import numpy as np
import pytest

from retrieval.v1 import retriever_pb2 as pb
from retriever_server.wire.response import encode_search_response
from retriever_server.wire.result import SearchResult


def result(nq: int, k: int, seed: int = 0, **more) -> SearchResult:
    rng = np.random.default_rng(seed)
    ids = rng.integers(-1, 2**40, (nq, k)).astype(np.int64)
    return SearchResult(ids, rng.standard_normal((nq, k)).astype(np.float32), datastore_version="v1", **more)


CASES = {
    "plain": result(3, 5),
    "empty batch": result(0, 5),
    "k of 0": result(4, 0),
    "large ids and 1024 x 1024": result(1024, 1024),
    "one payload with a row shape": result(2, 3, payloads={"tokens": np.arange(24, dtype=np.int32).reshape(2, 3, 4)}),
    "keys": result(2, 3, keys=np.ones((2, 3, 7), np.float32)),
    "partial, failures, unicode": result(1, 2, partial=True, failed_shards={"shard-00001": "down: connexion refusée",
                                                                            "shard-00000": ""}),
    "no version": SearchResult(np.zeros((1, 1), np.int64), np.zeros((1, 1), np.float32)),
    "successors": result(2, 3, payloads={"values": np.arange(6, dtype=np.int32).reshape(2, 3)},
                         keys=np.ones((2, 3, 4), np.float32),
                         successor_ids=np.arange(12, dtype=np.int64).reshape(2, 3, 2),
                         successor_payloads={"values": np.arange(12, dtype=np.int32).reshape(2, 3, 2)},
                         successor_keys=np.full((2, 3, 2, 4), 0.5, np.float32)),
}


@pytest.mark.parametrize("name", list(CASES))
def test_bytes_equal_protobufs_serialization(name):
    r = CASES[name]
    encoded = encode_search_response(r)
    assert encoded == r.to_proto().SerializeToString()
    back = SearchResult.from_proto(pb.SearchResponse.FromString(encoded))
    assert np.array_equal(back.ids, r.ids) and np.array_equal(back.distances, r.distances)
    assert back.failed_shards == r.failed_shards and back.partial == r.partial


def test_several_payloads_parse_to_the_same_message():
    """Map entries have no fixed order on the wire: the parsed messages are equal."""
    r = result(3, 4, payloads={"values": np.arange(12, dtype=np.int32).reshape(3, 4),
                               "tokens": np.zeros((3, 4, 2), np.int64), "flags": np.ones((3, 4), bool)})
    parsed = pb.SearchResponse.FromString(encode_search_response(r))
    assert parsed == r.to_proto()
    back = SearchResult.from_proto(parsed)
    assert all(np.array_equal(back.payloads[n], a) and back.payloads[n].dtype == a.dtype for n, a in r.payloads.items())


def test_big_endian_and_strided_arrays_are_written_little_endian_and_contiguous():
    ids = np.arange(20, dtype=">i8").reshape(4, 5)[:, ::2]  # big-endian, not contiguous
    r = SearchResult(ids, np.arange(12, dtype=np.float32).reshape(4, 3))
    assert encode_search_response(r) == r.to_proto().SerializeToString()
    assert np.array_equal(SearchResult.from_proto(pb.SearchResponse.FromString(encode_search_response(r))).ids, ids)
