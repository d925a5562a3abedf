"""`SearchResult`: neighbours as numpy arrays, and its conversion to and from a SearchResponse."""

from __future__ import annotations

from collections.abc import Container
from dataclasses import dataclass, field

import numpy as np

from retrieval.v1 import retriever_pb2 as pb
from retriever_server.wire.tensors import TensorError, fill_tensor, from_tensor, numpy_dtype, shape_bytes, shown_shape

KEY_DTYPES = (np.dtype("<f4"), np.dtype("<f2"))  # the keys an answer may carry (float16 is read as float32)


@dataclass
class SearchResult:
    """Neighbours of a batch of queries.

    Attributes:
        ids: int64 (nq, k) global row ids; -1 where fewer than k rows qualify.
        distances: float32 (nq, k), squared L2 (ascending) or inner product (descending).
        payloads: name -> (nq, k, *row_shape) arrays, zeros where the id is -1.
        keys: float32 (nq, k, d) stored keys, when asked for.
        partial: some shards did not answer (only with allow_partial).
        failed_shards: shard name -> reason, for the shards that did not answer.
        datastore_version: version of the datastore that answered.
        successor_ids: int64 (nq, k, n) ids of the n rows after each neighbour (-1: none), when asked for.
        successor_payloads: name -> (nq, k, n, *row_shape) payloads of those rows.
        successor_keys: float32 (nq, k, n, d) their stored keys, when keys were asked for too.
    """

    ids: np.ndarray
    distances: np.ndarray
    payloads: dict[str, np.ndarray] = field(default_factory=dict)
    keys: np.ndarray | None = None
    partial: bool = False
    failed_shards: dict[str, str] = field(default_factory=dict)
    datastore_version: str = ""
    successor_ids: np.ndarray | None = None
    successor_payloads: dict[str, np.ndarray] = field(default_factory=dict)
    successor_keys: np.ndarray | None = None

    def to_proto(self) -> pb.SearchResponse:
        response = pb.SearchResponse(
            partial=self.partial,
            datastore_version=self.datastore_version,
            failed_shards=[pb.ShardFailure(shard=s, reason=r) for s, r in sorted(self.failed_shards.items())],
        )
        fill_tensor(response.ids, self.ids)
        fill_tensor(response.distances, self.distances)
        for name, array in self.payloads.items():
            fill_tensor(response.payloads[name], array)
        if self.keys is not None:
            fill_tensor(response.keys, self.keys)
        if self.successor_ids is not None:
            fill_tensor(response.successor_ids, self.successor_ids)
        for name, array in self.successor_payloads.items():
            fill_tensor(response.successor_payloads[name], array)
        if self.successor_keys is not None:
            fill_tensor(response.successor_keys, self.successor_keys)
        return response

    @classmethod
    def from_proto(cls, response: pb.SearchResponse) -> SearchResult:
        return cls(
            ids=from_tensor(response.ids, "ids"),
            distances=from_tensor(response.distances, "distances"),
            payloads={name: from_tensor(t, f"payloads[{name}]") for name, t in response.payloads.items()},
            keys=float_keys(from_tensor(response.keys, "keys"), "keys") if response.HasField("keys") else None,
            partial=response.partial,
            failed_shards={f.shard: f.reason for f in response.failed_shards},
            datastore_version=response.datastore_version,
            successor_ids=from_tensor(response.successor_ids, "successor_ids")
            if response.HasField("successor_ids") else None,
            successor_payloads={name: from_tensor(t, f"successor_payloads[{name}]")
                                for name, t in response.successor_payloads.items()},
            successor_keys=float_keys(from_tensor(response.successor_keys, "successor_keys"), "successor_keys")
            if response.HasField("successor_keys") else None,
        )


def float_keys(array: np.ndarray, name: str) -> np.ndarray:
    """An answer's keys as float32; TensorError for keys of another dtype (uint8 keys widened would take 4x
    their bytes in the caller's memory)."""
    if array.dtype not in KEY_DTYPES:
        raise TensorError(f"{name}.dtype is {array.dtype.name}: keys travel as float32 or float16")
    return array.astype(np.float32, copy=False)


PayloadRows = dict[str, tuple[np.dtype, tuple[int, ...]]]  # payload name -> (dtype, row shape)


def payload_rows(info: pb.InfoResponse, names: Container[str] | None = None) -> PayloadRows:
    """The dtype and row shape of each payload (of those `names`, when given) that a shard's GetInfo
    describes; TensorError for one no array has."""
    rows = {}
    for payload in info.payloads:
        if names is None or payload.name in names:
            dtype, row_shape = numpy_dtype(payload.dtype), payload.row_shape
            shape_bytes(row_shape, dtype, f"payloads[{payload.name}].row_shape")
            rows[payload.name] = (dtype, tuple(row_shape))
    return rows


@dataclass(frozen=True)
class AnswerShape:
    """What the answer to one Search request must hold: its arrays' dtypes and leading dimensions, the
    payloads asked for and nothing else, keys and successors when asked for, partial only when allowed;
    where the datastore is known (`rows`, `dimension`, from its shards' GetInfo), each payload's dtype and
    row shape and the keys' width too, so that answers merged together agree. A caller checks a server's
    answer with `check` before it trusts it (a merge, an LM worker indexing by it); the check compares
    dtypes and shapes alone, never the arrays' values."""

    nq: int
    k: int
    payloads: tuple[str, ...] = ()
    keys: bool = False
    successors: int = 0
    partial: bool = False  # whether the answer may be partial (some shards missing)
    rows: PayloadRows | None = None  # each payload's dtype and row shape (None: any)
    dimension: int = 0  # the keys' width (0: any)

    @classmethod
    def of(cls, request: pb.SearchRequest, info: pb.InfoResponse | None = None) -> AnswerShape:
        """The shape of the answer to `request`, as a server answers it; with the payloads' dtypes and row
        shapes and the keys' width of the datastore that a shard's GetInfo `info` describes, when given."""
        nq = int(request.queries.shape[0]) if len(request.queries.shape) else 0
        payloads = tuple(dict.fromkeys(request.payloads))
        rows, dimension = (None, 0) if info is None else (payload_rows(info, payloads), int(info.dimension))
        return cls(nq, int(request.k), payloads, bool(request.return_keys), int(request.successors),
                   bool(request.allow_partial), rows, dimension)

    def check(self, result: SearchResult) -> SearchResult:
        """`result` itself; TensorError naming the first field that is not what the request asked for."""
        if result.partial and not self.partial:
            raise TensorError("the answer is partial, but its request did not allow one (allow_partial)")
        rows, grown = (self.nq, self.k), (self.nq, self.k, self.successors)
        width, more = ((self.dimension,), 0) if self.dimension else ((), 1)  # the keys' last dimension
        _expect(result.ids, "ids", rows, 0, np.int64)
        _expect(result.distances, "distances", rows, 0, np.float32)
        _expect_named(result.payloads, "payloads", self.payloads, rows, self.rows)
        if self.keys != (result.keys is not None):
            raise TensorError("keys " + ("are missing" if self.keys else "were not asked for"))
        if result.keys is not None:
            _expect(result.keys, "keys", (*rows, *width), more, np.float32)
        successors = bool(self.successors)
        if successors != (result.successor_ids is not None):
            raise TensorError("successor_ids " + ("are missing" if successors else "were not asked for"))
        if result.successor_ids is not None:
            _expect(result.successor_ids, "successor_ids", grown, 0, np.int64)
        _expect_named(result.successor_payloads, "successor_payloads", self.payloads if successors else (), grown,
                      self.rows)
        if (self.keys and successors) != (result.successor_keys is not None):
            raise TensorError("successor_keys " + ("are missing" if self.keys and successors else
                                                   "were not asked for"))
        if result.successor_keys is not None:
            _expect(result.successor_keys, "successor_keys", (*grown, *width), more, np.float32)
            if result.successor_keys.shape[-1] != result.keys.shape[-1]:
                raise TensorError(f"successor_keys.shape {shown_shape(result.successor_keys.shape)} is not as wide "
                                  f"as keys.shape {shown_shape(result.keys.shape)}")
        return result


def _expect(array: np.ndarray, name: str, leading: tuple[int, ...], more: int | None,
            dtype: type | None = None) -> None:
    """TensorError unless `array` starts with the dimensions `leading`, has `more` after them (None: any
    number), and has `dtype` (None: any)."""
    shape = array.shape
    if shape[:len(leading)] != leading or (more is not None and len(shape) != len(leading) + more):
        tail = "" if more is None else f" and {more} more" if more else " alone"
        raise TensorError(f"{name}.shape is {shown_shape(shape)}, expected {list(leading)}{tail}")
    if dtype is not None and array.dtype != dtype:
        raise TensorError(f"{name}.dtype is {array.dtype.name}, expected {np.dtype(dtype).name}")


def _expect_named(arrays: dict[str, np.ndarray], name: str, names: tuple[str, ...], leading: tuple[int, ...],
                  rows: PayloadRows | None) -> None:
    """TensorError unless `arrays` holds exactly `names`, each starting with the dimensions `leading` and,
    where `rows` are given, with its row shape after them and its dtype."""
    if set(arrays) != set(names):
        extra, missing = sorted(set(arrays) - set(names)), sorted(set(names) - set(arrays))
        raise TensorError(f"{name} holds {len(extra)} not asked for and lacks {missing[:8]}" if missing
                          else f"{name} holds {len(extra)} not asked for")
    for key in names:
        if rows is None:
            _expect(arrays[key], f"{name}[{key}]", leading, None)
        elif key not in rows:
            raise TensorError(f"{name}[{key}] is not a payload of this datastore")
        else:
            dtype, row_shape = rows[key]
            _expect(arrays[key], f"{name}[{key}]", (*leading, *row_shape), 0, dtype)
