"""Approximate kNN-LM retrieval by following pointers (RetoMaton, Alon et al., ICML 2022): a search is
skipped wherever the previous position's neighbours still point at the text.

In a kNN-LM datastore row i+1 continues row i. When position p's neighbour i has the value that really
comes next (x_{p+1}), its successor i+1 is a likely neighbour of position p+1: it continues the same
context the same way. So after one search at p, position p+1 takes as neighbours the successors of
p's neighbours whose value was the token that came, each keeping the distance its chain started with;
p+2 the successors of those that held again; and so on, for as long as at least `min_pointers` chains
hold and the search returned their rows (`steps` successors per neighbour). Where the chains run out,
the position is searched again.

Within a batch of scored positions this runs in rounds: one request searches every position that
needs a search (at first, the first position of each run of consecutive positions), and the chains
from each of them fill the positions after it until they break; the positions where they broke are
the next round's request.

With `agreement` θ > 0, the chains must also agree on what comes next: a position is followed only
where the surviving chains give at least θ of their weight (softmax of -distance / temperature, over
the chains whose successor is known) to one next token. Where they split, the text is at a branch of
the stored documents, and the position is searched instead. With `crowd` M > 0 that check applies
only to positions with fewer than M chains: M or more are followed whatever they agree on, their split
weight being the neighbour distribution a search would give. On the demo run the chains that split and
lose are nearly all pairs (two chains, two next tokens; docs/results.md).

A followed position's neighbours are fewer than a search's, and all of them agree with the text so
far, so the evaluation weighs them apart: its own λ (swept like the searched positions' λ) and a
flatter temperature (`EvalConfig.pointer_temperature_scale`).

Example:
    >>> found, followed = follow_pointers(keys, targets, positions, search, steps=8, min_pointers=1,
    ...                                   agreement=0.9, crowd=3)
    >>> 1 - followed.mean()   # the share of positions searched; the others followed pointers
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from lm_worker.retrieval.config import KnnNeighbours

Search = Callable[[np.ndarray, int], KnnNeighbours]  # (row indices into the batch, successors) -> neighbours


def follow_pointers(keys: np.ndarray, targets: np.ndarray, positions: np.ndarray, search: Search, steps: int,
                    min_pointers: int, agreement: float = 0.0, temperature: float = 1.0, crowd: int = 0,
                    runs: np.ndarray | None = None) -> tuple[KnnNeighbours, np.ndarray]:
    """Neighbours for every scored position of a batch, searching only where pointers run out.

    Args:
        keys: (n, d) the positions' kNN-LM keys, in `positions` order.
        targets: (n,) the token that follows each position (x_{p+1}).
        positions: (n,) stream positions; consecutive ones form the chains.
        search: `search(rows, steps)` searches keys[rows] and returns their neighbours with `steps`
            successors' values (`KnnNeighbours.next_values`).
        steps: successors per neighbour, the longest a chain runs without a search (1..16).
        min_pointers: a chain holds while at least this many of its neighbours do.
        agreement: θ in [0, 1]; > 0: follow only where the chains give θ of their weight to one next token.
        temperature: of the chains' weights, softmax(-distance / temperature).
        crowd: > 0: positions with at least this many chains whose successor is known (a chain past the
            datastore's end does not count) skip the agreement check; 0: none skips it.
        runs: (n,) which run each position belongs to (default: one); a chain never crosses into another
            run, so each run starts with a search and the runs' searches share the rounds' requests.

    Returns:
        (neighbours (n, k) for every position, followed (n,) bool: the positions that were not searched).
        A followed position's neighbours are the surviving chains' rows; the others are missing (-1, inf).

    Raises:
        ValueError: `runs` is not one run per position.
    """
    n = len(positions)
    if runs is not None and np.shape(runs) != np.shape(positions):
        raise ValueError(f"runs must give one run per position: shape {np.shape(runs)}, positions "
                         f"{np.shape(positions)}")
    following = np.full(n, -1, dtype=np.int64)  # the next scored position after each, when consecutive
    same_run = np.ones(max(n - 1, 0), dtype=bool) if runs is None else runs[1:] == runs[:-1]
    consecutive = np.flatnonzero((positions[1:] == positions[:-1] + 1) & same_run)
    following[consecutive] = consecutive + 1
    todo = np.setdiff1d(np.arange(n), following[following >= 0])  # the first position of each run
    out: KnnNeighbours | None = None
    followed = np.ones(n, dtype=bool)
    while len(todo):
        found = search(todo, steps)
        if out is None:
            k = found.values.shape[1]
            out = KnnNeighbours(np.full((n, k), np.inf, dtype=np.float32), np.full((n, k), -1, dtype=np.int64),
                                np.full((n, k), -1, dtype=np.int64))
        followed[todo] = False
        out.distances[todo], out.values[todo], out.ids[todo] = found.distances, found.values, found.ids
        todo = _chains(found, todo, targets, following, out, min_pointers, agreement, temperature, crowd)
    if out is None:
        out = KnnNeighbours(np.zeros((0, 0), np.float32), np.zeros((0, 0), np.int64), np.zeros((0, 0), np.int64))
    return out, followed


def _chains(found: KnnNeighbours, rows: np.ndarray, targets: np.ndarray, following: np.ndarray,
            out: KnnNeighbours, min_pointers: int, agreement: float, temperature: float, crowd: int
            ) -> np.ndarray:
    """Fills `out` at the positions after each searched row of `rows` from its surviving chains;
    returns the positions where the chains ran out, to be searched."""
    alive = found.values == targets[rows][:, None]  # (m, k) neighbours that predicted what came
    distances, ids, after = found.distances, found.ids, found.next_values  # (m, k), (m, k), (m, k, s)
    here, again = rows, []
    for step in range(after.shape[2]):
        there = following[here]
        alive &= after[:, :, step] >= 0  # a chain at its shard's or the datastore's end has no successor
        coming = np.where(alive, after[:, :, step], -1)  # (m, k) the chains' next tokens (their successors' values)
        holding = (there >= 0) & (alive.sum(axis=1) >= min_pointers)
        if agreement > 0 and holding.any():
            agreeing = agreement_share(coming, distances, temperature) >= agreement  # (m,)
            if crowd > 0:
                agreeing |= (coming >= 0).sum(axis=1) >= crowd  # a crowd of chains is followed as it splits
            holding &= agreeing
        again.append(there[(there >= 0) & ~holding])
        if not holding.any():
            break
        alive, here = alive[holding], there[holding]
        distances, ids, after, now = distances[holding], ids[holding], after[holding], coming[holding]  # (m', k)
        out.distances[here] = np.where(alive, distances, np.inf)
        out.values[here] = now
        out.ids[here] = np.where(alive, ids + step + 1, -1)
        alive &= now == targets[here][:, None]
    else:
        there = following[here]
        again.append(there[there >= 0])
    return np.unique(np.concatenate(again)) if again else np.zeros(0, dtype=np.int64)


def agreement_share(values: np.ndarray, distances: np.ndarray, temperature: float) -> np.ndarray:
    """The largest share of weight that one next token gets, per row: values (m, k) the chains' next
    tokens (-1: no chain or no successor, weighing nothing), distances (m, k) their chains', weights
    softmax(-distance / temperature) over the rows' chains with a value. 0 where a row has none."""
    known = values >= 0
    d = np.where(known, distances.astype(np.float64), np.inf)
    nearest = d.min(axis=1, keepdims=True, initial=np.inf)  # (m, 1)
    w = np.where(known, np.exp(-(d - np.where(np.isfinite(nearest), nearest, 0.0)) / temperature), 0.0)  # (m, k)
    order = np.argsort(values, axis=1, kind="stable")
    v, w = np.take_along_axis(values, order, axis=1), np.take_along_axis(w, order, axis=1)  # runs of one value
    total = np.cumsum(w, axis=1)  # (m, k)
    last = np.ones(v.shape, dtype=bool)
    last[:, :-1] = v[:, 1:] != v[:, :-1]  # the last of each run
    ends = np.maximum.accumulate(np.where(last, total, 0.0), axis=1)  # the sum up to the latest run's end
    before = np.concatenate([np.zeros((len(v), 1)), ends[:, :-1]], axis=1)  # ... strictly before each place
    runs = np.where(last, total - before, 0.0)  # each run's weight, at its last place
    whole = total[:, -1] if v.shape[1] else np.zeros(len(v))
    return np.where(whole > 0, runs.max(axis=1, initial=0.0) / np.where(whole > 0, whole, 1.0), 0.0)
