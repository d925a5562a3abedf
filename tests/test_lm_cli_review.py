"""`lm-worker` keeps what it did not write and shows untrusted text safely: prepare refuses an --out with
foreign files in its splits, `train` and `eval` refuse a split folder as --out, retrieval-demo refuses a
folder that is not its own, prepare's progress stays off stdout, fingerprints read from files are shown
bounded, generated text cannot carry terminal escapes, a prompt file splits on newlines only, and
`neighbours` never leaves a window record beside a file it does not describe. Tiny artefacts, no servers,
no Ray."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from lm_worker.cli import main
from lm_worker.data.tokenizer import Tokenizer
from lm_worker.models.checkpoint import save_checkpoint
from lm_worker.models.transformer_lm import LMConfig, TransformerLM

QUIET = ["--no-progress", "--log-level", "WARNING"]
FORGED = "bpe:x\nlm-worker: FORGED LINE" + "y" * 200  # a fingerprint read from a file: not to be shown whole


def one_line_error(capsys, *args) -> str:
    """Runs `lm-worker ARGS`; asserts it failed with exit code 1 and one stderr line; returns that line."""
    code = main([*QUIET, *[str(a) for a in args]])
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    return err.strip()


def write_corpus(path: Path) -> Path:
    path.write_text("".join(json.dumps({"id": f"d{i}", "text": f"def f_{i}(x):\n    return x + {i}\n" * 4}) + "\n"
                            for i in range(12)))
    return path


def prepare(root: Path, name: str, *extra: str, quiet: list[str] = QUIET) -> int:
    return main([*quiet, "prepare", "--corpus", str(write_corpus(root / "corpus.jsonl")), "--out", str(root / name),
                 "--vocab-size", "300", "--heldout-fraction", "0.2", *extra])


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """RUN/data (a 300-token BPE over a tiny corpus) and RUN/lm (an untrained tiny LM of its tokenizer)."""
    root = tmp_path_factory.mktemp("review")
    assert prepare(root, "data") == 0
    tokenizer = Tokenizer.load(root / "data" / "tokenizer.json")
    model = TransformerLM(LMConfig.tiny(tokenizer.vocab_size))
    save_checkpoint(root / "lm" / "checkpoint.pt", kind="lm", model=model, config=model.config, step=0,
                    tokenizer_fingerprint=tokenizer.fingerprint, extra={})
    return root


# 1. prepare keeps files inside its splits; a split folder is no --out of `train` or `eval`


def test_prepare_refuses_an_out_with_a_foreign_file_in_a_split(tmp_path, capsys):
    assert prepare(tmp_path, "p3") == 0
    (tmp_path / "p3" / "train" / "notes.txt").write_text("precious")
    err = one_line_error(capsys, "prepare", "--corpus", tmp_path / "corpus.jsonl", "--out", tmp_path / "p3",
                         "--vocab-size", "300", "--heldout-fraction", "0.2")
    assert err.startswith(f"lm-worker prepare: error: --out {tmp_path / 'p3'} holds 'train/notes.txt', which "
                          "prepare did not write"), err
    assert (tmp_path / "p3" / "train" / "notes.txt").read_text() == "precious"


def test_prepare_replaces_a_folder_it_wrote(tmp_path, capsys):
    assert prepare(tmp_path, "p") == 0
    assert prepare(tmp_path, "p") == 0
    assert sorted(p.name for p in (tmp_path / "p" / "train").iterdir()) == ["doc_ids.npy", "documents.json",
                                                                           "tokens.npy"]


@pytest.mark.parametrize("args, split", [
    (["train", "--data", "{run}/data", "--out", "{run}/data/train", "--preset", "tiny"], "train"),
    (["eval", "--data", "{run}/data", "--lm", "{run}/lm", "--out", "{run}/data/heldout", "--knnlm-target",
      "127.0.0.1:1"], "heldout")])
def test_a_split_folder_is_refused_as_out(run, capsys, args, split):
    before = sorted(p.name for p in (run / "data" / split).iterdir())
    err = one_line_error(capsys, *(a.format(run=run) for a in args))
    assert f"--out {run / 'data' / split} is a split of a prepared corpus, not " in err, err
    assert sorted(p.name for p in (run / "data" / split).iterdir()) == before


# 2. retrieval-demo writes only into a folder of its own


def demo_stub(monkeypatch) -> list:
    """Replaces the demo's work by a stub that records its config and stops the command."""
    import lm_worker.retrieval.demo as demo

    called = []

    def stub(config):
        called.append(config)
        raise ValueError("stub: the demo would run now")

    monkeypatch.setattr(demo, "run_demo", stub)
    return called


def demo_datastore(path: Path, **metadata) -> None:
    """A manifest.json alone, with the metadata given (read for it before any build)."""
    path.mkdir(parents=True)
    (path / "manifest.json").write_text(json.dumps({"metadata": metadata}))


@pytest.mark.parametrize("layout", ["other-datastore", "source-json"])
def test_retrieval_demo_refuses_source_and_datastore_it_did_not_write(tmp_path, capsys, monkeypatch, layout):
    called = demo_stub(monkeypatch)
    out = tmp_path / "r"
    (out / "source").mkdir(parents=True)
    np.save(out / "source" / "keys.npy", np.zeros((3, 2), np.float32))
    if layout == "other-datastore":
        demo_datastore(out / "datastore", kind="knnlm")
    elif layout == "source-json":
        (out / "source" / "source.json").write_text("{}")
    err = one_line_error(capsys, "retrieval-demo", "--out", out)
    assert err.startswith(f"lm-worker retrieval-demo: error: --out {out} holds "), err
    assert "not a retrieval-demo folder" in err and not called


def test_retrieval_demo_takes_a_folder_it_wrote(tmp_path, capsys, monkeypatch):
    from lm_worker.retrieval.demo import mark_demo_source

    called = demo_stub(monkeypatch)
    for out in (tmp_path / "empty", tmp_path / "new"):
        out.mkdir(exist_ok=out.name == "new")
        assert "stub: the demo would run now" in one_line_error(capsys, "retrieval-demo", "--out", out)
    out = tmp_path / "ran"
    mark_demo_source(out / "source")
    np.save(out / "source" / "keys.npy", np.zeros((3, 2), np.float32))
    assert "stub: the demo would run now" in one_line_error(capsys, "retrieval-demo", "--out", out)
    older = tmp_path / "older"  # an earlier version's output: no mark; its build stopped, or its manifest has no
    for name in ("keys.npy", "tokens.npy", "doc.npy"):  # digest of the keys
        np.save(older / "source" / name if (older / "source").is_dir() else _mkdir(older / "source") / name,
                np.zeros(3, np.int32))
    assert "stub: the demo would run now" in one_line_error(capsys, "retrieval-demo", "--out", older)
    demo_datastore(older / "datastore", encoder="all-MiniLM-L6-v2", chunk_len="64", corpus="cpython-stdlib")
    assert "stub: the demo would run now" in one_line_error(capsys, "retrieval-demo", "--out", older)
    assert len(called) == 5


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True)
    return path


# 3. prepare's progress is not on stdout


def test_prepare_shows_no_trainer_progress_on_stdout(tmp_path, capfd):
    assert prepare(tmp_path, "p", quiet=["--log-level", "WARNING"]) == 0
    out = capfd.readouterr().out
    assert out.startswith("tokenizer bpe:") and "Pre-processing" not in out and "Merges" not in out, out


# 4. fingerprints read from files are shown bounded, on one line


def test_eval_shows_a_split_s_fingerprint_bounded(run, tmp_path, capsys):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(run / "data", data)
    meta = json.loads((data / "heldout" / "documents.json").read_text())
    (data / "heldout" / "documents.json").write_text(json.dumps({**meta, "tokenizer": FORGED}))
    err = one_line_error(capsys, "eval", "--data", data, "--lm", run / "lm", "--out", tmp_path / "e",
                         "--knnlm-target", "127.0.0.1:1")
    assert "was tokenized with 'bpe:x\\nlm-worker: FORGED LINE" in err and "... (228 characters)" in err, err


def test_neighbours_shows_a_source_s_fingerprint_bounded(run, tmp_path, capsys):
    source = tmp_path / "src"
    source.mkdir()
    (source / "source.json").write_text(json.dumps({"kind": "retro", "rows": 3, "dimension": 2, "chunk_len": 16,
                                                    "tokenizer_fingerprint": FORGED, "encoder_fingerprint": "e"}))
    err = one_line_error(capsys, "neighbours", "--source", source, "--data", run / "data", "--target", "127.0.0.1:1")
    assert "holds tokens of tokenizer 'bpe:x\\nlm-worker: FORGED LINE" in err and "(228 characters)" in err, err


def test_a_checkpoint_s_fingerprint_is_shown_bounded(run, tmp_path, capsys):
    model = TransformerLM(LMConfig.tiny(300))
    save_checkpoint(tmp_path / "lm" / "checkpoint.pt", kind="lm", model=model, config=model.config, step=0,
                    tokenizer_fingerprint=FORGED, extra={})
    err = one_line_error(capsys, "generate", "--checkpoint", tmp_path / "lm", "--data", run / "data",
                         "--no-retrieval", "--prompt", "x")
    assert "was trained with tokenizer 'bpe:x\\nlm-worker: FORGED LINE" in err and "(228 characters)" in err, err


# 5. --max-retro-tokens without a --max-train-tokens budget is refused up front


def test_prepare_refuses_retro_tokens_without_a_train_budget_before_any_work(tmp_path, capsys, monkeypatch):
    import lm_worker.data.prepare as prepare_module

    def trained(*args, **kwargs):
        raise AssertionError("the tokenizer was trained")

    monkeypatch.setattr(prepare_module, "train_tokenizer", trained)
    err = one_line_error(capsys, "prepare", "--corpus", write_corpus(tmp_path / "c.jsonl"), "--out", tmp_path / "p",
                         "--heldout-fraction", "0.2", "--max-retro-tokens", "100")
    assert err.startswith("lm-worker prepare: error: --max-train-tokens 0 trains on every training document"), err
    assert "--max-retro-tokens 100" in err and not (tmp_path / "p").exists()


# 6. generated text is printed with its control characters escaped


ESCAPES = "\x1b]0;owned\x07\x1b[2Jdef f(x):\n    return x\n"


def test_generate_prints_generated_text_escaped(run, capsys, monkeypatch):
    monkeypatch.setattr(Tokenizer, "decode", lambda self, ids: ESCAPES)  # a model that emits escapes
    assert main([*QUIET, "generate", "--checkpoint", str(run / "lm"), "--data", str(run / "data"), "--no-retrieval",
                 "--prompt", "def", "--max-new-tokens", "2"]) == 0
    out = capsys.readouterr().out
    assert "\x1b" not in out and "\x07" not in out, out
    assert "\\x1b]0;owned\\x07\\x1b[2Jdef f(x):\n    return x\n" in out, out


def test_the_demo_prints_its_samples_escaped(tmp_path, capsys, monkeypatch):
    import lm_worker.pipeline.run as pipeline_run

    samples = tmp_path / "samples.md"
    samples.write_text(ESCAPES)
    report = SimpleNamespace(summary="summary", samples=samples, report=tmp_path, eval_json=tmp_path / "eval.json",
                             plots=[])
    monkeypatch.setattr(pipeline_run, "run_pipeline", lambda config: report)
    assert main([*QUIET, "demo", "--quick", "--run", str(tmp_path / "run")]) == 0
    out = capsys.readouterr().out
    assert "\x1b" not in out and "\\x1b[2Jdef f(x):\n    return x\n" in out, out


# 7. a prompt file holds one prompt per line: split on newlines only


def test_a_prompt_file_splits_on_newlines_only(run, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a\x0cb\r\n\n  \nc\x1cd\u2028e\x85f\n", newline="")
    assert main([*QUIET, "generate", "--checkpoint", str(run / "lm"), "--data", str(run / "data"), "--no-retrieval",
                 "--prompt-file", str(prompts), "--max-new-tokens", "1"]) == 0
    shown = [line for line in capsys.readouterr().out.splitlines() if line.startswith("--- ")]
    assert shown == ["--- 'a\\x0cb'", "--- 'c\\x1cd\\u2028e\\x85f'"], shown


# 8. `neighbours` never leaves a window record beside a train file it does not describe


def retro_source(run: Path, path: Path) -> None:
    """A RETRO source of RUN/data's tokenizer with keys, and held-out keys whose record matches: `neighbours`
    embeds nothing."""
    from lm_worker.data.token_store import TokenStore
    from lm_worker.sources.retro import keys_record

    fingerprint = Tokenizer.load(run / "data" / "tokenizer.json").fingerprint
    path.mkdir()
    (path / "source.json").write_text(json.dumps({"kind": "retro", "rows": 3, "dimension": 2, "chunk_len": 4,
                                                  "tokenizer_fingerprint": fingerprint, "encoder_fingerprint": "e"}))
    np.save(path / "keys.npy", np.zeros((3, 2), np.float32))
    np.save(path / "heldout-keys.npy", np.zeros((2, 2), np.float32))
    record = keys_record(TokenStore.open(run / "data" / "heldout"), 4, "e")
    (path / "heldout-keys.json").write_text(json.dumps(record))
    np.save(path / "neighbours-train.npy", np.zeros((1,), np.int64))  # an earlier fetch's, for a window of 64
    (path / "neighbours-train.json").write_text(json.dumps({"window": 64}))


@pytest.fixture
def fake_service(monkeypatch):
    """A retriever of the source's 3 rows in place of a served datastore; fetched neighbours are written as
    zeros. Returns the splits whose search was recorded."""
    import contextlib

    import lm_worker.cli.sources as cli_sources
    import lm_worker.sources.neighbours as neighbours

    retriever = SimpleNamespace(ntotal=3, metadata={"kind": "retro", "chunk_len": "4", "encoder": "e"},
                                config=SimpleNamespace(search_settings=lambda: {}))
    monkeypatch.setattr(cli_sources, "open_retriever", lambda *a, **k: contextlib.nullcontext(retriever))
    monkeypatch.setattr(neighbours, "precompute_neighbours",
                        lambda retriever, keys, exclude, out, progress: np.save(out, np.ones((2,), np.int64)))
    return monkeypatch


def test_neighbours_stopped_after_the_train_file_leaves_no_stale_window(run, tmp_path, capsys, fake_service):
    import lm_worker.sources.neighbours as neighbours

    source = tmp_path / "src"
    retro_source(run, source)

    def stopped(source, split, search):
        raise KeyboardInterrupt  # a stop between the train file and its records

    fake_service.setattr(neighbours, "record_search", stopped)
    assert main([*QUIET, "neighbours", "--source", str(source), "--data", str(run / "data"), "--target",
                 "127.0.0.1:1", "--seq-len", "32"]) == 130
    assert np.load(source / "neighbours-train.npy").tolist() == [1, 1]  # fetched for a window of 32
    assert neighbours.recorded_window(source) == 32  # recorded as soon as the file was whole, not left at 64


def test_a_failed_fetch_keeps_the_train_file_and_its_window(run, tmp_path, capsys, fake_service):
    import lm_worker.sources.neighbours as neighbours

    source = tmp_path / "src"
    retro_source(run, source)

    def unreachable(retriever, keys, exclude, out, progress):
        raise KeyboardInterrupt  # the service gone, or a Ctrl-C, before the file is replaced

    fake_service.setattr(neighbours, "precompute_neighbours", unreachable)
    assert main([*QUIET, "neighbours", "--source", str(source), "--data", str(run / "data"), "--target",
                 "127.0.0.1:1", "--seq-len", "32"]) == 130
    assert np.load(source / "neighbours-train.npy").tolist() == [0]  # the earlier fetch's file...
    assert neighbours.recorded_window(source) == 64  # ...with its record, which still describes it


def test_neighbours_records_the_window_once_the_train_file_is_whole(run, tmp_path, capsys, fake_service):
    import lm_worker.sources.neighbours as neighbours

    source = tmp_path / "src"
    retro_source(run, source)
    assert main([*QUIET, "neighbours", "--source", str(source), "--data", str(run / "data"), "--target",
                 "127.0.0.1:1", "--seq-len", "32"]) == 0
    assert neighbours.recorded_window(source) == 32
    assert not [p.name for p in source.iterdir() if "tmp" in p.name]
