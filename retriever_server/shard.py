"""One loaded shard: its FAISS index, stored keys and payloads, and search over them.

No gRPC here: `shard_server` wraps a `Shard` in a service, the benchmarks call it in process.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from retriever_server import index as ix
from retriever_server.manifest import Manifest, ShardEntry, read_manifest, verify_shard
from retriever_server.request import DatastoreView, ExclusionKey, SearchSpec
from retriever_server.result import SearchResult

log = logging.getLogger(__name__)


def sort_neighbours(ids: np.ndarray, distances: np.ndarray, metric: str) -> np.ndarray:
    """Row-wise order of (nq, m) candidates: best distance first, ties by id, missing (-1) last."""
    worst = np.inf if metric == "l2" else -np.inf
    score = np.where(ids < 0, worst, distances).astype(np.float64)
    if metric != "l2":
        score = -score
    tie = np.where(ids < 0, np.iinfo(np.int64).max, ids)
    return np.lexsort((tie, score), axis=-1)


@dataclass(frozen=True)
class ShardOptions:
    """How a shard is opened."""

    mmap: bool = True
    verify: bool = True
    gpu: bool = False
    threads: int = 0  # FAISS threads; 0 keeps FAISS's default


class Shard:
    """A datastore shard opened for search.

    Example:
        >>> shard = Shard.open(Path("ds"), 0)
        >>> result = shard.search(spec)
    """

    def __init__(self, directory: Path, manifest: Manifest, entry: ShardEntry, options: ShardOptions):
        self.directory = Path(directory)
        self.manifest = manifest
        self.entry = entry
        self.options = options
        base = self.directory / entry.name
        self.index = ix.read_index(base / "index.faiss", mmap=options.mmap and not options.gpu)
        if options.gpu:
            self.index = ix.to_gpu(self.index)
        self.keys = np.load(base / "keys.npy", mmap_mode="r") if manifest.has_keys else None
        self.payloads = {p.name: np.load(base / f"payload.{p.name}.npy", mmap_mode="r") for p in manifest.payloads}

    @classmethod
    def open(cls, directory: Path, shard: int, options: ShardOptions = ShardOptions()) -> Shard:
        """Reads the manifest, checks the shard's files, and loads it; raises DatastoreError."""
        manifest = read_manifest(directory)
        if not 0 <= shard < len(manifest.shards):
            raise ValueError(f"shard {shard} out of range: the datastore has {len(manifest.shards)} shards")
        entry = manifest.shards[shard]
        verify_shard(directory, entry, full=options.verify)
        if options.threads:
            import faiss

            faiss.omp_set_num_threads(options.threads)
        log.info("loading %s of %s (%d rows)", entry.name, directory, entry.ntotal)
        return cls(directory, manifest, entry, options)

    def view(self) -> DatastoreView:
        """What requests to this shard are checked against."""
        m = self.manifest
        return DatastoreView(m.dimension, m.nlist, m.default_nprobe, m.has_keys,
                             frozenset(p.name for p in m.payloads), m.version)

    def _search_candidates(self, spec: SearchSpec) -> tuple[np.ndarray, np.ndarray]:
        groups: dict[ExclusionKey, list[int]] = defaultdict(list)
        for row, key in enumerate(spec.exclusions):
            groups[key].append(row)
        m = spec.candidates
        distances = np.empty((spec.nq, m), dtype=np.float32)
        ids = np.empty((spec.nq, m), dtype=np.int64)
        for key, rows in groups.items():
            selector = ix.id_selector(*key)
            queries = spec.queries if len(rows) == spec.nq else spec.queries[rows]
            d, i = ix.search(self.index, queries, m, spec.nprobe, selector)
            distances[rows], ids[rows] = d, i
        return distances, ids

    def _local_rows(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        valid = ids >= 0
        rows = np.where(valid, ids - self.entry.id_start, 0)
        return rows, valid

    def _stored_keys(self, ids: np.ndarray) -> np.ndarray:
        rows, valid = self._local_rows(ids)
        keys = np.asarray(self.keys[rows.ravel()], dtype=np.float32).reshape(*ids.shape, -1)  # (nq, m, d)
        keys[~valid] = 0
        return keys

    def _rerank(self, spec: SearchSpec, ids: np.ndarray) -> np.ndarray:
        keys = self._stored_keys(ids)  # (nq, m, d)
        if self.manifest.metric == "l2":
            diff = keys - spec.queries[:, None, :]
            return np.einsum("qmd,qmd->qm", diff, diff)
        return np.einsum("qmd,qd->qm", keys, spec.queries)

    def _payload(self, name: str, ids: np.ndarray) -> np.ndarray:
        rows, valid = self._local_rows(ids)
        array = self.payloads[name]
        out = np.asarray(array[rows.ravel()]).reshape(*ids.shape, *array.shape[1:])
        out[~valid] = 0
        return out

    def search(self, spec: SearchSpec) -> SearchResult:
        """Top-k neighbours of the checked request, exactly re-ranked when asked."""
        distances, ids = self._search_candidates(spec)
        if spec.exact_rerank:
            distances = self._rerank(spec, ids).astype(np.float32)
        order = sort_neighbours(ids, distances, self.manifest.metric)[:, : spec.k]
        ids = np.take_along_axis(ids, order, axis=1)
        distances = np.take_along_axis(distances, order, axis=1)
        worst = np.inf if self.manifest.metric == "l2" else -np.inf
        distances[ids < 0] = worst
        return SearchResult(
            ids=ids,
            distances=distances,
            payloads={name: self._payload(name, ids) for name in spec.payloads},
            keys=self._stored_keys(ids) if spec.return_keys else None,
            datastore_version=self.manifest.version,
        )
