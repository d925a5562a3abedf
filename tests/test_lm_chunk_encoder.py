"""The LM as RETRO's chunk encoder: its keys against the LM's full forward pass, and the encoder
found again from a built datastore's metadata (and refused when the checkpoint changed)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lm_worker.data.token_store import write_token_store
from lm_worker.encoders.lm_chunks import PREFIX, LMChunkEncoder
from lm_worker.encoders.minilm import legacy_weights_fingerprint
from lm_worker.encoders.minilm_chunks import ChunkEncoder
from lm_worker.encoders.registry import chunk_encoder_for, make_chunk_encoder
from lm_worker.jobs.encode_plan import EncodeJobConfig, check_config
from lm_worker.models.checkpoint import save_checkpoint
from lm_worker.models.transformer_lm import LMConfig, TransformerLM
from lm_worker.retrieval.config import RetrievalConfig
from lm_worker.retrieval.in_process import InProcessRetriever
from lm_worker.sources.build import build_source
from lm_worker.sources.retro import encode_retro
from lm_worker.sources.source import read_source

L, VOCAB = 4, 64


def tiny_lm(seed: int) -> TransformerLM:
    torch.manual_seed(seed)
    return TransformerLM(LMConfig.tiny(vocab_size=VOCAB, max_len=32)).eval()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("lm") / "checkpoint.pt"
    model = tiny_lm(0)
    return save_checkpoint(path, kind="lm", model=model, config=model.config, step=1,
                           tokenizer_fingerprint="test:tokenizer", extra={})


def test_keys_are_the_lm_state_at_each_chunks_last_token(checkpoint):
    encoder = LMChunkEncoder.load(checkpoint, batch_size=3)  # several batches
    chunks = np.random.default_rng(0).integers(1, VOCAB, (7, L))
    got = encoder.embed(chunks)
    model = tiny_lm(0)
    with torch.inference_mode():
        _, keys = model(torch.as_tensor(chunks), return_keys=True)  # the full forward, not keys()
    assert got.shape == (7, model.config.d_model) and got.dtype == np.float32
    np.testing.assert_allclose(got, keys[:, -1].numpy(), rtol=1e-5, atol=1e-6)
    # a chunk's key depends on its own tokens alone: the same chunk in another batch gives the same key
    np.testing.assert_allclose(encoder.embed(chunks[4:5]), got[4:5], rtol=1e-5, atol=1e-6)
    assert encoder.fingerprint.startswith(PREFIX) and encoder.dimension == model.config.d_model
    assert LMChunkEncoder(tiny_lm(1)).fingerprint != encoder.fingerprint


def test_bad_inputs(checkpoint, tmp_path):
    with pytest.raises(ValueError, match="needs the base LM's checkpoint"):
        make_chunk_encoder("lm", tokenizer=None)
    with pytest.raises(ValueError, match="unknown chunk encoder"):
        make_chunk_encoder("bert", tokenizer=None)
    with pytest.raises(ValueError, match="chunks must be"):
        LMChunkEncoder.load(checkpoint).embed(np.zeros(4, dtype=np.int64))
    with pytest.raises(ValueError, match="checkpoint is required for a RETRO source with encoder 'lm'"):
        check_config(EncodeJobConfig(kind="retro", data=tmp_path, encoder="lm"))
    with pytest.raises(ValueError, match="encoder must be"):
        check_config(EncodeJobConfig(kind="retro", data=tmp_path, encoder="bert"))


@pytest.mark.ray
def test_datastore_names_its_encoder(ray_cluster, checkpoint, tmp_path):
    rng = np.random.default_rng(2)
    docs = [(f"doc{i}", rng.integers(1, VOCAB, n).tolist()) for i, n in enumerate([30, 45, 21])]
    store = write_token_store(tmp_path / "store", docs, 0, "test:tokenizer")
    encoder = LMChunkEncoder.load(checkpoint)
    info = encode_retro(store, encoder, L, tmp_path / "src", progress=False)
    assert info.encoder_fingerprint == encoder.fingerprint
    assert read_source(tmp_path / "src").encoder_metadata["encoder_checkpoint"] == str(checkpoint.resolve())
    ds = build_source(tmp_path / "src", tmp_path / "ds", shards=2, factory="IVF1,Flat", progress=False)
    with InProcessRetriever(ds, RetrievalConfig(k=2)) as retriever:
        found = chunk_encoder_for(retriever.metadata, tokenizer=None)
        assert isinstance(found, LMChunkEncoder) and found.fingerprint == encoder.fingerprint
        chunks = np.asarray(store.tokens[: info.rows * L]).reshape(info.rows, L)
        keys = np.load(tmp_path / "src" / "keys.npy")
        np.testing.assert_array_equal(found.embed(chunks), keys)  # queries embedded exactly as the stored keys
        # each chunk's own row is its nearest neighbour: payload = the chunk and its continuation
        neighbours = retriever.submit_chunks(found.embed(chunks), None).result()  # (C, 2, 2L)
        np.testing.assert_array_equal(neighbours[:, 0, :L], chunks)
        other = tmp_path / "other.pt"
        model = tiny_lm(1)
        save_checkpoint(other, kind="lm", model=model, config=model.config, step=1,
                        tokenizer_fingerprint="test:tokenizer", extra={})
        with pytest.raises(ValueError, match="pass the base LM that encoded the RETRO source"):
            chunk_encoder_for(retriever.metadata, tokenizer=None, lm_checkpoint=other)
        with pytest.raises(ValueError, match="names no checkpoint"):
            chunk_encoder_for({"encoder": encoder.fingerprint}, tokenizer=None)
        forged = encoder.fingerprint + "\n2026-01-01 ERROR a forged line\x1b[31m"
        for metadata, checkpoint in (({"encoder": forged}, None), ({"encoder": forged}, other)):
            with pytest.raises(ValueError) as refused:  # the datastore's words escaped: one line, no codes
                chunk_encoder_for(metadata, tokenizer=None, lm_checkpoint=checkpoint)
            assert "\n" not in str(refused.value) and "\x1b" not in str(refused.value)


def test_the_encoder_found_has_the_fingerprint_the_metadata_names():
    """MiniLM is made for its own fingerprint (its word-piece limit too) or for metadata naming no encoder;
    any other fingerprint (other weights or settings, an encoder this project does not make) is refused,
    naming both, the datastore's words escaped and cut."""
    minilm = ChunkEncoder(tokenizer=None)
    assert chunk_encoder_for({"encoder": minilm.fingerprint}, tokenizer=None).fingerprint == minilm.fingerprint
    assert minilm.fingerprint.endswith("/wp256")  # all-MiniLM-L6-v2's own max_seq_length
    wp64 = minilm.fingerprint.replace("/wp256", "/wp64")  # the limit of datastores built before it
    assert chunk_encoder_for({"encoder": wp64}, tokenizer=None).fingerprint == wp64
    legacy = f"{legacy_weights_fingerprint()}/wp64"  # the same weights, as datastores built before recorded them
    assert legacy != wp64 and chunk_encoder_for({"encoder": legacy}, tokenizer=None).fingerprint == legacy
    assert isinstance(chunk_encoder_for({}, tokenizer=None), ChunkEncoder)  # keys of the user's own, no encoder named
    weights = minilm.fingerprint.split("/")[0]
    for other in ("minilm-l6-v2:000000000000/wp64", "minilm-l6-v2:000000000000/wp32", "my-custom-encoder:abc",
                  f"{weights}/wp600", f"{weights}/wp9999",  # past MiniLM's 512 positions
                  "forged\n2026-01-01 ERROR a forged line\x1b[31m" + "x" * 200):
        with pytest.raises(ValueError) as refused:
            chunk_encoder_for({"encoder": other}, tokenizer=None)
        message = str(refused.value)
        assert repr(other[:80]) in message and f"here is '{minilm.fingerprint.split('/')[0]}/wp" in message, message
        assert "\n" not in message and "\x1b" not in message and "x" * 100 not in message


def test_minilm_reads_a_whole_chunk_and_its_fingerprint_every_weight(tmp_path, caplog):
    """A chunk of 64 BPE tokens of code runs to about 70-100 word pieces: the default limit (MiniLM's own
    256) embeds all of it, where the old 64 left its end out; a limit cuts what is over it and the log
    counts such chunks. The weights' fingerprint covers the whole file: a byte changed past the first
    MiB (where only the embeddings lie) gives another."""
    from lm_worker.data.tokenizer import train_tokenizer
    from lm_worker.encoders.minilm import files_digest

    text = "def normalise(path_name, separator='/'):\n    return separator.join(p for p in path_name.split())\n"
    tokenizer = train_tokenizer([text * 40], vocab_size=300)
    chunk = np.asarray(tokenizer.encode(text * 8)[:64])[None]  # (1, 64)
    whole, cut = ChunkEncoder(tokenizer), ChunkEncoder(tokenizer, max_wordpieces=64)
    pieces = len(whole.minilm.token_ids(tokenizer.decode(chunk[0])))
    assert 64 < pieces <= 256
    reference = ChunkEncoder(tokenizer, max_wordpieces=pieces)  # exactly the chunk's own word pieces
    np.testing.assert_allclose(whole.embed(chunk), reference.embed(chunk), atol=1e-6)
    assert float(np.abs(cut.embed(chunk) - whole.embed(chunk)).max()) > 1e-3
    with caplog.at_level("INFO", logger="lm_worker.encoders.minilm_chunks"):
        cut.embed(np.repeat(chunk, 3, axis=0), progress=True)
    assert "3 of 3 chunks were longer than 64 word pieces" in caplog.text and whole.cut == 0
    with pytest.raises(ValueError, match=r"max_wordpieces must be in \[1, 510\]"):
        ChunkEncoder(tokenizer, max_wordpieces=511)
    data = np.random.default_rng(0).integers(0, 256, 3 << 20, dtype=np.uint8).tobytes()
    (tmp_path / "a").write_bytes(data)
    (tmp_path / "b").write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    assert files_digest((tmp_path / "a",)) != files_digest((tmp_path / "b",))
