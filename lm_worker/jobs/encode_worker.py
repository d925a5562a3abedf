"""The encode job's Ray Data actor: it loads the model once, then encodes and writes one part per call.

A part is written into a temporary folder and renamed to `parts/NNNNN/` with `part.json` written
last inside, so a part on disk is whole or absent.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import numpy as np

from lm_worker.data.token_store import TokenStore
from lm_worker.jobs.encode_plan import PART_JSON, EncodeJobConfig, PartSpec, part_dir
from lm_worker.sources.knnlm import knn_windows, window_keys
from lm_worker.sources.retro import chunk_payload, encoder_details
from lm_worker.sources.source import KEYS, PAYLOAD_FILES, Encoder

log = logging.getLogger(__name__)


class KnnlmRows:
    """Loads the LM once; gives the keys and next-token values of a part's windows."""

    def __init__(self, config: EncodeJobConfig, store: TokenStore):
        from lm_worker.models.checkpoint import load_checkpoint
        from lm_worker.models.fingerprint import describe_model, model_fingerprint

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


class RetroRows:
    """Builds the chunk encoder once; gives the embeddings and chunk + continuation tokens of a part."""

    def __init__(self, config: EncodeJobConfig, store: TokenStore, eos_id: int,
                 encoder_factory: Callable[..., Encoder] | None):
        from lm_worker.data.tokenizer import Tokenizer

        tokenizer = Tokenizer.load(Path(config.data) / "tokenizer.json")
        if encoder_factory is None:
            from lm_worker.encoders.registry import make_chunk_encoder

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


def _one_line(err: Exception) -> str:
    """An error as "Type: message", on one line (the driver's EncodeError shows it)."""
    return f"{type(err).__name__}: {err}".replace("\n", " ")


def _log_failure(message: str, *args) -> None:
    """Logs a failure as one line at ERROR, its traceback only at DEBUG: Ray forwards a worker's log to the
    driver, whose EncodeError already says what failed."""
    log.error(message, *args)
    log.debug("the traceback of that failure", exc_info=True)


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
            self.encoder = (KnnlmRows(config, store) if config.kind == "knnlm"
                            else RetroRows(config, store, eos_id, encoder_factory))
        except Exception as err:  # reported per part by __call__
            self.error = _one_line(err)
            _log_failure("the encoder of this worker could not be loaded: %s", self.error)

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
                error = _one_line(err)
                _log_failure("part %d failed: %s", part.index, error)
        return {"index": np.array([part.index]), "error": np.array([error])}

