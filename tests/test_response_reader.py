"""`decode_search_response` reads a SearchResponse in place as protobuf's parser and `from_proto` read
it: the same arrays and fields, or the same error with the same message, on every message a shard
writes, on odd messages protobuf writes or accepts (fields in any order, merged, unpacked, unknown),
and on damaged bytes; its arrays are read-only views of the received bytes, aligned where asked."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
from test_response_wire import CASES, result

from retrieval.v1 import retriever_pb2 as pb
from retriever_server.wire import response_reader as reader_module
from retriever_server.wire.response import encode_search_response
from retriever_server.wire.response_reader import decode_search_response
from retriever_server.wire.result import SearchResult


def outcome(read, raw: bytes):
    """What reading `raw` gives: the result's fields, or the error's type (and message)."""
    try:
        r = read(raw)
    except Exception as err:  # noqa: BLE001 - the outcome compared is the error itself
        message = str(err)  # of several bad payloads, which one is named follows the map's order: not compared
        return ("error", type(err).__name__, "a payload" if "payloads[" in message.split(" ")[0] else message)
    arrays = {f: getattr(r, f) for f in ("ids", "distances", "keys", "successor_ids", "successor_keys")}
    arrays.update({f"payloads[{n}]": a for n, a in r.payloads.items()})
    arrays.update({f"successor_payloads[{n}]": a for n, a in r.successor_payloads.items()})
    return ({n: None if a is None else (a.dtype.str, a.shape, a.tobytes(), a.flags.writeable)
             for n, a in arrays.items()}, r.partial, r.failed_shards, r.datastore_version)


@pytest.fixture
def in_place(monkeypatch):
    """Every answer read in place, however small (small ones are otherwise parsed by protobuf)."""
    monkeypatch.setattr(reader_module, "IN_PLACE_BYTES", 0)


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
    "ids split over two fields": lambda r: encode_search_response(r) + b"\x0a\x02\x1a\x00",
    "a payload key twice, the first bad": lambda r: b"\x1a\x07\x0a\x01v\x12\x02\x08\x63" + pb.SearchResponse(
        payloads={"v": pb.Tensor(dtype=pb.DTYPE_INT32, shape=[1], data=bytes(4))}, ids=r.to_proto().ids,
        distances=r.to_proto().distances).SerializeToString(),
    "a bad tensor, then bytes cut short": lambda r: pb.SearchResponse(
        ids=pb.Tensor(dtype=pb.DTYPE_INT64, shape=[2], data=bytes(3))).SerializeToString() + b"\x3a\x05ab",
    "a key in 6 bytes": lambda r: b"\xba\x80\x80\x80\x80\x00\x00" + encode_search_response(r),
    "a length in 6 bytes": lambda r: b"\x3a\x80\x80\x80\x80\x80\x00" + encode_search_response(r),
    "field number 2^29": lambda r: b"\x80\x80\x80\x80\x10\x00" + encode_search_response(r),
    "an entry with a field of its own": lambda r: encode_search_response(r) + b"\x1a\x07\x0a\x01v\x12\x00\x18\x01",
    "an entry with a fixed64 of its own": lambda r: encode_search_response(r) + b"\x1a\x0e\x0a\x01v\x12\x00\x19"
    + bytes(8),
    "keys, float32": lambda r: encode_search_response(CASES["keys"]),
    "a shape of 100 dimensions": lambda r: encode_search_response(r) + pb.SearchResponse(
        payloads={"v": pb.Tensor(dtype=pb.DTYPE_UINT8, shape=[1] * 100, data=b"x")}).SerializeToString(),
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


def test_small_answers_are_parsed_and_large_ones_read_in_place():
    small, large = encode_search_response(result(2, 3)), encode_search_response(result(64, 1024))
    assert len(small) < reader_module.IN_PLACE_BYTES <= len(large)
    assert not np.shares_memory(decode_search_response(small, aligned=False).ids, np.frombuffer(small, np.uint8))
    assert np.shares_memory(decode_search_response(large, aligned=False).ids, np.frombuffer(large, np.uint8))


def generated_messages(count: int, seed: int) -> list[bytes]:
    """SearchResponses written field by field: tensors of several dtypes and shapes (packed, unpacked,
    split), map entries (repeated keys, missing values), failures, unknown fields of every wire type at
    every depth, over-long varints, fields in any order; then some concatenated, cut or flipped."""
    rng = np.random.default_rng(seed)
    dtypes = {pb.DTYPE_FLOAT32: 4, pb.DTYPE_FLOAT16: 2, pb.DTYPE_INT64: 8, pb.DTYPE_INT32: 4, pb.DTYPE_UINT8: 1}

    def chance(p: float) -> bool:
        return bool(rng.random() < p)

    def varint(value: int, extra: int = 0) -> bytes:
        value &= (1 << 64) - 1
        out = bytearray()
        while value >= 0x80 or extra:
            if value < 0x80:
                extra -= 1
            out.append(value & 0x7F | 0x80)
            value >>= 7
        return bytes(out) + bytes([value])

    def pad() -> int:
        return int(rng.integers(1, 6)) if chance(0.05) else 0

    def key(number: int, wire: int) -> bytes:
        return varint(number << 3 | wire, pad())

    def length_delimited(number: int, body: bytes) -> bytes:
        return key(number, 2) + varint(len(body), pad()) + body

    def unknown() -> bytes:
        number, wire = int(rng.choice([11, 15, 16, 2047, (1 << 29) - 1, 1 << 29])), int(rng.choice([0, 1, 2, 5]))
        return key(number, wire) + {0: varint(7), 1: bytes(8), 2: b"\x03abc", 5: bytes(4)}[wire]

    def shuffled(parts: list[bytes]) -> bytes:
        if chance(0.2):
            rng.shuffle(parts)
        return b"".join(parts)

    def tensor(code: int | None = None) -> bytes:
        code = code or int(rng.choice(list(dtypes)))
        shape = [int(s) for s in rng.integers(0, 4, int(rng.integers(0, 4)))]
        data = rng.bytes(int(np.prod(shape)) * dtypes[code]) if shape else rng.bytes(dtypes[code])
        if chance(0.05):
            data = data[:-1] if data else b"x"
        if chance(0.03):
            code = int(rng.choice([0, 13, -1, (1 << 32) + 1]))
        parts = [key(1, 0) + varint(code, pad())] if code or chance(0.3) else []
        if shape and chance(0.8):
            parts.append(length_delimited(2, b"".join(varint(d) for d in shape)))
        elif shape:
            parts += [key(2, 0) + varint(d) for d in shape]
        if chance(0.03):
            parts.append(key(2, 0) + varint(-1))
        if data or chance(0.2):
            parts.append(length_delimited(3, data))
        if chance(0.1):
            parts.append(unknown())
        if chance(0.03):
            parts.append(length_delimited(3, data) if chance(0.5) else key(1, 0) + varint(code))
        return shuffled(parts)

    def pair(first: bytes, second: bytes | None) -> bytes:
        parts = [length_delimited(1, first)] if chance(0.9) else []
        if second is not None:
            parts.append(length_delimited(2, second))
        if chance(0.05):
            parts.append(unknown())
        return shuffled(parts)

    def text() -> bytes:
        return str(rng.choice(["", "v1", "shard-00001", "é"])).encode() if chance(0.97) else b"\xff"

    def message() -> bytes:
        parts = [length_delimited(1, tensor(pb.DTYPE_INT64))] if chance(0.97) else []
        if chance(0.97):
            parts.append(length_delimited(2, tensor(pb.DTYPE_FLOAT32)))
        for number in (3, 9):
            for _ in range(int(rng.choice([0, 0, 1, 2]))):
                name = bytes(rng.choice([b"v", b"t", b""]))
                parts.append(length_delimited(number, pair(name, tensor() if chance(0.95) else None)))
        for number in (4, 10):
            if chance(0.3):
                parts.append(length_delimited(number, tensor(int(rng.choice([pb.DTYPE_FLOAT32, pb.DTYPE_FLOAT16])))))
        if chance(0.3):
            parts.append(length_delimited(8, tensor(pb.DTYPE_INT64)))
        if chance(0.3):
            parts.append(key(5, 0) + varint(int(rng.choice([0, 1, 2, 1 << 32]))))
        for _ in range(int(rng.choice([0, 0, 1, 2]))):
            parts.append(length_delimited(6, pair(text(), text() if chance(0.8) else None)))
        if chance(0.5):
            parts.append(length_delimited(7, text()))
        if chance(0.1):
            parts.append(unknown())
        return shuffled(parts)

    def damaged(raw: bytes) -> bytes:
        r = rng.random()
        if r < 0.5 or not raw:
            return raw
        if r < 0.7:
            return raw + message()
        at = int(rng.integers(len(raw)))
        if r < 0.85:
            return raw[:at] + bytes([raw[at] ^ int(rng.integers(1, 256))]) + raw[at + 1:]
        return raw[:at]

    return [damaged(message()) for _ in range(count)]


def test_generated_messages_read_as_protobuf_reads_them(in_place):
    messages = generated_messages(3000, seed=0)
    disagree = [raw for raw in messages if outcome(decode_search_response, raw) != outcome(parsed, raw)]
    kinds = Counter(outcome(parsed, raw)[1] if outcome(parsed, raw)[0] == "error" else "read" for raw in messages)
    assert min(kinds["read"], kinds["DecodeError"], kinds["TensorError"]) > 200, kinds  # each path well tried
    assert not disagree, f"{len(disagree)} of {len(messages)} read differently, e.g. {disagree[0].hex()}"


def test_an_answer_of_too_many_fields_is_left_to_the_parser(in_place):
    """Fields are counted over the whole answer, at every depth: past the limit the reader stops and
    protobuf's parser (in C) reads it, so a hostile answer of a million tiny fields costs what parsing
    costs. The answer read by the parser is no view of the received bytes."""
    tensor = pb.Tensor(dtype=pb.DTYPE_INT32, shape=[1], data=bytes(4)).SerializeToString() + b"\x58\x01" * 4000
    entry = [b"\x0a\x02p" + bytes([48 + i]) + b"\x12" + varint_bytes(len(tensor)) + tensor for i in range(20)]
    entries = b"".join(b"\x1a" + varint_bytes(len(e)) + e for e in entry)  # payloads p0 ... p19
    raw = encode_search_response(result(64, 64)) + entries  # about 80,000 fields
    back = decode_search_response(raw, aligned=False)
    assert not np.shares_memory(back.ids, np.frombuffer(raw, np.uint8)) and len(back.payloads) == 20
    assert outcome(decode_search_response, raw) == outcome(parsed, raw)
    few = encode_search_response(result(64, 64)) + entries[:len(entries) // 10]  # 2 entries: read in place
    assert np.shares_memory(decode_search_response(few, aligned=False).ids, np.frombuffer(few, np.uint8))


def varint_bytes(value: int) -> bytes:
    out = bytearray()
    while value >= 0x80:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    return bytes(out) + bytes([value])
