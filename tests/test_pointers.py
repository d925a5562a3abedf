"""Approximate kNN-LM retrieval by following pointers: which positions are searched, and the
neighbours the others take from the searched ones' successors."""

from __future__ import annotations

import numpy as np
import pytest

from lm_worker.evaluation.pointers import agreement_share, follow_pointers
from lm_worker.retrieval.config import KnnNeighbours

TABLE = np.array([5, 1, 2, 3, 4, 0, 1, 2, 3, 9, 9, 9, 7, 7, 7, 7, 7, 7, 7, 7])  # the value of each datastore row


def fake_search(found_ids: dict[int, list[int]], calls: list):
    """Searches that return fixed rows per position, their values and their successors' values."""
    def search(rows: np.ndarray, steps: int) -> KnnNeighbours:
        calls.append(rows.tolist())
        ids = np.array([found_ids[r] for r in rows])  # (m, k)
        after = ids[:, :, None] + np.arange(1, steps + 1)  # (m, k, s)
        distances = np.arange(ids.size, dtype=np.float32).reshape(ids.shape)
        return KnnNeighbours(distances, TABLE[ids], ids, np.where(after < len(TABLE), TABLE[np.minimum(after, 19)], -1))
    return search


def test_chains_fill_the_next_positions_until_too_few_hold():
    """Position 0 finds rows 1 and 6 (values 1, 1) and row 12 (value 7); the text goes 1, 2, 3, 9, 7. The
    chains from rows 1 and 6 hold at positions 0, 1 and 2 (rows 2, 7 then 3, 8 have values 2 then 3),
    so positions 1, 2 and 3 follow them; at 3 only row 9's value (9) came true: too few, so position
    4 is searched."""
    positions = np.arange(100, 105)
    targets = np.array([1, 2, 3, 9, 7])
    found = {0: [1, 6, 12], 4: [15, 16, 17]}
    calls = []
    out, followed = follow_pointers(np.zeros((5, 2), np.float32), targets, positions, fake_search(found, calls),
                                    steps=4, min_pointers=2)
    assert calls == [[0], [4]] and followed.tolist() == [False, True, True, True, False]
    assert out.ids[1].tolist() == [2, 7, -1] and out.values[1].tolist() == [2, 2, -1]  # row 12's chain died at 0
    assert out.distances[1].tolist() == [0.0, 1.0, np.inf]  # each chain keeps its distance
    assert out.ids[2].tolist() == [3, 8, -1] and out.values[2].tolist() == [3, 3, -1]
    assert out.ids[3].tolist() == [4, 9, -1] and out.values[3].tolist() == [4, 9, -1]
    assert out.ids[4].tolist() == [15, 16, 17] and out.values[4].tolist() == [7, 7, 7]  # searched


def test_a_chain_at_the_datastores_end_does_not_hold_and_the_next_position_is_searched():
    """Position 0 finds rows 18 and 19 (values 7, 7), which both come true; row 19 is the datastore's last, so
    only row 18's chain goes on to position 1, and at position 2 none is left. With min_pointers=2 position 1
    is searched; with 1 it follows row 18 alone, row 19's place missing (-1, inf), not a row past the end."""
    positions, targets = np.arange(3), np.array([7, 7, 7])
    found = {0: [18, 19], 1: [12, 13], 2: [12, 13]}
    calls = []
    _, followed = follow_pointers(np.zeros((3, 2), np.float32), targets, positions, fake_search(found, calls),
                                  steps=4, min_pointers=2)
    assert calls == [[0], [1]] and followed.tolist() == [False, False, True]
    calls = []
    out, followed = follow_pointers(np.zeros((3, 2), np.float32), targets, positions, fake_search(found, calls),
                                    steps=4, min_pointers=1)
    assert calls == [[0], [2]] and followed.tolist() == [False, True, False]
    assert out.ids[1].tolist() == [19, -1] and out.values[1].tolist() == [7, -1]
    assert out.distances[1].tolist() == [0.0, np.inf]


def test_runs_of_positions_start_with_a_search_and_steps_bound_a_chain():
    """Two runs (positions 0-2 and 10-11): each run's first position is searched; a chain that always holds
    is cut after `steps` positions."""
    positions = np.array([0, 1, 2, 10, 11])
    targets = np.array([7, 7, 7, 7, 7])
    found = {i: [12, 13, 14] for i in range(5)}
    calls = []
    _, followed = follow_pointers(np.zeros((5, 2), np.float32), targets, positions, fake_search(found, calls),
                                  steps=1, min_pointers=1)
    assert calls == [[0, 3], [2]] and followed.tolist() == [False, True, False, False, True]


def test_a_chain_never_crosses_into_another_run():
    """Positions 0-3 are consecutive, but 2-3 are a run of their own: position 2 is searched in the first
    round with position 0, although the chain from 0 would have held there (steps 4)."""
    positions, targets = np.arange(100, 104), np.array([7, 7, 7, 7])
    found = {i: [12, 13, 14] for i in range(4)}
    calls = []
    _, followed = follow_pointers(np.zeros((4, 2), np.float32), targets, positions, fake_search(found, calls),
                                  steps=4, min_pointers=1, runs=np.array([0, 0, 1, 1]))
    assert calls == [[0, 2]] and followed.tolist() == [False, True, False, True]
    calls.clear()
    _, followed = follow_pointers(np.zeros((4, 2), np.float32), targets, positions, fake_search(found, calls),
                                  steps=4, min_pointers=1)
    assert calls == [[0]] and followed.tolist() == [False, True, True, True]


def test_agreement_holds_a_chain_only_where_the_chains_agree_on_what_comes_next():
    """As in the first test, position 2's chains (rows 3 and 8, distances 0 and 1) go on to rows 4 and 9,
    values 4 and 9: token 4 has weight 1 / (1 + e^-1) = 0.73 of theirs. θ = 0.7 follows them to
    position 3; θ = 0.8 searches position 3 instead."""
    positions, targets = np.arange(100, 105), np.array([1, 2, 3, 9, 7])
    found = {0: [1, 6, 12], 3: [12, 13, 14], 4: [15, 16, 17]}
    calls = []
    _, followed = follow_pointers(np.zeros((5, 2), np.float32), targets, positions, fake_search(found, calls),
                                  steps=4, min_pointers=2, agreement=0.7)
    assert calls == [[0], [4]] and followed.tolist() == [False, True, True, True, False]
    calls.clear()
    out, followed = follow_pointers(np.zeros((5, 2), np.float32), targets, positions, fake_search(found, calls),
                                    steps=4, min_pointers=2, agreement=0.8)
    assert calls == [[0], [3], [4]] and followed.tolist() == [False, True, True, False, False]
    assert out.ids[3].tolist() == [12, 13, 14]  # searched


def test_a_crowd_of_chains_is_followed_whatever_it_agrees_on():
    """The same two split chains at position 2 with θ = 0.8: a crowd of 2 follows them to position 3 as
    θ = 0.7 did, a crowd of 3 leaves them to the agreement check, which searches position 3."""
    positions, targets = np.arange(100, 105), np.array([1, 2, 3, 9, 7])
    found = {0: [1, 6, 12], 3: [12, 13, 14], 4: [15, 16, 17]}
    for crowd, searches, at_3 in ((2, [[0], [4]], True), (3, [[0], [3], [4]], False)):
        calls = []
        out, followed = follow_pointers(np.zeros((5, 2), np.float32), targets, positions, fake_search(found, calls),
                                        steps=4, min_pointers=2, agreement=0.8, crowd=crowd)
        assert calls == searches and followed.tolist() == [False, True, True, at_3, False]
        assert out.ids[3].tolist() == ([4, 9, -1] if at_3 else [12, 13, 14])


def test_a_crowd_counts_only_the_chains_whose_successor_is_known():
    """Three chains hold at position 0 (value 3); their successors are tokens 4, 9 and unknown (past the
    datastore's end): two known chains that split. A crowd of 2 follows them, a crowd of 3 does not
    count the third and leaves them to the agreement check (θ = 0.9), which searches position 1."""
    def search(rows: np.ndarray, steps: int) -> KnnNeighbours:
        calls.append(rows.tolist())
        m = len(rows)
        return KnnNeighbours(np.tile(np.float32([0, 1, 2]), (m, 1)), np.full((m, 3), 3), np.tile([3, 8, 40], (m, 1)),
                             np.tile(np.array([[4], [9], [-1]]), (m, 1, 1)))

    for crowd, searches in ((2, [[0]]), (3, [[0], [1]])):
        calls = []
        _, followed = follow_pointers(np.zeros((2, 2), np.float32), np.array([3, 4]), np.arange(2), search,
                                      steps=1, min_pointers=1, agreement=0.9, crowd=crowd)
        assert calls == searches and followed.tolist() == [False, len(searches) == 1]


def test_runs_must_match_the_positions():
    with pytest.raises(ValueError, match="one run per position"):
        follow_pointers(np.zeros((3, 2), np.float32), np.zeros(3, np.int64), np.arange(3),
                        fake_search({}, []), steps=1, min_pointers=1, runs=np.array([0, 1]))


def test_agreement_share_is_the_largest_weight_one_token_gets():
    """Against a float64 sum per row and token: softmax(-d / T) over the chains with a value."""
    rng = np.random.default_rng(4)
    values = rng.integers(-1, 5, (30, 12))
    values[0] = -1  # a row with no chain: share 0
    distances = rng.uniform(0, 20, (30, 12)).astype(np.float32)
    empty = agreement_share(np.zeros((2, 0), np.int64), np.zeros((2, 0), np.float32), 1.0)  # no chain at all
    assert empty.tolist() == [0.0, 0.0]
    for temperature in (1.0, 4.0):
        share = agreement_share(values, distances, temperature)
        for row in range(30):
            known = values[row] >= 0
            if not known.any():
                assert share[row] == 0.0
                continue
            d = distances[row][known].astype(np.float64)
            w = np.exp(-(d - d.min()) / temperature)
            by_token = {t: w[values[row][known] == t].sum() for t in set(values[row][known].tolist())}
            assert share[row] == pytest.approx(max(by_token.values()) / w.sum(), rel=1e-12)


def test_pointer_settings_are_checked():
    from lm_worker.evaluation.config import EvalConfig

    with pytest.raises(ValueError, match="pointer_steps must be in"):
        EvalConfig(pointer_steps=17)
    with pytest.raises(ValueError, match="exclude_own_document"):
        EvalConfig(pointer_steps=2, exclude_own_document=True)
    with pytest.raises(ValueError, match="pointer_agreement must be in"):
        EvalConfig(pointer_steps=2, pointer_agreement=1.5)
    with pytest.raises(ValueError, match="give pointer_steps too"):
        EvalConfig(pointer_agreement=0.6)
    with pytest.raises(ValueError, match="pointer_crowd must be"):
        EvalConfig(pointer_steps=2, pointer_agreement=0.6, pointer_crowd=-1)
    with pytest.raises(ValueError, match="give pointer_agreement too"):
        EvalConfig(pointer_steps=2, pointer_crowd=3)
