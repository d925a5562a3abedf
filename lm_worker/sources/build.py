"""The datastore of a source, built by `retriever_server`'s build job (a Ray job)."""

from __future__ import annotations

from pathlib import Path

from lm_worker.sources.source import read_source


def build_source(source_dir: Path, out: Path, shards: int = 2, factory: str = "auto", seed: int = 0,
                 keep_keys: bool = True, num_cpus: int | None = None, overwrite: bool = False,
                 progress: bool = True, address: str | None = None, cpus_per_shard: int = 1) -> Path:
    """Builds the datastore of a kNN-LM or RETRO source with `retriever_server`'s build job (a Ray job).

    The payload is "values" (kNN-LM) or "tokens" (RETRO); the manifest's metadata records the source's
    kind, tokenizer and encoder fingerprints ("tokenizer", "encoder"), and "chunk_len" (RETRO) or
    "context_len" (kNN-LM), as strings.

    Args:
        source_dir: a finished source from `encode_knnlm` or `encode_retro`.
        out: where the datastore is published.
        shards, factory, seed, keep_keys, overwrite, cpus_per_shard: as in
            `retriever_server.datastore.build.BuildConfig`.
        num_cpus: CPUs of the local Ray cluster, when one is started.
        address: the Ray cluster to build on ("auto": the one `ray start` made here); None: RAY_ADDRESS when
            set, else a local cluster.
        progress: show progress bars.

    Returns:
        `out`.

    Raises:
        FileNotFoundError: `source_dir` is not a finished source.
        BuildError: the build failed (see `build_datastore`).
    """
    from retriever_server.datastore.build import BuildConfig, build_datastore

    info = read_source(source_dir)
    name, path = info.payload
    metadata = {"kind": info.kind, "tokenizer": info.tokenizer_fingerprint, **info.encoder_metadata}
    if info.kind == "retro":
        metadata["chunk_len"] = str(info.chunk_len)
    else:
        metadata["context_len"] = str(info.details.get("context_len", ""))
    config = BuildConfig(keys=info.keys_path, out=Path(out), payloads={name: path}, factory=factory, shards=shards,
                         seed=seed, keep_keys=keep_keys, overwrite=overwrite, metadata=metadata,
                         cpus_per_shard=cpus_per_shard)
    build_datastore(config, address=address, num_cpus=num_cpus, progress=progress)
    return Path(out)

