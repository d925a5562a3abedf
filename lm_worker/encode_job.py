"""The encode job: a kNN-LM or RETRO datastore source written in parts by Ray Data actors.

The driver splits the rows into parts (kNN-LM: runs of whole sliding windows, RETRO: runs of
chunks), and Ray Data maps the parts over a pool of actors that each load the model once (one GPU
each where there are GPUs). An actor computes its part's rows with the same code as the in-process
loop (`encode_knnlm`, `encode_retro`), writes them to a temporary folder and renames it to
`parts/NNNNN/` with `part.json` inside, so a part on disk is whole or absent. When every part is
there the driver writes the parts indexes and, last, source.json:

    OUT/parts/job.json                 what the parts were planned from (a change discards them)
    OUT/parts/00000/keys.npy           float32 (rows, d), rows [row_start, row_end) of the source
    OUT/parts/00000/values.npy         int32 (rows,), or tokens.npy int32 (rows, 2L) for RETRO
    OUT/parts/00000/part.json          its rows, encoder fingerprint, node and seconds; written last
    OUT/keys.parts.json, OUT/values.parts.json (or tokens.parts.json), OUT/source.json

Run again after a failure or a kill, the job keeps every finished part and encodes the rest. The
folder must be reachable at the same path from every node (a shared file system on a cluster).
`retriever-server build` and `build_source` read the parts indexes as they read .npy files.

Example:
    >>> config = EncodeJobConfig(kind="retro", data=Path("run/data"), chunk_len=16, workers=2)
    >>> info = run_encode_job(config, Path("run/retro-source"))
    >>> build_source(info.directory, Path("run/retro-datastore"))
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np

from lm_worker.encode import (
    KEYS,
    KEYS_PARTS,
    PARTS_LAYOUT,
    PAYLOAD_FILES,
    Encoder,
    SourceInfo,
    chunk_payload,
    encoder_details,
    knn_windows,
    start_source,
    window_keys,
)
from lm_worker.retro_encoders import ENCODERS
from lm_worker.token_store import TokenStore
from retriever_server.ray_connect import connect
from retriever_server.row_parts import PARTS_SUFFIX, write_parts_index

log = logging.getLogger(__name__)

PARTS = "parts"
PART_JSON = "part.json"
JOB_JSON = "job.json"
DEFAULT_ROWS_PER_PART = {"knnlm": 65536, "retro": 4096}
DEFAULT_BATCH = {"knnlm": 16, "retro": 1024}  # windows / chunks per forward, as the in-process loop


class EncodeError(RuntimeError):
    """A part could not be encoded, or the parts on disk disagree; the message says which and why."""


@dataclass(frozen=True)
class EncodeJobConfig:
    """What the encode job encodes, and on how many actors.

    Attributes:
        kind: "knnlm" (keys of an LM at every position) or "retro" (chunk embeddings).
        data: a prepared corpus (`lm-worker prepare`): tokenizer.json and one folder per split.
        split: the split to encode.
        checkpoint: the base LM (a checkpoint file or folder; kNN-LM: or a Hugging Face folder); for
            RETRO only with encoder "lm".
        encoder: RETRO: the frozen chunk encoder, "minilm" or "lm" (see `lm_worker.retro_encoders`).
        chunk_len: RETRO: tokens per chunk.
        context_len, stride: kNN-LM: the sliding windows (see `knn_windows`).
        rows_per_part: rows per part (kNN-LM parts hold whole windows, so about this many);
            0: 65536 (kNN-LM) or 4096 (RETRO).
        workers: actors in the pool, each holding the model.
        batch_size: windows (kNN-LM) or chunks (RETRO) per forward; 0: 16 or 1024.
        device: "cpu" or "cuda" (each actor then gets `num_gpus` of a GPU).
        num_gpus: GPUs per actor; None: 1 on "cuda", 0 on "cpu".
        num_cpus: CPUs per actor.
        threads: torch threads per actor; 0: num_cpus (at least 1).
        address: the Ray cluster; None joins RAY_ADDRESS when set (as under `ray job submit`),
            else starts a local cluster.
        progress: show a progress bar over parts.
    """

    kind: str
    data: Path
    split: str = "train"
    checkpoint: Path | None = None
    encoder: str = "minilm"
    chunk_len: int = 16
    context_len: int = 256
    stride: int = 128
    rows_per_part: int = 0
    workers: int = 1
    batch_size: int = 0
    device: str = "cpu"
    num_gpus: float | None = None
    num_cpus: float = 1.0
    threads: int = 0
    address: str | None = None
    progress: bool = True

    @property
    def part_rows(self) -> int:
        return self.rows_per_part or DEFAULT_ROWS_PER_PART[self.kind]

    @property
    def batch(self) -> int:
        return self.batch_size or DEFAULT_BATCH[self.kind]

    @property
    def gpus(self) -> float:
        return self.num_gpus if self.num_gpus is not None else float(self.device.startswith("cuda"))

    @property
    def torch_threads(self) -> int:
        return self.threads or max(1, int(self.num_cpus))


@dataclass(frozen=True)
class PartSpec:
    """Part `index`: windows or chunks [first, last), which give source rows [row_start, row_end)."""

    index: int
    first: int
    last: int
    row_start: int
    row_end: int


def check_config(config: EncodeJobConfig) -> None:
    """Raises ValueError (naming the field) or FileNotFoundError for a config the job cannot run."""
    if config.kind not in PAYLOAD_FILES:
        raise ValueError(f"kind must be one of {sorted(PAYLOAD_FILES)}, got {config.kind!r}")
    for name, least in (("workers", 1), ("chunk_len", 1), ("context_len", 1), ("rows_per_part", 0),
                        ("batch_size", 0), ("threads", 0)):
        if getattr(config, name) < least:
            raise ValueError(f"{name} must be >= {least}, got {getattr(config, name)}")
    if config.num_cpus <= 0 or config.gpus < 0:
        raise ValueError(f"num_cpus must be > 0 and num_gpus >= 0, got {config.num_cpus} and {config.gpus}")
    if config.device.startswith("cuda") and config.gpus == 0:
        raise ValueError(f"device {config.device!r} needs num_gpus > 0 per worker")
    if config.encoder not in ENCODERS:
        raise ValueError(f"encoder must be one of {ENCODERS}, got {config.encoder!r}")
    if config.kind == "knnlm" or config.encoder == "lm":
        if config.checkpoint is None:
            what = "a kNN-LM source" if config.kind == "knnlm" else "a RETRO source with encoder 'lm'"
            raise ValueError(f"checkpoint is required for {what}")
        if not Path(config.checkpoint).exists():
            raise FileNotFoundError(f"checkpoint {config.checkpoint} not found")
    if config.kind == "retro" and not (Path(config.data) / "tokenizer.json").is_file():
        raise FileNotFoundError(f"{config.data} holds no tokenizer.json (run lm-worker prepare)")


def plan_parts(config: EncodeJobConfig, n_tokens: int) -> list[PartSpec]:
    """The parts of a stream of `n_tokens` tokens, in row order; together they cover every row once.

    Raises:
        ValueError: a stream too short for one row, or a stride outside [1, context_len].
    """
    if config.kind == "retro":
        C = n_tokens // config.chunk_len
        if C == 0:
            raise ValueError(f"the {config.split} split has {n_tokens} tokens: no complete chunk of {config.chunk_len}")
        step = config.part_rows
        return [PartSpec(i, a, min(C, a + step), a, min(C, a + step)) for i, a in enumerate(range(0, C, step))]
    n = n_tokens - 1
    if n < 1:
        raise ValueError(f"the {config.split} split has {n_tokens} tokens; a kNN-LM source needs at least 2")
    windows = knn_windows(n, config.context_len, config.stride)
    per_part = -(-max(1, config.part_rows // config.stride) // config.batch) * config.batch  # whole batches
    bounds = [(a, min(len(windows), a + per_part)) for a in range(0, len(windows), per_part)]
    return [PartSpec(i, a, z, windows[a][1], windows[z - 1][2]) for i, (a, z) in enumerate(bounds)]


# ---------------------------------------------------------------------------------------------- actors


class _KnnlmRows:
    """Loads the LM once; gives the keys and next-token values of a part's windows."""

    def __init__(self, config: EncodeJobConfig, store: TokenStore):
        from lm_worker.checkpoint import load_checkpoint
        from lm_worker.encode import describe_model, model_fingerprint

        self.model = load_checkpoint(Path(config.checkpoint), config.device).model.eval()
        max_len = getattr(getattr(self.model, "config", None), "max_len", None)
        if isinstance(max_len, int) and config.context_len > max_len:
            raise ValueError(f"context_len {config.context_len} exceeds the model's max_len {max_len}")
        self.config, self.tokens = config, store.tokens
        self.windows = knn_windows(len(store) - 1, config.context_len, config.stride)
        self.fingerprint = model_fingerprint(self.model)
        self.details = {"model": describe_model(self.model)}

    def rows(self, part: PartSpec) -> tuple[np.ndarray, np.ndarray]:
        windows, b = self.windows[part.first:part.last], self.config.batch
        keys = np.concatenate([window_keys(self.model, self.tokens, windows[i:i + b], self.config.device)
                               for i in range(0, len(windows), b)])  # (rows, d)
        values = np.asarray(self.tokens[part.row_start + 1:part.row_end + 1], dtype=np.int32)  # (rows,)
        return keys, values


class _RetroRows:
    """Builds the chunk encoder once; gives the embeddings and chunk + continuation tokens of a part."""

    def __init__(self, config: EncodeJobConfig, store: TokenStore, eos_id: int,
                 encoder_factory: Callable[..., Encoder] | None):
        from lm_worker.tokenizer import Tokenizer

        tokenizer = Tokenizer.load(Path(config.data) / "tokenizer.json")
        if encoder_factory is None:
            from lm_worker.retro_encoders import make_chunk_encoder

            self.encoder = make_chunk_encoder(config.encoder, tokenizer, config.checkpoint,
                                              threads=config.torch_threads, device=config.device)
        else:
            self.encoder = encoder_factory(tokenizer)
        self.config, self.tokens, self.eos_id = config, store.tokens, eos_id
        self.fingerprint = self.encoder.fingerprint
        self.details = encoder_details(self.encoder)

    def rows(self, part: PartSpec) -> tuple[np.ndarray, np.ndarray]:
        L, b = self.config.chunk_len, self.config.batch
        keys = np.empty((part.last - part.first, self.encoder.dimension), dtype=np.float32)  # (rows, dim)
        for a in range(part.first, part.last, b):
            z = min(part.last, a + b)
            keys[a - part.first:z - part.first] = self.encoder.embed(
                np.asarray(self.tokens[a * L:z * L]).reshape(z - a, L))
        return keys, chunk_payload(self.tokens, part.first, part.last, L, self.eos_id)


def _save_synced(path: Path, write: Callable) -> int:
    """Writes a file with `write(file)` and syncs it to disk; returns its size."""
    with open(path, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    return path.stat().st_size


def _write_part(out_dir: Path, part: PartSpec, keys: np.ndarray, payload_name: str, payload: np.ndarray,
                record: dict) -> None:
    """Writes a part's arrays and, last, its part.json into a temporary folder, then renames it into place."""
    final = part_dir(out_dir, part.index)
    tmp = final.with_name(f".{final.name}.tmp-{uuid.uuid4().hex[:8]}")
    tmp.mkdir(parents=True)
    files = {name: _save_synced(tmp / name, lambda f, a=array: np.save(f, a))
             for name, array in ((KEYS, keys), (f"{payload_name}.npy", payload))}
    body = json.dumps({**asdict(part), "dimension": int(keys.shape[1]), "files": files, **record}).encode()
    _save_synced(tmp / PART_JSON, lambda f: f.write(body))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)


class PartEncoder:
    """A Ray Data actor: holds the model, and per call encodes and writes the one part in its batch.

    Failures come back as an "error" string (the driver raises `EncodeError` naming the part), so a
    bad checkpoint or a too-long context is one clear line rather than a remote traceback.
    """

    def __init__(self, config: EncodeJobConfig, out_dir: str, eos_id: int,
                 encoder_factory: Callable[..., Encoder] | None = None):
        import torch

        torch.set_num_threads(config.torch_threads)
        self.out_dir, self.payload_name = Path(out_dir), PAYLOAD_FILES[config.kind][0]
        self.error = ""
        try:
            store = TokenStore.open(Path(config.data) / config.split)
            self.encoder = (_KnnlmRows(config, store) if config.kind == "knnlm"
                            else _RetroRows(config, store, eos_id, encoder_factory))
        except Exception as err:  # reported per part by __call__
            log.exception("the encoder of this worker could not be loaded")
            self.error = f"{type(err).__name__}: {err}"

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import ray

        part = PartSpec(**{name: int(batch[name][0]) for name in PartSpec.__dataclass_fields__})
        error = self.error
        if not error:
            try:
                started = time.time()
                keys, payload = self.encoder.rows(part)
                record = {"encoder": self.encoder.fingerprint, "details": self.encoder.details,
                          "node": ray.get_runtime_context().get_node_id(), "seconds": round(time.time() - started, 3)}
                _write_part(self.out_dir, part, keys, self.payload_name, payload, record)
            except Exception as err:
                log.exception("part %d failed", part.index)
                error = f"{type(err).__name__}: {err}"
        return {"index": np.array([part.index]), "error": np.array([error])}


# ---------------------------------------------------------------------------------------------- driver


def part_dir(out_dir: Path, index: int) -> Path:
    """The folder of part `index` of the source at `out_dir`."""
    return Path(out_dir) / PARTS / f"{index:05d}"


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


def _job_stamp(config: EncodeJobConfig, store: TokenStore, plan: list[PartSpec], eos_id: int,
               encoder_factory) -> dict:
    """What finished parts must share with this run to be kept."""
    if config.kind == "knnlm" or (config.encoder == "lm" and encoder_factory is None):
        path = Path(config.checkpoint).resolve()
        files = [path / n for n in sorted(os.listdir(path))] if path.is_dir() else [path]
        model = {str(f): [f.stat().st_size, f.stat().st_mtime_ns] for f in files if f.is_file()}
    else:
        from lm_worker.chunk_encoder import ChunkEncoder

        factory = encoder_factory or ChunkEncoder  # its name only: parts record the fingerprint of what ran
        model = getattr(factory, "__qualname__", None) or type(factory).__qualname__
    stamp = {"kind": config.kind, "store": str(store.directory.resolve()), "tokens": len(store),
             "tokenizer": store.tokenizer_fingerprint, "model": model, "eos_id": eos_id,
             "windows": [config.context_len, config.stride] if config.kind == "knnlm" else None,
             "chunk_len": config.chunk_len if config.kind == "retro" else None,
             "plan": [[p.first, p.last, p.row_start, p.row_end] for p in plan]}
    return json.loads(json.dumps(stamp))


def _absolute(config: EncodeJobConfig) -> EncodeJobConfig:
    """The config with absolute paths, as the actors see them whatever their working directory."""
    checkpoint = None if config.checkpoint is None else Path(config.checkpoint).absolute()
    return replace(config, data=Path(config.data).absolute(), checkpoint=checkpoint)


def _keep_finished(out_dir: Path, plan: list[PartSpec], stamp: dict) -> dict[int, dict]:
    """Keeps the finished parts of an earlier run of this same job; clears everything else in parts/."""
    parts = out_dir / PARTS
    if parts.exists() and _read_json(parts / JOB_JSON) != stamp:
        if any(parts.iterdir()):
            log.warning("discarding %s: parts of a different job (inputs, model or plan changed)", parts)
        shutil.rmtree(parts)
    parts.mkdir(parents=True, exist_ok=True)
    (parts / JOB_JSON).write_text(json.dumps(stamp))
    for leftover in parts.glob(".*.tmp-*"):
        shutil.rmtree(leftover, ignore_errors=True)
    done = {}
    for part in plan:
        record = finished_part(out_dir, part)
        if record is not None:
            done[part.index] = record
        elif part_dir(out_dir, part.index).exists():
            log.warning("part %d from an earlier run is unfinished or damaged; encoding it again", part.index)
            shutil.rmtree(part_dir(out_dir, part.index))
    if done:
        log.info("keeping %d of %d parts from an earlier run", len(done), len(plan))
    return done


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


def _encode_parts(config: EncodeJobConfig, out_dir: Path, todo: list[PartSpec], total: int, eos_id: int,
                  encoder_factory) -> None:
    """Maps the parts in `todo` over the actor pool; raises EncodeError on the first part that fails."""
    import ray
    import ray.data
    from tqdm.auto import tqdm

    connect(config.address)
    actor_args = {"config": config, "out_dir": str(out_dir.absolute()), "eos_id": eos_id,
                  "encoder_factory": encoder_factory}
    with _quiet_ray_data():
        ds = ray.data.from_items([asdict(p) for p in todo], override_num_blocks=len(todo))
        ds = ds.map_batches(PartEncoder, batch_size=1, fn_constructor_kwargs=actor_args,
                            compute=ray.data.ActorPoolStrategy(size=min(config.workers, len(todo))),
                            num_cpus=config.num_cpus, num_gpus=config.gpus)
        desc = f"encoding {config.kind} parts ({config.workers} worker{'s' if config.workers > 1 else ''})"
        with tqdm(total=total, initial=total - len(todo), unit="part", desc=desc, disable=not config.progress) as bar:
            for row in ds.iter_rows():
                if row["error"]:
                    raise EncodeError(f"part {row['index']} failed: {row['error']}")
                bar.update(1)


def _publish(config: EncodeJobConfig, out_dir: Path, plan: list[PartSpec], records: dict[int, dict],
             store: TokenStore, eos_id: int, seconds: float) -> SourceInfo:
    """Writes the parts indexes and then source.json; removes plain arrays a plain-loop run left there."""
    encoders = {records[p.index]["encoder"] for p in plan}
    if len(encoders) != 1:
        raise EncodeError(f"the parts in {out_dir / PARTS} were encoded by different models {sorted(encoders)}; "
                          f"remove that folder and run again")
    name, plain = PAYLOAD_FILES[config.kind]
    write_parts_index(out_dir / KEYS_PARTS, [part_dir(out_dir, p.index) / KEYS for p in plan])
    write_parts_index(out_dir / f"{name}{PARTS_SUFFIX}", [part_dir(out_dir, p.index) / plain for p in plan])
    for stale in (KEYS, plain):
        (out_dir / stale).unlink(missing_ok=True)
    first = records[plan[0].index]
    details = {**first["details"], "store": str(store.directory), "seconds": round(seconds, 3), "layout": PARTS_LAYOUT,
               "parts": len(plan), "rows_per_part": config.part_rows, "workers": config.workers,
               "part_seconds": round(sum(records[p.index]["seconds"] for p in plan), 3)}
    if config.kind == "knnlm":
        details.update(context_len=config.context_len, stride=config.stride)
    else:
        details.update(eos_id=eos_id)
    info = SourceInfo(out_dir, config.kind, plan[-1].row_end, int(first["dimension"]), store.tokenizer_fingerprint,
                      encoders.pop(), config.chunk_len if config.kind == "retro" else 0, details=details)
    info.write()
    log.info("%s source %s: %d rows of dimension %d in %d parts", config.kind, out_dir, info.rows, info.dimension,
             len(plan))
    return info


def run_encode_job(config: EncodeJobConfig, out_dir: Path,
                   encoder_factory: Callable[..., Encoder] | None = None) -> SourceInfo:
    """Encodes a datastore source in parts on a pool of Ray Data actors (see the module doc).

    Keys equal those of `encode_knnlm` / `encode_retro` with the same parameters up to float
    rounding, payloads exactly; parts an earlier run of the same job finished are kept.

    Args:
        config: what to encode and with how many workers.
        out_dir: the source directory (created; finished parts of the same job are reused).
        encoder_factory: RETRO: `factory(tokenizer) -> encoder` called once in each actor, for an
            encoder other than the MiniLM `ChunkEncoder` (it must pickle).

    Returns:
        The source's `SourceInfo` (`parted` is true).

    Raises:
        ValueError, FileNotFoundError: a bad config or missing inputs (before any work starts).
        EncodeError: a part failed (finished parts stay on disk for the next run).

    Example:
        >>> run_encode_job(EncodeJobConfig(kind="knnlm", data=Path("run/data"), checkpoint=Path("run/lm"),
        ...                                workers=2), Path("run/knnlm-source"))
    """
    check_config(config)
    started = time.time()
    config = _absolute(config)
    store = TokenStore.open(Path(config.data) / config.split)
    if config.kind == "retro":
        from lm_worker.tokenizer import Tokenizer

        tokenizer = Tokenizer.load(Path(config.data) / "tokenizer.json")
        if tokenizer.fingerprint != store.tokenizer_fingerprint:
            raise ValueError(f"{store.directory} was tokenized with {store.tokenizer_fingerprint}, "
                             f"not {tokenizer.fingerprint}")
    plan = plan_parts(config, len(store))
    eos_id = int(store.tokens[-1])
    out_dir = start_source(out_dir)
    records = _keep_finished(out_dir, plan, _job_stamp(config, store, plan, eos_id, encoder_factory))
    todo = [p for p in plan if p.index not in records]
    if todo:
        _encode_parts(config, out_dir, todo, len(plan), eos_id, encoder_factory)
        records.update({p.index: finished_part(out_dir, p) for p in todo})
    missing = [i for i, r in records.items() if r is None]
    if missing:
        raise EncodeError(f"parts {missing} were reported done but are not whole in {out_dir / PARTS}")
    return _publish(config, out_dir, plan, records, store, eos_id, time.time() - started)
