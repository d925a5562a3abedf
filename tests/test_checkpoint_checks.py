"""What checkpoints check: a digest over what they hold refuses a damaged or edited file (a version-1 file
saved without one still loads); a payload of odd fields is refused naming the file and the field; what loading
would refuse is never saved over the last good file. Also: a ragged cache's `holding` restores its rows
when the forward raises, a stopped and resumed run records the held-out losses of an uninterrupted one,
and `TrainConfig` refuses rates that are not finite and negative thread counts."""

from __future__ import annotations

import collections
import enum
import json
import re
import struct
import zipfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from train_data import small_corpus

from lm_worker.models.checkpoint import (
    checkpoint_kind,
    checkpoint_max_len,
    checkpoint_tokenizer,
    load_checkpoint,
    save_checkpoint,
)
from lm_worker.models.ragged_cache import RaggedKVCache
from lm_worker.models.retro import Retro, RetroConfig
from lm_worker.models.transformer_lm import LMConfig, TransformerLM
from lm_worker.training.config import TrainConfig
from lm_worker.training.train import train


class Level(enum.IntEnum):
    ONE = 1


Pair = collections.namedtuple("Pair", "a b")


class Name(str):
    pass


def save_lm(path: Path, model: TransformerLM | None = None, extra: dict | None = None) -> Path:
    model = model or TransformerLM(LMConfig.tiny(10))
    return save_checkpoint(path, kind="lm", model=model, config=model.config, step=3, tokenizer_fingerprint="bpe:x",
                           extra=extra or {})


def first_data_byte(path: Path) -> int:
    """The offset in the file of the first byte of the first tensor's data (torch's zip stores it unpacked)."""
    info = [i for i in zipfile.ZipFile(path).infolist() if "/data/" in i.filename][0]
    raw = path.read_bytes()
    name_len, extra_len = struct.unpack("<HH", raw[info.header_offset + 26:info.header_offset + 30])
    return info.header_offset + 30 + name_len + extra_len


def test_a_byte_flipped_in_the_weights_is_refused(tmp_path):
    """torch's zip reader checks no CRC: a flipped bit inside tensor data loaded as other weights."""
    path = save_lm(tmp_path / "lm.pt")
    raw = bytearray(path.read_bytes())
    raw[first_data_byte(path) + 5] ^= 0x40
    path.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match=f"^{path} is damaged or edited"):
        load_checkpoint(path)


@pytest.mark.parametrize("kind, field, value", [("retro", "chunk_len", 2), ("retro", "n_neighbours", 3),
                                                ("lm", "n_head", 4), ("lm", "max_len", 64), ("lm", "dropout", 0.5)])
def test_an_edited_config_field_the_weights_do_not_show_is_refused(tmp_path, kind, field, value):
    model = TransformerLM(LMConfig.tiny(10)) if kind == "lm" else Retro(RetroConfig.tiny(10))
    path = save_checkpoint(tmp_path / "m.pt", kind=kind, model=model, config=model.config, step=0,
                           tokenizer_fingerprint="", extra={})
    payload = torch.load(path, weights_only=True)
    payload["config"][field] = value
    torch.save(payload, path)
    with pytest.raises(ValueError, match=f"^{path} is damaged or edited"):
        load_checkpoint(path)


def as_version_1(payload: dict) -> None:
    """The payload as version 1 saved it before digests: no digest at all."""
    payload.update(version=1)
    for name in ("digest", "meta_digest"):
        payload.pop(name)


def test_a_version_1_checkpoint_saved_without_a_digest_still_loads(tmp_path):
    """Older files have no digest, and load unchecked, step and extra as they are."""
    torch.manual_seed(0)
    model = TransformerLM(LMConfig.tiny(10)).eval()
    path = save_lm(tmp_path / "lm.pt", model)
    payload = torch.load(path, weights_only=True)
    assert str(payload["digest"]).startswith("sha256:") and str(payload["meta_digest"]).startswith("sha256:")
    as_version_1(payload)
    payload.update(step=9, extra={"note": 1})
    torch.save(payload, path)
    loaded = load_checkpoint(path)
    assert loaded.config == model.config and (loaded.step, loaded.extra) == (9, {"note": 1})
    assert all(torch.equal(a, b) for a, b in zip(loaded.model.state_dict().values(), model.state_dict().values()))


@pytest.mark.parametrize("extra, words", [
    ({"d": collections.defaultdict(int)}, "extra['d'] is a collections.defaultdict"),
    ({"t": Pair(1, 2)}, "extra['t'] is a "),
    ({"e": Level.ONE}, "extra['e'] is a "),
    ({"s": Name("x")}, "extra['s'] is a "),
    ({Name("k"): 1}, "extra key 'k' is a "),
])
def test_extras_loading_would_refuse_are_not_saved_over_the_last_checkpoint(tmp_path, extra, words):
    """Subclasses of the plain types passed isinstance checks, were saved, and then never loaded."""
    path = save_lm(tmp_path / "lm.pt")
    before = path.read_bytes()
    with pytest.raises(ValueError, match="^" + re.escape(words)):
        save_lm(path, extra=extra)
    assert path.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["lm.pt"]


def test_a_config_loading_would_refuse_is_not_saved(tmp_path):
    path = save_lm(tmp_path / "lm.pt")
    before = path.read_bytes()
    model = TransformerLM(LMConfig.tiny(10, n_layer=Level.ONE))  # an int to the config's own checks
    with pytest.raises(ValueError, match=r"^config\['n_layer'\] is a "):
        save_lm(path, model)
    assert path.read_bytes() == before


def test_a_numpy_dropout_is_saved_as_a_python_float(tmp_path):
    model = TransformerLM(LMConfig.tiny(10, dropout=np.float64(0.1)))
    loaded = load_checkpoint(save_lm(tmp_path / "lm.pt", model))
    assert loaded.config.dropout == 0.1 and type(loaded.config.dropout) is float


def drop(name):
    return lambda c: c.pop(name)


def put(**fields):
    return lambda c: c.update(fields)


def untie(c):
    c["model"]["head.weight"] = torch.zeros_like(c["model"]["head.weight"])


ODD = {  # name: (change, field or words named, whether the readers that build no model refuse it too)
    "no kind": (drop("kind"), "kind", True),
    "kind list": (put(kind=["lm"]), "kind", True),
    "kind unknown": (put(kind="gpt"), "kind", True),
    "config list": (put(config=[1, 2]), "config", True),
    "config str": (put(config="x"), "config", True),
    "no step": (drop("step"), "step", True),
    "step str": (put(step="abc"), "step", True),
    "step tensor": (put(step=torch.zeros(2)), "step", True),
    "step bool": (put(step=True), "step", True),
    "no fingerprint": (drop("tokenizer_fingerprint"), "tokenizer_fingerprint", True),
    "fingerprint int": (put(tokenizer_fingerprint=3), "tokenizer_fingerprint", True),
    "no optimizer": (drop("optimizer"), "optimizer", True),
    "optimizer list": (put(optimizer=[1]), "optimizer", True),
    "model list": (put(model=[1]), "model", True),
    "model None": (put(model=None), "model", True),
    "model of strings": (put(model={"tok_emb.weight": "x"}), "model", True),
    "extra list": (put(extra=[1]), "extra", True),
    "weight nan": (lambda c: c["model"]["tok_emb.weight"].fill_(float("nan")), "damaged or edited", False),
    "weight float64": (lambda c: c["model"].update({"tok_emb.weight": c["model"]["tok_emb.weight"].double()}),
                       "tok_emb.weight", False),
    "tied head differs": (untie, "head.weight", False),
}


@pytest.mark.parametrize("name", sorted(ODD))
def test_a_payload_of_odd_fields_is_refused_naming_the_file_and_the_field(tmp_path, name):
    """Each raised a bare KeyError, TypeError or AttributeError naming no file, or loaded other weights."""
    change, field, cheap = ODD[name]
    payload = torch.load(save_lm(tmp_path / "a.pt"), weights_only=True)
    change(payload)
    path = tmp_path / "b.pt"
    torch.save(payload, path)
    for read in (load_checkpoint, checkpoint_kind, checkpoint_max_len, checkpoint_tokenizer)[:4 if cheap else 1]:
        with pytest.raises(ValueError) as refused:
            read(path)
        words = field if " " in field else f"'{field}'"
        assert str(refused.value).startswith(str(path)) and words in str(refused.value), str(refused.value)


@pytest.mark.parametrize("change, words", [
    (untie, "'head.weight'.*'tok_emb.weight'|'tok_emb.weight'.*'head.weight'"),
    (lambda c: c["model"].update({"tok_emb.weight": c["model"]["tok_emb.weight"].double()}), "'tok_emb.weight'"),
])
def test_odd_weights_are_refused_without_a_digest(tmp_path, change, words):
    payload = torch.load(save_lm(tmp_path / "a.pt"), weights_only=True)
    as_version_1(payload)
    change(payload)
    torch.save(payload, tmp_path / "b.pt")
    with pytest.raises(ValueError, match=f"^{tmp_path / 'b.pt'} does not hold a loadable lm model: .*({words})"):
        load_checkpoint(tmp_path / "b.pt")


def test_holding_restores_the_lengths_when_the_forward_raises():
    torch.manual_seed(0)
    lm = TransformerLM(LMConfig.tiny(50, max_len=8)).eval()
    cache = RaggedKVCache(lm.config.n_layer, by_length=True)
    with torch.no_grad():
        lm(torch.randint(0, 50, (2, 8)), cache=cache)  # both rows at max_len
        cache.truncate(torch.tensor([1]), torch.tensor([5]))
        with pytest.raises(ValueError, match="99"):
            with cache.holding([0], max_len=8):
                lm(torch.tensor([[3], [99]]), cache=cache)  # an id outside the vocabulary
    assert cache.lengths.tolist() == [8, 5] and cache.idle == []


def test_a_stopped_and_resumed_run_records_the_held_out_losses_of_an_uninterrupted_one(tmp_path):
    """A run stopped at step 6 (no eval step) recorded its held-out loss there too: [4, 6, 8, 12]."""
    (tmp_path / "corpus").mkdir()
    (tmp_path / "data").mkdir()
    data = small_corpus(tmp_path / "corpus", tmp_path / "data")
    config = TrainConfig(kind="lm", preset="tiny", seq_len=32, batch_size=4, steps=12, warmup=2, eval_every=4,
                         eval_batches=1, checkpoint_every=4, device="cpu")
    train(config, data, tmp_path / "straight", progress=False)
    stopped = train(config, data, tmp_path / "resumed", progress=False, stop_at=6)
    assert stopped.steps == 6 and np.isfinite(stopped.heldout_loss)
    train(config, data, tmp_path / "resumed", progress=False)
    losses = {run: json.loads((tmp_path / run / "losses.json").read_text()) for run in ("straight", "resumed")}
    assert [step for step, _ in losses["resumed"]["heldout"]] == [4, 8, 12]
    assert np.allclose(losses["resumed"]["heldout"], losses["straight"]["heldout"], rtol=1e-6)


@pytest.mark.parametrize("field, value", [("lr", float("nan")), ("lr", float("inf")), ("lr", 0.0),
                                          ("min_lr", float("nan")), ("min_lr", float("inf")), ("min_lr", -1e-4),
                                          ("threads", -1)])
def test_train_config_refuses_rates_that_are_not_finite_and_negative_threads(field, value):
    with pytest.raises(ValueError, match=rf"^{field} must be "):
        replace(TrainConfig(), **{field: value})

