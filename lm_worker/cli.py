"""`lm-worker`: the LM side of the system.

    lm-worker prepare  --out RUN/data [--corpus stdlib|DIR|FILE.jsonl]     # split, tokenizer, tokens
                       [--max-retro-tokens N]                              # + text the LM never sees
    lm-worker train    --kind lm|retro --data RUN/data --out RUN/lm        # checkpoints, loss plot
                       [--init-from RUN/lm --split retro]                  # RETRO retro-fitted onto the LM
    lm-worker encode   knnlm|retro --data RUN/data --out RUN/knnlm-source  # datastore sources
    lm-worker build    RUN/knnlm-source --out RUN/knnlm-datastore          # the Ray build job
    lm-worker neighbours --source RUN/retro-source --data RUN/data --datastore RUN/retro-datastore
    lm-worker eval     --data RUN/data --lm CKPT --knnlm-datastore DS [--retro CKPT --retro-datastore DS]
    lm-worker generate --checkpoint CKPT --data RUN/data --datastore DS --prompt TEXT [--strategy beam]
    lm-worker attention --retro CKPT --data RUN/data --datastore DS --out attention.png
    lm-worker pipeline --run RUN                                           # all of the above, resumable
    lm-worker demo                                # the pipeline at demo sizes, on a local Ray cluster
    lm-worker retrieval-demo                      # MiniLM chunks of the stdlib, 2 shards, recall vs brute force

Where a command retrieves, `--target HOST:PORT` (a router, or shards comma-separated) uses running
servers, and `--datastore DIR` serves that datastore locally (every shard and a router) for the
duration of the command.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
import textwrap
from pathlib import Path

from lm_worker.retro_encoders import ENCODERS

RETRO_INITS = ("lm", "scratch")
RETRO_INIT_HELP = ("lm: retro-fit RETRO onto the trained base LM (frozen; only CCA and the neighbour encoder "
                   "train); scratch: train RETRO's own decoder from random weights")

PROG = "lm-worker"
log = logging.getLogger(__name__)
_LOOPBACK = ("127.", "localhost", "[::1]", "unix:")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, no usage dump
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _encoder_lm_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--encoder-lm", type=Path,
                   help="a RETRO datastore encoded with the LM: its checkpoint, if not where the datastore says")


def _retrieval_args(p: argparse.ArgumentParser, k: int, what: str) -> None:
    where = p.add_mutually_exclusive_group()
    where.add_argument(f"--{what}target", help="HOST:PORT of a router, or shard addresses comma-separated")
    where.add_argument(f"--{what}datastore", type=Path, help="serve this datastore locally while the command runs")
    p.add_argument(f"--{what}k", type=int, default=k, help="neighbours per query")
    p.add_argument(f"--{what}nprobe", type=int, default=0, help="inverted lists probed (0: the datastore's default)")
    p.add_argument(f"--{what}rerank", type=int, default=0, metavar="N",
                   help="re-rank N candidates by exact distance from the stored keys (0: off)")


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description="LM workers that retrieve from the datastore over gRPC.")
    parser.add_argument("--log-level", default="INFO")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("prepare", help="split a corpus, train the BPE tokenizer, write token streams")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--corpus", default="stdlib", help="'stdlib', a folder of text files, or a .jsonl file")
    p.add_argument("--id-field", help="JSONL field naming each document (default: the line number)")
    p.add_argument("--vocab-size", type=int, default=4096)
    p.add_argument("--heldout-fraction", type=float, default=0.05)
    p.add_argument("--max-train-tokens", type=int, default=0, help="0: every training document")
    p.add_argument("--max-heldout-tokens", type=int, default=0)
    p.add_argument("--max-retro-tokens", type=int, default=0,
                   help="also write the 'retro' split: this many tokens of training-side documents the train split "
                        "left out, for retro-fitting RETRO onto the LM (0: no such split)")

    t = sub.add_parser("train", help="train the base LM or RETRO")
    t.add_argument("--kind", choices=("lm", "retro"), default="lm")
    t.add_argument("--data", type=Path, required=True, help="a `prepare` output folder")
    t.add_argument("--out", type=Path, required=True, help="checkpoint folder (resumed when it has one)")
    t.add_argument("--neighbours", type=Path, help="RETRO: folder with neighbours-SPLIT.npy (see `neighbours`)")
    t.add_argument("--preset", choices=("tiny", "small", "gpu"), default="small")
    for name, default in (("steps", 2000), ("seq-len", 256), ("batch-size", 16), ("warmup", 100),
                          ("eval-every", 200), ("checkpoint-every", 500), ("chunk-len", 0), ("seed", 0)):
        t.add_argument(f"--{name}", type=int, default=default)
    t.add_argument("--lr", type=float, default=3e-3)
    t.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    t.add_argument("--no-amp", action="store_true", help="no bf16 autocast on CUDA")
    t.add_argument("--restart", action="store_true", help="ignore an existing checkpoint")
    t.add_argument("--init-from", type=Path, help="RETRO: retro-fit this base LM checkpoint (its decoder shape and "
                                                  "weights; new CCA layers start as a no-op)")
    t.add_argument("--train-base", action="store_true", help="with --init-from: train the LM's weights too "
                                                             "(default: frozen, only RETRO's new layers train)")
    t.add_argument("--split", default="train", help="the split of --data to train on: train, or retro (prepare "
                                                    "--max-retro-tokens) to retro-fit RETRO on text the LM never saw")

    e = sub.add_parser("encode", help="write a kNN-LM or RETRO datastore source")
    e.add_argument("kind", choices=("knnlm", "retro"))
    e.add_argument("--data", type=Path, required=True)
    e.add_argument("--out", type=Path, required=True)
    e.add_argument("--checkpoint", type=Path,
                   help="the base LM: kNN-LM, whose keys are stored; RETRO with --encoder lm, whose keys embed chunks")
    e.add_argument("--encoder", choices=ENCODERS, default="minilm",
                   help="RETRO: the frozen chunk encoder (MiniLM, or the base LM's key at the chunk's last token)")
    e.add_argument("--split", choices=("train", "heldout"), default="train")
    e.add_argument("--context-len", type=int, default=256)
    e.add_argument("--stride", type=int, default=128)
    e.add_argument("--chunk-len", type=int, default=16, help="RETRO: tokens per chunk")
    e.add_argument("--device", default="cpu", help="cpu or cuda (each worker actor then takes a GPU)")
    e.add_argument("--workers", type=int, default=2,
                   help="Ray Data actors holding the model, writing the source in parts (resumed part by part); "
                        "0: a plain loop in this process, one .npy per array")
    e.add_argument("--rows-per-part", type=int, default=0, help="rows per part (0: 65536 kNN-LM, 4096 RETRO)")
    e.add_argument("--worker-cpus", type=float, default=1.0, help="CPUs per worker actor")
    e.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, as under `ray job submit`, "
                                     "else a local cluster)")

    b = sub.add_parser("build", help="build the datastore of a source (a Ray job)")
    b.add_argument("source", type=Path)
    b.add_argument("--out", type=Path, required=True)
    b.add_argument("--shards", type=int, default=2)
    b.add_argument("--factory", default="auto")
    b.add_argument("--num-cpus", type=int)
    b.add_argument("--overwrite", action="store_true")

    n = sub.add_parser("neighbours", help="fetch RETRO neighbours of every train (own document excluded), "
                                          "held-out and retro-split chunk")
    n.add_argument("--source", type=Path, required=True, help="the RETRO source folder; results go there")
    n.add_argument("--data", type=Path, required=True)
    _retrieval_args(n, 2, "")
    _encoder_lm_arg(n)

    v = sub.add_parser("eval", help="perplexity: base LM, kNN-LM over a sweep of λ, RETRO with/without")
    v.add_argument("--data", type=Path, required=True)
    v.add_argument("--out", type=Path, required=True, help="folder for eval.json, table.md and plots")
    v.add_argument("--lm", type=Path, help="base LM checkpoint (or a Hugging Face model folder)")
    v.add_argument("--retro", type=Path, help="RETRO checkpoint")
    v.add_argument("--split", default="heldout", help="a split folder of --data: heldout, train (or valid, test "
                                                      "in a pipeline run)")
    v.add_argument("--tokens", type=int, default=0, help="scored tokens (0: the whole split)")
    v.add_argument("--workers", type=int, default=0,
                   help="spread the evaluation over this many LM worker actors on the Ray cluster (0: in this "
                        "process); finished shares are checkpointed in OUT/shares and reused by a rerun")
    v.add_argument("--worker-cpus", type=float, default=1.0, help="CPUs per worker actor")
    v.add_argument("--worker-gpus", type=float, default=0.0, help="GPUs per worker actor (1 on a GPU cluster)")
    v.add_argument("--batches-per-share", type=int, default=4)
    v.add_argument("--address", help="Ray cluster address (default: RAY_ADDRESS, as under `ray job submit`, "
                                     "else a local cluster)")
    v.add_argument("--context-len", type=int, default=256)
    v.add_argument("--stride", type=int, default=128)
    v.add_argument("--lambdas", default="", help="comma-separated λ values (default: a sweep from 0 to 0.9)")
    v.add_argument("--temperature", type=float, default=1.0)
    v.add_argument("--exclude-own-document", action="store_true")
    _retrieval_args(v, 1024, "knnlm-")
    _retrieval_args(v, 2, "retro-")
    _encoder_lm_arg(v)

    g = sub.add_parser("generate", help="decode with greedy, sampling or beam search while retrieving")
    g.add_argument("--checkpoint", type=Path, required=True, help="an LM (kNN-LM) or RETRO checkpoint")
    g.add_argument("--data", type=Path, required=True, help="the `prepare` folder (for the tokenizer)")
    g.add_argument("--prompt", action="append", default=[], help="a prompt; repeat for a batch")
    g.add_argument("--prompt-file", type=Path, help="prompts, one per line")
    g.add_argument("--strategy", choices=("greedy", "sample", "beam"), default="greedy")
    g.add_argument("--max-new-tokens", type=int, default=64)
    g.add_argument("--temperature", type=float, default=1.0)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--beams", type=int, default=4)
    g.add_argument("--length-penalty", type=float, default=0.6)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--lam", type=float, default=0.25, help="kNN-LM λ")
    g.add_argument("--knn-temperature", type=float, default=1.0)
    g.add_argument("--prefetch", type=int, default=0, help="RETRO: send a chunk's query this many tokens early")
    g.add_argument("--no-overlap", action="store_true",
                   help="retrieve serially: RETRO's prefetched queries when needed, kNN-LM without computing "
                        "the next step on the LM's guess while the neighbours are in flight")
    g.add_argument("--knn-pipeline", action="store_true",
                   help="kNN-LM: decode two groups of prompts in turn so one's retrieval overlaps the other's "
                        "model step (pays off with many prompts; on a small CPU model, serial is faster)")
    g.add_argument("--no-retrieval", action="store_true", help="the model alone")
    _retrieval_args(g, 0, "")
    _encoder_lm_arg(g)

    a = sub.add_parser("attention", help="plot which neighbour tokens a RETRO chunk attends to")
    a.add_argument("--retro", type=Path, required=True)
    a.add_argument("--data", type=Path, required=True)
    a.add_argument("--out", type=Path, required=True, help="PNG to write")
    a.add_argument("--text", help="text to run (default: the start of the held-out split)")
    a.add_argument("--chunk", type=int, default=1)
    _retrieval_args(a, 0, "")
    _encoder_lm_arg(a)

    pl = sub.add_parser("pipeline", help="prepare, train, encode, build, serve, evaluate: the whole LM side")
    pl.add_argument("--run", type=Path, default=Path("runs/stdlib"))
    pl.add_argument("--train-tokens", type=int, default=800_000)
    pl.add_argument("--heldout-tokens", type=int, default=40_000)
    pl.add_argument("--retro-tokens", type=int, default=3_200_000,
                    help="tokens of documents the LM never sees, which retro-fitted RETRO trains on (0: the LM's own)")
    pl.add_argument("--lm-steps", type=int, default=500)
    pl.add_argument("--retro-steps", type=int, default=1600)
    pl.add_argument("--preset", choices=("tiny", "small", "gpu"), default="small")
    pl.add_argument("--address", help="a Ray cluster (default: RAY_ADDRESS, else a local cluster)")
    pl.add_argument("--workers", type=int, default=2, help="Ray Data encode actors and LM worker actors (0: none)")
    pl.add_argument("--retro-encoder", choices=ENCODERS, default="lm",
                    help="RETRO's frozen chunk encoder: MiniLM, or the base LM's key at each chunk's last token")
    pl.add_argument("--retro-init", choices=RETRO_INITS, default="lm", help=RETRO_INIT_HELP)

    d = sub.add_parser("demo", help="the whole pipeline at CPU sizes on the built-in corpus (about 10 minutes on "
                                    "2 cores; a second run reuses what the first built)")
    d.add_argument("--run", type=Path, default=Path("runs/demo"), help="where the demo keeps what it builds")
    d.add_argument("--address", help="a Ray cluster (default: RAY_ADDRESS, else a local cluster)")
    d.add_argument("--workers", type=int, default=2, help="Ray Data encode actors and LM worker actors")
    d.add_argument("--retro-encoder", choices=ENCODERS, default="lm",
                   help="RETRO's frozen chunk encoder: MiniLM, or the base LM's key at each chunk's last token")
    d.add_argument("--retro-init", choices=RETRO_INITS, default="lm", help=RETRO_INIT_HELP)

    rd = sub.add_parser("retrieval-demo", help="encode the stdlib, build 2 shards, serve them, query over gRPC")
    rd.add_argument("--out", type=Path, default=Path("runs/retrieval-demo"), help="where it keeps what it builds")
    rd.add_argument("--keys", type=int, default=12000, help="stdlib chunks in the datastore (>= 9984 for IVFPQ)")
    rd.add_argument("--queries", type=int, default=500, help="held-out chunks used as queries")
    return parser


# ---------------------------------------------------------------------------------------------- retrieval

def _retrieval_config(args, what: str, k: int | None = None):
    from lm_worker.retrieval import RetrievalConfig

    get = lambda name: getattr(args, f"{what}{name}".replace("-", "_"))  # noqa: E731
    rerank = get("rerank")
    return RetrievalConfig(k=k or get("k"), nprobe=get("nprobe"), exact_rerank=rerank > 0, rerank_candidates=rerank)


@contextlib.contextmanager
def _target(args, what: str = ""):
    """The retrieval target: --target as given, or the router of --datastore served locally meanwhile;
    None when neither is given."""
    from retriever_server.launcher import LocalDeployment

    target = getattr(args, f"{what}target".replace("-", "_"))
    datastore = getattr(args, f"{what}datastore".replace("-", "_"))
    if target:
        yield target
    elif datastore:
        with LocalDeployment(datastore) as deployment:
            yield deployment.router_address
    else:
        yield None


@contextlib.contextmanager
def _retriever(args, what: str = "", k: int | None = None):
    """A ServiceRetriever for --target or --datastore (see `_target`); None when neither is given."""
    from lm_worker.retrieval import ServiceRetriever, resolve_target

    with _target(args, what) as target:
        if target is None:
            yield None
            return
        with ServiceRetriever(resolve_target(target), _retrieval_config(args, what, k)) as retriever:
            yield retriever


def _need(value, flag: str, why: str):
    if value is None:
        raise ValueError(f"{flag} is required {why}")
    return value


# ---------------------------------------------------------------------------------------------- commands

def _prepare(args) -> None:
    from lm_worker.token_store import PrepareConfig, prepare_corpus

    r = prepare_corpus(PrepareConfig(out=args.out, corpus=args.corpus, vocab_size=args.vocab_size,
                                     heldout_fraction=args.heldout_fraction, max_train_tokens=args.max_train_tokens,
                                     max_heldout_tokens=args.max_heldout_tokens,
                                     max_retro_tokens=args.max_retro_tokens, id_field=args.id_field,
                                     progress=not args.no_progress))
    print(f"tokenizer {r.tokenizer_fingerprint} ({r.vocab_size} tokens) -> {r.out / 'tokenizer.json'}")
    print("| split | documents | tokens |\n|---|---:|---:|")
    for split in r.documents:
        print(f"| {split} | {r.documents[split]} | {r.tokens[split]} |")


def _train(args) -> None:
    from lm_worker.train import TrainConfig, train

    config = TrainConfig(kind=args.kind, preset=args.preset, seq_len=args.seq_len, batch_size=args.batch_size,
                         steps=args.steps, lr=args.lr, min_lr=args.lr / 10, warmup=args.warmup,
                         eval_every=args.eval_every, checkpoint_every=args.checkpoint_every, seed=args.seed,
                         device=args.device, amp=not args.no_amp, chunk_len=args.chunk_len,
                         init_from=str(args.init_from or ""), freeze_base=not args.train_base, split=args.split)
    r = train(config, args.data, args.out, neighbours_dir=args.neighbours, resume=not args.restart,
              progress=not args.no_progress)
    print(f"{r.steps} steps: train loss {r.train_loss:.4f}, held-out loss {r.heldout_loss:.4f}, "
          f"{r.tokens_per_s:.0f} tokens/s\ncheckpoint {r.checkpoint}\nloss curves {r.plot}")


def _encode(args) -> None:
    if args.workers < 0:
        raise ValueError(f"--workers must be >= 0, got {args.workers}")
    if args.kind == "knnlm":
        _need(args.checkpoint, "--checkpoint", "for a kNN-LM source")
    elif args.encoder == "lm":
        _need(args.checkpoint, "--checkpoint", "for --encoder lm")
    if args.workers:
        from lm_worker.encode_job import EncodeJobConfig, run_encode_job

        config = EncodeJobConfig(kind=args.kind, data=args.data, split=args.split, checkpoint=args.checkpoint,
                                 encoder=args.encoder,
                                 chunk_len=args.chunk_len, context_len=args.context_len, stride=args.stride,
                                 rows_per_part=args.rows_per_part, workers=args.workers, device=args.device,
                                 num_cpus=args.worker_cpus, address=args.address, progress=not args.no_progress)
        info = run_encode_job(config, args.out)
    else:
        info = _encode_in_process(args)
    print(f"{info.kind} source {info.directory}: {info.rows} rows of dimension {info.dimension}")


def _encode_in_process(args):
    from lm_worker.token_store import load_prepared

    tokenizer, train, heldout = load_prepared(args.data)
    store = train if args.split == "train" else heldout
    if args.kind == "knnlm":
        from lm_worker.checkpoint import load_checkpoint
        from lm_worker.encode import encode_knnlm

        model = load_checkpoint(args.checkpoint, args.device).model
        return encode_knnlm(model, store, args.out, args.context_len, args.stride, device=args.device,
                            progress=not args.no_progress)
    from lm_worker.encode import encode_retro
    from lm_worker.retro_encoders import make_chunk_encoder

    encoder = make_chunk_encoder(args.encoder, tokenizer, args.checkpoint, device=args.device)
    return encode_retro(store, encoder, args.chunk_len, args.out, progress=not args.no_progress)


def _build(args) -> None:
    from lm_worker.encode import build_source

    out = build_source(args.source, args.out, shards=args.shards, factory=args.factory, num_cpus=args.num_cpus,
                       overwrite=args.overwrite, progress=not args.no_progress)
    print(f"datastore {out}")


def _neighbours(args) -> None:
    import numpy as np

    from lm_worker.encode import chunk_exclusions, embed_chunks, precompute_neighbours, read_source
    from lm_worker.retro_encoders import chunk_encoder_for
    from lm_worker.token_store import RETRO_SPLIT, TokenStore, load_prepared

    tokenizer, train, heldout = load_prepared(args.data)
    source = read_source(args.source)
    L = source.chunk_len
    splits = {"heldout": heldout}
    if (args.data / RETRO_SPLIT).is_dir():  # text the LM never saw: no document of it is in the datastore
        splits[RETRO_SPLIT] = TokenStore.open(args.data / RETRO_SPLIT)
    encoder = None  # loaded once, and only when some split's chunks still need embedding
    with _retriever(args) as retriever:
        _need(retriever, "--target or --datastore", "to fetch neighbours")
        jobs = [("train", source.open_keys(), chunk_exclusions(train, L))]
        for name, store in splits.items():
            keys = args.source / f"{name}-keys.npy"
            if not keys.is_file():
                encoder = encoder or chunk_encoder_for(source.encoder_metadata, tokenizer, args.encoder_lm)
                embed_chunks(store, encoder, L, keys, progress=not args.no_progress)
            jobs.append((name, np.load(keys, mmap_mode="r"), None))
        for name, keys, exclude in jobs:
            out = args.source / f"neighbours-{name}.npy"
            precompute_neighbours(retriever, keys, exclude, out, progress=not args.no_progress)
            print(f"{name}: neighbours -> {out}")


def _eval_in_process(args, store, tokenizer, config):
    from lm_worker.checkpoint import load_checkpoint
    from lm_worker.evaluate import evaluate_knnlm, evaluate_retro

    knn = retro = None
    progress = not args.no_progress
    if args.lm:
        lm = load_checkpoint(args.lm).model
        with _retriever(args, "knnlm-") as retriever:
            knn = evaluate_knnlm(lm, store, _need(retriever, "--knnlm-target or --knnlm-datastore", "with --lm"),
                                 config, progress)
    if args.retro:
        from lm_worker.retro_encoders import chunk_encoder_for

        model = load_checkpoint(args.retro).model
        with _retriever(args, "retro-", k=model.config.n_neighbours) as retriever:
            retriever = _need(retriever, "--retro-target or --retro-datastore", "with --retro")
            encoder = chunk_encoder_for(retriever.metadata, tokenizer, args.encoder_lm)
            retro = evaluate_retro(model, store, retriever, encoder, config, progress)
    return knn, retro


def _eval_distributed(args, store, config):
    from dataclasses import replace

    from lm_worker.distributed_eval import EvalJob, WorkerPoolConfig, evaluate_distributed

    pool = WorkerPoolConfig(workers=args.workers, batches_per_share=args.batches_per_share, num_cpus=args.worker_cpus,
                            num_gpus=args.worker_gpus, device="cuda" if args.worker_gpus else "cpu",
                            address=args.address, progress=not args.no_progress)
    results = {}
    for kind, checkpoint, what in (("knnlm", args.lm, "knnlm-"), ("retro", args.retro, "retro-")):
        if not checkpoint:
            continue
        job_config = config if kind == "knnlm" else replace(config, retrieval=_retrieval_config(args, what))
        with _target(args, what) as target:
            target = _need(target, f"--{what}target or --{what}datastore", f"with --{kind.replace('knnlm', 'lm')}")
            job = EvalJob(kind=kind, checkpoint=checkpoint, store=store.directory, target=target, config=job_config,
                          tokenizer=args.data / "tokenizer.json", encoder_lm=args.encoder_lm)
            results[kind] = evaluate_distributed(job, replace(pool, checkpoint_dir=args.out / "shares" / kind))
    return results.get("knnlm"), results.get("retro")


def _eval(args) -> None:
    from lm_worker.eval_report import write_report
    from lm_worker.evaluate import DEFAULT_LAMBDAS, EvalConfig
    from lm_worker.token_store import TokenStore
    from lm_worker.tokenizer import Tokenizer

    if not args.lm and not args.retro:
        raise ValueError("give --lm (with a kNN-LM datastore) and/or --retro (with a RETRO datastore)")
    if args.workers < 0:
        raise ValueError(f"--workers must be >= 0, got {args.workers}")
    tokenizer = Tokenizer.load(args.data / "tokenizer.json")
    store = TokenStore.open(args.data / args.split)
    if store.tokenizer_fingerprint != tokenizer.fingerprint:
        raise ValueError(f"{store.directory} was tokenized with {store.tokenizer_fingerprint}, "
                         f"not {tokenizer.fingerprint}")
    lambdas = tuple(float(x) for x in args.lambdas.split(",")) if args.lambdas else DEFAULT_LAMBDAS
    config = EvalConfig(context_len=args.context_len, stride=args.stride, max_tokens=args.tokens, lambdas=lambdas,
                        temperature=args.temperature, retrieval=_retrieval_config(args, "knnlm-"),
                        exclude_own_document=args.exclude_own_document)
    if args.workers:
        knn, retro = _eval_distributed(args, store, config)
    else:
        knn, retro = _eval_in_process(args, store, tokenizer, config)
    print(write_report(args.out, knn, retro, {"data": str(args.data), "split": args.split, "lm": str(args.lm),
                                               "retro": str(args.retro), "workers": args.workers}))
    print(f"\nwritten: {args.out / 'eval.json'}, {args.out / 'table.md'}"
          + (f", {args.out / 'ppl_vs_lambda.png'}" if knn else ""))


def _prompts(args, tokenizer):
    import torch

    texts = list(args.prompt)
    if args.prompt_file:
        texts += [line.rstrip("\n") for line in args.prompt_file.read_text().splitlines() if line.strip()]
    if not texts:
        raise ValueError("give --prompt TEXT (repeatable) or --prompt-file")
    ids = [tokenizer.encode(t) for t in texts]
    if len({len(i) for i in ids}) != 1:  # left-trim to a common length: the models have no padding mask
        shortest = min(len(i) for i in ids)
        ids = [i[len(i) - shortest:] for i in ids]
    return texts, torch.tensor(ids, dtype=torch.long)


def _generate(args) -> None:
    from lm_worker.checkpoint import load_checkpoint
    from lm_worker.decode import GenerateConfig, generate
    from lm_worker.steppers import KnnLMStepper, LMStepper, RetroStepper
    from lm_worker.token_store import load_prepared

    tokenizer, _, _ = load_prepared(args.data)
    loaded = load_checkpoint(args.checkpoint)
    texts, prompt = _prompts(args, tokenizer)
    config = GenerateConfig(strategy=args.strategy, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                            top_k=args.top_k, top_p=args.top_p, num_beams=args.beams,
                            length_penalty=args.length_penalty, eos_id=tokenizer.eos_id, seed=args.seed)
    retro = loaded.kind == "retro"
    k = loaded.model.config.n_neighbours if retro else (args.k or 1024)
    with _retriever(args, "", k=k) as retriever:
        if args.no_retrieval or retriever is None:
            stepper = LMStepper(loaded.model)
        elif retro:
            from lm_worker.retro_encoders import chunk_encoder_for

            encoder = chunk_encoder_for(retriever.metadata, tokenizer, args.encoder_lm)
            stepper = RetroStepper(loaded.model, retriever, encoder, prefetch=args.prefetch,
                                   overlap=not args.no_overlap)
        elif args.knn_pipeline or args.no_overlap or config.strategy == "beam":
            stepper = KnnLMStepper(loaded.model, retriever, lam=args.lam, temperature=args.knn_temperature,
                                   overlap=args.knn_pipeline)
        else:
            from lm_worker.speculative import SpeculativeKnnLMStepper

            stepper = SpeculativeKnnLMStepper(loaded.model, retriever, lam=args.lam, temperature=args.knn_temperature,
                                              eos_id=config.eos_id)
        out = generate(stepper, prompt, config)
    for text, row, n in zip(texts, out.tokens, out.lengths):
        print(f"--- {text!r}\n{tokenizer.decode(row[: int(n)].tolist())}")
    s = getattr(stepper, "stats", None)
    if s is not None and s.retrieval_calls:
        guesses = f"; next token guessed right for {s.guessed_right} of {s.guessed} rows" if s.guessed else ""
        print(f"\nretrieval: {s.retrieval_calls} calls, {s.retrieval_s:.2f} s, blocked {s.wait_s:.2f} s; "
              f"model {s.compute_s:.2f} s{guesses}")


def _attention(args) -> None:
    import numpy as np

    from lm_worker.attention_plot import plot_retrieved_attention
    from lm_worker.checkpoint import load_checkpoint
    from lm_worker.retro_encoders import chunk_encoder_for
    from lm_worker.token_store import load_prepared

    tokenizer, _, heldout = load_prepared(args.data)
    model = load_checkpoint(args.retro).model
    L = model.config.chunk_len
    ids = tokenizer.encode(args.text) if args.text else np.asarray(heldout.tokens[: (args.chunk + 2) * L]).tolist()
    with _retriever(args, "", k=model.config.n_neighbours) as retriever:
        retriever = _need(retriever, "--target or --datastore", "to retrieve neighbours")
        encoder = chunk_encoder_for(retriever.metadata, tokenizer, args.encoder_lm)
        plot_retrieved_attention(model, ids, retriever, encoder, tokenizer, args.chunk, args.out)
    print(f"attention of chunk {args.chunk}'s readers -> {args.out}")


def _pipeline(args) -> None:
    from dataclasses import replace

    from lm_worker.pipeline import PipelineConfig, run_pipeline

    base = PipelineConfig()
    config = replace(base, run=args.run, max_train_tokens=args.train_tokens, max_heldout_tokens=args.heldout_tokens,
                     max_retro_tokens=args.retro_tokens,
                     lm=replace(base.lm, steps=args.lm_steps, preset=args.preset),
                     retro=replace(base.retro, steps=args.retro_steps, preset=args.preset),
                     address=args.address, encode_workers=args.workers, eval_workers=args.workers,
                     retro_encoder=args.retro_encoder, retro_init=args.retro_init, progress=not args.no_progress)
    _print_report(run_pipeline(config))


def _print_report(report) -> None:
    print("\n" + report.summary)
    if report.samples is not None:
        print(report.samples.read_text())
    written = [report.report / "summary.md", report.eval_json, *report.plots, report.samples]
    print("\n".join(f"written: {p}" for p in written if p is not None))


def _snippet(text: str, width: int = 96) -> str:
    return textwrap.shorten(" ".join(text.split()), width, placeholder=" ...")


def _demo(args) -> None:
    from lm_worker.pipeline import PipelineConfig, run_pipeline

    config = PipelineConfig.demo(args.run, address=args.address, encode_workers=args.workers,
                                 eval_workers=args.workers, retro_encoder=args.retro_encoder,
                                 retro_init=args.retro_init,
                                 progress=not args.no_progress)
    _print_report(run_pipeline(config))


def _retrieval_demo(args) -> None:
    from lm_worker.retrieval_demo import DemoConfig, run_demo

    report = run_demo(DemoConfig(out=args.out, n_keys=args.keys, n_queries=args.queries))
    info = report.info
    print(f"\ndatastore {report.datastore}: {info.ntotal} chunks, {info.factory}, {info.metric}, "
          f"{len(info.shards)} shards, version {info.datastore_version}")
    print(f"router {report.router}\n")
    print("| nprobe | recall@10 | recall@10, exact re-rank of 100 |")
    print("|---:|---:|---:|")
    for nprobe, (plain, reranked) in report.recall.items():
        print(f"| {nprobe} | {plain:.3f} | {reranked:.3f} |")
    for query, neighbours in report.examples:
        print(f"\nheld-out chunk: {_snippet(query)}")
        for n in neighbours:
            print(f"  {n.distance:7.4f}  {n.document:<40} {_snippet(n.text, 70)}")


COMMANDS = {"prepare": _prepare, "train": _train, "encode": _encode, "build": _build, "neighbours": _neighbours,
            "eval": _eval, "generate": _generate, "attention": _attention, "pipeline": _pipeline, "demo": _demo,
            "retrieval-demo": _retrieval_demo}


def _servers_on_this_machine(args) -> bool:
    """Whether the command retrieves from servers on this machine: a datastore it serves itself
    (--datastore) or a loopback --target."""
    from retriever_server.fanout import parse_shards

    for what in ("", "knnlm_", "retro_"):
        if getattr(args, f"{what}datastore", None) is not None:
            return True
        target = getattr(args, f"{what}target", None)
        if target and all(a.startswith(_LOOPBACK) for shard in parse_shards(target) for a in shard):
            return True
    return False


def _share_cores_with_servers(args) -> None:
    """While eval or generate compute, the servers they query on this machine search on the same
    cores: the model's OpenMP threads then sleep between operations instead of spinning for the
    cores the servers need (OMP_WAIT_POLICY=PASSIVE, set before torch loads; a user's own setting
    wins). With remote servers the default spin-then-sleep is faster and stays."""
    if args.command in ("eval", "generate") and "OMP_WAIT_POLICY" not in os.environ and _servers_on_this_machine(args):
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
        log.info("servers share this machine's cores: OMP_WAIT_POLICY=PASSIVE for the model's threads")


def main(argv: list[str] | None = None) -> int:
    """Entry point of `lm-worker`."""
    args = _parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)
    _share_cores_with_servers(args)
    from lm_worker.retrieval import RetrieverError

    try:
        COMMANDS[args.command](args)
    except (OSError, ValueError, RuntimeError, RetrieverError, json.JSONDecodeError) as err:
        print(f"{PROG} {args.command}: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{PROG} {args.command}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
