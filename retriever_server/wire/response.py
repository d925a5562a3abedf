"""A `SearchResponse` written straight to protobuf wire bytes, and read straight from them, for
responses of many neighbours.

Building a `SearchResponse` copies every array into the message and serializing copies it again:
for 1024 queries x 1024 neighbours (12 MB) that costs about 40 ms, as much as a shard's search. This
writes the same message (fields in field-number order, as protobuf itself writes them) with the arrays
copied once, by `bytes.join`. Servers register `add_retriever_servicer`, whose Search serializer
passes such bytes through and serializes messages as usual; clients parse them as any SearchResponse.

Reading is the same story backwards: parsing copies every array out of the received bytes, and
reading a Tensor's `data` copies it again. `decode_search_response` reads the fields in place and
gives arrays that are views of the received bytes (for a caller that hands them on, copied once
where a view would be misaligned); `retriever_stub` is a Retriever stub whose Search answers with it.
Answers under IN_PLACE_BYTES go to protobuf's parser, in C, quicker there than reading in Python. Anything off the
common path (a message field sent twice, to be merged; bytes that do not parse) goes to protobuf's
own parser, so both read every message alike.
"""

from __future__ import annotations

import functools

import grpc
import numpy as np

from retrieval.v1 import retriever_pb2 as pb
from retrieval.v1 import retriever_pb2_grpc as pb_grpc
from retriever_server.wire.result import SearchResult
from retriever_server.wire.tensors import TensorError, dtype_code, nbytes, numpy_dtype

_VARINT, _FIXED64, _LENGTH, _FIXED32 = 0, 1, 2, 5  # wire types
_ONE_BYTE = tuple(bytes((v,)) for v in range(128))  # the varints of 0..127: field keys, small sizes and shapes
IN_PLACE_BYTES = 1 << 15  # answers this large are read in place (64 x 1024 neighbours: 14 us against 68 parsed)
_DTYPE_KEY, _SHAPE_KEY, _DATA_KEY = b"\x08", b"\x12", b"\x1a"  # a Tensor's fields 1 (varint), 2 and 3 (bytes)


def _varint(value: int) -> bytes:
    if 0 <= value < 128:
        return _ONE_BYTE[value]
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _key(field: int, wire_type: int) -> bytes:
    return _varint(field << 3 | wire_type)


def _field(field: int, parts: list) -> list:
    """A length-delimited field holding `parts` (bytes or buffers)."""
    size = sum(len(p) if isinstance(p, bytes) else p.nbytes for p in parts)
    return [_key(field, _LENGTH), _varint(size), *parts]


def _text(field: int, text: str) -> list:
    return _field(field, [text.encode()]) if text else []


def _tensor(field: int, array: np.ndarray) -> list:
    """Tensor {dtype = 1; repeated int64 shape = 2 (packed); bytes data = 3} as field `field`: its
    header bytes, then the array's own buffer (not copied here)."""
    code = dtype_code(array.dtype)
    data = np.ascontiguousarray(array, dtype=numpy_dtype(code))  # little-endian, C order
    shape = b"".join([_varint(int(s)) for s in array.shape])
    head = _DTYPE_KEY + _varint(code)
    if shape:
        head += _SHAPE_KEY + _varint(len(shape)) + shape
    if not data.nbytes:
        return [_key(field, _LENGTH), _varint(len(head)), head]
    head += _DATA_KEY + _varint(data.nbytes)
    return [_key(field, _LENGTH), _varint(len(head) + data.nbytes), head, memoryview(data).cast("B")]


def encode_search_response(result: SearchResult) -> bytes:
    """The wire bytes of `result.to_proto()`, arrays copied once."""
    parts = [*_tensor(1, result.ids), *_tensor(2, result.distances)]
    for name, array in result.payloads.items():  # map entries: {string key = 1; Tensor value = 2}
        parts += _field(3, [*_text(1, name), *_tensor(2, array)])
    if result.keys is not None:
        parts += _tensor(4, result.keys)
    if result.partial:
        parts += [_key(5, _VARINT), b"\x01"]
    for shard, reason in sorted(result.failed_shards.items()):
        parts += _field(6, [*_text(1, shard), *_text(2, reason)])
    parts += _text(7, result.datastore_version)
    if result.successor_ids is not None:
        parts += _tensor(8, result.successor_ids)
    for name, array in result.successor_payloads.items():
        parts += _field(9, [*_text(1, name), *_tensor(2, array)])
    if result.successor_keys is not None:
        parts += _tensor(10, result.successor_keys)
    return b"".join(parts)


def _serialize_request(request: pb.SearchRequest | bytes) -> bytes:
    return request if isinstance(request, bytes) else request.SerializeToString()


def _serialize_search(response: pb.SearchResponse | bytes) -> bytes:
    return response if isinstance(response, bytes) else response.SerializeToString()


class _Unusual(Exception):
    """Bytes the in-place reader leaves to protobuf's parser: merged fields, groups, damage."""


def _read_varint(raw: memoryview, at: int) -> tuple[int, int]:
    """The varint at `at` (as an unsigned 64-bit value) and the position after it."""
    value = shift = 0
    while True:
        if at >= len(raw) or shift > 63:
            raise _Unusual
        byte = raw[at]
        value |= (byte & 0x7F) << shift
        at += 1
        if byte < 0x80:
            return value & 0xFFFFFFFFFFFFFFFF, at
        shift += 7


def _fields(raw: memoryview, start: int, end: int):
    """(field number, wire type, value) of each field of the message in raw[start:end]: a varint's
    value, or the (start, end) of a length-delimited field; fixed-size fields are skipped."""
    at = start
    while at < end:
        key, at = _read_varint(raw, at)
        number, wire = key >> 3, key & 7
        if wire == _VARINT:
            value, at = _read_varint(raw, at)
        elif wire == _LENGTH:
            size, at = _read_varint(raw, at)
            value, at = (at, at + size), at + size
        elif wire in (_FIXED64, _FIXED32):
            value, at = None, at + (8 if wire == _FIXED64 else 4)
        else:
            raise _Unusual
        if at > end or number == 0:
            raise _Unusual
        if value is not None:
            yield number, wire, value


def _signed(value: int) -> int:
    return value - (1 << 64) if value >= 1 << 63 else value


def _tensor_view(raw: memoryview, span: tuple[int, int], name: str, aligned: bool) -> np.ndarray:
    """The Tensor message in raw[span] as an array over the same bytes (copied when `aligned` asks
    and it is not); checked as `from_tensor` checks."""
    code, shape, data, seen = 0, [], (0, 0), set()
    for number, wire, value in _fields(raw, *span):
        if number == 1 and wire == _VARINT:
            code = _signed(value)
        elif number == 2 and wire == _LENGTH:
            at = value[0]
            while at < value[1]:
                dim, at = _read_varint(raw, at)
                shape.append(_signed(dim))
            if at != value[1]:
                raise _Unusual
        elif number == 2 and wire == _VARINT:  # a shape written unpacked
            shape.append(_signed(value))
        elif number == 3 and wire == _LENGTH:
            data = value
        elif number in (1, 3):
            raise _Unusual  # a known field of the wrong wire type: protobuf's error to give
        else:
            continue
        if number != 2 and number in seen:
            raise _Unusual  # sent twice: protobuf keeps the last, which the parser tells exactly
        seen.add(number)
    if code == 0:
        raise TensorError(f"{name}.dtype is unset")
    if not -(1 << 31) <= code < 1 << 31:
        raise _Unusual
    try:
        dtype = numpy_dtype(code)
    except TensorError as err:
        raise TensorError(f"{name}.dtype: {err}") from None
    if any(s < 0 for s in shape):
        raise TensorError(f"{name}.shape {shape} has a negative dimension")
    size, expected = data[1] - data[0], nbytes(dtype, shape)
    if size != expected:
        raise TensorError(f"{name}.data has {size} bytes but shape {shape} of {dtype.name} needs {expected}")
    array = np.frombuffer(raw, dtype=dtype, count=expected // dtype.itemsize, offset=data[0])
    if aligned and not array.flags.aligned:
        array = array.copy()
        array.flags.writeable = False
    return array.reshape(shape)


def _text_of(raw: memoryview, span: tuple[int, int]) -> str:
    try:
        return bytes(raw[span[0]:span[1]]).decode("utf-8")
    except UnicodeDecodeError:
        raise _Unusual from None


def _pair(raw: memoryview, span: tuple[int, int]) -> tuple[str, tuple[int, int] | None]:
    """A map entry or a ShardFailure: field 1's text and field 2's span (None when absent)."""
    first, second, seen = "", None, set()
    for number, wire, value in _fields(raw, *span):
        if number in (1, 2):
            if wire != _LENGTH or number in seen:
                raise _Unusual
            seen.add(number)
            if number == 1:
                first = _text_of(raw, value)
            else:
                second = value
    return first, second


def _read_response(raw: memoryview, aligned: bool) -> SearchResult:
    """The SearchResponse in `raw`, read in place; _Unusual where protobuf's parser must decide."""
    tensors = {1: "ids", 2: "distances", 4: "keys", 8: "successor_ids", 10: "successor_keys"}
    found: dict[str, np.ndarray] = {}
    maps: dict[int, dict[str, np.ndarray]] = {3: {}, 9: {}}
    partial, failures, version, seen = False, [], "", set()
    for number, wire, value in _fields(raw, 0, len(raw)):
        expected = _VARINT if number == 5 else _LENGTH
        if number > 10:
            continue  # unknown: skipped, as protobuf skips it
        if wire != expected:
            raise _Unusual
        if number in tensors:
            if number in seen:
                raise _Unusual  # a message sent twice is merged: protobuf's parser does that
            found[tensors[number]] = _tensor_view(raw, value, tensors[number], aligned)
        elif number in maps:
            key, span = _pair(raw, value)
            name = f"{'payloads' if number == 3 else 'successor_payloads'}[{key}]"
            if span is None:
                raise TensorError(f"{name}.dtype is unset")
            maps[number][key] = _tensor_view(raw, span, name, aligned)
        elif number == 5:
            partial = value != 0
        elif number == 6:
            shard, span = _pair(raw, value)
            failures.append((shard, _text_of(raw, span) if span is not None else ""))
        elif number == 7:
            version = _text_of(raw, value)
        seen.add(number)
    for name in ("ids", "distances"):
        if name not in found:
            raise TensorError(f"{name}.dtype is unset")
    keys, successor_keys = found.get("keys"), found.get("successor_keys")
    return SearchResult(found["ids"], found["distances"], payloads=maps[3],
                        keys=keys.astype(np.float32, copy=False) if keys is not None else None,
                        partial=partial, failed_shards=dict(failures), datastore_version=version,
                        successor_ids=found.get("successor_ids"), successor_payloads=maps[9],
                        successor_keys=successor_keys.astype(np.float32, copy=False)
                        if successor_keys is not None else None)


def decode_search_response(raw: bytes, aligned: bool = True) -> SearchResult:
    """The SearchResult of a SearchResponse's wire bytes, as `SearchResult.from_proto` of the parsed
    message gives it, its arrays read-only views of `raw`: copied where misaligned, unless `aligned`
    is False (a router, whose merge copies them anyway).

    Raises:
        DecodeError: bytes that do not parse (protobuf's own error).
        TensorError: a tensor that is not an array (no dtype, a size that does not match its shape).
    """
    if len(raw) >= IN_PLACE_BYTES:
        try:
            return _read_response(memoryview(raw).cast("B"), aligned)
        except _Unusual:
            pass
    return SearchResult.from_proto(pb.SearchResponse.FromString(raw))


def retriever_stub(channel, aligned: bool = True) -> pb_grpc.RetrieverStub:
    """A Retriever stub on `channel` (blocking or asyncio) whose Search takes a SearchRequest or its
    wire bytes (a router's, forwarded) and answers with a SearchResult read by
    `decode_search_response(raw, aligned)`, not a SearchResponse: bytes that do not parse fail the
    call as any stub's do (INTERNAL)."""
    stub = pb_grpc.RetrieverStub(channel)
    read = decode_search_response if aligned else functools.partial(decode_search_response, aligned=False)
    stub.Search = channel.unary_unary("/retrieval.v1.Retriever/Search", request_serializer=_serialize_request,
                                      response_deserializer=read, _registered_method=True)
    return stub


def add_retriever_servicer(servicer, server: grpc.aio.Server) -> None:
    """`add_RetrieverServicer_to_server`, taking each request as its wire bytes (the servicer parses
    them, so bytes that do not parse get INVALID_ARGUMENT rather than gRPC's UNKNOWN), with a Search
    that may answer with `encode_search_response` bytes."""
    handlers = {
        "Search": grpc.unary_unary_rpc_method_handler(servicer.Search, response_serializer=_serialize_search),
        "GetInfo": grpc.unary_unary_rpc_method_handler(servicer.GetInfo,
                                                       response_serializer=pb.InfoResponse.SerializeToString),
    }
    name = pb.DESCRIPTOR.services_by_name["Retriever"].full_name
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(name, handlers),))
    server.add_registered_method_handlers(name, handlers)
