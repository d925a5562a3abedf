"""`lm-worker` refusals and safeguards: prepare keeps what it did not write, numbers and flags that cannot
apply are refused before Ray or any server (a --target of 127.0.0.1:1 would fail if contacted), a
BrokenPipeError not of stdout is an error, a prompt file's BOM is not text, and an attention plot that
fails midway leaves the old one. Tiny artefacts made here: no servers, no Ray."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
import torch

from lm_worker.cli import build_parser, main
from lm_worker.data.tokenizer import Tokenizer
from lm_worker.models.checkpoint import save_checkpoint
from lm_worker.models.retro import Retro, RetroConfig
from lm_worker.models.transformer_lm import LMConfig, TransformerLM

QUIET = ["--no-progress", "--log-level", "WARNING"]
NOWHERE = "127.0.0.1:1"  # no server: a command that contacted it would fail with another error


def one_line_error(capsys, *args) -> str:
    """Runs `lm-worker ARGS`; asserts it failed with exit code 1 and one stderr line; returns that line."""
    code = main([*QUIET, *[str(a) for a in args]])
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    return err.strip()


def write_corpus(path: Path, word: str) -> Path:
    path.write_text("".join(json.dumps({"id": f"d{i}", "text": f"def {word}_{i}(x):\n    return x + {i}\n" * 4})
                            + "\n" for i in range(12)))
    return path


def prepare(root: Path, name: str, word: str, vocab: int) -> Path:
    assert main([*QUIET, "prepare", "--corpus", str(write_corpus(root / f"{name}.jsonl", word)), "--out",
                 str(root / name), "--vocab-size", str(vocab), "--heldout-fraction", "0.2"]) == 0
    return root / name


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """RUN/data and RUN/other (prepared with different tokenizers), RUN/lm and RUN/retro (untrained tiny
    models of RUN/data's tokenizer: max_len 128; chunks of 4, 2 neighbours)."""
    root = tmp_path_factory.mktemp("fixes")
    prepare(root, "data", "handler", 300)
    prepare(root, "other", "parse_line", 280)
    tokenizer = Tokenizer.load(root / "data" / "tokenizer.json")
    for kind, model in (("lm", TransformerLM(LMConfig.tiny(tokenizer.vocab_size))),
                        ("retro", Retro(RetroConfig.tiny(tokenizer.vocab_size)))):
        save_checkpoint(root / kind / "checkpoint.pt", kind=kind, model=model, config=model.config, step=0,
                        tokenizer_fingerprint=tokenizer.fingerprint, extra={})
    return root


@pytest.fixture
def no_ray(monkeypatch):
    """The encode job and the distributed evaluation fail the test if they start: refusals come first."""
    import lm_worker.evaluation.distributed
    import lm_worker.jobs.encode_job

    def started(*args, **kwargs):
        raise AssertionError("the Ray work started before the flags were checked")

    monkeypatch.setattr(lm_worker.jobs.encode_job, "run_encode_job", started)
    monkeypatch.setattr(lm_worker.evaluation.distributed, "evaluate_distributed", started)


# 1. prepare never deletes what it did not write


def test_prepare_refuses_to_replace_a_folder_holding_other_files(run, tmp_path, capsys):
    out = prepare(tmp_path, "p", "handler", 300)
    (out / "NOTES.md").write_text("mine")
    err = one_line_error(capsys, "prepare", "--corpus", tmp_path / "p.jsonl", "--out", out, "--vocab-size", "300",
                         "--heldout-fraction", "0.2")
    assert err.startswith(f"lm-worker prepare: error: --out {out} holds 'NOTES.md', which prepare did not write"), err
    assert "move" in err and "another --out" in err
    assert (out / "NOTES.md").read_text() == "mine" and (out / "tokenizer.json").is_file()


def test_prepare_refuses_a_corpus_inside_its_out(run, tmp_path, capsys):
    out = prepare(tmp_path, "p", "handler", 300)
    corpus = out / "train" / "corpus.jsonl"
    corpus.write_bytes((tmp_path / "p.jsonl").read_bytes())
    err = one_line_error(capsys, "prepare", "--corpus", corpus, "--out", out, "--vocab-size", "300",
                         "--heldout-fraction", "0.2")
    assert err.startswith(f"lm-worker prepare: error: --corpus {corpus} lies inside --out {out}"), err
    assert corpus.is_file()


def test_prepare_still_replaces_its_own_folder(run, tmp_path, capsys):
    out = prepare(tmp_path, "p", "handler", 300)
    assert main([*QUIET, "prepare", "--corpus", str(tmp_path / "p.jsonl"), "--out", str(out), "--vocab-size",
                 "290", "--heldout-fraction", "0.2"]) == 0
    assert Tokenizer.load(out / "tokenizer.json").vocab_size <= 290


# 2. worker resources are finite


@pytest.mark.parametrize("args, words", [
    (["eval", "--lm", "{run}/lm", "--knnlm-target", NOWHERE, "--workers", "2", "--worker-cpus", "inf"],
     "--worker-cpus must be > 0 and finite, got inf"),
    (["eval", "--lm", "{run}/lm", "--knnlm-target", NOWHERE, "--workers", "2", "--worker-gpus", "inf"],
     "--worker-gpus must be >= 0 and finite, got inf"),
    (["encode", "knnlm", "--checkpoint", "{run}/lm", "--workers", "2", "--worker-cpus", "inf"],
     "--worker-cpus must be > 0 and finite, got inf"),
])
def test_infinite_worker_resources_are_refused_before_ray(run, tmp_path, capsys, no_ray, args, words):
    err = one_line_error(capsys, *[a.format(run=run) for a in args], "--data", run / "data", "--out", tmp_path / "o")
    assert err == f"lm-worker {args[0]}: error: {words}"


# 3. attention checks the tokenizer


def test_attention_refuses_a_retro_of_another_tokenizer(run, tmp_path, capsys):
    err = one_line_error(capsys, "attention", "--retro", run / "retro", "--data", run / "other", "--target", NOWHERE,
                         "--out", tmp_path / "a.png")
    assert err.startswith(f"lm-worker attention: error: --retro {run / 'retro'} was trained with tokenizer "), err
    assert not (tmp_path / "a.png").exists()


# 4. values the model refuses are refused before any server is contacted


@pytest.mark.parametrize("args, words", [
    (["eval", "--data", "{run}/data", "--out", "{tmp}/e", "--retro", "{run}/retro", "--retro-target", NOWHERE,
      "--retro-rerank", "1"], "--retro-rerank must be 0 (off) or at least the 2 neighbours asked for, got 1"),
    (["eval", "--data", "{run}/data", "--out", "{tmp}/e", "--lm", "{run}/lm", "--knnlm-target", NOWHERE,
      "--context-len", "256"], "--context-len 256 exceeds the max_len 128 of the LM at {run}/lm"),
    (["generate", "--checkpoint", "{run}/retro", "--data", "{run}/data", "--target", NOWHERE, "--prompt", "def f",
      "--prefetch", "4"], "--prefetch must be below --checkpoint's chunk length 4, got 4"),
])
def test_model_limits_are_refused_before_any_server(run, tmp_path, capsys, args, words):
    err = one_line_error(capsys, *[a.format(run=run, tmp=tmp_path) for a in args])
    assert err == f"lm-worker {args[0]}: error: {words.format(run=run)}"


# 5. a broken pipe that is not stdout's is an error


def test_a_broken_pipe_not_of_stdout_is_an_error(run, tmp_path, capsys, monkeypatch):
    import lm_worker.cli.prepare

    def broken(args) -> None:
        raise BrokenPipeError(32, "Broken pipe")  # e.g. a pipe to a child process, while stdout is fine

    monkeypatch.setattr(lm_worker.cli.prepare, "run_prepare", broken)
    err = one_line_error(capsys, "prepare", "--out", tmp_path / "p")
    assert err == "lm-worker prepare: error: [Errno 32] Broken pipe"


# 6. encode's check before its lock renames nothing


def test_encode_checks_its_out_without_finishing_another_encodes_swap(run, tmp_path, capsys, no_ray):
    """Between a replacement's two renames the old source lies beside OUT: only the job, under its lock,
    may put it back (a second encode refused before that leaves it as it is)."""
    old = tmp_path / ".src.replaced-0123abcd"
    old.mkdir()
    (old / "source.json").write_text("{}")
    err = one_line_error(capsys, "encode", "knnlm", "--checkpoint", run / "lm", "--data", run / "data", "--out",
                         tmp_path / "src", "--workers", "2", "--device", "cuda:0")
    assert "--device cuda:0 names one GPU" in err
    assert old.is_dir() and not (tmp_path / "src").exists()


def test_encode_still_refuses_a_folder_of_other_files(run, tmp_path, capsys, no_ray):
    out = tmp_path / "src"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    err = one_line_error(capsys, "encode", "knnlm", "--checkpoint", run / "lm", "--data", run / "data", "--out", out)
    assert err.startswith(f"lm-worker encode: error: --out {out} holds 'notes.txt' but no datastore source"), err


# 7. flags that do not apply are refused where given


@pytest.mark.parametrize("args, words", [
    (["encode", "retro", "--data", "{run}/data", "--out", "{tmp}/s", "--stride", "300"],
     "--stride applies to `encode knnlm` only"),
    (["encode", "retro", "--data", "{run}/data", "--out", "{tmp}/s", "--context-len", "64", "--stride", "8"],
     "--context-len and --stride apply to `encode knnlm` only"),
    (["encode", "knnlm", "--checkpoint", "{run}/lm", "--data", "{run}/data", "--out", "{tmp}/s", "--chunk-len", "8"],
     "--chunk-len applies to `encode retro` only"),
    (["encode", "knnlm", "--checkpoint", "{run}/lm", "--data", "{run}/data", "--out", "{tmp}/s", "--workers", "0",
      "--worker-cpus", "2", "--rows-per-part", "9"],
     "--worker-cpus and --rows-per-part apply with --workers N > 0 only"),
    (["encode", "retro", "--checkpoint", "{run}/lm", "--data", "{run}/data", "--out", "{tmp}/s"],
     "--checkpoint applies to `encode knnlm` and --encoder lm only"),
    (["eval", "--data", "{run}/data", "--out", "{tmp}/e", "--lm", "{run}/lm", "--knnlm-target", NOWHERE,
      "--worker-cpus", "2"], "--worker-cpus applies with --workers N > 0 only"),
    (["eval", "--data", "{run}/data", "--out", "{tmp}/e", "--lm", "{run}/lm", "--knnlm-target", NOWHERE,
      "--workers", "0", "--worker-gpus", "1", "--batches-per-share", "2", "--address", "auto"],
     "--worker-gpus, --batches-per-share and --address apply with --workers N > 0 only"),
    (["prepare", "--corpus", "stdlib", "--out", "{tmp}/p", "--id-field", "id"],
     "--id-field names a field of a .jsonl corpus; corpus 'stdlib' is not one"),
])
def test_flags_that_do_not_apply_are_refused(run, tmp_path, capsys, no_ray, args, words):
    err = one_line_error(capsys, *[a.format(run=run, tmp=tmp_path) for a in args])
    assert err.startswith(f"lm-worker {args[0]}: error: {words}"), err
    assert not any(tmp_path.iterdir())


def test_train_refuses_a_chunk_len_for_the_lm(run, tmp_path, capsys):
    with pytest.raises(SystemExit) as exited:
        main([*QUIET, "train", "--kind", "lm", "--preset", "tiny", "--steps", "1", "--chunk-len", "8", "--data",
              str(run / "data"), "--out", str(tmp_path / "lm")])
    err = capsys.readouterr().err
    assert exited.value.code == 2 and "--chunk-len applies to --kind retro only" in err, err
    assert not (tmp_path / "lm").exists()


# 8. a prompt file's byte order mark is not text


def test_a_prompt_file_s_bom_is_not_part_of_the_prompt(run, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_bytes("\ufeffdef f\n".encode())
    assert main([*QUIET, "generate", "--checkpoint", str(run / "lm"), "--data", str(run / "data"), "--prompt-file",
                 str(prompts), "--no-retrieval", "--max-new-tokens", "1"]) == 0
    assert capsys.readouterr().out.startswith("--- 'def f'\n")


# 9. the attention plot replaces its file whole


def test_a_failed_attention_plot_leaves_the_old_file(tmp_path, monkeypatch):
    from matplotlib.figure import Figure

    from lm_worker.evaluation.attention_plot import plot_chunk_attention

    out = tmp_path / "cca.png"
    out.write_bytes(b"the old plot")

    def fails_midway(self, fname, **kwargs) -> None:
        Path(fname).write_bytes(b"half a pl")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Figure, "savefig", fails_midway)
    torch.manual_seed(0)
    model = Retro(RetroConfig.tiny(vocab_size=64)).eval()
    tokens, neighbours = torch.randint(0, 64, (1, 12)), torch.randint(0, 64, (1, 3, 2, 8))
    with pytest.raises(OSError, match="No space left"):
        plot_chunk_attention(model, tokens, neighbours, None, 1, out)
    assert out.read_bytes() == b"the old plot" and os.listdir(tmp_path) == ["cca.png"]
    monkeypatch.undo()
    plot_chunk_attention(model, tokens, neighbours, None, 1, out)
    assert out.read_bytes().startswith(b"\x89PNG") and os.listdir(tmp_path) == ["cca.png"]


# 10. the options of every command say where they go


def test_the_options_before_the_command_say_so():
    text = build_parser().format_help()
    for flag in ("--log-level", "--no-progress"):
        block = re.search(rf"^  {flag}.*?(?=^  -|^\S|\Z)", text, re.M | re.S).group(0)
        assert "goes before the command" in " ".join(block.split()), block
