"""Datastore sources: the keys and payloads of a kNN-LM or RETRO datastore, written as memory-mapped
arrays, and the RETRO neighbours of every training chunk.

A source is a directory that `retriever_server build` turns into a datastore (`build_source`):

    kNN-LM: keys.npy float32 (N-1, d)  the LM's last-FFN input at stream position i (row i)
            values.npy int32 (N-1,)    tokens[i + 1], the next token
    RETRO:  keys.npy float32 (C, dim)  the frozen encoder's embedding of chunk c, tokens[c*L:(c+1)*L]
            tokens.npy int32 (C, 2L)   tokens[c*L : c*L + 2L], chunk + continuation, EOS-padded at the end
    both:   source.json                kind, rows, dimension, tokenizer and encoder fingerprints, parameters

A source written in parts by the encode job (`lm_worker.encode_job`) holds the same arrays as
`parts/NNNNN/keys.npy` and `parts/NNNNN/values.npy` (or `tokens.npy`), indexed in row order by
`keys.parts.json` and `values.parts.json` (`retriever_server.row_parts`), and says so in
source.json (`details["layout"] == "parts"`). `SourceInfo.keys_path` and `.payload` name the
right files for either layout; `open_keys()` and `open_payload()` open them memory-mapped.

Rows are datastore ids: row i of a kNN-LM source is token position i of the train stream, row c of
a RETRO source is chunk c. `chunk_exclusions` and `knn_exclusions` give, per query, the one row
range of the query's own document(s), which training-time neighbour precompute excludes.

Example:
    >>> train = TokenStore.open(Path("run/data/train"))
    >>> encode_retro(train, ChunkEncoder(tokenizer), 16, Path("run/retro-source"))
    >>> build_source(Path("run/retro-source"), Path("run/retro-datastore"))
    >>> with InProcessRetriever(Path("run/retro-datastore"), RetrievalConfig(k=2)) as retriever:
    ...     keys = read_source(Path("run/retro-source")).open_keys()
    ...     precompute_neighbours(retriever, keys, chunk_exclusions(train, 16),
    ...                           Path("run/retro-source/neighbours-train.npy"))
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from tqdm.auto import tqdm

from lm_worker.token_store import TokenStore
from lm_worker.windows import iter_windows
from retriever_server.row_parts import PARTS_SUFFIX, PartedArray, open_rows

log = logging.getLogger(__name__)

SOURCE_JSON = "source.json"
KEYS = "keys.npy"
KEYS_PARTS = "keys" + PARTS_SUFFIX
PAYLOAD_FILES = {"knnlm": ("values", "values.npy"), "retro": ("tokens", "tokens.npy")}
PARTS_LAYOUT = "parts"  # details["layout"] of a source written in parts


class Encoder(Protocol):
    """What `encode_retro` needs of a chunk encoder (`ChunkEncoder` is one)."""

    dimension: int
    fingerprint: str

    def embed(self, chunks: np.ndarray) -> np.ndarray: ...


@dataclass(frozen=True)
class SourceInfo:
    """What source.json records. `encoder_fingerprint` is the LM's fingerprint for kNN-LM sources
    and the chunk encoder's for RETRO; `chunk_len` is 0 for kNN-LM; `details` holds the rest."""

    directory: Path
    kind: str
    rows: int
    dimension: int
    tokenizer_fingerprint: str
    encoder_fingerprint: str
    chunk_len: int = 0
    details: dict = field(default_factory=dict)

    @property
    def parted(self) -> bool:
        """Whether the arrays are written in parts, with parts indexes (see the module doc)."""
        return self.details.get("layout") == PARTS_LAYOUT

    @property
    def encoder_metadata(self) -> dict[str, str]:
        """The encoder fields a datastore's metadata takes from its source: "encoder" (the
        fingerprint) and, for an LM-encoded RETRO source, "encoder_checkpoint"."""
        meta = {"encoder": self.encoder_fingerprint}
        if self.details.get("encoder_checkpoint"):
            meta["encoder_checkpoint"] = str(self.details["encoder_checkpoint"])
        return meta

    @property
    def keys_path(self) -> Path:
        """keys.npy, or keys.parts.json for a source written in parts."""
        return self.directory / (KEYS_PARTS if self.parted else KEYS)

    @property
    def payload(self) -> tuple[str, Path]:
        """(payload name, path) of the source's payload array: NAME.npy or NAME.parts.json."""
        name, file = PAYLOAD_FILES[self.kind]
        return name, self.directory / (f"{name}{PARTS_SUFFIX}" if self.parted else file)

    def open_keys(self) -> np.ndarray | PartedArray:
        """The keys (rows, dimension), memory-mapped, whichever the layout."""
        return open_rows(self.keys_path)

    def open_payload(self) -> np.ndarray | PartedArray:
        """The payload rows (values or tokens), memory-mapped, whichever the layout."""
        return open_rows(self.payload[1])

    def write(self) -> None:
        body = {k: v for k, v in dataclasses.asdict(self).items() if k != "directory"}
        (self.directory / SOURCE_JSON).write_text(json.dumps(body, indent=2))


def read_source(directory: Path) -> SourceInfo:
    """The SourceInfo of a finished source (FileNotFoundError if there is no source.json)."""
    path = Path(directory) / SOURCE_JSON
    if not path.is_file():
        raise FileNotFoundError(f"{directory} is not a finished datastore source (no {SOURCE_JSON})")
    return SourceInfo(directory=Path(directory), **json.loads(path.read_text()))


def start_source(out_dir: Path) -> Path:
    """Creates `out_dir` and removes an old source.json, so a half-rewritten source never looks finished."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / SOURCE_JSON).unlink(missing_ok=True)
    return out_dir


# ---------------------------------------------------------------------------------------------- kNN-LM


def model_fingerprint(model: torch.nn.Module) -> str:
    """"lm:" + a hash of the model's class and state dict: which weights made a kNN-LM source's keys."""
    h = hashlib.sha256(type(model).__name__.encode())
    for name, tensor in model.state_dict().items():
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return "lm:" + h.hexdigest()[:16]


def describe_model(model: torch.nn.Module) -> dict:
    """The model's class and config as plain JSON data, for a kNN-LM source's details."""
    config = getattr(model, "config", None)
    if dataclasses.is_dataclass(config):
        config = dataclasses.asdict(config)
    elif hasattr(config, "to_dict"):  # a Hugging Face config
        config = config.to_dict()
    return {"class": f"{type(model).__module__}.{type(model).__name__}",
            "config": json.loads(json.dumps(config, default=str))}


def knn_windows(n: int, context_len: int, stride: int) -> list[tuple[int, int, int]]:
    """The forward windows that give every position of an n-token stream its kNN-LM key.

    Window (start, lo, hi) runs the model on tokens[start:hi] and keeps the keys of positions [lo, hi).
    Windows are context_len long (shorter only when n < context_len) and keep their last `stride`
    positions (the first window keeps all of its), so every position p has at least
    min(p, context_len - stride) tokens of left context. The kept ranges tile [0, n) in order.
    """
    if not 0 < stride <= context_len:
        raise ValueError(f"stride must be in [1, context_len={context_len}], got {stride}")
    return [(w.start, w.score_from, w.end) for w in iter_windows(n, context_len, stride)]


@torch.inference_mode()
def window_keys(model, tokens: np.ndarray, windows: list[tuple[int, int, int]], device: str) -> np.ndarray:
    """float32 keys of the kept positions of equally long windows, concatenated in window order."""
    batch = torch.from_numpy(np.stack([tokens[s:h] for s, _, h in windows]).astype(np.int64)).to(device)  # (b, W)
    keys = model.keys(batch) if hasattr(model, "keys") else model(batch, return_keys=True)[1]  # (b, W, d)
    keys = keys.float().cpu().numpy()
    return np.concatenate([keys[j, lo - s:h - s] for j, (s, lo, h) in enumerate(windows)])  # (rows, d)


def encode_knnlm(model: torch.nn.Module, store: TokenStore, out_dir: Path, context_len: int = 256, stride: int = 128,
                 batch_size: int = 16, device: str = "cpu", progress: bool = True,
                 fingerprint: str | None = None) -> SourceInfo:
    """Writes a kNN-LM source: row i = the LM's key at stream position i, value = tokens[i + 1].

    Keys come from sliding windows (see `knn_windows`) run cache-free in batches, and are written
    into memory-mapped .npy files as they come, so the stream may be far larger than memory.

    Args:
        model: anything called as `model(tokens (B, T), return_keys=True) -> (logits, keys (B, T, d))`,
            e.g. `TransformerLM` or a Hugging Face adapter, already on `device`; it is put in eval mode.
        store: the train split; its last position has no next token and gets no row.
        out_dir: the source directory (created; an existing source there is overwritten).
        context_len: window length, at most the model's `config.max_len`.
        stride: positions kept per window after the first; each key sees >= context_len - stride tokens.
        batch_size: windows per forward pass.
        device: where the token windows go.
        progress: show a progress bar.
        fingerprint: the model's fingerprint for the datastore's metadata; default `model_fingerprint(model)`.

    Returns:
        The source's `SourceInfo` (kind "knnlm").

    Raises:
        ValueError: a stream of fewer than 2 tokens, a bad stride, or context_len above the model's max_len.
    """
    n = len(store) - 1
    if n < 1:
        raise ValueError(f"{store.directory} has {len(store)} tokens; a kNN-LM source needs at least 2")
    max_len = getattr(getattr(model, "config", None), "max_len", None)
    if isinstance(max_len, int) and context_len > max_len:
        raise ValueError(f"context_len {context_len} exceeds the model's max_len {max_len}")
    windows = knn_windows(n, context_len, stride)
    out_dir = start_source(out_dir)
    started = time.time()
    model.eval()
    tokens = store.tokens
    values = np.lib.format.open_memmap(out_dir / "values.npy", mode="w+", dtype=np.int32, shape=(n,))
    values[:] = tokens[1:n + 1]
    values.flush()
    del values
    keys = None
    for b in tqdm(range(0, len(windows), batch_size), desc="kNN-LM keys", unit="batch", disable=not progress):
        group = windows[b:b + batch_size]
        rows = window_keys(model, tokens, group, device)  # (rows, d)
        if keys is None:
            keys = np.lib.format.open_memmap(out_dir / KEYS, mode="w+", dtype=np.float32, shape=(n, rows.shape[1]))
        keys[group[0][1]:group[-1][2]] = rows
    dimension = keys.shape[1]
    keys.flush()
    del keys
    info = SourceInfo(
        out_dir, "knnlm", n, dimension, store.tokenizer_fingerprint, fingerprint or model_fingerprint(model),
        details={"context_len": context_len, "stride": stride, "model": describe_model(model),
                 "store": str(store.directory), "seconds": round(time.time() - started, 3)})
    info.write()
    log.info("kNN-LM source %s: %d rows of dimension %d", out_dir, n, dimension)
    return info


def knn_exclusions(store: TokenStore, positions: np.ndarray | None = None) -> list[tuple[int, int]]:
    """Per stream position, the kNN-LM rows [start, end) of its own document.

    Row j holds tokens[j] and its value tokens[j + 1], so document [ds, de) owns rows [ds - 1, de)
    (row ds - 1 has the document's first token as its value), clipped to the N - 1 rows.
    """
    positions = np.arange(len(store) - 1) if positions is None else np.asarray(positions)
    starts, ends = _doc_bounds(store)
    docs = np.asarray(store.doc_ids[positions])
    lo = np.maximum(starts[docs] - 1, 0)
    hi = np.minimum(ends[docs], len(store) - 1)
    return list(zip(lo.tolist(), hi.tolist()))


# ---------------------------------------------------------------------------------------------- RETRO


def _doc_bounds(store: TokenStore) -> tuple[np.ndarray, np.ndarray]:
    return (np.array([d.start for d in store.documents], dtype=np.int64),
            np.array([d.end for d in store.documents], dtype=np.int64))


def chunk_payload(tokens: np.ndarray, first: int, last: int, chunk_len: int, eos_id: int) -> np.ndarray:
    """int32 (last - first, 2L): tokens[c*L : c*L + 2L] for chunks c in [first, last), EOS past the end."""
    L = chunk_len
    seg = np.full((last - first + 1) * L, eos_id, dtype=np.int32)
    part = np.asarray(tokens[first * L:min((last + 1) * L, len(tokens))])
    seg[:len(part)] = part
    return np.lib.stride_tricks.sliding_window_view(seg, 2 * L)[::L][:last - first].copy()


def embed_chunks(store: TokenStore, encoder: Encoder, chunk_len: int, out_path: Path | None = None,
                 batch: int = 1024, progress: bool = True) -> np.ndarray:
    """float32 (C, dim) encoder embeddings of the store's C = len(store) // chunk_len chunks.

    With `out_path`, they are written there as a memory-mapped .npy (and the memmap is returned):
    the RETRO queries of a split that is not a datastore, e.g. the held-out chunks.

    Raises:
        ValueError: the store holds no complete chunk.
    """
    C = len(store) // chunk_len
    if chunk_len < 1 or C == 0:
        raise ValueError(f"{store.directory} has {len(store)} tokens: no complete chunk of {chunk_len}")
    shape = (C, encoder.dimension)
    if out_path is None:
        keys = np.empty(shape, dtype=np.float32)
    else:
        keys = np.lib.format.open_memmap(out_path, mode="w+", dtype=np.float32, shape=shape)
    for first in tqdm(range(0, C, batch), desc="embedding chunks", unit="batch", disable=not progress):
        last = min(C, first + batch)
        chunks = np.asarray(store.tokens[first * chunk_len:last * chunk_len]).reshape(last - first, chunk_len)
        keys[first:last] = encoder.embed(chunks)
    if out_path is not None:
        keys.flush()
    return keys


def encode_retro(store: TokenStore, encoder: Encoder, chunk_len: int, out_dir: Path, progress: bool = True,
                 batch: int = 1024, eos_id: int | None = None) -> SourceInfo:
    """Writes a RETRO source: row c = chunk c of the stream, key = its embedding, payload = chunk + continuation.

    Args:
        store: the train split; its last len(store) % chunk_len tokens only appear as a continuation.
        encoder: `ChunkEncoder`, or anything with `.embed(chunks (n, L)) -> (n, dim)`, `.dimension`, `.fingerprint`.
        chunk_len: tokens per chunk (the RETRO model's chunk_len).
        out_dir: the source directory (created; an existing source there is overwritten).
        progress: show progress bars.
        batch: chunks embedded and written per step.
        eos_id: pads continuations past the end of the stream; default the stream's last token, which
            is EOS since every document is followed by one.

    Returns:
        The source's `SourceInfo` (kind "retro").

    Raises:
        ValueError: the store holds no complete chunk.
    """
    out_dir = start_source(out_dir)
    started = time.time()
    eos = int(store.tokens[-1]) if eos_id is None and len(store) else eos_id
    keys = embed_chunks(store, encoder, chunk_len, out_dir / KEYS, batch, progress)
    C = len(keys)
    del keys
    payload = np.lib.format.open_memmap(out_dir / "tokens.npy", mode="w+", dtype=np.int32, shape=(C, 2 * chunk_len))
    for first in range(0, C, batch):
        last = min(C, first + batch)
        payload[first:last] = chunk_payload(store.tokens, first, last, chunk_len, eos)
    payload.flush()
    del payload
    info = SourceInfo(out_dir, "retro", C, int(encoder.dimension), store.tokenizer_fingerprint, encoder.fingerprint,
                      chunk_len, details={"eos_id": eos, "store": str(store.directory),
                                          "seconds": round(time.time() - started, 3), **encoder_details(encoder)})
    info.write()
    log.info("RETRO source %s: %d chunks of %d tokens", out_dir, C, chunk_len)
    return info


def encoder_details(encoder) -> dict[str, str]:
    """A RETRO source's details about its encoder: {"encoder_checkpoint": path} for one that loads
    from a checkpoint (the LM encoder), else nothing."""
    checkpoint = getattr(encoder, "checkpoint", None)
    return {"encoder_checkpoint": str(Path(checkpoint).resolve())} if checkpoint else {}


def chunk_exclusions(store: TokenStore, chunk_len: int) -> list[tuple[int, int]]:
    """Per chunk c of the store, the RETRO rows [start, end) that hold any token of c's own document(s).

    Row r's payload is tokens[r*L : r*L + 2L], so a document [ds, de) reaches rows ds // L - 1 (whose
    continuation holds the document's first tokens) to ceil(de / L) - 1. A chunk that spans several
    documents (it starts in one and ends in a later one) excludes the rows of all of them: they are
    adjacent, so the union is one range. Rows are those of a RETRO source made from this same store
    with this chunk_len; excluding them means a chunk never retrieves any text of its own document.
    """
    L, C = chunk_len, len(store) // chunk_len
    starts, ends = _doc_bounds(store)
    first_doc = np.asarray(store.doc_ids[0:C * L:L])  # (C,) the document of each chunk's first token
    last_doc = np.asarray(store.doc_ids[L - 1:C * L:L])  # (C,) ... and of its last token
    lo = np.maximum(starts[first_doc] // L - 1, 0)
    hi = np.minimum(-(-ends[last_doc] // L), C)
    return list(zip(lo.tolist(), hi.tolist()))


def _check_queries(retriever, queries: np.ndarray, exclude) -> None:
    """ValueError unless every query has the datastore's dimension and keeps >= k rows after its exclusion."""
    C, K, ntotal = len(queries), retriever.config.k, retriever.ntotal
    if C == 0 or queries.ndim != 2 or queries.shape[1] != retriever.dimension:
        raise ValueError(f"queries must be (C > 0, {retriever.dimension}), got {queries.shape}")
    if exclude is not None and len(exclude) != C:
        raise ValueError(f"{len(exclude)} exclusions for {C} queries")
    left = np.array([ntotal - (0 if r is None else r[1] - r[0]) for r in ([None] if exclude is None else exclude)])
    if (left < K).any():
        q = int(np.argmin(left))
        raise ValueError(f"query {q} keeps {left[q]} of {ntotal} rows after excluding "
                         f"{'nothing' if exclude is None else tuple(exclude[q])}: fewer than k={K}")


def precompute_neighbours(retriever, queries: np.ndarray, exclude: Sequence[tuple[int, int] | None] | None,
                          out_path: Path, batch: int = 1024, progress: bool = True) -> Path:
    """Writes the RETRO neighbours of every query chunk, int32 (C, K, 2L), as a memory-mapped .npy.

    Args:
        retriever: a `ServiceRetriever` or `InProcessRetriever` over a RETRO datastore; K = its `config.k`.
        queries: float32 (C, dim) chunk embeddings (a source's keys.npy, or `embed_chunks` of held-out chunks).
        exclude: per query one row range [start, end) to leave out (`chunk_exclusions` for the datastore's
            own chunks), or None for none.
        out_path: the .npy file to write.
        batch: queries per request; the next request is in flight while a batch is written.
        progress: show a progress bar.

    Returns:
        `out_path`.

    Raises:
        ValueError: no queries, a dimension or exclusion count mismatch, or fewer than K rows left to
            some query after its exclusion.
    """
    C = len(queries)
    _check_queries(retriever, queries, exclude)

    def submit(first: int):
        last = min(C, first + batch)
        part = None if exclude is None else list(exclude[first:last])
        return retriever.submit_chunks(np.asarray(queries[first:last], dtype=np.float32), part)

    out, empty = None, 0
    pending = submit(0)
    for first in tqdm(range(0, C, batch), desc="RETRO neighbours", unit="batch", disable=not progress):
        found = pending.result()  # (b, K, 2L)
        if first + batch < C:
            pending = submit(first + batch)
        if out is None:
            out = np.lib.format.open_memmap(out_path, mode="w+", dtype=np.int32, shape=(C, *found.shape[1:]))
        out[first:first + len(found)] = found
        empty += int((found == 0).all(axis=2).sum())
    out.flush()
    del out
    if empty:
        log.warning("%d of %d neighbours came back empty (all-zero tokens): raise nprobe or lower k", empty,
                    C * retriever.config.k)
    return Path(out_path)


# ---------------------------------------------------------------------------------------------- build


def build_source(source_dir: Path, out: Path, shards: int = 2, factory: str = "auto", seed: int = 0,
                 keep_keys: bool = True, num_cpus: int | None = None, overwrite: bool = False,
                 progress: bool = True) -> Path:
    """Builds the datastore of a kNN-LM or RETRO source with `retriever_server`'s build job (a Ray job).

    The payload is "values" (kNN-LM) or "tokens" (RETRO); the manifest's metadata records the source's
    kind, tokenizer and encoder fingerprints ("tokenizer", "encoder"), and "chunk_len" (RETRO) or
    "context_len" (kNN-LM), as strings.

    Args:
        source_dir: a finished source from `encode_knnlm` or `encode_retro`.
        out: where the datastore is published.
        shards, factory, seed, keep_keys, overwrite: as in `retriever_server.build.BuildConfig`.
        num_cpus: CPUs of the local Ray cluster, when one is started.
        progress: show progress bars.

    Returns:
        `out`.

    Raises:
        FileNotFoundError: `source_dir` is not a finished source.
        BuildError: the build failed (see `build_datastore`).
    """
    from retriever_server.build import BuildConfig, build_datastore

    info = read_source(source_dir)
    name, path = info.payload
    metadata = {"kind": info.kind, "tokenizer": info.tokenizer_fingerprint, **info.encoder_metadata}
    if info.kind == "retro":
        metadata["chunk_len"] = str(info.chunk_len)
    else:
        metadata["context_len"] = str(info.details.get("context_len", ""))
    config = BuildConfig(keys=info.keys_path, out=Path(out), payloads={name: path}, factory=factory, shards=shards,
                         seed=seed, keep_keys=keep_keys, overwrite=overwrite, metadata=metadata)
    build_datastore(config, num_cpus=num_cpus, progress=progress)
    return Path(out)
