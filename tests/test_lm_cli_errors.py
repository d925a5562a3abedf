"""`lm-worker`'s user errors are one line, without a traceback: a missing datastore, a refused build, a
checkpoint of the wrong kind or with damaged bytes, a bad JSONL corpus line; and `--no-progress` hides
the bars that the libraries it loads draw too. Tiny artefacts made here: no servers, no Ray."""

from __future__ import annotations

import json
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lm_worker.cli import main
from lm_worker.data.corpus import read_jsonl
from lm_worker.data.tokenizer import Tokenizer
from lm_worker.models.checkpoint import checkpoint_kind, load_checkpoint, require_kind, save_checkpoint
from lm_worker.models.retro import Retro, RetroConfig
from lm_worker.models.transformer_lm import LMConfig, TransformerLM

ROOT = Path(__file__).resolve().parents[1]
# Seeds of 256 random bytes on which torch's weights-only unpickler fails with each kind of exception.
DAMAGED = {"UnpicklingError": 0, "IndexError": 2, "KeyError": 20}


def one_line_error(capsys, *args: str) -> str:
    """Runs `lm-worker ARGS`; asserts it failed with exit code 1 and one stderr line; returns that line."""
    code = main(["--no-progress", "--log-level", "WARNING", *args])
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    return err.strip()


def write_corpus(path: Path, docs: int = 12) -> Path:
    lines = [json.dumps({"id": f"doc{i}", "text": f"def handler_{i}(request):\n    return request.process({i})\n" * 4})
             for i in range(docs)]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """RUN/data (a 300-token BPE over a tiny corpus), RUN/lm and RUN/retro (untrained tiny models) and
    RUN/knnlm-source (the LM's kNN-LM keys)."""
    root = tmp_path_factory.mktemp("errors")
    assert main(["--no-progress", "--log-level", "WARNING", "prepare", "--corpus",
                 str(write_corpus(root / "corpus.jsonl")), "--out", str(root / "data"), "--vocab-size", "300",
                 "--heldout-fraction", "0.2"]) == 0
    tokenizer = Tokenizer.load(root / "data" / "tokenizer.json")
    for kind, model in (("lm", TransformerLM(LMConfig.tiny(tokenizer.vocab_size))),
                        ("retro", Retro(RetroConfig.tiny(tokenizer.vocab_size)))):
        save_checkpoint(root / kind / "checkpoint.pt", kind=kind, model=model, config=model.config, step=0,
                        tokenizer_fingerprint=tokenizer.fingerprint, extra={})
    assert main(["--no-progress", "--log-level", "WARNING", "encode", "knnlm", "--checkpoint", str(root / "lm"),
                 "--data", str(root / "data"), "--out", str(root / "knnlm-source"), "--context-len", "16",
                 "--stride", "8", "--workers", "0"]) == 0
    return root


@pytest.mark.parametrize("args", [
    ["generate", "--checkpoint", "{run}/lm", "--data", "{run}/data", "--datastore", "{run}/nosuch", "--prompt", "a"],
    ["eval", "--data", "{run}/data", "--out", "{run}/eval", "--lm", "{run}/lm", "--knnlm-datastore", "{run}/nosuch"],
    ["attention", "--retro", "{run}/retro", "--data", "{run}/data", "--datastore", "{run}/nosuch", "--out",
     "{run}/a.png"],
])
def test_a_missing_datastore_is_one_line(run, capsys, args):
    err = one_line_error(capsys, *[a.format(run=run) for a in args])
    assert f"{run}/nosuch/manifest.json not found: not a datastore directory" in err


@pytest.mark.parametrize("args, words", [
    (["--out", "{run}/built"], "{run}/built exists and is not a datastore"),  # a manifest.json is not enough
    (["--out", "{run}/plain"], "{run}/plain exists and is not a datastore"),
    (["--out", "{run}/ds0", "--shards", "0"], "--shards must be in [1, "),
    (["--out", "{run}/dsg", "--factory", "garbage"], "FAISS cannot build factory string 'garbage'"),
])
def test_a_refused_build_is_one_line(run, capsys, args, words):
    (run / "built").mkdir(exist_ok=True)
    (run / "built" / "manifest.json").write_text("{}")  # no datastore's: neither replaced nor taken for one
    (run / "plain").mkdir(exist_ok=True)
    err = one_line_error(capsys, "build", str(run / "knnlm-source"), *[a.format(run=run) for a in args])
    assert err.startswith("lm-worker build: error: ") and words.format(run=run) in err
    assert not any((run / name).exists() for name in ("ds0", "dsg"))


def test_a_build_on_a_cluster_that_is_not_there_is_one_line(run):
    """`lm-worker build --address` joins the cluster asked for, not a local one of its own (in a process
    of its own: this one may be on Ray already, which a command joins whatever its address)."""
    result = subprocess.run([sys.executable, "-m", "lm_worker.cli", "--no-progress", "--log-level", "WARNING", "build",
                             str(run / "knnlm-source"),
                             "--out", str(run / "dsa"), "--address", "127.0.0.1:1"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.startswith("lm-worker build: error: no Ray cluster answers at 127.0.0.1:1 (127.0.0.1:1: "
                                    "connection refused"), result.stderr
    assert not (run / "dsa").exists()


@pytest.mark.parametrize("args, words", [
    (["eval", "--data", "{run}/data", "--out", "{run}/eval", "--retro", "{run}/lm", "--retro-datastore", "{run}/x"],
     "--retro needs a checkpoint of kind 'retro', but {run}/lm holds one of kind 'lm'"),
    (["eval", "--data", "{run}/data", "--out", "{run}/eval", "--lm", "{run}/retro", "--knnlm-datastore", "{run}/x"],
     "--lm needs a checkpoint of kind 'lm' or 'hf', but {run}/retro holds one of kind 'retro'"),
    (["eval", "--data", "{run}/data", "--out", "{run}/eval", "--lm", "{run}/lm", "--knnlm-datastore", "{run}/x",
      "--retro", "{run}/lm", "--retro-datastore", "{run}/x", "--workers", "2"],
     "--retro needs a checkpoint of kind 'retro', but {run}/lm holds one of kind 'lm'"),
    (["attention", "--retro", "{run}/lm", "--data", "{run}/data", "--datastore", "{run}/x", "--out", "{run}/a.png"],
     "--retro needs a checkpoint of kind 'retro', but {run}/lm holds one of kind 'lm'"),
    (["generate", "--checkpoint", "{run}/retro", "--data", "{run}/data", "--datastore", "{run}/x", "--prompt", "a",
      "--encoder-lm", "{run}/retro"],
     "--encoder-lm needs a checkpoint of kind 'lm', but {run}/retro holds one of kind 'retro'"),
    (["encode", "knnlm", "--checkpoint", "{run}/retro", "--data", "{run}/data", "--out", "{run}/src", "--workers",
      "0"], "--checkpoint needs a checkpoint of kind 'lm' or 'hf', but {run}/retro holds one of kind 'retro'"),
    (["encode", "retro", "--encoder", "lm", "--checkpoint", "{run}/retro", "--data", "{run}/data", "--out",
      "{run}/src", "--workers", "0"],
     "--checkpoint needs a checkpoint of kind 'lm', but {run}/retro holds one of kind 'retro'"),
])
def test_a_checkpoint_of_another_kind_is_one_line(run, capsys, args, words):
    err = one_line_error(capsys, *[a.format(run=run) for a in args])
    assert words.format(run=run) in err
    assert not (run / "eval").exists() and not (run / "src").exists()


def test_checkpoint_kinds_are_read_without_building_the_model(run):
    assert checkpoint_kind(run / "lm") == "lm" and checkpoint_kind(run / "retro" / "checkpoint.pt") == "retro"
    require_kind(run / "lm", ("lm", "hf"))
    with pytest.raises(ValueError, match="a retro evaluation needs a checkpoint of kind 'retro'"):
        require_kind(run / "lm", ("retro",), "a retro evaluation")
    assert load_checkpoint(run / "retro", kinds=("retro",)).kind == "retro"


@pytest.mark.parametrize("error", sorted(DAMAGED))
def test_a_damaged_checkpoint_is_one_line(run, tmp_path, capsys, error):
    damaged = tmp_path / "checkpoint.pt"
    damaged.write_bytes(random.Random(DAMAGED[error]).randbytes(256))
    for read in (load_checkpoint, checkpoint_kind):
        with pytest.raises(ValueError, match="^" + re.escape(f"{damaged} is not a readable checkpoint: ")):
            read(tmp_path)
    err = one_line_error(capsys, "generate", "--checkpoint", str(tmp_path), "--data", str(run / "data"),
                         "--no-retrieval", "--prompt", "a")
    assert f"error: {damaged} is not a readable checkpoint: " in err


@pytest.mark.parametrize("change, words", [({"d_model": 64}, "does not hold a loadable retro model: Error(s) in "
                                              "loading state_dict for Retro: size mismatch"),
                                             ({"cca_layers": "12"}, "cca_layers must be a tuple")])
def test_a_checkpoint_whose_config_does_not_fit_its_weights_is_one_line(run, tmp_path, capsys, change, words):
    payload = torch.load(run / "retro" / "checkpoint.pt", weights_only=True)
    payload["config"].update(change)
    torch.save(payload, tmp_path / "checkpoint.pt")
    with pytest.raises(ValueError, match=re.escape(words)):
        load_checkpoint(tmp_path)
    err = one_line_error(capsys, "generate", "--checkpoint", str(tmp_path), "--data", str(run / "data"),
                         "--no-retrieval", "--prompt", "a")
    assert words in err


@pytest.mark.parametrize("line, words", [
    ("not json", ":2 is not valid JSON: Expecting value (column 1)"),
    ("[1, 2]", ":2 holds a JSON list, not an object"),
    ('{"id": "x", "body": "y"}', ":2 has no field 'text'"),
    ('{"text": "y"}', ":2 has no field 'id'"),
    ('{"id": "a", "text": "y"}', ":2: id 'a' was given on line 1 too: each document needs an id of its own"),
    ('{"id": null, "text": "y"}', ":2: field 'id' is null, not a string or an integer"),
    ('{"id": 1.5, "text": "y"}', ":2: field 'id' is a JSON float, not a string or an integer"),
    ('{"id": true, "text": "y"}', ":2: field 'id' is a JSON bool, not a string or an integer"),
])
def test_a_bad_jsonl_line_names_the_file_and_the_line(tmp_path, capsys, line, words):
    corpus = tmp_path / "bad.jsonl"
    corpus.write_text(json.dumps({"id": "a", "text": "first"}) + "\n" + line + "\n")
    with pytest.raises(ValueError, match="^" + re.escape(f"{corpus}{words}")):
        list(read_jsonl(corpus, id_field="id"))
    err = one_line_error(capsys, "prepare", "--corpus", str(corpus), "--id-field", "id", "--out", str(tmp_path / "d"))
    assert err == f"lm-worker prepare: error: {corpus}{words}"


@pytest.mark.slow  # loads MiniLM in a fresh interpreter: ~5 s alone, more beside other work
def test_no_progress_hides_the_bar_of_loading_minilm(run, tmp_path):
    """transformers draws a "Loading weights" bar as the MiniLM chunk encoder loads: --no-progress hides it."""
    args = [sys.executable, "-m", "lm_worker.cli", "--no-progress", "--log-level", "WARNING", "encode", "retro",
            "--encoder", "minilm", "--workers", "0", "--data", str(run / "data"), "--out", str(tmp_path / "src"),
            "--chunk-len", "8"]
    done = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr
    assert "retro source" in done.stdout
    assert "Loading weights" not in done.stderr and "it/s]" not in done.stderr, done.stderr


@pytest.mark.parametrize("flag, target", [("--target", "127.0.0.1:99999"), ("--target", "nohost")])
def test_a_bad_target_is_one_line(run, capsys, monkeypatch, flag, target):
    """The target is read first to decide how the model's threads wait (servers on this machine?):
    an address without a valid port is the command's error line there too."""
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    line = one_line_error(capsys, "generate", "--checkpoint", str(run / "lm"), "--data", str(run / "data"), flag,
                          target, "--prompt", "a")
    assert f"address {target!r}" in line


@pytest.mark.parametrize("args, words", [
    (["--checkpoint", "{run}/lm", "--prompt", "a"],
     "--target or --datastore is required to retrieve while decoding (--no-retrieval: the model alone)"),
    (["--checkpoint", "{run}/lm", "--prompt", "a", "--no-retrieval", "--target", "127.0.0.1:1"],
     "--no-retrieval decodes with the model alone: it takes no --target or --datastore"),
    (["--checkpoint", "{run}/retro", "--prompt", "a", "--datastore", "{run}/x", "--k", "5000"],
     "--k sets kNN-LM's neighbours per query: RETRO retrieves its model's 2 per chunk"),
    (["--checkpoint", "{run}/lm", "--prompt", "a", "--no-retrieval", "--prefetch", "-1"], "--prefetch is RETRO's"),
    (["--checkpoint", "{run}/retro", "--prompt", "a", "--datastore", "{run}/x", "--ralmspec", "--prefetch", "2"],
     "--ralmspec speculates RETRO's exact queries: it takes no --prefetch"),
    (["--checkpoint", "{run}/lm", "--prompt", "a", "--no-retrieval", "--stride", "3"],
     "--stride sets --ralmspec's steps between verifications: it takes --ralmspec"),
    (["--checkpoint", "{run}/lm", "--prompt", "a", "--datastore", "{run}/x", "--knn-pipeline", "--no-overlap"],
     "--knn-pipeline overlaps kNN-LM's retrieval with compute"),
    (["--checkpoint", "{run}/lm", "--prompt", "a", "--no-retrieval", "--k", "8", "--nprobe", "4", "--no-overlap"],
     "--k, --nprobe and --no-overlap set retrieval: --no-retrieval decodes with the model alone"),
    (["--checkpoint", "{run}/lm", "--prompt", "a", "--no-retrieval", "--auth-token-file", "{run}/x"],
     "--auth-token-file sets retrieval: --no-retrieval decodes with the model alone"),
    (["--checkpoint", "{run}/lm", "--prompt", "a", "--no-retrieval", "--knn-pipeline"],  # ran, doing nothing
     "--knn-pipeline sets retrieval: --no-retrieval decodes with the model alone"),
    (["--checkpoint", "{run}/retro", "--prompt", "a", "--no-retrieval", "--prefetch", "3"],
     "--prefetch sets retrieval: --no-retrieval decodes with the model alone"),
    (["--checkpoint", "{run}/lm", "--prompt", "a", "--datastore", "{run}/x", "--ralmspec", "--no-overlap"],
     "--no-overlap retrieves serially: --ralmspec speculates retrieval and verifies it as it decodes"),
    (["--checkpoint", "{run}/retro", "--prompt", "a", "--datastore", "{run}/x", "--ralmspec", "--stride", "3"],
     "RETRO's --ralmspec guesses each chunk's neighbours and has no stride"),
    (["--checkpoint", "{run}/retro", "--prompt", "a", "--datastore", "{run}/x", "--knn-pipeline"],
     "--knn-pipeline overlaps kNN-LM's retrieval with compute: it takes an LM checkpoint"),
    (["--checkpoint", "{run}/lm", "--prompt", "a", "--no-retrieval", "--max-new-tokens", "200"],
     "+ --max-new-tokens 200 - 1 exceeds the model's max_len 128"),
    (["--checkpoint", "{run}/lm", "--prompt", "a", "--no-retrieval", "--strategy", "sample", "--temperature", "nan"],
     "--temperature must be > 0 and finite, got nan"),
    (["--checkpoint", "{run}/lm", "--prompt", "a", "--no-retrieval", "--strategy", "beam", "--length-penalty", "nan"],
     "--length-penalty must be in [-10, 10], got nan"),
    (["--checkpoint", "{run}/lm", "--prompt", "a", "--no-retrieval", "--strategy", "beam", "--length-penalty", "300"],
     "--length-penalty must be in [-10, 10], got 300"),  # 11.5 ** 300 overflowed mid-decode
    (["--checkpoint", "{run}/lm", "--prompt", "a", "--no-retrieval", "--strategy", "beam", "--length-penalty",
      "-1000"], "--length-penalty must be in [-10, 10], got -1000"),
    (["--checkpoint", "{run}/retro", "--prompt", "a", "--datastore", "{run}/x", "--ralmspec", "--strategy", "beam"],
     "--ralmspec with --strategy beam guesses kNN-LM's neighbours from the local caches"),
    (["--checkpoint", "{run}/lm", "--prompt", "a", "--datastore", "{run}/x", "--ralmspec", "--guess", "lm",
      "--strategy", "beam"], "--ralmspec with --strategy beam guesses kNN-LM's neighbours from the local caches"),
    (["--checkpoint", "{run}/lm", "--prompt", "", "--no-retrieval"],
     "--prompt '' is empty: a prompt needs at least one token"),
    (["--checkpoint", "{run}/lm", "--prompt-file", "{run}/blank.txt", "--no-retrieval"],
     "--prompt-file {run}/blank.txt holds no prompt (one per line)"),
])
def test_generate_refuses_options_that_do_not_apply_before_any_work(run, capsys, args, words):
    """Options for another model or mode, a decoding longer than the model takes, NaN settings and empty
    prompts are refused in one line before the model decodes (or any datastore is served: {run}/x is none)."""
    (run / "blank.txt").write_text("\n  \n")
    err = one_line_error(capsys, "generate", "--data", str(run / "data"), *[a.format(run=run) for a in args])
    assert words.format(run=run) in err


def test_generate_decodes_prompts_of_different_lengths_in_full(run, tmp_path, capsys):
    """Each prompt of a batch is decoded whole, as it is alone (the models take no padding: a batch per length)."""
    tokenizer = Tokenizer.load(run / "data" / "tokenizer.json")
    torch.manual_seed(0)
    lm = TransformerLM(LMConfig.tiny(tokenizer.vocab_size))
    with torch.no_grad():  # an untrained LM whose tokens depend on more of its context than the last token
        for name, weight in lm.named_parameters():
            if weight.dim() >= 2 and name != "tok_emb.weight":
                weight.mul_(5.0)
    save_checkpoint(tmp_path / "checkpoint.pt", kind="lm", model=lm, config=lm.config, step=0,
                    tokenizer_fingerprint=tokenizer.fingerprint, extra={})
    base = ["--no-progress", "--log-level", "WARNING", "generate", "--checkpoint", str(tmp_path), "--data",
            str(run / "data"), "--no-retrieval", "--max-new-tokens", "6"]
    long, short = "def handler_3(request):", "x"
    outputs = {}
    for prompts in ((long,), (short,), (long, short, long)):
        assert main([*base, *[a for p in prompts for a in ("--prompt", p)]]) == 0
        outputs[prompts] = capsys.readouterr().out.split("--- ")[1:]  # "'PROMPT'\nTEXT\n" each
    alone = outputs[(long,)] + outputs[(short,)]
    assert len(alone) == 2 and alone[0].startswith(repr(long)) and alone[0] != alone[1]
    assert outputs[(long, short, long)] == [alone[0], alone[1], alone[0]]
    with torch.no_grad():  # every token equally likely: what a row samples is its sampler's alone
        for weight in lm.parameters():
            weight.zero_()
    save_checkpoint(tmp_path / "checkpoint.pt", kind="lm", model=lm, config=lm.config, step=0,
                    tokenizer_fingerprint=tokenizer.fingerprint, extra={})
    assert main([*base, "--strategy", "sample", "--seed", "4", *[a for p in (long, short, long, short)
                                                                 for a in ("--prompt", p)]]) == 0
    sampled = [text.split("\n", 1)[1] for text in capsys.readouterr().out.split("--- ")[1:]]
    assert len(set(sampled)) == 4  # each row its own sampler, though the prompts come in two batches


def test_eval_windows_fit_the_lm_unless_set_and_bad_lambdas_name_the_flag(run, capsys):
    """eval's window defaults to 256 tokens cut to the LM's max_len (the tiny LM's 128), its stride to half
    the window; what the user sets stands. A λ that is no number names --lambdas."""
    from lm_worker.cli import build_parser
    from lm_worker.cli.evaluate import eval_window

    def window(*flags: str) -> tuple[int, int]:
        return eval_window(build_parser().parse_args(["eval", "--data", str(run / "data"), "--out", "o", *flags]))

    assert window("--lm", str(run / "lm")) == (128, 64)
    assert window("--lm", str(run / "lm"), "--context-len", "32") == (32, 16)
    assert window("--lm", str(run / "lm"), "--context-len", "32", "--stride", "8") == (32, 8)
    assert window("--retro", str(run / "retro")) == (256, 128)  # RETRO has no max_len
    err = one_line_error(capsys, "eval", "--data", str(run / "data"), "--out", str(run / "eval"), "--lm",
                         str(run / "lm"), "--knnlm-datastore", str(run / "x"), "--lambdas", "0.1,abc")
    assert "--lambdas takes comma-separated numbers in [0, 1], got 'abc'" in err and not (run / "eval").exists()


def test_an_errors_control_characters_reach_the_terminal_escaped(monkeypatch, capsys, tmp_path):
    """A retrieval service's status text is the server's to write: its terminal escapes are shown, not sent."""
    from lm_worker.cli import prepare

    def fail(args):
        raise RuntimeError("UNAVAILABLE: \x1b[2J\x1b]0;title\x07gone")

    monkeypatch.setattr(prepare, "run_prepare", fail)
    err = one_line_error(capsys, "prepare", "--out", str(tmp_path))
    assert err == "lm-worker prepare: error: UNAVAILABLE: \\x1b[2J\\x1b]0;title\\x07gone" and "\x1b" not in err


def fake_datastore(path: Path, kind: str) -> Path:
    """A folder whose manifest says what kind of datastore it is, and nothing else: a command that gets as
    far as serving it fails there, so an error about its kind or a flag proves it was refused first."""
    path.mkdir(exist_ok=True)
    (path / "manifest.json").write_text(json.dumps({"metadata": {"kind": kind}}))
    return path


@pytest.mark.parametrize("args, words", [
    (["eval", "--data", "{run}/data", "--out", "{run}/ev", "--lm", "{run}/lm", "--knnlm-datastore", "{run}/kds",
      "--retro", "{run}/retro", "--retro-datastore", "{run}/kds"],
     "the datastore of --retro-target / --retro-datastore is a 'knnlm' datastore (its manifest's kind), not a RETRO"),
    (["generate", "--data", "{run}/data", "--checkpoint", "{run}/retro", "--datastore", "{run}/kds", "--prompt", "a"],
     "the datastore of --target / --datastore is a 'knnlm' datastore (its manifest's kind), not a RETRO one"),
    (["generate", "--data", "{run}/data", "--checkpoint", "{run}/lm", "--datastore", "{run}/rds", "--prompt", "a"],
     "the datastore of --target / --datastore is a 'retro' datastore (its manifest's kind), not a kNN-LM one"),
    (["generate", "--data", "{run}/data", "--checkpoint", "{run}/lm", "--datastore", "{run}/kds", "--prompt", "a",
      "--k", "10", "--rerank", "5"], "--rerank must be 0 (off) or at least the 10 neighbours asked for, got 5"),
    (["neighbours", "--source", "{run}/knnlm-source", "--data", "{run}/data", "--datastore", "{run}/rds", "--k", "-1"],
     "--k must be >= 1, got -1"),
    (["neighbours", "--source", "{run}/knnlm-source", "--data", "{run}/data", "--datastore", "{run}/rds", "--nprobe",
      "-5"], "--nprobe must be >= 0 (0: the datastore's default), got -5"),
    (["neighbours", "--source", "{run}/knnlm-source", "--data", "{run}/data", "--datastore", "{run}/rds", "--rerank",
      "1"], "--rerank must be 0 (off) or at least the 2 neighbours asked for, got 1"),
    (["attention", "--data", "{run}/data", "--retro", "{run}/retro", "--datastore", "{run}/rds", "--out", "{run}/a.png",
      "--nprobe", "-4"], "--nprobe must be >= 0 (0: the datastore's default), got -4"),
    (["attention", "--data", "{run}/data", "--retro", "{run}/retro", "--datastore", "{run}/rds", "--out",
      "{run}/corpus.jsonl/a.png"], "--out {run}/corpus.jsonl/a.png lies under {run}/corpus.jsonl, which is a file"),
    (["train", "--data", "{run}/data", "--out", "{run}/kds", "--steps", "1", "--preset", "tiny"],
     "--out {run}/kds is a datastore, not a checkpoint folder: give another folder"),
    (["eval", "--data", "{run}/data", "--out", "{run}/kds", "--lm", "{run}/lm", "--knnlm-datastore", "{run}/kds"],
     "--out {run}/kds is a datastore, not an evaluation folder: give another folder"),
    (["eval", "--data", "{run}/data", "--out", "{run}/ev", "--lm", "{run}/lm", "--knnlm-datastore", "{run}/kds",
      "--knnlm-k", "10", "--knnlm-rerank", "5"],
     "--knnlm-rerank must be 0 (off) or at least the 10 neighbours asked for, got 5"),
    (["eval", "--data", "{run}/data", "--out", "{run}/data", "--lm", "{run}/lm", "--knnlm-datastore", "{run}/kds"],
     "--out {run}/data is a prepared corpus, not an evaluation folder: give another folder"),
    (["train", "--data", "{run}/data", "--out", "{run}/t", "--kind", "retro", "--steps", "1", "--preset", "tiny"],
     "RETRO training needs --neighbours (the folder with neighbours-train.npy)"),
    (["train", "--data", "{run}/data", "--out", "{run}/t", "--split", "heldout"],
     "--split must name a folder of the data to train on (train, retro), not a held-out one"),
    (["train", "--data", "{run}/data", "--out", "{run}/t", "--init-from", "{run}/lm"],
     "--init-from retro-fits a base LM into RETRO: it needs --kind retro, not 'lm'"),
])
def test_work_whose_result_could_not_be_used_is_refused_before_it_starts(run, capsys, args, words):
    """A datastore of the other kind, search numbers the service refuses and an output that cannot be
    written: one line naming the flag before any evaluation, embedding, training or serving (each used
    to be found after the work: a kNN-LM evaluation thrown away, a source's keys embedded again, a
    datastore folder given a checkpoint). Nothing is written."""
    fake_datastore(run / "kds", "knnlm"), fake_datastore(run / "rds", "retro")
    before = sorted(p for p in run.rglob("*"))
    err = one_line_error(capsys, *[a.format(run=run) for a in args])
    assert words.format(run=run) in err, err
    assert sorted(p for p in run.rglob("*")) == before


def test_an_output_folder_this_user_cannot_write_is_refused_before_the_work(run, capsys, monkeypatch):
    """eval --out under a folder without write permission: named before the evaluation (as root, which
    may write anywhere, the refusal is injected through os.access)."""
    import os

    from lm_worker.cli import common

    locked = run / "locked"
    locked.mkdir(exist_ok=True)
    access = os.access
    monkeypatch.setattr(common.os, "access", lambda path, mode: Path(path) != locked and access(path, mode))
    err = one_line_error(capsys, "eval", "--data", str(run / "data"), "--out", str(locked / "ev"), "--lm",
                         str(run / "lm"), "--knnlm-datastore", str(fake_datastore(run / "kds", "knnlm")))
    assert err.endswith(f"error: --out {locked / 'ev'}: {locked} is not writable by this user")


def test_errors_name_flags_for_fields_but_leave_paths_as_they_are():
    from lm_worker.cli.common import fields_as_flags

    with pytest.raises(ValueError) as refused:
        with fields_as_flags({"lr": "--lr", "split": "--split"}):
            raise ValueError("lr must be > 0, got 0 (/home/lr/runs/split/checkpoint.pt, lr)")
    assert str(refused.value) == "--lr must be > 0, got 0 (/home/lr/runs/split/checkpoint.pt, --lr)"


def test_sigterm_stops_a_command_as_ctrl_c_does(run, tmp_path):
    """`kill` (or `ray job stop`) during training: the command unwinds as on Ctrl-C and says so in one line,
    exit status 130 (it used to end silently with status 15)."""
    import signal
    import threading

    command = [sys.executable, "-m", "lm_worker.cli", "--no-progress", "train", "--data", str(run / "data"), "--out",
               str(tmp_path / "lm"), "--preset", "tiny", "--steps", "1000000", "--seq-len", "16", "--batch-size", "2"]
    child = subprocess.Popen(command, stderr=subprocess.PIPE, text=True, start_new_session=True)
    watchdog = threading.Timer(90, child.kill)  # whatever happens, the child ends within 90 s
    watchdog.start()
    try:
        lines = []
        for line in child.stderr:  # its log says when training has begun
            lines.append(line)
            if "training lm" in line:
                child.send_signal(signal.SIGTERM)
                break
        rest = child.communicate(timeout=60)[1]
    finally:
        watchdog.cancel()
        child.kill()
    assert child.returncode == 130, lines + [rest]
    assert rest.strip().splitlines()[-1] == "lm-worker train: interrupted" and "Traceback" not in rest
