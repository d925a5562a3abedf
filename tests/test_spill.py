"""An IVF index filled through `ListSpill` (lists spilled to disk a chunk at a time) is written byte for
byte as FAISS writes the same index filled in one go."""

import errno
import functools

import faiss
import numpy as np
import pytest
from conftest import synthetic

from retriever_server.datastore.index import new_trained_index
from retriever_server.datastore.spill import ListSpill, sizes_block, spillable

D = 32


@pytest.fixture(scope="module")
def rows():
    return synthetic(4000, D, seed=11)


@functools.cache
def _trained(factory: str) -> bytes:
    """The factory's index, trained once as a build trains it (on a quarter of the module's rows: the
    layout under test does not depend on how well the codec fits, and OPQ trains in seconds then), serialised."""
    index = new_trained_index(factory, "inner_product", synthetic(4000, D, seed=11)[:1000], seed=0)
    return faiss.serialize_index(index).tobytes()


@pytest.mark.parametrize("factory", ["IVF16,PQ4", "OPQ4,IVF16,PQ4", "IDMap,PQ4", "PCA16,IDMap,PQ4", "PQ4"])
def test_pq_codecs_train_without_the_polysemous_reordering(factory):
    """FAISS's factory turns polysemous training on for PQ ("np" turns it off): a build trains a codec as
    the "np" factory does, the same bytes."""
    sample = synthetic(1000, D, seed=3)
    as_np = factory.replace("PQ4", "PQ4np").replace("OPQ4np", "OPQ4")
    trained, reference = (faiss.serialize_index(new_trained_index(f, "l2", sample, seed=0)) for f in (factory, as_np))
    np.testing.assert_array_equal(trained, reference)


def _load(body: bytes) -> faiss.Index:
    return faiss.deserialize_index(np.frombuffer(body, dtype=np.uint8))


@pytest.mark.parametrize("factory", ["IVF64,SQ8", "IVF64,PQ8", "IVF64,Flat", "IVF64_HNSW8,SQ8", "OPQ8,IVF64,PQ8"])
@pytest.mark.parametrize(("n", "chunk"), [(4000, 700), (4000, 10_000), (20, 7), (0, 100)])
def test_spilled_index_file_equals_faiss_write_index(tmp_path, rows, factory, n, chunk):
    """Full and sparse list-size layouts, several chunks, one, and none, each against write_index."""
    trained = _trained(factory)
    ids = np.arange(n, dtype=np.int64) * 3 + 5
    reference = _load(trained)
    reference.add_with_ids(rows[:n], ids)

    index = _load(trained)
    assert spillable(index)
    spill = ListSpill(index, tmp_path / "spill")
    for s in range(0, n, chunk):
        index.add_with_ids(rows[s:min(n, s + chunk)], ids[s:s + chunk])
        spill.spill()
        assert index.ntotal == 0
    assert spill.rows == n
    spill.write_index(tmp_path / "index.faiss")

    assert (tmp_path / "index.faiss").read_bytes() == faiss.serialize_index(reference).tobytes()
    assert not list((tmp_path / "spill").iterdir()), "the spills were not removed"
    searched = faiss.read_index(str(tmp_path / "index.faiss"))
    if n:
        np.testing.assert_array_equal(searched.search(rows[:5], 3)[1], reference.search(rows[:5], 3)[1])


@pytest.mark.parametrize("factory", ["Flat", "HNSW8", "IVF64,PQ8x4fs", "PQ8"])
def test_indexes_without_array_lists_are_not_spilled(rows, factory):
    assert not spillable(_load(_trained(factory)))


def test_a_filled_index_is_not_spillable(rows):
    index = _load(_trained("IVF64,SQ8"))
    index.add(rows[:10])
    assert not spillable(index)


def test_sizes_block_switches_layout_past_half_the_lists():
    assert sizes_block(np.array([0, 3, 0, 0])).startswith(b"sprs")
    assert sizes_block(np.array([1, 3, 0, 2])).startswith(b"full")


def test_one_shard_tasks_work_alone_equals_faiss_add_and_hashes_what_it_wrote(rows, tmp_path):
    """`add_rows`, a shard task's work called outside Ray (as benchmarks/add_loop.py calls it): rows
    [500, 3500) spilled every 700 rows give FAISS's own file of those rows added at once, the float16
    keys, the sha256 of both as a fresh read gives them, and the seconds of every phase."""
    from retriever_server.datastore.build_inputs import BuildConfig
    from retriever_server.datastore.manifest import file_sha256
    from retriever_server.datastore.shard_fill import add_rows

    np.save(tmp_path / "keys.npy", rows)
    (tmp_path / "trained.index").write_bytes(_trained("IVF64,SQ8"))
    config = BuildConfig(keys=tmp_path / "keys.npy", out=tmp_path / "unused", keep_keys=True, add_block=256,
                         spill_rows=700)
    shard = tmp_path / "shard"
    shard.mkdir()
    filled = add_rows(config, str(tmp_path / "trained.index"), 500, 3500, shard)
    reference = _load(_trained("IVF64,SQ8"))
    reference.add_with_ids(rows[500:3500], np.arange(500, 3500, dtype=np.int64))
    faiss.write_index(reference, str(tmp_path / "reference.faiss"))
    assert (shard / "index.faiss").read_bytes() == (tmp_path / "reference.faiss").read_bytes()
    np.testing.assert_array_equal(np.load(shard / "keys.npy"), rows[500:3500].astype(np.float16))
    assert filled.hashed == {name: file_sha256(shard / name) for name in ("index.faiss", "keys.npy")}
    assert set(filled.seconds) == {"read", "add", "keys", "spill", "index"}
    assert not list(shard.glob("spill*"))  # the spills are gone


def test_a_shard_task_asked_to_stop_ends_before_its_next_block(rows, tmp_path):
    """`stopped` is asked before every block: once it says yes, `add_rows` raises a BuildError that
    names the first row not added, and writes no index."""
    from retriever_server.datastore.build_inputs import BuildConfig, BuildError
    from retriever_server.datastore.shard_fill import add_rows

    np.save(tmp_path / "keys.npy", rows)
    (tmp_path / "trained.index").write_bytes(_trained("IVF64,SQ8"))
    config = BuildConfig(keys=tmp_path / "keys.npy", out=tmp_path / "unused", add_block=256)
    asked = []

    def stopped() -> bool:
        asked.append(True)
        return len(asked) > 3

    with pytest.raises(BuildError, match=r"^stopped at row 1268: another shard failed$"):
        add_rows(config, str(tmp_path / "trained.index"), 500, 3500, tmp_path, stopped=stopped)
    assert len(asked) == 4 and not (tmp_path / "index.faiss").exists()


@pytest.mark.parametrize("spill_rows", [700, 10_000_000], ids=["spilled", "in-memory"])
def test_a_shard_whose_rows_landed_in_no_list_fails_and_writes_no_index(rows, tmp_path, spill_rows):
    """FAISS puts a row in list -1 (kept by no list, yet counted in ntotal) when no centroid is near it:
    here every centroid is NaN. The shard task must fail, naming the rows lost, not write a short index."""
    from retriever_server.datastore.build_inputs import BuildConfig, BuildError
    from retriever_server.datastore.shard_fill import add_rows

    np.save(tmp_path / "keys.npy", rows)
    index = _load(_trained("IVF64,Flat"))
    quantizer = faiss.downcast_index(index.quantizer)
    faiss.rev_swig_ptr(quantizer.get_xb(), 64 * D)[:] = np.nan
    faiss.write_index(index, str(tmp_path / "trained.index"))
    config = BuildConfig(keys=tmp_path / "keys.npy", out=tmp_path / "unused", add_block=256, spill_rows=spill_rows)
    shard = tmp_path / "shard"
    shard.mkdir()
    with pytest.raises(BuildError, match=r"^rows \[500, 3500\): the index holds 0 of them; FAISS placed 3000 in no "):
        add_rows(config, str(tmp_path / "trained.index"), 500, 3500, shard)
    assert not (shard / "index.faiss").exists()


def test_a_short_spill_file_is_an_error_and_the_lists_stay(tmp_path, rows, monkeypatch):
    """A spill file that does not hold its lists' bytes (FAISS wrote another layout, or nothing) is an
    OSError, and the index keeps its rows."""
    index = _load(_trained("IVF64,SQ8"))
    spill = ListSpill(index, tmp_path / "spill")
    index.add_with_ids(rows[:300], np.arange(300, dtype=np.int64))

    monkeypatch.setattr("retriever_server.datastore.spill.faiss.write_InvertedLists",
                        lambda lists, writer: None)  # a disk that took none of it
    with pytest.raises(OSError, match="holds .* bytes, not"):
        spill.spill()
    assert index.ntotal == 300 and spill.rows == 0


def test_spills_read_back_through_small_windows_give_the_same_file(tmp_path, rows, monkeypatch):
    """The merge reads each spill a window at a time: with one-page windows every list's piece crosses
    window boundaries, and the file is still FAISS's."""
    from retriever_server.datastore import spill as spill_module
    from retriever_server.datastore.stream_io import ALIGN, SequentialReader

    monkeypatch.setattr(spill_module, "SequentialReader",
                        lambda path, start: SequentialReader(path, start, window=ALIGN))
    ids = np.arange(4000, dtype=np.int64)
    reference = _load(_trained("IVF64,SQ8"))
    reference.add_with_ids(rows, ids)
    index = _load(_trained("IVF64,SQ8"))
    spill = ListSpill(index, tmp_path / "spill")
    for s in range(0, 4000, 900):
        index.add_with_ids(rows[s:s + 900], ids[s:s + 900])
        spill.spill()
    spill.write_index(tmp_path / "index.faiss")
    assert (tmp_path / "index.faiss").read_bytes() == faiss.serialize_index(reference).tobytes()


def test_a_write_error_in_a_spill_is_raised_and_a_later_spill_starts_clean(tmp_path, rows, monkeypatch):
    """A disk that fails under FAISS's serialiser: the OSError reaches the caller, the index keeps its
    rows, and spilling again (the disk back) gives FAISS's own file."""
    from retriever_server.datastore import stream_io

    index = _load(_trained("IVF64,SQ8"))
    spill = ListSpill(index, tmp_path / "spill")
    index.add_with_ids(rows[:500], np.arange(500, dtype=np.int64))

    def full(fd, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    with monkeypatch.context() as patched:
        patched.setattr(stream_io.os, "write", full)
        with pytest.raises(OSError, match="No space left"):
            spill.spill()
    assert index.ntotal == 500 and spill.rows == 0
    spill.spill()
    spill.write_index(tmp_path / "index.faiss")
    reference = _load(_trained("IVF64,SQ8"))
    reference.add_with_ids(rows[:500], np.arange(500, dtype=np.int64))
    assert (tmp_path / "index.faiss").read_bytes() == faiss.serialize_index(reference).tobytes()
