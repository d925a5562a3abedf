"""The pipeline's data: the prepared corpus, the retro split, and the held-out text cut into a
validation part (where kNN-LM's temperature is chosen) and a test part (where perplexity is reported)."""

from __future__ import annotations

import json
import logging
import os
from dataclasses import replace
from pathlib import Path

import numpy as np

from lm_worker.data.prepare import PrepareConfig, prepare_corpus, prepare_retro_split
from lm_worker.data.token_store import (
    RETRO_SPLIT,
    TokenStore,
    read_json_object,
    write_text_atomically,
    write_token_store,
)
from lm_worker.pipeline.config import PipelineConfig
from lm_worker.pipeline.stages import done

log = logging.getLogger(__name__)

PREPARED = "prepared.json"  # in RUN/data: the corpus and vocab_size the pipeline prepared it from


def prepare_config(config: PipelineConfig):
    return PrepareConfig(out=config.run / "data", corpus=config.corpus, vocab_size=config.vocab_size,
                         max_train_tokens=config.max_train_tokens, max_heldout_tokens=config.max_heldout_tokens,
                         max_retro_tokens=config.max_retro_tokens, progress=config.progress)


def prepare_data(config: PipelineConfig) -> None:
    """RUN/data from the corpus, with RUN/data/prepared.json: the corpus and vocab_size it was made from."""
    report = prepare_corpus(replace(prepare_config(config), max_retro_tokens=0))
    path = config.run / "data" / PREPARED
    write_text_atomically(path, json.dumps(prepared_record(config), indent=2))  # whole or not there
    log.info("prepared: documents %s, tokens %s", report.documents, report.tokens)


def prepared_record(config: PipelineConfig) -> dict:
    """RUN/data/prepared.json's record: the corpus as given ("corpus"), the place it names ("corpus_place",
    `corpus_of`) and the vocab_size."""
    return {"corpus": config.corpus, "corpus_place": corpus_of(config.corpus), "vocab_size": config.vocab_size}


def same_corpus(recorded: dict, corpus: str) -> bool:
    """Whether a prepared.json record names `corpus`: the same string as given (a relative path still matches in a
    moved project), the same once normalised ("./corpus", "corpus/"), or the same place. A record written before
    it held the place ("corpus_place") is judged by the place its string names from here."""
    given = recorded.get("corpus")
    if not isinstance(given, str):
        return False
    if given == corpus or _normalised(given) == _normalised(corpus):
        return True
    place = recorded.get("corpus_place") if "corpus_place" in recorded else corpus_of(given)
    return place == corpus_of(corpus)


def _normalised(corpus: str) -> tuple[str, str]:
    """The built-in corpus, or a path normalised: apart, so that a folder given as "./stdlib" is never it."""
    return ("built-in", corpus) if corpus == "stdlib" else ("path", os.path.normpath(os.path.expanduser(corpus)))


def corpus_of(corpus: str) -> str:
    """The corpus as a place: "stdlib", or the absolute path of a folder or JSONL file."""
    return corpus if corpus == "stdlib" else str(Path(corpus).expanduser().resolve())


def check_prepared_corpus(config: PipelineConfig) -> None:
    """ValueError when RUN/data was prepared from another corpus or with another vocab_size than the config's:
    everything in the run was made from it, so the message names every folder to remove. Compared with
    RUN/data/prepared.json, which records the corpus as it was given (a relative path still matches in a moved
    project) and the place it named (`same_corpus`); in a run prepared before that was written, with what
    prepare wrote: the tokenizer's vocabulary (a corpus too small to fill `vocab_size` gives fewer tokens, so
    only a larger one tells) and the documents' names (files of a corpus folder; the stdlib, whose files differ from one
    Python to the next, and a JSONL corpus cannot tell).
    """
    from lm_worker.data.tokenizer import Tokenizer
    from lm_worker.pipeline.staleness import removal

    data, corpus = config.run / "data", corpus_of(config.corpus)
    if not done(data / "heldout" / "documents.json"):
        return
    try:
        recorded = read_json_object(data / PREPARED) if done(data / PREPARED) else None
    except (OSError, ValueError) as err:  # a damaged record: judged as a run prepared before it was written
        log.warning("%s is unreadable (%s): checking RUN/data's tokenizer and documents instead", data / PREPARED, err)
        recorded = None
    why = []
    if recorded is not None:
        if not same_corpus(recorded, config.corpus):
            why.append(f"from corpus {str(recorded.get('corpus'))[:200]!r}, corpus is {corpus!r}")
        if recorded.get("vocab_size") != config.vocab_size:
            from lm_worker.retrieval.errors import safe_text  # a value from the run folder: it forges no line

            size = recorded.get("vocab_size")
            why.append(f"with vocab_size {size if isinstance(size, int) else safe_text(size)}, vocab_size is "
                       f"{config.vocab_size}")
    else:
        if holds_names_of(corpus, data) is False:
            why.append(f"from another corpus than {corpus!r} (it holds documents that are not files of it)")
        if (vocab := Tokenizer.load(data / "tokenizer.json").vocab_size) > config.vocab_size:
            why.append(f"with a {vocab}-token vocabulary, vocab_size is {config.vocab_size}")
    if why:
        raise ValueError(f"{data} was prepared {' and '.join(why)}, and every stage after it was made from it: remove "
                         f"{removal(config, {'data': ''})} to make them again, or use another run folder")


def holds_names_of(corpus: str, data: Path) -> bool | None:
    """Whether every document of RUN/data's train and held-out splits names a file of `corpus` (a folder); None
    where that cannot tell (the stdlib, a JSONL file, or a corpus no longer there)."""
    if corpus == "stdlib":  # this Python's stdlib may hold other files than the one the run was prepared from
        return None
    root = Path(corpus)
    if not root.is_dir():
        return None
    names = [d.name for split in ("train", "heldout") for d in TokenStore.open(data / split).documents]
    return all((root / name).is_file() for name in names)


def prepare_retro(config: PipelineConfig) -> None:
    """RUN/data/retro, the text RETRO's new layers train on; also added to a run prepared without one."""
    store = prepare_retro_split(prepare_config(config))
    log.info("retro split: %d documents, %d tokens", len(store.documents), len(store))


def cut_validation(docs: list, tune_tokens: int) -> tuple[list, list]:
    """(test, valid): valid is the last `tune_tokens` tokens of the held-out documents, the document
    where it starts cut in two (its head stays a test document), test the rest."""
    test, valid, need = list(docs), [], tune_tokens
    while need > 1 and test:  # (a document's tokens, then its EOS)
        name, tokens = test.pop()
        if len(tokens) + 1 > need:  # longer than what is still needed: only its tail validates
            cut = len(tokens) - (need - 1)
            test.append((f"{name}[:{cut}]", tokens[:cut]))
            valid.insert(0, (f"{name}[{cut}:]", tokens[cut:]))
            need = 0
        else:
            valid.insert(0, (name, tokens))
            need -= len(tokens) + 1
    if not test:
        raise ValueError(f"{len(docs)} held-out documents leave nothing to test on after {tune_tokens} "
                         "validation tokens: lower tune_tokens or hold out more text")
    return test, valid


def split_heldout(config: PipelineConfig, heldout):
    """The held-out documents split in two: "valid" (their last `tune_tokens` tokens) to choose
    kNN-LM's temperature on, and "test" (the rest), where every perplexity is reported."""
    data = config.run / "data"
    if not done(data / "test" / "documents.json"):
        docs = [(d.name, np.asarray(heldout.tokens[d.start:d.end - 1])) for d in heldout.documents]  # EOS re-added
        test, valid = cut_validation(docs, config.tune_tokens)
        eos = int(heldout.tokens[-1])
        for name, part, budget in (("valid", valid, config.tune_tokens), ("test", test, 0)):
            write_token_store(data / name, part, eos, heldout.tokenizer_fingerprint, max_tokens=budget)
    valid = TokenStore.open(data / "valid")
    check_validation_split(config, valid)
    return valid, TokenStore.open(data / "test")


def check_validation_split(config: PipelineConfig, valid: TokenStore) -> None:
    """ValueError, naming what to remove, when RUN/data/valid holds no tokens (cut with tune_tokens below 2) or was
    cut with another `tune_tokens` than the config's. A recorded budget of None or 0 with tokens is a split written
    before its budget was recorded (`write_token_store` then recorded its default, 0), taken as it is."""
    recorded = valid.max_tokens
    if not len(valid):
        held = f"holds no validation tokens (cut with tune_tokens {recorded})"
    elif recorded and recorded != config.tune_tokens:
        held = f"holds the last {recorded} held-out tokens"
    else:
        return
    raise ValueError(f"{valid.directory} {held}, tune_tokens is {config.tune_tokens}: remove {valid.directory}, "
                     f"{config.run / 'data' / 'test'} and {config.run / 'report'} to split and evaluate again")


def split_size(config: PipelineConfig, split: str) -> dict:
    """{"split", "documents", "tokens"} of RUN/data/SPLIT."""
    store = TokenStore.open(config.run / "data" / split)
    return {"split": split, "documents": len(store.documents), "tokens": len(store)}


def split_sizes(config: PipelineConfig) -> dict:
    """Every split of RUN/data: its token budget (0: none), the documents and tokens it holds. Documents
    are kept whole, in a fixed order, while the budget is not spent, so the last one taken can carry a
    split past its budget (one long module does in the held-out split)."""
    sizes = {}
    for split in ("train", "heldout", RETRO_SPLIT, "valid", "test"):
        if done(config.run / "data" / split / "documents.json"):
            store = TokenStore.open(config.run / "data" / split)
            sizes[split] = {"budget_tokens": store.max_tokens, "documents": len(store.documents),
                            "tokens": len(store)}
    return sizes


def check_prepared_splits(config: PipelineConfig) -> None:
    """ValueError when RUN/data's train or held-out split was written within another token budget than
    the config's: everything after them (tokenizer aside) was made from them, so the message says to
    start the run again. A split written before budgets were recorded is taken as it is."""
    for split, budget in (("train", config.max_train_tokens), ("heldout", config.max_heldout_tokens)):
        path = config.run / "data" / split
        recorded = TokenStore.open(path).max_tokens if done(path / "documents.json") else None
        if recorded is not None and recorded != budget:
            raise ValueError(f"{path} holds a split of a {recorded}-token budget, max_{split}_tokens is {budget}: "
                             f"every stage after it was made from it, so remove {config.run} to run again with "
                             "this budget, or use another run folder")


def check_retro_split(config: PipelineConfig) -> None:
    """ValueError when RUN/data/retro was written within another token budget than `max_retro_tokens`
    (a run made before the budget changed), naming what to remove so the split and what follows from
    it are made again. A split written before budgets were recorded is taken as it is."""
    split = config.run / "data" / RETRO_SPLIT
    if config.retro_split != RETRO_SPLIT or not done(split / "documents.json"):
        return
    budget = TokenStore.open(split).max_tokens
    if budget is not None and budget != config.max_retro_tokens:
        source = config.run / "retro-source"
        raise ValueError(f"{split} holds the retro split of a {budget}-token budget, max_retro_tokens is "
                         f"{config.max_retro_tokens}: remove {split}, {source / 'retro-keys.npy'}, "
                         f"{source / 'neighbours-retro.npy'} and {config.run / 'retro'} to make it again, or "
                         f"use another run folder")

