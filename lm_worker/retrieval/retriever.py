"""What both retrievers share: kNN-LM and RETRO look-ups of a batch of queries, blocking or as
futures, from a `SearchResult` turned into plain arrays."""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np

from lm_worker.retrieval.config import ChunkNeighbours, KnnNeighbours, Ranges, RetrievalConfig
from retriever_server.client import Exclude, SearchResult


def exclude_ranges(ranges: Ranges) -> list[Exclude] | None:
    """One `Exclude` per query from optional [start, end) ranges."""
    if ranges is None:
        return None
    return [Exclude(ranges=[r]) if r is not None else Exclude() for r in ranges]


def knn_neighbours(result: SearchResult) -> KnnNeighbours:
    """A kNN-LM datastore's answer as distances, next-token values (-1: no neighbour) and ids."""
    if "values" not in result.payloads:
        raise ValueError("the datastore has no 'values' payload: is it a kNN-LM datastore?")
    values = result.payloads["values"].astype(np.int64).reshape(result.ids.shape)
    values[result.ids < 0] = -1
    following = None
    if result.successor_ids is not None:
        following = result.successor_payloads["values"].astype(np.int64).reshape(result.successor_ids.shape)
        following[result.successor_ids < 0] = -1
    return KnnNeighbours(result.distances, values, result.ids, following, result.successor_ids,
                         result.keys, result.successor_keys)


class TooFewNeighbours(ValueError):
    """Some chunk queries found fewer than k neighbours: `short` holds their places among the `queries`
    of one request. The message names the first by its place, or, given the `total` chunks of a split
    whose request began at chunk `offset`, by its chunk (`in_split`)."""

    def __init__(self, short: np.ndarray, queries: int, k: int, offset: int = 0, total: int | None = None):
        self.short, self.queries, self.k, self.offset, self.total = short, queries, k, offset, total
        where = (f"query {int(short[0])}" if total is None
                 else f"chunk {offset + int(short[0])} of {total}, in the request of chunks {offset} to "
                      f"{offset + queries - 1}")
        super().__init__(f"{len(short)} of {queries} chunk queries found fewer than k={k} neighbours (first: "
                         f"{where}): search more lists (nprobe), exclude fewer rows, or ask for fewer "
                         "neighbours than the datastore holds")

    def __reduce__(self):  # pickled whole (a Ray task's error): its args are the message alone
        return TooFewNeighbours, (self.short, self.queries, self.k, self.offset, self.total)

    def in_split(self, offset: int, total: int) -> TooFewNeighbours:
        """The same shortfall, named by chunk in a split of `total` chunks whose request began at `offset`."""
        return TooFewNeighbours(self.short, self.queries, self.k, offset, total)


def chunk_neighbours(result: SearchResult) -> np.ndarray:
    """A RETRO datastore's answer as int64 (n, k, 2L) token ids: each neighbour chunk and its continuation.

    Raises:
        TooFewNeighbours: (a ValueError) some query found fewer than k neighbours. RETRO attends to k
            chunks; a missing one has no tokens (its payload reads as token 0), and nothing in the model
            tells it apart.
    """
    if "tokens" not in result.payloads:
        raise ValueError("the datastore has no 'tokens' payload: is it a RETRO datastore?")
    short = np.flatnonzero((result.ids < 0).any(axis=1))
    if len(short):
        raise TooFewNeighbours(short, len(result.ids), result.ids.shape[1])
    return result.payloads["tokens"].astype(np.int64)  # (n, k, 2L)


class Retriever:
    """kNN-LM and RETRO look-ups; a subclass implements `search` over its datastore.

    Attributes a subclass sets: `dimension`, `ntotal` and `metadata` (the datastore's manifest metadata).
    """

    config: RetrievalConfig
    dimension: int
    ntotal: int
    metadata: dict[str, str]

    def __init__(self, config: RetrievalConfig):
        self.config = config
        self.pool = ThreadPoolExecutor(2, thread_name_prefix="retrieval")
        self.closed = False

    def check_open(self) -> None:
        """RuntimeError once `close()` has run: a closed retriever answers nothing."""
        if self.closed:
            raise RuntimeError(f"the {type(self).__name__} is closed: make a new one")

    def search(self, queries: np.ndarray, payload: str, exclude: Ranges, successors: int = 0,
               return_keys: bool = False) -> SearchResult:
        """The `config.k` neighbours of float32 queries (n, d) with one payload (and, with `successors`,
        that payload of the rows after each neighbour; with `return_keys`, their stored keys)."""
        raise NotImplementedError

    def knn(self, keys: np.ndarray, exclude: Ranges = None, successors: int = 0,
            return_keys: bool = False) -> KnnNeighbours:
        """kNN-LM neighbours of float32 keys (n, d), each query optionally excluding one row range; with
        `successors` = s also the s rows after each neighbour (`next_values`, `next_ids`); with
        `return_keys` the stored keys of all of them (`keys`, `next_keys`: the datastore must keep keys)."""
        self.check_open()
        found = self.search(np.ascontiguousarray(keys, dtype=np.float32), "values", exclude, successors,
                            return_keys)
        return knn_neighbours(found)

    def chunks(self, embeddings: np.ndarray, exclude: Ranges = None) -> np.ndarray:
        """RETRO neighbours of chunk embeddings (n, d): int64 (n, k, 2 * chunk_len) token ids."""
        self.check_open()
        return chunk_neighbours(self.search(np.ascontiguousarray(embeddings, dtype=np.float32), "tokens", exclude))

    def chunk_rows(self, embeddings: np.ndarray, successors: int = 0, return_keys: bool = False) -> ChunkNeighbours:
        """RETRO neighbours of chunk embeddings (n, d) with their ids; with `successors` = s also the s
        chunks after each neighbour, with `return_keys` the stored keys of all of them."""
        self.check_open()
        found = self.search(np.ascontiguousarray(embeddings, dtype=np.float32), "tokens", None, successors,
                            return_keys)
        next_tokens = None
        if found.successor_ids is not None:
            next_tokens = found.successor_payloads["tokens"].astype(np.int64)
        return ChunkNeighbours(chunk_neighbours(found), found.ids, found.successor_ids, next_tokens, found.keys,
                               found.successor_keys)

    def submit_knn(self, keys: np.ndarray, exclude: Ranges = None) -> Future:
        """`knn` in a background thread; the future's result is a `KnnNeighbours`."""
        self.check_open()
        return self.pool.submit(self.knn, np.array(keys, dtype=np.float32), exclude)

    def submit_chunks(self, embeddings: np.ndarray, exclude: Ranges = None) -> Future:
        """`chunks` in a background thread; the future's result is the (n, k, 2L) token array."""
        self.check_open()
        return self.pool.submit(self.chunks, np.array(embeddings, dtype=np.float32), exclude)

    def interrupt(self) -> None:
        """Ends the look-ups under way where the datastore allows it (a subclass's; here none can be)."""

    def close(self, cancel: bool = False) -> None:
        """Waits for the look-ups under way, then refuses any more (`check_open`). With `cancel` (the
        with-block raised: Ctrl-C, SIGTERM, an error) the look-ups not yet started are dropped and those
        under way are ended first (`interrupt`), so closing does not wait out their deadline."""
        if cancel:
            self.interrupt()
        self.pool.shutdown(wait=True, cancel_futures=cancel)
        self.closed = True

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *exc) -> None:
        self.close(cancel=exc_type is not None)
