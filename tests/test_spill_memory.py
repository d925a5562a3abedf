"""Writing a spilled IVF index holds memory bounded by `spill_rows`, not by the largest inverted list.

Duplicate keys (repeated contexts in kNN-LM data) put most of a shard's rows in one list; the index file
must still be written from the spills a bounded window at a time, and still be FAISS's own, byte for byte.
"""

import tracemalloc

import faiss
import numpy as np
import pytest
from conftest import synthetic

from retriever_server.datastore import stream_io
from retriever_server.datastore.spill import ListSpill
from retriever_server.datastore.stream_io import ALIGN, SequentialReader

D, NLIST, ROWS, SPILL_ROWS = 64, 16, 40_000, 4_000
ROW_BYTES = D * 4 + 8  # IVF,Flat: a row's float32 code and its int64 id


@pytest.fixture(params=["direct", "buffered"])
def mode(request, monkeypatch):
    """O_DIRECT where the test's filesystem allows it, or forced off."""
    if request.param == "buffered":
        monkeypatch.setattr(stream_io, "DIRECT", 0)
    return request.param


def _duplicated_rows() -> np.ndarray:
    """ROWS rows of which 95% are one and the same row (all of them in one inverted list)."""
    rows = synthetic(ROWS, D, seed=21)
    same = np.random.default_rng(22).random(ROWS) < 0.95
    rows[same] = rows[0]
    return rows


def test_writing_an_index_with_one_huge_list_holds_about_spill_rows_rows(tmp_path, mode):
    """IVF16,Flat, 95% of 40,000 rows in one list, spilled every 4,000 rows (ten spills): Python's peak
    allocation while the index file is written stays within one spill's rows (plus 256 KiB), and the
    file is FAISS's write_index of the same rows added in one go."""
    rows = _duplicated_rows()
    ids = np.arange(ROWS, dtype=np.int64) * 7 + 3
    trained = faiss.index_factory(D, f"IVF{NLIST},Flat")
    trained.train(rows[:4000])
    body = faiss.serialize_index(trained)

    index = faiss.deserialize_index(body)
    spill = ListSpill(index, tmp_path / "spill")
    for s in range(0, ROWS, SPILL_ROWS):
        index.add_with_ids(rows[s:s + SPILL_ROWS], ids[s:s + SPILL_ROWS])
        spill.spill()
    assert len(spill.sizes) == ROWS // SPILL_ROWS and spill.rows == ROWS

    tracemalloc.start()
    try:
        spill.write_index(tmp_path / "index.faiss")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()

    bound = SPILL_ROWS * ROW_BYTES + (256 << 10)
    assert peak <= bound, f"peak {peak} bytes while writing the index, bound {bound}"
    reference = faiss.deserialize_index(body)
    reference.add_with_ids(rows, ids)
    assert (tmp_path / "index.faiss").read_bytes() == faiss.serialize_index(reference).tobytes()


def test_a_large_take_does_not_leave_the_reader_holding_its_size(tmp_path, mode):
    """After a take of many windows, the next take is served from a buffer of one window again."""
    window = 2 * ALIGN
    body = np.random.default_rng(5).integers(0, 256, size=20 * ALIGN + 77, dtype=np.uint8).tobytes()
    (tmp_path / "f.bin").write_bytes(body)
    with SequentialReader(tmp_path / "f.bin", start=3, window=window) as reader:
        assert bytes(reader.take(10 * ALIGN)) == body[3:3 + 10 * ALIGN]
        at = 3 + 10 * ALIGN
        for n in (1, ALIGN, 5):
            view = reader.take(n)
            assert bytes(view) == body[at:at + n]
            assert len(view.obj) <= window, "the reader kept the large take's buffer"
            at += n


@pytest.mark.parametrize("start", [0, 5, ALIGN + 3])
def test_copy_to_passes_the_bytes_in_windows(tmp_path, mode, start):
    """`copy_to` hands on the next n bytes in views of at most a window each, from any start, across
    windows, and then `take` goes on after them; a file that ends first is an EOFError."""
    window = 2 * ALIGN
    body = np.random.default_rng(6).integers(0, 256, size=9 * ALIGN + 123, dtype=np.uint8).tobytes()
    (tmp_path / "f.bin").write_bytes(body)
    pieces: list[bytes] = []

    def collect(view: memoryview) -> None:
        assert len(view.obj) <= window
        pieces.append(bytes(view))

    at = start
    with SequentialReader(tmp_path / "f.bin", start=start, window=window) as reader:
        for n in (0, 1, 7 * ALIGN + 9, 3, ALIGN - 1):
            pieces.clear()
            reader.copy_to(collect, n)
            assert b"".join(pieces) == body[at:at + n]
            at += n
        assert bytes(reader.take(10)) == body[at:at + 10]
        with pytest.raises(EOFError, match="ends at byte"):
            reader.copy_to(lambda view: None, len(body))
