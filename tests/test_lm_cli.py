"""`lm-worker` end to end on a tiny corpus: prepare, train, encode, build, serve, neighbours, eval,
generate and attention, each through the CLI, with real servers on loopback ports."""

from __future__ import annotations

import json
import math
import os
import shutil

import pytest

import lm_worker.sources.neighbours as neighbours_module
from lm_worker.cli import build_parser, main
from lm_worker.data.prepare import load_prepared
from lm_worker.evaluation.config import EvalConfig
from lm_worker.evaluation.knnlm_eval import evaluate_lm
from lm_worker.models.checkpoint import load_checkpoint
from retriever_server.cluster.launcher import LocalDeployment

pytestmark = [pytest.mark.slow, pytest.mark.ray]

TEMPLATE = '''def handler_{i}(request, value={i}):
    """Handle request number {i} and return its value."""
    if request is None:
        raise ValueError("request {i} is missing")
    return request.process(value) + {i}

'''


@pytest.fixture(scope="module")
def run(tmp_path_factory, ray_cluster):
    root = tmp_path_factory.mktemp("run")
    corpus = root / "corpus"
    corpus.mkdir()
    for f in range(30):
        (corpus / f"mod{f}.py").write_text("".join(TEMPLATE.format(i=(f * 7 + j) % 23) for j in range(12)))
    return root


def cli(capsys, *args: str) -> str:
    code = main(["--no-progress", "--log-level", "WARNING", *args])
    out, err = capsys.readouterr()
    assert code == 0, err
    return out


@pytest.fixture(scope="module")
def lm_run(run):
    """Runs the kNN-LM half once for the tests below (module scope: capsys is not available here)."""
    steps = [
        ["prepare", "--corpus", str(run / "corpus"), "--out", str(run / "data"), "--vocab-size", "300",
         "--heldout-fraction", "0.2"],
        ["train", "--kind", "lm", "--preset", "tiny", "--data", str(run / "data"), "--out", str(run / "lm"),
         "--steps", "40", "--seq-len", "64", "--batch-size", "8", "--eval-every", "20", "--warmup", "5"],
        ["encode", "knnlm", "--checkpoint", str(run / "lm"), "--data", str(run / "data"), "--out",
         str(run / "knnlm-source"), "--context-len", "64", "--stride", "32"],
        ["build", str(run / "knnlm-source"), "--out", str(run / "knnlm-datastore"), "--factory", "IVF4,Flat",
         "--cpus-per-shard", "2"],  # the shard tasks in turn, each with both CPUs of the cluster
    ]
    for args in steps:
        assert main(["--no-progress", "--log-level", "WARNING", *args]) == 0, args
    return run


def test_prepare_train_encode_build_outputs(lm_run):
    tokenizer, train, heldout = load_prepared(lm_run / "data")
    assert len(train) > 1000 and len(heldout) > 0
    assert (lm_run / "lm" / "loss.png").is_file()
    losses = json.loads((lm_run / "lm" / "losses.json").read_text())
    assert losses["train"] and losses["heldout"]
    assert load_checkpoint(lm_run / "lm").tokenizer_fingerprint == tokenizer.fingerprint
    manifest = json.loads((lm_run / "knnlm-datastore" / "manifest.json").read_text())
    assert manifest["metadata"]["kind"] == "knnlm" and manifest["metadata"]["tokenizer"] == tokenizer.fingerprint


def test_eval_knnlm_over_grpc(lm_run, capsys):
    out = cli(capsys, "eval", "--data", str(lm_run / "data"), "--lm", str(lm_run / "lm"), "--out",
              str(lm_run / "eval"), "--knnlm-datastore", str(lm_run / "knnlm-datastore"), "--knnlm-k", "16",
              "--knnlm-nprobe", "4", "--context-len", "64", "--stride", "32", "--lambdas", "0,0.25,0.5")
    assert "kNN-LM" in out and (lm_run / "eval" / "ppl_vs_lambda.png").is_file()
    result = json.loads((lm_run / "eval" / "eval.json").read_text())["knnlm"]
    _, _, heldout = load_prepared(lm_run / "data")
    base, _ = evaluate_lm(load_checkpoint(lm_run / "lm").model, heldout, EvalConfig(context_len=64, stride=32),
                          progress=False)
    assert result["base_perplexity"] == pytest.approx(base, rel=1e-9)
    assert result["perplexity"]["0.0"] == pytest.approx(base, rel=1e-9)
    # The held-out files repeat the training files' functions: the neighbours must help.
    assert result["perplexity"]["0.5"] < base and math.isfinite(result["best_perplexity"])


@pytest.fixture(scope="module")
def knn_servers(lm_run):
    with LocalDeployment.for_one_command(lm_run / "knnlm-datastore") as deployment:
        yield deployment


@pytest.mark.parametrize("strategy", ["greedy", "sample", "beam"])
def test_generate_knnlm(lm_run, knn_servers, capsys, strategy):
    shards = ",".join(s[0] for s in knn_servers.shard_addresses)  # the client fans out to the shards itself
    args = ["generate", "--checkpoint", str(lm_run / "lm"), "--data", str(lm_run / "data"), "--target", shards,
            "--k", "8", "--nprobe", "4", "--strategy", strategy,
            *{"beam": ["--beams", "2"], "sample": ["--top-k", "5"]}.get(strategy, []),  # each strategy's own
            "--prompt", "def handler_3(request", "--prompt", "    return request", "--max-new-tokens", "6"]
    out = cli(capsys, *args, *(["--knn-pipeline"] if strategy == "beam" else []))
    assert out.count("--- ") == 2 and "retrieval:" in out
    assert "each request sent once the keys were out" in out  # from within the forward, by default
    if strategy != "beam":  # the text serial decoding gives
        serial = cli(capsys, *args, "--no-overlap")
        assert "keys were out" not in serial
        assert out.split("\nretrieval:")[0] == serial.split("\nretrieval:")[0]
        ralmspec = cli(capsys, *args, "--ralmspec", "--stride", "2")  # guesses verified every 2 steps
        assert ralmspec.split("\nretrieval:")[0] == serial.split("\nretrieval:")[0]
        assert "guessed steps held" in ralmspec
        lm_guess = cli(capsys, *args, "--ralmspec", "--guess", "lm", "--stride", "1")  # the LM's own token, async
        assert lm_guess.split("\nretrieval:")[0] == serial.split("\nretrieval:")[0]
        assert "guessed steps held" in lm_guess



@pytest.mark.parametrize("strategy", ["greedy", "sample"])
def test_generate_pipelines_many_prompts_by_default(lm_run, knn_servers, capsys, strategy):
    """From PIPELINE_PROMPTS prompts on, generate decodes two prompt groups in turn: serial's text."""
    from lm_worker.cli.generate import PIPELINE_PROMPTS

    shards = ",".join(s[0] for s in knn_servers.shard_addresses)
    texts = ["def handler_3(request", "    return request", "import os", "class Node:"]
    tokenizer = load_prepared(lm_run / "data")[0]
    by_length: dict[int, list[str]] = {}  # one batch decodes prompts of one token count
    for text in (f"{texts[i % 4]} {i}" for i in range(256)):
        by_length.setdefault(len(tokenizer.encode(text)), []).append(text)
    same = max(by_length.values(), key=len)[:PIPELINE_PROMPTS]
    assert len(same) == PIPELINE_PROMPTS and len({t.split()[0] for t in same}) > 1
    prompts = [a for text in same for a in ("--prompt", text)]
    args = ["generate", "--checkpoint", str(lm_run / "lm"), "--data", str(lm_run / "data"), "--target", shards,
            "--k", "8", "--nprobe", "4", "--strategy", strategy, *(["--top-k", "5"] if strategy == "sample" else []),
            "--max-new-tokens", "4"]
    many = cli(capsys, *args, *prompts)
    assert many.count("--- ") == PIPELINE_PROMPTS and "two prompt groups pipelined" in many
    serial = cli(capsys, *args, *prompts, "--no-overlap")
    assert "pipelined" not in serial
    assert many.split("\nretrieval:")[0] == serial.split("\nretrieval:")[0]
    fewer = cli(capsys, *args, *prompts[:2 * (PIPELINE_PROMPTS - 1)])  # one prompt fewer: one batch, sent early
    assert "pipelined" not in fewer and "each request sent once the keys were out" in fewer

def failing_fetch(*_args, **_kwargs):
    raise ValueError("the service failed")


def test_retro_half(lm_run, capsys, monkeypatch):
    """The RETRO half with MiniLM chunks; the commands that retrieve share one deployment (`--target`;
    `--datastore`, which serves for the command's duration, is the other tests' way)."""
    from retriever_server.cluster.launcher import LocalDeployment

    run = lm_run
    cli(capsys, "encode", "retro", "--data", str(run / "data"), "--out", str(run / "retro-source"),
        "--chunk-len", "8", "--workers", "0")  # the Ray Data job with MiniLM: test_encode_job
    cli(capsys, "build", str(run / "retro-source"), "--out", str(run / "retro-datastore"), "--factory", "IVF4,Flat")
    with LocalDeployment.for_one_command(run / "retro-datastore") as deployment:
        target = deployment.router_address
        out = cli(capsys, "neighbours", "--source", str(run / "retro-source"), "--data", str(run / "data"),
                  "--target", target, "--k", "2", "--nprobe", "4", "--seq-len", "32")
        assert "train: neighbours" in out and (run / "retro-source" / "neighbours-heldout.npy").is_file()
        assert json.loads((run / "retro-source" / "neighbours-train.json").read_text()) == {"window": 32}
        searched = json.loads((run / "retro-source" / "neighbours-search.json").read_text())  # as the pipeline's
        assert searched["train"] == searched["heldout"] == {"nprobe": 4, "exact_rerank": False, "rerank_candidates": 0}
        with monkeypatch.context() as patched:  # a fetch for another window fails (the service, say)
            patched.setattr(neighbours_module, "precompute_neighbours", failing_fetch)
            assert main(["--no-progress", "--log-level", "ERROR", "neighbours", "--source",
                         str(run / "retro-source"), "--data", str(run / "data"), "--target", target, "--k", "2",
                         "--nprobe", "4", "--seq-len", "64"]) == 1
        capsys.readouterr()
        # The old file stays, and so does its record: the new window was recorded before the fetch, and a
        # `train --seq-len 64` then took neighbours that leak the text its windows are scored on.
        assert json.loads((run / "retro-source" / "neighbours-train.json").read_text()) == {"window": 32}
        cli(capsys, "train", "--kind", "retro", "--preset", "tiny", "--chunk-len", "8", "--data", str(run / "data"),
            "--out", str(run / "retro"), "--neighbours", str(run / "retro-source"), "--steps", "10", "--seq-len",
            "32", "--batch-size", "4", "--eval-every", "5", "--warmup", "2")
        out = cli(capsys, "eval", "--data", str(run / "data"), "--retro", str(run / "retro"), "--out",
                  str(run / "retro-eval"), "--retro-target", target, "--retro-nprobe", "4", "--context-len", "32",
                  "--stride", "16")
        result = json.loads((run / "retro-eval" / "eval.json").read_text())["retro"]
        assert result["perplexity"] > 0 and result["perplexity_without"] > 0 and "RETRO" in out
        cli(capsys, "attention", "--retro", str(run / "retro"), "--data", str(run / "data"), "--target", target,
            "--nprobe", "4", "--out", str(run / "attention.png"))
        assert (run / "attention.png").stat().st_size > 1000
        out = cli(capsys, "generate", "--checkpoint", str(run / "retro"), "--data", str(run / "data"), "--target",
                  target, "--nprobe", "4", "--prefetch", "2", "--prompt", "def handler_5(request",
                  "--max-new-tokens", "12")
        assert out.count("--- ") == 1
        args = ["generate", "--checkpoint", str(run / "retro"), "--data", str(run / "data"), "--target", target,
                "--nprobe", "4", "--prompt", "def handler_5(request", "--prompt", "    return request",
                "--max-new-tokens", "20"]
        exact = cli(capsys, *args)  # prefetch 0: exact RETRO
        speculative = cli(capsys, *args, "--ralmspec")  # chunk neighbours guessed where guesses hold
        assert speculative.split("\nretrieval:")[0] == exact.split("\nretrieval:")[0] and "retrieval:" in speculative
        by_row = cli(capsys, *args, "--ralmspec", "--rollback", "row")  # a failed guess rolls back its prompt alone
        assert by_row.split("\nretrieval:")[0] == exact.split("\nretrieval:")[0] and "retrieval:" in by_row


def test_retro_with_the_lm_encoder(lm_run, capsys):
    """The LM encodes the RETRO source; neighbours, eval and generate find that encoder in the datastore;
    RETRO is retro-fitted onto that LM."""
    import numpy as np
    import torch

    from lm_worker.encoders.lm_chunks import LMChunkEncoder

    run, L = lm_run, 8
    cli(capsys, "encode", "retro", "--encoder", "lm", "--checkpoint", str(run / "lm"), "--data", str(run / "data"),
        "--out", str(run / "retro-lm-source"), "--chunk-len", str(L), "--workers", "0")
    cli(capsys, "build", str(run / "retro-lm-source"), "--out", str(run / "retro-lm-datastore"), "--factory",
        "IVF4,Flat")
    cli(capsys, "neighbours", "--source", str(run / "retro-lm-source"), "--data", str(run / "data"),
        "--datastore", str(run / "retro-lm-datastore"), "--k", "2", "--nprobe", "4")
    _, _, heldout = load_prepared(run / "data")
    C = len(heldout) // L
    chunks = np.asarray(heldout.tokens[: C * L]).reshape(C, L)
    held_keys = np.load(run / "retro-lm-source" / "heldout-keys.npy")
    np.testing.assert_array_equal(held_keys, LMChunkEncoder.load(run / "lm").embed(chunks))  # the LM's keys
    np.save(run / "retro-lm-source" / "heldout-keys.npy", np.zeros_like(held_keys))  # as an interrupted run,
    (run / "retro-lm-source" / "heldout-keys.json").unlink()  # or another run's, would leave it: embedded again
    again = cli(capsys, "neighbours", "--source", str(run / "retro-lm-source"), "--data", str(run / "data"),
                "--datastore", str(run / "retro-lm-datastore"), "--k", "2", "--nprobe", "4")
    assert "heldout-keys.npy was made from other data, or by another encoder: embedding again" in again
    np.testing.assert_array_equal(np.load(run / "retro-lm-source" / "heldout-keys.npy"), held_keys)
    cli(capsys, "train", "--kind", "retro", "--preset", "tiny", "--chunk-len", str(L), "--data", str(run / "data"),
        "--out", str(run / "retro-lm"), "--neighbours", str(run / "retro-lm-source"), "--steps", "4",
        "--seq-len", "32", "--batch-size", "4", "--eval-every", "4", "--warmup", "2", "--init-from", str(run / "lm"))
    lm, fitted = load_checkpoint(run / "lm").model, load_checkpoint(run / "retro-lm").model  # retro-fitted
    assert fitted.config.n_layer == lm.config.n_layer
    assert torch.equal(fitted.tok_emb.weight, lm.tok_emb.weight)
    code = main(["--no-progress", "eval", "--data", str(run / "data"), "--lm", str(run / "lm"), "--retro",
                 str(run / "retro-lm"), "--out", str(run / "misaligned"), "--knnlm-datastore",
                 str(run / "knnlm-datastore"), "--retro-datastore", str(run / "retro-lm-datastore"),
                 "--context-len", "60", "--stride", "30"])  # refused before the kNN-LM half runs
    out, err = capsys.readouterr()
    assert code == 1 and "Traceback" not in err and not (run / "misaligned").exists() and "kNN-LM" not in out + err
    assert "--context-len 60 and --stride 30 must be multiples of --retro's chunk length 8" in err
    cli(capsys, "eval", "--data", str(run / "data"), "--retro", str(run / "retro-lm"), "--out",
        str(run / "retro-lm-eval"), "--retro-datastore", str(run / "retro-lm-datastore"), "--retro-nprobe", "4",
        "--context-len", "32", "--stride", "16")
    result = json.loads((run / "retro-lm-eval" / "eval.json").read_text())["retro"]
    assert math.isfinite(result["perplexity"]) and result["perplexity"] != result["perplexity_without"]
    shutil.copytree(run / "lm", run / "lm-moved")  # a run moved elsewhere: --encoder-lm names the LM
    cli(capsys, "eval", "--data", str(run / "data"), "--retro", str(run / "retro-lm"), "--out",
        str(run / "retro-lm-eval-2"), "--retro-datastore", str(run / "retro-lm-datastore"), "--retro-nprobe", "4",
        "--context-len", "32", "--stride", "16", "--encoder-lm", str(run / "lm-moved"))
    again = json.loads((run / "retro-lm-eval-2" / "eval.json").read_text())["retro"]
    assert again["perplexity"] == result["perplexity"]
    code = main(["--no-progress", "eval", "--data", str(run / "data"), "--retro", str(run / "retro-lm"), "--out",
                 str(run / "x"), "--retro-datastore", str(run / "retro-lm-datastore"), "--encoder-lm",
                 str(run / "nowhere")])
    _, err = capsys.readouterr()
    assert code == 1 and "nowhere" in err and "Traceback" not in err, err
    out = cli(capsys, "generate", "--checkpoint", str(run / "retro-lm"), "--data", str(run / "data"),
              "--datastore", str(run / "retro-lm-datastore"), "--nprobe", "4", "--prompt", "def handler_5(request",
              "--max-new-tokens", "10")
    assert out.count("--- ") == 1


@pytest.mark.parametrize("args, words", [
    (["encode", "retro", "--encoder", "lm", "--data", "{run}/data", "--out", "{run}/x"], "--checkpoint is required"),
    (["eval", "--data", "{run}/data", "--out", "{run}/x"], "give --lm"),
    (["eval", "--data", "{run}/data", "--out", "{run}/x", "--lm", "{run}/lm"], "--knnlm-target or"),
    (["encode", "knnlm", "--data", "{run}/data", "--out", "{run}/x"], "--checkpoint is required"),
    (["generate", "--checkpoint", "{run}/lm", "--data", "{run}/data"], "give --prompt"),
    (["generate", "--checkpoint", "{run}/lm", "--data", "{run}/data", "--prompt", "x", "--guess", "lm"],
     "takes --ralmspec"),
    (["generate", "--checkpoint", "{run}/lm", "--data", "{run}/data", "--prompt", "x", "--ralmspec", "--rollback",
      "row"], "a RETRO checkpoint"),
    (["generate", "--checkpoint", "{run}/lm", "--data", "{run}/data", "--prompt", "x", "--ralmspec", "--rollback",
      "batch"], "a RETRO checkpoint"),
    (["generate", "--checkpoint", "{run}/lm", "--data", "{run}/data", "--prompt", "x", "--ralmspec",
      "--no-retrieval"], "--no-retrieval decodes with the model alone"),
    (["train", "--data", "{run}/nowhere", "--out", "{run}/x"], "nowhere"),
])
def test_errors_are_one_line(lm_run, capsys, args, words):
    code = main(["--no-progress", *[a.format(run=lm_run) for a in args]])
    _, err = capsys.readouterr()
    assert code == 1 and words in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_a_bad_log_level_is_one_line(capsys):
    with pytest.raises(SystemExit) as exited:
        main(["--log-level", "chatty", "prepare"])
    err = capsys.readouterr().err
    assert exited.value.code == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert "argument --log-level: invalid choice: 'CHATTY'" in err
    parsed = build_parser().parse_args(["--log-level", "debug", "train", "--data", "d", "--out", "o"])
    assert parsed.log_level == "DEBUG"


@pytest.mark.parametrize("args, passive", [
    (["eval", "--data", "d", "--out", "o", "--lm", "m", "--knnlm-datastore", "ds"], True),
    (["eval", "--data", "d", "--out", "o", "--lm", "m", "--knnlm-target", "127.0.0.1:1,localhost:2"], True),
    (["generate", "--checkpoint", "c", "--data", "d", "--target", "127.0.0.1:1|127.0.0.1:3", "--prompt", "p"], True),
    (["eval", "--data", "d", "--out", "o", "--lm", "m", "--knnlm-target", "10.1.2.3:1,127.0.0.1:2"], False),
    (["eval", "--data", "d", "--out", "o", "--lm", "m", "--knnlm-target", "localhost.example.com:1"], False),
    (["eval", "--data", "d", "--out", "o", "--lm", "m", "--knnlm-target", "127.example.com:1"], False),
    (["train", "--kind", "lm", "--data", "d", "--out", "o"], False),
])
def test_model_threads_wait_passively_only_beside_local_servers(monkeypatch, args, passive):
    from lm_worker import cli as lm_cli

    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    lm_cli.share_cores_with_servers(lm_cli.build_parser().parse_args(args))
    assert os.environ.get("OMP_WAIT_POLICY") == ("PASSIVE" if passive else None)
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")  # a user's own setting wins
    lm_cli.share_cores_with_servers(lm_cli.build_parser().parse_args(args))
    assert os.environ["OMP_WAIT_POLICY"] == "ACTIVE"


def test_retro_fits_on_the_retro_split(run, capsys):
    """`prepare --max-retro-tokens` keeps documents out of the LM's train split; `neighbours` fetches the
    neighbours of their chunks; `train --split retro --init-from` retro-fits RETRO on them."""
    import numpy as np

    from lm_worker.data.token_store import TokenStore

    data, L = run / "data-r", 8
    out = cli(capsys, "prepare", "--corpus", str(run / "corpus"), "--out", str(data), "--vocab-size", "300",
              "--heldout-fraction", "0.2", "--max-train-tokens", "6000", "--max-retro-tokens", "1500")
    assert "| retro |" in out
    retro_split = TokenStore.open(data / "retro")
    assert not {d.name for d in retro_split.documents} & {d.name for d in TokenStore.open(data / "train").documents}
    cli(capsys, "train", "--kind", "lm", "--preset", "tiny", "--data", str(data), "--out", str(run / "lm-r"),
        "--steps", "4", "--seq-len", "32", "--batch-size", "4", "--eval-every", "4", "--warmup", "2")
    cli(capsys, "encode", "retro", "--encoder", "lm", "--checkpoint", str(run / "lm-r"), "--data", str(data),
        "--out", str(run / "retro-r-source"), "--chunk-len", str(L), "--workers", "0")
    cli(capsys, "build", str(run / "retro-r-source"), "--out", str(run / "retro-r-datastore"), "--factory",
        "IVF4,Flat")
    out = cli(capsys, "neighbours", "--source", str(run / "retro-r-source"), "--data", str(data),
              "--datastore", str(run / "retro-r-datastore"), "--k", "2", "--nprobe", "4")
    assert "retro: neighbours" in out
    neighbours = np.load(run / "retro-r-source" / "neighbours-retro.npy")
    assert neighbours.shape == (len(retro_split) // L, 2, 2 * L)
    cli(capsys, "train", "--kind", "retro", "--preset", "tiny", "--chunk-len", str(L), "--data", str(data),
        "--out", str(run / "retro-r"), "--neighbours", str(run / "retro-r-source"), "--steps", "2", "--seq-len", "32",
        "--batch-size", "4", "--eval-every", "2", "--warmup", "1", "--init-from", str(run / "lm-r"),
        "--split", "retro")
    assert load_checkpoint(run / "retro-r").extra["train_config"]["split"] == "retro"


def test_a_prompts_sampled_text_does_not_depend_on_the_other_prompts_lengths(lm_run, capsys):
    """Prompts decode in batches of one token count; each prompt's sampler is seeded by its place among
    the prompts, so prompt 2 of [X, C, Y] (X, Y of one length, C of another) draws what prompt 2 of
    [X, C, Z] (Z of C's length) draws."""
    tokenizer = load_prepared(lm_run / "data")[0]
    by_length: dict[int, list[str]] = {}
    for i in range(40):
        for text in (f"def handler_{i}(request", f"    return request.process({i})", f"x = {i}"):
            by_length.setdefault(len(tokenizer.encode(text)), []).append(text)
    (x, y), (c, z) = [texts[:2] for texts in by_length.values() if len(texts) >= 2][:2]

    def sampled(*texts: str) -> dict[str, str]:
        out = cli(capsys, "generate", "--checkpoint", str(lm_run / "lm"), "--data", str(lm_run / "data"),
                  "--no-retrieval", "--strategy", "sample", "--seed", "7", "--max-new-tokens", "12",
                  *[a for text in texts for a in ("--prompt", text)])
        blocks = out.split("--- ")[1:]
        return {block.split("\n", 1)[0]: block.split("\n", 1)[1] for block in blocks}

    first, second = sampled(x, c, y), sampled(x, c, z)
    assert first[repr(c)] == second[repr(c)]
    assert first[repr(x)] == second[repr(x)]


def test_a_model_or_datastore_of_another_tokenizer_is_refused_before_any_work(lm_run, capsys):
    """--data tokenized by another tokenizer than the checkpoint's, or a datastore whose payloads are
    another tokenizer's ids: eval and generate refuse in one line, naming what differs."""
    import dataclasses

    from retriever_server.datastore.manifest import read_manifest, write_manifest

    run = lm_run
    assert main(["--no-progress", "--log-level", "WARNING", "prepare", "--corpus", str(run / "corpus"), "--out",
                 str(run / "data-280"), "--vocab-size", "280", "--heldout-fraction", "0.2"]) == 0
    capsys.readouterr()
    theirs = load_prepared(run / "data-280")[0].fingerprint
    ours = load_prepared(run / "data")[0].fingerprint
    assert theirs != ours
    foreign = run / "knnlm-datastore-foreign"
    shutil.copytree(run / "knnlm-datastore", foreign)
    manifest = read_manifest(foreign)
    write_manifest(foreign, dataclasses.replace(manifest, metadata={**manifest.metadata, "tokenizer": theirs}))
    for args, words in [
        (["generate", "--checkpoint", str(run / "lm"), "--data", str(run / "data-280"), "--no-retrieval",
          "--prompt", "x"], f"was trained with tokenizer {ours!r}, but --data's is {theirs}"),
        (["eval", "--data", str(run / "data-280"), "--lm", str(run / "lm"), "--out", str(run / "x"),
          "--knnlm-datastore", str(run / "knnlm-datastore")], f"--lm {run / 'lm'} was trained with tokenizer"),
        (["generate", "--checkpoint", str(run / "lm"), "--data", str(run / "data"), "--datastore", str(foreign),
          "--prompt", "x"], f"holds tokens of tokenizer {theirs!r}, but --data's is {ours}"),
        (["eval", "--data", str(run / "data"), "--lm", str(run / "lm"), "--out", str(run / "x"),
          "--knnlm-datastore", str(foreign)], "the datastore of --knnlm-target / --knnlm-datastore holds tokens"),
        (["encode", "knnlm", "--checkpoint", str(run / "lm"), "--data", str(run / "data-280"), "--out",
          str(run / "x")], f"--checkpoint {run / 'lm'} was trained with tokenizer {ours!r}"),
        (["encode", "retro", "--encoder", "lm", "--checkpoint", str(run / "lm"), "--data", str(run / "data-280"),
          "--out", str(run / "x"), "--chunk-len", "8", "--workers", "0"], "was trained with tokenizer"),
    ]:
        code = main(["--no-progress", "--log-level", "WARNING", *args])
        out, err = capsys.readouterr()
        assert code == 1 and words in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
        assert "---" not in out and not (run / "x").exists()


def test_a_retro_target_serving_a_knnlm_datastore_is_refused_before_knnlms_evaluation(lm_run, knn_servers, capsys,
                                                                                      monkeypatch):
    """eval --retro-target naming a server of a kNN-LM datastore: refused in one line naming the flag before
    any evaluation runs (it used to be found once the kNN-LM evaluation had finished, and that lost)."""
    from lm_worker.data.tokenizer import Tokenizer
    from lm_worker.evaluation import knnlm_eval
    from lm_worker.models.checkpoint import save_checkpoint
    from lm_worker.models.retro import Retro, RetroConfig

    tokenizer = Tokenizer.load(lm_run / "data" / "tokenizer.json")
    retro = Retro(RetroConfig.tiny(tokenizer.vocab_size))
    save_checkpoint(lm_run / "retro-untrained" / "checkpoint.pt", kind="retro", model=retro, config=retro.config,
                    step=0, tokenizer_fingerprint=tokenizer.fingerprint, extra={})
    monkeypatch.setattr(knnlm_eval, "evaluate_knnlm", lambda *a, **k: pytest.fail("kNN-LM was evaluated first"))
    shards = ",".join(s[0] for s in knn_servers.shard_addresses)
    code = main(["--no-progress", "--log-level", "WARNING", "eval", "--data", str(lm_run / "data"), "--out",
                 str(lm_run / "refused"), "--lm", str(lm_run / "lm"), "--knnlm-target", shards, "--retro",
                 str(lm_run / "retro-untrained"), "--retro-target", shards, "--tokens", "64"])
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert "the datastore of --retro-target / --retro-datastore is a 'knnlm' datastore" in err
    assert not (lm_run / "refused").exists()
