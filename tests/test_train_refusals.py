"""`train` refuses what would lose or spoil a model, naming the setting, before it writes anything: an output
folder whose checkpoint is the base LM it retro-fits, or that holds a Hugging Face model; a resume that changes
which parameters train; a bad init_from; settings that make training ascend. Also: LM keys check their token
ids, an encode's device index is refused for Ray workers. Tiny presets, a tiny corpus made here."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch
from train_data import fake_neighbours, small_corpus

from lm_worker.cli import main
from lm_worker.jobs.encode_plan import EncodeJobConfig, check_config
from lm_worker.models.checkpoint import load_checkpoint
from lm_worker.models.transformer_lm import LMConfig, TransformerLM
from lm_worker.training.config import TrainConfig
from lm_worker.training.train import train

BASE = TrainConfig(kind="lm", preset="tiny", seq_len=16, batch_size=4, steps=2, lr=3e-3, min_lr=3e-4, warmup=1,
                   eval_every=2, eval_batches=1, checkpoint_every=10, device="cpu")
RETRO = replace(BASE, kind="retro")
QUIET = ["--no-progress", "--log-level", "ERROR"]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return small_corpus(tmp_path_factory.mktemp("corpus"), tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def neighbours_dir(data, tmp_path_factory) -> Path:
    return fake_neighbours(data, tmp_path_factory.mktemp("retro-source"))


@pytest.fixture(scope="module")
def lm(data, tmp_path_factory) -> Path:
    """A base LM's checkpoint folder."""
    out = tmp_path_factory.mktemp("lm")
    train(BASE, data, out, progress=False)
    return out


def test_training_never_replaces_the_base_lm_it_retro_fits(lm, data, neighbours_dir, tmp_path, capsys):
    before = (lm / "checkpoint.pt").read_bytes()
    for init_from in (lm, lm / "checkpoint.pt", tmp_path / "link"):
        (tmp_path / "link").unlink(missing_ok=True)
        (tmp_path / "link").symlink_to(lm)
        for resume in (True, False):
            with pytest.raises(ValueError, match="holds the base LM that init_from .* names: training there would "
                                                 "replace it; give another output folder"):
                train(replace(RETRO, init_from=str(init_from)), data, lm, neighbours_dir, resume=resume,
                      progress=False)
    for restart in ([], ["--restart"]):
        code = main([*QUIET, "train", "--kind", "retro", "--preset", "tiny", "--seq-len", "16", "--steps", "1",
                     "--data", str(data), "--neighbours", str(neighbours_dir), "--init-from", str(lm), "--out",
                     str(tmp_path / "link"), "--device", "cpu", *restart])
        err = capsys.readouterr().err.strip().splitlines()[-1]  # the error line (a warning may come first)
        assert code == 1 and err.startswith("lm-worker train: error: ") and "--restart" not in err, err
        assert f"--out {tmp_path / 'link'} holds the base LM that --init-from {lm} names" in err, err
    assert (lm / "checkpoint.pt").read_bytes() == before and load_checkpoint(lm).kind == "lm"


def test_resume_refuses_a_changed_train_base(lm, data, neighbours_dir, tmp_path, capsys):
    fit = replace(RETRO, steps=4, init_from=str(lm))
    train(fit, data, tmp_path / "fit", neighbours_dir, progress=False, stop_at=1)
    with pytest.raises(ValueError, match=r"resuming .*checkpoint.pt with freeze_base=False would change which "
                                         r"parameters train \(it was trained with freeze_base=True\): keep that "
                                         r"setting, or start afresh with resume=False"):
        train(replace(fit, freeze_base=False), data, tmp_path / "fit", neighbours_dir, progress=False)
    code = main([*QUIET, "train", "--kind", "retro", "--preset", "tiny", "--seq-len", "16", "--steps", "4",
                 "--data", str(data), "--neighbours", str(neighbours_dir), "--init-from", str(lm), "--out",
                 str(tmp_path / "fit"), "--device", "cpu", "--train-base"])
    err = capsys.readouterr().err
    assert code == 1 and err.endswith("with --train-base would change which parameters train (it was trained with "
                                      "no --train-base): keep that setting, or start afresh with --restart\n"), err
    assert load_checkpoint(tmp_path / "fit").step == 1


@pytest.mark.parametrize("field, value", [("grad_clip", -1.0), ("grad_clip", float("nan")), ("weight_decay", -0.1),
                                          ("weight_decay", float("inf")), ("warmup", -1)])
def test_settings_that_would_spoil_training_are_refused(field, value):
    with pytest.raises(ValueError, match=rf"^{field} must be >= 0"):
        replace(BASE, **{field: value})


def test_grad_clip_zero_trains_without_clipping(data, tmp_path):
    assert train(replace(BASE, grad_clip=0.0, weight_decay=0.0, warmup=0), data, tmp_path, progress=False).steps == 2


def test_lm_keys_refuse_ids_outside_the_vocabulary():
    model = TransformerLM(LMConfig.tiny(64))
    with pytest.raises(ValueError, match=r"tokens holds token id 99, outside the model's vocabulary \[0, 64\)"):
        model.keys(torch.tensor([[1, 2, 99]]))


def test_encode_refuses_a_device_index_for_worker_actors(tmp_path, capsys):
    code = main([*QUIET, "encode", "knnlm", "--data", str(tmp_path / "d"), "--checkpoint", str(tmp_path / "c"),
                 "--out", str(tmp_path / "src"), "--device", "cuda:1", "--workers", "2"])
    err = capsys.readouterr().err
    assert code == 1 and err == ("lm-worker encode: error: --device cuda:1 names one GPU, but each of the --workers "
                                 "2 actors takes a GPU of its own (seen as cuda): give --device cuda, or --workers 0\n")
    config = EncodeJobConfig(kind="knnlm", data=tmp_path, checkpoint=tmp_path, device="cuda:0", progress=False)
    with pytest.raises(ValueError, match="device 'cuda:0' names one GPU, but each worker actor takes its own"):
        check_config(config)


def test_train_refuses_an_out_holding_a_hugging_face_model(data, tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="holds config.json: a model folder of another kind"):
        train(BASE, data, tmp_path, progress=False)
    assert [p.name for p in tmp_path.iterdir()] == ["config.json"]


def test_a_bad_init_from_leaves_no_output_folder(lm, data, neighbours_dir, tmp_path):
    scratch = train(RETRO, data, tmp_path / "scratch", neighbours_dir, progress=False)
    with pytest.raises(ValueError, match="holds a retro model; retro-fitting needs a base LM"):
        train(replace(RETRO, init_from=str(scratch.checkpoint)), data, tmp_path / "out", neighbours_dir,
              progress=False)
    assert not (tmp_path / "out").exists()


def test_missing_neighbours_name_the_step_that_makes_them(data, tmp_path):
    with pytest.raises(FileNotFoundError, match=r"neighbours-train.npy \(run lm-worker neighbours\)"):
        train(RETRO, data, tmp_path / "out", tmp_path, progress=False)
