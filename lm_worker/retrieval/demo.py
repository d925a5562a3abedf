"""The retrieval demo on the built-in corpus: real embeddings of the CPython stdlib, a 2-shard
datastore built by the Ray job, every shard and a router served locally, and neighbours queried
over gRPC for held-out chunks.

A second run reuses the cached embeddings and the datastore it built from the same keys (the
datastore records their digest).
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)
EXAMPLES_NPROBE = 16  # lists the examples' search probes
# the build's auto factory gives n keys at most n // 39 lists (39 training rows a list), and a search may
# probe no more lists than there are: the fewest keys whose lists the examples can probe
MIN_KEYS = 39 * EXAMPLES_NPROBE
DEMO_MARK = "retrieval-demo.json"  # in OUT/source: the demo wrote that folder
SOURCE_FILES = frozenset({"keys.npy", "tokens.npy", "doc.npy", DEMO_MARK})  # all the demo writes in OUT/source
# what the demo's datastore records in its manifest's metadata, with "keys", the digest of the keys it holds
DEMO_METADATA = {"encoder": "all-MiniLM-L6-v2", "chunk_len": "64", "corpus": "cpython-stdlib"}


@dataclass(frozen=True)
class DemoConfig:
    """Sizes of the demo; the defaults run in a few minutes on 2 cores (most of it encoding, once)."""

    out: Path = Path("runs/retrieval-demo")
    n_keys: int = 12000
    n_queries: int = 500
    shards: int = 2
    k: int = 10
    nprobe_sweep: tuple[int, ...] = (1, 4, 16, 64)
    shown: int = 3
    num_cpus: int = 2
    progress: bool = True


@dataclass
class Neighbour:
    document: str
    distance: float
    text: str


@dataclass
class DemoReport:
    """What the demo found; the CLI prints it."""

    datastore: Path
    router: str
    info: object
    recall: dict[int, tuple[float, float]]  # nprobe -> (plain, re-ranked) recall@10
    examples: list[tuple[str, list[Neighbour]]] = field(default_factory=list)


def _source_arrays(config: DemoConfig):
    from lm_worker.encoders.stdlib_vectors import stdlib_vectors

    vectors = stdlib_vectors(config.n_keys, config.n_queries, progress=config.progress)
    source = config.out / "source"
    mark_demo_source(source)
    for name, array in (("keys", vectors.keys), ("tokens", vectors.tokens), ("doc", vectors.doc_ids)):
        path, array = source / f"{name}.npy", np.asarray(array)
        if not _holds(path, array):  # another --keys, or vectors made anew (another Python's stdlib): rewritten
            np.save(path, array)
    return vectors, source


def mark_demo_source(source: Path) -> None:
    """Makes the folder `source` (OUT/source) if missing and marks it as the demo's (`DEMO_MARK`)."""
    source.mkdir(parents=True, exist_ok=True)
    if not (source / DEMO_MARK).is_file():
        (source / DEMO_MARK).write_text(json.dumps({"written_by": "lm-worker retrieval-demo"}))


def _built_by_demo(datastore: Path) -> bool:
    """Whether the datastore at `datastore` is one the demo built, as its manifest's metadata says (read alone:
    the demo checks the rest when it opens it, and builds again what it finds stale or damaged)."""
    try:
        metadata = json.loads((datastore / "manifest.json").read_text()).get("metadata")
    except (OSError, ValueError, AttributeError):
        return False
    return isinstance(metadata, dict) and all(metadata.get(name) == value for name, value in DEMO_METADATA.items())


def foreign_to_demo(out: Path) -> str | None:
    """What in `out` (a folder holding at most source/ and datastore/) the demo did not write, in a few
    words; None where all it holds is the demo's own, or nothing: its source/ holds only files of the names
    the demo writes (an earlier demo's, a build stopped part-way: the next run builds again), its datastore/
    is empty, or one whose manifest records the demo's metadata (`DEMO_METADATA`)."""
    from retriever_server.wire.untrusted import safe_text

    source, datastore = Path(out) / "source", Path(out) / "datastore"
    if datastore.exists() or datastore.is_symlink():
        folder = datastore.is_dir() and not datastore.is_symlink()
        if not (folder and (not any(datastore.iterdir()) or _built_by_demo(datastore))):
            return "datastore/, which is no datastore the retrieval demo built (its manifest's metadata)"
    if not source.exists():
        return None
    if not source.is_dir() or source.is_symlink():
        return "source, which is not a folder"
    if foreign := sorted(p.name for p in source.iterdir() if p.name not in SOURCE_FILES or not p.is_file()):
        return f"source/{safe_text(foreign[0])[1:-1]}, which the retrieval demo does not write"
    return None


def _holds(path: Path, array: np.ndarray) -> bool:
    """Whether the .npy at `path` holds `array` exactly."""
    try:
        stored = np.load(path, mmap_mode="r")
    except (OSError, ValueError):
        return False
    return stored.dtype == array.dtype and np.array_equal(stored, array)


def _digest(path: Path) -> str:
    """The keys' sha256 (first 16 hex digits): the datastore records the keys it was built from."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


def _datastore(config: DemoConfig, source: Path) -> Path:
    from retriever_server.datastore.build import BuildConfig, build_datastore
    from retriever_server.datastore.manifest import DatastoreError, read_manifest

    out = config.out / "datastore"
    keys = _digest(source / "keys.npy")
    try:
        manifest = read_manifest(out)
        if manifest.metadata.get("keys") == keys and len(manifest.shards) == config.shards:
            log.info("reusing the datastore at %s", out)
            return out
    except DatastoreError:
        pass
    import ray

    build_datastore(BuildConfig(
        keys=source / "keys.npy", out=out, payloads={"tokens": source / "tokens.npy", "doc": source / "doc.npy"},
        shards=config.shards, keep_keys=True, overwrite=out.exists(),
        metadata={**DEMO_METADATA, "keys": keys},
    ), num_cpus=config.num_cpus, progress=config.progress)
    ray.shutdown()
    return out


def _recall(client, vectors, config: DemoConfig, nlist: int) -> dict[int, tuple[float, float]]:
    import faiss

    keys, queries = np.asarray(vectors.keys), np.asarray(vectors.queries)
    flat = faiss.IndexFlatL2(keys.shape[1])
    flat.add(keys)
    _, truth = flat.search(queries, config.k)
    recall = {}
    for nprobe in (p for p in config.nprobe_sweep if p <= nlist):
        plain = client.search(queries, k=config.k, nprobe=nprobe)
        reranked = client.search(queries, k=config.k, nprobe=nprobe, exact_rerank=True, rerank_candidates=100)
        recall[nprobe] = tuple(
            float(np.mean([len(set(a) & set(b)) for a, b in zip(r.ids, truth)])) / config.k
            for r in (plain, reranked)
        )
    return recall


def run_demo(config: DemoConfig = DemoConfig()) -> DemoReport:
    """Encodes, builds, serves and queries; returns what came back."""
    from lm_worker.encoders.minilm import MiniLMEncoder
    from retriever_server.client import RetrieverClient
    from retriever_server.cluster.launcher import LocalDeployment

    vectors, source = _source_arrays(config)
    datastore = _datastore(config, source)
    tokenizer = MiniLMEncoder.tokenizer_only()
    with LocalDeployment.for_one_command(datastore) as deployment, RetrieverClient(deployment.router_address) as client:
        info = client.info()
        recall = _recall(client, vectors, config, info.nlist)
        rows = np.linspace(0, config.n_queries - 1, config.shown).astype(int)
        found = client.search(np.asarray(vectors.queries)[rows], k=3, nprobe=EXAMPLES_NPROBE, exact_rerank=True,
                              rerank_candidates=100, payloads=["tokens", "doc"])
        report = DemoReport(datastore, deployment.router_address, info, recall)
        for j, row in enumerate(rows):
            neighbours = [
                Neighbour(vectors.documents[int(found.payloads["doc"][j, n])], float(found.distances[j, n]),
                          tokenizer.decode(found.payloads["tokens"][j, n].tolist()))
                for n in range(found.ids.shape[1])
            ]
            report.examples.append((tokenizer.decode(np.asarray(vectors.query_tokens[row]).tolist()), neighbours))
    return report
