"""Real vectors: MiniLM embeddings of 64-token chunks of the CPython stdlib, cached on disk.

Datastore rows come from the files that are not held out, queries from the held-out files, each file
contributing at most `max_per_doc` chunks, files visited in a fixed hashed order. A smaller set is a
prefix of a larger one, so a cache made for the benchmarks serves the tests too.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lm_worker.data.corpus import Document, is_heldout, read_stdlib

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RealVectors:
    """Keys (N, 384) and queries (Q, 384) float32, with their chunks' token ids and document ids."""

    keys: np.ndarray
    tokens: np.ndarray  # (N, chunk_len) int32 MiniLM word-piece ids
    doc_ids: np.ndarray  # (N,) int32 index into `documents`
    queries: np.ndarray
    query_tokens: np.ndarray
    documents: list[str]


def cache_root() -> Path:
    """$RETRIEVAL_CACHE, else ~/.cache/retrieval-datastore."""
    return Path(os.environ.get("RETRIEVAL_CACHE", Path.home() / ".cache" / "retrieval-datastore"))


def _ordered(documents: list[Document]) -> list[Document]:
    return sorted(documents, key=lambda d: hashlib.sha256(d.name.encode()).hexdigest())


def _take_chunks(encoder, documents: list[Document], n: int, chunk_len: int, max_per_doc: int):
    tokens, doc_ids, names = [], [], []
    count = 0
    for doc in documents:
        if count >= n:
            break
        chunks = encoder.chunk([doc.text], chunk_len, max_per_doc)[0][: n - count]
        if len(chunks):
            tokens.append(chunks)
            doc_ids.append(np.full(len(chunks), len(names), dtype=np.int32))
            names.append(doc.name)
            count += len(chunks)
    if count < n:
        raise ValueError(f"the corpus gives only {count} chunks, fewer than the {n} asked for")
    return np.concatenate(tokens), np.concatenate(doc_ids), names


def cache_stem(chunk_len: int, max_per_doc: int) -> str:
    """The name every cache folder of these chunk settings starts with (then -nKEYS-qQUERIES)."""
    return f"stdlib-minilm-py{sys.version_info.major}{sys.version_info.minor}-c{chunk_len}-m{max_per_doc}"


def _find_cached(root: Path, stem: str, n_keys: int, n_queries: int) -> Path | None:
    pattern = re.compile(re.escape(stem) + r"-n(\d+)-q(\d+)$")
    for path in sorted(root.glob(stem + "-n*-q*")) if root.is_dir() else []:
        match = pattern.match(path.name)
        if match and int(match[1]) >= n_keys and int(match[2]) >= n_queries and (path / "docs.json").is_file():
            return path
    return None


def load_cached(path: Path, n_keys: int, n_queries: int) -> RealVectors:
    """The first n_keys keys and n_queries queries of one cache folder (memory-mapped), wherever it lies:
    e.g. one carried to another machine.

    Raises:
        FileNotFoundError: `path` is not a cache folder (no docs.json).
        ValueError: it holds fewer keys or queries than asked for.
    """
    if not (path / "docs.json").is_file():
        raise FileNotFoundError(f"{path} is not a vector cache folder (no docs.json)")
    vectors = _load(path, n_keys, n_queries)
    keys = min(len(vectors.keys), len(vectors.tokens), len(vectors.doc_ids))
    queries = min(len(vectors.queries), len(vectors.query_tokens))
    if keys < n_keys or queries < n_queries:
        raise ValueError(f"{path} holds {keys} keys and {queries} queries, fewer than the {n_keys} keys and "
                         f"{n_queries} queries asked for")
    return vectors


def _load(path: Path, n_keys: int, n_queries: int) -> RealVectors:
    def arr(name: str, n: int) -> np.ndarray:
        return np.load(path / f"{name}.npy", mmap_mode="r")[:n]

    return RealVectors(arr("keys", n_keys), arr("tokens", n_keys), arr("doc_ids", n_keys),
                       arr("queries", n_queries), arr("query_tokens", n_queries),
                       json.loads((path / "docs.json").read_text()))


def stdlib_vectors(n_keys: int, n_queries: int, chunk_len: int = 64, max_per_doc: int = 16,
                   progress: bool = False) -> RealVectors:
    """Real MiniLM vectors of stdlib chunks, made once (about 90 chunks/s on 2 cores) and cached.

    Returns:
        RealVectors whose arrays are memory-mapped from the cache directory.
    """
    root = cache_root()
    stem = cache_stem(chunk_len, max_per_doc)
    cached = _find_cached(root, stem, n_keys, n_queries)
    if cached is not None:
        return _load(cached, n_keys, n_queries)
    from lm_worker.encoders.minilm import MiniLMEncoder

    encoder = MiniLMEncoder()
    documents = list(read_stdlib())
    train = _ordered([d for d in documents if not is_heldout(d.name)])
    heldout = _ordered([d for d in documents if is_heldout(d.name)])
    tokens, doc_ids, names = _take_chunks(encoder, train, n_keys, chunk_len, max_per_doc)
    query_tokens, _, _ = _take_chunks(encoder, heldout, n_queries, chunk_len, 4 * max_per_doc)
    log.info("encoding %d stdlib chunks with MiniLM (cached under %s)", n_keys + n_queries, root)
    out = root / f"{stem}-n{n_keys}-q{n_queries}"
    tmp = out.with_name(f"{out.name}.tmp{os.getpid()}-{uuid.uuid4().hex[:8]}")  # one per encode, even in a process
    tmp.mkdir(parents=True)
    try:
        np.save(tmp / "keys.npy", encoder.encode(tokens, progress))
        np.save(tmp / "queries.npy", encoder.encode(query_tokens, progress))
        np.save(tmp / "tokens.npy", tokens)
        np.save(tmp / "doc_ids.npy", doc_ids)
        np.save(tmp / "query_tokens.npy", query_tokens)
        (tmp / "docs.json").write_text(json.dumps(names))
        publish(tmp, out)
    except BaseException:  # a failed or interrupted encode leaves no work folder
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return _load(out, n_keys, n_queries)


def publish(tmp: Path, out: Path) -> None:
    """Renames the complete cache folder `tmp` to `out`; where another process published `out` meanwhile
    (its docs.json, written last, is there), that one is kept and `tmp` removed. A published cache is
    never deleted: only an `out` without docs.json (an unfinished one of an older version) is replaced."""
    for _ in range(2):
        try:
            os.replace(tmp, out)  # onto a missing or empty folder only
            return
        except OSError:
            if (out / "docs.json").is_file():
                log.info("kept the vector cache %s another process made meanwhile", out)
                shutil.rmtree(tmp, ignore_errors=True)
                return
            shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
