"""A `SearchResponse` read straight from its wire bytes, its arrays views of those bytes.

Parsing a SearchResponse copies every array out of the received bytes, and reading a Tensor's `data`
copies it again: for 64 queries x 1024 neighbours that is 68 us of the router's CPU against 14 us
read in place. `decode_search_response` reads the fields where they lie, in two passes: the first
walks the whole message and its tensors' fields (where the bytes are damaged, or written in a way
protobuf's parser must settle: a field sent twice, a map key repeated, an over-long key or length,
an entry with a field of its own), the second checks the tensors in the order `SearchResult.from_proto`
checks them and makes the arrays. Whatever the first pass does not take goes to protobuf's parser,
so both read every message alike. Answers under IN_PLACE_BYTES go to the parser too: in C, it is
quicker than this reader in Python there.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from retrieval.v1 import retriever_pb2 as pb
from retriever_server.wire.result import SearchResult, float_keys
from retriever_server.wire.tensors import MAX_DIMS, checked_dtype
from retriever_server.wire.wire_scan import LENGTH, VARINT, WireError, fields, varint

IN_PLACE_BYTES = 1 << 15  # answers this large are read in place
_MAX_FIELDS = 1 << 16  # fields of one answer read here at most, all depths (a shard's answer has a few dozen)
_TENSORS = {1: "ids", 2: "distances", 4: "keys", 8: "successor_ids", 10: "successor_keys"}
_MAPS = {3: "payloads", 9: "successor_payloads"}


@dataclass
class _Tensor:
    """Where a Tensor message's fields lie: dtype code, shape, data span (defaults where absent)."""

    code: int = 0
    shape: list[int] = field(default_factory=list)
    data: tuple[int, int] = (0, 0)


def _signed(value: int) -> int:
    return value - (1 << 64) if value >= 1 << 63 else value


def _text(raw: memoryview, span: tuple[int, int]) -> str:
    try:
        return bytes(raw[span[0]:span[1]]).decode("utf-8")
    except UnicodeDecodeError:
        raise WireError from None


def _tensor(raw: memoryview, span: tuple[int, int], budget: list[int]) -> _Tensor:
    """Where the Tensor message in raw[span] keeps its fields (first pass: the structure alone)."""
    tensor, seen = _Tensor(), set()
    for number, wire, value in fields(raw, *span, budget):
        if number == 2 and wire == LENGTH:  # the shape, packed
            if value[1] - value[0] > 10 * MAX_DIMS:
                raise WireError
            at = value[0]
            while at < value[1]:
                dim, at = varint(raw, at)
                tensor.shape.append(_signed(dim))
            if at != value[1]:
                raise WireError
        elif number == 2 and wire == VARINT:  # a dimension written unpacked
            tensor.shape.append(_signed(value))
        elif (number, wire) in ((1, VARINT), (3, LENGTH)):
            if number in seen:
                raise WireError  # sent twice: the parser keeps the last
            seen.add(number)
            if number == 1:
                tensor.code = _signed(value)
            else:
                tensor.data = value
        elif number in (1, 3):
            raise WireError  # a known field of another wire type: the parser's to settle
        if len(tensor.shape) > MAX_DIMS:
            raise WireError
    if not -(1 << 31) <= tensor.code < 1 << 31:
        raise WireError  # an enum outside int32: the parser truncates it
    return tensor


def _pair(raw: memoryview, span: tuple[int, int], entry: bool, budget: list[int]) -> tuple[str, tuple[int, int] | None]:
    """A map entry (`entry`) or a ShardFailure: field 1's text and field 2's span (None when absent).
    An entry with any other field is the parser's to settle."""
    first, second, seen = "", None, set()
    for number, wire, value in fields(raw, *span, budget):
        if number not in (1, 2):
            if entry:
                raise WireError
            continue
        if wire != LENGTH or number in seen:
            raise WireError
        seen.add(number)
        if number == 1:
            first = _text(raw, value)
        else:
            second = value
    return first, second


@dataclass
class _Layout:
    """Where a SearchResponse keeps its fields (first pass)."""

    tensors: dict[int, _Tensor] = field(default_factory=dict)
    maps: dict[int, dict[str, _Tensor]] = field(default_factory=lambda: {3: {}, 9: {}})
    partial: bool = False
    failures: list[tuple[str, str]] = field(default_factory=list)
    version: str = ""


def _layout(raw: memoryview) -> _Layout:
    """The first pass over a whole SearchResponse: WireError unless every field reads plainly."""
    layout, budget = _Layout(), [_MAX_FIELDS]
    for number, wire, value in fields(raw, 0, len(raw), budget):
        if number > 10:
            continue  # unknown: skipped, as the parser skips it
        if wire != (VARINT if number == 5 else LENGTH):
            raise WireError
        if number in _TENSORS:
            if number in layout.tensors:
                raise WireError  # a message sent twice is merged: the parser does that
            layout.tensors[number] = _tensor(raw, value, budget)
        elif number in _MAPS:
            key, span = _pair(raw, value, True, budget)
            if key in layout.maps[number]:
                raise WireError  # the later entry replaces the earlier: the parser's to settle
            layout.maps[number][key] = _tensor(raw, span, budget) if span is not None else _Tensor()
        elif number == 5:
            layout.partial = value != 0
        elif number == 6:
            shard, span = _pair(raw, value, False, budget)
            layout.failures.append((shard, _text(raw, span) if span is not None else ""))
        elif number == 7:
            layout.version = _text(raw, value)
    return layout


def _array(raw: memoryview, tensor: _Tensor, name: str, aligned: bool) -> np.ndarray:
    """The array of a tensor read in the first pass, checked as `from_tensor` checks: a read-only view
    of `raw` (a copy where `aligned` asks and the view is not)."""
    size = tensor.data[1] - tensor.data[0]
    dtype = checked_dtype(tensor.code, tensor.shape, size, name)
    array = np.frombuffer(raw, dtype=dtype, count=size // dtype.itemsize, offset=tensor.data[0])
    if aligned and not array.flags.aligned:
        array = array.copy()
        array.flags.writeable = False
    return array.reshape(tensor.shape)


def _read(raw: memoryview, aligned: bool) -> SearchResult:
    layout = _layout(raw)

    def array(number: int) -> np.ndarray:
        return _array(raw, layout.tensors.get(number, _Tensor()), _TENSORS[number], aligned)

    def named(number: int) -> dict[str, np.ndarray]:
        return {key: _array(raw, t, f"{_MAPS[number]}[{key}]", aligned) for key, t in layout.maps[number].items()}

    ids, distances, payloads = array(1), array(2), named(3)  # from_proto's order
    keys = float_keys(array(4), "keys") if 4 in layout.tensors else None
    successor_ids = array(8) if 8 in layout.tensors else None
    successor_payloads = named(9)
    successor_keys = float_keys(array(10), "successor_keys") if 10 in layout.tensors else None
    return SearchResult(ids, distances, payloads=payloads, keys=keys, partial=layout.partial,
                        failed_shards=dict(layout.failures), datastore_version=layout.version,
                        successor_ids=successor_ids, successor_payloads=successor_payloads,
                        successor_keys=successor_keys)


def decode_search_response(raw: bytes, aligned: bool = True) -> SearchResult:
    """The SearchResult of a SearchResponse's wire bytes, as `SearchResult.from_proto` of the parsed
    message gives it; its arrays read-only, views of `raw` where it is read in place (copied where
    misaligned, unless `aligned` is False: for a router, whose merge copies them anyway). A view keeps
    the whole answer's bytes alive: copy an array to keep it alone.

    Raises:
        DecodeError: bytes that do not parse (protobuf's own error).
        TensorError: a tensor that is not an array (no dtype, a size that does not match its shape).
    """
    if len(raw) >= IN_PLACE_BYTES:
        try:
            return _read(memoryview(raw).cast("B"), aligned)
        except WireError:
            pass
    return SearchResult.from_proto(pb.SearchResponse.FromString(raw))
