"""The encode job against the in-process loop: Ray Data actors write the same kNN-LM and RETRO
sources in parts; a failed or damaged part is redone alone; the build reads parts as it reads .npy;
parts indexes read like the concatenation of their parts and name what is wrong with them."""

from __future__ import annotations

import dataclasses
import functools
import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import stdlib_data

from lm_worker.data.token_store import TokenStore
from lm_worker.jobs.encode_job import run_encode_job
from lm_worker.jobs.encode_plan import EncodeError, EncodeJobConfig, part_dir
from lm_worker.models.checkpoint import load_checkpoint, save_checkpoint
from lm_worker.models.transformer_lm import LMConfig, TransformerLM
from lm_worker.retrieval.config import RetrievalConfig
from lm_worker.retrieval.in_process import InProcessRetriever
from lm_worker.sources.build import build_source
from lm_worker.sources.knnlm import encode_knnlm
from lm_worker.sources.output import job_work_dir
from lm_worker.sources.retro import encode_retro
from lm_worker.sources.source import read_source
from retriever_server.datastore.build_inputs import BuildConfig, BuildError, check_inputs
from retriever_server.datastore.manifest import read_manifest
from retriever_server.datastore.row_parts import PartedArray, files_of, open_rows, write_parts_index

W, S, L = 32, 16, 16  # kNN-LM windows; RETRO chunk length


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """A prepared corpus of real stdlib code: ~8k train tokens, a ~1k-token heldout split."""
    return stdlib_data(tmp_path_factory.mktemp("data"), 300)


@pytest.fixture(scope="module")
def checkpoint(data, tmp_path_factory) -> Path:
    torch.manual_seed(0)
    lm = TransformerLM(LMConfig.tiny(vocab_size=300, max_len=64)).eval()
    path = tmp_path_factory.mktemp("lm") / "checkpoint.pt"
    save_checkpoint(path, kind="lm", model=lm, config=lm.config, step=0,
                    tokenizer_fingerprint=TokenStore.open(data / "train").tokenizer_fingerprint, extra={})
    return path


class TableEncoder:
    """A deterministic projection of chunk tokens, unit norm: the chunk encoder's interface, fast.
    With `poison`, embedding a batch that starts with that chunk raises (a worker that fails)."""

    dimension = 16
    fingerprint = "table:16"

    def __init__(self, poison: np.ndarray | None = None):
        self.table = np.random.default_rng(0).standard_normal((300, self.dimension)).astype(np.float32)
        self.poison = poison

    def embed(self, chunks: np.ndarray) -> np.ndarray:
        chunks = np.asarray(chunks)
        if self.poison is not None and np.array_equal(chunks[0], self.poison):
            raise ValueError("poisoned chunk")
        x = (self.table[chunks] * (1 + 0.25 * np.arange(chunks.shape[1]))[None, :, None]).sum(1)  # (n, dim)
        return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


@dataclasses.dataclass(frozen=True)
class TableFactory:
    """What the job's actors call with the tokenizer to build their encoder."""

    poison: tuple[int, ...] | None = dataclasses.field(default=None, repr=False)  # a fault, not a setting

    def __call__(self, tokenizer) -> TableEncoder:
        return TableEncoder(None if self.poison is None else np.array(self.poison))


def _same_source(job, ref) -> None:
    """Same rows, fingerprints and parameters; keys equal up to float rounding, payloads exactly."""
    for field in ("kind", "rows", "dimension", "tokenizer_fingerprint", "encoder_fingerprint", "chunk_len"):
        assert getattr(job, field) == getattr(ref, field), field
    for key in ("context_len", "stride", "eos_id", "model"):
        assert job.details.get(key) == ref.details.get(key), key
    assert job.parted and not ref.parted and read_source(job.directory) == job
    keys = job.open_keys()
    assert isinstance(keys, PartedArray) and keys.shape == (ref.rows, ref.dimension) and keys.dtype == np.float32
    np.testing.assert_allclose(np.asarray(keys), np.load(ref.keys_path), rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(job.open_payload()), np.load(ref.payload[1]))


def _part_stamps(out: Path) -> dict[str, int]:
    """When each finished part's part.json was written, by part folder name."""
    return {p.parent.name: p.stat().st_mtime_ns for p in (out / "parts").glob("[0-9]*/part.json")}


# ------------------------------------------------------------------------------------------ parts indexes


def _parted(tmp_path: Path, sizes: list[int], row_shape=(3,)) -> tuple[Path, np.ndarray]:
    rng = np.random.default_rng(1)
    arrays = [rng.standard_normal((n, *row_shape)).astype(np.float32) for n in sizes]
    paths = []
    for i, a in enumerate(arrays):
        paths.append(tmp_path / "parts" / f"{i:05d}" / "keys.npy")
        paths[-1].parent.mkdir(parents=True)
        np.save(paths[-1], a)
    return write_parts_index(tmp_path / "keys.parts.json", paths), np.concatenate(arrays)


def test_parted_array_reads_like_the_concatenation(tmp_path):
    index, whole = _parted(tmp_path, [5, 0, 7, 1, 11])
    a = open_rows(index)
    a.max_open = 2  # parts are unmapped and mapped again as reads move between them
    assert (a.shape, a.dtype, a.ndim, len(a)) == (whole.shape, whole.dtype, 2, 24)
    np.testing.assert_array_equal(np.asarray(a), whole)
    for key in [slice(None), slice(3, 14), slice(5, 12), slice(-4, None), slice(2, 20, 3), slice(20, 2, -2),
                slice(12, 12), slice(30, 40), 0, 5, 23, -1, -24, np.int64(13)]:
        np.testing.assert_array_equal(a[key], whole[key], err_msg=str(key))
    rng = np.random.default_rng(2)
    for key in [rng.integers(0, 24, 50), rng.integers(-24, 24, (4, 6)), np.array([], dtype=np.int64),
                [23, 0, 5, 5, 12], rng.random(24) < 0.4]:
        np.testing.assert_array_equal(a[key], whole[key])
    np.testing.assert_array_equal(a[[4, 17, 9], 1:], whole[[4, 17, 9], 1:])
    np.testing.assert_array_equal(a[7, 2], whole[7, 2])
    np.testing.assert_array_equal(np.stack(list(a)), whole)
    copy = pickle.loads(pickle.dumps(a))  # as Ray ships it: paths and offsets, no mapped parts
    assert not copy._mapped and copy.paths == a.paths
    np.testing.assert_array_equal(copy[3:9], whole[3:9])
    for bad in (24, -25, [3, 24]):
        with pytest.raises(IndexError, match="out of bounds"):
            a[bad]
    assert files_of(index) == [index, *sorted((tmp_path / "parts").glob("*/keys.npy"))]
    plain = tmp_path / "plain.npy"
    np.save(plain, whole)
    assert isinstance(open_rows(plain), np.memmap) and files_of(plain) == [plain]


def test_bad_parts_indexes_are_named(tmp_path):
    index, _ = _parted(tmp_path, [4, 6])
    body = json.loads(index.read_text())
    assert body["shape"] == [10, 3] and [p["path"] for p in body["parts"]] == ["parts/00000/keys.npy",
                                                                              "parts/00001/keys.npy"]
    np.save(tmp_path / "wide.npy", np.zeros((3, 4), np.float32))
    with pytest.raises(ValueError, match=r"wide.npy is float32 \(3, 4\); part .*00000/keys.npy is float32 \(4, 3\)"):
        write_parts_index(tmp_path / "x.parts.json", [tmp_path / "parts/00000/keys.npy", tmp_path / "wide.npy"])
    with pytest.raises(ValueError, match="must end in .parts.json"):
        write_parts_index(tmp_path / "x.json", [tmp_path / "wide.npy"])

    def edited(name: str, **changes) -> Path:
        path = tmp_path / name
        path.write_text(json.dumps({**body, **changes}))
        return path

    swapped = [body["parts"][0], {"path": "wide.npy", "rows": 3}]
    cases = [
        (edited("gone.parts.json", parts=[body["parts"][0], {"path": "parts/00009/keys.npy", "rows": 6}]),
         FileNotFoundError, r"part .*parts/00009/keys.npy listed in .*gone.parts.json not found"),
        (edited("short.parts.json", shape=[12, 3]), ValueError, r"short.parts.json says 12 rows; its parts hold 10"),
        (edited("mixed.parts.json", parts=swapped, shape=[7, 3]), ValueError,
         r"part .*wide.npy is float32 \(3, 4\); parts index .*mixed.parts.json says float32 \(3, 3\)"),
        (edited("rows.parts.json", parts=[{**body["parts"][0], "rows": 5}, body["parts"][1]], shape=[11, 3]),
         ValueError, r"00000/keys.npy is float32 \(4, 3\); parts index .* says float32 \(5, 3\)"),
        (edited("old.parts.json", format=7), ValueError, "is not format 1"),
        (edited("dtype.parts.json", dtype="xyz"), ValueError,
         r"dtype.parts.json: its dtype 'xyz' and shape '\[10, 3\]' do not make an array"),
        (edited("dims.parts.json", shape=[10, "three"]), ValueError, r"dims.parts.json: its dtype '<f4' and shape"),
        (edited("cut.parts.json", parts=[body["parts"][0], {"path": "cut.npy", "rows": 6}]), ValueError,
         r"cut.npy is truncated: \d+ bytes, its header needs \d+"),
        (edited("twice.parts.json", parts=[body["parts"][0], {"path": "./" + body["parts"][0]["path"], "rows": 4}],
                shape=[8, 3]), ValueError, r"twice.parts.json lists the part .*00000/keys.npy more than once"),
    ]
    np.save(tmp_path / "cut.npy", np.zeros((6, 3), np.float32))
    with open(tmp_path / "cut.npy", "r+b") as f:
        f.truncate(140)  # the header and one row of six
    for path, error, message in cases:
        with pytest.raises(error, match=message):
            open_rows(path)
    with pytest.raises(BuildError, match=r"^keys: part .*00009/keys.npy listed in .*gone.parts.json not found$"):
        check_inputs(BuildConfig(keys=tmp_path / "gone.parts.json", out=tmp_path / "ds", factory="IDMap,Flat"))
    with pytest.raises(BuildError, match=r"keys file .*dtype.parts.json is not a loadable parts index: .*'xyz'"):
        check_inputs(BuildConfig(keys=tmp_path / "dtype.parts.json", out=tmp_path / "ds", factory="IDMap,Flat"))
    with pytest.raises(BuildError, match=r"--seed must be in \[0, 2147483646\], got 2147483647"):
        check_inputs(BuildConfig(keys=index, out=tmp_path / "ds", factory="IDMap,Flat", seed=2**31 - 1))
    with pytest.raises(BuildError, match=r"keys file .*short.parts.json is not a loadable parts index: .* 12 rows"):
        check_inputs(BuildConfig(keys=tmp_path / "short.parts.json", out=tmp_path / "ds", factory="IDMap,Flat"))
    with pytest.raises(BuildError, match=r"payload 'v' .* has shape \(10, 3\); its first dimension must be 3"):
        check_inputs(BuildConfig(keys=tmp_path / "wide.npy", out=tmp_path / "ds", factory="IDMap,Flat",
                                 payloads={"v": index}))


# ------------------------------------------------------------------------------------------ kNN-LM


@pytest.fixture(scope="module")
def knn_sources(ray_cluster, data, checkpoint, tmp_path_factory):
    """The kNN-LM source of the train split by the plain loop and by the job (2 workers, 4+ parts)."""
    tmp = tmp_path_factory.mktemp("knn")
    lm = load_checkpoint(checkpoint).model
    ref = encode_knnlm(lm, TokenStore.open(data / "train"), tmp / "plain", W, S, batch_size=4, progress=False)
    config = EncodeJobConfig(kind="knnlm", data=data, checkpoint=checkpoint, context_len=W, stride=S, batch_size=4,
                             rows_per_part=ref.rows // 4 - 100, workers=2, progress=False)
    return ref, run_encode_job(config, tmp / "job")


@pytest.mark.ray
@pytest.mark.slow
def test_knnlm_job_equals_the_plain_loop(knn_sources, ray_cluster):
    import ray

    ref, job = knn_sources
    _same_source(job, ref)
    n_parts = job.details["parts"]
    assert n_parts >= 4 and job.details["workers"] == 2
    records = [json.loads((part_dir(job.directory, i) / "part.json").read_text()) for i in range(n_parts)]
    assert records[0]["row_start"] == 0 and records[-1]["row_end"] == ref.rows
    assert all(a["row_end"] == b["row_start"] for a, b in zip(records, records[1:]))
    assert {r["node"] for r in records} == {ray.get_runtime_context().get_node_id()}
    # parts of whole batches of 4 windows keying 16 rows each (the first 32): not the rows asked for, recorded
    assert job.details["rows_per_part"] == max(r["row_end"] - r["row_start"] for r in records) != ref.rows // 4 - 100
    assert all((r["row_end"] - r["row_start"]) % (4 * S) == 0 for r in records[1:-1])


@pytest.mark.ray
@pytest.mark.slow
def test_build_reads_parts_as_it_reads_npy(knn_sources, tmp_path, ray_cluster):
    import ray

    _, job = knn_sources
    plain = tmp_path / "plain-src"
    plain.mkdir()
    np.save(plain / "keys.npy", np.asarray(job.open_keys()))  # the very same rows, as one .npy
    np.save(plain / "values.npy", np.asarray(job.open_payload()))
    dataclasses.replace(job, directory=plain, details={"context_len": W}).write()
    assert not read_source(plain).parted
    built = [read_manifest(build_source(src, tmp_path / name, shards=2, factory="IVF8,PQ4", seed=3, progress=False))
             for src, name in ((job.directory, "ds-parts"), (plain, "ds-npy"))]
    files = [[{n: f.sha256 for n, f in s.files.items()} for s in m.shards] for m in built]
    assert files[0] == files[1] and built[0].ntotal == job.rows
    assert built[0].build["nodes"] == [ray.get_runtime_context().get_node_id()] * 2
    queries = np.asarray(job.open_keys()[::97]) + 0.01
    found = []
    for name in ("ds-parts", "ds-npy"):
        with InProcessRetriever(tmp_path / name, RetrievalConfig(k=8, nprobe=4, exact_rerank=True)) as retriever:
            found.append(retriever.knn(queries))
    np.testing.assert_array_equal(found[0].ids, found[1].ids)
    np.testing.assert_array_equal(found[0].values, found[1].values)
    np.testing.assert_array_equal(found[0].distances, found[1].distances)


@pytest.mark.ray
@pytest.mark.slow
def test_bad_knnlm_jobs_fail_with_one_line(data, checkpoint, tmp_path, ray_cluster):
    config = EncodeJobConfig(kind="knnlm", data=data, checkpoint=checkpoint, context_len=W, stride=S, progress=False)
    too_long = r"^part \d+ failed: ValueError: context_len 65 exceeds the model's max_len 64$"
    with pytest.raises(EncodeError, match=too_long):
        run_encode_job(dataclasses.replace(config, context_len=65), tmp_path / "a")
    with pytest.raises(ValueError, match="stride must be in"):
        run_encode_job(dataclasses.replace(config, stride=0), tmp_path / "b")
    with pytest.raises(FileNotFoundError, match="checkpoint .*nothing.pt not found"):
        run_encode_job(dataclasses.replace(config, checkpoint=tmp_path / "nothing.pt"), tmp_path / "c")
    with pytest.raises(ValueError, match="workers must be >= 1"):
        run_encode_job(dataclasses.replace(config, workers=0), tmp_path / "d")
    with pytest.raises(ValueError, match="needs num_gpus > 0"):
        run_encode_job(dataclasses.replace(config, device="cuda", num_gpus=0), tmp_path / "e")


# ------------------------------------------------------------------------------------------ RETRO


@pytest.mark.ray
@pytest.mark.slow
def test_retro_job_with_minilm_equals_the_plain_loop(data, tmp_path, ray_cluster, monkeypatch):
    from lm_worker.data.tokenizer import Tokenizer
    from lm_worker.encoders.minilm_chunks import ChunkEncoder

    store = TokenStore.open(data / "heldout")
    ref = encode_retro(store, ChunkEncoder(Tokenizer.load(data / "tokenizer.json")), L, tmp_path / "plain",
                       progress=False)
    config = EncodeJobConfig(kind="retro", data=data, split="heldout", chunk_len=L, rows_per_part=16, batch_size=8,
                             progress=False)
    monkeypatch.chdir(tmp_path)  # a relative output folder: the actors' working directory is another
    job = run_encode_job(config, Path("job"))
    _same_source(job, ref)
    assert job.details["parts"] == -(-ref.rows // 16) and (tmp_path / "job" / "parts" / "00000" / "part.json").is_file()


def _scaled_table(tokenizer, scale: float) -> TableEncoder:
    return TableEncoder()


def test_the_job_stamp_tells_encoders_apart(data):
    """Finished parts are kept only for the encoder that made them: the stamp names the default MiniLM
    encoder by the fingerprint it will have, and a factory by its `fingerprint` attribute, else by its
    name and a partial's arguments (stable from one run to the next); it named both partials of one
    function "partial"."""
    from lm_worker.data.tokenizer import Tokenizer
    from lm_worker.encoders.minilm_chunks import ChunkEncoder
    from lm_worker.jobs.encode_job import factory_identity, job_stamp

    store = TokenStore.open(data / "heldout")
    config = EncodeJobConfig(kind="retro", data=data, split="heldout", chunk_len=L, progress=False)
    first, second = (lambda tokenizer: TableEncoder()), (lambda tokenizer: TableEncoder())
    first.fingerprint, second.fingerprint = "table:first", "table:second"
    factories = [functools.partial(_scaled_table, scale=1.0), functools.partial(_scaled_table, scale=2.0), first,
                 second, TableFactory(), _scaled_table]
    models = [job_stamp(config, store, [], 0, factory)["model"] for factory in factories]
    assert len(set(models)) == len(models), models
    assert models[0] == "test_encode_job._scaled_table(scale=1.0)" and models[2] == "table:first"
    assert models[5] == "test_encode_job._scaled_table"  # no address in it: the same in the next run
    assert factory_identity(TableFactory()) == models[4]  # the same settings again
    default = job_stamp(config, store, [], 0, None)["model"]
    assert default == ChunkEncoder(Tokenizer.load(data / "tokenizer.json")).fingerprint


def test_a_second_encode_job_on_the_same_output_is_refused(data, tmp_path):
    """Two jobs on one output folder: the second would clear the first one's parts while it writes them, so
    it is refused while the first holds the lock, before it touches anything (the first one's swap of the
    folder, part-way, included: the second finished it). An in-process encode takes the same lock."""
    import fcntl

    from lm_worker.sources.output import new_source

    config = EncodeJobConfig(kind="retro", data=data, split="heldout", chunk_len=L, progress=False)
    out = tmp_path / "source"
    out.mkdir()  # empty: taken, as a fresh output
    (tmp_path / ".source.replaced-1").mkdir()  # the running job's swap, between its renames: not the second's
    with open(tmp_path / ".source.encode.lock", "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)  # as a running job holds it
        with pytest.raises(EncodeError, match=f"another encode is writing {out}: wait for it to end"):
            run_encode_job(config, out, TableFactory())
        with pytest.raises(ValueError, match=f"another encode is writing {out}: wait for it to end"):
            with new_source(out):  # an in-process encode (--workers 0): it finished the job's swap before
                pass
        (tmp_path / "link").symlink_to(out)  # the same folder by another name: the same lock
        with pytest.raises(EncodeError, match=f"another encode is writing {out}: wait for it to end"):
            run_encode_job(config, tmp_path / "link", TableFactory())
    assert sorted(p.name for p in tmp_path.iterdir()) == [".source.encode.lock", ".source.replaced-1", "link",
                                                          "source"]
    assert not list(out.iterdir())


@pytest.mark.ray
def test_workers_lost_to_ray_end_the_job_in_one_line(data, tmp_path, ray_cluster, monkeypatch):
    """A worker lost to Ray (out of memory, its node gone) surfaces from the dataset, not as a part's error:
    it ends the job with an EncodeError in one line that says what Ray said, not with Ray's traceback."""
    import ray.data
    import ray.exceptions

    def killed(self, *args, **kwargs):  # as Ray Data raises once a worker is killed
        raise ray.exceptions.OutOfMemoryError("Task was killed due to the node running low on memory.\n"
                                              "Memory on the node was 95%")
        yield

    monkeypatch.setattr(ray.data.Dataset, "iter_rows", killed)
    config = EncodeJobConfig(kind="retro", data=data, split="heldout", chunk_len=L, progress=False)
    with pytest.raises(EncodeError) as failed:
        run_encode_job(config, tmp_path / "source", TableFactory())
    assert str(failed.value).startswith("the encode job's workers failed (OutOfMemoryError: Task was killed due to "
                                        "the node running low on memory.); the parts finished so far are kept in ")
    assert "\n" not in str(failed.value) and not (tmp_path / "source").exists()


@pytest.mark.ray
@pytest.mark.slow
def test_failed_and_damaged_parts_are_redone_alone(data, tmp_path, ray_cluster, by_value):
    store = TokenStore.open(data / "train")
    ref = encode_retro(store, TableEncoder(), L, tmp_path / "plain", progress=False)
    config = EncodeJobConfig(kind="retro", data=data, chunk_len=L, rows_per_part=64, batch_size=16, workers=2,
                             progress=False)
    out = tmp_path / "job"
    poison = tuple(int(t) for t in store.tokens[5 * 64 * L:5 * 64 * L + L])  # the first chunk of part 5
    with pytest.raises(EncodeError, match=r"^part 5 failed: ValueError: poisoned chunk$"):
        run_encode_job(config, out, TableFactory(poison))
    assert not out.exists()  # the parts wait beside it, in the job's work folder
    kept = _part_stamps(job_work_dir(out))
    assert "00005" not in kept and kept
    job = run_encode_job(config, out, TableFactory())
    _same_source(job, ref)
    now = _part_stamps(out)
    assert len(now) == job.details["parts"] == -(-ref.rows // 64) and all(now[p] == kept[p] for p in kept)
    assert not job_work_dir(out).exists()

    (part_dir(out, 1) / "part.json").unlink()  # a part whose marker is missing is not finished
    (part_dir(out, 3) / "keys.npy").write_bytes(b"")  # nor one whose files differ from it
    stale = out / "parts" / ".00002.tmp-dead"
    stale.mkdir()  # the finished parts of the same job are reused (linked), the rest encoded again
    before = _part_stamps(out)
    config = dataclasses.replace(config, workers=1)
    _same_source(run_encode_job(config, out, TableFactory()), ref)
    after = _part_stamps(out)
    assert not stale.exists() and {p for p in after if after[p] != before.get(p)} == {"00001", "00003"}
    # Run again over its own whole source (a RayJob retried after the build failed), the job keeps it as it is:
    # indexes written again were new inputs to the build's resume check, which then started over.
    written = {p.name: p.stat().st_mtime_ns for p in out.glob("*.json")}
    _same_source(run_encode_job(config, out, TableFactory()), ref)
    assert {p.name: p.stat().st_mtime_ns for p in out.glob("*.json")} == written and _part_stamps(out) == after
    assert not job_work_dir(out).exists()

    again = run_encode_job(dataclasses.replace(config, rows_per_part=100), out, TableFactory())  # another plan
    _same_source(again, ref)
    assert again.details["parts"] == len(_part_stamps(out)) == -(-ref.rows // 100)
