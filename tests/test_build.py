"""The build job on a real local Ray cluster: layout, checksums, atomic publishing, resuming."""

import dataclasses
import errno
import json
import logging
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import threading
import time
import types
from pathlib import Path

import faiss
import numpy as np
import pytest
import ray
from conftest import build, damaged_copy, synthetic
from faiss.contrib.inspect_tools import get_invlist

from retriever_server.datastore import build as build_module
from retriever_server.datastore import build_inputs, publish
from retriever_server.datastore.build import FAULT_ENV, BuildConfig, BuildError, build_datastore
from retriever_server.datastore.build_inputs import check_inputs
from retriever_server.datastore.manifest import (
    DatastoreError,
    describe_files,
    file_sha256,
    read_manifest,
    verify_shard,
    write_manifest,
)
from retriever_server.serving.shard import Shard, ShardOptions

pytestmark = [pytest.mark.ray]
N, D = 6000, 32


@pytest.fixture(scope="module")
def keys():
    return synthetic(N, D, seed=3)


@pytest.fixture(scope="module")
def datastore(ray_cluster, keys, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("build")
    values = np.arange(N, dtype=np.int32) * 7
    tokens = np.arange(N * 4, dtype=np.int32).reshape(N, 4)
    return build(tmp, keys, "ds", shards=3, keep_keys=True, factory="IVF32,PQ8", seed=5,
                 payload_arrays={"values": values, "tokens": tokens})


def test_layout_ranges_and_checksums(datastore, keys):
    manifest = read_manifest(datastore)
    assert manifest.ntotal == N and manifest.dimension == D and manifest.nlist == 32
    assert [s.id_start for s in manifest.shards] == [0, 2000, 4000]
    assert [s.id_end for s in manifest.shards] == [2000, 4000, 6000]
    for entry in manifest.shards:
        assert {"index.faiss", "keys.npy", "payload.values.npy", "payload.tokens.npy"} <= set(entry.files)
        index = faiss.read_index(str(datastore / entry.name / "index.faiss"))
        assert index.ntotal == entry.ntotal
        stored = np.load(datastore / entry.name / "keys.npy")
        np.testing.assert_array_equal(stored, keys[entry.id_start:entry.id_end].astype(np.float16))
        values = np.load(datastore / entry.name / "payload.values.npy")
        np.testing.assert_array_equal(values, np.arange(entry.id_start, entry.id_end) * 7)
    assert not list(datastore.parent.glob(".ds.*")), "the build left its work directory behind"
    assert not (datastore / "build.json").exists() and not (datastore / "trained.index").exists()


def _stored_ids(ivf) -> np.ndarray:
    return np.sort(np.concatenate([get_invlist(ivf.invlists, lst)[0] for lst in range(ivf.nlist)]))


def test_shards_share_one_trained_codec(datastore):
    """Each shard's ids are its rows, and all shards hold the same coarse quantizer and PQ codebooks."""
    quantizers, codebooks = [], []
    for entry in read_manifest(datastore).shards:
        index = faiss.read_index(str(datastore / entry.name / "index.faiss"))
        ivf = faiss.downcast_index(faiss.extract_index_ivf(index))
        np.testing.assert_array_equal(_stored_ids(ivf), np.arange(entry.id_start, entry.id_end))
        quantizers.append(ivf.quantizer.reconstruct_n(0, ivf.nlist))
        codebooks.append(faiss.vector_to_array(ivf.pq.centroids))
    assert codebooks[0].size == 8 * 256 * (D // 8)
    for quantizer, codebook in zip(quantizers[1:], codebooks[1:]):
        np.testing.assert_array_equal(quantizer, quantizers[0])
        np.testing.assert_array_equal(codebook, codebooks[0])


def test_tampered_shard_file_is_refused_naming_it(datastore, tmp_path):
    copy = damaged_copy(datastore, tmp_path / "copy", "shard-00001/payload.values.npy")
    Shard.open(copy, 0)  # other shards still load
    with pytest.raises(DatastoreError, match=r"shard-00001/payload.values.npy checksum does not match"):
        Shard.open(copy, 1)


def test_two_builds_of_identical_inputs_have_one_checksum(datastore, keys, tmp_path):
    """Another build of the same inputs, from another directory and at another time, on whatever Ray
    nodes, spilling its lists to disk every 500 rows instead of once: the same files, checksum and
    version; only the build record (outside the hash) differs. The sha256 the build took while writing
    index.faiss and keys.npy equals a fresh read of each file."""
    values = np.arange(N, dtype=np.int32) * 7
    tokens = np.arange(N * 4, dtype=np.int32).reshape(N, 4)
    again = build(tmp_path, keys, "again", shards=3, keep_keys=True, factory="IVF32,PQ8", seed=5,
                  payload_arrays={"values": values, "tokens": tokens}, add_block=256, spill_rows=500)
    first, second = read_manifest(datastore), read_manifest(again)
    assert [s.files for s in first.shards] == [s.files for s in second.shards]
    assert (second.checksum, second.version) == (first.checksum, first.version)
    assert first.build["keys"] != second.build["keys"]  # recorded, not hashed
    seconds = second.build["shard_seconds"]  # each shard task's own, within the add phase
    assert len(seconds) == 3 and all(0 < s <= second.build["add_seconds"] + 0.01 for s in seconds)
    assert len(second.build["shard_phases"]) == 3
    for phases, total in zip(second.build["shard_phases"], seconds):  # the task's seconds, phase by phase
        assert {"read", "add", "index"} <= set(phases) and sum(phases.values()) <= total + 0.01
    body = json.loads((again / "manifest.json").read_text())
    assert body["checksum"] == first.checksum and body["version"] == first.version
    for entry in second.shards:
        assert {"index.faiss", "keys.npy"} <= set(entry.files)
        for name, described in describe_files(again / entry.name).items():
            assert entry.files[name].sha256 == described.sha256 == file_sha256(again / entry.name / name)
        assert np.array_equal(np.load(again / entry.name / "keys.npy"),
                              keys[entry.id_start:entry.id_end].astype(np.float16))


def test_headers_are_checked_without_full_verification(datastore, tmp_path):
    """With verify off, sizes and headers still are: a FAISS header or a .npy header that disagrees
    with the manifest is refused, naming the file and the field."""
    entry = read_manifest(datastore).shards[0]
    copy = tmp_path / "copy"
    subprocess.run(["cp", "-r", str(datastore), str(copy)], check=True)
    index_path = copy / "shard-00000" / "index.faiss"
    data = bytearray(index_path.read_bytes())
    data[8:16] = np.int64(entry.ntotal + 1).tobytes()  # ntotal, after the fourcc and d
    index_path.write_bytes(bytes(data))
    with pytest.raises(DatastoreError, match=r"shard-00000/index.faiss header has ntotal 2001; the manifest says 2000"):
        Shard.open(copy, 0, ShardOptions(verify=False))
    keys_path = copy / "shard-00001" / "keys.npy"
    np.save(keys_path, np.load(keys_path).T.copy())  # same bytes, shape (d, n)
    with pytest.raises(DatastoreError, match=r"shard-00001/keys.npy header says float16 \(32, 2000\)"):
        Shard.open(copy, 1, ShardOptions(verify=False))
    Shard.open(copy, 2, ShardOptions(verify=False))


def test_edited_manifest_and_wrong_format_are_refused(datastore, tmp_path):
    copy = tmp_path / "copy"
    subprocess.run(["cp", "-r", str(datastore), str(copy)], check=True)
    body = json.loads((copy / "manifest.json").read_text())
    body["ntotal"] = 1
    (copy / "manifest.json").write_text(json.dumps(body))
    with pytest.raises(DatastoreError, match="manifest.json checksum does not match"):
        read_manifest(copy)
    body["format_version"] = 99
    (copy / "manifest.json").write_text(json.dumps(body))
    with pytest.raises(DatastoreError, match="format version 99"):
        read_manifest(copy)
    body["format_version"] = "1\n2026-12-07 01:00:00 INFO all shards verified\x1b[2K"  # a forged log line
    (copy / "manifest.json").write_text(json.dumps(body))
    with pytest.raises(DatastoreError) as forged:
        read_manifest(copy)
    message = str(forged.value)
    assert "\n" not in message and "\x1b" not in message and 'format version "1\\n2026' in message


def test_a_shard_name_other_than_the_builds_is_refused_escaped(datastore, tmp_path):
    """Shard names reach logs and statuses: a manifest whose checksum matches but whose name is not
    `shard-00000`'s form (a newline in it, say) is refused, the name escaped."""
    from retriever_server.datastore.manifest import ShardEntry

    manifest = read_manifest(datastore)
    evil = ShardEntry("shard-00000\nFORGED LINE", manifest.shards[0].id_start, manifest.shards[0].id_end,
                      manifest.shards[0].files)
    body = dataclasses.replace(manifest, shards=(evil, *manifest.shards[1:])).to_json()  # its own checksum
    (tmp_path / "manifest.json").write_text(json.dumps(body))
    with pytest.raises(DatastoreError, match=r'shards\[0\]\.name is "shard-00000\\nFORGED LINE", not \'shard-00000\''):
        read_manifest(tmp_path)


@pytest.mark.parametrize("change, words", [
    (lambda m, s: dataclasses.replace(s, files={}), r"shards\[0\]\.files lists \[\], not the shard's files"),
    (lambda m, s: dataclasses.replace(s, files={**s.files, "/etc/hostname": s.files["index.faiss"]}),
     r"shards\[0\]\.files lists .*/etc/hostname"),
    (lambda m, s: dataclasses.replace(m, metric="cosine"), r'metric is "cosine", not one of'),
    (lambda m, s: dataclasses.replace(m, payloads=(dataclasses.replace(m.payloads[0], name="../x"),)),
     r'payload name "../x" is not a plain name'),
], ids=["a-file-left-out", "a-path-outside", "a-metric-faiss-lacks", "a-payload-path"])
def test_a_manifest_listing_other_files_than_a_server_opens_is_refused(datastore, tmp_path, change, words):
    """A server opens index.faiss, keys.npy and payload.NAME.npy by name: a manifest (its checksum made to
    match) that left one out let it load unchecked, one that listed /etc/hostname had it read. Each shard
    must list exactly its files, payload names must be plain, and the metric one FAISS has."""
    manifest = read_manifest(datastore)
    if not manifest.payloads:
        pytest.skip("needs a datastore with a payload")
    changed = change(manifest, manifest.shards[0])
    if isinstance(changed, type(manifest.shards[0])):
        changed = dataclasses.replace(manifest, shards=(changed, *manifest.shards[1:]))
    (tmp_path / "manifest.json").write_text(json.dumps(changed.to_json()))  # its own checksum
    with pytest.raises(DatastoreError, match=words):
        read_manifest(tmp_path)


@pytest.mark.parametrize(
    "malform",
    [
        lambda body: [],
        lambda body: "text",
        lambda body: None,
        lambda body: {k: v for k, v in body.items() if k != "nlist"},
        lambda body: {**body, "shards": [{**body["shards"][0], "files": []}]},
        lambda body: {**body, "shards": [{**body["shards"][0], "files": {"index.faiss": [1, 2]}}]},
        lambda body: {**body, "shards": 5},
        lambda body: {**body, "payloads": [{"name": "x"}]},
        lambda body: {**body, "shards": [{**body["shards"][0], "id_start": "zero"}]},
    ],
)
def test_malformed_manifest_is_a_datastore_error_naming_it(datastore, tmp_path, malform):
    body = json.loads((datastore / "manifest.json").read_text())
    (tmp_path / "manifest.json").write_text(json.dumps(malform(body)))
    with pytest.raises(DatastoreError, match=r"manifest\.json"):
        read_manifest(tmp_path)


def test_manifest_and_its_directory_are_fsynced(datastore, tmp_path, monkeypatch):
    synced = []
    real_fsync = os.fsync

    def spy(fd):
        synced.append(stat.S_ISDIR(os.fstat(fd).st_mode))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", spy)
    write_manifest(tmp_path, read_manifest(datastore))
    assert synced == [False, True], "the manifest file, then its directory"
    assert read_manifest(tmp_path) == read_manifest(datastore)


def test_existing_output_needs_overwrite_and_is_replaced_whole(ray_cluster, datastore, keys, tmp_path):
    with pytest.raises(BuildError, match="already exists; pass --overwrite"):
        build_datastore(BuildConfig(keys=tmp_path / "x.npy", out=datastore), progress=False)
    (tmp_path / "notes").mkdir()  # not a datastore: --overwrite would not help, and the error says so first
    for overwrite in (False, True):
        with pytest.raises(BuildError, match="notes exists and is not a datastore; .* choose another output"):
            build_datastore(BuildConfig(keys=tmp_path / "x.npy", out=tmp_path / "notes", overwrite=overwrite),
                            progress=False)
    out = build(tmp_path, keys[:3000], "small", shards=2, factory="IVF16,Flat")
    before = read_manifest(out).version
    build(tmp_path, keys[:4000], "small", shards=2, factory="IVF16,Flat", overwrite=True)
    after = read_manifest(out)
    assert after.ntotal == 4000 and after.version != before


def _saved_config(tmp_path, keys, **kwargs) -> BuildConfig:
    np.save(tmp_path / "keys.npy", keys)
    return BuildConfig(keys=tmp_path / "keys.npy", out=tmp_path / "ds", **{"factory": "IVF16,Flat", **kwargs})


def test_replacing_a_datastore_never_leaves_its_name_empty(ray_cluster, keys, tmp_path, monkeypatch):
    config = _saved_config(tmp_path, keys[:2000], shards=2)
    build_datastore(config, progress=False)
    present = []
    real_replace = os.replace

    def spy(src, dst, *args, **kwargs):
        real_replace(src, dst, *args, **kwargs)
        present.append((config.out / "manifest.json").is_file())

    monkeypatch.setattr(os, "replace", spy)
    manifest = build_datastore(dataclasses.replace(config, overwrite=True, seed=1), progress=False)
    assert present and all(present), "the datastore's name was briefly empty"
    assert read_manifest(config.out).version == manifest.version
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds", "keys.npy"]
    assert not (config.out / "build.json").exists() and not (config.out / "trained.index").exists()


def test_replacing_without_renameat2_falls_back_to_two_renames(ray_cluster, keys, tmp_path, monkeypatch, caplog):
    config = _saved_config(tmp_path, keys[:2000], shards=2)
    build_datastore(config, progress=False)
    monkeypatch.setattr(publish, "exchange", lambda a, b: False)
    with caplog.at_level(logging.WARNING, logger="retriever_server.datastore.build"):
        manifest = build_datastore(dataclasses.replace(config, overwrite=True, seed=1), progress=False)
    assert "renameat2" in caplog.text
    assert read_manifest(config.out).version == manifest.version
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds", "keys.npy"]


def test_overwrite_deletes_nothing_that_came_into_the_output_while_it_published(ray_cluster, keys, tmp_path,
                                                                                 monkeypatch, caplog):
    """--overwrite checked the output once before the fsync of every shard file (minutes, on a large build):
    a file put in the old datastore's folder meanwhile was swapped out and deleted with it. The output is
    checked again after the fsync, and what the swap took out is deleted only if it is a datastore alone."""
    config = dataclasses.replace(_saved_config(tmp_path, keys[:2000], shards=2), overwrite=True)
    build_datastore(config, progress=False)
    real_fsync, real_replace = build_module.fsync_tree, build_module.replace_directory

    def notes_during_fsync(path):
        real_fsync(path)
        (config.out / "notes.txt").write_text("mine")

    monkeypatch.setattr(build_module, "fsync_tree", notes_during_fsync)
    with pytest.raises(BuildError, match=r"holds 'notes.txt' besides its datastore"):
        build_datastore(dataclasses.replace(config, seed=1), progress=False)
    assert (config.out / "notes.txt").read_text() == "mine"
    (config.out / "notes.txt").unlink()
    monkeypatch.setattr(build_module, "fsync_tree", real_fsync)
    replaced = []

    def notes_at_the_swap(work, out, overwrite=True):  # after the last check, before the swap
        (out / "notes.txt").write_text("mine")
        replaced.append(real_replace(work, out, overwrite=overwrite))
        return replaced[-1]

    monkeypatch.setattr(build_module, "replace_directory", notes_at_the_swap)
    with caplog.at_level(logging.WARNING, logger="retriever_server.datastore.build"):
        manifest = build_datastore(dataclasses.replace(config, seed=2), progress=False)
    assert read_manifest(config.out).version == manifest.version  # published...
    assert 0 < manifest.build["train_size"] <= 2000  # the rows the codec was trained on (it said 0 for "auto")
    (kept,) = tmp_path.glob(".ds.replaced-*")  # ...and the file kept, under a name no later build clears
    assert (kept / "notes.txt").read_text() == "mine" and not replaced[0].exists()
    assert f"kept the folder this build replaced, at {kept}" in caplog.text
    monkeypatch.setattr(build_module, "replace_directory", real_replace)
    build_datastore(dataclasses.replace(config, seed=3), progress=False)
    assert (kept / "notes.txt").read_text() == "mine"


def test_a_folder_that_appears_at_the_output_during_the_build_is_never_replaced(ray_cluster, keys, tmp_path,
                                                                                   monkeypatch):
    """The output is checked again when the build publishes: a folder made there meanwhile stays as it is,
    with or without --overwrite (it is not a datastore), and the finished build waits in its .partial."""
    config = _saved_config(tmp_path, keys[:2000], shards=2)
    real_manifest = build_module._manifest

    def meanwhile(*args, **kwargs):  # someone writes their thesis where the build will publish
        config.out.mkdir()
        (config.out / "thesis.tex").write_text("years of work")
        return real_manifest(*args, **kwargs)

    monkeypatch.setattr(build_module, "_manifest", meanwhile)
    with pytest.raises(BuildError, match="ds exists and is not a datastore; refusing to replace it"):
        build_datastore(config, progress=False)
    assert (config.out / "thesis.tex").read_text() == "years of work"
    assert (tmp_path / ".ds.partial" / "trained.index").is_file()  # the build's work, resumable
    (config.out / "thesis.tex").unlink()
    config.out.rmdir()
    monkeypatch.setattr(publish, "check_output", lambda out, overwrite: None)  # as if it came after the check
    monkeypatch.setattr(build_module, "check_output", lambda out, overwrite: None)
    with pytest.raises(BuildError, match="appeared or was replaced while the build ran; refusing to replace it"):
        build_datastore(config, progress=False)
    assert (config.out / "thesis.tex").read_text() == "years of work"


def test_a_datastore_put_at_the_output_while_the_build_ran_is_not_replaced(ray_cluster, keys, datastore, tmp_path,
                                                                           monkeypatch):
    """--overwrite replaces the datastore that was at the output when the build began, and nothing else: one
    put there while it ran (the output was absent, or held another) was swapped out and deleted."""
    config = dataclasses.replace(_saved_config(tmp_path, keys[:2000], shards=2), overwrite=True)
    real_manifest = build_module._manifest
    version = read_manifest(datastore).version

    def meanwhile(*args, **kwargs):  # another datastore is copied to where the build will publish
        shutil.rmtree(config.out, ignore_errors=True)
        shutil.copytree(datastore, config.out)
        return real_manifest(*args, **kwargs)

    monkeypatch.setattr(build_module, "_manifest", meanwhile)
    for before in ("absent", "another datastore"):
        if before != "absent":
            shutil.copytree(datastore, config.out, dirs_exist_ok=False)
        with pytest.raises(BuildError, match="appeared or was replaced while the build ran"):
            build_datastore(config, progress=False)
        assert read_manifest(config.out).version == version  # kept as it was put there
        shutil.rmtree(config.out)


def test_overwrite_replaces_a_datastore_only_and_one_build_at_a_time_writes_an_output(ray_cluster, keys, tmp_path):
    """A folder holding a manifest.json that is not a datastore's is not replaced by --overwrite; a second
    build of an output another build is writing is refused, and the first one's lock goes with it."""
    config = _saved_config(tmp_path, keys[:2000], shards=2)
    config.out.mkdir()
    (config.out / "manifest.json").write_text('{"name": "a browser extension"}')
    (config.out / "background.js").write_text("chrome.runtime")
    with pytest.raises(BuildError, match="ds exists and is not a datastore; refusing to replace it"):
        build_datastore(dataclasses.replace(config, overwrite=True), progress=False)
    assert sorted(p.name for p in config.out.iterdir()) == ["background.js", "manifest.json"]
    other = dataclasses.replace(config, out=tmp_path / "fresh")
    with publish.output_held(other.out, overwrite=False):  # another build holds it
        with pytest.raises(BuildError, match="another build is writing .*fresh: wait for it to end"):
            build_datastore(other, progress=False)
        assert not (tmp_path / ".fresh.partial").exists()
    build_datastore(other, progress=False)
    assert read_manifest(other.out).ntotal == 2000 and not (tmp_path / ".fresh.lock").exists()


def test_a_build_that_opened_the_lock_file_as_another_build_ended_does_not_share_the_lock(tmp_path, monkeypatch):
    """Between this build's open of the lock file and its flock, the build holding it ends (unlinking the
    file, releasing its lock) and a third one locks a new file at the path: this build is refused, not a
    second holder of a lock on a file no one else can see."""
    import fcntl

    out = tmp_path / "ds"
    first, third = publish.output_held(out, overwrite=False), publish.output_held(out, overwrite=False)
    first.__enter__()
    flock, turns = fcntl.flock, []

    def others_meanwhile(f, operation):
        if not turns:
            turns.append(1)
            first.__exit__(None, None, None)
            third.__enter__()
        return flock(f, operation)

    monkeypatch.setattr(publish.fcntl, "flock", others_meanwhile)
    try:
        with pytest.raises(BuildError, match="another build is writing .*ds: wait for it to end"):
            with publish.output_held(out, overwrite=False):
                pass
    finally:
        third.__exit__(None, None, None)
    assert turns and not (tmp_path / ".ds.lock").exists()


@pytest.mark.parametrize("error, words", [
    (FileNotFoundError("part /in/b.npy listed in /in/k.parts.json not found"),
     "failed: part /in/b.npy listed in /in/k.parts.json not found"),
    (FileNotFoundError(errno.ENOENT, "No such file or directory", "/in/keys.npy"),
     "failed: cannot read /in/keys.npy: No such file or directory"),
    (OSError(errno.ENOSPC, "No space left on device"), "failed: cannot write /out/s.tmp: No space left on device"),
    (PermissionError(errno.EACCES, "Permission denied", "/out/s.tmp/index.faiss"),
     "failed: cannot write /out/s.tmp/index.faiss: Permission denied"),
], ids=["a-part-gone", "an-input-gone", "disk-full", "not-writable"])
def test_a_build_error_says_whether_an_input_or_the_output_failed(error, words):
    """An input part deleted while the build ran was reported as "cannot write" the shard's folder."""
    with pytest.raises(BuildError) as failed, build_inputs.as_build_error("adding rows [0, 5) to s",
                                                                          Path("/out/s.tmp")):
        raise error
    assert str(failed.value) == f"adding rows [0, 5) to s {words}"
    with pytest.raises(BuildError, match=r"cannot write /out/\.ds\.partial/manifest.json"), \
            build_inputs.as_build_error("publishing /out/ds", Path("/out/ds"), also_written=Path("/out/.ds.partial")):
        raise OSError(errno.ENOSPC, "No space left on device", "/out/.ds.partial/manifest.json")  # publishing's


def test_exchange_swaps_two_directories(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    (tmp_path / "a" / "from-a").touch()
    assert publish.exchange(tmp_path / "a", tmp_path / "b"), "renameat2 should work on Linux"
    assert (tmp_path / "b" / "from-a").exists() and not list((tmp_path / "a").iterdir())


def test_failed_publish_is_a_build_error_and_the_rerun_resumes(ray_cluster, keys, tmp_path, monkeypatch):
    config = _saved_config(tmp_path, keys[:2000], shards=2)

    def disk_full(directory, manifest):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(build_module, "write_manifest", disk_full)
    with pytest.raises(BuildError, match=re.escape(f"cannot write {config.out}: No space left on device")):
        build_datastore(config, progress=False)
    monkeypatch.undo()
    shard = tmp_path / ".ds.partial" / "shard-00000" / "index.faiss"
    stamp = shard.stat().st_mtime_ns
    build_datastore(config, progress=False)
    assert (config.out / "shard-00000" / "index.faiss").stat().st_mtime_ns == stamp, "finished shard was redone"
    assert not (tmp_path / ".ds.partial").exists()


def test_resume_rebuilds_a_damaged_shard(ray_cluster, keys, tmp_path, monkeypatch, caplog):
    config = _saved_config(tmp_path, keys[:3000], shards=3, payloads={"values": tmp_path / "values.npy"})
    np.save(tmp_path / "values.npy", np.arange(3000, dtype=np.int64))

    def crash(config, work, manifest, found):
        raise BuildError("crashed before publishing")

    monkeypatch.setattr(build_module, "_publish", crash)
    with pytest.raises(BuildError, match="crashed"):
        build_datastore(config, progress=False)
    monkeypatch.undo()
    partial = tmp_path / ".ds.partial"
    with open(partial / "shard-00001" / "index.faiss", "r+b") as f:  # damaged, its size unchanged
        f.seek(f.seek(0, os.SEEK_END) // 2)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0xFF]))
    (partial / "shard-00002" / "payload.values.npy").unlink()
    stamp = (partial / "shard-00000" / "index.faiss").stat().st_mtime_ns
    with caplog.at_level(logging.WARNING, logger="retriever_server.datastore.build"):
        manifest = build_datastore(config, progress=False)
    assert "shard-00001 from the earlier run is unfinished or damaged" in caplog.text
    assert "shard-00002 from the earlier run is unfinished or damaged" in caplog.text
    assert (config.out / "shard-00000" / "index.faiss").stat().st_mtime_ns == stamp, "intact shard was redone"
    for entry in manifest.shards:
        verify_shard(config.out, entry, full=True)


def test_shards_failing_together_are_one_error_and_nothing_is_cancelled(ray_cluster, keys, tmp_path, monkeypatch):
    """Every shard fails at once: one line names the first, and no task is cancelled with `ray.cancel`
    (cancelling a task as it finishes can abort the driver inside Ray)."""
    config = _saved_config(tmp_path, keys[:2000], shards=4)

    def untrained(config, inputs, work):
        path = work / "trained.index"
        faiss.write_index(faiss.index_factory(D, "IVF16,Flat"), str(path))
        return path, True  # the codec's path, and that it was trained (not reused) in this run

    cancelled = []
    monkeypatch.setattr(build_module, "_train", untrained)
    monkeypatch.setattr(ray, "cancel", lambda ref, **kwargs: cancelled.append(ref))
    with pytest.raises(BuildError, match=r"shard-0000\d failed: .*'is_trained' failed") as failure:
        build_datastore(config, progress=False)
    assert "\n" not in str(failure.value) and "Traceback" not in str(failure.value)
    assert cancelled == []


def test_a_failed_shard_stops_the_others_and_says_why(ray_cluster, keys, tmp_path, monkeypatch, caplog):
    """Shard 0 fails while shard 1 is still adding rows 10 at a time: shard 1 ends before it is
    finished, the error names shard 0's cause, and a rerun builds both shards."""
    config = _saved_config(tmp_path, np.tile(keys, (4, 1)), shards=2, add_block=10)
    real = build_module._build_shard._function  # the task's Python function, run by the stand-in below

    def failing_first(config, trained, shard_dir, start, end, progress, stop_file):
        if shard_dir.endswith("shard-00000"):
            deadline = time.monotonic() + 60
            while not Path(shard_dir).with_name("shard-00001.tmp").exists() and time.monotonic() < deadline:
                time.sleep(0.01)  # until shard 1 has started adding
            raise BuildError("disk on fire")
        return real(config, trained, shard_dir, start, end, progress, stop_file)

    monkeypatch.setattr(build_module, "_build_shard", ray.remote(failing_first))
    with caplog.at_level(logging.WARNING, logger="retriever_server.datastore.build"):
        with pytest.raises(BuildError, match=r"^shard-00000 failed: disk on fire$"):
            build_datastore(config, progress=False)
    assert "stopping the 1 other shard tasks still running" in caplog.text
    assert "still running after" not in caplog.text, "shard 1 ended at its next block"
    partial = tmp_path / ".ds.partial"
    assert not (partial / "shard-00001").exists(), "shard 1 was stopped before it finished"
    assert len(list(partial.glob("stop-*"))) == 1  # the failed run's, still telling its tasks to stop
    monkeypatch.undo()
    manifest = build_datastore(config, progress=False)
    assert [entry.id_end - entry.id_start for entry in manifest.shards] == [len(keys) * 2] * 2
    assert not list(config.out.glob("stop-*")), "stop files are not published"


def test_relative_paths_are_this_process_folders_not_the_ray_workers(ray_cluster, keys, tmp_path, monkeypatch):
    """Shard tasks run in their Ray workers' folder (here the one the cluster started in; under `ray start`,
    that command's): relative keys, payload and output paths are this process's, and `--out .` builds in
    place, its work folder beside it."""
    monkeypatch.chdir(tmp_path)
    np.save("keys.npy", keys[:1500])
    np.save("values.npy", np.arange(1500, dtype=np.int64))
    config = BuildConfig(keys=Path("keys.npy"), out=Path("ds"), payloads={"values": Path("values.npy")}, shards=2,
                         factory="IVF8,Flat", keep_keys=True)
    manifest = build_datastore(config, progress=False)
    assert manifest.ntotal == 1500 and manifest.build["keys"] == str(tmp_path / "keys.npy")
    stored = np.concatenate([np.load(tmp_path / "ds" / s.name / "keys.npy") for s in manifest.shards])
    assert np.array_equal(stored, keys[:1500].astype(np.float16))
    monkeypatch.chdir(tmp_path / "ds")
    rebuilt = build_datastore(dataclasses.replace(config, keys=Path("../keys.npy"), out=Path("."), payloads={},
                                      overwrite=True), progress=False)
    assert rebuilt.ntotal == 1500 and (tmp_path / "ds" / "manifest.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds", "keys.npy", "values.npy"]  # no work left


def test_overwrite_refuses_an_output_holding_its_inputs_or_other_files(ray_cluster, datastore, keys, tmp_path):
    """--overwrite replaces the output folder whole: an input inside it, or files that are not the
    datastore's, would go with it. Both are refused before any work, the folder as it was."""
    out = tmp_path / "ds"
    shutil.copytree(datastore, out)
    inside = out / "shard-00000" / "input.npy"
    np.save(inside, keys[:1000])
    with pytest.raises(BuildError, match="holds 'shard-00000/input.npy' besides its datastore, which --overwrite"):
        build_datastore(BuildConfig(keys=inside, out=out, overwrite=True), progress=False)
    inside.unlink()
    np.save(out / "keys.npy", keys[:1000])
    before = sorted(p.name for p in out.iterdir())
    with pytest.raises(BuildError, match=r"holds 'keys.npy' besides its datastore, which --overwrite would delete"):
        build_datastore(BuildConfig(keys=out / "keys.npy", out=out, overwrite=True), progress=False)
    assert sorted(p.name for p in out.iterdir()) == before and read_manifest(out) == read_manifest(datastore)
    np.save(tmp_path / "keys.npy", keys[:1000])
    plain = tmp_path / "plain"  # not a datastore: refused as such, whatever lies in it
    plain.mkdir()
    np.save(plain / "keys.npy", keys[:1000])
    with pytest.raises(BuildError, match="plain exists and is not a datastore"):
        build_datastore(BuildConfig(keys=plain / "keys.npy", out=plain, overwrite=True), progress=False)
    (out / "keys.npy").unlink()
    (out / "stop-words.txt").write_text("")  # named like a leftover, but not one: refused
    with pytest.raises(BuildError, match=r"holds 'stop-words.txt' besides its datastore"):
        build_datastore(BuildConfig(keys=tmp_path / "keys.npy", out=out, overwrite=True), progress=False)
    (out / "stop-words.txt").unlink()
    for leftover in ("build.json", "trained.index", "stop-0123456789ab"):  # a build stopped while it tidied up
        (out / leftover).write_text("")
    replaced = build_datastore(BuildConfig(keys=tmp_path / "keys.npy", out=out, overwrite=True, factory="IVF8,Flat"),
                               progress=False)
    assert replaced.ntotal == 1000 and sorted(p.name for p in out.iterdir()) == ["manifest.json", "shard-00000",
                                                                                 "shard-00001"]


def test_absolute_paths_join_this_folder_without_undoing_a_link(tmp_path, monkeypatch):
    """`link/../keys.npy` is the link target's sibling, the file the input checks opened: joined to the
    folder as it is, never shortened to `keys.npy` beside the link. Only an output ending in `.` or `..`
    is resolved, to have a name."""
    from retriever_server.datastore.build_inputs import absolute_paths

    (tmp_path / "real" / "sub").mkdir(parents=True)
    (tmp_path / "link").symlink_to(tmp_path / "real" / "sub")
    monkeypatch.chdir(tmp_path)
    config = absolute_paths(BuildConfig(keys=Path("link/../keys.npy"), out=Path("."),
                                        payloads={"v": Path("v.npy")}), "keys", "payloads", "out")
    assert config.keys == tmp_path / "link" / ".." / "keys.npy"
    assert config.keys.resolve() == tmp_path / "real" / "keys.npy"
    assert config.out == tmp_path and config.payloads == {"v": tmp_path / "v.npy"}


def test_a_trained_codec_that_does_not_read_is_trained_again_on_resume(ray_cluster, keys, tmp_path, monkeypatch,
                                                                       caplog):
    config = _saved_config(tmp_path, keys[:2000], shards=2)
    monkeypatch.setattr(build_module, "_publish", lambda *args: (_ for _ in ()).throw(BuildError("stopped")))
    with pytest.raises(BuildError, match="stopped"):
        build_datastore(config, progress=False)
    monkeypatch.undo()
    trained = tmp_path / ".ds.partial" / "trained.index"
    trained.write_bytes(trained.read_bytes()[:10])  # cut short, as a crash while writing it leaves it
    with caplog.at_level(logging.WARNING, logger="retriever_server"):
        manifest = build_datastore(config, progress=False)
    assert f"training the codec again: {trained} does not read" in caplog.text
    fresh = build_datastore(dataclasses.replace(config, out=tmp_path / "fresh"), progress=False)
    assert manifest.version == fresh.version  # the same codec, trained again


def test_faiss_training_error_is_a_one_line_build_error(ray_cluster, tmp_path):
    config = _saved_config(tmp_path, synthetic(100, 16), shards=1, factory="IVF16,RQ2x8")
    with pytest.raises(BuildError, match=r"training IVF16,RQ2x8 .*Number of training points \(100\)") as failure:
        build_datastore(config, progress=False)
    assert "\n" not in str(failure.value)
    assert not config.out.exists() and not (tmp_path / ".ds.partial").exists()


@pytest.mark.parametrize(
    "bad, keep_keys, train_size, message",
    [
        (np.nan, False, 64, r"^shard-00001 failed: keys row 250 holds NaN or Inf, or a value past float32's range "
                            r"\(3.4e38\), which the index stores keys in; every key must be finite$"),
        (np.inf, False, 300, r"^keys row 250 holds NaN or Inf, or a value past float32's range"),  # trained on
        (1e39, False, 64, r"^shard-00001 failed: keys row 250 holds NaN or Inf, or a value past float32's range"),
        (1e5, True, 64, r"^shard-00001 failed: keys row 250 holds a value over 65504 in absolute value, which "
                        r"--keep-keys cannot store as float16"),
        (1e20, False, 64, r"^shard-00001 failed: keys row 250 holds a value over 1e\+15 in absolute value, whose "
                          r"squared distances would overflow float32"),  # FAISS would put it in no list
        (-1e20, False, 300, r"^keys row 250 holds a value over 1e\+15"),  # FAISS's k-means would abort
    ],
    ids=["nan-added", "inf-trained-on", "float64-past-float32", "past-float16", "overflow-added",
         "overflow-trained-on"],
)
def test_keys_an_index_cannot_hold_are_refused_naming_the_row(ray_cluster, tmp_path, bad, keep_keys, train_size,
                                                              message):
    """FAISS leaves a NaN key out of every list (the datastore would then disagree with its manifest) and
    float16 turns a key past 65504 into Inf: the build refuses both, naming the key's row."""
    keys = synthetic(300, 16).astype(np.float64 if abs(bad) > 3.4e38 else np.float32)  # 1e39: a finite float64
    keys[250, 3] = bad
    config = _saved_config(tmp_path, keys, shards=2, factory="IVF4,Flat", train_size=train_size, keep_keys=keep_keys,
                           seed=1)
    with pytest.raises(BuildError, match=message):
        build_datastore(config, progress=False)
    assert not config.out.exists()


def _save_payload_files(tmp_path) -> None:
    arrays = {
        "short": np.zeros(99, np.int32), "objects": np.array([{"a": 1}] * 100, dtype=object),
        "strings": np.array(["text"] * 100), "complex": np.zeros(100, np.complex64),
        "dates": np.zeros(100, "datetime64[s]"), "records": np.zeros(100, [("a", "i4"), ("b", "f4")]),
        "longdouble": np.zeros(100, np.longdouble), "bytes": np.zeros(100, "S4"),
    }
    for name, array in arrays.items():
        np.save(tmp_path / f"{name}.npy", array, allow_pickle=True)
    (tmp_path / "garbage.npy").write_bytes(b"not an array at all")
    whole = (tmp_path / "short.npy").read_bytes()
    (tmp_path / "truncated.npy").write_bytes(whole[:200])


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(keys="missing.npy"), "not found"),
        (dict(shards=0), "--shards must be in"),
        (dict(factory="IVF16,PQ7"), "FAISS cannot build factory string"),
        (dict(cpus_per_shard=0), "--cpus-per-shard must be >= 1, got 0"),
        (dict(factory="Flat"), "'Flat' makes an index that keeps no row ids: .* \"IDMap,Flat\""),
        (dict(factory="HNSW32"), "'HNSW32' makes an index that keeps no row ids"),
        (dict(factory="IDMap,HNSW32"), "'IDMap,HNSW32' makes an index without a fixed code size per row"),
        (dict(factory="IVF16,Flat,RFlat"), "'IVF16,Flat,RFlat' makes a refine index, which .* cannot fill"),
        (dict(factory="IVF16,PQ4,Refine(Flat)"), "makes a refine index, .* search with exact re-ranking"),
        (dict(metric="cosine"), "metric must be one of"),
        (dict(payloads={"values": "short.npy"}), "first dimension must be 100"),
        (dict(keys="ints.npy"), "must be a non-empty float"),
        (dict(keys="garbage.npy"), "keys file .*garbage.npy is not a loadable .npy array"),
        (dict(factory="IVF256,PQ8"), "factory IVF256,PQ8 needs at least 256 training rows; the keys have 100"),
        (dict(factory="IVF16,PQ8"), "factory IVF16,PQ8 needs at least 256 training rows; the keys have 100"),
        (dict(factory="IVF4,PQ4x10"), "factory IVF4,PQ4x10 needs at least 1024 training rows"),
        (dict(factory="IDMap,PQ4"), "'IDMap,PQ4' puts an IndexPQ under its id map, which FAISS searches with no "
                                    "exclusions"),  # every request with exclusions failed, after the build
        (dict(factory="IDMap,LSH"), "puts an IndexLSH under its id map"),
        (dict(factory="IVF16,PQ4+4"), "'IVF16,PQ4\\+4' makes an IVFPQR index, whose refine codes are found by row "
                                      "id"),  # a shard's global ids aborted its server at the first search
        (dict(factory="IMI2x2,Flat"), "makes a multi-index \\(IMI\\) quantizer"),
        (dict(factory="OPQ4,IVF128,Flat"), "needs at least 128 training rows"),
        (dict(factory="IVF64,Flat", train_size=50),
         "needs at least 64 training rows; train_size \\(--train-size\\) is 50"),
        (dict(factory="IVF16,PQ8x0"), "makes a product quantizer of 0 bits per code, which FAISS cannot read back"),
        (dict(payloads={"p": "objects.npy"}), "payload 'p' .* has dtype object, which cannot be served"),
        (dict(payloads={"p": "strings.npy"}), "payload 'p' .* has dtype <U4, which cannot be served"),
        (dict(payloads={"p": "bytes.npy"}), "payload 'p' .* has dtype \\|S4, which cannot be served"),
        (dict(payloads={"p": "complex.npy"}), "payload 'p' .* has dtype complex64, which cannot be served"),
        (dict(payloads={"p": "dates.npy"}), r"payload 'p' .* has dtype datetime64\[s\], which cannot be served"),
        (dict(payloads={"p": "records.npy"}), "payload 'p' .* which cannot be served"),
        (dict(payloads={"p": "longdouble.npy"}), "payload 'p' .* has dtype float128, which cannot be served"),
        (dict(payloads={"p": "garbage.npy"}), "payload 'p' file .*garbage.npy is not a loadable .npy array"),
        (dict(payloads={"p": "truncated.npy"}), "payload 'p' file .*truncated.npy is not a loadable .npy array"),
        (dict(payloads={"a/b": "short.npy"}), "payload 'a/b': a payload name is 1 to 64 letters"),
        (dict(payloads={"": "short.npy"}), "payload '': a payload name is 1 to 64 letters"),
        (dict(keys="no_columns.npy"), r"must be a non-empty float \(N, d\) matrix with d >= 1, got float32 \(100, 0\)"),
    ],
)
def test_bad_build_inputs_are_refused_before_any_work(tmp_path, change, message):
    np.save(tmp_path / "keys.npy", synthetic(100, 16))
    np.save(tmp_path / "ints.npy", np.zeros((100, 16), np.int64))
    np.save(tmp_path / "no_columns.npy", np.zeros((100, 0), np.float32))
    _save_payload_files(tmp_path)
    fields = dict(keys="keys.npy", out=tmp_path / "new" / "folders" / "out")  # folders that do not exist yet
    fields.update(change)
    fields["keys"] = tmp_path / fields["keys"]
    fields["payloads"] = {k: tmp_path / v for k, v in fields.get("payloads", {}).items()}
    with pytest.raises(BuildError, match=message) as refused:
        build_datastore(BuildConfig(**fields), progress=False)
    assert "\n" not in str(refused.value)
    assert not (tmp_path / "new").exists()  # nothing made: no output, no work folder, no lock, no parent folders


def test_shard_tasks_larger_than_every_node_are_reported_then_given_up_on(ray_cluster, tmp_path, monkeypatch,
                                                                           caplog):
    """Ray holds a task that no node can take until a node that can joins (an autoscaler may add one): the
    build says so while it waits, gives up after STALL_S in one line, and publishes nothing."""
    monkeypatch.setattr(build_module, "STALL_S", 4.0)
    monkeypatch.setattr(build_module, "STALL_REPORT_S", 1.0)
    np.save(tmp_path / "keys.npy", synthetic(100, 16))
    config = BuildConfig(keys=tmp_path / "keys.npy", out=tmp_path / "out", factory="IVF4,Flat", cpus_per_shard=64)
    with caplog.at_level(logging.WARNING, logger="retriever_server.datastore.build"), \
            pytest.raises(BuildError, match="no node of the cluster had room for a shard task of 64 CPUs "
                                            r"\(--cpus-per-shard\) for 4 s \(the cluster has .* CPUs"):
        build_datastore(config, progress=False)
    assert "no node of the cluster has room for a shard task of 64 CPUs" in caplog.text
    assert not (tmp_path / "out").exists()
    ray.get(ray.remote(lambda: 1).remote(), timeout=30)  # the cancelled tasks hold nothing: the cluster works


def test_every_servable_payload_dtype_is_accepted(tmp_path):
    np.save(tmp_path / "keys.npy", synthetic(300, 16))
    dtypes = ["float16", "float32", "float64", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32",
              "uint64", "bool", ">i4", ">f8"]
    payloads = {}
    for i, dtype in enumerate(dtypes):
        payloads[f"p{i}"] = tmp_path / f"p{i}.npy"
        np.save(payloads[f"p{i}"], np.zeros((300, 2), dtype))
    config = BuildConfig(keys=tmp_path / "keys.npy", out=tmp_path / "out", payloads=payloads, factory="IVF16,PQ4x4")
    inputs = check_inputs(config)
    assert {p.name: np.dtype(p.dtype) for p in inputs.payloads} == {f"p{i}": np.dtype(d) for i, d in enumerate(dtypes)}


@pytest.mark.slow
def test_build_killed_then_run_again_finishes(keys, tmp_path):
    np.save(tmp_path / "keys.npy", keys)
    command = [sys.executable, "-m", "retriever_server.cli", "build", str(tmp_path / "keys.npy"), "--out",
               str(tmp_path / "ds"), "--shards", "3", "--factory", "IVF32,PQ8", "--keep-keys", "--num-cpus", "1",
               "--no-progress"]
    killed = subprocess.run(command, env={**os.environ, FAULT_ENV: "1"}, capture_output=True, text=True)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert not (tmp_path / "ds").exists(), "a killed build must not publish"
    partial = tmp_path / ".ds.partial"
    done = sorted(p.parent.name for p in partial.glob("shard-*/.done.json"))
    assert done and len(done) < 3, done
    survivor = partial / done[0] / "index.faiss"
    stamp = survivor.stat().st_mtime_ns
    again = subprocess.run(command, capture_output=True, text=True)
    assert again.returncode == 0, again.stderr
    assert (tmp_path / "ds" / done[0] / "index.faiss").stat().st_mtime_ns == stamp, "finished shard was redone"
    manifest = read_manifest(tmp_path / "ds")
    assert manifest.ntotal == N and not partial.exists()
    for i in range(3):
        Shard.open(tmp_path / "ds", i)  # every checksum verifies


def test_a_disk_too_small_is_refused_before_any_work_naming_what_is_needed(datastore, keys, tmp_path, monkeypatch):
    """The free space is checked first: the error names the GiB needed and free, the existing datastore
    is left as it was, and nothing else is written."""
    np.save(tmp_path / "keys.npy", keys)
    before = read_manifest(datastore).checksum
    config = BuildConfig(keys=tmp_path / "keys.npy", out=datastore, keep_keys=True, overwrite=True)
    need = build_inputs.disk_needed(config, check_inputs(config))
    assert need >= N * (2 * D + 8)  # every row's float16 key and id at least
    monkeypatch.setattr(build_inputs.shutil, "disk_usage", lambda path: types.SimpleNamespace(free=need // 2))
    with pytest.raises(BuildError, match=r"needs about .* GiB of disk at .*; .* GiB is free"):
        build_datastore(config)
    assert read_manifest(datastore).checksum == before
    assert not (datastore.parent / f".{datastore.name}.partial").exists()


@pytest.mark.parametrize("factory", ["IDMap,Flat", "IDMap2,Flat", "PCA8,IDMap,Flat", "IVF4,Flat", "OPQ4,IVF4,PQ4"])
def test_factories_whose_index_keeps_row_ids_are_accepted(factory):
    from retriever_server.datastore.index import check_factory

    check_factory(factory, 16, "l2")  # does not raise


def test_an_ivf_index_of_no_lists_is_refused():
    """FAISS makes "IVF0,Flat" and puts every row in no list: a datastore of empty shards."""
    from retriever_server.datastore.index import check_factory

    with pytest.raises(ValueError, match=r"factory string 'IVF0,Flat' makes an IVF index of 0 lists"):
        check_factory("IVF0,Flat", 16, "l2")


def test_a_symlinked_output_is_refused_and_what_it_points_to_is_left(datastore, keys, tmp_path):
    """A build swaps its new folder into the output's place: that would replace a link, not the datastore it
    points to. The link is refused before any work, naming its target; the datastore is left as it was."""
    np.save(tmp_path / "keys.npy", keys)
    link = tmp_path / "current"
    link.symlink_to(datastore)
    before = read_manifest(datastore).checksum
    for overwrite in (False, True):
        with pytest.raises(BuildError, match=r"current is a symbolic link \(to '.*'\); give the folder it points to"):
            build_datastore(BuildConfig(keys=tmp_path / "keys.npy", out=link, overwrite=overwrite), progress=False)
    assert link.is_symlink() and read_manifest(datastore).checksum == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["current", "keys.npy"]


@pytest.mark.slow
def test_sigterm_stops_a_build_as_ctrl_c_does_in_one_line(tmp_path):
    """`ray job stop` and Kubernetes send SIGTERM: the build ends as on Ctrl-C (exit 130, "interrupted"),
    not with Ray's crash report, and leaves its resumable work and nothing published."""
    np.save(tmp_path / "keys.npy", synthetic(200_000, 64, seed=4))  # k-means of 4096 lists: seconds of work
    command = [sys.executable, "-m", "retriever_server.cli", "build", str(tmp_path / "keys.npy"), "--out",
               str(tmp_path / "ds"), "--shards", "2", "--factory", "IVF4096,PQ16", "--num-cpus", "1", "--no-progress"]
    build = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                             env={**os.environ, "RAY_ADDRESS": ""})
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(build.stderr), daemon=True)
    reader.start()
    deadline = time.monotonic() + 120
    try:
        while not any("training IVF4096,PQ16" in line for line in lines):  # on Ray, the handler in place: k-means
            assert build.poll() is None and time.monotonic() < deadline, "".join(lines)
            time.sleep(0.05)  # polling, with a deadline
        build.send_signal(signal.SIGTERM)
        sent = time.strftime("%H:%M:%S")
        build.wait(timeout=120)
    finally:
        build.kill()  # nothing once it has exited; a build still running when the test fails is not left behind
    reader.join(30)
    err = "".join(lines)
    assert build.returncode == 130, f"SIGTERM sent at {sent}\n{err}"
    assert err.strip().splitlines()[-1] == "retriever-server build: interrupted" and "SIGTERM received" not in err
    assert not (tmp_path / "ds").exists() and (tmp_path / ".ds.partial").is_dir()


def test_sigterm_while_ray_starts_stops_a_build_as_ctrl_c_does(tmp_path):
    """A SIGTERM that comes while the build joins Ray (before any handler of Ray's is in place) ends it as
    Ctrl-C does: "interrupted", exit 130. It used to kill the command silently (-15, or 15 from the
    handler the join leaves). The signal is sent from inside the join, so it comes at that moment."""
    np.save(tmp_path / "keys.npy", synthetic(1000, 16))
    script = ("import os, signal, sys, time\n"
              "from retriever_server.datastore import build\n"
              "def joining(*args, **kwargs):\n"
              "    os.kill(os.getpid(), signal.SIGTERM)\n"
              "    time.sleep(10)\n"
              "build.connect = joining\n"
              "from retriever_server.cli import main\n"
              f"sys.exit(main(['build', {str(tmp_path / 'keys.npy')!r}, '--out', {str(tmp_path / 'ds')!r}]))\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert done.returncode == 130, done.stderr
    assert done.stderr.strip().splitlines()[-1] == "retriever-server build: interrupted"
    assert not (tmp_path / "ds").exists()


def test_a_manifest_that_cannot_be_read_is_named_as_such(tmp_path, monkeypatch):
    """An unreadable manifest.json says it cannot be read (it used to be called "not valid JSON")."""
    (tmp_path / "manifest.json").write_text("{}")
    real = Path.read_bytes

    def refused(path: Path) -> bytes:
        if path.name == "manifest.json":
            raise PermissionError(13, "Permission denied", str(path))
        return real(path)

    monkeypatch.setattr(Path, "read_bytes", refused)
    with pytest.raises(DatastoreError, match=r"^cannot read .*manifest.json: Permission denied$"):
        read_manifest(tmp_path)
