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

    Args:
        metadata: the manifest's metadata (`retriever.metadata`) or a source's
            (`SourceInfo.encoder_metadata`); "encoder" is the fingerprint, "encoder_checkpoint" the
            LM checkpoint of an LM encoder.
        tokenizer: the corpus tokenizer (the MiniLM encoder decodes chunks to text).
        lm_checkpoint: overrides "encoder_checkpoint" (a run moved elsewhere).

    Raises:
        ValueError: an LM encoder without a checkpoint, or one whose weights differ from those
            that made the keys.
    """
    from lm_worker.encoders.lm_chunks import PREFIX, LMChunkEncoder

    fingerprint = metadata.get("encoder", "")
    if not fingerprint.startswith(PREFIX):
        return make_chunk_encoder("minilm", tokenizer, threads=threads, device=device)
    path = lm_checkpoint or metadata.get("encoder_checkpoint")
    if not path:
        raise ValueError(f"the datastore's keys were made by the LM {fingerprint[:80]!r} but it names no "
                         "checkpoint: pass the base LM's checkpoint")
    encoder = LMChunkEncoder.load(Path(path), device=device)
    if encoder.fingerprint != fingerprint:  # the metadata's values, from the datastore, escaped as repr
        raise ValueError(f"the datastore's keys were made by {fingerprint[:80]!r}, but {str(path)[:200]!r} is "
                         f"{encoder.fingerprint!r}: pass the base LM that encoded the RETRO source")
    return encoder
