"""The build job: train the codec once, fill S shards in parallel as Ray tasks, publish atomically.

The build works in `.<name>.partial` beside the output directory. Each finished step leaves a marker
there (the trained codec, then each shard, renamed into place when whole), so a build that dies can
be run again and picks up where it stopped. The datastore appears under its own name only once the
manifest is written, by one atomic rename (or exchange, when it replaces an older datastore): a
server never sees half a datastore, nor no datastore at all.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import faiss
import numpy as np
import ray
from tqdm.auto import tqdm

from retriever_server.cluster.connect import connect, free_resources
from retriever_server.datastore import index as ix
from retriever_server.datastore.build_inputs import (
    BuildConfig,
    BuildError,
    BuildInputs,
    absolute_paths,
    as_build_error,
    check_disk,
    check_inputs,
    check_inputs_outside,
    check_key_rows,
    last_line,
)
from retriever_server.datastore.manifest import (
    FileEntry,
    Manifest,
    ShardEntry,
    describe_files,
    file_sha256,
    fsync_directory,
    shard_name,
    write_manifest,
)
from retriever_server.datastore.publish import check_output, fsync_tree, output_held, replace_directory
from retriever_server.datastore.resume import (
    DONE,
    MARKER,
    STOP,
    TRAINED,
    check_inputs_unchanged,
    drop_codec,
    prepare_workdir,
    reusable_codec,
    reusable_shard,
)
from retriever_server.datastore.row_parts import PartedArray, open_rows
from retriever_server.datastore.shard_fill import add_rows

log = logging.getLogger(__name__)
STALL_S = 300.0  # how long shard tasks may wait for a node with room for one before the build gives up
STALL_REPORT_S = 30.0  # how often the build says that it waits for such a node
STOP_WAIT_S = 120.0  # how long a failed build waits for the other shard tasks to end before it reports
FAULT_ENV = "RETRIEVER_SERVER_FAULT_KILL_AFTER_SHARDS"  # test hook: SIGKILL the build after N shards
GPU_SHARE = 0.125  # a shard task's share of a GPU with --gpu: eight tasks assign rows on one GPU at once


def _train(config: BuildConfig, inputs: BuildInputs, work: Path) -> tuple[Path, bool]:
    """Trains the codec on a seeded sample of the keys (once); returns where it is saved, and whether this run
    trained it (False: an earlier run's was reused)."""
    path = work / TRAINED
    if reusable_codec(path):
        return path, False
    rng = np.random.default_rng(config.seed)
    rows = np.sort(rng.choice(inputs.n, size=inputs.train_rows, replace=False))
    sample = np.asarray(open_rows(config.keys)[rows], dtype=np.float32)
    try:
        check_key_rows(sample, rows, keep_keys=False)  # a key out of float16's range: named when added
        with as_build_error(f"training {inputs.factory} on {len(sample)} rows", path):
            index = ix.new_trained_index(inputs.factory, ix.canonical_metric(config.metric), sample, config.seed,
                                         gpu=config.gpu)
            ix.write_index(index, path)
    except BuildError:
        drop_codec(work)  # the folder, unless it holds a resumed build's shards
        raise
    return path, True


@ray.remote
class _Progress:
    """Rows added so far, summed over the shard tasks."""

    def __init__(self):
        self.rows = 0

    def add(self, n: int) -> None:
        self.rows += n

    def total(self) -> int:
        return self.rows


def _copy_rows(src: np.ndarray | PartedArray, dst_path: Path, start: int, end: int, block: int,
               stopped: Callable[[], bool]) -> None:
    out = np.lib.format.open_memmap(dst_path, mode="w+", dtype=src.dtype,
                                    shape=(end - start, *src.shape[1:]))
    for s in range(start, end, block):
        if stopped():
            raise BuildError(f"stopped copying {dst_path.name} at row {s}: another shard failed")
        e = min(end, s + block)
        out[s - start:e - start] = src[s:e]
    out.flush()
    del out


@ray.remote
def _build_shard(config: BuildConfig, trained: str, shard_dir: str, start: int, end: int, progress,
                 stop_file: str) -> dict:
    """Adds rows [start, end) to a copy of the trained codec and writes the shard directory.

    Its entry records the Ray node it ran on ("node"), for the manifest's build metadata. It ends with a
    BuildError before its next block of rows (added or copied) once its run leaves `stop_file`.
    """
    kill_after = int(os.environ.get(FAULT_ENV, "0"))
    if kill_after and int(Path(shard_dir).name.split("-")[-1]) >= kill_after:
        time.sleep(60)  # the test hook's kill lands while later shards are still unfinished
    faiss.omp_set_num_threads(max(1, config.cpus_per_shard))
    final = Path(shard_dir)
    tmp = final.with_name(final.name + ".tmp")
    stop = Path(stop_file)
    if stop.exists():
        raise BuildError(f"{final.name} not started: another shard failed")
    with as_build_error(f"adding rows [{start}, {end}) to {final.name}", tmp):
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        codec = file_sha256(Path(trained))  # the codec the shard is built with: a rerun reuses it with this one only
        began = time.perf_counter()
        filled = add_rows(config, trained, start, end, tmp, progress, stopped=stop.exists)
        seconds = time.perf_counter() - began
        for name, path in config.payloads.items():
            _copy_rows(open_rows(path), tmp / f"payload.{name}.npy", start, end, config.add_block, stop.exists)
        files = {k: asdict(v) for k, v in describe_files(tmp, filled.hashed).items()}
        entry = {"name": final.name, "id_start": start, "id_end": end, "files": files,
                 "node": ray.get_runtime_context().get_node_id(), "seconds": round(seconds, 3),
                 "phases": filled.seconds, "codec": codec}
        (tmp / DONE).write_text(json.dumps(entry))
        os.replace(tmp, final)
    return entry


def _shard_ranges(n: int, shards: int) -> list[tuple[int, int]]:
    bounds = np.linspace(0, n, shards + 1).astype(np.int64)
    return [(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:])]


def _task_failure(err: ray.exceptions.RayError) -> str:
    """One line on why a shard task failed: its own BuildError, or the last line of what Ray reports."""
    cause = getattr(err, "cause", None)
    return str(cause) if isinstance(cause, BuildError) else last_line(cause or err)


def _room_for_a_task(config: BuildConfig) -> bool:
    """Whether a live node of the cluster has, in all, the CPUs (and GPU share) one shard task asks for."""
    return any(r.get("CPU", 0.0) >= config.cpus_per_shard and (not config.gpu or r.get("GPU", 0.0) >= GPU_SHARE)
               for r in (n["Resources"] for n in ray.nodes() if n.get("Alive")))


class _RoomWatch:
    """Ray holds a task no node can take until one joins (an autoscaler may add it): while no node has
    room for a shard task, the build says so every STALL_REPORT_S, and gives up after STALL_S."""

    def __init__(self, config: BuildConfig):
        self.config = config
        self.fit = self.reported = self.checked = time.monotonic()

    def check(self, pending: dict) -> None:
        now = time.monotonic()
        if now - self.checked < 2.0:
            return
        self.checked = now
        if _room_for_a_task(self.config):
            self.fit = now
            return
        c = self.config
        need = f"{c.cpus_per_shard} CPUs{' and a GPU' if c.gpu else ''} (--cpus-per-shard{', --gpu' if c.gpu else ''})"
        if now - self.fit > STALL_S:
            for ref in pending:  # none can be running: no node has room for one
                ray.cancel(ref)
            raise BuildError(f"no node of the cluster had room for a shard task of {need} for {STALL_S:.0f} s "
                             f"(the cluster has {free_resources()}): ask for less, or add a node that has it")
        if now - self.reported >= STALL_REPORT_S:
            self.reported = now
            log.warning("no node of the cluster has room for a shard task of %s; waiting for one to join (gives "
                        "up after %.0f s; the cluster has %s)", need, STALL_S, free_resources())


def _wait_for(pending: dict, entries: dict[int, dict], counter, bar, stop: Path, config: BuildConfig) -> None:
    """Collects finished shard tasks into `entries`; on a failure stops the rest and raises BuildError."""
    kill_after = int(os.environ.get(FAULT_ENV, "0"))
    room = _RoomWatch(config)
    while pending:
        room.check(pending)
        ready, _ = ray.wait(list(pending), timeout=0.5)
        for ref in ready:
            i = pending.pop(ref)
            try:
                entries[i] = ray.get(ref)
            except ray.exceptions.RayError as err:
                _stop_others(pending, stop)
                raise BuildError(f"{shard_name(i)} failed: {_task_failure(err)}") from None
            log.info("%s written (%d rows)", shard_name(i), entries[i]["id_end"] - entries[i]["id_start"])
            if kill_after and len(entries) >= kill_after:
                os.kill(os.getpid(), signal.SIGKILL)
        bar.update(ray.get(counter.total.remote()) - bar.n)


def _stop_others(pending: dict, stop: Path) -> None:
    """Asks the shard tasks still running to end (the run's stop file) and waits for them, `STOP_WAIT_S` at
    most.

    Not `ray.cancel`: cancelling a task as it finishes can abort the driver inside Ray's task manager.
    """
    if not pending:
        return
    log.warning("a shard failed; stopping the %d other shard tasks still running", len(pending))
    stop.touch()
    _, running = ray.wait(list(pending), num_returns=len(pending), timeout=STOP_WAIT_S)
    if running:
        log.warning("%d shard tasks still running after %.0f s; they end at their next block of rows",
                    len(running), STOP_WAIT_S)


def _fill_shards(config: BuildConfig, inputs: BuildInputs, work: Path, trained: Path, retrained: bool,
                 progress: bool) -> list[dict]:
    """Builds every shard not already finished (with this codec; `retrained`: by this run) as a Ray task;
    returns the shard entries in order.

    The tasks are spread over the cluster's nodes (one shard per node while there are more nodes).
    """
    entries: dict[int, dict] = {}
    pending = {}
    stop = work / f"{STOP}{uuid.uuid4().hex[:12]}"  # this run's: an earlier run's tasks keep seeing theirs
    counter = _Progress.remote()
    remaining, codec = 0, file_sha256(trained)
    for i, (start, end) in enumerate(_shard_ranges(inputs.n, config.shards)):
        entry = reusable_shard(work / shard_name(i), start, end, codec, retrained)
        if entry is not None:
            entries[i] = entry
            continue
        remaining += end - start
        task = _build_shard.options(num_cpus=config.cpus_per_shard, num_gpus=GPU_SHARE if config.gpu else 0,
                                    scheduling_strategy="SPREAD")
        pending[task.remote(config, str(trained), str(work / shard_name(i)), start, end, counter, str(stop))] = i
    try:
        with tqdm(total=remaining, unit="rows", desc="adding to shards", disable=not progress) as bar:
            _wait_for(pending, entries, counter, bar, stop, config)
    finally:
        ray.kill(counter)
    return [entries[i] for i in range(config.shards)]


def _identity(path: Path) -> tuple[int, int, int] | None:
    """(device, inode, change time) of what is at `path`, None where nothing is: the same folder, or another
    put there (which may get the inode of one just removed)."""
    try:
        found = path.lstat()
    except FileNotFoundError:
        return None
    return found.st_dev, found.st_ino, found.st_ctime_ns


def _publish(config: BuildConfig, work: Path, manifest: Manifest, found: tuple[int, int, int] | None) -> None:
    """Writes the manifest into the finished work directory, moves it to `config.out` (checked again: a
    path may have appeared there meanwhile), then tidies up. `found` is what the output was when the build
    began: one put there since (a datastore too) is not replaced, even with --overwrite."""
    check_output(config.out, config.overwrite)
    with as_build_error(f"publishing {config.out}", config.out, also_written=work):
        fsync_tree(work)  # every shard file on disk before the manifest names it and the old folder goes
        write_manifest(work, manifest)
        check_output(config.out, config.overwrite)  # again: the fsync of a large build takes minutes
        check_inputs_unchanged(work)  # and the inputs: a datastore never mixes rows of two
        try:
            if _identity(config.out) != found:
                raise FileExistsError(config.out)
            old = replace_directory(work, config.out, overwrite=config.overwrite and found is not None)
        except FileExistsError:
            raise BuildError(f"{config.out} appeared or was replaced while the build ran; refusing to replace it "
                             f"(the build is kept in {work}: run again, with --overwrite to replace it, or choose "
                             "another output)") from None
        fsync_directory(config.out.parent)
        for leftover in (MARKER, TRAINED, *(p.name for p in config.out.glob(f"{STOP}*"))):
            (config.out / leftover).unlink(missing_ok=True)  # not in the manifest: readers ignore them meanwhile
    if old is not None:
        _remove_replaced(old, config.out)


def _remove_replaced(old: Path, out: Path) -> None:
    """Removes the datastore a build replaced, unless something else came into its folder between the
    last check and the swap: that is moved to a name no build reuses (`.OUT.replaced-TIME`), and named."""
    try:
        check_output(old, overwrite=True)
    except BuildError as err:
        kept = out.parent / f".{out.name}.replaced-{time.strftime('%Y%m%d-%H%M%S')}-{os.urandom(3).hex()}"
        os.rename(old, kept)
        log.warning("kept the folder this build replaced, at %s: it is not a datastore alone any more (%s)", kept,
                    err)
        return
    shutil.rmtree(old, ignore_errors=True)


def _manifest(config: BuildConfig, inputs: BuildInputs, trained: Path, entries: list[dict], seconds: float,
              phases: dict[str, float]) -> Manifest:
    """The manifest describing the finished shards. Its build metadata holds each shard's Ray node id
    ("nodes"), its task's seconds ("shard_seconds") and their phases ("shard_phases", `FilledShard`;
    None for a shard an older version built), and `phases`: this run's seconds of training and of
    filling the shards (a resumed build's earlier work is not in them)."""
    nlist = ix.nlist_of(faiss.read_index(str(trained)))
    shards = tuple(
        ShardEntry(e["name"], e["id_start"], e["id_end"], {k: FileEntry(**v) for k, v in e["files"].items()})
        for e in entries
    )
    return Manifest(
        dimension=inputs.d, metric=ix.canonical_metric(config.metric), factory=inputs.factory,
        ntotal=inputs.n, nlist=nlist, default_nprobe=ix.default_nprobe(nlist), has_keys=config.keep_keys,
        payloads=inputs.payloads, shards=shards, metadata=dict(config.metadata),
        build={"seed": config.seed, "train_size": inputs.train_rows, "keys": str(config.keys),
               "faiss": faiss.__version__, "seconds": round(seconds, 3), **phases,
               "nodes": [e.get("node") for e in entries], "shard_seconds": [e.get("seconds") for e in entries],
               "shard_phases": [e.get("phases") for e in entries]},
    )


def build_datastore(config: BuildConfig, address: str | None = None, num_cpus: int | None = None,
                    progress: bool = True, on_ray: Callable[[], None] | None = None) -> Manifest:
    """Builds a sharded datastore from an (N, d) keys matrix and publishes it at `config.out`.

    Keys and payloads are .npy files or parts indexes (`NAME.parts.json`, see `row_parts`), read
    memory-mapped. Shard tasks are spread over the Ray cluster's nodes; the manifest's build
    metadata names the node each shard was built on.

    Args:
        config: inputs, index and shard parameters.
        address: a Ray cluster to run on; None starts (or reuses) a local one.
        num_cpus: CPUs of the local Ray cluster when one is started.
        progress: show progress bars.
        on_ray: called once this process is on Ray (a CLI's SIGTERM handler goes there, over Ray's).

    Returns:
        The manifest of the published datastore.

    Raises:
        BuildError: bad inputs (checked before any work), an existing output without `overwrite`,
            a FAISS error while training or adding, a failed shard, or an OSError (naming the path).

    Example:
        >>> build_datastore(BuildConfig(keys=Path("keys.npy"), out=Path("ds"), shards=2))
    """
    config = absolute_paths(config, "out")  # `--out .` given a name to put its work and lock beside
    check_output(config.out, config.overwrite)  # the output, then the inputs (named as given): both before
    found = _identity(config.out)  # the datastore --overwrite replaces, or none: nothing else, ever
    inputs = check_inputs(config)  # anything is made, the output's folders and lock included
    with output_held(config.out, config.overwrite):  # checked, and one build at a time writes it
        if _identity(config.out) != found:  # another build published there while this one read its inputs
            raise BuildError(f"{config.out} appeared or was replaced while the build started; refusing to replace "
                             "it: run again, with --overwrite to replace it, or choose another output")
        check_inputs_outside(config)  # a datastore to replace, then: none of the inputs may be in it
        return _build(config, inputs, address, num_cpus, progress, on_ray or (lambda: None), found)


def _build(config: BuildConfig, inputs: BuildInputs, address: str | None, num_cpus: int | None, progress: bool,
           on_ray, found: tuple[int, int, int] | None) -> Manifest:
    config = absolute_paths(config, "keys", "payloads")  # Ray's tasks run in other folders (a cluster's own)
    work = config.out.parent / f".{config.out.name}.partial"
    need = check_disk(config, inputs, work)
    log.info("building %d rows with %s: about %.2f GiB of disk", inputs.n, inputs.factory, need / 2 ** 30)
    if connect(address, num_cpus) and not _room_for_a_task(config):  # a cluster of its own: no node will join
        raise BuildError(f"no room for a shard task (--cpus-per-shard) on this build's own cluster: {free_resources()}")
    on_ray()
    started = time.time()
    with as_build_error(f"preparing {work}", work):
        prepare_workdir(config, inputs, work)
    trained, retrained = _train(config, inputs, work)
    trained_at = time.time()
    with as_build_error(f"writing shards in {work}", work):
        entries = _fill_shards(config, inputs, work, trained, retrained, progress)
    phases = {"train_seconds": round(trained_at - started, 3), "add_seconds": round(time.time() - trained_at, 3)}
    manifest = _manifest(config, inputs, trained, entries, time.time() - started, phases)
    _publish(config, work, manifest, found)
    log.info("published datastore %s (version %s, %d rows, %d shards)", config.out, manifest.version,
             inputs.n, config.shards)
    return manifest
