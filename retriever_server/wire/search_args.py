"""A Search request built from a client's numpy arguments: `make_request` and the `Exclude` rows it takes.

The client checks only what the request's fields can carry (integers, 32 bits); the servers check
the ranges that make sense (`request.parse_search`).

Example:
    >>> request = make_request(queries, k=10, exclude=Exclude(ids=[3], ranges=[(100, 200)]))
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from retrieval.v1 import retriever_pb2 as pb
from retriever_server.wire.tensors import fill_tensor


@dataclass(frozen=True)
class Exclude:
    """Rows a query must not retrieve: single ids and half-open [start, end) ranges."""

    ids: Sequence[int] = ()
    ranges: Sequence[tuple[int, int]] = ()

    def to_proto(self) -> pb.Exclusion:
        """The Exclusion message; TypeError naming `ids[i]` or `ranges[i]` where one is not an integer (pair),
        ValueError naming it where one does not fit the message's int64."""
        ids = self.ids.tolist() if isinstance(self.ids, np.ndarray) else list(self.ids)
        ranges = self.ranges.tolist() if isinstance(self.ranges, np.ndarray) else list(self.ranges)
        for i, pair in enumerate(ranges):
            if isinstance(pair, str | bytes) or not isinstance(pair, Sequence | np.ndarray) or len(pair) != 2 \
                    or not all(_is_int(end) for end in pair):
                raise TypeError(f"Exclude.ranges[{i}] must be a (start, end) pair of integers, got {pair!r:.60}")
            if not all(_INT64[0] <= end <= _INT64[1] for end in pair):
                raise ValueError(f"Exclude.ranges[{i}] must fit in 64 bits (an int64), got "
                                 f"({_shown(pair[0])}, {_shown(pair[1])})")
        bad = next((i for i, value in enumerate(ids) if not _is_int(value)), None)
        if bad is not None:
            raise TypeError(f"Exclude.ids[{bad}] must be an integer, got {ids[bad]!r:.60}")
        if ids and not _INT64[0] <= min(ids) <= max(ids) <= _INT64[1]:
            bad = next(i for i, value in enumerate(ids) if not _INT64[0] <= value <= _INT64[1])
            raise ValueError(f"Exclude.ids[{bad}] must fit in 64 bits (an int64), got {_shown(ids[bad])}")
        return pb.Exclusion(ids=ids, ranges=[pb.IdRange(start=s, end=e) for s, e in ranges])


_INT64 = (-(1 << 63), (1 << 63) - 1)  # the ids an Exclusion carries


def _shown(value: int) -> str:
    """An integer for a message: in digits, unless it has too many of them to show."""
    return str(value) if int(value).bit_length() <= 256 else f"an integer of {int(value).bit_length()} bits"


def _is_int(value: object) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def make_request(queries: np.ndarray, k: int = 10, nprobe: int = 0, exact_rerank: bool = False,
                 rerank_candidates: int = 0, payloads: Sequence[str] = (), return_keys: bool = False,
                 exclude: Exclude | None = None, exclude_per_query: Sequence[Exclude] | None = None,
                 allow_partial: bool = False, expected_version: str = "", successors: int = 0) -> pb.SearchRequest:
    """Builds a SearchRequest from a numpy (nq, d) array (float64 is sent as float32); TypeError or
    ValueError naming the argument for a count that is not an integer the request can carry."""
    _check_counts(k=k, nprobe=nprobe, rerank_candidates=rerank_candidates, successors=successors)
    if isinstance(payloads, str):  # one name, not its letters
        raise TypeError(f"payloads must be a list of names, got the string {payloads!r:.60}: write [{payloads!r:.60}]")
    queries = np.asarray(queries)
    if queries.dtype.kind == "f" and queries.dtype.itemsize == 8:  # float64, whatever its byte order
        queries = queries.astype(np.float32)
    request = pb.SearchRequest(
        k=k, nprobe=nprobe, exact_rerank=exact_rerank,
        rerank_candidates=rerank_candidates, payloads=list(payloads), return_keys=return_keys,
        exclude=exclude.to_proto() if exclude else None,
        exclude_per_query=[e.to_proto() for e in exclude_per_query or ()],
        allow_partial=allow_partial, expected_datastore_version=expected_version, successors=successors,
    )
    fill_tensor(request.queries, queries)
    return request


MAX_TIMEOUT_S = 1e6  # a timeout past about 1e10 s overflows gRPC's deadline, which then fails every call at once


def check_timeout(timeout: object, name: str = "timeout") -> float | None:
    """`timeout` as seconds, None kept (no deadline); TypeError unless a number, ValueError unless positive
    and finite (0 would be a call that cannot succeed, not "the default")."""
    if timeout is None:
        return None
    if not isinstance(timeout, numbers.Real) or isinstance(timeout, bool):
        raise TypeError(f"{name} must be a number of seconds or None, got {timeout!r:.60}")
    if not 0 < timeout <= MAX_TIMEOUT_S:  # NaN fails it too
        raise ValueError(f"{name} must be a number of seconds in (0, {MAX_TIMEOUT_S:g}] (or None: no deadline), "
                         f"got {timeout!r:.40}")
    return float(timeout)


def _check_counts(**counts: object) -> None:
    """TypeError unless every count is an integer, ValueError unless it fits the request's int32 fields
    (the server checks the ranges that make sense: k within its max_k, ...)."""
    for name, value in counts.items():
        if not isinstance(value, numbers.Integral) or isinstance(value, bool):
            raise TypeError(f"{name} must be an integer, got {value!r}")
        if not -2 ** 31 <= value < 2 ** 31:
            raise ValueError(f"{name} must fit in 32 bits, got {value}")
