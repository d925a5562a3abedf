"""The pipeline refuses, before any work, what a run folder holds that was made otherwise than the run asks:
data of another corpus or vocabulary, a model trained with other settings or for more steps, an LM that
would train on under the sources and RETRO made from it; and it chooses kNN-LM's temperature again when
the kNN retrieval settings change or its file is unreadable. Fast: a tiny corpus prepared once, small
checkpoints saved directly, and the pipeline stopped where it would start training."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from dataclasses import asdict, replace
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

import lm_worker.pipeline.run as pipeline_run
from lm_worker.data.tokenizer import Tokenizer
from lm_worker.evaluation.config import EvalConfig
from lm_worker.models.checkpoint import save_checkpoint
from lm_worker.models.retro import Retro, RetroConfig
from lm_worker.models.transformer_lm import LMConfig, TransformerLM
from lm_worker.pipeline.config import PipelineConfig
from lm_worker.pipeline.data_stage import prepare_data
from lm_worker.pipeline.run import run_pipeline
from lm_worker.retrieval.config import RetrievalConfig
from lm_worker.training.config import TrainConfig


class Trains(Exception):
    """Raised where the pipeline would start training a model: every refusal must come before it."""


def config_of(run: Path, corpus: Path) -> PipelineConfig:
    return PipelineConfig(run=run, corpus=str(corpus), vocab_size=300, max_train_tokens=0, max_heldout_tokens=0,
                          max_retro_tokens=0, tune_tokens=64, progress=False,
                          lm=TrainConfig(kind="lm", preset="tiny", steps=6, seq_len=32, batch_size=2, device="cpu"),
                          retro=TrainConfig(kind="retro", preset="tiny", steps=4, seq_len=32, batch_size=2,
                                            chunk_len=8, device="cpu"))


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> tuple[PipelineConfig, Path]:
    """A run folder with its data prepared by the pipeline from 50 small files (5 of them held out)."""
    corpus = tmp_path_factory.mktemp("corpus")
    for i in range(50):
        (corpus / f"mod{i}.py").write_text("".join(f"def f{j % 7}(x):\n    return x * {j % 4}\n" for j in range(30)))
    config = config_of(tmp_path_factory.mktemp("prepared") / "run", corpus)
    prepare_data(config)
    return config, corpus


@pytest.fixture
def run(prepared, tmp_path, monkeypatch) -> PipelineConfig:
    """A copy of the prepared run; the pipeline raises `Trains` where it would train a model."""
    config, _ = prepared
    shutil.copytree(config.run, tmp_path / "run")
    monkeypatch.delenv("RAY_ADDRESS", raising=False)

    def trains(*args, **kwargs):
        raise Trains

    monkeypatch.setattr(pipeline_run, "train_model", trains)
    return replace(config, run=tmp_path / "run")


def save_model(config: PipelineConfig, name: str, train_config: TrainConfig, step: int) -> Path:
    """RUN/name/checkpoint.pt: a tiny model saved as training saves it, at `step`, with `train_config`."""
    model = TransformerLM(LMConfig.tiny(300)) if name == "lm" else Retro(RetroConfig.tiny(300))
    return save_checkpoint(config.run / name / "checkpoint.pt", kind=name, model=model, config=model.config,
                           step=step, tokenizer_fingerprint="bpe:x", extra={"train_config": asdict(train_config)})


def save_source(config: PipelineConfig, kind: str, encoder: str) -> None:
    (config.run / f"{kind}-source").mkdir()
    (config.run / f"{kind}-source" / "source.json").write_text(json.dumps(
        {"kind": kind, "rows": 1, "dimension": 1, "tokenizer_fingerprint": "bpe:x", "encoder_fingerprint": encoder,
         "chunk_len": 8 if kind == "retro" else 0}))


def to_remove(refused: pytest.ExceptionInfo, config: PipelineConfig) -> set[str]:
    """The run's folders a refusal names to remove, checking it names each once and says what else to do."""
    message = str(refused.value)
    assert message.endswith("to make them again, or use another run folder"), message
    paths = re.split(r", | and ", message.split(": remove ")[-1].split(" to make ")[0])
    assert len(paths) == len(set(paths)) and all(Path(p).parent == config.run for p in paths), message
    return {Path(p).name for p in paths}


def test_data_of_another_corpus_or_vocabulary_is_refused_before_any_work(run, prepared, tmp_path):
    save_model(run, "lm", run.lm, run.lm.steps)
    (run.run / "report").mkdir()
    (run.run / "report" / "eval.json").write_text("{}")
    with pytest.raises(Trains):  # the run as prepared goes on to its models
        run_pipeline(run)
    with pytest.raises(ValueError, match=r"data was prepared with vocab_size 300, vocab_size is 320, and every "
                                         r"stage after it was made from it: remove ") as refused:
        run_pipeline(replace(run, vocab_size=320))
    assert to_remove(refused, run) == {"data", "lm", "report"}
    other = tmp_path / "other"
    shutil.copytree(prepared[1], other)  # the same files, but another corpus
    with pytest.raises(ValueError, match=re.escape(f"data was prepared from corpus '{prepared[1].resolve()}', corpus "
                                                   f"is '{other.resolve()}'")):
        run_pipeline(replace(run, corpus=str(other)))
    record = json.loads((run.run / "data" / "prepared.json").read_text())
    (run.run / "data" / "prepared.json").write_text(json.dumps({**record, "corpus": "corpus"}))
    with pytest.raises(Trains):  # a relative corpus path, as given, in a moved project: still the same corpus
        run_pipeline(replace(run, corpus="corpus"))
    (run.run / "data" / "prepared.json").unlink()  # a run prepared before the record: its tokenizer and documents
    with pytest.raises(Trains):
        run_pipeline(run)
    with pytest.raises(ValueError, match=r"data was prepared from another corpus than .*, and every stage after"):
        run_pipeline(replace(run, corpus=str(tmp_path)))
    vocab = Tokenizer.load(run.run / "data" / "tokenizer.json").vocab_size  # the corpus is too small to fill 300
    with pytest.raises(ValueError, match=rf"data was prepared with a {vocab}-token vocabulary, vocab_size is 260, "):
        run_pipeline(replace(run, vocab_size=260))


def test_a_model_trained_with_other_settings_is_refused_naming_them_and_what_to_remove(run):
    lm = save_model(run, "lm", run.lm, run.lm.steps)
    save_source(run, "knnlm", "lm:x")
    save_source(run, "retro", "minilm:x")  # MiniLM's keys: not made from the LM, so kept
    written = lm.read_bytes()
    asked = replace(run, lm=replace(run.lm, steps=4, lr=1e-3, seed=7))
    with pytest.raises(ValueError, match=r"lm was trained with other settings than this run's \(saved -> asked\): "
                                         r"lm.steps 6 -> 4, lm.lr 0.003 -> 0.001, lm.seed 0 -> 7: remove ") as refused:
        run_pipeline(asked)
    assert to_remove(refused, run) == {"lm", "knnlm-source"} and lm.read_bytes() == written
    with pytest.raises(ValueError, match=r"lm.preset 'tiny' -> 'small'"):
        run_pipeline(replace(run, lm=replace(run.lm, preset="small")))
    fitted = replace(run.retro, init_from=str(run.run / "lm" / "checkpoint.pt"), split="train")
    save_model(run, "retro", replace(fitted, lr=1e-2, init_from="elsewhere/lm/checkpoint.pt"), run.retro.steps)
    with pytest.raises(ValueError, match=r"retro was trained with other settings .*: retro.lr 0.01 -> 0.003: ") \
            as refused:  # the path of the LM it was fitted onto is no setting: a moved run still matches
        run_pipeline(run)
    assert to_remove(refused, run) == {"retro"}
    save_model(run, "retro", replace(fitted, eval_every=1, checkpoint_every=2, threads=1, device="auto"), 4)
    with pytest.raises(Trains):  # when it evaluates and saves, and where it runs, change no model: both reused
        run_pipeline(replace(run, lm=replace(run.lm, eval_batches=1, amp=False)))


def test_an_lm_is_not_trained_on_while_what_was_made_from_it_is_there(run):
    lm = save_model(run, "lm", run.lm, run.lm.steps)
    written = lm.read_bytes()
    more = replace(run, lm=replace(run.lm, steps=run.lm.steps + 4))
    with pytest.raises(Trains):  # nothing made from it yet: trained on
        run_pipeline(more)
    save_source(run, "knnlm", "lm:x")
    save_source(run, "retro", "lm-last:x")
    (run.run / "knnlm-datastore").mkdir()
    (run.run / "knnlm-datastore" / "manifest.json").write_text("{}")
    save_model(run, "retro", replace(run.retro, init_from=str(lm), split="train"), run.retro.steps)
    with pytest.raises(ValueError, match=r"lm holds the LM at step 6: training it to lm.steps 10 would leave what was "
                                         r"made from it stale \(or keep lm.steps at 6\): remove ") as refused:
        run_pipeline(more)
    assert to_remove(refused, run) == {"knnlm-source", "knnlm-datastore", "retro-source", "retro"}
    assert lm.read_bytes() == written  # refused before it trained


def tune(monkeypatch, tmp_path):
    """`tune_temperature` on a run folder, with an evaluation whose perplexity is 10 + |T - 4|; the
    temperatures it tried."""
    from lm_worker.evaluation import knnlm_eval
    from lm_worker.pipeline.eval_stage import tune_temperature

    tried: list[float] = []

    def fake_evaluate(lm, valid, retriever, config, progress):
        tried.append(config.temperature)
        return SimpleNamespace(best_perplexity=10.0 + abs(config.temperature - 4.0), temperature=config.temperature,
                               best_lambda=0.25, followed_lambda=0.25)

    monkeypatch.setattr(knnlm_eval, "evaluate_knnlm", fake_evaluate)
    (tmp_path / "report").mkdir()
    config = PipelineConfig(run=tmp_path, temperatures=(1.0, 5.0), progress=False)
    lm, valid = TransformerLM(LMConfig.tiny(vocab_size=50)), list(range(100))
    def choose(knn=RetrievalConfig(k=8, nprobe=2), retriever=None, **scoring):
        choice = tune_temperature(config, lm, valid, retriever, EvalConfig(retrieval=knn, **scoring))
        return choice.temperature, choice.lam, choice.reused

    return choose, tried


def test_the_temperature_is_chosen_again_when_the_knn_retrieval_changes(monkeypatch, tmp_path):
    choose, tried = tune(monkeypatch, tmp_path)
    assert choose()[::2] == (5.0, False) and choose()[::2] == (5.0, True) and len(tried) == 2
    for knn in (RetrievalConfig(k=16, nprobe=2), RetrievalConfig(k=16, nprobe=4),
                RetrievalConfig(k=16, nprobe=4, exact_rerank=True, rerank_candidates=64)):
        assert choose(knn)[2] is False, knn  # each change chooses again
    assert choose(knn)[2] is True and len(tried) == 8


def test_the_temperature_is_chosen_again_on_another_datastore(monkeypatch, tmp_path):
    """T and λ were kept when the kNN-LM datastore was rebuilt by hand (another index, other neighbours):
    the datastore's version is now recorded with them."""
    choose, tried = tune(monkeypatch, tmp_path)
    built, rebuilt = SimpleNamespace(version="a" * 64), SimpleNamespace(version="b" * 64)
    assert choose(retriever=built)[2] is False and choose(retriever=built)[2] is True
    assert choose(retriever=rebuilt)[2] is False and choose(retriever=rebuilt)[2] is True
    assert json.loads((tmp_path / "report" / "temperature.json").read_text())["datastore"] == "b" * 64
    assert len(tried) == 4


def test_the_temperature_is_chosen_again_when_other_tokens_are_scored(monkeypatch, tmp_path):
    """T and λ were kept when the evaluation's token budget or windows changed (tuned on part of the
    validation text, or other contexts): what is scored is now recorded with them; its batch size is not."""
    choose, tried = tune(monkeypatch, tmp_path)
    assert choose()[2] is False and choose(batch_size=3)[2] is True
    for scoring in ({"max_tokens": 50}, {"max_tokens": 50, "context_len": 64, "stride": 32},
                    {"max_tokens": 50, "context_len": 64, "stride": 32, "pointer_steps": 2}):
        assert choose(**scoring)[2] is False and choose(**scoring)[2] is True, scoring
    assert len(tried) == 8


def test_a_temperature_file_written_before_lambda_was_chosen_with_it_is_chosen_again(monkeypatch, tmp_path, caplog):
    choose, tried = tune(monkeypatch, tmp_path)
    path = tmp_path / "report" / "temperature.json"
    choose()
    body = json.loads(path.read_text())
    for old in ({key: value for key, value in body.items() if "lambda" not in key},  # as the code before wrote it
                {key: value for key, value in body.items() if key not in ("lambda", "followed_lambda")}):
        path.write_text(json.dumps(old))
        with caplog.at_level(logging.INFO, logger="lm_worker"):
            assert choose() == (5.0, 0.25, False)
        assert json.loads(path.read_text())["lambda"] == 0.25 and "unreadable" not in caplog.text
    assert len(tried) == 6


def test_an_unreadable_temperature_file_is_chosen_again_and_a_stopped_write_keeps_the_last(monkeypatch, tmp_path,
                                                                                           caplog):
    choose, tried = tune(monkeypatch, tmp_path)
    path = tmp_path / "report" / "temperature.json"
    choose()
    whole = path.read_text()
    path.write_text(whole[: len(whole) // 2])  # cut short
    with caplog.at_level(logging.WARNING, logger="lm_worker"):
        assert choose()[::2] == (5.0, False)
    assert f"{path} is unreadable" in caplog.text and json.loads(path.read_text())["chosen"] == 5.0
    written = path.read_text()
    real_write = Path.write_text

    def stopped(self, text, *args, **kwargs):  # the process dies halfway through the write
        real_write(self, text[: len(text) // 2], *args, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(Path, "write_text", stopped)
    with pytest.raises(KeyboardInterrupt):
        choose(RetrievalConfig(k=32))
    monkeypatch.undo()
    assert path.read_text() == written  # the last choice, whole
    assert len(tried) == 6


def test_train_neighbours_fetched_for_another_window_are_refused(tmp_path):
    """Train-split neighbours leave out each chunk's documents for one training window: fetched for another
    (or before the window was recorded, under the rule that stopped one chunk past the chunk's own), they
    are refused, naming what to remove."""
    from lm_worker.pipeline.datastore_stage import check_neighbour_files
    from lm_worker.sources.neighbours import WINDOW_RECORD

    config = PipelineConfig(run=tmp_path, retro_init="scratch", n_neighbours=2, progress=False)
    source = tmp_path / "retro-source"
    source.mkdir()
    np.save(source / "neighbours-train.npy", np.zeros((4, 2, 16), np.int32))
    with pytest.raises(ValueError, match=r"neighbours-train.npy left out each chunk's documents for a window that was "
                                         r"not recorded .* "
                                         rf"retro.seq_len is {config.retro.seq_len}: remove it and .*retro"):
        check_neighbour_files(config)
    (source / WINDOW_RECORD).write_text(json.dumps({"window": 64}))
    with pytest.raises(ValueError, match=r"for a window of 64 tokens, retro.seq_len is "):
        check_neighbour_files(config)
    (source / WINDOW_RECORD).write_text(json.dumps({"window": config.retro.seq_len}))
    check_neighbour_files(config)  # fetched for this window: kept


def test_neighbours_fetched_by_another_nprobe_are_refused(tmp_path, caplog):
    """RETRO's neighbours depend on the search's nprobe (`retro_nprobe`): a file fetched with another was
    reused as it stood. Now the search is recorded beside them, and another one refused, naming what to
    remove; a file from before the record is reused with a warning."""
    from lm_worker.pipeline.datastore_stage import check_neighbour_files
    from lm_worker.sources.neighbours import SEARCH_RECORD

    config = PipelineConfig(run=tmp_path, retro_init="scratch", n_neighbours=2, retro_nprobe=16, progress=False)
    source = tmp_path / "retro-source"
    source.mkdir()
    np.save(source / "neighbours-heldout.npy", np.zeros((4, 2, 16), np.int32))
    with caplog.at_level(logging.WARNING, logger="lm_worker.pipeline.datastore_stage"):
        check_neighbour_files(config)
    assert "neighbours-heldout.npy does not record the search it was fetched by" in caplog.text
    settings = {"nprobe": 8, "exact_rerank": True, "rerank_candidates": 16}
    (source / SEARCH_RECORD).write_text(json.dumps({"heldout": settings}))
    with pytest.raises(ValueError, match=r"neighbours-heldout.npy was fetched with exact_rerank True, nprobe 8, "
                                         r"rerank_candidates 16; this run searches with retro_nprobe 16: remove it "
                                         r"and .*retro to fetch and train again"):
        check_neighbour_files(config)
    (source / SEARCH_RECORD).write_text(json.dumps({"heldout": {**settings, "nprobe": 16}}))
    check_neighbour_files(config)  # fetched by this search: kept


def test_a_minilm_source_of_other_weights_is_stale_and_this_minilms_is_not():
    """A RETRO source of MiniLM keys was never checked against the MiniLM here: keys of other weights were
    reused, and the run stopped later with no folder named. Keys of these weights, by either digest and
    any word-piece limit, are this run's; others are refused with the rest of the stale outputs."""
    from lm_worker.encoders.minilm import legacy_weights_fingerprint, weights_fingerprint
    from lm_worker.pipeline.staleness import Made, encoded_by

    config = replace(PipelineConfig(run=Path("run")), retro_encoder="minilm")
    made = Made(checkpoint=Path("run/lm"), fingerprint="lm:0123", model=None)
    for fingerprint in (f"{weights_fingerprint()}/wp256", f"{legacy_weights_fingerprint()}/wp64"):
        assert encoded_by(config, "retro", fingerprint, made) is None
    why = encoded_by(config, "retro", "minilm-l6-v2:000000000000/wp256", made)
    assert why == "by a MiniLM (minilm-l6-v2:000000000000/wp256) other than this one's weights"


class TinyEncoder:
    """A chunk encoder of 4 dimensions: each chunk's first 4 token ids, as floats."""

    dimension = 4

    def __init__(self, fingerprint: str):
        self.fingerprint = fingerprint

    def embed(self, chunks: np.ndarray) -> np.ndarray:
        return np.asarray(chunks[:, :4], np.float32)


def write_source(folder: Path, kind: str, encoder: str, rows: int = 10, **details) -> None:
    """FOLDER/source.json, as an encode writes it (`SourceInfo.write`)."""
    from lm_worker.sources.source import SourceInfo

    folder.mkdir(parents=True, exist_ok=True)
    SourceInfo(folder, kind, rows, 4, "bpe:x", encoder, 8 if kind == "retro" else 0, details).write()


def write_manifest(run: Path, kind: str, ntotal: int, metadata: dict) -> None:
    """RUN/KIND-datastore/manifest.json in two shards, shaped as the build writes it."""
    shards = [{"name": f"shard-{i:05d}", "id_start": i * ntotal // 2, "id_end": (i + 1) * ntotal // 2, "files": {}}
              for i in range(2)]
    (run / f"{kind}-datastore").mkdir(parents=True, exist_ok=True)
    (run / f"{kind}-datastore" / "manifest.json").write_text(json.dumps(
        {"dimension": 4, "metric": "l2", "factory": "Flat", "ntotal": ntotal, "nlist": 0, "default_nprobe": 1,
         "has_keys": True, "payloads": [], "shards": shards, "build": {}, "metadata": metadata,
         "format_version": 1, "checksum": "0" * 64, "version": "0" * 16}))


def built_from(run: Path, kind: str) -> dict:
    """The metadata the build writes for the source at RUN/KIND-source (`build_source`)."""
    from lm_worker.sources.source import read_source

    info = read_source(run / f"{kind}-source")
    window = {"chunk_len": str(info.chunk_len)} if kind == "retro" else {
        "context_len": str(info.details.get("context_len", ""))}
    return {"kind": kind, "tokenizer": info.tokenizer_fingerprint, **info.encoder_metadata, **window}


def test_a_datastore_built_from_another_source_is_stale(tmp_path):
    """A datastore was reused whenever its manifest was there: re-encoded by `lm-worker encode` (another LM,
    other windows or chunks), its source was checked but the datastore built from the old one was served.
    Its manifest's metadata and row count are now compared with the source it would serve."""
    from lm_worker.encoders.lm_chunks import PREFIX
    from lm_worker.pipeline.staleness import Made, orphaned, other_shards, removal, stale_knnlm, stale_retro_keys

    config = replace(PipelineConfig(run=tmp_path, context_len=128, stride=64, progress=False), retro_init="scratch")
    made = Made(checkpoint=tmp_path / "lm", fingerprint="lm:abc", model=None)
    write_source(tmp_path / "knnlm-source", "knnlm", "lm:abc", context_len=128, stride=64)
    write_manifest(tmp_path, "knnlm", 10, {"kind": "knnlm", "tokenizer": "bpe:x", "encoder": "lm:OLD",
                                           "context_len": "256"})
    (tmp_path / "report").mkdir()
    (tmp_path / "report" / "eval.json").write_text("{}")
    assert other_shards(config) == {} and orphaned(config, "knnlm") == {}
    stale = stale_knnlm(config, made)
    assert set(stale) == {"knnlm-datastore"}, stale
    assert "'lm:OLD'" in stale["knnlm-datastore"] and "'256'" in stale["knnlm-datastore"], stale
    assert removal(config, stale) == f"{tmp_path / 'knnlm-datastore'} and {tmp_path / 'report'}"
    write_manifest(tmp_path, "knnlm", 10, built_from(tmp_path, "knnlm"))
    assert stale_knnlm(config, made) == {}  # built from this source: reused
    write_manifest(tmp_path, "knnlm", 12, built_from(tmp_path, "knnlm"))
    assert "12 rows" in stale_knnlm(config, made)["knnlm-datastore"]
    write_manifest(tmp_path, "knnlm", 10, {})  # not built from a source by this project: it cannot tell
    assert "records no encoder" in stale_knnlm(config, made)["knnlm-datastore"]

    write_source(tmp_path / "retro-source", "retro", PREFIX + "abc")
    write_manifest(tmp_path, "retro", 10, {**built_from(tmp_path, "retro"), "chunk_len": "16"})
    assert set(stale_retro_keys(config, made)) == {"retro-datastore"}
    write_manifest(tmp_path, "retro", 10, built_from(tmp_path, "retro"))
    assert stale_retro_keys(config, made) == {}


def retro_run(tmp_path: Path) -> PipelineConfig:
    """A run folder with a held-out split and a RETRO source of LM keys (chunks of 8)."""
    from lm_worker.data.token_store import write_token_store
    from lm_worker.encoders.lm_chunks import PREFIX

    write_token_store(tmp_path / "data" / "heldout", [("a", list(range(1, 30))), ("b", list(range(5, 40)))], 0,
                      "bpe:x")
    write_source(tmp_path / "retro-source", "retro", PREFIX + "abc")
    return replace(config_of(tmp_path, tmp_path), retro_init="scratch")


def test_query_keys_made_for_another_source_are_stale_and_those_made_for_this_one_are_not(tmp_path, caplog):
    """RUN/retro-source/SPLIT-keys.npy was reused whenever it was there: the held-out chunks' queries of an
    encoder the source, re-encoded, no longer holds. The pipeline now records what it embeds them from
    (`keys_record`, as `lm-worker neighbours` does) and refuses keys of another encoder or chunks."""
    from lm_worker.encoders.lm_chunks import PREFIX
    from lm_worker.pipeline.datastore_stage import embed_split
    from lm_worker.pipeline.staleness import Made, removal, stale_retro_keys
    from lm_worker.sources.output import new_source

    config, keys = retro_run(tmp_path), tmp_path / "retro-source" / "heldout-keys.npy"
    embed_split(config, TinyEncoder(PREFIX + "abc"), "heldout")
    assert stale_retro_keys(config, Made(tmp_path / "lm", "lm:abc", None)) == {}  # its own keys: reused
    with new_source(tmp_path / "retro-source") as work:  # `lm-worker encode retro` with another LM
        write_source(work, "retro", PREFIX + "new")
    assert keys.is_file()  # a split's keys stay with the folder
    stale = stale_retro_keys(config, Made(tmp_path / "lm", "lm:new", None))
    assert set(stale) == {"retro-source/heldout-keys.npy"}, stale
    assert removal(config, stale) == str(keys)
    keys.with_suffix(".json").unlink()  # keys of an earlier version, with no record: reused, with a warning,
    os.utime(keys, ns=(1, 1))  # whatever their file times say (a copy of the run folder sets its own)
    with caplog.at_level(logging.WARNING, logger="lm_worker"):
        assert stale_retro_keys(config, Made(tmp_path / "lm", "lm:new", None)) == {}
    assert "heldout-keys.npy does not record" in caplog.text


def test_a_re_encode_keeps_the_folders_other_files_and_the_datastore_is_then_stale(tmp_path):
    """A re-encode keeps every other file of the folder (a split's keys with their record, RETRO's neighbours, the
    user's own): none is deleted. What was made from the old source is then named by the pipeline, the datastore
    first (test_a_datastore_built_from_another_source_is_stale)."""
    from lm_worker.sources.neighbours import SEARCH_RECORD, WINDOW_RECORD
    from lm_worker.sources.output import new_source

    out = tmp_path / "retro-source"
    write_source(out, "retro", "lm-last:abc")
    kept = ("heldout-keys.npy", "heldout-keys.json", "notes.md", "neighbours-train.npy", "neighbours-heldout.npy",
            SEARCH_RECORD, WINDOW_RECORD)
    for name in kept:
        (out / name).write_text(name)
    with new_source(out) as work:
        (work / "source.json").write_text("{}")
    assert sorted(p.name for p in out.iterdir()) == sorted(("source.json", *kept))
    assert all((out / name).read_text() == name for name in kept)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["retro-source"]  # no replaced folder left beside


def test_values_read_from_the_run_folder_cannot_forge_a_line_in_a_message(tmp_path):
    from lm_worker.pipeline.datastore_stage import check_neighbour_files
    from lm_worker.pipeline.staleness import Made, stale_knnlm
    from lm_worker.sources.neighbours import SEARCH_RECORD

    config = replace(PipelineConfig(run=tmp_path, context_len=128, stride=64, progress=False), retro_init="scratch")
    made = Made(checkpoint=tmp_path / "lm", fingerprint="lm:abc", model=None)
    forged = "\nERROR: \x1b[2Kforged line"
    write_source(tmp_path / "knnlm-source", "knnlm", "lm:x" + forged, context_len=128, stride=64)
    messages = [stale_knnlm(config, made)["knnlm-source"]]  # encoded by another LM
    write_source(tmp_path / "knnlm-source", "knnlm", "lm:abc", context_len="128" + forged, stride=64)
    write_manifest(tmp_path, "knnlm", 10, {**built_from(tmp_path, "knnlm"), "encoder": "lm:abc" + forged})
    stale = stale_knnlm(config, made)  # other windows, and a datastore of another encoder
    assert set(stale) == {"knnlm-source", "knnlm-datastore"}, stale
    messages += stale.values()
    source = tmp_path / "retro-source"
    source.mkdir()
    np.save(source / "neighbours-heldout.npy", np.zeros((4, config.n_neighbours, 16), np.int32))
    (source / SEARCH_RECORD).write_text(json.dumps({"heldout": {"nprobe": "8" + forged}}))
    with pytest.raises(ValueError) as refused:
        check_neighbour_files(config)
    for message in (*messages, str(refused.value)):
        assert "\n" not in message and "\x1b" not in message and r"\x1b" in message, message
