"""RETRO's neighbours of every chunk of a split, fetched once and written for training and evaluation.

Example:
    >>> with InProcessRetriever(Path("run/retro-datastore"), RetrievalConfig(k=2)) as retriever:
    ...     keys = read_source(Path("run/retro-source")).open_keys()
    ...     precompute_neighbours(retriever, keys, chunk_exclusions(train, 16, 256),
    ...                           Path("run/retro-source/neighbours-train.npy"))
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from lm_worker.data.token_store import write_text_atomically
from lm_worker.sources.source import written_whole

log = logging.getLogger(__name__)
WINDOW_RECORD = "neighbours-train.json"  # beside neighbours-train.npy: the training window it was fetched for
SEARCH_RECORD = "neighbours-search.json"  # per split, the search its neighbours were fetched by


def record_window(source: Path, window: int) -> None:
    """Records, once neighbours-train.npy is written, the training window its exclusions were made for
    (`chunk_exclusions`): a file fetched for another window can then be told apart. Not before: a fetch
    that fails keeps the old file, which a new record would misname (a stop between the file and its
    record leaves the old record, which refuses the new file: safe)."""
    (Path(source) / WINDOW_RECORD).write_text(json.dumps({"window": int(window)}))


def recorded_window(source: Path) -> int | None:
    """The training window neighbours-train.npy was fetched for; None where none was recorded."""
    try:
        return int(json.loads((Path(source) / WINDOW_RECORD).read_text())["window"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def recorded_searches(source: Path) -> dict:
    """Per split, the search settings its neighbours-SPLIT.npy was fetched by (`record_search`); {} where
    none was recorded."""
    try:
        recorded = json.loads((Path(source) / SEARCH_RECORD).read_text())
    except (OSError, ValueError):
        return {}
    return recorded if isinstance(recorded, dict) else {}


def record_search(source: Path, split: str, search) -> None:
    """Records, once neighbours-SPLIT.npy is written, the search it was fetched by (`search`, a
    RetrievalConfig): not before, as `record_window`."""
    recorded = {**recorded_searches(source), split: search.search_settings()}
    write_text_atomically(Path(source) / SEARCH_RECORD, json.dumps(recorded, indent=2, sort_keys=True))


def check_queries(retriever, queries: np.ndarray, exclude) -> None:
    """ValueError unless every query has the datastore's dimension and keeps >= k rows after its exclusion."""
    C, K, ntotal = len(queries), retriever.config.k, retriever.ntotal
    if C == 0 or queries.ndim != 2 or queries.shape[1] != retriever.dimension:
        raise ValueError(f"queries must be (C > 0, {retriever.dimension}), got {queries.shape}")
    if exclude is not None and len(exclude) != C:
        raise ValueError(f"{len(exclude)} exclusions for {C} queries")
    ranges = [None] if exclude is None else list(exclude)
    left = np.array([ntotal - (0 if r is None else r[1] - r[0]) for r in ranges])
    if (left < K).any():
        q = int(np.argmin(left))
        excluded = "nothing" if ranges[q] is None else tuple(int(i) for i in ranges[q])
        raise ValueError(f"query {q} keeps {left[q]} of {ntotal} rows after excluding {excluded}: fewer than k={K}")


def batch_result(pending, first: int, total: int) -> np.ndarray:
    """The neighbours of the request of chunks first..., its shortfall (`TooFewNeighbours`) named by chunk of
    the `total`, not by place in the request."""
    try:
        return pending.result()
    except ValueError as err:
        in_split = getattr(err, "in_split", None)
        if in_split is None:
            raise
        raise in_split(first, total) from None


def precompute_neighbours(retriever, queries: np.ndarray, exclude: Sequence[tuple[int, int] | None] | None,
                          out_path: Path, batch: int = 1024, progress: bool = True) -> Path:
    """Writes the RETRO neighbours of every query chunk, int32 (C, K, 2L), as a memory-mapped .npy.

    Args:
        retriever: a `ServiceRetriever` or `InProcessRetriever` over a RETRO datastore; K = its `config.k`.
        queries: float32 (C, dim) chunk embeddings (a source's keys.npy, or `embed_chunks` of held-out chunks).
        exclude: per query one row range [start, end) to leave out (`chunk_exclusions` for the datastore's
            own chunks), or None for none.
        out_path: the .npy file to write (under another name first, renamed once whole: an interrupted
            run leaves what was there before).
        batch: queries per request; the next request is in flight while a batch is written.
        progress: show a progress bar.

    Returns:
        `out_path`.

    Raises:
        ValueError: no queries, a dimension or exclusion count mismatch, or fewer than K rows left to
            some query after its exclusion; or some chunk found fewer than K neighbours (named by its index).
    """
    C = len(queries)
    check_queries(retriever, queries, exclude)

    def submit(first: int):
        last = min(C, first + batch)
        part = None if exclude is None else list(exclude[first:last])
        return retriever.submit_chunks(np.asarray(queries[first:last], dtype=np.float32), part)

    out, empty = None, 0
    with written_whole(Path(out_path)) as partial:
        pending = submit(0)
        for first in tqdm(range(0, C, batch), desc="RETRO neighbours", unit="batch", disable=not progress):
            found = batch_result(pending, first, C)  # (b, K, 2L)
            if first + batch < C:
                pending = submit(first + batch)
            if out is None:
                out = np.lib.format.open_memmap(partial, mode="w+", dtype=np.int32, shape=(C, *found.shape[1:]))
            out[first:first + len(found)] = found
            empty += int((found == 0).all(axis=2).sum())
        out.flush()
        del out
    if empty:
        log.warning("%d of %d neighbours came back empty (all-zero tokens): raise nprobe or lower k", empty,
                    C * retriever.config.k)
    return Path(out_path)

