"""A SearchRequest's repeated fields counted from its wire bytes, before protobuf parses it.

Protobuf's parser makes an object of every entry of a repeated field: two bytes on the wire (an empty
per-query exclusion, an empty payload name) become tens in memory, and a packed id of one byte takes
eight, so a request of `--max-request-mb` parsed whole could hold nearly 30 times that before any limit
was checked. `check_wire_counts` counts what grows so, and refuses a request past the limits that
`request.parse_search` applies to the parsed one, with the same statuses and messages. A request whose
bytes outside its queries' tensor are few (UNCOUNTED_BYTES) is not counted: parsed whole it takes about
29 MiB more at most (measured peak RSS of 1 MiB of per-query exclusions, each of one empty id range; 18 MiB
of empty ones, 20 MiB of empty ranges in one exclusion), 1.8 GiB over `max_inflight` (64) such requests,
within what as many requests of the largest size take; and counting in Python costs more than protobuf's
parse (11 us for 64 queries, against 2.7 us; 7.2 ms for 1024 queries of per-query exclusions, against 0.28 ms).
"""

from __future__ import annotations

import grpc

from retriever_server.wire.request import Limits, RequestError
from retriever_server.wire.wire_scan import LENGTH, VARINT, TooManyFields, WireError, fields, varint, varint_count

MAX_DIMS = 8  # dimensions of the queries' shape read here at most (a request's is (nq, d))
UNCOUNTED_BYTES = 1 << 20  # bytes outside the queries' tensor that a request may have and not be counted
_QUERIES, _PAYLOADS, _EXCLUDE, _EXCLUDE_PER_QUERY = 1, 6, 8, 9  # SearchRequest's field numbers
_SHAPE, _DATA, _IDS, _RANGES = 2, 3, 1, 2  # Tensor.shape and .data, Exclusion.ids and .ranges


def field_budget(limits: Limits) -> int:
    """The most fields, at every depth read here, that a request within `limits` can have."""
    return 64 + MAX_DIMS + limits.max_payloads + 2 * limits.max_batch + limits.max_excluded + \
        limits.max_excluded_ranges


def check_wire_counts(raw: bytes, limits: Limits, uncounted_bytes: int = UNCOUNTED_BYTES) -> None:
    """RequestError where the request's queries' dimensions, payload names, per-query exclusions, excluded
    ids or excluded ranges are past `limits`, or it holds more fields than any request within them; a
    request with at most `uncounted_bytes` besides its queries' tensor passes uncounted. A counted request
    whose bytes do not read here is refused (INVALID_ARGUMENT): protobuf's parser takes an unknown group,
    which a hand reading that left it to the parser would have let pass with everything after it uncounted."""
    view, budget = memoryview(raw), [field_budget(limits)]
    if len(view) - _leading_query_data(view) <= uncounted_bytes:
        return
    counts = {"dims": 0, "payloads": 0, "entries": 0, "ids": 0, "ranges": 0}
    try:
        for number, wire, value in fields(view, 0, len(view), budget):
            if number == _PAYLOADS:
                counts["payloads"] += 1
            elif number == _QUERIES and wire == LENGTH:
                counts["dims"] += _repeated(view, value, _SHAPE, budget)[0]
            elif number in (_EXCLUDE, _EXCLUDE_PER_QUERY) and wire == LENGTH:
                counts["entries"] += number == _EXCLUDE_PER_QUERY
                ids, ranges = _repeated(view, value, _IDS, budget)
                counts["ids"] += ids
                counts["ranges"] += ranges
    except TooManyFields:
        raise RequestError(grpc.StatusCode.RESOURCE_EXHAUSTED, f"the request holds over {field_budget(limits)} "
                           "fields, more than any request within this server's limits") from None
    except WireError:  # protobuf takes some of these (an unknown group) and parses the rest whole, uncounted
        raise RequestError(grpc.StatusCode.INVALID_ARGUMENT, "the request does not read as a SearchRequest as "
                           "protobuf writes one (damaged bytes, or a group field)") from None
    _check(counts, limits)


def _leading_query_data(view: memoryview) -> int:
    """The bytes of the queries' data where the queries come first, as every client writes them; else 0.
    Their shape is not data: each of its entries takes a byte on the wire and eight parsed."""
    try:
        key, at = varint(view, 0, 5)
        if key != (_QUERIES << 3 | LENGTH):
            return 0
        size, at = varint(view, at, 5)
        for number, wire, value in fields(view, at, min(at + size, len(view)), [MAX_DIMS + 8]):
            if number == _DATA and wire == LENGTH:
                return value[1] - value[0]
    except WireError:  # damage, or more fields than a tensor has: counted
        return 0
    return 0


def _repeated(view: memoryview, span: tuple[int, int], packed: int, budget: list[int]) -> tuple[int, int]:
    """In the message at `span`: the entries of field `packed` (a packed or unpacked repeated varint),
    and the entries of field 2 when `packed` is not 2 (Exclusion.ranges)."""
    values = messages = 0
    for number, wire, value in fields(view, *span, budget):
        if number == packed and wire == LENGTH:
            values += varint_count(view, value)
        elif number == packed and wire == VARINT:
            values += 1
        elif number == _RANGES and number != packed:
            messages += 1
    return values, messages


def _check(counts: dict[str, int], limits: Limits) -> None:
    """The refusals of `request.parse_search`, from the counts."""
    invalid, exhausted = grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED
    refusals = (  # in parse_search's order
        ("payloads", limits.max_payloads, exhausted, "payloads names {n} payloads, over the limit of {most}"),
        ("entries", limits.max_batch, invalid, "exclude_per_query has {n} entries, more than the batch limit of "
                                               "{most} queries: give one entry per query"),
        ("ids", limits.max_excluded, exhausted, "the request excludes {n} ids, over the limit of {most}"),
        ("ranges", limits.max_excluded_ranges, exhausted, "the request excludes {n} id ranges, over the limit of "
                                                          "{most}"),
        ("dims", MAX_DIMS, invalid, "queries has a shape of {n} dimensions; give (nq, d)"),
    )
    for name, most, code, words in refusals:
        if counts[name] > most:
            raise RequestError(code, words.format(n=counts[name], most=most))
