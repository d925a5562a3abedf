"""A build's inputs that used to get past its checks: factory strings whose index FAISS cannot train (the
process dies by a signal) or read back (a codec of no bytes), parts indexes with impossible shapes, untrusted
names and FAISS text that would break a message's one line, and a .npz saved where a shard's .npy belongs.
Small arrays and untrained indexes only: nothing here trains a codec or starts Ray."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import numpy as np
import pytest

from retriever_server.datastore.build_inputs import BuildConfig, BuildError, check_inputs
from retriever_server.datastore.headers import load_checked_array, read_checked_index
from retriever_server.datastore.index import check_factory
from retriever_server.datastore.manifest import DatastoreError
from retriever_server.datastore.resume import reusable_codec
from retriever_server.datastore.row_parts import open_rows

D = 8

# each of these killed the build's process in training (SIGFPE, SIGSEGV, SIGABRT), or trained a codec of
# 0 bytes a row that FAISS refuses to read back in every shard task; the part at fault, as the error names it
UNSIZED = {
    "PCA0,IVF4,Flat": "PCAMatrix transform has 0 output dimensions",
    "PCAW0,IVF4,Flat": "PCAMatrix transform has 0 output dimensions",
    "PCAR0,IVF4,Flat": "PCAMatrix transform has 0 output dimensions",
    "RR0,IVF4,Flat": "RandomRotationMatrix transform has 0 output dimensions",
    "ITQ0,IVF4,Flat": "ITQTransform transform has 0 output dimensions",
    "PCA0,IDMap,Flat": "PCAMatrix transform has 0 output dimensions",
    "OPQ0,IVF4,PQ2": "OPQMatrix transform has 0 sub-quantizers",
    "OPQ2_0,IVF4,PQ2": "OPQMatrix transform has 0 output dimensions",
    "IVF4,RQ0x8": "IndexIVFResidualQuantizer's quantizer has 0 sub-quantizers",
    "IVF4,PRQ0x2x4": "IndexIVFProductResidualQuantizer's quantizer has 0 sub-quantizers",
    "IVF4,PRQ2x0x4": "IndexIVFProductResidualQuantizer's quantizer has 0 sub-quantizers",
    "IVF4,PLSQ2x0x4": "IndexIVFProductLocalSearchQuantizer's quantizer has 0 sub-quantizers",
    "IVF4,RQ2x0": "IndexIVFResidualQuantizer's quantizer has 0 bits in a sub-quantizer",
    "IVF4,LSQ2x0": "IndexIVFLocalSearchQuantizer's quantizer has 0 bits in a sub-quantizer",
    "IVF4(RQ0x8),Flat": "IndexResidualQuantizer's quantizer has 0 sub-quantizers",
    "IVF4(PQ1x0),Flat": "product quantizer of 0 bits per code",
    "IVF4_HNSW0,Flat": "IndexHNSWFlat graph has 0 neighbours per node",
    "IVF4_HNSW1,Flat": "IndexHNSWFlat graph has 0 neighbours per node",  # M=1: FAISS's graph has no level
    "IDMap,HNSW1": "IndexHNSWFlat graph has 0 neighbours per node",
}


@pytest.mark.parametrize("factory", sorted(UNSIZED))
def test_a_factory_with_a_part_of_no_size_is_refused_before_training(factory):
    with pytest.raises(ValueError) as refused:
        check_factory(factory, D, "l2")
    message = str(refused.value)
    assert message.startswith(f"factory string {factory!r}") and "\n" not in message
    assert UNSIZED[factory] in message


@pytest.mark.parametrize("factory", ["IVF4,Flat", "IVF4,PQ2", "OPQ2,IVF4,PQ2", "PCA4,IVF4,Flat", "IVF4,RQ2x4",
                                     "IVF4,LSQ2x4", "IVF4,PRQ2x2x4", "IVF4,SQ8", "IVF4,SQfp16", "IVF4,RaBitQ",
                                     "IVF4_HNSW32,Flat", "IVF4(PQ2),Flat", "IDMap,Flat", "PCA4,IDMap,Flat"])
def test_factories_with_every_part_sized_still_pass(factory):
    check_factory(factory, D, "l2")  # does not raise


def test_the_build_refuses_a_transform_of_no_dimensions_before_any_work(tmp_path):
    np.save(tmp_path / "keys.npy", np.random.default_rng(0).standard_normal((200, D)).astype(np.float32))
    config = BuildConfig(keys=tmp_path / "keys.npy", out=tmp_path / "ds", factory="PCA0,IVF4,Flat", shards=1)
    with pytest.raises(BuildError, match=r"^factory string 'PCA0,IVF4,Flat'.* PCAMatrix transform has 0 output"):
        check_inputs(config)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keys.npy"]


def parts_index(folder: Path, name: str, shape, parts: list[dict]) -> Path:
    """A parts index written as text, so that its shape may hold what json.dumps would not write (1e400)."""
    path = folder / name
    dims = ", ".join(map(str, shape))
    path.write_text(f'{{"format": 1, "dtype": "<f4", "shape": [{dims}], "parts": {json.dumps(parts)}}}')
    return path


def test_a_parts_index_whose_shape_overflows_is_refused_naming_it(tmp_path):
    np.save(tmp_path / "part.npy", np.zeros((4, 2), np.float32))
    index = parts_index(tmp_path, "keys.parts.json", ["1e400", 2], [{"path": "part.npy", "rows": 4}])
    with pytest.raises(ValueError, match=re.escape(f"parts index {index}: its dtype '<f4' and shape")):
        open_rows(index)
    np.save(tmp_path / "keys.npy", np.zeros((4, 2), np.float32))
    for config in (BuildConfig(keys=index, out=tmp_path / "ds", factory="IDMap,Flat", shards=1),
                   BuildConfig(keys=tmp_path / "keys.npy", out=tmp_path / "ds", factory="IDMap,Flat", shards=1,
                               payloads={"v": index})):
        with pytest.raises(BuildError, match=r"keys.parts.json is not a loadable parts index: .*shape"):
            check_inputs(config)


def test_a_part_whose_header_claims_more_rows_than_int64_holds_is_truncated(tmp_path):
    """(2**62, 4) float32 is 2**66 bytes, which wraps to 0 in int64: a 192-byte file is not that array."""
    part = tmp_path / "part.npy"
    with open(part, "wb") as f:
        np.lib.format.write_array_header_1_0(f, {"descr": "<f4", "fortran_order": False, "shape": (2**62, 4)})
        f.write(b"\0" * (192 - f.tell()))
    assert part.stat().st_size == 192
    index = parts_index(tmp_path, "keys.parts.json", [2**62, 4], [{"path": "part.npy", "rows": 2**62}])
    with pytest.raises(ValueError, match=r"part.npy is truncated: 192 bytes, its header needs \d{20}"):
        open_rows(index)
    with pytest.raises(BuildError, match=r"keys.parts.json is not a loadable parts index: .*truncated"):
        check_inputs(BuildConfig(keys=index, out=tmp_path / "ds", factory="IDMap,Flat", shards=1))


@pytest.mark.parametrize("exists", [False, True])
def test_a_part_named_with_a_newline_is_shown_whole_and_escaped(tmp_path, exists):
    if exists:
        (tmp_path / "x\ny.npy").write_bytes(b"not an array")
    index = parts_index(tmp_path, "keys.parts.json", [4, 2], [{"path": "x\ny.npy", "rows": 4}])
    with pytest.raises(BuildError) as refused:
        check_inputs(BuildConfig(keys=index, out=tmp_path / "ds", factory="IDMap,Flat", shards=1))
    message = str(refused.value)
    assert "\n" not in message and f"part {tmp_path}/x\\ny.npy listed in {index}" in message


@pytest.mark.parametrize("factory", ["IVF4,Fl\nat", "IVF4,Fl\x1bat"])
def test_faiss_reason_for_a_bad_factory_is_kept_and_escaped(factory):
    with pytest.raises(ValueError) as refused:
        check_factory(factory, D, "l2")
    message = str(refused.value)
    assert message.isprintable(), message
    assert f"FAISS cannot build factory string {factory!r} for dimension {D}: " in message
    assert "could not parse code description" in message and "Error in " not in message


def test_a_codec_that_does_not_read_is_logged_on_one_line_with_faiss_reason(tmp_path, caplog):
    work = tmp_path / "w\nx"
    work.mkdir()
    (work / "trained.index").write_bytes(b"IwFl\0\0\0")  # cut short in its header
    with caplog.at_level(logging.WARNING, logger="retriever_server.datastore.resume"):
        assert not reusable_codec(work / "trained.index")
    [record] = caplog.records
    assert record.getMessage().isprintable() and "read error in" in record.getMessage()
    assert not (work / "trained.index").exists()


def test_a_shard_index_that_does_not_read_is_named_on_one_line(tmp_path):
    path = tmp_path / "w\nx.index"
    path.write_bytes(b"IwFl\0\0\0")
    with pytest.raises(DatastoreError) as refused:
        read_checked_index(path, None, None, mmap=False)
    message = str(refused.value)
    assert message.isprintable() and "is not a readable FAISS index: " in message and "read error in" in message


def test_a_npz_archive_at_a_shards_npy_path_is_a_datastore_error(tmp_path):
    path = tmp_path / "keys.npy"
    with open(path, "wb") as f:
        np.savez(f, keys=np.zeros((4, 2), np.float32))
    with pytest.raises(DatastoreError, match=re.escape(f"{path} is a .npz archive")):
        load_checked_array(path, "float32", (4, 2))
