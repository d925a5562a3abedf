"""`lm-worker` refuses bad inputs in one line naming the flag or the file, before any work: a source of the
wrong kind, damaged source.json and documents.json files, a truncated checkpoint, impossible numbers, flags
that do not apply, and output paths that cannot be written. Tiny artefacts made here: no servers, no Ray."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from lm_worker.cli import main
from lm_worker.data.token_store import TokenStore
from lm_worker.data.tokenizer import Tokenizer
from lm_worker.models.checkpoint import save_checkpoint
from lm_worker.models.retro import Retro, RetroConfig
from lm_worker.models.transformer_lm import LMConfig, TransformerLM
from lm_worker.sources.source import read_source

SOURCE = {"kind": "knnlm", "rows": 3, "dimension": 2, "tokenizer_fingerprint": "t", "encoder_fingerprint": "e"}


def one_line_error(capsys, *args: str) -> str:
    """Runs `lm-worker ARGS`; asserts it failed with exit code 1 and one stderr line; returns that line."""
    code = main(["--no-progress", "--log-level", "WARNING", *[str(a) for a in args]])
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    return err.strip()


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """RUN/data (a 300-token BPE over a tiny corpus), RUN/lm and RUN/retro (untrained tiny models) and
    RUN/knnlm-source (a kNN-LM source's source.json, no arrays), RUN/knnlm-ds (a kNN-LM datastore's
    manifest.json alone) and RUN/att-dir.png (a folder)."""
    root = tmp_path_factory.mktemp("inputs")
    corpus = root / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"id": f"d{i}", "text": f"def f_{i}(x):\n    return x + {i}\n" * 4}) + "\n"
                              for i in range(12)))
    assert main(["--no-progress", "--log-level", "WARNING", "prepare", "--corpus", str(corpus), "--out",
                 str(root / "data"), "--vocab-size", "300", "--heldout-fraction", "0.2"]) == 0
    tokenizer = Tokenizer.load(root / "data" / "tokenizer.json")
    for kind, model in (("lm", TransformerLM(LMConfig.tiny(tokenizer.vocab_size))),
                        ("retro", Retro(RetroConfig.tiny(tokenizer.vocab_size)))):
        save_checkpoint(root / kind / "checkpoint.pt", kind=kind, model=model, config=model.config, step=0,
                        tokenizer_fingerprint=tokenizer.fingerprint, extra={})
    (root / "knnlm-source").mkdir()
    (root / "knnlm-source" / "source.json").write_text(json.dumps(SOURCE))
    (root / "afile").write_text("a file, not a folder")
    (root / "knnlm-ds").mkdir()  # read for its kind before any server starts
    (root / "knnlm-ds" / "manifest.json").write_text(json.dumps({"metadata": {"kind": "knnlm"}}))
    (root / "att-dir.png").mkdir()
    return root


def test_neighbours_refuses_a_knnlm_source(run, capsys):
    err = one_line_error(capsys, "neighbours", "--source", run / "knnlm-source", "--data", run / "data", "--target",
                         "127.0.0.1:1")
    assert err == f"lm-worker neighbours: error: --source {run}/knnlm-source is a kNN-LM source, not a RETRO one"


@pytest.mark.parametrize("workers", ["0", "2"])
def test_encode_refuses_a_chunk_len_below_one_up_front(run, capsys, workers):
    err = one_line_error(capsys, "encode", "retro", "--data", run / "data", "--out", run / "src", "--workers",
                         workers, "--chunk-len", "0")
    assert err == "lm-worker encode: error: --chunk-len must be >= 1, got 0" and not (run / "src").exists()


@pytest.mark.parametrize("body, words", [
    ("{}", "is not a datastore source's record: it lacks 'kind', 'rows', 'dimension', 'tokenizer_fingerprint', "
           "'encoder_fingerprint'"),
    ("[1]", "holds a JSON list, not an object"),
    ("{x", "is not valid JSON: Expecting property name enclosed in double quotes"),
    (json.dumps({**SOURCE, "extra": 1}), "is not a datastore source's record: it has unknown 'extra'"),
    (json.dumps({**SOURCE, "kind": "bm25"}), "records kind 'bm25', not one of 'knnlm', 'retro'"),
])
def test_a_bad_source_json_names_the_file(run, tmp_path, capsys, body, words):
    (tmp_path / "source.json").write_text(body)
    with pytest.raises(ValueError, match=f"^{tmp_path}/source.json "):
        read_source(tmp_path)
    err = one_line_error(capsys, "build", tmp_path, "--out", tmp_path / "ds")
    assert err.startswith(f"lm-worker build: error: {tmp_path}/source.json {words}"), err


@pytest.mark.parametrize("body, words", [
    ('{"documents": []}', " has no field 'tokenizer'"),
    ('{"tokenizer": "x", "documents": [', " is not valid JSON: Expecting value"),
    ('{"tokenizer": "x", "documents": [{"name": "a"}]}',
     ": document 0 is not an object with 'name', 'start' and 'end'"),
])
def test_a_bad_documents_json_names_the_file(run, tmp_path, capsys, body, words):
    data = tmp_path / "data"
    shutil.copytree(run / "data", data)
    (data / "heldout" / "documents.json").write_text(body)
    with pytest.raises(ValueError, match=f"^{data}/heldout/documents.json"):
        TokenStore.open(data / "heldout")
    err = one_line_error(capsys, "eval", "--data", data, "--out", tmp_path / "eval", "--lm", run / "lm",
                         "--knnlm-datastore", tmp_path / "x")
    assert err.startswith(f"lm-worker eval: error: {data}/heldout/documents.json{words}"), err


def test_a_truncated_checkpoint_is_one_line(run, tmp_path, capsys):
    """torch reads a zip cut short after its first entries with an OSError (EINVAL) that names no file."""
    (tmp_path / "checkpoint.pt").write_bytes((run / "lm" / "checkpoint.pt").read_bytes()[:5000])
    err = one_line_error(capsys, "generate", "--checkpoint", tmp_path, "--data", run / "data", "--prompt", "hi",
                         "--no-retrieval")
    assert err.startswith(f"lm-worker generate: error: {tmp_path}/checkpoint.pt is not a readable checkpoint: "
                          "it is truncated or damaged ("), err


@pytest.fixture
def no_pipeline(monkeypatch):
    """The pipeline and the retrieval demo fail the test if they start: a refusal must come first."""
    import lm_worker.pipeline.run
    import lm_worker.retrieval.demo

    def started(*args, **kwargs):
        raise AssertionError("the work started before the flags were checked")

    monkeypatch.setattr(lm_worker.pipeline.run, "run_pipeline", started)
    monkeypatch.setattr(lm_worker.retrieval.demo, "run_demo", started)


@pytest.mark.parametrize("flag", ["--max-train-tokens", "--max-heldout-tokens", "--max-retro-tokens"])
def test_prepare_refuses_a_negative_budget_before_any_work(run, tmp_path, capsys, flag):
    err = one_line_error(capsys, "prepare", "--corpus", run / "corpus.jsonl", "--out", tmp_path / "p", flag, "-1")
    assert err == f"lm-worker prepare: error: {flag} must be >= 0, got -1" and not (tmp_path / "p").exists()


@pytest.mark.parametrize("args, words", [
    (["pipeline", "--run", "{tmp}/r", "--train-tokens", "-1"], "--train-tokens must be >= 0, got -1"),
    (["pipeline", "--run", "{tmp}/r", "--retro-tokens", "-5"], "--retro-tokens must be >= 0, got -5"),
    (["demo", "--quick", "--run", "{tmp}/r", "--workers", "-1"], "--workers must be >= 0, got -1"),
    (["retrieval-demo", "--out", "{tmp}/r", "--queries", "0"], "--queries must be >= 1, got 0"),
    (["pipeline", "--run", "{run}/afile"], "--run {run}/afile exists and is not a folder"),
    (["demo", "--run", "{run}/afile/sub"], "--run {run}/afile/sub lies under {run}/afile, which is a file"),
    (["pipeline", "--run", "{tmp}/r", "--train-tokens", "0"], "--train-tokens 0 trains the LM on every training "
     "document, which leaves none for --retro-tokens 3200000: give a --train-tokens budget, or --retro-tokens 0"),
    (["pipeline", "--run", "{run}/afile", "--train-tokens", "0", "--retro-init", "scratch"],  # no retro split:
     "--run {run}/afile exists and is not a folder"),  # --retro-tokens is not used, so not refused
    (["pipeline", "--run", "{run}/knnlm-ds"], "--run {run}/knnlm-ds is a datastore, not a run folder: give another "
     "folder"),
    (["demo", "--run", "{run}/lm"], "--run {run}/lm is a checkpoint folder, not a run folder: give another folder"),
    (["retrieval-demo", "--out", "{run}/data"], "--out {run}/data is a prepared corpus, not a retrieval-demo folder "
     "(source/, datastore/): give another folder"),
])
def test_the_pipeline_and_demos_refuse_bad_flags_before_any_work(run, tmp_path, capsys, no_pipeline, args, words):
    err = one_line_error(capsys, *[a.format(run=run, tmp=tmp_path) for a in args])
    assert err == f"lm-worker {args[0]}: error: {words.format(run=run)}" and not (tmp_path / "r").exists()


@pytest.mark.parametrize("args, words", [
    (["--retro", "{run}/retro", "--retro-datastore", "{run}/x", "--retro-k", "5"],
     "--retro-k 5: RETRO retrieves its model's 2 neighbours per chunk"),
    (["--lm", "{run}/lm", "--knnlm-datastore", "{run}/x", "--retro-datastore", "{run}/x"],
     "--retro-datastore applies to the RETRO evaluation only: give --retro, or leave it out"),
    (["--retro", "{run}/retro", "--retro-datastore", "{run}/x", "--pointer-steps", "4"],
     "--pointer-steps applies to the kNN-LM evaluation only: give --lm, or leave it out"),
    (["--retro", "{run}/retro", "--retro-datastore", "{run}/x", "--knnlm-k", "8", "--temperature", "2"],
     "--knnlm-k and --temperature apply to the kNN-LM evaluation only: give --lm, or leave them out"),
    (["--lm", "{run}/lm", "--knnlm-datastore", "{run}/x", "--temperature", "inf"],
     "--temperature must be > 0 and finite, got inf"),
    (["--lm", "{run}/lm", "--knnlm-datastore", "{run}/x", "--temperature", "nan"],
     "--temperature must be > 0 and finite, got nan"),
    (["--lm", "{run}/lm", "--knnlm-datastore", "{run}/x", "--tokens", "-5"],
     "--tokens must be >= 0 (0: the whole split), got -5"),
    (["--lm", "{run}/lm", "--knnlm-datastore", "{run}/x", "--batch-size", "0"], "--batch-size must be >= 1, got 0"),
    (["--lm", "{run}/lm", "--knnlm-datastore", "{run}/x", "--pointer-agreement", "0.5"],
     "--pointer-agreement applies to followed pointers: give --pointer-steps too"),
    (["--lm", "{run}/lm", "--knnlm-datastore", "{run}/x", "--out", "{run}/afile"],
     "--out {run}/afile exists and is not a folder"),
    (["--lm", "{run}/lm", "--knnlm-datastore", "{run}/x", "--lambdas", ""],
     "--lambdas is empty: give comma-separated numbers in [0, 1], or leave it out for the default sweep"),
    (["--lm", "{run}/lm", "--knnlm-datastore", "{run}/x", "--min-pointers", "3"],
     "--min-pointers applies to followed pointers: give --pointer-steps too"),
])
def test_eval_refuses_flags_that_do_not_apply_or_cannot_work(run, capsys, args, words):
    """Before any datastore is served ({run}/x is none) and before anything is written."""
    args = [a.format(run=run) for a in args]
    out = [] if "--out" in args else ["--out", str(run / "eval")]
    err = one_line_error(capsys, "eval", "--data", run / "data", *out, *args)
    assert err.startswith(f"lm-worker eval: error: {words.format(run=run)}"), err
    assert not (run / "eval").exists()


GENERATE = ["generate", "--checkpoint", "{run}/lm", "--data", "{run}/data", "--prompt", "hi", "--no-retrieval"]


@pytest.mark.parametrize("args, words", [
    (["--strategy", "beam", "--temperature", "0.01", "--top-k", "1", "--top-p", "0.01"],
     "--temperature, --top-k and --top-p apply to --strategy sample only, not to --strategy beam"),
    (["--top-p", "0.5"], "--top-p applies to --strategy sample only, not to --strategy greedy"),
    (["--seed", "3", "--beams", "2"],
     "--seed applies to --strategy sample and --beams to --strategy beam only, not to --strategy greedy"),
    (["--strategy", "sample", "--length-penalty", "1"],
     "--length-penalty applies to --strategy beam only, not to --strategy sample"),
    (["--strategy", "sample", "--top-p", "0"], "--top-p must be in (0, 1], got 0.0"),
    (["--max-new-tokens", "0"], "--max-new-tokens must be >= 1, got 0"),
    (["--max-new-tokens", "200"], "+ --max-new-tokens 200 - 1 exceeds the model's max_len 128"),
    (["--knn-temperature", "inf"], "--knn-temperature must be > 0 and finite, got inf"),
    (["--lam", "0.5"], "--lam sets kNN-LM's mixing with the neighbours: it takes an LM checkpoint and retrieval"),
    (["--lam", "0.5", "--knn-temperature", "3"], "--lam and --knn-temperature set kNN-LM's mixing with the "
                                                  "neighbours: they take an LM checkpoint and retrieval"),
    (["--prompt-file", "{run}/binary.txt"], "--prompt-file {run}/binary.txt is not UTF-8 text (byte 0: "),
    (["--prompt-file", "{run}/nosuch.txt"], "--prompt-file {run}/nosuch.txt cannot be read: No such file"),
])
def test_generate_refuses_options_of_another_strategy_and_names_its_flags(run, capsys, args, words):
    (run / "binary.txt").write_bytes(b"\xf0\x28\x8c\x28 a prompt\n")
    err = one_line_error(capsys, *[a.format(run=run) for a in GENERATE + args])
    assert err.startswith("lm-worker generate: error: ") and words.format(run=run) in err, err


def test_generate_ralmspec_names_its_stride(run, capsys):
    err = one_line_error(capsys, "generate", "--checkpoint", run / "lm", "--data", run / "data", "--prompt", "hi",
                         "--datastore", run / "x", "--ralmspec", "--stride", "-2")
    assert err == "lm-worker generate: error: --stride must be >= 0 (0: chosen as it decodes), got -2"


def test_generate_takes_each_strategy_s_own_options(run, capsys):
    for args in (["--strategy", "sample", "--temperature", "0.7", "--top-k", "5", "--top-p", "0.9", "--seed", "3"],
                 ["--strategy", "beam", "--beams", "2", "--length-penalty", "1.0"], []):
        assert main(["--no-progress", "--log-level", "WARNING",
                     *[a.format(run=run) for a in GENERATE], "--max-new-tokens", "3", *args]) == 0
        assert capsys.readouterr().out.startswith("--- 'hi'\n")


@pytest.mark.parametrize("args, words", [
    (["--out", "{run}/attnoext"], "--out must be a file name ending in .png, got {run}/attnoext"),
    (["--out", "{run}/att.pdf"], "--out must be a file name ending in .png, got {run}/att.pdf"),
    (["--out", "{run}/att.png", "--chunk", "-1"], "--chunk must be >= 0, got -1"),
    (["--out", "{run}/att.png", "--chunk", "3", "--text", "def f(x): return x"],
     "--chunk 3 is past the last whole chunk: --text holds "),
    (["--out", "{run}/att.png", "--text", ""], "--text must be some text (leave it out for the held-out split), "
     "got ''"),
    (["--out", "{run}/att.png", "--k", "5"], "--k 5: RETRO retrieves its model's 2 neighbours per chunk"),
    (["--out", "{run}/att-dir.png"], "--out must be a file to write, not a folder, got {run}/att-dir.png"),
    (["--out", "{run}/att.png", "--datastore", "{run}/knnlm-ds"], "the datastore of --target / --datastore is a "
     "'knnlm' datastore (its manifest's kind), not a RETRO one"),
])
def test_attention_refuses_a_bad_out_or_chunk_before_retrieving(run, capsys, args, words):
    err = one_line_error(capsys, "attention", "--retro", run / "retro", "--data", run / "data", "--datastore",
                         run / "x", *[a.format(run=run) for a in args])
    assert err.startswith(f"lm-worker attention: error: {words.format(run=run)}"), err
    assert [p.name for p in run.glob("att*")] == ["att-dir.png"]


def test_encode_knnlm_fits_its_default_window_to_the_lm(run, tmp_path, capsys):
    """The tiny LM takes 128 tokens: the default window is cut to that (stride half of it), as eval's is;
    an explicit longer one is refused, naming the flag."""
    base = ["--no-progress", "--log-level", "WARNING", "encode", "knnlm", "--checkpoint", str(run / "lm"), "--data",
            str(run / "data"), "--workers", "0"]
    assert main([*base, "--out", str(tmp_path / "src")]) == 0
    details = read_source(tmp_path / "src").details
    assert (details["context_len"], details["stride"]) == (128, 64)
    err = one_line_error(capsys, *base[3:], "--out", tmp_path / "big", "--context-len", "256")
    assert "--context-len 256 exceeds the max_len 128 of the LM at" in err and not (tmp_path / "big").exists()


def test_neighbours_refuses_other_data_or_a_knnlm_datastore_before_writing(run, tmp_path, capsys):
    """--data of another tokenizer than the source's, or a kNN-LM datastore: refused before any keys are
    embedded again (the source's files stay as they were)."""
    source = tmp_path / "retro-source"
    source.mkdir()
    (source / "source.json").write_text(json.dumps({**SOURCE, "kind": "retro", "chunk_len": 16}))
    (source / "heldout-keys.npy").write_bytes(b"kept as it was")
    base = ["neighbours", "--source", source, "--data", run / "data"]
    err = one_line_error(capsys, *base, "--datastore", run / "x")
    assert err.startswith(f"lm-worker neighbours: error: --source {source} holds tokens of tokenizer 't', but "
                          "--data's is bpe:"), err
    record = json.loads((source / "source.json").read_text())
    fingerprint = Tokenizer.load(run / "data" / "tokenizer.json").fingerprint
    (source / "source.json").write_text(json.dumps({**record, "tokenizer_fingerprint": fingerprint}))
    err = one_line_error(capsys, *base, "--datastore", run / "knnlm-ds")
    assert err == ("lm-worker neighbours: error: the datastore of --target / --datastore is a 'knnlm' datastore "
                   "(its manifest's kind), not a RETRO one")
    assert sorted(p.name for p in source.iterdir()) == ["heldout-keys.npy", "source.json"]
    assert (source / "heldout-keys.npy").read_bytes() == b"kept as it was"


@pytest.mark.parametrize("out, words", [("knnlm-ds", "is a datastore, not a RETRO source"),
                                        ("knnlm-source", "is a kNN-LM source, not a RETRO source"),
                                        ("data", "is a prepared corpus, not a RETRO source")])
def test_encode_refuses_an_out_of_another_kind(run, tmp_path, capsys, out, words):
    shutil.copytree(run / out, tmp_path / out)
    before = {p.name: p.read_bytes() for p in (tmp_path / out).rglob("*") if p.is_file()}
    err = one_line_error(capsys, "encode", "retro", "--data", run / "data", "--out", tmp_path / out, "--workers", "0",
                         "--encoder", "lm", "--checkpoint", run / "lm")
    assert err == f"lm-worker encode: error: --out {tmp_path / out} {words}: give another folder"
    assert {p.name: p.read_bytes() for p in (tmp_path / out).rglob("*") if p.is_file()} == before


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_encode_refuses_cuda_on_a_machine_without_it_before_any_ray_work(run, tmp_path, capsys, monkeypatch):
    import lm_worker.jobs.encode_job

    def started(*args, **kwargs):
        raise AssertionError("the Ray job started before --device was checked")

    monkeypatch.setattr(lm_worker.jobs.encode_job, "run_encode_job", started)
    err = one_line_error(capsys, "encode", "retro", "--data", run / "data", "--out", tmp_path / "src", "--device",
                         "cuda")
    assert err.startswith("lm-worker encode: error: --device 'cuda': this machine has 0 CUDA devices"), err
    assert not (tmp_path / "src").exists()


@pytest.mark.parametrize("cpus, threads", [("0.5", 1), ("1", 1), ("4", 4), ("2.5", 2)])
def test_eval_workers_compute_with_the_cpus_they_reserve(cpus, threads):
    """--worker-cpus 4 reserved 4 CPUs a worker and computed with one PyTorch thread."""
    from lm_worker.cli import build_parser
    from lm_worker.cli.evaluate import worker_pool

    args = build_parser().parse_args(["eval", "--data", "d", "--out", "o", "--lm", "m", "--workers", "2",
                                      "--worker-cpus", cpus])
    pool = worker_pool(args)
    assert (pool.num_cpus, pool.torch_threads, pool.workers) == (float(cpus), threads, 2)


def test_neighbours_refuse_a_datastore_built_from_another_source():
    """The train split's exclusions are --source's rows: a datastore of other rows, another chunk length or
    another encoder (whose kind and tokenizer agree) is refused, naming what differs."""
    from types import SimpleNamespace

    from lm_worker.cli.sources import check_built_from

    source = SimpleNamespace(rows=100, chunk_len=8, encoder_fingerprint="minilm/wp256")
    flags = SimpleNamespace(flag=lambda name: f"--{name}")

    def retriever(ntotal: int = 100, **metadata) -> SimpleNamespace:
        return SimpleNamespace(ntotal=ntotal, metadata={"kind": "retro", "chunk_len": "8", "encoder": "minilm/wp256",
                                                        **metadata})

    check_built_from(retriever(), source, "src", flags)
    for made, words in ((retriever(ntotal=200), "200 rows, --source 100"),
                        (retriever(chunk_len="4"), "chunk_len '4', --source 8"),
                        (retriever(encoder="lm:abc"), "encoder 'lm:abc', --source 'minilm/wp256'")):
        with pytest.raises(ValueError) as caught:
            check_built_from(made, source, "src", flags)
        assert str(caught.value) == f"the datastore of --target / --datastore was not built from --source src: it " \
                                    f"has {words}"
