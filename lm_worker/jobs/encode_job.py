"""The encode job: a kNN-LM or RETRO datastore source written in parts by Ray Data actors.

The driver splits the rows into parts (kNN-LM: runs of whole sliding windows, RETRO: runs of
chunks), and Ray Data maps the parts over a pool of actors that each load the model once (one GPU
each where there are GPUs). An actor computes its part's rows with the same code as the in-process
loop (`encode_knnlm`, `encode_retro`), writes them to a temporary folder and renames it to
`parts/NNNNN/` with `part.json` inside, so a part on disk is whole or absent. Parts go to a work
folder beside OUT; when every part is there the driver writes the parts indexes and, last,
source.json, and moves the work folder into OUT's place (`lm_worker.sources.output`), so an earlier
source at OUT stays whole until the new one is:

    OUT/parts/job.json                 what the parts were planned from (a change discards them)
    OUT/parts/00000/keys.npy           float32 (rows, d), rows [row_start, row_end) of the source
    OUT/parts/00000/values.npy         int32 (rows,), or tokens.npy int32 (rows, 2L) for RETRO
    OUT/parts/00000/part.json          its rows, encoder fingerprint, node and seconds; written last
    OUT/keys.parts.json, OUT/values.parts.json (or tokens.parts.json), OUT/source.json

Run again after a failure or a kill, the job keeps every finished part of the work folder
(`.OUT.encoding/`) and encodes the rest; run again over a whole source of the same job, it keeps that
source as it is (a datastore build reading it then resumes: its inputs are unchanged), and over a source
of the same job with parts missing, it reuses the parts there (hard links). Parts are kept only while
the job's inputs (the token store's contents included), model and plan are the same. The folders must
be reachable at the same path from every node (a shared file system on a cluster).
`retriever-server build` and `build_source` read the parts indexes as they read .npy files.

Example:
    >>> config = EncodeJobConfig(kind="retro", data=Path("run/data"), chunk_len=16, workers=2)
    >>> info = run_encode_job(config, Path("run/retro-source"))
    >>> build_source(info.directory, Path("run/retro-datastore"))
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import shutil
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import asdict, replace
from pathlib import Path

from lm_worker.data.token_store import TokenStore
from lm_worker.data.tokenizer import Tokenizer
from lm_worker.jobs.encode_plan import (
    PART_JSON,
    PARTS,
    EncodeError,
    EncodeJobConfig,
    PartSpec,
    check_config,
    check_lm_chunk_len,
    no_room_for_a_worker,
    part_dir,
    plan_parts,
)
from lm_worker.jobs.encode_worker import PartEncoder
from lm_worker.sources.output import JOB_JSON, check_out, encode_lock, job_work_dir, replace_source
from lm_worker.sources.retro import tokens_digest
from lm_worker.sources.source import (
    KEYS,
    KEYS_PARTS,
    PARTS_LAYOUT,
    PAYLOAD_FILES,
    SOURCE_JSON,
    Encoder,
    SourceInfo,
    read_source,
)
from retriever_server.cluster.connect import connect
from retriever_server.datastore.row_parts import PARTS_SUFFIX, write_parts_index

log = logging.getLogger(__name__)


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def finished_part(out_dir: Path, part: PartSpec) -> dict | None:
    """The part.json of part `part` when it is on disk, whole and of this plan; else None."""
    folder = part_dir(out_dir, part.index)
    record = _read_json(folder / PART_JSON)
    try:
        files = record["files"].items()
        whole = {k: record[k] for k in asdict(part)} == asdict(part) and all(
            (folder / name).is_file() and (folder / name).stat().st_size == size for name, size in files)
    except (KeyError, TypeError, AttributeError):
        whole = False
    return record if whole else None


def job_stamp(config: EncodeJobConfig, store: TokenStore, plan: list[PartSpec], eos_id: int,
               encoder_factory) -> dict:
    """What finished parts must share with this run to be kept."""
    if config.kind == "knnlm" or (config.encoder == "lm" and encoder_factory is None):
        path = Path(config.checkpoint).resolve()
        files = [path / n for n in sorted(os.listdir(path))] if path.is_dir() else [path]
        model = {str(f): [f.stat().st_size, f.stat().st_mtime_ns] for f in files if f.is_file()}
    elif encoder_factory is None:
        from lm_worker.encoders.minilm import weights_fingerprint
        from lm_worker.encoders.minilm_chunks import DEFAULT_WORDPIECES

        model = f"{weights_fingerprint()}/wp{DEFAULT_WORDPIECES}"  # the fingerprint ChunkEncoder() will have
    else:
        model = factory_identity(encoder_factory)
    stamp = {"kind": config.kind, "store": str(store.directory.resolve()), "tokens": len(store),
             "token_digest": tokens_digest(store), "tokenizer": store.tokenizer_fingerprint, "model": model,
             "eos_id": eos_id,
             "windows": [config.context_len, config.stride] if config.kind == "knnlm" else None,
             "chunk_len": config.chunk_len if config.kind == "retro" else None,
             "plan": [[p.first, p.last, p.row_start, p.row_end] for p in plan]}
    return json.loads(json.dumps(stamp))


def factory_identity(factory) -> str:
    """What tells encoder factories apart across runs: a `fingerprint` attribute where the factory has one
    (give one to factories that one name cannot tell apart, such as lambdas); else its module and qualified
    name, with a partial's arguments, or an object's repr where that holds no memory address."""
    fingerprint = getattr(factory, "fingerprint", None)
    if isinstance(fingerprint, str):
        return fingerprint
    if isinstance(factory, functools.partial):
        arguments = [*map(repr, factory.args), *(f"{k}={v!r}" for k, v in sorted(factory.keywords.items()))]
        return f"{factory_identity(factory.func)}({', '.join(arguments)})"
    named = factory if hasattr(factory, "__qualname__") else type(factory)
    name = f"{named.__module__}.{named.__qualname__}"
    shown = repr(factory)
    return name if named is factory or " at 0x" in shown else f"{name}:{shown}"


def _absolute(config: EncodeJobConfig) -> EncodeJobConfig:
    """The config with absolute paths, as the actors see them whatever their working directory."""
    checkpoint = None if config.checkpoint is None else Path(config.checkpoint).absolute()
    return replace(config, data=Path(config.data).absolute(), checkpoint=checkpoint)


def _same_job(old, stamp: dict) -> bool:
    """Whether an earlier job's stamp is this job's. A stamp from before jobs recorded their tokens' digest
    is judged without it (its parts are kept where the store's path, length and tokenizer match)."""
    if isinstance(old, dict) and "token_digest" not in old:
        return old == {k: v for k, v in stamp.items() if k != "token_digest"}
    return old == stamp


def _made_by(folder: Path, stamp: dict) -> bool:
    """Whether the parts in `folder` were planned by the job of `stamp` (FOLDER/parts/job.json)."""
    return _same_job(_read_json(Path(folder) / PARTS / JOB_JSON), stamp)


def _changed(old, stamp: dict) -> str:
    """The fields of `stamp` that the earlier job's `old` stamp records otherwise."""
    old = old if isinstance(old, dict) else {}
    return ", ".join(k for k in stamp if old.get(k) != stamp[k])


def _keep_finished(work: Path, plan: list[PartSpec], stamp: dict) -> dict[int, dict]:
    """Keeps the finished parts of an earlier run of this same job; clears everything else in parts/."""
    parts = work / PARTS
    old = _read_json(parts / JOB_JSON)
    if parts.exists() and not _same_job(old, stamp):
        if any(p.name != JOB_JSON for p in parts.iterdir()):
            log.warning("discarding %s: parts of a different job (changed: %s)", parts, _changed(old, stamp))
        shutil.rmtree(parts)
    parts.mkdir(parents=True, exist_ok=True)
    (parts / JOB_JSON).write_text(json.dumps(stamp))
    for leftover in parts.glob(".*.tmp-*"):
        shutil.rmtree(leftover, ignore_errors=True)
    done = {}
    for part in plan:
        record = finished_part(work, part)
        if record is not None:
            done[part.index] = record
        elif part_dir(work, part.index).exists():
            log.warning("part %d from an earlier run is unfinished or damaged; encoding it again", part.index)
            shutil.rmtree(part_dir(work, part.index))
    return done


def _link(source: Path, target: Path) -> None:
    """A hard link to `source` at `target` (parts are never changed in place), or a copy where links fail."""
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


def _reuse_published(out_dir: Path, work: Path, plan: list[PartSpec], stamp: dict, done: dict[int, dict]) -> None:
    """Adds to `work` (and `done`) the finished parts of the source at `out_dir` when this same job made it."""
    if not _made_by(out_dir, stamp):
        return
    for part in plan:
        record = None if part.index in done else finished_part(out_dir, part)
        if record is not None:
            final = part_dir(work, part.index)
            tmp = final.with_name(f".{final.name}.tmp-{uuid.uuid4().hex[:8]}")
            tmp.mkdir()
            for name in [*record["files"], PART_JSON]:  # part.json last: a part is whole or absent
                _link(part_dir(out_dir, part.index) / name, tmp / name)
            os.replace(tmp, final)
            done[part.index] = record


def _whole_source(out_dir: Path, plan: list[PartSpec], stamp: dict) -> SourceInfo | None:
    """The source at `out_dir` where this same job made it and every part of it is whole; else None.
    Written again, its indexes would be new files to a build's resume check, which would start over."""
    if not _made_by(out_dir, stamp):
        return None
    try:
        info = read_source(out_dir)
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if not info.parted or info.rows != plan[-1].row_end or any(finished_part(out_dir, p) is None for p in plan):
        return None
    return info


@contextlib.contextmanager
def _quiet_ray_data() -> Iterator[None]:
    """Ray Data without its own progress bars and start-up chatter (the job shows one bar over parts)."""
    from ray.data import DataContext

    ctx = DataContext.get_current()
    saved = (ctx.enable_progress_bars, ctx.print_on_execution_start, ctx.enable_auto_log_stats)
    logger = logging.getLogger("ray.data")
    level = logger.level
    ctx.enable_progress_bars = ctx.print_on_execution_start = ctx.enable_auto_log_stats = False
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        ctx.enable_progress_bars, ctx.print_on_execution_start, ctx.enable_auto_log_stats = saved
        logger.setLevel(level)


def _join_cluster(config: EncodeJobConfig) -> None:
    """Connects to the job's Ray cluster; ValueError where none of its nodes can take a worker and none will
    join (the job started that cluster itself): Ray Data would wait for the workers forever."""
    import ray

    own = connect(config.address)
    if why := no_room_for_a_worker(config, ray.nodes()):
        if own:
            raise ValueError(f"{why}; this job's own cluster takes no other node: ask for less, or give --address "
                             "of a cluster that has one")
        log.warning("%s: the job waits for such a node to join", why)  # an autoscaler may add one


def _encode_parts(config: EncodeJobConfig, out_dir: Path, todo: list[PartSpec], total: int, eos_id: int,
                  encoder_factory) -> None:
    """Maps the parts in `todo` over the actor pool; raises EncodeError naming the first part that failed,
    once every part has ended: no worker is still writing a part when it raises (a rerun that discards the
    parts folder would race it), and every part that could finish is kept for the next run. Workers Ray
    itself loses (out of memory, a node gone) end it at once, the others stopped by Ray Data as the
    dataset is dropped; a part one of them was writing is whole or absent (part.json is written last)."""
    import ray
    import ray.data
    from tqdm.auto import tqdm

    actor_args = {"config": config, "out_dir": str(out_dir.absolute()), "eos_id": eos_id,
                  "encoder_factory": encoder_factory}
    with _quiet_ray_data():
        ds = ray.data.from_items([asdict(p) for p in todo], override_num_blocks=len(todo))
        ds = ds.map_batches(PartEncoder, batch_size=1, fn_constructor_kwargs=actor_args,
                            compute=ray.data.ActorPoolStrategy(size=min(config.workers, len(todo))),
                            num_cpus=config.num_cpus, num_gpus=config.gpus)
        desc = f"encoding {config.kind} parts ({config.workers} worker{'s' if config.workers > 1 else ''})"
        with tqdm(total=total, initial=total - len(todo), unit="part", desc=desc, disable=not config.progress) as bar:
            failed = ""
            try:
                for row in ds.iter_rows():
                    if row["error"]:
                        failed = failed or f"part {row['index']} failed: {row['error']}"
                        continue
                    bar.update(1)
            except ray.exceptions.RayError as err:  # a worker lost (out of memory, its node gone), not a part's error
                first = next((line for line in str(err).splitlines() if line.strip()), type(err).__name__)
                raise EncodeError(f"the encode job's workers failed ({type(err).__name__}: {first.strip()[:300]}); "
                                  f"the parts finished so far are kept in {out_dir / PARTS} for the next "
                                  "run") from None
    if failed:
        raise EncodeError(failed)


def _publish(config: EncodeJobConfig, work: Path, plan: list[PartSpec], records: dict[int, dict],
             store: TokenStore, eos_id: int, seconds: float) -> SourceInfo:
    """Writes the parts indexes and then source.json into the work folder."""
    encoders = {records[p.index]["encoder"] for p in plan}
    if len(encoders) != 1:
        raise EncodeError(f"the parts in {work / PARTS} were encoded by different models {sorted(encoders)}; "
                          f"remove that folder and run again")
    name, plain = PAYLOAD_FILES[config.kind]
    write_parts_index(work / KEYS_PARTS, [part_dir(work, p.index) / KEYS for p in plan])
    write_parts_index(work / f"{name}{PARTS_SUFFIX}", [part_dir(work, p.index) / plain for p in plan])
    first = records[plan[0].index]
    details = {**first["details"], "store": str(store.directory), "seconds": round(seconds, 3), "layout": PARTS_LAYOUT,
               "parts": len(plan), "workers": config.workers,
               "rows_per_part": max(p.row_end - p.row_start for p in plan),  # as planned: kNN-LM's are rounded up
               "part_seconds": round(sum(records[p.index]["seconds"] for p in plan), 3)}
    if config.kind == "knnlm":
        details.update(context_len=config.context_len, stride=config.stride)
    else:
        details.update(eos_id=eos_id)
    info = SourceInfo(work, config.kind, plan[-1].row_end, int(first["dimension"]), store.tokenizer_fingerprint,
                      encoders.pop(), config.chunk_len if config.kind == "retro" else 0, details=details)
    info.write()
    return info


def run_encode_job(config: EncodeJobConfig, out_dir: Path,
                   encoder_factory: Callable[..., Encoder] | None = None) -> SourceInfo:
    """Encodes a datastore source in parts on a pool of Ray Data actors (see the module doc).

    Keys equal those of `encode_knnlm` / `encode_retro` with the same parameters up to float
    rounding, payloads exactly; parts an earlier run of the same job finished are kept.

    Args:
        config: what to encode and with how many workers.
        out_dir: the source directory (created; an earlier source there is replaced once the new one
            is whole, and the folder's other files are kept; finished parts of the same job are reused).
        encoder_factory: RETRO: `factory(tokenizer) -> encoder` called once in each actor, for an
            encoder other than the MiniLM `ChunkEncoder` (it must pickle). Finished parts are kept for
            a factory of the same `factory_identity`.

    Returns:
        The source's `SourceInfo` (`parted` is true).

    Raises:
        ValueError, FileNotFoundError: a bad config, missing inputs, a split of another tokenizer than
            DATA/tokenizer.json, or an `out_dir` holding files but no source (before any work starts); a
            worker no node of the job's own Ray cluster can take (before anything is written).
        EncodeError: a part failed (finished parts stay in the work folder for the next run; `out_dir`
            is as it was).

    Example:
        >>> run_encode_job(EncodeJobConfig(kind="knnlm", data=Path("run/data"), checkpoint=Path("run/lm"),
        ...                                workers=2), Path("run/knnlm-source"))
    """
    check_config(config)
    if config.kind == "retro" and config.encoder == "lm" and encoder_factory is None:
        check_lm_chunk_len(config.chunk_len, Path(config.checkpoint))
    started = time.time()
    config = _absolute(config)
    store = TokenStore.open(Path(config.data) / config.split)
    tokenizer = Tokenizer.load(Path(config.data) / "tokenizer.json")  # the one the model and encoder take
    if tokenizer.fingerprint != store.tokenizer_fingerprint:
        raise ValueError(f"{store.directory} was tokenized with {store.tokenizer_fingerprint}, "
                         f"not {tokenizer.fingerprint}")
    plan = plan_parts(config, len(store))
    eos_id = int(store.tokens[-1])
    stamp = job_stamp(config, store, plan, eos_id, encoder_factory)
    with _held(out_dir):
        check_out(out_dir)  # under the lock: it may finish another job's interrupted swap of the folder
        return _run(config, out_dir, store, plan, eos_id, stamp, encoder_factory, started)


def _held(out_dir: Path):
    """The lock of the encodes of `out_dir` (`encode_lock`): a second job, or an in-process encode, on the
    same output would clear the first one's parts while it writes them, or swap its output meanwhile."""
    return encode_lock(out_dir, EncodeError)


def _run(config: EncodeJobConfig, out_dir: Path, store: TokenStore, plan: list[PartSpec], eos_id: int,
         stamp: dict, encoder_factory, started: float) -> SourceInfo:
    """The job, once its checks are done and its lock is held."""
    if (whole := _whole_source(out_dir, plan, stamp)) is not None:
        log.info("%s holds this job's whole source: kept as it is", out_dir)
        return whole
    work = job_work_dir(out_dir)
    sources = [folder for folder in (work, out_dir) if _made_by(folder, stamp)]  # what a part may be kept from
    if any(all(finished_part(folder, p) is None for folder in sources) for p in plan):
        _join_cluster(config)  # parts to encode: the cluster first, and a worker it cannot take is refused
    work.mkdir(parents=True, exist_ok=True)  # every check done: the first write, beside out_dir
    (work / SOURCE_JSON).unlink(missing_ok=True)  # what a run killed while publishing left
    records = _keep_finished(work, plan, stamp)
    _reuse_published(out_dir, work, plan, stamp, records)
    if records:
        log.info("keeping %d of %d parts from an earlier run", len(records), len(plan))
    todo = [p for p in plan if p.index not in records]
    if todo:
        _encode_parts(config, work, todo, len(plan), eos_id, encoder_factory)
        records.update({p.index: finished_part(work, p) for p in todo})
    missing = [i for i, r in records.items() if r is None]
    if missing:
        raise EncodeError(f"parts {missing} were reported done but are not whole in {work / PARTS}")
    info = _publish(config, work, plan, records, store, eos_id, time.time() - started)
    replace_source(work, out_dir)
    log.info("%s source %s: %d rows of dimension %d in %d parts", config.kind, out_dir, info.rows, info.dimension,
             len(plan))
    return replace(info, directory=Path(out_dir))

