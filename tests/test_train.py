"""Training: the loss falls on a repetitive corpus, a stopped and resumed run equals an uninterrupted
one, checkpoints round-trip, RETRO trains on precomputed neighbours aligned with its chunks, and bad
inputs fail with clear messages. Tiny presets, a tiny corpus prepared in a temporary folder. (Checkpoint
files themselves: test_checkpoint.py.)"""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from train_data import L, fake_neighbours, small_corpus

from lm_worker.data.prepare import PrepareConfig, prepare_corpus
from lm_worker.data.token_store import TokenStore, write_token_store
from lm_worker.data.tokenizer import Tokenizer
from lm_worker.models.checkpoint import load_checkpoint
from lm_worker.models.retro import RetroConfig
from lm_worker.models.transformer_lm import LMConfig
from lm_worker.training.batches import Windows
from lm_worker.training.config import TrainConfig, lr_at
from lm_worker.training.train import evaluate, train

BASE = TrainConfig(kind="lm", preset="tiny", seq_len=32, batch_size=8, steps=30, lr=3e-3, min_lr=3e-4, warmup=5,
                   eval_every=10, eval_batches=2, checkpoint_every=10, device="cpu")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return small_corpus(tmp_path_factory.mktemp("corpus"), tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def neighbours_dir(data, tmp_path_factory) -> Path:
    return fake_neighbours(data, tmp_path_factory.mktemp("retro-source"))


@pytest.fixture(scope="module")
def lm_run(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("lm")
    return out, train(replace(BASE, steps=40), data, out, progress=False)


def vocab_size(data: Path) -> int:
    return Tokenizer.load(data / "tokenizer.json").vocab_size


def test_loss_decreases_and_outputs_are_written(lm_run, data):
    out, report = lm_run
    losses = json.loads((out / "losses.json").read_text())
    train_losses = [v for _, v in losses["train"]]
    assert [s for s, _ in losses["train"]] == list(range(1, 41))
    assert [s for s, _ in losses["heldout"]] == [10, 20, 30, 40]
    assert np.mean(train_losses[-5:]) < np.mean(train_losses[:5]) - 1.0
    assert report.heldout_loss == losses["heldout"][-1][1] < losses["heldout"][0][1]
    assert report.heldout_loss < math.log(vocab_size(data)) - 1.0
    assert report.steps == 40 and report.tokens_per_s > 0
    assert report.plot == out / "loss.png" and report.plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert report.checkpoint == out / "checkpoint.pt"
    assert not [p for p in out.iterdir() if "tmp" in p.name]


def test_checkpoint_holds_the_trained_model(lm_run, data):
    out, report = lm_run
    loaded = load_checkpoint(out)  # the folder resolves to its checkpoint.pt
    assert loaded.kind == "lm" and loaded.step == 40 and not loaded.model.training
    assert loaded.config == LMConfig.tiny(vocab_size(data), max_len=128)
    assert loaded.tokenizer_fingerprint == TokenStore.open(data / "train").tokenizer_fingerprint
    assert loaded.extra["train_config"]["steps"] == 40 and loaded.optimizer_state is not None
    heldout = Windows(TokenStore.open(data / "heldout"), BASE.seq_len)
    indices = heldout.fixed(BASE.eval_batches * BASE.batch_size)
    loss = evaluate(loaded.model, heldout, indices, BASE.batch_size, torch.device("cpu"))
    assert loss == pytest.approx(report.heldout_loss, rel=1e-6)


def test_resume_equals_uninterrupted(data, tmp_path):
    config = replace(BASE, steps=20, checkpoint_every=4)
    straight = train(config, data, tmp_path / "straight", progress=False)
    first = train(config, data, tmp_path / "resumed", progress=False, stop_at=10)
    assert first.steps == 10 and load_checkpoint(tmp_path / "resumed").step == 10
    resumed = train(config, data, tmp_path / "resumed", progress=False)
    assert resumed.steps == 20
    a, b = load_checkpoint(straight.checkpoint), load_checkpoint(resumed.checkpoint)
    assert a.step == b.step == 20
    for name, tensor in a.model.state_dict().items():
        torch.testing.assert_close(b.model.state_dict()[name], tensor, rtol=1e-6, atol=1e-7, msg=name)
    losses_a = json.loads(straight.losses.read_text())
    losses_b = json.loads(resumed.losses.read_text())
    assert np.allclose(np.array(losses_a["train"]), np.array(losses_b["train"]), rtol=1e-6)
    assert np.allclose(np.array(losses_a["heldout"]), np.array(losses_b["heldout"]), rtol=1e-6)
    assert resumed.heldout_loss == pytest.approx(straight.heldout_loss, rel=1e-6)
    written = resumed.checkpoint.stat().st_mtime_ns  # a finished run resumed trains nothing and rewrites nothing
    again = train(config, data, tmp_path / "resumed", progress=False)  # (encode jobs stamp the file it keeps)
    assert again.steps == 20 and again.checkpoint.stat().st_mtime_ns == written


def test_retro_windows_align_with_neighbour_rows(data):
    store = TokenStore.open(data / "train")
    n = len(store) // L
    neighbours = np.broadcast_to(np.arange(n, dtype=np.int32)[:, None, None], (n, 2, 2 * L))  # row c holds c
    windows = Windows(store, 16, L, neighbours)
    tokens, targets, nb = windows.batch(np.array([0, 5, windows.n_windows - 1]), torch.device("cpu"))
    for row, c in enumerate([0, 5, windows.n_windows - 1]):
        stream = torch.from_numpy(np.asarray(store.tokens[c * L:c * L + 17], dtype=np.int64))
        assert torch.equal(tokens[row], stream[:-1]) and torch.equal(targets[row], stream[1:])
        assert torch.equal(nb[row, :, 0, 0], torch.arange(c, c + 16 // L))
    first = windows.random(seed=3, step=5, batch_size=4, device=torch.device("cpu"))
    again = windows.random(seed=3, step=5, batch_size=4, device=torch.device("cpu"))
    other = windows.random(seed=3, step=6, batch_size=4, device=torch.device("cpu"))
    assert torch.equal(first[0], again[0]) and torch.equal(first[2], again[2])
    assert not torch.equal(first[0], other[0])


def test_retro_trains(data, neighbours_dir, tmp_path):
    config = replace(BASE, kind="retro", seq_len=16, steps=20, eval_every=10)
    report = train(config, data, tmp_path / "retro", neighbours_dir=neighbours_dir, progress=False)
    losses = json.loads(report.losses.read_text())
    assert np.mean([v for _, v in losses["train"][-5:]]) < np.mean([v for _, v in losses["train"][:5]])
    assert math.isfinite(report.heldout_loss) and report.plot.is_file()
    loaded = load_checkpoint(report.checkpoint)
    assert loaded.kind == "retro" and loaded.step == 20
    assert loaded.config == RetroConfig.tiny(vocab_size(data), n_neighbours=2)


def test_lr_schedule():
    config = replace(BASE, steps=100, warmup=10)
    assert lr_at(config, 0) == pytest.approx(config.lr / 10)
    assert lr_at(config, 9) == pytest.approx(config.lr)
    assert lr_at(config, 10) == pytest.approx(config.lr)
    assert lr_at(config, 55) == pytest.approx((config.lr + config.min_lr) / 2)
    assert lr_at(config, 100) == pytest.approx(config.min_lr)


def test_bad_inputs(data, neighbours_dir, tmp_path):
    retro = replace(BASE, kind="retro", seq_len=16, steps=2)
    with pytest.raises(ValueError, match="seq_len 18 must be a multiple of chunk_len 4"):
        train(replace(retro, seq_len=18), data, tmp_path / "r", neighbours_dir=neighbours_dir, progress=False)
    with pytest.raises(ValueError, match="needs neighbours_dir"):
        train(retro, data, tmp_path / "r", progress=False)
    with pytest.raises(FileNotFoundError, match="neighbours-train.npy"):
        train(retro, data, tmp_path / "r", neighbours_dir=tmp_path, progress=False)
    np.save(tmp_path / "neighbours-train.npy", np.zeros((10, 2, 5), np.int32))
    with pytest.raises(ValueError, match=r"must be \(n_chunks, K, 2 \* chunk_len = 8\)"):
        train(retro, data, tmp_path / "r", neighbours_dir=tmp_path, progress=False)
    with pytest.raises(FileNotFoundError, match="no data folder"):
        train(BASE, tmp_path / "nowhere", tmp_path / "lm", progress=False)
    with pytest.raises(ValueError, match="fewer than seq_len"):
        train(replace(BASE, seq_len=100_000), data, tmp_path / "lm", progress=False)
    with pytest.raises(ValueError, match="kind must be one of"):
        TrainConfig(kind="gpt")
    with pytest.raises(ValueError, match="preset must be one of"):
        TrainConfig(preset="huge")


def test_a_diverged_model_is_never_saved(data, tmp_path):
    """lr 1e30 leaves finite weights whose held-out loss is nan: the checkpoint then due is evaluated, not written."""
    good = train(replace(BASE, steps=2, checkpoint_every=1), data, tmp_path, progress=False).checkpoint.read_bytes()
    with pytest.raises(ValueError, match=r"held-out loss became nan at step 3: .*lr than 1e\+30\); stopped without"):
        train(replace(BASE, steps=9, lr=1e30, eval_every=100, checkpoint_every=1), data, tmp_path, progress=False)
    assert (tmp_path / "checkpoint.pt").read_bytes() == good


def test_resume_refuses_another_model(lm_run, data):
    out, _ = lm_run
    with pytest.raises(ValueError, match="resume=False"):
        train(replace(BASE, preset="small", steps=41), data, out, progress=False)


# ---------------------------------------------------------------------------------------------
# RETRO retro-fitted onto a trained LM
# ---------------------------------------------------------------------------------------------

def _retro_batch(data: Path, neighbours_dir: Path, seq_len: int = 16):
    nb = np.load(neighbours_dir / "neighbours-heldout.npy")
    windows = Windows(TokenStore.open(data / "heldout"), seq_len, L, nb)
    return windows.batch(np.arange(4), torch.device("cpu"))  # tokens (4, T), targets, neighbours (4, C, K, 2L)


def test_retrofitted_model_starts_as_the_lm(lm_run, data, neighbours_dir):
    from lm_worker.training.retrofit import retrofit, retrofit_config

    lm = load_checkpoint(lm_run[0]).model
    retro = retrofit(lm, retrofit_config(lm.config, chunk_len=L, n_neighbours=2)).eval()
    tokens, _, neighbours = _retro_batch(data, neighbours_dir)
    with torch.no_grad():
        expected = lm(tokens)  # (4, T, V)
        torch.testing.assert_close(retro(tokens), expected, rtol=0, atol=0)
        torch.testing.assert_close(retro(tokens, neighbours), expected, rtol=0, atol=0)
    assert retro.config.decoder_cca_layers == (1,) and retro.config.n_layer == lm.config.n_layer == 2


def test_retrofit_trains_only_the_new_layers_and_keeps_the_lm_without_neighbours(lm_run, data, neighbours_dir,
                                                                                 tmp_path):
    from lm_worker.training.retrofit import is_base_parameter

    lm = load_checkpoint(lm_run[0]).model
    config = replace(BASE, kind="retro", seq_len=16, steps=12, eval_every=6, init_from=str(lm_run[1].checkpoint))
    report = train(config, data, tmp_path / "fit", neighbours_dir=neighbours_dir, progress=False)
    fitted = load_checkpoint(report.checkpoint)
    assert fitted.kind == "retro" and fitted.step == 12 and fitted.config.n_layer == lm.config.n_layer
    before, after = lm.state_dict(), fitted.model.state_dict()
    changed = {name for name, tensor in after.items() if name not in before or not torch.equal(before[name], tensor)}
    assert changed and not any(is_base_parameter(name) for name in changed)
    assert any(n.startswith("cca.") and "proj" in n for n in changed)  # CCA left its zero start
    tokens, _, neighbours = _retro_batch(data, neighbours_dir)
    with torch.no_grad():
        torch.testing.assert_close(fitted.model(tokens), lm(tokens), rtol=0, atol=0)  # neighbours withheld: the LM
        assert not torch.allclose(fitted.model(tokens, neighbours), lm(tokens))


def test_retrofit_resume_equals_uninterrupted_and_can_train_the_base(lm_run, data, neighbours_dir, tmp_path):
    config = replace(BASE, kind="retro", seq_len=16, steps=8, checkpoint_every=2, init_from=str(lm_run[1].checkpoint),
                     freeze_base=False)
    straight = train(config, data, tmp_path / "straight", neighbours_dir=neighbours_dir, progress=False)
    train(config, data, tmp_path / "resumed", neighbours_dir=neighbours_dir, progress=False, stop_at=4)
    resumed = train(config, data, tmp_path / "resumed", neighbours_dir=neighbours_dir, progress=False)
    a = load_checkpoint(straight.checkpoint).model.state_dict()
    b = load_checkpoint(resumed.checkpoint).model.state_dict()
    for name, tensor in a.items():
        torch.testing.assert_close(b[name], tensor, rtol=1e-6, atol=1e-7, msg=name)
    lm = load_checkpoint(lm_run[0]).model.state_dict()
    assert not torch.equal(a["blocks.0.ffn.fc.weight"], lm["blocks.0.ffn.fc.weight"])  # --train-base trained it


def test_retrofit_bad_inputs(lm_run, data, neighbours_dir, tmp_path):
    from lm_worker.training.retrofit import retrofit

    with pytest.raises(ValueError, match="needs kind 'retro'"):
        TrainConfig(kind="lm", init_from="x.pt")
    retro = replace(BASE, kind="retro", seq_len=16, steps=2)
    with pytest.raises(FileNotFoundError):
        train(replace(retro, init_from=str(tmp_path / "none.pt")), data, tmp_path / "r", neighbours_dir=neighbours_dir,
              progress=False)
    scratch = train(retro, data, tmp_path / "scratch", neighbours_dir=neighbours_dir, progress=False)
    with pytest.raises(ValueError, match="holds a retro model"):
        train(replace(retro, init_from=str(scratch.checkpoint)), data, tmp_path / "r2", neighbours_dir=neighbours_dir,
              progress=False)
    lm = load_checkpoint(lm_run[0]).model
    with pytest.raises(ValueError, match="does not match the LM"):
        retrofit(lm, RetroConfig.tiny(vocab_size(data), n_layer=3))
    other_lm = train(replace(BASE, steps=2, seed=7), data, tmp_path / "other-lm", progress=False)
    fit = replace(retro, init_from=str(lm_run[1].checkpoint))
    train(fit, data, tmp_path / "fit", neighbours_dir=neighbours_dir, progress=False, stop_at=1)
    with pytest.raises(ValueError, match=r"was retro-fitted onto another LM \(lm:\w+\) than init_from .*other-lm"):
        train(replace(fit, init_from=str(other_lm.checkpoint)), data, tmp_path / "fit", neighbours_dir=neighbours_dir,
              progress=False)  # resuming it onto another LM is refused


@pytest.fixture(scope="module")
def retro_split(data, neighbours_dir, tmp_path_factory) -> tuple[Path, Path]:
    """`data` plus a "retro" split (the train documents in reverse order: another stream) and its neighbours."""
    out = tmp_path_factory.mktemp("data-retro")
    shutil.copytree(data, out, dirs_exist_ok=True)
    train_store = TokenStore.open(data / "train")
    docs = [(f"r-{d.name}", np.asarray(train_store.tokens[d.start:d.end - 1])) for d in reversed(train_store.documents)]
    store = write_token_store(out / "retro", docs, int(train_store.tokens[-1]), train_store.tokenizer_fingerprint)
    nb_dir = tmp_path_factory.mktemp("retro-nb")
    shutil.copytree(neighbours_dir, nb_dir, dirs_exist_ok=True)
    n = len(store) // L
    rows = np.asarray(store.tokens)[(np.arange(n)[:, None, None] * L + np.arange(2 * L)) % len(store)]  # (n, 1, 2L)
    np.save(nb_dir / "neighbours-retro.npy", np.repeat(rows, 2, axis=1).astype(np.int32))  # (n, 2, 2L)
    return out, nb_dir


def test_retrofit_trains_on_the_split_it_names(lm_run, retro_split, tmp_path):
    from lm_worker.training.batches import open_data

    data, nb_dir = retro_split
    config = replace(BASE, kind="retro", seq_len=16, steps=4, eval_every=4, init_from=str(lm_run[1].checkpoint),
                     split="retro")
    windows, heldout, _, _ = open_data(config, data, nb_dir)
    assert np.array_equal(windows.tokens, TokenStore.open(data / "retro").tokens)
    assert np.array_equal(windows.neighbours, np.load(nb_dir / "neighbours-retro.npy"))
    assert np.array_equal(heldout.tokens, TokenStore.open(data / "heldout").tokens)  # held-out loss as before
    report = train(config, data, tmp_path / "fit", neighbours_dir=nb_dir, progress=False)
    assert load_checkpoint(report.checkpoint).extra["train_config"]["split"] == "retro"


def test_split_bad_inputs(data, neighbours_dir, tmp_path):
    for bad in ("", "heldout", "valid", "test", "../train", "a/b", "."):
        with pytest.raises(ValueError, match="split must name a folder of the data to train on"):
            TrainConfig(split=bad)
    retro = replace(BASE, kind="retro", seq_len=16, steps=2, split="retro")
    with pytest.raises(FileNotFoundError, match=r"no 'retro' split .* \(prepare with max_retro_tokens\)"):
        train(retro, data, tmp_path / "r", neighbours_dir=neighbours_dir, progress=False)
    (tmp_path / "data").mkdir()
    shutil.copytree(data, tmp_path / "data", dirs_exist_ok=True)
    shutil.copytree(tmp_path / "data" / "train", tmp_path / "data" / "retro")
    with pytest.raises(FileNotFoundError, match="neighbours-retro.npy"):
        train(retro, tmp_path / "data", tmp_path / "r", neighbours_dir=neighbours_dir, progress=False)


def test_training_refuses_stale_or_damaged_inputs_before_writing(data, neighbours_dir, tmp_path):
    """Neighbours made for another version of the split, an unreadable neighbours file, a split left by a
    prepare with another tokenizer, a CUDA device this machine lacks, a negative seed: each is a ValueError
    naming what is wrong, and nothing is written."""
    retro = replace(BASE, kind="retro", seq_len=16, steps=2)
    nb = tmp_path / "nb"
    shutil.copytree(neighbours_dir, nb)
    full = np.load(neighbours_dir / "neighbours-train.npy")
    np.save(nb / "neighbours-train.npy", full[:-3])  # the split has changed since they were fetched
    with pytest.raises(ValueError, match=rf"has {len(full) - 3} rows, but .*train has {len(full)} chunks of 4"):
        train(retro, data, tmp_path / "out", neighbours_dir=nb, progress=False)
    for damaged in (b"", b"\x93NUMPY garbage", np.lib.format.magic(1, 0) + b"\x00" * 10):
        (nb / "neighbours-train.npy").write_bytes(damaged)
        with pytest.raises(ValueError, match="neighbours-train.npy is not a readable .npy file"):
            train(retro, data, tmp_path / "out", neighbours_dir=nb, progress=False)
    mixed = tmp_path / "mixed"
    shutil.copytree(data, mixed)
    store = TokenStore.open(data / "train")
    write_token_store(mixed / "retro", [("d", np.asarray(store.tokens[:400]))], 0, "bpe:an-earlier-tokenizer")
    with pytest.raises(ValueError, match="retro was tokenized with bpe:an-earlier-tokenizer, but .*tokenizer.json"):
        train(replace(BASE, split="retro"), mixed, tmp_path / "out", progress=False)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="device 'cuda:1': this machine has 0 CUDA devices"):
            train(replace(BASE, device="cuda:1"), data, tmp_path / "out", progress=False)
    with pytest.raises(ValueError, match="device 'gpu7' is not a torch device"):
        train(replace(BASE, device="gpu7"), data, tmp_path / "out", progress=False)
    with pytest.raises(ValueError, match="seed must be >= 0, got -1"):
        replace(BASE, seed=-1)
    assert not (tmp_path / "out").exists()


def test_prepare_again_without_a_retro_split_removes_the_one_an_earlier_prepare_left(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(12):
        (corpus / f"mod{i}.py").write_text("".join(f"def g{j}(y):\n    return y * {j}\n" for j in range(i, i + 40)))
    config = PrepareConfig(out=tmp_path / "data", corpus=str(corpus), vocab_size=300, heldout_fraction=0.25,
                           max_train_tokens=2000, max_retro_tokens=500, progress=False)
    prepare_corpus(config)
    assert (tmp_path / "data" / "retro").is_dir()
    prepare_corpus(replace(config, vocab_size=280, max_retro_tokens=0))  # another tokenizer
    assert not (tmp_path / "data" / "retro").exists()
