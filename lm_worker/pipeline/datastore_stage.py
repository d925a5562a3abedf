"""The pipeline's datastores: both sources encoded (Ray Data), built (the Ray build job), served for the
run, and RETRO's neighbours fetched for every chunk of the splits that need them."""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from lm_worker.data.token_store import TokenStore
from lm_worker.pipeline.config import PipelineConfig
from lm_worker.pipeline.stages import Stages, done
from lm_worker.pipeline.staleness import plain, refusal, stale_query_keys
from lm_worker.retrieval.config import RetrievalConfig
from lm_worker.sources.neighbours import record_search, record_window, recorded_searches, recorded_window

log = logging.getLogger(__name__)


def encode_source(config: PipelineConfig, kind: str, lm_checkpoint: Path | None = None) -> None:
    """The train split's kNN-LM or RETRO source, by the Ray Data job (`encode_workers` actors, at least one)."""
    from lm_worker.jobs.encode_job import run_encode_job
    from lm_worker.jobs.encode_plan import EncodeJobConfig

    out = config.run / f"{kind}-source"
    job = EncodeJobConfig(kind=kind, data=config.run / "data", checkpoint=lm_checkpoint, encoder=config.retro_encoder,
                          chunk_len=config.retro.chunk_len, context_len=config.context_len, stride=config.stride,
                          workers=max(config.encode_workers, 1), address=config.address, progress=config.progress)
    run_encode_job(job, out)


def neighbour_splits(config: PipelineConfig) -> tuple[str, ...]:
    """The splits whose chunks need RETRO neighbours: the one RETRO trains on, and the held-out one."""
    return config.retro_split, "heldout"


def query_splits(config: PipelineConfig) -> tuple[str, ...]:
    """The splits whose chunks query the RETRO datastore but are not in it (so they need their own keys)."""
    return tuple(split for split in neighbour_splits(config) if split != "train")


def retro_search(config: PipelineConfig) -> RetrievalConfig:
    """How RETRO's neighbours are searched: `n_neighbours` of them, nprobe `retro_nprobe`, re-ranked exactly."""
    return RetrievalConfig(k=config.n_neighbours, nprobe=config.retro_nprobe, exact_rerank=True,
                           rerank_candidates=8 * config.n_neighbours)


def check_neighbour_files(config: PipelineConfig) -> None:
    """ValueError when RUN/retro-source holds neighbours fetched with another n_neighbours than the config's,
    by another search (`retro_nprobe`), or train-split neighbours whose own-document exclusion was made for
    another training window."""
    source = config.run / "retro-source"
    for split in neighbour_splits(config):
        path = source / f"neighbours-{split}.npy"
        if not done(path):
            continue
        if (k := np.load(path, mmap_mode="r").shape[1]) != config.n_neighbours:
            raise ValueError(f"{path} holds {k} neighbours per chunk, n_neighbours is {config.n_neighbours}: remove "
                             f"{source}/neighbours-*.npy and {config.run / 'retro'} to fetch and train again")
        _check_search(config, split, path)
        if split == "train" and (window := recorded_window(source)) != config.retro.seq_len:
            made = f"a window of {window} tokens" if window else "a window that was not recorded (an earlier version)"
            raise ValueError(f"{path} left out each chunk's documents for {made}, retro.seq_len is "
                             f"{config.retro.seq_len}: remove it and {config.run / 'retro'} to fetch and train again")


def _check_search(config: PipelineConfig, split: str, path: Path) -> None:
    wanted, found = retro_search(config).search_settings(), recorded_searches(path.parent).get(split)
    if found is None:
        log.warning("%s does not record the search it was fetched by (an earlier version): reused as if by "
                    "nprobe %d", path, config.retro_nprobe)
    elif found != wanted:
        given = ", ".join(f"{plain(name)} {plain(value)}" for name, value in sorted(found.items()))
        raise ValueError(f"{path} was fetched with {given}; this run searches with retro_nprobe "
                         f"{config.retro_nprobe}: remove it and {config.run / 'retro'} to fetch and train again")


def embed_split(config: PipelineConfig, encoder, split: str) -> None:
    """RUN/retro-source/SPLIT-keys.npy: the RETRO queries of a split's chunks, with the record of what they
    were embedded from beside them (`keys_record`: the source's encoder, the split's chunks)."""
    from lm_worker.sources.retro import embed_chunks, keys_record
    from lm_worker.sources.source import read_source

    source, store = config.run / "retro-source", TokenStore.open(config.run / "data" / split)
    record = keys_record(store, config.retro.chunk_len, read_source(source).encoder_fingerprint)
    embed_chunks(store, encoder, config.retro.chunk_len, source / f"{split}-keys.npy", progress=config.progress,
                 record=record)  # whole or none, its record once it is whole


def build_datastore_of(config: PipelineConfig, source: Path, datastore: Path) -> None:
    from lm_worker.sources.build import build_source

    build_source(source, datastore, shards=config.shards, progress=config.progress)


@contextlib.contextmanager
def serve_datastore(config: PipelineConfig, datastore: Path, name: str) -> Iterator[tuple[str, object]]:
    """Serves a datastore for the duration: shards and router as Ray actors, or as local processes.
    Yields the address to retrieve from (on Ray the router's; locally the shards', which the client
    fans out to itself) and the `ClientSecurity` its clients use. On a cluster's node IPs the
    deployment secures its ports itself, with a CA and token it writes to RUN/secrets (0700)."""
    from lm_worker.retrieval.service import ClientSecurity

    if config.serve_on_ray:
        from retriever_server.cluster.ray_serving import RayDeployment, RayServeConfig

        on_cluster = bool(config.address or os.environ.get("RAY_ADDRESS"))
        serve = RayServeConfig(Path(datastore).absolute(), name=f"{config.run.name}-{name}", cpus_per_shard=0.5,
                               host=None if on_cluster else "127.0.0.1", metrics=False,
                               secrets_dir=config.run / "secrets" / name if on_cluster else None)
        with RayDeployment(serve) as deployment:
            yield deployment.router_address, deployment.client_security or ClientSecurity()
    else:
        from retriever_server.cluster.launcher import LocalDeployment

        with LocalDeployment.for_one_command(datastore) as deployment:
            yield deployment.shards_target, ClientSecurity()  # the client fans out: no router hop


def fetch_neighbours(config: PipelineConfig, retriever) -> None:
    from lm_worker.sources.exclusions import chunk_exclusions
    from lm_worker.sources.neighbours import precompute_neighbours
    from lm_worker.sources.source import read_source

    source, L = config.run / "retro-source", config.retro.chunk_len
    for split in neighbour_splits(config):
        name = f"neighbours-{split}.npy"
        if done(source / name):
            continue
        if split == "train":  # the datastore's own chunks: each leaves out the documents its window predicts
            train = TokenStore.open(config.run / "data" / "train")
            keys, exclude = read_source(source).open_keys(), chunk_exclusions(train, L, config.retro.seq_len)
        else:  # no document of these is in the datastore: nothing to leave out
            keys, exclude = np.load(source / f"{split}-keys.npy", mmap_mode="r"), None
        precompute_neighbours(retriever, keys, exclude, source / name, progress=config.progress)  # whole or none
        record_search(source, split, retriever.config)  # once the file is whole (a failed fetch keeps the old)
        if split == "train":
            record_window(source, config.retro.seq_len)


def sources_and_datastores(config: PipelineConfig, stages: Stages, lm_checkpoint: Path, tokenizer):
    """Encodes and builds both datastores (what is there checked by `check_made_from` first); returns the
    encoder of the RETRO source's keys."""
    from lm_worker.encoders.registry import chunk_encoder_for
    from lm_worker.sources.source import read_source

    run, encoder = config.run, None
    for kind in ("knnlm", "retro"):
        source, datastore = run / f"{kind}-source", run / f"{kind}-datastore"
        encoded = not done(source / "source.json")
        with stages.stage(f"encode {kind} (Ray Data, {max(config.encode_workers, 1)} workers)", reused=not encoded):
            if encoded:
                encode_source(config, kind, lm_checkpoint)
        if kind == "retro" and encoded and (stale := stale_query_keys(config, read_source(source))):
            raise ValueError(refusal(config, stale))  # keys left in the folder, made for the source before
        if kind == "retro":  # what was there before was checked by `check_made_from`
            encoder = chunk_encoder_for(read_source(source).encoder_metadata, tokenizer, lm_checkpoint)  # this
            # run's LM, not the path the source recorded: a run folder moved or copied reads its own
            for split in query_splits(config):
                with stages.stage(f"embed {split} chunks", reused=done(source / f"{split}-keys.npy")):
                    if not done(source / f"{split}-keys.npy"):
                        embed_split(config, encoder, split)
        with stages.stage(f"build {kind} datastore ({config.shards} shards)",
                          reused=done(datastore / "manifest.json")):
            if not done(datastore / "manifest.json"):
                build_datastore_of(config, source, datastore)
    return encoder

