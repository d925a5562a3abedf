"""The rows each query of a request must not retrieve, read from the wire into flat arrays.

A request excludes rows twice over: `exclude`, for every query, and `exclude_per_query`, one entry per
query. `Exclusions` holds both without a Python object per query: the request-wide part as one
`ExclusionKey`, and every query's own ids and ranges in two sorted arrays, query q's values offset by
q * SPAN (row ids stay below SPAN), so that one sort, one merge and one `searchsorted` serve the whole
batch. `ExclusionKey` is one query's exclusion on its own, hashable, for searches that need a selector.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

import numpy as np

from retrieval.v1 import retriever_pb2 as pb

SPAN = np.int64(1) << 40  # query q's ids and ranges are offset by q * SPAN
LAST = SPAN - 1  # row ids are below this (larger ones are in no datastore): a gap between queries' spans


class ExclusionError(ValueError):
    """An exclusion that is not valid; the message names the field."""


def sorted_unique(values: np.ndarray) -> np.ndarray:
    """The distinct values, ascending (by sorting: cheaper than numpy's hash table for these sizes)."""
    values = np.sort(values)
    return values[np.r_[True, values[1:] != values[:-1]]] if len(values) else values


def merge_ranges(ranges) -> np.ndarray:
    """Sorted, non-empty, non-overlapping [start, end) ranges (m, 2) int64 covering the same ids as
    `ranges` (adjacent ones joined)."""
    r = np.asarray(ranges, dtype=np.int64).reshape(-1, 2)
    r = r[r[:, 1] > r[:, 0]]
    if len(r) == 0:
        return r
    r = r[np.argsort(r[:, 0], kind="stable")]
    reach = np.maximum.accumulate(r[:, 1])
    first = np.flatnonzero(np.r_[True, r[1:, 0] > reach[:-1]])  # the first range of each merged run
    return np.stack([r[first, 0], np.maximum.reduceat(r[:, 1], first)], axis=1)


def _clip_ranges(ranges: np.ndarray, lo, hi) -> np.ndarray:
    """The parts of sorted, disjoint ranges (m, 2) inside [lo, hi) (scalars, or one bound per range)."""
    clipped = np.stack([np.maximum(ranges[:, 0], lo), np.minimum(ranges[:, 1], hi)], axis=1)
    return clipped[clipped[:, 1] > clipped[:, 0]]


@dataclass(frozen=True)
class ExclusionKey:
    """One query's exclusion: sorted unique ids and merged [start, end) ranges, kept as int64 bytes so
    that queries excluding the same rows are grouped (and searched together) by a cheap hash."""

    id_bytes: bytes = b""
    range_bytes: bytes = b""

    @classmethod
    def of(cls, ids=(), ranges=()) -> ExclusionKey:
        return cls(sorted_unique(np.asarray(ids, dtype=np.int64)).tobytes(), merge_ranges(ranges).tobytes())

    @property
    def ids(self) -> np.ndarray:
        """(n,) int64, sorted, unique."""
        return np.frombuffer(self.id_bytes, dtype=np.int64)

    @property
    def ranges(self) -> np.ndarray:
        """(m, 2) int64 [start, end), sorted, disjoint."""
        return np.frombuffer(self.range_bytes, dtype=np.int64).reshape(-1, 2)

    def __bool__(self) -> bool:
        return bool(self.id_bytes or self.range_bytes)

    def union(self, other: ExclusionKey) -> ExclusionKey:
        if not self:
            return other
        if not other:
            return self
        return ExclusionKey.of(np.concatenate([self.ids, other.ids]), np.concatenate([self.ranges, other.ranges]))

    def within(self, lo: int, hi: int) -> ExclusionKey:
        """The part of the exclusion among ids [lo, hi) (a shard's rows)."""
        ids = self.ids
        return ExclusionKey(ids[(ids >= lo) & (ids < hi)].tobytes(), _clip_ranges(self.ranges, lo, hi).tobytes())

    def rows(self) -> int:
        """How many rows it covers, at most (an id inside a range counts twice)."""
        ranges = self.ranges
        return len(self.ids) + int((ranges[:, 1] - ranges[:, 0]).sum())


NO_EXCLUSION = ExclusionKey()
_NO_IDS = np.zeros(0, dtype=np.int64)  # shared by every Exclusions that excludes nothing: never written
_NO_IDS.flags.writeable = False
_NO_RANGES = np.zeros((0, 2), dtype=np.int64)
_NO_RANGES.flags.writeable = False


def _exclusion_key(message: pb.Exclusion, field: str) -> ExclusionKey:
    """One Exclusion message, checked."""
    ranges = np.array([(r.start, r.end) for r in message.ranges], dtype=np.int64).reshape(-1, 2)
    ids = np.array(message.ids, dtype=np.int64)
    _check(ids, ranges, lambda _: field, lambda i: f"{field}.ranges[{i}]")
    return ExclusionKey.of(ids, ranges) if len(ids) or len(ranges) else NO_EXCLUSION


def _check(ids: np.ndarray, ranges: np.ndarray, ids_field, range_field) -> None:
    """Raises ExclusionError naming the first negative id or backwards range (fields by flat index)."""
    negative = np.flatnonzero(ids < 0)
    if len(negative):
        raise ExclusionError(f"{ids_field(negative[0])}.ids must be non-negative row ids")
    bad = np.flatnonzero((ranges[:, 0] < 0) | (ranges[:, 1] < ranges[:, 0]))
    if len(bad):
        start, end = ranges[bad[0]]
        raise ExclusionError(f"{range_field(bad[0])} must satisfy 0 <= start <= end, got [{start}, {end})")


@dataclass(frozen=True, eq=False)
class Exclusions:
    """Every query's exclusions: `common` for all of them, and each query's own, offset by q * SPAN in
    `ids` (n,) ascending and unique, and `ranges` (m, 2) ascending and disjoint."""

    nq: int
    common: ExclusionKey = NO_EXCLUSION
    ids: np.ndarray = field(default_factory=lambda: _NO_IDS)
    ranges: np.ndarray = field(default_factory=lambda: _NO_RANGES)

    @classmethod
    def parse(cls, request: pb.SearchRequest, nq: int, check_only: bool = False) -> Exclusions | None:
        """Reads `exclude` and `exclude_per_query` (of nq entries, or none); raises ExclusionError.
        With `check_only` (a router, which forwards the fields as they are) returns None once they
        are checked."""
        common = _exclusion_key(request.exclude, "exclude")
        per_query = request.exclude_per_query
        id_counts = np.array([len(e.ids) for e in per_query], dtype=np.int64)
        range_counts = np.array([len(e.ranges) for e in per_query], dtype=np.int64)
        ids = np.fromiter(itertools.chain.from_iterable(e.ids for e in per_query), np.int64, int(id_counts.sum()))
        ends = np.fromiter(itertools.chain.from_iterable((r.start, r.end) for e in per_query for r in e.ranges),
                           np.int64, 2 * int(range_counts.sum())).reshape(-1, 2)
        id_query = np.repeat(np.arange(len(per_query)), id_counts)
        range_query = np.repeat(np.arange(len(per_query)), range_counts)
        first_range = np.cumsum(range_counts) - range_counts

        def id_field(i: int) -> str:
            return f"exclude_per_query[{id_query[i]}]"

        def range_field(i: int) -> str:
            return f"exclude_per_query[{range_query[i]}].ranges[{i - first_range[range_query[i]]}]"

        _check(ids, ends, id_field, range_field)
        if check_only:
            return None
        keep = ids < LAST
        offset_ids = sorted_unique(id_query[keep] * SPAN + ids[keep])
        offset_ranges = merge_ranges(np.minimum(ends, LAST) + (range_query * SPAN)[:, None])
        return cls(nq, common, offset_ids, offset_ranges)

    def __bool__(self) -> bool:
        return bool(self.common) or len(self.ids) > 0 or len(self.ranges) > 0

    def within(self, lo: int, hi: int) -> Exclusions:
        """The parts among ids [lo, hi) (a shard's rows)."""
        if not self:
            return self
        local = self.ids % SPAN
        base = self.ranges[:, 0] // SPAN * SPAN
        return Exclusions(self.nq, self.common.within(lo, hi), self.ids[(local >= lo) & (local < hi)],
                          _clip_ranges(self.ranges, base + lo, base + hi))

    def rows(self) -> np.ndarray:
        """(nq,) int64: how many rows each query excludes, at most."""
        per_query = np.bincount(self.ids // SPAN, minlength=self.nq)
        per_query += np.bincount(self.ranges[:, 0] // SPAN, weights=self.ranges[:, 1] - self.ranges[:, 0],
                                 minlength=self.nq).astype(np.int64)
        return per_query + self.common.rows()

    def lone_ranges(self, rows: np.ndarray) -> np.ndarray:
        """(len(rows), 2) int64: the one range query rows[i] excludes, or (-1, -1) when its exclusion is
        anything else (ids, several ranges, a request-wide part)."""
        out = np.full((len(rows), 2), -1, dtype=np.int64)
        if self.common:
            return out
        range_query = self.ranges[:, 0] // SPAN
        lone = (np.bincount(range_query, minlength=self.nq)[rows] == 1) & \
            (np.bincount(self.ids // SPAN, minlength=self.nq)[rows] == 0)
        at = np.searchsorted(range_query, rows[lone])
        out[lone] = self.ranges[at] - (rows[lone] * SPAN)[:, None]
        return out

    def side_by_side(self, rows: np.ndarray, width: int) -> tuple[np.ndarray, np.ndarray]:
        """Query rows[i]'s exclusion (its own and the request-wide one), moved to ids
        [i * width, (i + 1) * width): every id and range must be below `width` (within a shard, its
        end). Returns ids (n,) ascending and unique, and ranges (m, 2) ascending and disjoint, so that
        one bitmap of len(rows) * width bits holds every query's."""
        place = np.full(self.nq, -1, dtype=np.int64)
        place[rows] = np.arange(len(rows))
        id_place = place[self.ids // SPAN]
        ids = id_place * width + self.ids % SPAN
        range_place = place[self.ranges[:, 0] // SPAN]
        ranges = self.ranges % SPAN + (range_place * width)[:, None]
        ids, ranges = ids[id_place >= 0], ranges[range_place >= 0]
        if self.common:
            starts = (np.arange(len(rows)) * width)[:, None]
            ids = np.concatenate([ids, (starts + self.common.ids).ravel()])
            ranges = np.concatenate([ranges, (starts[:, :, None] + self.common.ranges).reshape(-1, 2)])
        return sorted_unique(ids), merge_ranges(ranges)

    def key(self, q: int) -> ExclusionKey:
        """Query q's whole exclusion (its own and the request-wide one)."""
        lo, hi = q * SPAN, (q + 1) * SPAN
        ids = self.ids[np.searchsorted(self.ids, lo):np.searchsorted(self.ids, hi)] - lo
        ranges = self.ranges[np.searchsorted(self.ranges[:, 0], lo):np.searchsorted(self.ranges[:, 0], hi)] - lo
        return self.common.union(ExclusionKey(ids.tobytes(), ranges.tobytes()))

    def mask(self, rows: np.ndarray, ids: np.ndarray) -> np.ndarray:
        """(len(rows), m) bool: whether candidate ids[i, j] is excluded for query rows[i]."""
        present = ids >= 0
        mask = np.zeros(ids.shape, dtype=bool)
        for sorted_ids, sorted_ranges, candidates in (
                (self.common.ids, self.common.ranges, ids),
                (self.ids, self.ranges, ids + (rows * SPAN)[:, None])):
            if len(sorted_ids):
                at = np.minimum(np.searchsorted(sorted_ids, candidates), len(sorted_ids) - 1)
                mask |= sorted_ids[at] == candidates
            if len(sorted_ranges):
                at = np.searchsorted(sorted_ranges[:, 0], candidates, side="right") - 1
                mask |= (at >= 0) & (candidates < sorted_ranges[np.maximum(at, 0), 1])
        return mask & present
