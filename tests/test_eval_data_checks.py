"""Checks on what evaluation reads: a token store's files, the pipeline's data records and config, a
datastore's manifest metadata, and a report of a λ that is impossible on the test text."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np
import pytest
from conftest import knn_result_impossible_at_one

from lm_worker.data.token_store import TokenStore, write_token_store
from lm_worker.evaluation.knnlm import check_knnlm_inputs
from lm_worker.evaluation.knnlm_eval import at_lambdas
from lm_worker.evaluation.report import write_report
from lm_worker.models.transformer_lm import LMConfig, TransformerLM
from lm_worker.pipeline.config import PipelineConfig
from lm_worker.pipeline.data_stage import PREPARED, check_prepared_corpus, split_heldout
from lm_worker.training.config import TrainConfig

DOCS = [("a", [1, 2, 3, 4, 5]), ("b", [6, 7, 8]), ("c", [9, 10, 11, 12])]  # tokens 0-5, 6-9, 10-14 with EOS


@pytest.fixture
def split(tmp_path) -> Path:
    write_token_store(tmp_path / "split", DOCS, eos_id=0, tokenizer_fingerprint="t")
    return tmp_path / "split"


@pytest.mark.parametrize("position, doc_id", [(2, -1), (2, 2), (12, 3), (7, 2**30)],
                         ids=["negative", "another-document", "past-the-last", "huge"])
def test_a_doc_id_wrong_inside_a_document_is_named_when_opened(split, position, doc_id):
    """Every token's document is checked, not only each document's first and last: a wrong id mid-document
    would exclude another document's range from retrieval (or index past the documents)."""
    ids = np.load(split / "doc_ids.npy")
    ids[position] = doc_id
    np.save(split / "doc_ids.npy", ids)
    with pytest.raises(ValueError, match=re.escape(f"{split / 'doc_ids.npy'} does not agree with")) as refused:
        TokenStore.open(split)
    assert f"token {position}" in str(refused.value)


def test_a_doc_id_check_reads_in_slices_and_passes_a_whole_store(tmp_path, monkeypatch):
    """A store longer than one slice of the check opens when whole and is refused when one id is wrong."""
    import lm_worker.data.token_store as token_store

    monkeypatch.setattr(token_store, "CHECK_SLICE", 4)
    store = write_token_store(tmp_path / "s", DOCS, eos_id=0, tokenizer_fingerprint="t")
    assert [store.doc_ids[i] for i in (0, 5, 6, 9, 10, 14)] == [0, 0, 1, 1, 2, 2]
    ids = np.load(tmp_path / "s" / "doc_ids.npy")
    ids[13] = 1
    np.save(tmp_path / "s" / "doc_ids.npy", ids)
    with pytest.raises(ValueError, match="token 13"):
        TokenStore.open(tmp_path / "s")


def test_a_damaged_npy_header_is_named_not_a_tokenize_error(split):
    """A header whose bracket is left open: numpy's header parser raises tokenize.TokenError."""
    path = split / "tokens.npy"
    body = path.read_bytes()
    assert b",), }" in body
    path.write_bytes(body.replace(b",), }", b",(, }"))
    with pytest.raises(ValueError, match=re.escape(f"{path} is not a loadable .npy array")):
        TokenStore.open(split)


@pytest.mark.parametrize("start, end", [(0, 10**30), (-(10**30), 5), (0, 2**63), (6, 5), (-1, 5)])
def test_document_positions_out_of_range_are_named(split, start, end):
    meta = json.loads((split / "documents.json").read_text())
    meta["documents"][0].update(start=start, end=end)
    (split / "documents.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=re.escape(f"{split / 'documents.json'}: document 0's 'start' and 'end'")):
        TokenStore.open(split)


def _prepared_run(tmp_path: Path, record: dict) -> Path:
    run = tmp_path / "proj" / "run"
    write_token_store(run / "data" / "heldout", [("a", [1, 2])], 3, "fp")
    (run / "data" / PREPARED).write_text(json.dumps(record))
    (tmp_path / "proj" / "corpus").mkdir()
    (tmp_path / "proj" / "other").mkdir()
    return run


@pytest.mark.parametrize("given", ["corpus", "./corpus", "corpus/", "ABS"])
def test_the_corpus_is_compared_as_a_place_in_an_old_record(tmp_path, monkeypatch, given):
    """A record of the corpus as given (no resolved path): another spelling of the same folder is the same corpus."""
    run = _prepared_run(tmp_path, {"corpus": "corpus", "vocab_size": 4096})
    monkeypatch.chdir(tmp_path / "proj")
    given = os.path.abspath("corpus") if given == "ABS" else given
    check_prepared_corpus(PipelineConfig(run=run, corpus=given))
    with pytest.raises(ValueError, match="was prepared from corpus 'corpus'"):
        check_prepared_corpus(PipelineConfig(run=run, corpus="other"))


def test_the_corpus_is_compared_as_a_place_in_a_record_of_its_resolved_path(tmp_path, monkeypatch):
    from lm_worker.pipeline.data_stage import prepared_record

    monkeypatch.chdir(tmp_path)
    run = _prepared_run(tmp_path, {})
    (run / "data" / PREPARED).write_text(json.dumps(prepared_record(PipelineConfig(run=run, corpus="proj/corpus"))))
    for given in (str(tmp_path / "proj" / "corpus"), "./proj/corpus/", "proj/../proj/corpus"):
        check_prepared_corpus(PipelineConfig(run=run, corpus=given))
    monkeypatch.chdir(tmp_path / "proj")
    check_prepared_corpus(PipelineConfig(run=run, corpus="corpus"))  # the same place from elsewhere
    with pytest.raises(ValueError, match="was prepared from corpus 'proj/corpus'"):
        check_prepared_corpus(PipelineConfig(run=run, corpus="other"))


@pytest.mark.parametrize("given", ["./stdlib", "stdlib/"])
def test_a_folder_named_stdlib_is_not_the_built_in_corpus(tmp_path, monkeypatch, given):
    """"./stdlib" and "stdlib/" name a folder, not the built-in corpus "stdlib": data prepared from one is not
    taken for the other's, either way round."""
    from lm_worker.pipeline.data_stage import prepared_record

    monkeypatch.chdir(tmp_path)
    (tmp_path / "stdlib").mkdir()
    run = _prepared_run(tmp_path, {})
    for prepared, asked in (("stdlib", given), (given, "stdlib")):
        (run / "data" / PREPARED).write_text(json.dumps(prepared_record(PipelineConfig(run=run, corpus=prepared))))
        with pytest.raises(ValueError, match=re.escape(f"was prepared from corpus {prepared!r}")):
            check_prepared_corpus(PipelineConfig(run=run, corpus=asked))
        check_prepared_corpus(PipelineConfig(run=run, corpus=prepared))


@pytest.mark.parametrize("sizes, refused", [
    ({"stride": 100}, "context_len (256) and stride (100) must be multiples of RETRO's chunk_len (8)"),
    ({"stride": 512}, "stride must be at most context_len (256), got 512"),
    ({"stride": 0}, "stride must be an integer >= 1, got 0"),
    ({"context_len": 260, "stride": 130}, "must be multiples of RETRO's chunk_len (8)"),
    ({"temperatures": ()}, "temperatures must be one or more positive, finite numbers, got ()"),
    ({"temperatures": (1.0, float("nan"))}, "temperatures must be one or more positive, finite numbers"),
    ({"temperatures": (0.0,)}, "temperatures must be one or more positive, finite numbers"),
    ({"n_neighbours": 0}, "n_neighbours must be an integer >= 1, got 0"),
    ({"shards": 0}, "shards must be an integer >= 1, got 0"),
    ({"shards": 2.5}, "shards must be an integer >= 1, got 2.5"),
    ({"eval_workers": -1}, "eval_workers must be an integer >= 0, got -1"),
    ({"samples": -2}, "samples must be an integer >= 0, got -2"),
    ({"retro": TrainConfig(kind="retro", preset="small")}, "retro.chunk_len must be given (>= 1)"),  # the preset's
])
def test_a_size_no_stage_could_run_with_is_refused_before_any_stage(sizes, refused):
    """Each of these failed only when its stage came (a stride RETRO cannot evaluate over, after the kNN-LM
    half had run on it; no temperatures, after RETRO's training): now the config is refused, naming it."""
    with pytest.raises(ValueError, match=re.escape(refused)):
        PipelineConfig(**sizes)
    for sizes_of in (PipelineConfig, PipelineConfig.demo, PipelineConfig.quick):
        sizes_of()  # the sizes the pipeline ships with pass


def test_a_report_of_a_lambda_impossible_on_the_test_text_is_written(tmp_path):
    """λ chosen on validation whose NLL on the test text is inf at searched and followed positions alike:
    the plot's searched share is inf, not inf - inf = NaN."""
    result = knn_result_impossible_at_one()
    chosen = at_lambdas(result, 1.0, 0.5, "valid")
    table = write_report(tmp_path / "report", chosen, None, {})
    assert "| inf |" in table and (tmp_path / "report" / "ppl_vs_lambda.png").is_file()


class _Datastore:
    metric = "l2"

    def __init__(self, metadata: dict):
        self.metadata = metadata


@pytest.mark.parametrize("metadata, refused", [
    ({"kind": "knnlm", "encoder": None}, None), ({"encoder": 5}, None), ({"kind": None}, None),
    ({"kind": 7}, "the datastore is a '7' datastore"), ({"kind": ["x" * 500]}, "the datastore is a \"['xxx"),
])
def test_manifest_metadata_that_is_not_text_is_judged_not_crashed_on(metadata, refused):
    lm = TransformerLM(LMConfig.tiny(vocab_size=50, max_len=16))
    if refused is None:
        check_knnlm_inputs(lm, _Datastore(metadata))
        return
    with pytest.raises(ValueError, match=re.escape(refused)) as error:
        check_knnlm_inputs(lm, _Datastore(metadata))
    assert len(str(error.value)) < 200


@pytest.mark.parametrize("tune_tokens", [1, 0, -5])
def test_tune_tokens_below_two_is_refused_naming_the_field(tune_tokens):
    with pytest.raises(ValueError, match=rf"tune_tokens must be at least 2 .*got {tune_tokens}"):
        PipelineConfig(tune_tokens=tune_tokens)


def test_an_empty_validation_split_recorded_with_budget_zero_is_not_reused(tmp_path):
    """A split cut with tune_tokens 0 recorded budget 0 and holds nothing: refused, not taken for a split made
    before budgets were recorded. Such an older split that holds validation tokens is still taken."""
    config = PipelineConfig(run=tmp_path, tune_tokens=4)
    data = tmp_path / "data"
    write_token_store(data / "test", DOCS, eos_id=0, tokenizer_fingerprint="t")
    write_token_store(data / "valid", [], eos_id=0, tokenizer_fingerprint="t", max_tokens=0)
    with pytest.raises(ValueError, match=r"valid holds no validation tokens .*tune_tokens is 4: remove .*valid, "
                                         r".*test and .*report"):
        split_heldout(config, None)
    write_token_store(data / "valid", DOCS[:1], eos_id=0, tokenizer_fingerprint="t", max_tokens=0)
    valid, test = split_heldout(config, None)
    assert len(valid) == 6 and len(test) == 15


def test_a_vocab_size_read_from_the_run_folder_cannot_forge_a_line(tmp_path):
    run = _prepared_run(tmp_path, {"corpus": "corpus", "vocab_size": "4096\nERROR \x1b[2K forged line"})
    with pytest.raises(ValueError) as refused:
        check_prepared_corpus(PipelineConfig(run=run, corpus=str(tmp_path / "proj" / "corpus")))
    message = str(refused.value)
    assert "with vocab_size '4096\\nERROR \\x1b[2K forged" in message and "\n" not in message and "\x1b" not in message
