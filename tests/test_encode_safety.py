"""Encoding never loses what was there: a folder of other files is refused, a failed re-encode leaves the
earlier source whole (in process and as a Ray job), a rerun resumes only parts of the same tokens, and a
failed part is one log line."""

from __future__ import annotations

import dataclasses
import json
import logging
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import stdlib_data

import lm_worker.jobs.encode_job
from lm_worker.cli import main
from lm_worker.data.token_store import TokenStore, write_token_store
from lm_worker.jobs.encode_job import run_encode_job
from lm_worker.jobs.encode_plan import EncodeError, EncodeJobConfig, PartSpec
from lm_worker.jobs.encode_worker import PartEncoder
from lm_worker.models.checkpoint import save_checkpoint
from lm_worker.models.transformer_lm import LMConfig, TransformerLM
from lm_worker.sources.knnlm import encode_knnlm
from lm_worker.sources.output import check_out, job_work_dir
from lm_worker.sources.retro import encode_retro
from lm_worker.sources.source import read_source

L, VOCAB = 8, 300


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """A prepared corpus of real stdlib code: ~2k train tokens, a few hundred held out."""
    return stdlib_data(tmp_path_factory.mktemp("data"), VOCAB, chars=3000)


@pytest.fixture(scope="module")
def lm(data, tmp_path_factory) -> Path:
    torch.manual_seed(0)
    model = TransformerLM(LMConfig.tiny(vocab_size=VOCAB, max_len=32)).eval()
    path = tmp_path_factory.mktemp("lm") / "checkpoint.pt"
    return save_checkpoint(path, kind="lm", model=model, config=model.config, step=0,
                           tokenizer_fingerprint=TokenStore.open(data / "train").tokenizer_fingerprint, extra={})


class TableEncoder:
    """A deterministic projection of chunk tokens: the chunk encoder's interface, fast. With `fail_after`,
    it raises on that many calls' next (an encode that fails half-way)."""

    dimension = 8
    fingerprint = "table:8"

    def __init__(self, fail_after: int | None = None, poison: tuple[int, ...] | None = None):
        self.table = np.random.default_rng(0).standard_normal((VOCAB, self.dimension)).astype(np.float32)
        self.fail_after, self.poison, self.calls = fail_after, poison, 0

    def embed(self, chunks: np.ndarray) -> np.ndarray:
        chunks = np.asarray(chunks)
        self.calls += 1
        if self.fail_after is not None and self.calls > self.fail_after:
            raise RuntimeError("the encoder failed half-way")
        if self.poison is not None and tuple(chunks[0]) == self.poison:
            raise ValueError("poisoned chunk")
        return (self.table[chunks] * (1 + np.arange(chunks.shape[1]))[None, :, None]).sum(1).astype(np.float32)


@dataclasses.dataclass(frozen=True)
class TableFactory:
    """What the job's actors call with the tokenizer to build their encoder."""

    poison: tuple[int, ...] | None = dataclasses.field(default=None, repr=False)  # a fault, not a setting

    def __call__(self, tokenizer) -> TableEncoder:
        return TableEncoder(poison=self.poison)


def files_of(folder: Path) -> dict[str, bytes]:
    """Every file under `folder`, by relative path, with its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def one_line_error(capsys, *args) -> str:
    code = main(["--no-progress", "--log-level", "WARNING", *map(str, args)])
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    return err.strip()


# ------------------------------------------------------------------------------------------ other files


def test_a_folder_of_other_files_is_refused_and_left_as_it_was(data, lm, tmp_path, capsys, monkeypatch):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("the user's notes")
    (out / "keys.npy").write_bytes(b"the user's own keys")
    before = files_of(out)
    monkeypatch.setattr(lm_worker.jobs.encode_job, "connect", lambda address: pytest.fail("Ray was started"))
    words = f"{out} holds 'keys.npy', 'notes.txt' but no datastore source"
    refused = "^" + re.escape(words)
    for workers in ("0", "1"):
        err = one_line_error(capsys, "encode", "knnlm", "--checkpoint", lm, "--data", data, "--out", out,
                             "--context-len", "16", "--workers", workers)
        assert err.startswith(f"lm-worker encode: error: --out {words}: "), err
    store = TokenStore.open(data / "train")
    with pytest.raises(ValueError, match=refused):
        encode_retro(store, TableEncoder(), L, out, progress=False)
    with pytest.raises(ValueError, match=refused):
        run_encode_job(EncodeJobConfig(kind="retro", data=data, chunk_len=L, progress=False), out, TableFactory())
    assert files_of(out) == before and sorted(p.name for p in tmp_path.iterdir()) == ["mine"]
    (out / "parts").mkdir()
    (out / "parts" / "job.json").write_text("{}")
    check_out(out)  # an unfinished encode's parts: taken, to resume or replace
    check_out(tmp_path / "new")


# ------------------------------------------------------------------------------------------ in process


def test_a_failed_re_encode_leaves_the_source_as_it_was(data, tmp_path):
    store = TokenStore.open(data / "train")
    out = tmp_path / "runs" / "src"
    first = encode_retro(store, TableEncoder(), L, out, progress=False, batch=16)
    made = tmp_path / "made"
    made.mkdir()
    assert out.stat().st_mode & 0o777 == made.stat().st_mode & 0o777  # the umask's mode: others may read it
    (out / "notes.txt").write_text("the user's notes beside the source")
    before = files_of(out)
    short = write_token_store(tmp_path / "short", [("a", [5, 6])], 0, store.tokenizer_fingerprint)
    with pytest.raises(ValueError, match="no complete chunk of 8"):
        encode_retro(short, TableEncoder(), L, out, progress=False)
    with pytest.raises(RuntimeError, match="the encoder failed half-way"):
        encode_retro(store, TableEncoder(fail_after=2), L, out, progress=False, batch=16)
    assert files_of(out) == before and read_source(out) == first
    assert sorted(p.name for p in out.parent.iterdir()) == ["src"]  # no work folder left

    again = encode_retro(store, TableEncoder(), 2 * L, out, progress=False)
    assert read_source(out) == again and again.rows == len(store) // (2 * L) and again.directory == out
    assert (out / "notes.txt").read_text() == "the user's notes beside the source"
    assert sorted(p.name for p in out.parent.iterdir()) == ["src"]


class Failing(torch.nn.Module):
    """A model whose forward fails: a kNN-LM encode that breaks after its checks."""

    config = None

    def forward(self, tokens, return_keys=False):
        raise RuntimeError("the model failed")


def test_a_failed_knnlm_re_encode_leaves_the_source_as_it_was(data, lm, tmp_path):
    from lm_worker.models.checkpoint import load_checkpoint

    store = TokenStore.open(data / "train")
    first = encode_knnlm(load_checkpoint(lm).model, store, tmp_path / "src", 16, 8, progress=False)
    before = files_of(tmp_path / "src")
    with pytest.raises(RuntimeError, match="the model failed"):
        encode_knnlm(Failing(), store, tmp_path / "src", 16, 8, progress=False)
    assert files_of(tmp_path / "src") == before and read_source(tmp_path / "src") == first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


# ------------------------------------------------------------------------------------------ the Ray job


def _stamps(folder: Path) -> dict[str, int]:
    """When each finished part's part.json was written, by part folder name."""
    return {p.parent.name: p.stat().st_mtime_ns for p in (folder / "parts").glob("[0-9]*/part.json")}


def _same_rows(job, keys: np.ndarray, payload: np.ndarray) -> None:
    assert job.parted and job.rows == len(keys)
    np.testing.assert_allclose(np.asarray(job.open_keys()), keys, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(job.open_payload()), payload)


@pytest.mark.ray
@pytest.mark.slow
def test_a_failed_job_re_encode_keeps_the_source_and_a_rerun_resumes(data, tmp_path, ray_cluster, by_value):
    store = TokenStore.open(data / "train")
    out = tmp_path / "src"
    first = encode_retro(store, TableEncoder(), L, out, progress=False)  # the source a re-encode replaces
    rows = np.array(first.open_keys()), np.array(first.open_payload())
    (out / "notes.txt").write_text("the user's notes beside the source")
    before = files_of(out)
    config = EncodeJobConfig(kind="retro", data=data, chunk_len=L, rows_per_part=48, batch_size=16, progress=False)
    poison = tuple(int(t) for t in store.tokens[2 * 48 * L:2 * 48 * L + L])  # the first chunk of part 2
    with pytest.raises(EncodeError, match=r"^part 2 failed: ValueError: poisoned chunk$"):
        run_encode_job(config, out, TableFactory(poison))
    assert files_of(out) == before and read_source(out) == first
    kept = _stamps(job_work_dir(out))
    assert "00002" not in kept and kept
    stamp_file = job_work_dir(out) / "parts" / "job.json"  # as a version that stamped no tokens' digest wrote it
    stamp_file.write_text(json.dumps({k: v for k, v in json.loads(stamp_file.read_text()).items()
                                      if k != "token_digest"}))

    again = run_encode_job(config, out, TableFactory())  # the same job: its finished parts are resumed
    _same_rows(again, *rows)
    now = _stamps(out)
    assert all(now[p] == kept[p] for p in kept) and len(now) == again.details["parts"]
    assert (out / "notes.txt").is_file() and sorted(p.name for p in tmp_path.iterdir()) == ["src"]


@pytest.mark.ray
@pytest.mark.slow
def test_a_rerun_discards_parts_of_tokens_that_changed(data, tmp_path, ray_cluster, by_value, caplog):
    corpus = tmp_path / "data"
    store = TokenStore.open(data / "train")
    (corpus / "train").mkdir(parents=True)
    (corpus / "tokenizer.json").write_bytes((data / "tokenizer.json").read_bytes())
    docs = [(d.name, np.asarray(store.tokens[d.start:d.end - 1]).tolist()) for d in store.documents]
    write_token_store(corpus / "train", docs, int(store.tokens[-1]), store.tokenizer_fingerprint)
    config = EncodeJobConfig(kind="retro", data=corpus, chunk_len=L, rows_per_part=64, batch_size=16, progress=False)
    poison = tuple(int(t) for t in store.tokens[2 * 64 * L:2 * 64 * L + L])
    with pytest.raises(EncodeError, match="poisoned chunk"):
        run_encode_job(config, tmp_path / "job", TableFactory(poison))
    assert _stamps(job_work_dir(tmp_path / "job"))
    changed = [(name, tokens[::-1]) for name, tokens in docs]  # other tokens, the same length and documents
    write_token_store(corpus / "train", changed, int(store.tokens[-1]), store.tokenizer_fingerprint)
    with caplog.at_level(logging.WARNING, logger="lm_worker.jobs.encode_job"):
        job = run_encode_job(config, tmp_path / "job", TableFactory())
    ref = encode_retro(TokenStore.open(corpus / "train"), TableEncoder(), L, tmp_path / "plain", progress=False)
    _same_rows(job, np.load(ref.keys_path), np.load(ref.payload[1]))
    assert "parts of a different job (changed: token_digest)" in caplog.text


# ------------------------------------------------------------------------------------------ a failed part


def _fails_to_load(tokenizer):
    raise OSError("no such encoder")


def _fails_to_embed(tokenizer):
    return TableEncoder(fail_after=0)


@pytest.mark.parametrize("factory, logged, error", [
    (_fails_to_load, "the encoder of this worker could not be loaded", "OSError: no such encoder"),
    (_fails_to_embed, "part 3 failed", "RuntimeError: the encoder failed half-way"),
])
def test_a_failed_part_is_one_log_line_with_its_traceback_at_debug(data, tmp_path, caplog, factory, logged, error):
    """Ray forwards a worker's log to the driver: a failure there is one line, beside the driver's EncodeError."""
    config = EncodeJobConfig(kind="retro", data=data, chunk_len=L, progress=False)
    part = PartSpec(index=3, first=0, last=4, row_start=0, row_end=4)
    threads = torch.get_num_threads()
    caplog.set_level(logging.DEBUG, logger="lm_worker.jobs.encode_worker")
    try:
        answer = PartEncoder(config, str(tmp_path), eos_id=0, encoder_factory=factory)(
            {name: np.array([value]) for name, value in dataclasses.asdict(part).items()})
    finally:
        torch.set_num_threads(threads)
    assert answer["error"][0] == error
    shown = [r for r in caplog.records if r.levelno >= logging.INFO]
    assert [r.getMessage() for r in shown] == [f"{logged}: {error}"] and shown[0].exc_info is None
    assert any(r.levelno == logging.DEBUG and r.exc_info for r in caplog.records)
    assert not (tmp_path / "parts").exists()


def test_a_replacement_stopped_part_way_is_ended_by_the_next_write(tmp_path, monkeypatch):
    """A source is replaced by two renames: stopped between them, the old source goes back at once; killed
    there, or after them with the user's other files still in the old folder, the next write to that
    output puts things right (it left no source at all, or the user's files hidden in .NAME.replaced-*)."""
    import os

    from lm_worker.sources.output import new_source

    out = tmp_path / "src"

    def write(folder: Path, marker: str) -> None:
        (folder / "source.json").write_text(json.dumps({"kind": "retro", "marker": marker}))
        np.save(folder / "keys.npy", np.zeros((2, 3), np.float32))

    out.mkdir()
    write(out, "old")
    (out / "notes.txt").write_text("mine")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    real_rename = os.rename

    def stopped(src, dst):
        if ".encoding-" in str(src):
            raise KeyboardInterrupt
        real_rename(src, dst)

    monkeypatch.setattr(os, "rename", stopped)
    with pytest.raises(KeyboardInterrupt), new_source(out) as work:
        write(work, "new")
    monkeypatch.undo()
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before and sorted(os.listdir(tmp_path)) == ["src"]

    os.rename(out, tmp_path / ".src.replaced-dead0001")  # killed between the renames: no source at all
    check_out(out)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before and sorted(os.listdir(tmp_path)) == ["src"]

    os.rename(out, tmp_path / ".src.replaced-dead0002")  # killed after them, the user's file not moved yet
    out.mkdir()
    write(out, "new")
    check_out(out)
    assert json.loads((out / "source.json").read_text())["marker"] == "new"
    assert (out / "notes.txt").read_text() == "mine" and sorted(os.listdir(tmp_path)) == ["src"]
