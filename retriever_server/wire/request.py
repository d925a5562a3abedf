"""A Search request, checked: every bad field becomes a `RequestError` naming that field.

The shard server and the router check requests the same way, so a client gets the same status and
message whether it talks to one shard or to the router in front of many.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import grpc
import numpy as np

from retrieval.v1 import retriever_pb2 as pb
from retriever_server.wire.exclusions import ExclusionError, Exclusions
from retriever_server.wire.tensors import TensorError, from_tensor, shown_shape
from retriever_server.wire.untrusted import safe_text

MAX_QUERY_ABS = 1e15  # a query component's largest magnitude: d * (1e15)^2 stays far inside float32 for any d


@dataclass(frozen=True)
class Limits:
    """Bounds a server enforces on each request, checked before any search, and on the work it holds
    at once. A request past one is refused naming the limit: with INVALID_ARGUMENT where a value itself is
    out of range (k, rerank candidates, successors, a string's length), else with RESOURCE_EXHAUSTED (queries,
    bytes, exclusions, payloads, work in flight).

    Attributes:
        max_k: neighbours per query (and re-rank candidates per query).
        max_batch: queries in one request.
        max_neighbours: nq x k, and nq x rerank_candidates, of one request.
        max_request_bytes: the size of one request on the wire.
        max_inflight: requests served at once.
        max_excluded, max_excluded_ranges: excluded ids, and id ranges, in one request.
        max_excluded_per_query, max_excluded_ranges_per_query: what one query excludes (its own
            exclusion and the request-wide one together).
        max_payloads: payload names in one request.
        max_string: characters of a payload name or of expected_datastore_version.
        max_response_bytes: ids, distances, payloads and keys of one answer (successors' included).
        max_successors: rows after each neighbour returned with it (`successors`).
    """

    max_k: int = 2048
    max_batch: int = 16384
    max_neighbours: int = 4 * 1024 * 1024
    max_request_bytes: int = 256 * 1024 * 1024
    max_inflight: int = 64
    max_excluded: int = 16384
    max_excluded_ranges: int = 16384
    max_excluded_per_query: int = 32
    max_excluded_ranges_per_query: int = 4
    max_payloads: int = 16
    max_string: int = 256
    max_response_bytes: int = 768 * 1024 * 1024
    max_successors: int = 16


@dataclass(frozen=True)
class DatastoreView:
    """What a request is checked against: the served datastore's shape and contents."""

    dimension: int
    nlist: int
    default_nprobe: int
    has_keys: bool
    payload_row_bytes: dict[str, int]  # bytes of one row of each payload, by name
    version: str

    @property
    def payload_names(self) -> frozenset[str]:
        return frozenset(self.payload_row_bytes)


@dataclass(frozen=True)
class SearchSpec:
    """A checked Search request; `queries` is float32 (nq, d)."""

    queries: np.ndarray
    k: int
    nprobe: int
    exact_rerank: bool
    rerank_candidates: int
    payloads: tuple[str, ...]
    return_keys: bool
    exclusions: Exclusions | None  # None: checked, not kept (a router's)
    allow_partial: bool
    successors: int = 0  # rows after each neighbour returned with it

    @property
    def nq(self) -> int:
        return int(self.queries.shape[0])

    @property
    def candidates(self) -> int:
        """How many neighbours to fetch before exact re-ranking trims them to k."""
        return max(self.k, self.rerank_candidates) if self.exact_rerank else self.k


class RequestError(Exception):
    """A request the server refuses, with the gRPC status code to refuse it with."""

    def __init__(self, code: grpc.StatusCode, message: str, busy: bool = False, stale: bool = False):
        super().__init__(message)
        self.code = code
        self.message = message
        self.busy = busy  # refused for the work in flight, not for the request: another replica may take it
        self.stale = stale  # refused for the datastore version this server has: another replica may have the one asked


def _invalid(message: str) -> RequestError:
    return RequestError(grpc.StatusCode.INVALID_ARGUMENT, message)


def parse_queries(tensor: pb.Tensor, view: DatastoreView, limits: Limits, present: bool) -> np.ndarray:
    """Checks the queries tensor and returns it as float32 (nq, d)."""
    if not present:
        raise _invalid("queries is required")
    if tensor.dtype not in (pb.DTYPE_FLOAT32, pb.DTYPE_FLOAT16):
        name = pb.DType.Name(tensor.dtype) if tensor.dtype in pb.DType.values() else str(tensor.dtype)
        raise _invalid(f"queries.dtype must be DTYPE_FLOAT32 or DTYPE_FLOAT16, got {name}")
    if len(tensor.shape) != 2:
        raise _invalid(f"queries.shape must be (nq, d), got {shown_shape(tensor.shape)}")
    nq, d = int(tensor.shape[0]), int(tensor.shape[1])
    if nq == 0:
        raise _invalid("queries is an empty batch (nq = 0)")
    if nq > limits.max_batch:
        raise RequestError(
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            f"queries has {nq} rows, over the batch limit of {limits.max_batch}",
        )
    if d != view.dimension:
        raise _invalid(f"queries has dimension {d} but the datastore has dimension {view.dimension}")
    try:
        array = from_tensor(tensor, "queries")
    except TensorError as err:
        raise _invalid(str(err)) from None
    array = np.ascontiguousarray(array, dtype=np.float32)
    if not (array.min() >= -MAX_QUERY_ABS and array.max() <= MAX_QUERY_ABS):  # NaN fails it too; no copy made
        bad = ~(np.abs(array) <= MAX_QUERY_ABS).all(axis=1)
        row = int(np.flatnonzero(bad)[0])
        raise _invalid(f"queries contains NaN, Inf or a component over {MAX_QUERY_ABS:.0e} in absolute value "
                       f"(first in row {row}): its distances would overflow float32")
    return array


def _exhausted(message: str) -> RequestError:
    return RequestError(grpc.StatusCode.RESOURCE_EXHAUSTED, message)


def _check_ints(k: int, nprobe: int, rerank: bool, candidates: int, view: DatastoreView, limits: Limits):
    if k <= 0 or k > limits.max_k:
        raise _invalid(f"k must be in [1, {limits.max_k}], got {k}")
    if nprobe < 0 or nprobe > max(view.nlist, 1):
        raise _invalid(f"nprobe must be in [1, {max(view.nlist, 1)}] (or 0 for the default), got {nprobe}")
    if candidates < 0 or candidates > limits.max_k or (candidates and candidates < k):
        raise _invalid(f"rerank_candidates must be 0 or in [k={k}, {limits.max_k}], got {candidates}")
    if rerank and not view.has_keys:
        raise RequestError(
            grpc.StatusCode.FAILED_PRECONDITION,
            "exact_rerank needs stored keys, and this datastore was built without them (--keep-keys)",
        )


def _check_exclusion_counts(request: pb.SearchRequest, limits: Limits) -> None:
    """The exclusion limits, by counting alone (before any exclusion is read)."""
    if not request.exclude_per_query and not request.HasField("exclude"):
        return
    per_query, common = request.exclude_per_query, request.exclude
    if len(per_query) > limits.max_batch:  # before any count over its entries, which grows with them
        raise _invalid(f"exclude_per_query has {len(per_query)} entries, more than the batch limit of "
                       f"{limits.max_batch} queries: give one entry per query")
    total = len(common.ids) + sum(len(e.ids) for e in per_query)
    if total > limits.max_excluded:
        raise _exhausted(f"the request excludes {total} ids, over the limit of {limits.max_excluded}")
    ranges = len(common.ranges) + sum(len(e.ranges) for e in per_query)
    if ranges > limits.max_excluded_ranges:
        raise _exhausted(f"the request excludes {ranges} id ranges, over the limit of {limits.max_excluded_ranges}")
    most_ids = len(common.ids) + max((len(e.ids) for e in per_query), default=0)
    if most_ids > limits.max_excluded_per_query:
        raise _exhausted(f"a query excludes {most_ids} ids, over the limit of {limits.max_excluded_per_query} "
                         "per query")
    most_ranges = len(common.ranges) + max((len(e.ranges) for e in per_query), default=0)
    if most_ranges > limits.max_excluded_ranges_per_query:
        raise _exhausted(f"a query excludes {most_ranges} id ranges, over the limit of "
                         f"{limits.max_excluded_ranges_per_query} per query")


@functools.lru_cache(maxsize=64)
def _no_exclusions(nq: int) -> Exclusions:
    """The Exclusions of nq queries that exclude nothing (immutable: shared by the requests of that size)."""
    return Exclusions(nq)


def parse_exclusions(request: pb.SearchRequest, nq: int, limits: Limits, check_only: bool = False) -> Exclusions | None:
    """Every query's exclusions: the request-wide one and each query's own (None: only checked)."""
    if len(request.exclude_per_query) not in (0, nq):
        raise _invalid(f"exclude_per_query has {len(request.exclude_per_query)} entries but there are {nq} queries")
    if not request.exclude_per_query and not request.HasField("exclude"):
        return None if check_only else _no_exclusions(nq)  # nothing to read
    _check_exclusion_counts(request, limits)
    try:
        return Exclusions.parse(request, nq, check_only)
    except ExclusionError as err:
        raise _invalid(str(err)) from None


def _check_response_size(request: pb.SearchRequest, nq: int, view: DatastoreView, limits: Limits) -> None:
    if nq * request.k * 12 * (1 + request.successors) <= limits.max_response_bytes and not request.payloads \
            and not request.return_keys:
        return  # ids and distances alone, and a bound on their bytes within the limit: no more to count
    per_row = sum(view.payload_row_bytes[name] for name in set(request.payloads))
    per_row += 4 * view.dimension if request.return_keys else 0
    per_neighbour = 12 + per_row + max(0, request.successors) * (8 + per_row)
    size = nq * request.k * per_neighbour
    if size > limits.max_response_bytes:
        raise RequestError(
            grpc.StatusCode.RESOURCE_EXHAUSTED,
            f"the answer would take {size >> 20} MiB (nq={nq}, k={request.k}, payloads and keys), over the "
            f"limit of {limits.max_response_bytes >> 20} MiB; split the batch",
        )


def _check_strings(request: pb.SearchRequest, view: DatastoreView, limits: Limits) -> None:
    """The string fields: their number and length, then what they name (untrusted: shown shortened)."""
    version = request.expected_datastore_version
    if len(version) > limits.max_string:
        raise _invalid(f"expected_datastore_version has {len(version)} characters, over {limits.max_string}")
    if version and version != view.version:
        raise RequestError(
            grpc.StatusCode.FAILED_PRECONDITION,
            f"expected_datastore_version is {safe_text(version)} but this datastore is version {view.version}",
            stale=True,
        )
    if len(request.payloads) > limits.max_payloads:
        raise _exhausted(f"payloads names {len(request.payloads)} payloads, over the limit of {limits.max_payloads}")
    for name in request.payloads:
        if len(name) > limits.max_string:
            raise _invalid(f"payloads names a payload of {len(name)} characters, over {limits.max_string}")
        if name not in view.payload_names:
            raise _invalid(f"payloads names unknown payload {safe_text(name)}; this datastore has "
                           f"{sorted(view.payload_names)}")


def _check_work(nq: int, request: pb.SearchRequest, limits: Limits) -> None:
    """nq x k and nq x rerank candidates, the number of neighbours a search scores and ranks."""
    most = nq * max(request.k, request.rerank_candidates if request.exact_rerank else 0)
    if most > limits.max_neighbours:
        raise _exhausted(f"the request asks for {most} neighbours (nq={nq} x k or rerank_candidates), over the "
                         f"limit of {limits.max_neighbours}; split the batch")


def parse_search(request: pb.SearchRequest, view: DatastoreView, limits: Limits,
                 read_exclusions: bool = True) -> SearchSpec:
    """Checks a SearchRequest against the datastore and the limits, every limit before any query is
    read; raises RequestError. Without `read_exclusions` (a router, which forwards them to its shards)
    exclusions are checked but not kept: `exclusions` is None."""
    _check_strings(request, view, limits)
    nq = int(request.queries.shape[0]) if len(request.queries.shape) == 2 else 0
    _check_ints(request.k, request.nprobe, request.exact_rerank, request.rerank_candidates, view, limits)
    if not 0 <= request.successors <= limits.max_successors:
        raise _invalid(f"successors must be in [0, {limits.max_successors}], got {request.successors}")
    _check_work(nq, request, limits)
    _check_exclusion_counts(request, limits)
    if request.return_keys and not view.has_keys:
        raise RequestError(
            grpc.StatusCode.FAILED_PRECONDITION,
            "return_keys needs stored keys, and this datastore was built without them (--keep-keys)",
        )
    _check_response_size(request, nq, view, limits)  # nq of a shape that is not (nq, d) is 0: refused below
    queries = parse_queries(request.queries, view, limits, request.HasField("queries"))
    return SearchSpec(
        queries=queries,
        k=int(request.k),
        nprobe=int(request.nprobe) or view.default_nprobe,
        exact_rerank=bool(request.exact_rerank),
        rerank_candidates=int(request.rerank_candidates),
        payloads=tuple(dict.fromkeys(request.payloads)),
        return_keys=bool(request.return_keys),
        exclusions=parse_exclusions(request, queries.shape[0], limits, check_only=not read_exclusions),
        allow_partial=bool(request.allow_partial),
        successors=int(request.successors),
    )
