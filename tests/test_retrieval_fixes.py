"""Retrieval-side repairs: an interrupted retriever unwinds without waiting for its calls' deadline, a
killed encode's work folder is reaped, building the MiniLM encoder leaves torch's threads alone, a moved
LM checkpoint is named safely, neighbour shortfalls and exclusion messages name the right chunk, an empty
add to the local caches, and the stdlib vector cache cleans up after itself and never deletes a published
cache."""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from types import SimpleNamespace

import grpc
import numpy as np
import pytest

from lm_worker.data.corpus import Document, is_heldout
from lm_worker.retrieval.config import RetrievalConfig
from lm_worker.retrieval.local_cache import LocalCaches
from lm_worker.retrieval.retriever import Retriever
from lm_worker.retrieval.service import ServiceRetriever
from lm_worker.sources.neighbours import check_queries, precompute_neighbours
from lm_worker.sources.output import check_out, new_source
from retrieval.v1 import retriever_pb2 as pb
from retriever_server.client import SearchResult

ROOT = Path(__file__).resolve().parents[1]
DIM = 4


# 1. an interrupted with-block does not wait for the calls under way


def service_info() -> bytes:
    return pb.InfoResponse(dimension=DIM, metric="l2", ntotal=100, shard="shard-00000", datastore_version="v1",
                           role="shard", num_shards=1, datastore_ntotal=100, nlist=8, default_nprobe=4, max_k=2048,
                           max_batch=16384, max_request_bytes=64 << 20,
                           shards=[pb.ShardInfo(name="shard-00000", id_start=0, id_end=100)]).SerializeToString()


@contextlib.contextmanager
def silent_service(entered: threading.Event, release: threading.Event) -> Iterator[str]:
    """A loopback service that answers GetInfo, and whose Search never answers until `release` is set."""

    def search(raw: bytes, context) -> bytes:
        entered.set()
        release.wait(120)
        context.abort(grpc.StatusCode.UNAVAILABLE, "released")

    handlers = {"Search": grpc.unary_unary_rpc_method_handler(search),
                "GetInfo": grpc.unary_unary_rpc_method_handler(lambda raw, context: service_info())}
    server = grpc.server(futures.ThreadPoolExecutor(4))
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("retrieval.v1.Retriever", handlers),))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield f"127.0.0.1:{port}"
    finally:
        release.set()
        server.stop(0)


def test_an_interrupted_service_retriever_cancels_its_call_in_flight():
    """Ctrl-C in the with-block closes the client first: the call under way ends at once, not at its 60 s
    deadline."""
    entered, release = threading.Event(), threading.Event()
    with silent_service(entered, release) as address:
        retriever = ServiceRetriever(address, RetrievalConfig(k=2, timeout_s=60))
        pending = []

        def interrupted() -> None:
            with contextlib.suppress(KeyboardInterrupt), retriever:
                pending.append(retriever.submit_chunks(np.zeros((1, DIM), np.float32)))
                entered.wait(10)
                raise KeyboardInterrupt

        thread = threading.Thread(target=interrupted, daemon=True)
        thread.start()
        thread.join(5)
        assert not thread.is_alive(), "the interrupted with-block waited for the call's deadline"
        assert entered.is_set() and retriever.closed
        assert pending[0].exception(timeout=5) is not None


class Blocked(Retriever):
    """A retriever whose every search waits for `release`."""

    dimension, ntotal, metadata = DIM, 100, {}

    def __init__(self):
        super().__init__(RetrievalConfig(k=2))
        self.release = threading.Event()

    def search(self, queries, payload, exclude, successors=0, return_keys=False):
        self.release.wait(30)
        raise TimeoutError("deadline")


def test_an_interrupted_retriever_drops_the_look_ups_not_yet_started():
    """The base class cannot stop a search under way, but an exception in the with-block cancels the
    queued ones instead of running them one after another."""
    retriever = Blocked()
    submitted, ready = [], threading.Event()

    def interrupted() -> None:
        with contextlib.suppress(KeyboardInterrupt), retriever:
            submitted.extend(retriever.submit_chunks(np.zeros((1, DIM), np.float32)) for _ in range(3))
            ready.set()
            raise KeyboardInterrupt

    thread = threading.Thread(target=interrupted, daemon=True)
    thread.start()
    try:
        assert ready.wait(5)
        dropped = threading.Event()
        submitted[2].add_done_callback(lambda future: dropped.set())  # called by cancel(); a queued one waits
        dropped.wait(5)
    finally:
        retriever.release.set()
        thread.join(10)
    assert submitted[2].cancelled()
    assert not thread.is_alive() and retriever.closed


# 2. a killed encode's work folder is reaped


def test_a_killed_encodes_work_folder_is_removed_a_running_ones_kept(tmp_path, caplog):
    out = tmp_path / "src"
    child = (f"import os\nfrom pathlib import Path\nfrom lm_worker.sources.output import new_source\n"
             f"with new_source(Path({str(out)!r})) as work:\n"
             f"    (work / 'keys.npy').write_bytes(b'x' * 1000)\n    os._exit(9)\n")
    killed = subprocess.run([sys.executable, "-c", child], cwd=ROOT, timeout=60)
    assert killed.returncode == 9
    left = [p.name for p in tmp_path.iterdir() if p.name != ".src.encode.lock"]  # its lock file: the kernel freed it
    assert len(left) == 1 and left[0].startswith(".src.encoding-")  # the dead encode's, with its part
    (tmp_path / ".src.encoding-unknown0").mkdir()  # no owner recorded (an older encode's): left alone
    with caplog.at_level(logging.INFO, logger="lm_worker.sources.output"), new_source(out) as work:
        check_out(out)  # while this encode runs: its own folder stays
        assert work.is_dir()
        (work / "source.json").write_text("{}")
    assert sorted(p.name for p in tmp_path.iterdir()) == [".src.encoding-unknown0", "src"]
    assert sorted(p.name for p in out.iterdir()) == ["source.json"]  # no owner record published
    assert repr(left[0]) in caplog.text and "'.src.encoding-unknown0'" in caplog.text


# 3. building the MiniLM chunk encoder leaves torch's thread count alone


def test_the_minilm_encoder_sets_its_threads_only_while_it_encodes():
    torch = pytest.importorskip("torch")
    from lm_worker.encoders.minilm_chunks import ChunkEncoder

    before = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        encoder = ChunkEncoder(SimpleNamespace(decode=lambda row: "def f(): return 1"), threads=1)
        assert torch.get_num_threads() == 3  # the process's other models keep theirs
        seen = []

        def model(input_ids, attention_mask):
            seen.append(torch.get_num_threads())
            return SimpleNamespace(last_hidden_state=torch.ones(*input_ids.shape, encoder.dimension))

        encoder.minilm.model = model
        assert encoder.embed(np.zeros((2, 4), np.int64)).shape == (2, encoder.dimension)
        assert encoder.minilm.encode(np.zeros((2, 4), np.int64)).shape == (2, encoder.dimension)
        assert seen == [1, 1] and torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(before)


# 4. a datastore's LM checkpoint that is not here


@pytest.mark.parametrize("given", [False, True])
def test_a_missing_lm_checkpoint_is_named_escaped_with_a_hint(tmp_path, given):
    from lm_worker.encoders.registry import chunk_encoder_for

    path = str(tmp_path / "nope\x1b[2J\x1b[31mPWNED\nfake line" / "/".join(["x" * 50] * 10))  # long, and not here
    metadata = {"encoder": "lm-last:3e59b99a2e7c4113", "encoder_checkpoint": "/elsewhere/lm" if given else path}
    with pytest.raises(ValueError) as err:
        chunk_encoder_for(metadata, None, Path(path) if given else None)
    text = str(err.value)
    assert "\x1b" not in text and "\n" not in text and len(text) < 600
    assert "\\x1b[2J" in text and "--encoder-lm" in text


# 5. an exclusion message with no range for that query


def test_too_few_rows_without_an_exclusion_is_a_value_error():
    retriever = SimpleNamespace(config=SimpleNamespace(k=4), ntotal=3, dimension=2)
    for exclude in ([None, None], [None, (0, 0)]):
        with pytest.raises(ValueError, match=r"query 0 keeps 3 of 3 rows after excluding nothing"):
            check_queries(retriever, np.zeros((2, 2), np.float32), exclude)


# 6. a neighbour shortfall names the chunk, not its place in a request


class ShortAt3(Retriever):
    """Chunk query 3 (by its first coordinate) finds fewer than k neighbours."""

    dimension, ntotal, metadata = DIM, 100, {}

    def search(self, queries, payload, exclude, successors=0, return_keys=False):
        n = len(queries)
        ids = np.tile(np.arange(2), (n, 1))
        ids[queries[:, 0] == 3] = -1
        result = SearchResult(ids, np.zeros((n, 2), np.float32))
        result.payloads = {"tokens": np.ones((n, 2, 4), np.int32)}
        return result


def test_a_neighbour_shortfall_names_the_chunk_of_the_whole_split(tmp_path):
    queries = np.zeros((6, DIM), np.float32)
    queries[:, 0] = np.arange(6)
    with ShortAt3(RetrievalConfig(k=2)) as retriever, pytest.raises(ValueError) as err:
        precompute_neighbours(retriever, queries, None, tmp_path / "n.npy", batch=2, progress=False)
    assert "chunk 3 of 6" in str(err.value) and "query 1" not in str(err.value)
    assert not (tmp_path / "n.npy").exists()


# 7. nothing to add to a local cache


def test_adding_no_rows_to_a_local_cache_is_a_no_op():
    caches = LocalCaches(2, 4, 3)
    caches.add(0, np.array([], dtype=np.int64), np.zeros((0, 3), np.float32), np.array([], dtype=np.int64))
    assert caches.size(0) == 0 and caches.held(0).tolist() == []


# 8. the stdlib vector cache: no work folder left, and a published cache kept


class FakeMiniLM:
    """Chunks every text into 1-token chunks and embeds them as zeros; `fail` makes encode raise, `before`
    runs at the first encode (another process publishing the cache meanwhile)."""

    fail = False
    before = None

    def chunk(self, texts, chunk_len, max_per_text=0):
        return [np.ones((max_per_text or 1, chunk_len), np.int32) for _ in texts]

    def encode(self, chunks, progress=False):
        if FakeMiniLM.fail:
            raise KeyboardInterrupt
        if FakeMiniLM.before is not None:
            before, FakeMiniLM.before = FakeMiniLM.before, None
            before()
        return np.zeros((len(chunks), 384), np.float32)


def few_documents() -> list[Document]:
    names = [f"m{i}.py" for i in range(200)]
    train = [n for n in names if not is_heldout(n)][:3]
    held = [n for n in names if is_heldout(n)][:2]
    return [Document(n, "x") for n in train + held]


@pytest.fixture()
def fake_stdlib(tmp_path, monkeypatch) -> Path:
    import lm_worker.encoders.minilm as minilm
    import lm_worker.encoders.stdlib_vectors as vectors

    monkeypatch.setenv("RETRIEVAL_CACHE", str(tmp_path))
    monkeypatch.setattr(minilm, "MiniLMEncoder", FakeMiniLM)
    monkeypatch.setattr(vectors, "read_stdlib", few_documents)
    monkeypatch.setattr(FakeMiniLM, "fail", False)
    monkeypatch.setattr(FakeMiniLM, "before", None)
    return tmp_path


def test_a_failed_stdlib_encode_leaves_no_work_folder(fake_stdlib):
    from lm_worker.encoders.stdlib_vectors import stdlib_vectors

    FakeMiniLM.fail = True
    with pytest.raises(KeyboardInterrupt):
        stdlib_vectors(3, 2, chunk_len=2, max_per_doc=1)
    assert os.listdir(fake_stdlib) == []


def test_a_cache_published_meanwhile_is_kept(fake_stdlib):
    from lm_worker.encoders.stdlib_vectors import cache_stem, stdlib_vectors

    out = fake_stdlib / f"{cache_stem(2, 1)}-n3-q2"

    def publish() -> None:  # another process fills the same cold cache first
        out.mkdir()
        for name, array in (("keys", np.ones((3, 384), np.float32)), ("queries", np.ones((2, 384), np.float32)),
                            ("tokens", np.ones((3, 2), np.int32)), ("doc_ids", np.zeros(3, np.int32)),
                            ("query_tokens", np.ones((2, 2), np.int32))):
            np.save(out / f"{name}.npy", array)
        (out / "docs.json").write_text('["theirs"]')

    FakeMiniLM.before = publish
    found = stdlib_vectors(3, 2, chunk_len=2, max_per_doc=1)
    assert found.documents == ["theirs"] and float(found.keys[0, 0]) == 1.0
    assert os.listdir(fake_stdlib) == [out.name]
