"""The decoding benchmark's command line: bad values are one-line refusals before anything runs, and a
run folder needs only what the chosen models use."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from decoding import check_run, load_models, parse_args  # noqa: E402


@pytest.mark.parametrize("args, words", [
    (["--batches", "1,x"], "--batches must list positive numbers, got '1,x'"),
    (["--batches", "0,8"], "--batches must list positive numbers, got '0,8'"),
    (["--repeats", "0"], "argument --repeats: must be a positive integer, got '0'"),
    (["--repeats", "-1"], "argument --repeats: must be a positive integer, got '-1'"),
    (["--new-tokens", "0"], "argument --new-tokens: must be a positive integer, got '0'"),
    (["--beams", "-1"], "argument --beams: must be 0 or a positive integer, got '-1'"),
    (["--beam-prompts", "0"], "argument --beam-prompts: must be a positive integer, got '0'"),
    (["--prompt-len", "0"], "argument --prompt-len: must be a positive integer, got '0'"),
    (["--k", "0"], "argument --k: must be a positive integer, got '0'"),
    (["--models", "knn-lm"], "argument --models: unknown model 'knn-lm' (choose from knnlm, retro)"),
    (["--models", ","], "argument --models: name at least one of knnlm, retro"),
])
def test_bad_values_are_refused_in_one_line(tmp_path, capsys, args, words):
    with pytest.raises(SystemExit) as exited:
        parse_args(["--run", str(tmp_path), "--knn-temperature", "1.0", *args])
    assert exited.value.code == 2
    assert words in capsys.readouterr().err


def test_the_values_given_are_kept(tmp_path):
    run = ["--run", str(tmp_path), "--knn-temperature", "1.0"]
    config = parse_args([*run, "--repeats", "1", "--models", "retro,knnlm", "--beams", "0", "--batches", "2, 8"])
    assert (config.repeats, config.models, config.beams, config.batches) == (1, ("retro", "knnlm"), 0, (2, 8))


def lay_out(run: Path, files: list[str]) -> Path:
    for name in files:
        (run / name).parent.mkdir(parents=True, exist_ok=True)
        (run / name).write_text("")
    return run


KNNLM_ONLY = ["data/tokenizer.json", "data/heldout/x", "lm/checkpoint.pt", "knnlm-datastore/manifest.json"]


def test_a_run_needs_only_what_the_chosen_models_use(tmp_path):
    run = lay_out(tmp_path, KNNLM_ONLY)
    check_run(run, ("knnlm",))  # no RETRO checkpoint or datastore needed
    for models in (("knnlm", "retro"), ("retro",)):
        with pytest.raises(SystemExit) as exited:
            check_run(run, models)
        missing = str(exited.value).split("missing: ", 1)[1].split("\n")[0]
        assert missing == f"{run / 'retro/checkpoint.pt'}, {run / 'retro-datastore/manifest.json'}"


def test_knnlm_alone_loads_no_retro_checkpoint(tmp_path):
    """A run folder without RUN/retro decodes kNN-LM: only the LM's checkpoint is read."""
    from conftest import stdlib_data

    from lm_worker.data.tokenizer import Tokenizer
    from lm_worker.models.checkpoint import save_checkpoint
    from lm_worker.models.transformer_lm import LMConfig, TransformerLM

    data = stdlib_data(tmp_path / "data", vocab_size=300, chars=2000)
    tokenizer = Tokenizer.load(data / "tokenizer.json")
    model = TransformerLM(LMConfig.tiny(vocab_size=tokenizer.vocab_size))
    save_checkpoint(tmp_path / "lm" / "checkpoint.pt", kind="lm", model=model, config=model.config, step=0,
                    tokenizer_fingerprint=tokenizer.fingerprint, extra={})
    _, heldout, lm, retro = load_models(tmp_path, ("knnlm",))
    assert lm.kind == "lm" and retro is None and len(heldout.tokens) > 0
