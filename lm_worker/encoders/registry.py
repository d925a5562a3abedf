"""Which frozen encoder embeds RETRO chunks: chosen by name when a source is encoded, and found
again from a datastore's metadata wherever its neighbours are fetched (evaluation, decoding,
training neighbours, attention maps), so queries are always embedded like the stored keys.

    minilm  MiniLM sentence embedding of the chunk's text (`ChunkEncoder`, 384-d)
    lm      the base LM's kNN-LM key at the chunk's last token (`LMChunkEncoder`, d_model)

Example:
    >>> encoder = make_chunk_encoder("lm", tokenizer, lm_checkpoint=Path("run/lm"))
    >>> encoder = chunk_encoder_for(retriever.metadata, tokenizer)  # the datastore's own encoder
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path

ENCODERS = ("minilm", "lm")  # the encoders are imported when made: reading this needs no torch


def make_chunk_encoder(name: str, tokenizer, lm_checkpoint: Path | None = None, threads: int = 0,
                       device: str = "cpu"):
    """The chunk encoder called `name` (one of ENCODERS); "lm" needs the LM's checkpoint."""
    if name == "minilm":
        from lm_worker.encoders.minilm_chunks import ChunkEncoder

        return ChunkEncoder(tokenizer, threads=threads, device=device)
    if name == "lm":
        from lm_worker.encoders.lm_chunks import LMChunkEncoder

        if lm_checkpoint is None:
            raise ValueError("the 'lm' chunk encoder needs the base LM's checkpoint")
        return LMChunkEncoder.load(Path(lm_checkpoint), device=device)
    raise ValueError(f"unknown chunk encoder {name!r}: expected one of {ENCODERS}")


def chunk_encoder_for(metadata: Mapping[str, str], tokenizer, lm_checkpoint: Path | None = None, threads: int = 0,
                      device: str = "cpu"):
    """The encoder that made the keys of a RETRO datastore (or source), from its metadata.

    The encoder made has exactly the fingerprint the metadata names: an LM's ("lm-last:...") or the
    MiniLM chunk encoder's ("minilm-l6-v2:<weights>/wp<N>", N word pieces a chunk). Metadata that
    names no encoder (a datastore built from keys of the user's own, without `--meta encoder=...`)
    gets the MiniLM chunk encoder.

    Args:
        metadata: the manifest's metadata (`retriever.metadata`) or a source's
            (`SourceInfo.encoder_metadata`); "encoder" is the fingerprint, "encoder_checkpoint" the
            LM checkpoint of an LM encoder.
        tokenizer: the corpus tokenizer (the MiniLM encoder decodes chunks to text).
        lm_checkpoint: overrides "encoder_checkpoint" (a run moved elsewhere).

    Raises:
        ValueError: an LM encoder without a checkpoint, or whose checkpoint is not here (pass
            `lm_checkpoint`: --encoder-lm); or an encoder here whose fingerprint differs from the one
            that made the keys (another LM, other MiniLM weights or settings, an encoder this project
            does not make); the message names both, the metadata's escaped and cut.
    """
    from lm_worker.encoders.lm_chunks import PREFIX, LMChunkEncoder

    fingerprint = str(metadata.get("encoder", "") or "")
    if not fingerprint.startswith(PREFIX):
        encoder = _minilm_for(fingerprint, tokenizer, threads, device)
        if fingerprint and encoder.fingerprint != fingerprint:  # the metadata's value, from the datastore: repr, cut
            raise ValueError(f"the datastore's keys were made by the encoder {fingerprint[:80]!r}, but the MiniLM "
                             f"chunk encoder here is {encoder.fingerprint!r}: queries it embeds would not match them")
        return encoder
    path = lm_checkpoint or metadata.get("encoder_checkpoint")
    if not path:
        raise ValueError(f"the datastore's keys were made by the LM {fingerprint[:80]!r} but it names no "
                         "checkpoint: pass the base LM's checkpoint")
    check_checkpoint_here(str(path), fingerprint, given=lm_checkpoint is not None)
    encoder = LMChunkEncoder.load(Path(path), device=device)
    if encoder.fingerprint != fingerprint:  # the metadata's values, from the datastore, escaped as repr
        raise ValueError(f"the datastore's keys were made by {fingerprint[:80]!r}, but {str(path)[:200]!r} is "
                         f"{encoder.fingerprint!r}: pass the base LM that encoded the RETRO source")
    return encoder


def check_checkpoint_here(path: str, fingerprint: str, given: bool) -> None:
    """ValueError, naming `path` escaped and cut, where no LM checkpoint is at it: the path the
    datastore's metadata recorded (a run moved elsewhere, another machine), or the one `given`."""
    if os.path.exists(path):  # False also where the path cannot be looked at (too long, not a folder)
        return
    shown = f"{path[:200]!r}{' (cut)' if len(path) > 200 else ''}"
    if given:
        raise ValueError(f"no LM checkpoint at {shown} (--encoder-lm): pass the base LM's checkpoint that "
                         f"encoded the RETRO source ({fingerprint[:80]!r})")
    raise ValueError(f"the datastore's keys were made by the LM {fingerprint[:80]!r} from the checkpoint {shown}, "
                     "which is not here: pass the base LM's checkpoint with --encoder-lm (lm_checkpoint=)")


def _minilm_for(fingerprint: str, tokenizer, threads: int, device: str):
    """The MiniLM chunk encoder with the word-piece limit that `fingerprint` names ("/wpN"), else the default."""
    from lm_worker.encoders.minilm import names_these_weights
    from lm_worker.encoders.minilm_chunks import MAX_WORDPIECES, ChunkEncoder

    match = re.fullmatch(r"(minilm-l6-v2:[0-9a-f]+)/wp([1-9][0-9]{0,3})", fingerprint)
    if match is None or int(match.group(2)) > MAX_WORDPIECES:  # refused by the caller, naming both fingerprints
        return make_chunk_encoder("minilm", tokenizer, threads=threads, device=device)
    encoder = ChunkEncoder(tokenizer, max_wordpieces=int(match.group(2)), threads=threads, device=device)
    if names_these_weights(match.group(1)):  # these weights, perhaps by the digest older datastores recorded
        encoder.fingerprint = fingerprint
    return encoder
