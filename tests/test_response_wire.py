"""`encode_search_response` writes what protobuf writes for the same SearchResponse, and servers that
answer with those bytes are read by any client as ordinary SearchResponses."""

from __future__ import annotations

import numpy as np
import pytest

from retrieval.v1 import retriever_pb2 as pb
from retriever_server.wire import response as response_module
from retriever_server.wire.response import decode_search_response, encode_search_response
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


# --- reading: decode_search_response against protobuf's parser and from_proto ---------------------

def outcome(read, raw: bytes):
    """What reading `raw` gives: the result's fields, or the error's type (and message)."""
    try:
        r = read(raw)
    except Exception as err:  # noqa: BLE001 - the outcome compared is the error itself
        return ("error", type(err).__name__)
    arrays = {f: getattr(r, f) for f in ("ids", "distances", "keys", "successor_ids", "successor_keys")}
    arrays.update({f"payloads[{n}]": a for n, a in r.payloads.items()})
    arrays.update({f"successor_payloads[{n}]": a for n, a in r.successor_payloads.items()})
    return ({n: None if a is None else (a.dtype.str, a.shape, a.tobytes()) for n, a in arrays.items()},
            r.partial, r.failed_shards, r.datastore_version)


@pytest.fixture
def in_place(monkeypatch):
    """Every answer read in place, however small (small ones are otherwise parsed by protobuf)."""
    monkeypatch.setattr(response_module, "IN_PLACE_BYTES", 0)


def parsed(raw: bytes) -> SearchResult:
    return SearchResult.from_proto(pb.SearchResponse.FromString(raw))


@pytest.mark.parametrize("name", list(CASES))
def test_reading_in_place_gives_what_parsing_gives(name, in_place):
    r = CASES[name]
    for raw in (encode_search_response(r), r.to_proto().SerializeToString()):
        assert outcome(decode_search_response, raw) == outcome(parsed, raw)
        assert outcome(lambda b: decode_search_response(b, aligned=False), raw) == outcome(parsed, raw)
        back = decode_search_response(raw)
        assert back.ids.flags.aligned and back.distances.flags.aligned and not back.ids.flags.writeable
        assert np.array_equal(back.ids, r.ids) and back.failed_shards == r.failed_shards


def test_arrays_are_read_in_place_or_copied_once_to_align_them():
    r = result(64, 1024, payloads={"values": np.arange(64 * 1024, dtype=np.int32).reshape(64, 1024)})
    raw = encode_search_response(r)
    in_raw = np.frombuffer(raw, np.uint8)
    router = decode_search_response(raw, aligned=False)
    for array in (router.ids, router.distances, router.payloads["values"]):
        assert np.shares_memory(array, in_raw) and not array.flags.writeable
    client = decode_search_response(raw)
    for got, direct in [(client.ids, router.ids), (client.distances, router.distances),
                        (client.payloads["values"], router.payloads["values"])]:
        assert got.flags.aligned and not got.flags.writeable and np.array_equal(got, direct)
        assert np.shares_memory(got, in_raw) == direct.flags.aligned  # a view wherever one is aligned


def unknown_fields() -> bytes:
    """Fields 11 to 14 of every wire type (varint, fixed64, bytes, fixed32), which readers skip."""
    return b"\x58\x96\x01" + b"\x61" + bytes(8) + b"\x6a\x03abc" + b"\x75" + bytes(4)


ODD = {
    "unknown fields first and last": lambda r: unknown_fields() + encode_search_response(r) + unknown_fields(),
    "fields in reverse order": lambda r: b"".join(
        reversed([f.SerializeToString() for f in split_fields(r.to_proto())])),
    "two messages concatenated (merged)": lambda r: encode_search_response(r) + encode_search_response(result(2, 3, 7)),
    "ids sent twice": lambda r: encode_search_response(r) + pb.SearchResponse(ids=r.to_proto().ids).SerializeToString(),
    "version sent twice": lambda r: encode_search_response(r) + pb.SearchResponse(
        datastore_version="v2").SerializeToString(),
    "a shape written unpacked": lambda r: pb.SearchResponse(distances=r.to_proto().distances).SerializeToString()
    + b"\x0a" + bytes([len(unpacked(r.ids))]) + unpacked(r.ids),
    "truncated": lambda r: encode_search_response(r)[:-3],
    "a length past the end": lambda r: encode_search_response(r) + b"\x3a\x40ab",
    "a group": lambda r: encode_search_response(r) + b"\x5b\x5c",
    "field number 0": lambda r: b"\x00\x01" + encode_search_response(r),
    "ids as a varint": lambda r: b"\x08\x01" + encode_search_response(r)[0:0] + pb.SearchResponse(
        distances=r.to_proto().distances).SerializeToString(),
    "version not utf-8": lambda r: encode_search_response(r) + b"\x3a\x02\xff\xfe",
    "no ids": lambda r: pb.SearchResponse(distances=r.to_proto().distances).SerializeToString(),
    "a payload with no tensor": lambda r: encode_search_response(r) + b"\x1a\x03\x0a\x01x",
    "a size that does not match": lambda r: pb.SearchResponse(
        ids=pb.Tensor(dtype=pb.DTYPE_INT64, shape=[2, 3], data=bytes(40)),
        distances=r.to_proto().distances).SerializeToString(),
    "an unknown dtype": lambda r: pb.SearchResponse(ids=pb.Tensor(dtype=99, shape=[0]),
                                                    distances=r.to_proto().distances).SerializeToString(),
    "a negative dimension": lambda r: pb.SearchResponse(ids=pb.Tensor(dtype=pb.DTYPE_INT64, shape=[-1]),
                                                        distances=r.to_proto().distances).SerializeToString(),
}


def split_fields(message: pb.SearchResponse) -> list[pb.SearchResponse]:
    """One message per set field (per map entry, per repeated element)."""
    parts = []
    for descriptor, value in message.ListFields():
        if descriptor.message_type is not None and descriptor.message_type.GetOptions().map_entry:
            parts += [pb.SearchResponse(**{descriptor.name: {k: v}}) for k, v in value.items()]
        elif descriptor.name == "failed_shards":  # the one repeated field
            parts += [pb.SearchResponse(**{descriptor.name: [v]}) for v in value]
        else:
            parts.append(pb.SearchResponse(**{descriptor.name: value}))
    return parts


def unpacked(ids: np.ndarray) -> bytes:
    """The ids Tensor with its shape written as repeated varints (fields 2, wire type 0), not packed."""
    tensor = pb.Tensor(dtype=pb.DTYPE_INT64, data=ids.tobytes()).SerializeToString()
    return tensor + b"".join(b"\x10" + bytes([s]) for s in ids.shape)


@pytest.mark.parametrize("name", list(ODD))
def test_odd_and_damaged_messages_read_as_protobuf_reads_them(name, in_place):
    raw = ODD[name](CASES["partial, failures, unicode"])
    assert outcome(decode_search_response, raw) == outcome(parsed, raw)


def test_random_damage_reads_as_protobuf_reads_it(in_place):
    """Every byte of a small answer with every field set, flipped in turn, and random cuts and
    splices: the in-place reader and the parser agree on each (an equal result or the same error)."""
    raw = encode_search_response(CASES["successors"]) + encode_search_response(
        CASES["partial, failures, unicode"])[-60:]
    rng = np.random.default_rng(0)
    variants = [raw[:i] + bytes([raw[i] ^ int(rng.integers(1, 256))]) + raw[i + 1:] for i in range(len(raw))]
    variants += [raw[:int(rng.integers(len(raw)))] for _ in range(100)]
    variants += [raw[:int(a)] + raw[int(b):] for a, b in rng.integers(0, len(raw), (200, 2))]
    disagree = [v for v in variants if outcome(decode_search_response, v) != outcome(parsed, v)]
    assert not disagree, f"{len(disagree)} of {len(variants)} damaged answers read differently, e.g. {disagree[0]!r}"


def test_an_answer_that_does_not_read_fails_the_call_as_internal(in_place):
    """A server whose Search answer is not an array (a tensor shorter than its shape): the client's
    call fails with INTERNAL, as for bytes that do not parse, rather than with a stray exception."""
    from concurrent import futures

    import grpc

    from retriever_server.serving.client import RetrieverClient, RetrieverError

    damaged = pb.SearchResponse(ids=pb.Tensor(dtype=pb.DTYPE_INT64, shape=[1, 2], data=bytes(8)),
                                distances=pb.Tensor(dtype=pb.DTYPE_FLOAT32, shape=[1, 2], data=bytes(8)))
    calls = []

    def search(request: bytes, context) -> bytes:
        calls.append(len(request))
        return damaged.SerializeToString()

    server = grpc.server(futures.ThreadPoolExecutor(2))
    handler = grpc.method_handlers_generic_handler("retrieval.v1.Retriever",
                                                   {"Search": grpc.unary_unary_rpc_method_handler(search)})
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with RetrieverClient(f"127.0.0.1:{port}", timeout=10) as client:
            with pytest.raises(RetrieverError) as caught:
                client.search(np.zeros((1, 4), np.float32), k=2)
        assert caught.value.code == grpc.StatusCode.INTERNAL and calls
    finally:
        server.stop(0)


def test_small_answers_are_parsed_and_large_ones_read_in_place():
    small, large = encode_search_response(result(2, 3)), encode_search_response(result(64, 1024))
    assert len(small) < response_module.IN_PLACE_BYTES <= len(large)
    assert not np.shares_memory(decode_search_response(small, aligned=False).ids, np.frombuffer(small, np.uint8))
    assert np.shares_memory(decode_search_response(large, aligned=False).ids, np.frombuffer(large, np.uint8))
