"""The build's streaming I/O writes and reads the same bytes as plain file I/O, with O_DIRECT and without,
and a write error on its thread reaches the caller instead of hanging it."""

import errno
import hashlib
import threading

import numpy as np
import pytest

from retriever_server.datastore import stream_io
from retriever_server.datastore.row_parts import open_rows, write_parts_index
from retriever_server.datastore.stream_io import ALIGN, RowBlocks, SequentialReader, StreamWriter


@pytest.fixture(params=["direct", "buffered"])
def mode(request, monkeypatch):
    """O_DIRECT where the test's filesystem allows it, or forced off."""
    if request.param == "buffered":
        monkeypatch.setattr(stream_io, "DIRECT", 0)
    return request.param


def _pieces(seed: int) -> list[bytes]:
    """A header-sized piece, then pieces of sizes that straddle the writer's buffers."""
    rng = np.random.default_rng(seed)
    sizes = [128, 1, ALIGN - 1, ALIGN, 3 * ALIGN + 5, 0, 70_000, *rng.integers(1, 20_000, 30).tolist(), 17]
    return [rng.integers(0, 256, n, dtype=np.uint8).tobytes() for n in sizes]


@pytest.mark.parametrize("buffer_bytes", [ALIGN, 2 * ALIGN, 1 << 20])
def test_writer_writes_the_bytes_and_their_sha256(tmp_path, mode, buffer_bytes):
    pieces = _pieces(buffer_bytes)
    path = tmp_path / "out.bin"
    with StreamWriter(path, buffer_bytes=buffer_bytes, buffers=2) as out:
        for piece in pieces:
            out.write(piece)
        sha256 = out.close()
    expected = b"".join(pieces)
    assert path.read_bytes() == expected
    assert sha256 == hashlib.sha256(expected).hexdigest()
    if mode == "buffered":
        assert not out.direct


def test_writer_of_aligned_length_and_of_nothing(tmp_path, mode):
    for n in (0, 3 * ALIGN):
        body = bytes(range(256)) * (n // 256)
        with StreamWriter(tmp_path / f"{n}.bin", buffer_bytes=2 * ALIGN) as out:
            out.write(body)
            assert out.close() == hashlib.sha256(body).hexdigest()
        assert (tmp_path / f"{n}.bin").read_bytes() == body


def test_writer_takes_numpy_arrays(tmp_path, mode):
    rows = np.random.default_rng(0).standard_normal((1000, 24)).astype(np.float16)
    with StreamWriter(tmp_path / "rows.bin", buffer_bytes=ALIGN) as out:
        out.write(rows[:300])
        out.write(rows[300:])
        out.close()
    assert np.array_equal(np.fromfile(tmp_path / "rows.bin", dtype=np.float16).reshape(rows.shape), rows)


def test_a_write_error_on_the_thread_is_raised_and_nothing_hangs(tmp_path, monkeypatch):
    def full(fd, data):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(stream_io.os, "write", full)
    out = StreamWriter(tmp_path / "full.bin", buffer_bytes=ALIGN, buffers=2)
    with pytest.raises(OSError, match="No space left"):
        for _ in range(100):  # more buffers than the writer holds: a hang would stop here
            out.write(b"x" * ALIGN)
        out.close()
    assert not _writer_threads()


def test_an_error_in_the_caller_stops_the_thread(tmp_path):
    with pytest.raises(RuntimeError, match="caller"):
        with StreamWriter(tmp_path / "partial.bin", buffer_bytes=ALIGN) as out:
            out.write(b"y" * (3 * ALIGN))
            raise RuntimeError("the caller failed")
    assert not _writer_threads()


def _writer_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("write ")]


def _parts(tmp_path, rows: np.ndarray, sizes: list[int]):
    paths, start = [], 0
    for i, n in enumerate(sizes):
        paths.append(tmp_path / f"part{i}.npy")
        np.save(paths[-1], rows[start:start + n])
        start += n
    return write_parts_index(tmp_path / "rows.parts.json", paths)


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
@pytest.mark.parametrize(("start", "end", "block"), [(0, 1000, 64), (13, 977, 100), (500, 501, 7), (5, 5, 8)])
def test_row_blocks_are_the_rows(tmp_path, mode, dtype, start, end, block):
    """Blocks inside one file, across part boundaries, and none, from a .npy and from a parts index."""
    rows = np.random.default_rng(1).standard_normal((1000, 20)).astype(dtype)
    np.save(tmp_path / "rows.npy", rows)
    for source in (tmp_path / "rows.npy", _parts(tmp_path, rows, [300, 7, 693])):
        seen = []
        for s, e, got in RowBlocks(open_rows(source), start, end, block):
            assert got.shape == (e - s, 20) and got.dtype == dtype
            assert np.array_equal(got, rows[s:e])
            seen.append((s, e))
        assert seen == [(s, min(end, s + block)) for s in range(start, end, block)]


def test_leaving_the_block_closes_the_file_and_close_repeats_its_sha256(tmp_path):
    with StreamWriter(tmp_path / "closed.bin", buffer_bytes=ALIGN) as out:
        out.write(b"z" * (ALIGN + 3))
    assert (tmp_path / "closed.bin").read_bytes() == b"z" * (ALIGN + 3)
    assert out.close() == hashlib.sha256(b"z" * (ALIGN + 3)).hexdigest()
    assert not _writer_threads()


def test_without_checksum_the_bytes_are_the_same_and_no_sha256_is_taken(tmp_path):
    with StreamWriter(tmp_path / "plain.bin", buffer_bytes=ALIGN, checksum=False) as out:
        out.write(b"q" * (2 * ALIGN + 9))
        assert out.close() == ""
    assert (tmp_path / "plain.bin").read_bytes() == b"q" * (2 * ALIGN + 9)


@pytest.mark.parametrize("start", [0, 5, ALIGN + 3])
def test_sequential_reader_gives_the_bytes_in_order(tmp_path, mode, start):
    """Takes of every size, within a window, across windows and larger than one, from any start."""
    body = np.random.default_rng(4).integers(0, 256, size=7 * ALIGN + 123, dtype=np.uint8).tobytes()
    (tmp_path / "f.bin").write_bytes(body)
    sizes = [0, 1, 7, ALIGN - 1, 3 * ALIGN + 5, 2, ALIGN, 11]
    at = start
    with SequentialReader(tmp_path / "f.bin", start=start, window=2 * ALIGN) as reader:
        for n in sizes:
            n = min(n, len(body) - at)
            assert bytes(reader.take(n)) == body[at:at + n]
            at += n
        assert bytes(reader.take(len(body) - at)) == body[at:]
        with pytest.raises(EOFError, match="ends at byte"):
            reader.take(1)


@pytest.mark.parametrize("offset", [0, 1, 128])
def test_write_as_converts_into_the_buffers_as_astype_does(tmp_path, mode, offset):
    """Float32 rows written as float16 after `offset` bytes (an odd one makes a value straddle two
    buffers): the same bytes as numpy's astype, and their sha256."""
    rows = np.random.default_rng(5).standard_normal((301, 37)).astype(np.float32) * 1e3
    rows[0, :4] = [np.inf, -np.inf, 1e-8, 7e4]  # overflow, underflow and the edges convert as astype
    head = b"h" * offset
    with np.errstate(over="ignore"), StreamWriter(tmp_path / "rows.bin", buffer_bytes=ALIGN, buffers=2) as out:
        out.write(head)
        out.write_as(rows, np.float16)
        out.write_as(rows[:0], np.float16)
        sha256 = out.close()
    with np.errstate(over="ignore"):
        body = head + rows.astype(np.float16).tobytes()
    assert (tmp_path / "rows.bin").read_bytes() == body
    assert sha256 == hashlib.sha256(body).hexdigest()


def test_sequential_reader_windows_are_whole_pages(tmp_path):
    (tmp_path / "f.bin").write_bytes(b"x" * 10)
    with pytest.raises(ValueError, match="multiple of"):
        SequentialReader(tmp_path / "f.bin", window=ALIGN + 1)
