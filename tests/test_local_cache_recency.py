"""A local cache keeps the rows the newest answers found: a row an answer finds again is made the newest
(`add_ranked`, as `add_neighbours` adds), so it outlives rows no answer has found since, against a list
model of each sequence's rows, least recently found first. (Guesses only: the service's answer decides.)"""

from __future__ import annotations

import numpy as np

from lm_worker.retrieval.local_cache import LocalCaches


def add_ranked_model(model: list[list[int]], owners: np.ndarray, ids: np.ndarray, capacity: int) -> None:
    """Each query's ids, nearest first, go in farthest first; a held id moves to the newest end."""
    for row, ranked in zip(owners.tolist(), ids.tolist()):
        for i in reversed(ranked):
            if i >= 0:
                model[row] = [j for j in model[row] if j != i] + [i]
    for row in range(len(model)):
        model[row] = model[row][-capacity:]


def test_a_row_found_again_is_the_newest_and_outlives_older_ones():
    """Capacity 4: the first answer holds 4, 3, 2, 1 (oldest first); the next finds 4 again (its nearest)
    and 5: 4 stays, and 3, which no answer found since, gives way."""
    d = 8
    keys = np.eye(d, dtype=np.float32)
    caches = LocalCaches(rows=1, capacity=4, dimension=d)
    first = np.array([[1, 2, 3, 4]])
    caches.add_ranked(np.zeros(1, np.int64), first, keys[first], first * 10)
    assert caches.held(0).tolist() == [4, 3, 2, 1]
    again = np.array([[4, 5]])
    caches.add_ranked(np.zeros(1, np.int64), again, keys[again], again * 10)
    assert caches.held(0).tolist() == [2, 1, 5, 4]
    distances, values = caches.search(keys[[4]], k=1)
    assert values.tolist() == [[40]] and distances.tolist() == [[0.0]]


def test_add_ranked_keeps_the_most_recently_found_rows_as_a_list_model_does():
    """Random answers over 3 sequences, some larger than a cache: the rows held, in order of recency, are
    the model's; keys, values and norms go with their ids, and a search equals brute force over them."""
    rng = np.random.default_rng(5)
    d, capacity, B = 4, 6, 3
    table = rng.standard_normal((30, d)).astype(np.float32)
    caches = LocalCaches(rows=B, capacity=capacity, dimension=d)
    model: list[list[int]] = [[] for _ in range(B)]
    for m, n in ((2, 3), (3, 4), (1, 8), (4, 2), (2, 5), (3, 3)):
        owners = rng.integers(0, B, m)
        ids = np.stack([rng.choice(np.arange(-1, 30), n, replace=False) for _ in range(m)])  # distinct per query
        caches.add_ranked(owners, ids, table[np.maximum(ids, 0)], ids + 100)
        add_ranked_model(model, owners, ids, capacity)
        for row in range(B):
            assert caches.held(row).tolist() == model[row]
            slots = np.flatnonzero(caches.ids[row] >= 0)
            here = caches.ids[row, slots]
            np.testing.assert_array_equal(caches.keys[row, slots], table[here])
            np.testing.assert_array_equal(caches.values[row, slots], here + 100)
            np.testing.assert_allclose(caches.norms[row, slots], (table[here] ** 2).sum(axis=1), rtol=1e-6)
    queries = rng.standard_normal((B, d)).astype(np.float32)
    distances, values = caches.search(queries, k=3)
    for row in range(B):
        held = np.array(model[row])
        exact = ((table[held].astype(np.float64) - queries[row]) ** 2).sum(axis=1)
        order = np.argsort(exact, kind="stable")[:3]
        np.testing.assert_allclose(distances[row], exact[order], rtol=1e-4, atol=1e-5)
        assert values[row].tolist() == (held[order] + 100).tolist()
