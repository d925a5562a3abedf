"""The build job on a real local Ray cluster: layout, checksums, atomic publishing, resuming."""

import json
import os
import signal
import subprocess
import sys

import faiss
import numpy as np
import pytest
from conftest import build, synthetic, unsharded_reference

from retriever_server.build import FAULT_ENV, BuildConfig, BuildError, build_datastore
from retriever_server.manifest import DatastoreError, read_manifest
from retriever_server.shard import Shard

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


def test_shards_share_one_trained_codec(datastore, keys):
    """Each shard's ids are its rows, and all shards hold the same coarse quantizer."""
    centroids = []
    for i in range(3):
        index = faiss.read_index(str(datastore / f"shard-0000{i}" / "index.faiss"))
        ivf = faiss.extract_index_ivf(index)
        centroids.append(ivf.quantizer.reconstruct_n(0, ivf.nlist))
    assert np.array_equal(centroids[0], centroids[1]) and np.array_equal(centroids[0], centroids[2])
    reference = unsharded_reference(datastore, keys)
    assert reference.ntotal == N


def _corrupt(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def test_tampered_shard_file_is_refused_naming_it(datastore, tmp_path):
    copy = tmp_path / "copy"
    subprocess.run(["cp", "-r", str(datastore), str(copy)], check=True)
    _corrupt(copy / "shard-00001" / "payload.values.npy")
    Shard.open(copy, 0)  # other shards still load
    with pytest.raises(DatastoreError, match=r"shard-00001/payload.values.npy checksum does not match"):
        Shard.open(copy, 1)


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


def test_existing_output_needs_overwrite_and_is_replaced_whole(ray_cluster, datastore, keys, tmp_path):
    with pytest.raises(BuildError, match="already exists"):
        build_datastore(BuildConfig(keys=tmp_path / "x.npy", out=datastore), progress=False)
    out = build(tmp_path, keys[:3000], "small", shards=2, factory="IVF16,Flat")
    before = read_manifest(out).version
    build(tmp_path, keys[:4000], "small", shards=2, factory="IVF16,Flat", overwrite=True)
    after = read_manifest(out)
    assert after.ntotal == 4000 and after.version != before


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(keys="missing.npy"), "not found"),
        (dict(shards=0), "--shards must be in"),
        (dict(factory="IVF16,PQ7"), "FAISS cannot build factory string"),
        (dict(metric="cosine"), "metric must be one of"),
        (dict(payloads={"values": "short.npy"}), "first dimension must be 100"),
        (dict(keys="ints.npy"), "must be a non-empty float"),
    ],
)
def test_bad_build_inputs_are_refused_before_any_work(tmp_path, change, message):
    np.save(tmp_path / "keys.npy", synthetic(100, 16))
    np.save(tmp_path / "short.npy", np.zeros(99, np.int32))
    np.save(tmp_path / "ints.npy", np.zeros((100, 16), np.int64))
    fields = dict(keys="keys.npy", out=tmp_path / "out")
    fields.update(change)
    fields["keys"] = tmp_path / fields["keys"]
    fields["payloads"] = {k: tmp_path / v for k, v in fields.get("payloads", {}).items()}
    with pytest.raises(BuildError, match=message):
        build_datastore(BuildConfig(**fields), progress=False)
    assert not (tmp_path / "out").exists() and not (tmp_path / ".out.partial").exists()


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
