"""What a run folder holds that was made from other inputs than this run's: models trained with other
settings (`check_models`, before any model trains: also an LM that would train on under what was made
from it), sources encoded by another LM, encoder or window, datastores built from a source since
removed, and a RETRO retro-fitted onto another LM. Reused, each would answer for a model it was not
made from, so the run is refused up front, before anything is trained or encoded, with one message
that names every folder to remove."""

from __future__ import annotations

import fnmatch
import json
import logging
from dataclasses import dataclass
from pathlib import Path

from lm_worker.pipeline.config import PipelineConfig
from lm_worker.pipeline.stages import done

log = logging.getLogger(__name__)

# Each output and what is made from it, in pipeline order: removing an output means remaking these too. The
# LM's own outputs are found by `made_from_lm` (a RETRO source of MiniLM keys, or RETRO from scratch, are not).
MADE_FROM = {"data": ("data", "lm", "knnlm-source", "knnlm-datastore", "retro-source", "retro-datastore", "retro",
                      "report"),
             "lm": ("lm", "report"),
             "knnlm-source": ("knnlm-source", "knnlm-datastore", "report"),
             "knnlm-datastore": ("knnlm-datastore", "report"),
             # RETRO's own figures only: kNN-LM's tuning and evaluation shares stay valid
             "retro-source": ("retro-source", "retro-datastore", "retro", "report/shares/retro"),
             "retro-datastore": ("retro-datastore", "retro-source/neighbours-*.npy", "retro", "report/shares/retro"),
             # a split's queries (RETRO trains and validates on their neighbours)
             **{f"retro-source/{split}-keys.npy": (f"retro-source/{split}-keys.npy",
                                                   f"retro-source/neighbours-{split}.npy", "retro",
                                                   "report/shares/retro") for split in ("heldout", "retro")},
             "retro": ("retro", "report/shares/retro")}
ORDER = ("data", "lm", "knnlm-source", "knnlm-datastore", "retro-source", "retro-datastore",
         "retro-source/heldout-keys.npy", "retro-source/retro-keys.npy", "retro-source/neighbours-*.npy",
         "retro-source/neighbours-heldout.npy", "retro-source/neighbours-retro.npy", "retro", "report",
         "report/shares/retro")
WINDOW_KEY = {"knnlm": "context_len", "retro": "chunk_len"}  # the window a datastore's metadata records


@dataclass(frozen=True)
class Made:
    """What this run's outputs must be made from: the LM checkpoint, its `model_fingerprint` and model."""

    checkpoint: Path
    fingerprint: str
    model: object


def check_made_from(config: PipelineConfig, lm_checkpoint: Path) -> None:
    """Refuses a run folder holding outputs made from another LM, encoder, window or chunk length.

    Raises:
        ValueError: one message with every reason and every folder to remove (what was made from a
            stale output included), e.g. all of the LM's sources, datastores and RETRO after it trained on.
    """
    from lm_worker.models.checkpoint import load_checkpoint
    from lm_worker.models.fingerprint import model_fingerprint

    lm = load_checkpoint(lm_checkpoint).model
    made = Made(Path(lm_checkpoint), model_fingerprint(lm), lm)
    stale = {**stale_knnlm(config, made), **stale_retro_keys(config, made), **stale_retro(config, made),
             **other_shards(config)}
    if stale:
        raise ValueError(refusal(config, stale))


def refusal(config: PipelineConfig, stale: dict[str, str]) -> str:
    """The message refusing a run folder's `stale` outputs: every reason, then every path to remove."""
    return (f"{'; '.join(stale.values())}: remove {removal(config, stale)} to make them again, or use another "
            "run folder")


def shown(value: object, limit: int = 80) -> str:
    """A value read from a run folder's file, for a message: quoted, escaped and cut (`untrusted.safe_text`),
    so that it cannot forge a line."""
    from lm_worker.retrieval.errors import safe_text

    return safe_text(value, limit)


def plain(value: object, limit: int = 80) -> str:
    """A value read from a run folder's file, for a message: as it is when it is at most `limit` printable
    characters (a fingerprint), else as `shown`."""
    text = str(value)
    return text if text.isprintable() and len(text) <= limit else shown(value, limit)


def check_models(config: PipelineConfig) -> None:
    """Refuses, before any model trains, a run folder whose LM or RETRO was trained with other settings than
    this run's or for more steps (`model_stage.settings_refusal`), or whose LM is to train on (more steps,
    or afresh) while what was made from it is there: training would leave that stale, and the LM it was
    made from would be gone.

    Raises:
        ValueError: one message with every reason and every folder to remove: a refused LM with all that
            was made from it, a refused RETRO with the report.
    """
    from lm_worker.pipeline.model_stage import (
        changed_settings,
        changes,
        retro_train_config,
        saved_settings,
        settings_refusal,
    )

    reasons, remove, lm = [], set(), config.run / "lm"
    if why := settings_refusal(config, config.lm, "lm"):
        reasons.append(why)
        remove |= {"lm", *made_from_lm(config)}
    elif (step := changes(config, config.lm, "lm")) is not None and (made := made_from_lm(config)):
        reasons.append(f"{lm} holds the LM at step {step}: training it to lm.steps {config.lm.steps} would leave "
                       f"what was made from it stale (or keep lm.steps at {step})")
        remove |= set(made)
    retro = retro_train_config(config)
    if why := settings_refusal(config, retro, "retro"):
        reasons.append(why)
        remove.add("retro")
        if "chunk_len" in changed_settings(saved_settings(config, "retro")[1], retro):
            remove.add("retro-source")  # its chunks (so its datastore and neighbours) are of the old length
    if reasons:
        raise ValueError(f"{'; '.join(reasons)}: remove {removal(config, dict.fromkeys(remove, ''))} to make them "
                         "again, or use another run folder")


def made_from_lm(config: PipelineConfig) -> dict[str, str]:
    """The outputs in RUN made from its LM (what is made from them follows, `MADE_FROM`): the kNN-LM source,
    a RETRO source of the LM's keys, a datastore whose source is gone, and a RETRO retro-fitted onto the LM
    (while this run retro-fits it too: else it is trained afresh)."""
    from lm_worker.encoders.lm_chunks import PREFIX
    from lm_worker.pipeline.model_stage import saved_settings
    from lm_worker.sources.source import read_source

    made = {}
    for kind in ("knnlm", "retro"):
        source, datastore = config.run / f"{kind}-source", config.run / f"{kind}-datastore"
        if done(source / "source.json"):
            if kind == "knnlm" or read_source(source).encoder_fingerprint.startswith(PREFIX):
                made[f"{kind}-source"] = f"{source} was encoded by the LM"
        elif present(source) and (kind == "knnlm" or config.retro_encoder == "lm"):  # parts of an unfinished one
            made[f"{kind}-source"] = f"{source} holds parts encoded by the LM"
        elif present(datastore):
            made[f"{kind}-datastore"] = f"{datastore} was built from a source no longer in {config.run}"
    retro = saved_settings(config, "retro") if config.retro_init == "lm" else None
    if retro is not None and retro[1].get("init_from"):
        made["retro"] = f"{config.run / 'retro'} was retro-fitted onto the LM"
    return made


def removal(config: PipelineConfig, stale: dict[str, str]) -> str:
    """The paths to remove, in pipeline order, each once (a file under a folder already named left out)."""
    names = {name for output in stale for name in MADE_FROM[output]}
    names -= {name for name in names if "/" in name and name.split("/")[0] in names}
    names -= {name for name in names for glob in names if "*" in glob and name != glob and fnmatch.fnmatch(name, glob)}
    paths = [str(config.run / name) for name in ORDER if name in names and present(config.run / name)]
    return paths[0] if len(paths) == 1 else f"{', '.join(paths[:-1])} and {paths[-1]}"


def present(path: Path) -> bool:
    """Whether there is anything at `path` to remove (a glob: any match; a folder: anything in it; a file)."""
    if "*" in path.name:
        return any(path.parent.glob(path.name))
    return path.is_file() or (path.is_dir() and any(path.iterdir()))


def encoded_by(config: PipelineConfig, kind: str, fingerprint: str, made: Made) -> str | None:
    """Why keys of `kind` encoded by `fingerprint` do not fit this run's LM and `retro_encoder`; None if they do."""
    from lm_worker.encoders.lm_chunks import PREFIX

    by_lm = kind == "knnlm" or config.retro_encoder == "lm"
    wanted = made.fingerprint if kind == "knnlm" else PREFIX + made.fingerprint.removeprefix("lm:")
    if kind == "retro" and by_lm != fingerprint.startswith(PREFIX):  # MiniLM for the LM, or the other way
        return f"by {plain(fingerprint)}, retro_encoder is {config.retro_encoder!r}"
    if not by_lm:
        return None if minilm_reads(fingerprint) else (f"by a MiniLM ({plain(fingerprint)}) other than this one's "
                                                        "weights")
    if fingerprint == wanted:
        return None
    return f"by another LM ({plain(fingerprint)}) than {made.checkpoint} ({wanted})"


def minilm_reads(fingerprint: str) -> bool:
    """Whether the MiniLM here makes the keys `fingerprint` names (its weights, by either digest they were
    recorded with; any word-piece limit, which queries take from the datastore)."""
    from lm_worker.encoders.minilm import names_these_weights

    return names_these_weights(fingerprint.rpartition("/wp")[0])


def other_shards(config: PipelineConfig) -> dict[str, str]:
    """RUN/KIND-datastore when built in another number of shards than this run's `shards` (it was reused
    as it stood, while the run said it built `shards`)."""
    stale = {}
    for kind in ("knnlm", "retro"):
        datastore = config.run / f"{kind}-datastore"
        if not done(datastore / "manifest.json"):
            continue
        try:
            shards = len(json.loads((datastore / "manifest.json").read_text())["shards"])
        except (OSError, ValueError, KeyError, TypeError):
            continue  # named by the servers' own checks when it is opened
        if shards != config.shards:
            stale[f"{kind}-datastore"] = f"{datastore} holds {shards} shards, shards is {config.shards}"
    return stale


def orphaned(config: PipelineConfig, kind: str) -> dict[str, str]:
    """RUN/KIND-datastore when its source is gone: the source is encoded again, and the datastore,
    built from the one removed, may hold keys of another LM or encoder than the new one."""
    source, datastore = config.run / f"{kind}-source", config.run / f"{kind}-datastore"
    if done(datastore / "manifest.json") and not done(source / "source.json"):
        return {f"{kind}-datastore": f"{datastore} was built from a {kind} source no longer in {config.run}"}
    return {}


def other_source(config: PipelineConfig, kind: str) -> dict[str, str]:
    """RUN/KIND-datastore when its manifest, as `build_source` writes it, names another source than
    RUN/KIND-source (one encoded again since, by `lm-worker encode`): another encoder, window (context_len,
    chunk_len), kind, tokenizer, dimension or row count. One whose metadata records none of these was not
    built from a source by this project and cannot be shown to hold this one: stale too. An unreadable
    manifest is left to the servers' own checks, which name it when it is opened."""
    from lm_worker.sources.source import read_source

    source, datastore = config.run / f"{kind}-source", config.run / f"{kind}-datastore"
    if not (done(datastore / "manifest.json") and done(source / "source.json")):
        return {}
    try:
        manifest = json.loads((datastore / "manifest.json").read_text())
        metadata, rows, dimension = manifest["metadata"], manifest["ntotal"], manifest["dimension"]
    except (OSError, ValueError, KeyError, TypeError):
        return {}
    if not isinstance(metadata, dict):
        return {}
    info = read_source(source)
    window = str(info.chunk_len) if kind == "retro" else str(info.details.get("context_len", ""))
    wanted = {"encoder": info.encoder_fingerprint, WINDOW_KEY[kind]: window, "kind": info.kind,
              "tokenizer": info.tokenizer_fingerprint}
    if missing := [key for key in wanted if key not in metadata]:
        return {f"{kind}-datastore": f"{datastore} records no {', '.join(missing)}: it cannot be shown to be built "
                                     f"from {source}"}
    differ = [f"{key} {shown(metadata[key])}, the source's {shown(value)}" for key, value in wanted.items()
              if metadata[key] != value]
    differ += [f"{plain(found)} {what}, the source's {value}" for what, found, value in
               (("rows", rows, info.rows), ("dimensions", dimension, info.dimension)) if found != value]
    if differ:
        return {f"{kind}-datastore": f"{datastore} was built from another source than {source}: it has "
                                     f"{'; '.join(differ)}"}
    return {}


def stale_query_keys(config: PipelineConfig, info) -> dict[str, str]:
    """RUN/retro-source/SPLIT-keys.npy, the queries of a split that is not in the datastore, when the record
    beside it (`keys_record`, written by the pipeline and by `lm-worker neighbours`) names another encoder
    than the source's (`info`), or other chunks than the split's. One with no record (an earlier version)
    is reused with a warning."""
    from lm_worker.data.token_store import TokenStore
    from lm_worker.pipeline.datastore_stage import query_splits
    from lm_worker.sources.retro import keys_record

    stale = {}
    for split in query_splits(config):
        path, data = info.directory / f"{split}-keys.npy", config.run / "data" / split
        if not path.is_file() or not data.is_dir():
            continue
        recorded = keys_recorded(path)
        if recorded is None:  # file times cannot tell: a copy of the run folder sets them in its own order
            log.warning("%s does not record what it was embedded from (an earlier version): reused as the "
                        "queries of %s", path, info.directory)
            continue
        wanted = keys_record(TokenStore.open(data), info.chunk_len, info.encoder_fingerprint)
        if not recorded:
            stale[f"retro-source/{split}-keys.npy"] = f"{path.with_suffix('.json')} is unreadable"
        elif not same_encoder(recorded.get("encoder"), info.encoder_fingerprint):
            stale[f"retro-source/{split}-keys.npy"] = (f"{path} was embedded by {plain(recorded.get('encoder'))}, "
                                                       f"the source's keys by {plain(info.encoder_fingerprint)}")
        elif differ := [key for key in wanted if key != "encoder" and recorded.get(key) != wanted[key]]:
            stale[f"retro-source/{split}-keys.npy"] = (f"{path} was embedded from other chunks than {data}'s "
                                                       f"({', '.join(differ)} differ)")
    return stale


def keys_recorded(path: Path) -> dict | None:
    """The record beside a split's keys file (`keys_record`); None where there is none, {} if unreadable."""
    record = path.with_suffix(".json")
    if not record.exists():
        return None
    try:
        body = json.loads(record.read_text())
    except (OSError, ValueError):
        return {}
    return body if isinstance(body, dict) else {}


def same_encoder(recorded: object, fingerprint: str) -> bool:
    """Whether keys recorded as embedded by `recorded` are of the encoder `fingerprint` names: the same
    fingerprint, or the MiniLM here by either digest, with the same word-piece limit."""
    from lm_worker.encoders.lm_chunks import PREFIX

    if recorded == fingerprint:
        return True
    if not isinstance(recorded, str) or recorded.startswith(PREFIX) or fingerprint.startswith(PREFIX):
        return False
    return (recorded.rpartition("/wp")[2] == fingerprint.rpartition("/wp")[2] and minilm_reads(recorded)
            and minilm_reads(fingerprint))


def stale_knnlm(config: PipelineConfig, made: Made) -> dict[str, str]:
    """RUN/knnlm-source when encoded by another LM or with other windows than this run's; its datastore
    when the source is gone."""
    from lm_worker.sources.source import read_source

    stale, source = {}, config.run / "knnlm-source"
    if done(source / "source.json"):
        info = read_source(source)
        windows = (info.details.get("context_len"), info.details.get("stride"))
        if why := encoded_by(config, "knnlm", info.encoder_fingerprint, made):
            stale["knnlm-source"] = f"{source} was encoded {why}"
        elif windows != (config.context_len, config.stride):
            stale["knnlm-source"] = (f"{source} was encoded with another context_len and stride than this run's "
                                     f"(({', '.join(map(plain, windows))}) against "
                                     f"{(config.context_len, config.stride)})")
    return {**stale, **orphaned(config, "knnlm"), **other_source(config, "knnlm")}


def stale_retro_keys(config: PipelineConfig, made: Made) -> dict[str, str]:
    """RUN/retro-source when encoded by another encoder (or LM) or of other chunks than this run's; its
    datastore when the source is gone."""
    from lm_worker.sources.source import read_source

    stale, source, chunk_len = {}, config.run / "retro-source", config.retro.chunk_len
    if done(source / "source.json"):
        info = read_source(source)
        if info.chunk_len != chunk_len:
            stale["retro-source"] = (f"{source} holds chunks of {info.chunk_len} tokens, RETRO's chunk_len is "
                                     f"{chunk_len}")
        elif why := encoded_by(config, "retro", info.encoder_fingerprint, made):
            stale["retro-source"] = f"{source} was encoded {why}"
        else:
            stale.update(stale_query_keys(config, info))
    return {**stale, **orphaned(config, "retro"), **other_source(config, "retro")}


def stale_retro(config: PipelineConfig, made: Made) -> dict[str, str]:
    """RUN/retro, when it is to be retro-fitted onto the LM but was retro-fitted onto another one."""
    from lm_worker.models.checkpoint import load_checkpoint

    path = config.run / "retro" / "checkpoint.pt"
    if config.retro_init != "lm" or not path.is_file():
        return {}
    saved = load_checkpoint(path)
    if not saved.extra.get("train_config", {}).get("init_from"):
        return {}  # trained from scratch: `same_start` retrains it retro-fitted
    base = fitted_onto(saved, made)
    if base in (None, made.fingerprint):
        return {}
    return {"retro": f"{path.parent} was retro-fitted onto another LM ({plain(base)}) than {made.checkpoint} "
                     f"({made.fingerprint})"}


def fitted_onto(saved, made: Made) -> str | None:
    """The fingerprint of the LM a retro-fitted checkpoint was fitted onto, as training recorded it. One
    saved before that was recorded, with a frozen base, was fitted onto this LM if it holds its weights
    ("unknown" if not); with a base that trained on, None: it cannot tell."""
    import torch

    from lm_worker.training.train import BASE_FINGERPRINT

    if BASE_FINGERPRINT in saved.extra:
        return saved.extra[BASE_FINGERPRINT]
    if not saved.extra.get("train_config", {}).get("freeze_base", True):
        return None
    retro = saved.model.state_dict()
    same = all(name in retro and torch.equal(retro[name], weights) for name, weights in made.model.state_dict().items())
    return made.fingerprint if same else "unknown"
