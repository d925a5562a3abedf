"""A fan-out client whose shard list has a shard down checks the shards that answer as fully as when all
answer: every replica that answers (same datastore, one shard per entry), the list against the datastore's
shard count, no shard twice; it refuses what it would refuse with every shard up, in the same words, and
never searches a replica it has not checked. A partial answer names exactly the shards missing from it, and
holds what a brute-force search over the shards that are up finds. A hand-built 3-shard datastore (exact
IDMap,Flat), served in process (3 shards x 2 replicas) on loopback."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import faiss
import numpy as np
import pytest
from conftest import Served, serve

from retriever_server.datastore.manifest import Manifest, ShardEntry, describe_files, shard_name, write_manifest
from retriever_server.serving.client import RetrieverClient, RetrieverError

D = 8
BOUNDS = (0, 40, 70, 120)  # 3 shards of 40, 30 and 50 rows
K = 20


@pytest.fixture(scope="module")
def keys() -> np.ndarray:
    return np.random.default_rng(5).standard_normal((BOUNDS[-1], D)).astype(np.float32)  # (N, D)


@pytest.fixture(scope="module")
def served(aio, keys, tmp_path_factory) -> Iterator[Served]:
    """The datastore, written without the build job (exact search, so a brute force is the reference)."""
    out = tmp_path_factory.mktemp("fanout-checks") / "ds"
    entries = []
    for s, (lo, hi) in enumerate(zip(BOUNDS, BOUNDS[1:])):
        directory = out / shard_name(s)
        directory.mkdir(parents=True)
        index = faiss.index_factory(D, "IDMap,Flat", faiss.METRIC_L2)
        index.add_with_ids(keys[lo:hi], np.arange(lo, hi, dtype=np.int64))
        faiss.write_index(index, str(directory / "index.faiss"))
        entries.append(ShardEntry(shard_name(s), lo, hi, describe_files(directory)))
    write_manifest(out, Manifest(dimension=D, metric="l2", factory="IDMap,Flat", ntotal=BOUNDS[-1], nlist=0,
                                 default_nprobe=1, has_keys=False, payloads=(), shards=tuple(entries)))
    with serve(aio, Path(out), 3, replicas=2) as running:
        yield running


@pytest.fixture
def dead() -> str:
    """An address where nothing listens: a shard that is down."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{sock.getsockname()[1]}"


def queries() -> np.ndarray:
    return np.random.default_rng(9).standard_normal((4, D)).astype(np.float32)  # (4, D)


def brute(keys: np.ndarray, shards: list[int]) -> np.ndarray:
    """The ids of the K nearest rows among `shards`' rows, by exact squared L2: (4, K)."""
    rows = np.concatenate([np.arange(BOUNDS[s], BOUNDS[s + 1]) for s in shards])
    distances = ((queries()[:, None, :] - keys[rows][None]) ** 2).sum(-1)  # (4, rows)
    return rows[np.argsort(distances, axis=1, kind="stable")[:, :K]]


def refusal(shards: list, allow_partial: bool = True) -> RetrieverError:
    with RetrieverClient(shards, timeout=5) as client, pytest.raises(RetrieverError) as refused:
        client.search(queries(), k=K, allow_partial=allow_partial)
    return refused.value


def test_a_replica_of_another_shard_is_refused_while_a_shard_is_down(served, dead):
    """[[s0a, s1a], [s1b], down]: it answered partial, naming only the shard down, with shard 1's rows twice
    and shard 0's missing, every search; with every shard up the same list is refused."""
    (s0a, _), (s1a, s1b), (s2a, _) = served.shard_addresses()
    everyone = refusal([[s0a, s1a], [s1b], [s2a]], allow_partial=False)
    with RetrieverClient([[s0a, s1a], [s1b], [dead]], timeout=5) as client:
        for _ in range(3):
            with pytest.raises(RetrieverError) as refused:
                client.search(queries(), k=K, allow_partial=True)
            assert (refused.value.code, refused.value.message) == (everyone.code, everyone.message)
    assert everyone.code.name == "FAILED_PRECONDITION" and "serve different shards" in everyone.message


def test_a_list_short_of_the_datastores_shards_is_refused_while_a_shard_is_down(served, dead):
    """[s0, down] of a 3-shard datastore: it answered partial, naming one shard, shards 1 and 2 both missing."""
    (s0, _), (s1, _), _ = served.shard_addresses()
    everyone = refusal([s0, s1], allow_partial=False)
    down = refusal([s0, dead])
    assert down.code == everyone.code and everyone.code.name == "FAILED_PRECONDITION"
    words = "the datastore has 3 shards but 2 were given"
    assert down.message.split(" (")[0] == everyone.message.split(" (")[0] == words
    twice = refusal([[s0], [served.shards[0][1].address], [dead]])
    assert twice.message == "shards given more than once: ['shard-00000']"


def test_a_replica_that_does_not_answer_getinfo_is_never_searched(served, dead, keys, monkeypatch):
    """Shard 1's server listed as shard 0's second replica, its GetInfo refused: the client does not know what
    it serves, so it must not search it (it did, every other search: shard 1's rows in place of shard 0's)."""
    (s0a, _), (s1a, s1b), _ = served.shard_addresses()

    async def refuse(*_args):
        raise RuntimeError("down")  # the servicer answers UNKNOWN: a replica failed, retryable

    monkeypatch.setattr(served.shards[1][1].service, "handle_info", refuse)
    with RetrieverClient([[s0a, s1b], [s1a], [dead]], timeout=5) as client:
        found = [client.search(queries(), k=K, allow_partial=True) for _ in range(4)]
        with pytest.raises(RetrieverError) as refused:
            client.search(queries(), k=K)
    assert refused.value.code.name == "UNAVAILABLE" and refused.value.message.startswith("shard-00002 unavailable (")
    for result in found:
        assert result.partial and set(result.failed_shards) == {"shard-00002"}
        np.testing.assert_array_equal(result.ids, brute(keys, [0, 1]))


@pytest.mark.parametrize("order", ["in order", "out of order"])
def test_a_partial_answer_names_exactly_the_shards_missing_from_it(served, dead, keys, order):
    (s0a, s0b), (s1a, s1b), _ = served.shard_addresses()
    shards = [[s0a, s0b], [s1a, s1b], [dead]]
    with RetrieverClient(shards if order == "in order" else shards[::-1], timeout=5) as client:
        found = [client.search(queries(), k=K, allow_partial=True) for _ in range(3)]
    for result in found:
        assert result.partial and set(result.failed_shards) == {"shard-00002"}
        np.testing.assert_array_equal(result.ids, brute(keys, [0, 1]))


def test_a_shard_down_at_the_first_search_is_checked_when_it_answers(served, keys, monkeypatch):
    """Shard 2 down, then up: searched whole once it answers; a shard 0 replica listed as shard 2, down, then
    up: refused as with every shard up."""
    (s0a, s0b), (s1a, _), (s2a, _) = served.shard_addresses()

    async def refuse(*_args):
        raise RuntimeError("down")

    for shards, late in (([[s0a], [s1a], [s2a]], served.shards[2][0]), ([[s0a], [s1a], [s0b]], served.shards[0][1])):
        with monkeypatch.context() as patch, RetrieverClient(shards, timeout=5) as client:
            patch.setattr(late.service, "handle_info", refuse)
            patch.setattr(late.service, "handle_search", refuse)
            first = client.search(queries(), k=K, allow_partial=True)
            patch.undo()
            assert first.partial and set(first.failed_shards) == {"shard-00002"}
            np.testing.assert_array_equal(first.ids, brute(keys, [0, 1]))
            if late is served.shards[2][0]:
                whole = client.search(queries(), k=K)
                assert not whole.partial
                np.testing.assert_array_equal(whole.ids, brute(keys, [0, 1, 2]))
            else:
                with pytest.raises(RetrieverError, match=r"shards given more than once: \['shard-00000'\]"):
                    client.search(queries(), k=K, allow_partial=True)


def test_without_partial_answers_a_shard_slower_to_check_than_the_probe_limit_is_waited_for(served, keys,
                                                                                            monkeypatch):
    """Every shard slower to answer GetInfo than a partial search's probe allows (the limit made 0 s here):
    a search without `allow_partial` gives each shard's check the search's own time, and answers in full."""
    import retriever_server.serving.client as client_module

    monkeypatch.setattr(client_module, "REPLICA_INFO_S", 0.0)
    (s0a, s0b), (s1a, s1b), (s2a, s2b) = served.shard_addresses()
    with RetrieverClient([[s0a, s0b], [s1a, s1b], [s2a, s2b]], timeout=5) as client:
        whole = client.search(queries(), k=K)
    assert not whole.partial
    np.testing.assert_array_equal(whole.ids, brute(keys, [0, 1, 2]))
