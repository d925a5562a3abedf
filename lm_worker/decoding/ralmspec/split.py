"""Requests split to fit the service's limits: a verification asks for every row's steps of a window at
once, each neighbour with its successors and stored keys, so its answer grows with the stride, the batch
(and the beams) and k x d, and past the servers' response limit the service refuses it outright
(RESOURCE_EXHAUSTED). `submit_split` sends it as consecutive pieces whose answers each fit
(`local_cache.queries_per_request`) and joins their answers in order: the same neighbours, whatever the split.

Example:
    >>> future = submit_split(retriever.pool, lambda q: retriever.knn(q, None, 4, True), queries, 64)
    >>> future.result().ids.shape    # (n, k): the pieces' answers, query by query
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from collections.abc import Callable
from concurrent.futures import Executor, Future
from typing import TypeVar

import numpy as np

log = logging.getLogger(__name__)
Answer = TypeVar("Answer")  # a dataclass of per-query arrays: `KnnNeighbours` or `ChunkNeighbours`


def pieces(queries: np.ndarray, per_request: int) -> list[np.ndarray]:
    """Queries (n, d) as consecutive pieces of at most `per_request` queries each (one at least)."""
    step = max(1, per_request)
    return [queries[i:i + step] for i in range(0, len(queries), step)] or [queries]


def join(answers: list[Answer]) -> Answer:
    """The answers of consecutive pieces as one: every array field concatenated along the queries (a field
    that one of them lacks, None, is None in all, as they were asked alike)."""
    if len(answers) == 1:
        return answers[0]
    first = answers[0]
    joined = {f.name: None if getattr(first, f.name) is None
              else np.concatenate([getattr(a, f.name) for a in answers]) for f in dataclasses.fields(first)}
    return type(first)(**joined)


def search_split(search: Callable[[np.ndarray], Answer], queries: np.ndarray, per_request: int) -> Answer:
    """`search` of queries (n, d), piece by piece in this thread, the answers joined."""
    return join([search(piece) for piece in pieces(queries, per_request)])


def submit_split(pool: Executor, search: Callable[[np.ndarray], Answer], queries: np.ndarray,
                 per_request: int) -> Future:
    """`search` of queries (n, d) on `pool`, a request per piece (in flight together): a future of the
    joined answer, done once every piece is, failing with the first failed piece's error."""
    parts = pieces(queries, per_request)
    if len(parts) == 1:
        return pool.submit(search, queries)
    log.debug("a request of %d queries goes out in %d pieces of at most %d", len(queries), len(parts), per_request)
    futures = [pool.submit(search, part) for part in parts]
    joined: Future = Future()
    left, lock = [len(futures)], threading.Lock()

    def done(_: Future) -> None:
        with lock:
            left[0] -= 1
            if left[0] or joined.done():  # a cancelled request: its pieces' answers go nowhere
                return
        try:
            answer = join([f.result() for f in futures])
        except BaseException as err:  # a piece failed or was cancelled: the whole request did
            joined.set_exception(err)
            return
        joined.set_result(answer)

    def cancelled(_: Future) -> None:
        if joined.cancelled():  # the pieces not yet started are dropped
            for future in futures:
                future.cancel()

    for future in futures:
        future.add_done_callback(done)
    joined.add_done_callback(cancelled)
    return joined
