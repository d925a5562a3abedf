"""The pipeline end to end at tiny sizes on a local Ray cluster, as the demo runs it: Ray Data encoding,
the build, shards served as Ray actors, evaluation on 2 LM worker actors, samples and the report folder;
its figures against an in-process evaluation of the same models and datastores; a second run reuses
every stage and reports the same figures."""

from __future__ import annotations

import json
import logging
import re
import shutil
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import ray
import torch

from lm_worker.data.token_store import TokenStore
from lm_worker.evaluation.config import EvalConfig
from lm_worker.evaluation.knnlm_eval import evaluate_knnlm
from lm_worker.models.checkpoint import load_checkpoint
from lm_worker.models.fingerprint import model_fingerprint
from lm_worker.models.retro import RetroConfig
from lm_worker.pipeline.config import PipelineConfig
from lm_worker.pipeline.run import run_pipeline
from lm_worker.retrieval.config import RetrievalConfig
from lm_worker.retrieval.in_process import InProcessRetriever
from lm_worker.sources.neighbours import SEARCH_RECORD
from lm_worker.training.config import TrainConfig
from retriever_server.datastore.manifest import read_manifest

pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.real]


def tiny(run: Path) -> PipelineConfig:
    return PipelineConfig(
        run=run, vocab_size=512, max_train_tokens=40_000, max_heldout_tokens=6_000, max_retro_tokens=20_000,
        tune_tokens=1024, eval_tokens=6_000,
        lm=TrainConfig(kind="lm", preset="tiny", steps=30, batch_size=4, seq_len=64, warmup=5, eval_every=30,
                       checkpoint_every=30),
        retro=TrainConfig(kind="retro", preset="tiny", steps=20, batch_size=4, seq_len=64, chunk_len=16, warmup=5,
                          eval_every=20, checkpoint_every=20),
        context_len=64, stride=32, knn=RetrievalConfig(k=32, nprobe=8), retro_nprobe=8, temperatures=(1.0, 10.0),
        num_cpus=4, samples=2, sample_tokens=8, progress=False)


@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
    ray.shutdown()
    config = tiny(tmp_path_factory.mktemp("pipeline") / "run")
    report = run_pipeline(config)
    yield config, report
    ray.shutdown()


def test_the_report_folder_holds_every_output(first_run):
    config, report = first_run
    for name in ("summary.md", "table.md", "eval.json", "samples.md", "ppl_vs_lambda.png", "attention.png",
                 "loss_lm.png", "loss_retro.png"):
        assert (report.report / name).stat().st_size > 0, name
    body = json.loads(report.eval_json.read_text())
    for model, key in (("knnlm", "best_perplexity"), ("retro", "perplexity"), ("retro", "perplexity_without")):
        assert body[model]["tokens"] > 0 and 1 < body[model][key] < config.vocab_size * 4, (model, key)
    assert "kNN-LM" in report.summary and "RETRO" in report.summary and "total" in report.summary
    evaluated = body["meta"]["evaluated_on"]  # the first eval_tokens of the test split's (one long module's)
    assert evaluated["predicted_tokens"] == body["knnlm"]["tokens"] == config.eval_tokens < evaluated["tokens"] - 1
    assert f"over the {body['knnlm']['tokens']} tokens predicted in the {evaluated['tokens']}-token" in report.summary
    assert (config.run / "knnlm-source" / "keys.parts.json").exists()  # written in parts by the Ray Data job
    encoder = read_manifest(config.run / "retro-datastore").metadata["encoder"]
    assert encoder == "lm-last:" + model_fingerprint(load_checkpoint(config.run / "lm").model).removeprefix("lm:")
    assert report.samples.read_text().count("### ") == 3 * config.samples


def test_retro_is_retro_fitted_onto_the_lm(first_run):
    """By default RETRO's decoder is the trained LM, frozen: with its neighbours withheld it scores as the LM."""
    config, report = first_run
    body = json.loads(report.eval_json.read_text())
    lm, retro = load_checkpoint(config.run / "lm").model, load_checkpoint(config.run / "retro").model
    assert retro.config.n_layer == lm.config.n_layer and torch.equal(retro.tok_emb.weight, lm.tok_emb.weight)
    assert body["retro"]["tokens"] == body["knnlm"]["tokens"]
    assert body["retro"]["perplexity_without"] == pytest.approx(body["knnlm"]["base_perplexity"], rel=1e-5)
    assert 0 < body["meta"]["retro_trained_parameters"] < body["meta"]["retro_parameters"]


def test_retro_trains_on_text_the_lm_never_saw_with_its_datastore_neighbours(first_run):
    """The retro split: training-side documents outside the LM's train split (and the datastore), whose
    neighbours are what the RETRO datastore returns for them, nothing excluded."""
    config, report = first_run
    data, source = config.run / "data", config.run / "retro-source"
    retro_split, train = TokenStore.open(data / "retro"), TokenStore.open(data / "train")
    assert not {d.name for d in retro_split.documents} & {d.name for d in train.documents}
    assert config.max_retro_tokens <= len(retro_split) < config.max_retro_tokens + 20_000
    meta = json.loads(report.eval_json.read_text())["meta"]
    assert meta["retro_trained_on"] == {"split": "retro", "documents": len(retro_split.documents),
                                        "tokens": len(retro_split)}
    assert load_checkpoint(config.run / "retro").extra["train_config"]["split"] == "retro"
    L, K = config.retro.chunk_len, config.n_neighbours
    neighbours = np.load(source / "neighbours-retro.npy")
    assert neighbours.shape == (len(retro_split) // L, K, 2 * L)
    retrieval = RetrievalConfig(k=K, nprobe=config.retro_nprobe, exact_rerank=True, rerank_candidates=8 * K)
    with InProcessRetriever(config.run / "retro-datastore", retrieval) as retriever:
        expected = retriever.chunks(np.load(source / "retro-keys.npy")[:64], None)  # (64, K, 2L)
    assert np.array_equal(neighbours[:64], expected)
    searches = json.loads((source / SEARCH_RECORD).read_text())  # what a rerun compares its retro_nprobe with
    settings = {"nprobe": config.retro_nprobe, "exact_rerank": True, "rerank_candidates": 8 * K}
    assert searches == {"retro": settings, "heldout": settings}


def test_distributed_figures_equal_an_in_process_evaluation(first_run):
    config, report = first_run
    body = json.loads(report.eval_json.read_text())
    chosen = body["meta"]["temperature_tuning"]["chosen"]
    test = TokenStore.open(config.run / "data" / "test")
    lm = load_checkpoint(config.run / "lm").model
    eval_config = EvalConfig(context_len=config.context_len, stride=config.stride, retrieval=config.knn,
                             temperature=chosen, max_tokens=config.eval_tokens)
    valid = TokenStore.open(config.run / "data" / "valid")
    with InProcessRetriever(config.run / "knnlm-datastore", config.knn) as retriever:
        reference = evaluate_knnlm(lm, test, retriever, eval_config, progress=False)
        on_valid = evaluate_knnlm(lm, valid, retriever, replace(eval_config, max_tokens=0), progress=False)
    assert body["knnlm"]["tokens"] == reference.tokens == config.eval_tokens
    assert body["knnlm"]["base_perplexity"] == pytest.approx(reference.base_perplexity, rel=1e-6)
    for lam, ppl in reference.perplexity.items():
        assert body["knnlm"]["perplexity"][str(lam)] == pytest.approx(ppl, rel=1e-5)
    # The reported figure is the test split's at the λ that the validation text chose, not the test's own best.
    lam = body["meta"]["temperature_tuning"]["lambda"]
    assert lam == on_valid.best_lambda == body["knnlm"]["best_lambda"] and body["knnlm"]["lambdas_from"] == "valid"
    assert body["knnlm"]["best_perplexity"] == pytest.approx(reference.perplexity[lam], rel=1e-5)
    assert f"λ={lam:g} chosen on valid" in report.table


def test_a_second_run_reuses_every_stage(first_run, caplog):
    config, report = first_run
    with caplog.at_level(logging.INFO, logger="lm_worker"):
        again = run_pipeline(replace(config))
    stages = {row["stage"]: row["reused"] for row in json.loads(again.eval_json.read_text())["meta"]["stages"]}
    built = [name for name, reused in stages.items() if name.split()[0] in ("prepare", "train", "encode", "build",
                                                                           "embed", "RETRO", "choose", "evaluate")]
    assert built and all(stages[name] for name in built), stages  # the evaluations read their finished shares
    assert not stages["attention map and samples"]  # made again each run
    assert again.table == report.table  # evaluation shares reused: the same figures
    assert "already trained, no step run" in caplog.text and not re.search(r"\b0 tokens/s", caplog.text)


def test_a_copied_run_folder_reads_its_own_lm(first_run, tmp_path):
    """The RETRO source and datastore record their LM encoder's checkpoint by its path. A copy of the run
    folder uses its own LM: with the original's moved away, every stage of the copy is still reused (it
    stopped at "no checkpoint at RUN/lm/checkpoint.pt", and a copy beside the original read the original's).
    Run without samples, it leaves none of the last run's in its report."""
    config, report = first_run
    copy = tmp_path / "copied-run"
    shutil.copytree(config.run, copy, symlinks=True)
    hidden = config.run.with_name("lm-moved-away")
    (config.run / "lm").rename(hidden)
    try:
        again = run_pipeline(replace(config, run=copy, samples=0))
    finally:
        hidden.rename(config.run / "lm")
    assert not (copy / "report" / "samples.md").exists()  # no samples asked for: the last run's are not left
    stages = json.loads(again.eval_json.read_text())["meta"]["stages"]
    kept = ("encode", "build", "embed", "RETRO")
    assert all(row["reused"] for row in stages if row["stage"].split()[0] in kept), stages
    assert again.table == report.table


def test_the_report_records_the_config_as_it_ran_and_each_splits_budget(first_run):
    """eval.json's config shows RETRO's training as it ran (retro-fitted from RUN/lm, on the retro
    split), and each split's token budget beside the tokens it holds (documents are kept whole)."""
    config, report = first_run
    meta = json.loads(report.eval_json.read_text())["meta"]
    retro = meta["config"]["retro"]
    assert retro["init_from"] == str(config.run / "lm" / "checkpoint.pt") and retro["split"] == "retro"
    splits = meta["splits"]
    assert splits["heldout"]["budget_tokens"] == config.max_heldout_tokens
    assert splits["heldout"]["tokens"] == len(TokenStore.open(config.run / "data" / "heldout"))
    cut = splits["test"]["documents"] + splits["valid"]["documents"] - splits["heldout"]["documents"]
    assert cut in (0, 1)  # the document validation starts in is cut in two, and each part ends in EOS
    assert splits["test"]["tokens"] + splits["valid"]["tokens"] == splits["heldout"]["tokens"] + cut


def test_samples_close_every_code_block(first_run):
    """A prompt without a final newline still gets its closing fence on a line of its own."""
    from lm_worker.pipeline.eval_stage import fenced

    _, report = first_run
    text = report.samples.read_text()
    fences = [line for line in text.splitlines() if line.startswith("```")]
    assert len(fences) % 2 == 0 and all(closing == "```" for closing in fences[1::2]), fences
    assert fenced("class Parser:\n    def __init__(self") == "```python\nclass Parser:\n    def __init__(self\n```\n"
    assert fenced("a ``` b").startswith("````python\n") and fenced("a ``` b").endswith("\n````\n")


def test_validation_is_the_last_tune_tokens_with_the_document_it_starts_in_cut():
    from lm_worker.pipeline.data_stage import cut_validation

    docs = [("a", list(range(100))), ("b", list(range(5000))), ("c", list(range(30)))]
    test, valid = cut_validation(docs, 1000)
    assert [name for name, _ in valid] == ["b[4032:]", "c"] and [name for name, _ in test] == ["a", "b[:4032]"]
    assert sum(len(t) + 1 for _, t in valid) == 1000  # with each document's EOS
    assert test[1][1] + valid[0][1] == docs[1][1]  # nothing lost, nothing twice
    with pytest.raises(ValueError, match="nothing to test on"):
        cut_validation(docs[2:], 1000)


def test_another_chunk_len_is_refused_and_names_what_to_remove(first_run):
    config, _ = first_run
    before = (config.run / "retro-source" / "source.json").read_text()
    with pytest.raises(ValueError, match=r"retro was trained with other settings .*: retro.chunk_len 16 -> 8: "
                                         r"remove .*retro-source, .*retro-datastore, .*retro and "
                                         r".*report/shares/retro to make"):
        run_pipeline(replace(config, retro=replace(config.retro, chunk_len=8)))  # kNN-LM's figures stay
    assert (config.run / "retro-source" / "source.json").read_text() == before


def test_another_stride_is_refused_and_names_what_to_remove(first_run):
    config, _ = first_run
    with pytest.raises(ValueError, match=r"knnlm-source was encoded with another context_len and stride than this "
                                         r"run's .*: remove .*knnlm-source, .*knnlm-datastore and .*report"):
        run_pipeline(replace(config, stride=16))


def test_another_train_budget_is_refused_and_says_to_start_again(first_run):
    config, _ = first_run
    with pytest.raises(ValueError, match=rf"train holds a split of a {config.max_train_tokens}-token budget, "
                                         rf"max_train_tokens is {config.max_train_tokens + 1}: .*remove "):
        run_pipeline(replace(config, max_train_tokens=config.max_train_tokens + 1))


def test_another_validation_size_is_refused_and_names_what_to_remove(first_run):
    config, _ = first_run
    with pytest.raises(ValueError, match=rf"valid holds the last {config.tune_tokens} held-out tokens, tune_tokens is "
                                         rf"{2 * config.tune_tokens}: remove .*valid, .*test and .*report"):
        run_pipeline(replace(config, tune_tokens=2 * config.tune_tokens))


def test_the_temperature_is_chosen_again_when_what_it_was_chosen_on_changes(tmp_path, monkeypatch):
    from lm_worker.evaluation import knnlm_eval
    from lm_worker.models.transformer_lm import LMConfig, TransformerLM
    from lm_worker.pipeline.eval_stage import tune_temperature

    tried: list[float] = []

    def fake_evaluate(lm, valid, retriever, config, progress):  # perplexity 10 + |T - 4|
        tried.append(config.temperature)
        return SimpleNamespace(best_perplexity=10.0 + abs(config.temperature - 4.0), temperature=config.temperature,
                               best_lambda=config.temperature / 20, followed_lambda=config.temperature / 20)

    def choose(config, lm, eval_config=EvalConfig()):
        choice = tune_temperature(config, lm, valid, None, eval_config)
        return choice.temperature, choice.lam, choice.reused

    monkeypatch.setattr(knnlm_eval, "evaluate_knnlm", fake_evaluate)
    (tmp_path / "report").mkdir()
    lm, valid = TransformerLM(LMConfig.tiny(vocab_size=50)), list(range(100))
    config = replace(tiny(tmp_path), temperatures=(1.0, 5.0))
    assert choose(config, lm) == (5.0, 0.25, False)  # λ: the best at the chosen temperature
    assert choose(config, lm) == (5.0, 0.25, True) and tried == [1.0, 5.0]
    wider = replace(config, temperatures=(1.0, 4.0, 5.0))  # more temperatures: chosen again, among them
    assert choose(wider, lm) == (4.0, 0.2, False)
    assert choose(wider, lm, EvalConfig(lambdas=(0.0, 0.2)))[2] is False  # other λs: chosen again
    torch.manual_seed(1)
    retrained = TransformerLM(LMConfig.tiny(vocab_size=50))  # another LM: chosen again
    assert choose(wider, retrained)[2] is False


def test_the_test_split_is_evaluated_again_when_the_chosen_temperature_changes(tmp_path, monkeypatch):
    """The run's own shares folder holds the evaluation of the temperature chosen before: once another is
    chosen, the shares are computed again instead of refused as another job's."""
    from lm_worker.evaluation import distributed
    from lm_worker.evaluation.shares import open_saved
    from lm_worker.pipeline.eval_stage import evaluate_test

    opened = []

    def fake_distributed(job, pool, on_share):  # what evaluate_distributed does first, then no work
        opened.append(open_saved(job.describe(), pool.checkpoint_dir))
        return "figures"

    monkeypatch.setattr(distributed, "evaluate_distributed", fake_distributed)
    config = replace(tiny(tmp_path), eval_workers=1)
    test = SimpleNamespace(directory=tmp_path / "data" / "test")
    for temperature in (1.0, 10.0, 10.0):
        assert evaluate_test(config, "knnlm", tmp_path / "lm", test, ("127.0.0.1:1", None),
                             EvalConfig(temperature=temperature), None, None, None) == ("figures", True)
        (tmp_path / "report" / "shares" / "knnlm" / "share-00000.json").write_text('{"share": 0}')  # one done
    assert opened == [{}, {}, {0: {"share": 0}}]  # the shares of T = 1 went; those of T = 10 were kept


def test_another_n_neighbours_is_refused_and_names_what_to_remove(first_run):
    config, _ = first_run
    with pytest.raises(ValueError, match=r"neighbours-retro.npy holds 2 neighbours per chunk, n_neighbours is 3: "
                                         r"remove .*neighbours-\*.npy and .*retro to fetch and train again"):
        run_pipeline(replace(config, n_neighbours=3))
    assert load_checkpoint(config.run / "retro").config.n_neighbours == 2


def test_another_retro_token_budget_is_refused_and_names_what_to_remove(first_run):
    config, _ = first_run
    split = config.run / "data" / "retro"
    before = (split / "documents.json").read_text()
    with pytest.raises(ValueError, match=rf"retro split of a {config.max_retro_tokens}-token budget, max_retro_tokens "
                                         rf"is {2 * config.max_retro_tokens}: remove .*retro-keys.npy, "
                                         r".*neighbours-retro.npy and .*retro to make it again"):
        run_pipeline(replace(config, max_retro_tokens=2 * config.max_retro_tokens))
    assert (split / "documents.json").read_text() == before


def copy_of(first_run, tmp_path) -> PipelineConfig:
    """The first run's config on a copy of its folder, for a test that changes what the run holds."""
    config, _ = first_run
    shutil.copytree(config.run, tmp_path / "run")
    return replace(config, run=tmp_path / "run")


def to_remove(refused: pytest.ExceptionInfo, config: PipelineConfig) -> set[str]:
    """The run's folders a refusal says to remove (by their paths in the run), after checking it names nothing
    twice and nothing outside the run."""
    named = str(refused.value).split(": remove ")[-1].split(" to make ")[0]
    paths = re.split(r", | and ", named)
    assert len(paths) == len(set(paths)) and all(Path(p).is_relative_to(config.run) for p in paths), named
    return {str(Path(p).relative_to(config.run)) for p in paths}


def retrained_lm(config: PipelineConfig) -> PipelineConfig:
    return replace(config, lm=replace(config.lm, steps=config.lm.steps + 5))


def test_an_lm_to_train_on_is_refused_naming_everything_it_made_before_it_trains(first_run, tmp_path):
    """More LM steps: its kNN-LM source, the RETRO source it encoded, their datastores and the RETRO
    retro-fitted onto it would all be stale, so one message names them all before the LM trains on."""
    config = retrained_lm(copy_of(first_run, tmp_path))
    with pytest.raises(ValueError, match=rf"lm holds the LM at step {config.lm.steps - 5}: training it to lm.steps "
                                         rf"{config.lm.steps} would leave what was made from it stale") as refused:
        run_pipeline(config)
    assert to_remove(refused, config) == {"knnlm-source", "knnlm-datastore", "retro-source", "retro-datastore",
                                          "retro", "report"}
    assert load_checkpoint(config.run / "lm").step == config.lm.steps - 5  # refused before it trained


def test_a_retro_fitted_onto_another_lm_is_refused_then_retrained(first_run, tmp_path):
    """The LM trained on outside the pipeline (`lm-worker train`) after its sources and datastores were removed,
    but not RETRO: it was retro-fitted onto the old LM, so it is refused (not reused); removed as told, it
    is fitted onto the new LM."""
    from lm_worker.training.train import train

    config = retrained_lm(copy_of(first_run, tmp_path))
    for name in ("knnlm-source", "knnlm-datastore", "retro-source", "retro-datastore", "report"):
        shutil.rmtree(config.run / name)
    train(config.lm, config.run / "data", config.run / "lm", progress=False)
    with pytest.raises(ValueError, match=r"retro was retro-fitted onto another LM") as refused:
        run_pipeline(config)
    assert to_remove(refused, config) == {"retro"}
    shutil.rmtree(config.run / "retro")
    again = run_pipeline(config)
    stages = {row["stage"]: row["reused"] for row in json.loads(again.eval_json.read_text())["meta"]["stages"]}
    assert not any(reused for name, reused in stages.items() if name.startswith("train RETRO")), stages
    lm, retro = load_checkpoint(config.run / "lm"), load_checkpoint(config.run / "retro")
    assert lm.step == config.lm.steps and retro.extra["base_fingerprint"] == model_fingerprint(lm.model)


def test_another_retro_encoder_is_refused_and_names_what_to_remove(first_run, tmp_path):
    config = copy_of(first_run, tmp_path)
    with pytest.raises(ValueError, match=r"retro-source was encoded by lm-last:\w+, retro_encoder is 'minilm'") \
            as refused:
        run_pipeline(replace(config, retro_encoder="minilm"))
    assert to_remove(refused, config) == {"retro-source", "retro-datastore", "retro", "report/shares/retro"}


def test_switching_retro_init_retrains_retro_alone(first_run):
    """Last in this file: it replaces the run's RETRO. A run that retro-fitted, rerun with retro_init="scratch",
    trains RETRO's own decoder afresh and reuses every stage before it."""
    config, _ = first_run
    again = run_pipeline(replace(config, retro_init="scratch"))
    stages = {row["stage"]: row["reused"] for row in json.loads(again.eval_json.read_text())["meta"]["stages"]}
    assert stages[f"train RETRO ({config.retro.steps} steps)"] is False
    assert all(reused for name, reused in stages.items() if name.split()[0] in ("prepare", "encode", "build")
               or name.startswith("train LM"))
    retro = load_checkpoint(config.run / "retro")
    assert retro.extra["train_config"]["init_from"] == "" and retro.step == config.retro.steps
    assert retro.extra["train_config"]["split"] == "train"  # from scratch: on the LM's training text
    lm_layers = load_checkpoint(config.run / "lm").config.n_layer
    assert retro.config.n_layer == RetroConfig.tiny(config.vocab_size).n_layer != lm_layers


def test_datastores_of_another_shard_count_are_refused_and_named(first_run, tmp_path):
    """A datastore was reused whenever its manifest was there, whatever `shards` asked for (the run said it
    built 3 shards and served the 2 it had); it is now refused with what was made from it."""
    config = copy_of(first_run, tmp_path)
    with pytest.raises(ValueError, match=r"knnlm-datastore holds 2 shards, shards is 3; .*retro-datastore holds 2 "
                                         r"shards, shards is 3") as refused:
        run_pipeline(replace(config, shards=3))
    assert {"knnlm-datastore", "retro-datastore"} <= to_remove(refused, config)
    assert "knnlm-source" not in to_remove(refused, config)  # the sources are built again into 3 shards
