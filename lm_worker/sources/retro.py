"""A RETRO source: one row per chunk of the train stream, its frozen-encoder embedding as key and the
chunk with its continuation as payload.

Example:
    >>> train = TokenStore.open(Path("run/data/train"))
    >>> encode_retro(train, ChunkEncoder(tokenizer), 16, Path("run/retro-source"))
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import time
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from lm_worker.data.token_store import TokenStore
from lm_worker.sources.output import new_source
from lm_worker.sources.source import KEYS, Encoder, SourceInfo, written_whole

log = logging.getLogger(__name__)


def chunk_payload(tokens: np.ndarray, first: int, last: int, chunk_len: int, eos_id: int) -> np.ndarray:
    """int32 (last - first, 2L): tokens[c*L : c*L + 2L] for chunks c in [first, last), EOS past the end."""
    L = chunk_len
    seg = np.full((last - first + 1) * L, eos_id, dtype=np.int32)
    part = np.asarray(tokens[first * L:min((last + 1) * L, len(tokens))])
    seg[:len(part)] = part
    return np.lib.stride_tricks.sliding_window_view(seg, 2 * L)[::L][:last - first].copy()


def embed_chunks(store: TokenStore, encoder: Encoder, chunk_len: int, out_path: Path | None = None,
                 batch: int = 1024, progress: bool = True, record: dict | None = None) -> np.ndarray:
    """float32 (C, dim) encoder embeddings of the store's C = len(store) // chunk_len chunks.

    With `out_path`, they are written there as a .npy (and returned memory-mapped): the RETRO queries of
    a split that is not a datastore, e.g. the held-out chunks. The file is written under another name
    and renamed when whole, so an interrupted run leaves what was there before; `record` (`keys_record`)
    is then written beside it, for `keys_made_from` to tell whether the file holds these chunks' keys.

    Raises:
        ValueError: chunk_len < 1, or the store holds no complete chunk.
    """
    if chunk_len < 1:
        raise ValueError(f"chunk_len must be >= 1, got {chunk_len}")
    C = len(store) // chunk_len
    if C == 0:
        raise ValueError(f"{store.directory} has {len(store)} tokens: no complete chunk of {chunk_len}")
    shape = (C, encoder.dimension)
    if out_path is None:
        return _embed_into(np.empty(shape, dtype=np.float32), store, encoder, chunk_len, batch, progress)
    out_path = Path(out_path)
    with written_whole(out_path) as partial:
        keys = np.lib.format.open_memmap(partial, mode="w+", dtype=np.float32, shape=shape)
        _embed_into(keys, store, encoder, chunk_len, batch, progress).flush()
        del keys
        out_path.with_suffix(".json").unlink(missing_ok=True)  # the record of the file about to be replaced
    if record is not None:
        tmp = out_path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(record))
        tmp.replace(out_path.with_suffix(".json"))
    return np.load(out_path, mmap_mode="r")


def _embed_into(keys: np.ndarray, store: TokenStore, encoder: Encoder, chunk_len: int, batch: int,
                progress: bool) -> np.ndarray:
    C = len(keys)
    for first in tqdm(range(0, C, batch), desc="embedding chunks", unit="batch", disable=not progress):
        last = min(C, first + batch)
        chunks = np.asarray(store.tokens[first * chunk_len:last * chunk_len]).reshape(last - first, chunk_len)
        keys[first:last] = encoder.embed(chunks)
    return keys


def tokens_digest(store: TokenStore, end: int | None = None) -> str:
    """The sha256 (hex) of the store's token ids [0, end) (default: all of them), as int32 bytes."""
    digest, end = hashlib.sha256(), len(store) if end is None else end
    for first in range(0, end, 1 << 22):  # a block at a time: a split may not fit in memory twice
        digest.update(np.ascontiguousarray(store.tokens[first:min(end, first + (1 << 22))]).tobytes())
    return digest.hexdigest()


def keys_record(store: TokenStore, chunk_len: int, encoder_fingerprint: str) -> dict:
    """What a split's keys file was made from: the encoder, the chunk length, and the store's tokens (their
    count, tokenizer and a digest of the chunked ones)."""
    end = len(store) // chunk_len * chunk_len
    return {"encoder": encoder_fingerprint, "chunk_len": chunk_len, "tokens": len(store),
            "tokenizer": store.tokenizer_fingerprint, "digest": tokens_digest(store, end)}


def keys_made_from(path: Path, record: dict) -> bool:
    """Whether the keys file `path` is there, whole, with the `record` written beside it by `embed_chunks`."""
    try:
        return path.is_file() and json.loads(path.with_suffix(".json").read_text()) == record
    except (OSError, ValueError):
        return False


def encode_retro(store: TokenStore, encoder: Encoder, chunk_len: int, out_dir: Path, progress: bool = True,
                 batch: int = 1024, eos_id: int | None = None) -> SourceInfo:
    """Writes a RETRO source: row c = chunk c of the stream, key = its embedding, payload = chunk + continuation.

    Args:
        store: the train split; its last len(store) % chunk_len tokens only appear as a continuation.
        encoder: `ChunkEncoder`, or anything with `.embed(chunks (n, L)) -> (n, dim)`, `.dimension`, `.fingerprint`.
        chunk_len: tokens per chunk (the RETRO model's chunk_len).
        out_dir: the source directory (created; an existing source there is replaced once the new
            one is whole, and the folder's other files are kept; see `lm_worker.sources.output`).
        progress: show progress bars.
        batch: chunks embedded and written per step.
        eos_id: pads continuations past the end of the stream; default the stream's last token, which
            is EOS since every document is followed by one.

    Returns:
        The source's `SourceInfo` (kind "retro").

    Raises:
        ValueError: chunk_len < 1, the store holds no complete chunk, or `out_dir` holds files but no
            source (each before anything is written).
    """
    if chunk_len < 1:  # every check before the work starts: a failed encode leaves out_dir as it was
        raise ValueError(f"chunk_len must be >= 1, got {chunk_len}")
    if len(store) // chunk_len == 0:
        raise ValueError(f"{store.directory} has {len(store)} tokens: no complete chunk of {chunk_len}")
    started = time.time()
    eos = int(store.tokens[-1]) if eos_id is None else eos_id
    with new_source(out_dir) as work:
        keys = embed_chunks(store, encoder, chunk_len, work / KEYS, batch, progress)
        C = len(keys)
        del keys
        payload = np.lib.format.open_memmap(work / "tokens.npy", mode="w+", dtype=np.int32, shape=(C, 2 * chunk_len))
        for first in range(0, C, batch):
            last = min(C, first + batch)
            payload[first:last] = chunk_payload(store.tokens, first, last, chunk_len, eos)
        payload.flush()
        del payload
        info = SourceInfo(work, "retro", C, int(encoder.dimension), store.tokenizer_fingerprint, encoder.fingerprint,
                          chunk_len, details={"eos_id": eos, "store": str(store.directory),
                                              "seconds": round(time.time() - started, 3), **encoder_details(encoder)})
        info.write()
    log.info("RETRO source %s: %d chunks of %d tokens", out_dir, C, chunk_len)
    return dataclasses.replace(info, directory=Path(out_dir))


def encoder_details(encoder) -> dict[str, str]:
    """A RETRO source's details about its encoder: {"encoder_checkpoint": path} for one that loads
    from a checkpoint (the LM encoder), else nothing."""
    checkpoint = getattr(encoder, "checkpoint", None)
    return {"encoder_checkpoint": str(Path(checkpoint).resolve())} if checkpoint else {}

