"""A build publishes only what it made from the inputs it began with, and keeps what a rerun can resume:
the output it may replace is fixed before the inputs are read, an input changed mid-build (or between its
check and the work folder) is refused, a failed retrain keeps the finished shards, a shard of another codec
is built again (one an earlier version finished, which names no codec, only if the codec was trained again);
a shard task holds at most `spill_rows` rows' codes; and an index the shards cannot fill (IVF FlatDedup) is
refused."""

from __future__ import annotations

import dataclasses
import errno
import json
import logging
import os
import re
from pathlib import Path

import faiss
import numpy as np
import pytest
from conftest import synthetic

from retriever_server.datastore import build as build_module
from retriever_server.datastore import index as ix
from retriever_server.datastore.build import BuildConfig, BuildError, build_datastore
from retriever_server.datastore.build_inputs import check_inputs
from retriever_server.datastore.manifest import Manifest, file_sha256, read_manifest, write_manifest
from retriever_server.datastore.publish import exchange
from retriever_server.datastore.resume import reusable_shard
from retriever_server.datastore.shard_fill import add_rows
from retriever_server.datastore.spill import ListSpill

D = 16


@pytest.fixture(scope="module")
def keys() -> np.ndarray:
    return synthetic(1000, D, seed=5)


def _config(tmp_path: Path, keys: np.ndarray, **kwargs) -> BuildConfig:
    np.save(tmp_path / "keys.npy", keys)
    return BuildConfig(keys=tmp_path / "keys.npy", out=tmp_path / "ds", factory="IVF8,Flat", **kwargs)


def _empty_datastore(folder: Path) -> Path:
    """A readable datastore of no rows (what another build may publish)."""
    folder.mkdir()
    write_manifest(folder, Manifest(dimension=1, metric="l2", factory="IDMap,Flat", ntotal=0, nlist=0,
                                    default_nprobe=1, has_keys=False, payloads=(), shards=()))
    return folder


def _stopped_before_publishing(config: BuildConfig, monkeypatch) -> Path:
    """Runs the build up to its manifest, which a full disk stops; returns the work folder left to resume."""
    def disk_full(directory, manifest):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(build_module, "write_manifest", disk_full)
    with pytest.raises(BuildError, match="No space left on device"):
        build_datastore(config, progress=False)
    monkeypatch.undo()
    work = config.out.parent / f".{config.out.name}.partial"
    assert (work / "shard-00000" / ".done.json").is_file()
    return work


@pytest.mark.parametrize("before", [False, True], ids=["nothing-there", "a-datastore-there"])
def test_overwrite_never_replaces_a_datastore_published_while_the_build_started(tmp_path, keys, monkeypatch,
                                                                                before):
    """Another build publishes at OUT while this one reads its inputs: --overwrite replaces only what was
    there when the build began, so the build is refused and that datastore is left."""
    config = _config(tmp_path, keys[:500], overwrite=True)
    if before:
        _empty_datastore(config.out)
    real = build_module.check_inputs

    def while_another_build_publishes(config):
        inputs = real(config)
        exchange(_empty_datastore(tmp_path / "theirs"), config.out) if before else _empty_datastore(config.out)
        return inputs

    monkeypatch.setattr(build_module, "check_inputs", while_another_build_publishes)
    with pytest.raises(BuildError, match=re.escape(f"{config.out} appeared or was replaced while the build started; "
                                                   "refusing to replace it")):
        build_datastore(config, progress=False)
    assert read_manifest(config.out).ntotal == 0
    assert not (tmp_path / ".ds.partial").exists()


def test_an_ivf_flat_dedup_factory_is_refused_before_any_work(tmp_path, keys):
    """IndexIVFFlatDedup drops a row equal to one in its list: shards filled in parts cannot do so as FAISS
    does in one go, and a server finds fewer rows than the manifest says."""
    with pytest.raises(ValueError, match=r"factory string 'IVF16,FlatDedup' makes an IVF FlatDedup index"):
        ix.check_factory("IVF16,FlatDedup", D, "l2")
    with pytest.raises(BuildError, match=r"'IVF8,FlatDedup' makes an IVF FlatDedup index, which .*IVF8,Flat"):
        check_inputs(dataclasses.replace(_config(tmp_path, keys), factory="IVF8,FlatDedup"))


def test_a_shard_task_holds_at_most_spill_rows_rows_codes(tmp_path, monkeypatch):
    """Blocks larger than `spill_rows` are spilled within: never more than `spill_rows` rows in memory, and
    the index file is the one FAISS writes of the index filled in one go."""
    rows = synthetic(6000, D, seed=6)
    config = dataclasses.replace(_config(tmp_path, rows), add_block=1500, spill_rows=1000)
    ix.write_index(ix.new_trained_index("IVF16,Flat", "l2", rows, 0), tmp_path / "trained.index")
    held, real = [], ListSpill.spill

    def counting(self):
        held.append(int(self.ivf.invlists.compute_ntotal()))
        real(self)

    monkeypatch.setattr(ListSpill, "spill", counting)
    (tmp_path / "shard").mkdir()
    add_rows(config, str(tmp_path / "trained.index"), 0, len(rows), tmp_path / "shard")
    assert held == [1000] * 6
    reference = faiss.read_index(str(tmp_path / "trained.index"))
    reference.add_with_ids(rows, np.arange(len(rows), dtype=np.int64))
    assert (tmp_path / "shard" / "index.faiss").read_bytes() == faiss.serialize_index(reference).tobytes()


def test_a_failed_retrain_on_resume_keeps_the_finished_shards(ray_cluster, tmp_path, keys, monkeypatch):
    """The codec left by a build does not read and training it again fails (a full disk): the finished
    shards stay for the next run, which reuses them."""
    config = _config(tmp_path, keys, shards=2)
    work = _stopped_before_publishing(config, monkeypatch)
    (work / "trained.index").write_bytes(b"a codec cut short")
    stamp = (work / "shard-00000" / "index.faiss").stat().st_mtime_ns

    def full(index, path):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(ix, "write_index", full)
    with pytest.raises(BuildError, match="training IVF8,Flat .* No space left on device"):
        build_datastore(config, progress=False)
    monkeypatch.undo()
    assert (work / "shard-00000" / ".done.json").is_file() and (work / "shard-00001" / ".done.json").is_file()
    assert not (work / "trained.index").exists()
    build_datastore(config, progress=False)
    assert (config.out / "shard-00000" / "index.faiss").stat().st_mtime_ns == stamp, "finished shard was redone"


def test_an_input_changed_while_the_build_ran_is_not_published(ray_cluster, tmp_path, keys, monkeypatch):
    """An input replaced after the shards read it (an encode of the same source): the build refuses to publish
    shards and codec of two inputs; a rerun starts over from the new input."""
    config = _config(tmp_path, keys, shards=2)
    real = build_module.fsync_tree

    def input_replaced(root):
        os.utime(config.keys, ns=(config.keys.stat().st_atime_ns, config.keys.stat().st_mtime_ns + 10**9))
        real(root)

    monkeypatch.setattr(build_module, "fsync_tree", input_replaced)
    with pytest.raises(BuildError, match=re.escape(f"{config.keys} changed while the build ran")):
        build_datastore(config, progress=False)
    monkeypatch.undo()
    assert not config.out.exists() and (tmp_path / ".ds.partial" / "shard-00000").is_dir()
    manifest = build_datastore(config, progress=False)
    assert manifest.ntotal == len(keys)


def test_an_input_replaced_after_it_was_checked_is_refused_before_any_work(ray_cluster, tmp_path, keys, monkeypatch):
    """The keys are replaced (more rows) between the check that reads their row count and the work folder
    (the output's lock and Ray's start lie between): the build refuses, as it would at publishing, rather
    than build the old row count over the new file and compare the publish check with the new file."""
    config = _config(tmp_path, keys, shards=2)
    real = build_module.check_inputs

    def then_replaced(config):
        inputs = real(config)
        np.save(config.keys, synthetic(1200, D, seed=8))
        return inputs

    monkeypatch.setattr(build_module, "check_inputs", then_replaced)
    with pytest.raises(BuildError, match=re.escape(f"{config.keys} changed while the build ran")):
        build_datastore(config, progress=False)
    assert not config.out.exists() and not (tmp_path / ".ds.partial").exists()


def test_a_shard_built_with_another_codec_is_built_again(ray_cluster, tmp_path, keys, monkeypatch, caplog):
    """The codec in the work folder is not the one its finished shards were built with (trained again,
    on a GPU not reproducibly): the shards are built again with it, never published beside it."""
    config = _config(tmp_path, keys, shards=2)
    work = _stopped_before_publishing(config, monkeypatch)
    other = ix.new_trained_index("IVF8,Flat", "l2", keys, seed=7)
    ix.write_index(other, work / "trained.index")
    with caplog.at_level(logging.WARNING, logger="retriever_server"):
        manifest = build_datastore(config, progress=False)
    assert "shard-00000 from the earlier run was built with another codec" in caplog.text
    centroids = other.quantizer.reconstruct_n(0, 8)
    for shard in manifest.shards:
        built = faiss.read_index(str(config.out / shard.name / "index.faiss"))
        np.testing.assert_array_equal(faiss.extract_index_ivf(built).quantizer.reconstruct_n(0, 8), centroids)


@pytest.mark.parametrize("retrained", [False, True], ids=["codec-reused", "codec-trained-again"])
def test_a_shard_finished_before_shards_named_their_codec_is_reused_with_the_codec_of_its_run(tmp_path, retrained):
    """A `.done.json` an earlier version wrote names no codec: its shard was built with the codec saved beside
    it, so it is reused while that codec is (an upgrade loses no finished shard), and built again after a
    retrain."""
    shard = tmp_path / "shard-00000"
    shard.mkdir()
    (shard / "index.faiss").write_bytes(b"codes")
    entry = {"name": shard.name, "id_start": 0, "id_end": 10, "files": {"index.faiss": {
        "bytes": 5, "sha256": file_sha256(shard / "index.faiss")}}}
    (shard / ".done.json").write_text(json.dumps(entry))
    assert reusable_shard(shard, 0, 10, "a" * 64, retrained=retrained) == (None if retrained else entry)
    assert shard.exists() is not retrained
