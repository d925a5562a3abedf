"""What a datastore's files and a build's parameters may hold: each manifest field's type and range,
JSON nested too deeply to parse, what `--overwrite` would delete inside shard folders, the build's
block sizes. Tiny datastores written by hand (no FAISS, no Ray): these checks read JSON and names only."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from retriever_server.datastore.build_inputs import BuildConfig, BuildError, check_inputs
from retriever_server.datastore.manifest import (
    LOCATION_METADATA,
    MANIFEST,
    DatastoreError,
    Manifest,
    PayloadSpec,
    ShardEntry,
    describe_files,
    read_manifest,
    shard_name,
    write_manifest,
)
from retriever_server.datastore.publish import check_output
from retriever_server.datastore.resume import DONE, read_json
from retriever_server.datastore.row_parts import open_rows

ROWS, DIM = 30, 4
DEEP = "[" * 100_000 + "]" * 100_000  # past any recursion limit of a JSON parser


def tiny_datastore(root: Path, shards: int = 2) -> Path:
    """A datastore as a finished build leaves it: a manifest, and per shard its listed files (placeholder
    bytes: nothing here opens them) and the build's `.done.json`."""
    out = root / "ds"
    edges = np.linspace(0, ROWS, shards + 1).astype(int)
    entries = []
    for i in range(shards):
        folder = out / shard_name(i)
        folder.mkdir(parents=True)
        for name in ("index.faiss", "payload.values.npy"):
            (folder / name).write_bytes(f"{name} {i}".encode())
        entry = ShardEntry(folder.name, int(edges[i]), int(edges[i + 1]), describe_files(folder))
        (folder / DONE).write_text(json.dumps({"name": entry.name}))
        entries.append(entry)
    write_manifest(out, Manifest(dimension=DIM, metric="l2", factory="IVF4,Flat", ntotal=ROWS, nlist=4,
                                 default_nprobe=2, has_keys=False, payloads=(PayloadSpec("values", "<i4", ()),),
                                 shards=tuple(entries), metadata={"kind": "test"}))
    return out


def rewrite(out: Path, change: Callable[[dict], object]) -> None:
    """Edits the manifest's JSON and gives it the checksum of its new contents, as manifest.py computes it:
    the sha256 of the canonical JSON of every field but `build`, `checksum`, `version` and the location
    metadata. A reader that trusts a matching checksum reads whatever the edit put there."""
    body = json.loads((out / MANIFEST).read_text())
    change(body)
    hashed = {k: v for k, v in body.items() if k not in ("build", "checksum", "version")}
    if isinstance(hashed.get("metadata"), dict):
        hashed["metadata"] = {k: v for k, v in hashed["metadata"].items() if k not in LOCATION_METADATA}
    body["checksum"] = hashlib.sha256(json.dumps(hashed, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
    (out / MANIFEST).write_text(json.dumps(body))


def setter(*keys, value) -> Callable[[dict], None]:
    """A change that sets body[k1][k2]...[kn] = value."""
    def change(body: dict) -> None:
        for key in keys[:-1]:
            body = body[key]
        body[keys[-1]] = value
    return change


BAD_FIELDS = {
    "dimension-a-string": (setter("dimension", value="4"), r"dimension"),
    "dimension-zero": (setter("dimension", value=0), r"dimension"),
    "dimension-a-bool": (setter("dimension", value=True), r"dimension"),
    "dimension-a-float": (setter("dimension", value=4.0), r"dimension"),
    "ntotal-past-int64": (setter("ntotal", value=2**70), r"ntotal"),
    "ntotal-not-the-shards-rows": (setter("ntotal", value=10**15), r"ntotal"),
    "nlist-negative": (setter("nlist", value=-1), r"nlist"),
    "default-nprobe-negative": (setter("default_nprobe", value=-3), r"default_nprobe"),
    "default-nprobe-zero": (setter("default_nprobe", value=0), r"default_nprobe"),
    "default-nprobe-past-nlist": (setter("default_nprobe", value=5), r"default_nprobe"),
    "factory-a-number": (setter("factory", value=5), r"factory"),
    "has-keys-a-string": (setter("has_keys", value="yes"), r"has_keys"),
    "metadata-value-a-number": (setter("metadata", value={"a": 1}), r"metadata"),
    "metadata-a-list": (setter("metadata", value=["a"]), r"metadata"),
    "build-a-list": (setter("build", value=[]), r"build"),
    "payload-name-a-number": (setter("payloads", 0, "name", value=5), r"payloads\[0\]\.name"),
    "payload-dtype-unknown": (setter("payloads", 0, "dtype", value="foo"), r"payloads\[0\]\.dtype"),
    "payload-dtype-object": (setter("payloads", 0, "dtype", value="|O"), r"payloads\[0\]\.dtype"),
    "payload-dtype-a-list": (setter("payloads", 0, "dtype", value=["<i4"]), r"payloads\[0\]\.dtype"),
    "row-shape-of-strings": (setter("payloads", 0, "row_shape", value=["a"]), r"payloads\[0\]\.row_shape"),
    "row-shape-a-string": (setter("payloads", 0, "row_shape", value="ab"), r"payloads\[0\]\.row_shape"),
    "row-shape-negative": (setter("payloads", 0, "row_shape", value=[-1]), r"payloads\[0\]\.row_shape"),
    "payload-name-twice": (lambda b: b["payloads"].append(dict(b["payloads"][0])), r"payload"),
    "id-end-before-id-start": (setter("shards", 0, "id_end", value=-5), r"shards\[0\]\.id_end"),
    "id-start-a-string": (setter("shards", 0, "id_start", value="0"), r"shards\[0\]\.id_start"),
    "id-start-infinite": (setter("shards", 1, "id_start", value=float("inf")), r"shards\[1\]\.id_start"),
    "id-ranges-with-a-gap": (setter("shards", 1, "id_start", value=16), r"shards\[1\]\.id_start"),
    "id-end-past-int64": (setter("shards", 1, "id_end", value=2**63), r"shards\[1\]\.id_end"),
    "file-bytes-negative": (setter("shards", 0, "files", "index.faiss", "bytes", value=-1),
                            r"shards\[0\]\.files.*index\.faiss.*bytes"),
    "file-sha256-a-number": (setter("shards", 0, "files", "index.faiss", "sha256", value=5),
                             r"shards\[0\]\.files.*index\.faiss.*sha256"),
}


@pytest.mark.parametrize("change, field", BAD_FIELDS.values(), ids=BAD_FIELDS.keys())
def test_a_manifest_field_of_the_wrong_type_or_range_is_refused_naming_it(tmp_path, change, field):
    """A manifest whose checksum matches its edited contents is still refused when a field holds what no
    build writes: a DatastoreError naming the file and the field, on one bounded line, where servers
    failed later (TypeError at a shard's open, OverflowError on every default search) or served it."""
    out = tiny_datastore(tmp_path)
    read_manifest(out)
    rewrite(out, change)
    with pytest.raises(DatastoreError) as refused:
        read_manifest(out)
    message = str(refused.value)
    assert str(out / MANIFEST) in message and "\n" not in message and len(message) < 500
    assert re.search(field, message.replace(str(out / MANIFEST), "")), message


@pytest.mark.parametrize("text", ['"id_end": 1e400', '"id_end": Infinity', '"id_end": NaN', '"id_end": 1.5'])
def test_a_number_no_int_holds_is_refused_before_the_checksum(tmp_path, text):
    """JSON parses 1e400 as infinity, which int() cannot convert (OverflowError): the reader, and with it
    `build --overwrite`'s check of the folder, crashed before the checksum was even compared."""
    out = tiny_datastore(tmp_path)
    path = out / MANIFEST
    path.write_text(path.read_text().replace(f'"id_end": {ROWS}', text, 1))
    with pytest.raises(DatastoreError, match=r"shards\[1\]\.id_end"):
        read_manifest(out)
    with pytest.raises(BuildError, match="is not a datastore"):
        check_output(out, overwrite=True)


def test_a_manifest_nested_too_deeply_is_a_datastore_error(tmp_path):
    out = tiny_datastore(tmp_path)
    (out / MANIFEST).write_text(DEEP)
    with pytest.raises(DatastoreError, match=r"manifest\.json"):
        read_manifest(out)
    with pytest.raises(BuildError, match="is not a datastore"):
        check_output(out, overwrite=True)


def test_a_build_record_nested_deeply_is_a_datastore_error(tmp_path):
    """`build` is free-form and outside the checksum; one nested as deep as JSON parses but too deep to
    copy (the checksums copy the fields) is refused, not a RecursionError."""
    out = tiny_datastore(tmp_path)
    body = (out / MANIFEST).read_text()
    depth = 600  # parses (one frame a level), but copying it takes two a level
    (out / MANIFEST).write_text(body.replace('"build": {}', '"build": {"x": ' + "[" * depth + "]" * depth + "}", 1))
    with pytest.raises(DatastoreError, match=r"manifest\.json"):
        read_manifest(out)


def test_a_parts_index_nested_too_deeply_is_the_usual_error(tmp_path):
    index = tmp_path / "keys.parts.json"
    index.write_text(DEEP)
    with pytest.raises(ValueError, match="is not readable JSON"):
        open_rows(index)


def test_a_resume_record_nested_too_deeply_reads_as_none(tmp_path):
    """A `.done.json` or `build.json` that does not parse is no record: the shard is built again."""
    path = tmp_path / DONE
    path.write_text(DEEP)
    assert read_json(path) is None


def test_overwrite_refuses_a_datastore_whose_shard_folder_holds_other_files(tmp_path):
    """--overwrite deletes the whole folder: a file of the user's in a shard folder would go with it."""
    out = tiny_datastore(tmp_path)
    check_output(out, overwrite=True)  # what a finished build leaves is its own: accepted
    (out / "shard-00001" / "notes\n.txt").write_text("mine")
    with pytest.raises(BuildError, match=r"'shard-00001/notes\\n\.txt'") as refused:
        check_output(out, overwrite=True)
    assert "\n" not in str(refused.value)
    (out / "shard-00001" / "notes\n.txt").unlink()
    (out / "shard-00000" / "spill").mkdir()
    with pytest.raises(BuildError, match=r"'shard-00000/spill'"):
        check_output(out, overwrite=True)


@pytest.mark.parametrize("field, value", [("add_block", 0), ("add_block", -1), ("spill_rows", 0),
                                          ("spill_rows", -5), ("add_block", 2.5), ("spill_rows", True)])
def test_block_sizes_below_one_are_refused_before_any_work(tmp_path, field, value):
    """add_block=0 failed inside every shard task, after the codec was trained."""
    np.save(tmp_path / "keys.npy", np.zeros((ROWS, DIM), np.float32))
    config = BuildConfig(keys=tmp_path / "keys.npy", out=tmp_path / "ds", factory="IDMap,Flat", shards=1)
    check_inputs(config)
    with pytest.raises(BuildError, match=rf"{field} must be an integer >= 1, got {value!r}"):
        check_inputs(dataclasses.replace(config, **{field: value}))


def damaged_header(path: Path) -> Path:
    """A .npy whose header's shape is cut short, which numpy's header parser fails on with a TokenError."""
    np.save(path, np.zeros((4, 2), dtype=np.float32))
    data = path.read_bytes()
    path.write_bytes(data.replace(b"(4, 2)", b"(4, 2\x01", 1))
    return path


def test_a_damaged_npy_header_is_named_by_the_shard_loader_and_the_build(tmp_path):
    """A shard's file and a build's input with a header numpy cannot parse: the readers' own errors, naming
    the file, not numpy's TokenError."""
    from retriever_server.datastore.headers import load_checked_array

    path = damaged_header(tmp_path / "keys.npy")
    with pytest.raises(DatastoreError, match=re.escape(f"{path} is not a readable .npy array")):
        load_checked_array(path, "float32", (4, 2))
    with pytest.raises(BuildError, match=re.escape(f"keys file {path} is not a loadable .npy array")):
        check_inputs(BuildConfig(keys=path, out=path.parent / "ds"))


def test_metadata_that_is_not_text_is_refused_before_the_build(tmp_path):
    """A manifest's metadata maps names to text (read_manifest refuses anything else): a build given an
    int is refused before any work, not published as a datastore no server reads."""
    np.save(tmp_path / "keys.npy", np.zeros((64, 4), dtype=np.float32))
    with pytest.raises(BuildError, match="BuildConfig.metadata maps names to text: 'chunk_len' is given int"):
        check_inputs(BuildConfig(keys=tmp_path / "keys.npy", out=tmp_path / "ds", metadata={"chunk_len": 64}))
