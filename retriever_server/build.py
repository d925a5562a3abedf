"""The build job: train the codec once, fill S shards in parallel as Ray tasks, publish atomically.

The build works in `.<name>.partial` beside the output directory. Each finished step leaves a marker
there (the trained codec, then each shard, renamed into place when whole), so a build that dies can
be run again and picks up where it stopped. The datastore appears under its own name only once the
manifest is written, by one rename: a server never sees half a datastore.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import faiss
import numpy as np
import ray
from tqdm.auto import tqdm

from retriever_server import index as ix
from retriever_server.manifest import (
    FileEntry,
    Manifest,
    PayloadSpec,
    ShardEntry,
    describe_files,
    shard_name,
    write_manifest,
)

log = logging.getLogger(__name__)
TRAINED = "trained.index"
DONE = ".done.json"
FAULT_ENV = "RETRIEVER_SERVER_FAULT_KILL_AFTER_SHARDS"  # test hook: SIGKILL the build after N shards


class BuildError(Exception):
    """The build cannot run with these inputs or failed; the message says which and why."""


@dataclass(frozen=True)
class BuildConfig:
    """What to build. `keys` is an (N, d) .npy matrix; each payload an .npy with N rows."""

    keys: Path
    out: Path
    payloads: dict[str, Path] = field(default_factory=dict)
    factory: str = "auto"
    metric: str = "l2"
    shards: int = 2
    seed: int = 0
    train_size: int = 0  # 0: as many as the factory needs
    keep_keys: bool = False
    add_block: int = 32768
    cpus_per_shard: int = 1
    overwrite: bool = False
    metadata: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class _Inputs:
    n: int
    d: int
    factory: str
    payloads: tuple[PayloadSpec, ...]


def _check_inputs(config: BuildConfig) -> _Inputs:
    if not config.keys.is_file():
        raise BuildError(f"keys file {config.keys} not found")
    try:
        keys = np.load(config.keys, mmap_mode="r")
    except ValueError as err:
        raise BuildError(f"keys file {config.keys} is not a .npy array: {err}") from None
    if keys.ndim != 2 or keys.dtype.kind != "f" or keys.shape[0] == 0:
        raise BuildError(f"keys file {config.keys} must be a non-empty float (N, d) matrix, "
                         f"got {keys.dtype} {keys.shape}")
    n, d = keys.shape
    if not 1 <= config.shards <= n:
        raise BuildError(f"--shards must be in [1, {n}] for {n} rows, got {config.shards}")
    try:
        metric = ix.canonical_metric(config.metric)
        factory = ix.resolve_factory(config.factory, n, d)
        ix.check_factory(factory, d, metric)
    except ValueError as err:
        raise BuildError(str(err)) from None
    specs = []
    for name, path in sorted(config.payloads.items()):
        if not path.is_file():
            raise BuildError(f"payload {name!r} file {path} not found")
        arr = np.load(path, mmap_mode="r")
        if arr.ndim < 1 or arr.shape[0] != n:
            raise BuildError(f"payload {name!r} ({path}) has shape {arr.shape}; its first dimension must be {n}")
        specs.append(PayloadSpec(name, arr.dtype.str, tuple(int(s) for s in arr.shape[1:])))
    return _Inputs(n, d, factory, tuple(specs))


def _fingerprint(config: BuildConfig, inputs: _Inputs) -> dict:
    """What a resumed build must share with the one it resumes."""
    files = [config.keys, *config.payloads.values()]
    stamp = {str(p): [p.stat().st_size, p.stat().st_mtime_ns] for p in files}
    body = {k: v for k, v in asdict(config).items() if k not in ("overwrite", "out")}
    return json.loads(json.dumps({**body, "factory": inputs.factory, "inputs": stamp}, default=str))


def _prepare_workdir(config: BuildConfig, inputs: _Inputs) -> Path:
    work = config.out.parent / f".{config.out.name}.partial"
    fingerprint = _fingerprint(config, inputs)
    marker = work / "build.json"
    if work.exists() and (not marker.is_file() or json.loads(marker.read_text()) != fingerprint):
        log.warning("discarding an unfinished build at %s made with other inputs or parameters", work)
        shutil.rmtree(work)
    if work.exists():
        log.info("resuming the unfinished build at %s", work)
    work.mkdir(parents=True, exist_ok=True)
    marker.write_text(json.dumps(fingerprint, indent=2))
    return work


def _train(config: BuildConfig, inputs: _Inputs, work: Path) -> Path:
    path = work / TRAINED
    if path.is_file():
        log.info("reusing the trained codec at %s", path)
        return path
    metric = ix.canonical_metric(config.metric)
    size = config.train_size or ix.train_size_for(inputs.factory, inputs.d, metric)
    size = min(size, inputs.n)
    rng = np.random.default_rng(config.seed)
    rows = np.sort(rng.choice(inputs.n, size=size, replace=False))
    sample = np.asarray(np.load(config.keys, mmap_mode="r")[rows], dtype=np.float32)
    index = ix.new_trained_index(inputs.factory, metric, sample, config.seed)
    ix.write_index(index, path)
    return path


@ray.remote
class _Progress:
    def __init__(self):
        self.rows = 0

    def add(self, n: int) -> None:
        self.rows += n

    def total(self) -> int:
        return self.rows


def _copy_rows(src: np.ndarray, dst_path: Path, start: int, end: int, block: int, dtype=None) -> None:
    out = np.lib.format.open_memmap(dst_path, mode="w+", dtype=dtype or src.dtype,
                                    shape=(end - start, *src.shape[1:]))
    for s in range(start, end, block):
        e = min(end, s + block)
        out[s - start:e - start] = src[s:e]
    out.flush()
    del out


@ray.remote
def _build_shard(config: BuildConfig, trained: str, shard_dir: str, start: int, end: int, progress) -> dict:
    """Adds rows [start, end) to a copy of the trained codec and writes the shard directory."""
    faiss.omp_set_num_threads(max(1, config.cpus_per_shard))
    final = Path(shard_dir)
    tmp = final.with_name(final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    keys = np.load(config.keys, mmap_mode="r")
    index = faiss.read_index(trained)
    for s in range(start, end, config.add_block):
        e = min(end, s + config.add_block)
        index.add_with_ids(np.ascontiguousarray(keys[s:e], dtype=np.float32), np.arange(s, e, dtype=np.int64))
        progress.add.remote(e - s)
    ix.write_index(index, tmp / "index.faiss")
    if config.keep_keys:
        _copy_rows(keys, tmp / "keys.npy", start, end, config.add_block, np.float16)
    for name, path in config.payloads.items():
        _copy_rows(np.load(path, mmap_mode="r"), tmp / f"payload.{name}.npy", start, end, config.add_block)
    files = {k: asdict(v) for k, v in describe_files(tmp).items()}
    entry = {"name": final.name, "id_start": start, "id_end": end, "files": files}
    (tmp / DONE).write_text(json.dumps(entry))
    os.replace(tmp, final)
    return entry


def _shard_ranges(n: int, shards: int) -> list[tuple[int, int]]:
    bounds = np.linspace(0, n, shards + 1).astype(np.int64)
    return [(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:])]


def _fill_shards(config: BuildConfig, inputs: _Inputs, work: Path, trained: Path, progress: bool) -> list[dict]:
    entries: dict[int, dict] = {}
    pending = {}
    counter = _Progress.remote()
    remaining = 0
    for i, (start, end) in enumerate(_shard_ranges(inputs.n, config.shards)):
        done = work / shard_name(i) / DONE
        if done.is_file():
            entries[i] = json.loads(done.read_text())
            continue
        remaining += end - start
        task = _build_shard.options(num_cpus=config.cpus_per_shard)
        pending[task.remote(config, str(trained), str(work / shard_name(i)), start, end, counter)] = i
    kill_after = int(os.environ.get(FAULT_ENV, "0"))
    with tqdm(total=remaining, unit="rows", desc="adding to shards", disable=not progress) as bar:
        while pending:
            ready, _ = ray.wait(list(pending), timeout=0.5)
            for ref in ready:
                i = pending.pop(ref)
                try:
                    entries[i] = ray.get(ref)
                except ray.exceptions.RayError as err:
                    raise BuildError(f"{shard_name(i)} failed: {err}") from None
                log.info("%s written (%d rows)", shard_name(i), entries[i]["id_end"] - entries[i]["id_start"])
                if kill_after and len(entries) >= kill_after:
                    os.kill(os.getpid(), signal.SIGKILL)
            bar.update(ray.get(counter.total.remote()) - bar.n)
    ray.kill(counter)
    return [entries[i] for i in range(config.shards)]


def _publish(config: BuildConfig, work: Path, manifest: Manifest) -> None:
    for stale in ("build.json", TRAINED):
        (work / stale).unlink(missing_ok=True)
    write_manifest(work, manifest)
    old = config.out.parent / f".{config.out.name}.old"
    if config.out.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(config.out, old)
    os.replace(work, config.out)
    shutil.rmtree(old, ignore_errors=True)


def _check_output(config: BuildConfig) -> None:
    if config.out.exists() and not config.overwrite:
        raise BuildError(f"{config.out} already exists; pass --overwrite to replace it")
    if config.out.exists() and not (config.out / "manifest.json").is_file():
        raise BuildError(f"{config.out} exists and is not a datastore; refusing to replace it")


def build_datastore(config: BuildConfig, address: str | None = None, num_cpus: int | None = None,
                    progress: bool = True) -> Manifest:
    """Builds a sharded datastore from an (N, d) .npy matrix and publishes it at `config.out`.

    Args:
        config: inputs, index and shard parameters.
        address: a Ray cluster to run on; None starts (or reuses) a local one.
        num_cpus: CPUs of the local Ray cluster when one is started.
        progress: show progress bars.

    Returns:
        The manifest of the published datastore.

    Raises:
        BuildError: bad inputs, an existing output without `overwrite`, or a failed shard.

    Example:
        >>> build_datastore(BuildConfig(keys=Path("keys.npy"), out=Path("ds"), shards=2))
    """
    _check_output(config)
    inputs = _check_inputs(config)
    if not ray.is_initialized():
        ray.init(address=address, num_cpus=None if address else num_cpus, include_dashboard=False,
                 logging_level=logging.WARNING)
    started = time.time()
    work = _prepare_workdir(config, inputs)
    trained = _train(config, inputs, work)
    nlist = ix.nlist_of(faiss.read_index(str(trained)))
    entries = _fill_shards(config, inputs, work, trained, progress)
    shards = tuple(
        ShardEntry(e["name"], e["id_start"], e["id_end"], {k: FileEntry(**v) for k, v in e["files"].items()})
        for e in entries
    )
    manifest = Manifest(
        dimension=inputs.d, metric=ix.canonical_metric(config.metric), factory=inputs.factory,
        ntotal=inputs.n, nlist=nlist, default_nprobe=ix.default_nprobe(nlist), has_keys=config.keep_keys,
        payloads=inputs.payloads, shards=shards, metadata=dict(config.metadata),
        build={"seed": config.seed, "train_size": config.train_size, "keys": str(config.keys),
               "faiss": faiss.__version__, "seconds": round(time.time() - started, 3)},
    )
    _publish(config, work, manifest)
    log.info("published datastore %s (version %s, %d rows, %d shards)", config.out, manifest.version,
             inputs.n, config.shards)
    return manifest
