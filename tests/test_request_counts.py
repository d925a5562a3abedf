"""A Search request's repeated fields counted from its wire bytes, before protobuf parses them: refused
with the same status and message as the parsed request's checks, and without parsing it."""

from __future__ import annotations

import grpc
import numpy as np
import pytest

from retrieval.v1 import retriever_pb2 as pb
from retriever_server.serving.service import decode_search
from retriever_server.wire.request import DatastoreView, Limits, RequestError, parse_search
from retriever_server.wire.request_counts import check_wire_counts, field_budget
from retriever_server.wire.search_args import Exclude, make_request

LIMITS = Limits(max_batch=8, max_payloads=2, max_excluded=6, max_excluded_ranges=5)
VIEW = DatastoreView(dimension=4, nlist=8, default_nprobe=2, has_keys=True, payload_row_bytes={"a": 4, "b": 4},
                     version="v")


def refusal(check) -> tuple[str, str]:
    with pytest.raises(RequestError) as refused:
        check()
    return refused.value.code.name, refused.value.message


@pytest.mark.parametrize("request_of", [
    lambda q: make_request(q, k=2, payloads=["a", "b", "a"]),
    lambda q: make_request(q, k=2, exclude=Exclude(ids=range(7))),
    lambda q: make_request(q, k=2, exclude_per_query=[Exclude(ids=[1, 2])] * 4),
    lambda q: make_request(q, k=2, exclude=Exclude(ranges=[(i, i + 1) for i in range(0, 12, 2)])),
    lambda q: make_request(q, k=2, exclude_per_query=[Exclude(ranges=[(1, 2), (3, 4)])] * 3),
], ids=["payloads", "ids", "ids-per-query", "ranges", "ranges-per-query"])
def test_counts_past_a_limit_are_refused_as_the_parsed_request_is(request_of):
    raw = request_of(np.zeros((4, 4), dtype=np.float32)).SerializeToString()
    parsed = refusal(lambda: parse_search(pb.SearchRequest.FromString(raw), VIEW, LIMITS))
    assert refusal(lambda: check_wire_counts(raw, LIMITS, uncounted_bytes=0)) == parsed


def test_more_per_query_exclusions_than_queries_allowed_are_refused_unparsed(monkeypatch):
    """Empty per-query exclusions, two bytes each on the wire, took 20 times their size once parsed
    (16 MiB of them: 320 MiB) before the batch limit was checked; a request past it is now refused
    without being parsed at all."""
    raw = make_request(np.zeros((2, 4), dtype=np.float32), k=2).SerializeToString() + b"\x4a\x00" * (1 << 20)

    def never(_raw):
        raise AssertionError("parsed")

    monkeypatch.setattr(pb.SearchRequest, "FromString", never)
    code, message = refusal(lambda: decode_search(raw, Limits()))
    assert code == "RESOURCE_EXHAUSTED"
    assert message.startswith(f"the request holds over {field_budget(Limits())} fields")
    nine = raw[:-2 * ((1 << 20) - 9)]  # 9 entries: one too many
    code, message = refusal(lambda: check_wire_counts(nine, LIMITS, uncounted_bytes=0))
    assert (code, message) == ("INVALID_ARGUMENT", "exclude_per_query has 9 entries, more than the batch limit of 8 "
                                                   "queries: give one entry per query")


def test_a_long_shape_in_the_leading_queries_is_counted():
    """The fast path passed the leading queries' field whole, its shape too: 8 MiB of one-byte shape
    entries took 128 MiB parsed. Only the queries' data passes uncounted now."""
    from google.protobuf.internal.encoder import _VarintBytes

    shape = b"\x01" * (2 << 20)  # 2 MiB of dimensions, past the 1 MiB counted from
    tensor = b"\x12" + _VarintBytes(len(shape)) + shape
    raw = b"\x0a" + _VarintBytes(len(tensor)) + tensor + b"\x10\x02"
    assert refusal(lambda: check_wire_counts(raw, Limits())) == \
        ("INVALID_ARGUMENT", f"queries has a shape of {len(shape)} dimensions; give (nq, d)")
    data = make_request(np.zeros((4096, 128), dtype=np.float32), k=2).SerializeToString()  # 2 MiB of data alone
    check_wire_counts(data, LIMITS)


@pytest.mark.parametrize("tail, words", [
    (b"\x08\x01" * 10, "exclude_per_query"),  # ids written unpacked: each id its own field
    (b"\x12\x00" * 10, "ranges"),
])
def test_unpacked_ids_and_empty_ranges_are_counted(tail, words):
    entry = b"\x4a" + bytes([len(tail)]) + tail  # one exclude_per_query entry holding them
    raw = make_request(np.zeros((1, 4), dtype=np.float32), k=2).SerializeToString() + entry
    code, message = refusal(lambda: check_wire_counts(raw, LIMITS, uncounted_bytes=0))
    assert code == "RESOURCE_EXHAUSTED" and message.startswith("the request excludes 10 ")


def test_a_request_within_the_limits_passes_and_one_that_does_not_read_is_refused():
    """And one with few bytes besides its queries is not counted (a few MiB parsed at most). One counted
    whose bytes the count cannot read is refused: an empty unknown group (2 bytes, which protobuf's parser
    takes) ahead of 16 M empty per-query exclusions let them be parsed whole, 586 MiB, before any limit."""
    many = make_request(np.zeros((1, 4), dtype=np.float32), k=2, payloads=["a"] * 5).SerializeToString()
    check_wire_counts(many, LIMITS)  # parse_search refuses it
    raw = make_request(np.zeros((4, 4), dtype=np.float32), k=2, payloads=["a"], exclude=Exclude(ids=[1]),
                       exclude_per_query=[Exclude(ranges=[(2, 3)])] * 4).SerializeToString()
    check_wire_counts(raw, LIMITS, uncounted_bytes=0)
    unreadable = ("INVALID_ARGUMENT", "the request does not read as a SearchRequest as protobuf writes one "
                                      "(damaged bytes, or a group field)")
    assert refusal(lambda: check_wire_counts(b"\xff\xff\xff", LIMITS, uncounted_bytes=0)) == unreadable
    with pytest.raises(RequestError) as refused:
        decode_search(b"\xff\xff\xff", LIMITS)  # uncounted (3 bytes): protobuf's parser refuses it
    assert refused.value.code == grpc.StatusCode.INVALID_ARGUMENT
    grouped = make_request(np.zeros((1, 4), dtype=np.float32), k=2).SerializeToString() + b"\x7b\x7c" + \
        b"\x4a\x00" * (1 << 20)  # field 15 as an empty group, then 1 M empty per-query exclusions
    pb.SearchRequest.FromString(grouped)  # protobuf takes it whole
    assert refusal(lambda: decode_search(grouped, Limits())) == unreadable
