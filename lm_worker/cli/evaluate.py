"""`lm-worker eval`: perplexity of the base LM, kNN-LM over a sweep of λ, RETRO with and without neighbours."""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path

from lm_worker.cli.common import (
    KNNLM_KINDS,
    LM_KINDS,
    RETRO_KINDS,
    add_encoder_lm_arg,
    add_retrieval_args,
    add_security_args,
    check_checkpoints,
    check_datastore_kind,
    check_datastore_tokenizer,
    check_flags,
    check_folder,
    check_out_kind,
    check_tokenizers,
    fields_as_flags,
    need,
    need_retriever,
    open_retriever,
    open_target,
    positive_finite,
    ray_address_arg,
    refuse_given,
    retrieval_config,
    retrieval_flags,
    safe_text,
    search_checks,
    security_of,
)

DEFAULT_CONTEXT = 256  # tokens per evaluation window unless the LM takes fewer
KNNLM_K = 1024  # --knnlm-k's default
# kNN-LM's own options: (flag, dest, default); given without --lm they would do nothing
KNNLM_OPTIONS = (("--lambdas", "lambdas", None), ("--temperature", "temperature", 1.0),
                 ("--pointer-steps", "pointer_steps", 0), ("--min-pointers", "min_pointers", 1),
                 ("--pointer-temperature-scale", "pointer_temperature_scale", 2.0),
                 ("--pointer-agreement", "pointer_agreement", 0.0), ("--pointer-crowd", "pointer_crowd", 0))
# the worker actors' options: (flag, dest, default); given without --workers they would do nothing (but --address
# with a ray:NAME target)
WORKER_OPTIONS = (("--worker-cpus", "worker_cpus", 1.0), ("--worker-gpus", "worker_gpus", 0.0),
                  ("--batches-per-share", "batches_per_share", 4), ("--address", "address", None))
# EvalConfig's fields as eval's flags, for the config's own errors
EVAL_FIELDS = {"context_len": "--context-len", "batch_size": "--batch-size", "max_tokens": "--tokens",
               **{dest: flag for flag, dest, _ in KNNLM_OPTIONS}, "exclude_own_document": "--exclude-own-document"}


def add_parser(sub) -> None:
    """Adds `eval`."""
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
                        "process); finished shares are checkpointed in OUT/shares and reused by a rerun with "
                        "the same model, datastore version and token store")
    v.add_argument("--worker-cpus", type=float, default=WORKER_OPTIONS[0][2],
                   help="CPUs per worker actor; its PyTorch threads are the whole CPUs of it, at least 1")
    v.add_argument("--worker-gpus", type=float, default=WORKER_OPTIONS[1][2],
                   help="GPUs per worker actor (1 on a GPU cluster)")
    v.add_argument("--batches-per-share", type=int, default=WORKER_OPTIONS[2][2])
    v.add_argument("--address", type=ray_address_arg,
                   help="the Ray cluster of the --workers and of a ray:NAME --*-target's deployment: this address "
                        "(auto: the one `ray start` made on this machine), else RAY_ADDRESS (as under `ray job "
                        "submit`), else a new local cluster for the workers that ends with the command, or the "
                        "`ray start` cluster of this machine for a ray:NAME target; a cluster that does not answer "
                        "fails within RETRIEVER_RAY_CONNECT_TIMEOUT seconds (30)")
    v.add_argument("--context-len", type=int, help=f"tokens per window (default: {DEFAULT_CONTEXT}, or the LM's "
                                                    "max_len where that is shorter)")
    v.add_argument("--stride", type=int, help="positions each window scores after the first window (default: half "
                                              "the context)")
    v.add_argument("--batch-size", type=int, default=8, metavar="B",
                   help="windows per model batch, kNN-LM and RETRO (one kNN-LM request per batch; with "
                        "--pointer-steps one per round of searches, each window a run of chains of its own, so "
                        "a larger B packs more windows into each round without changing which positions are "
                        "searched)")
    v.add_argument("--lambdas", help="comma-separated λ values (default: a sweep from 0 to 0.9)")
    v.add_argument("--temperature", type=float, default=1.0)
    v.add_argument("--exclude-own-document", action="store_true")
    v.add_argument("--pointer-steps", type=int, default=0, metavar="N",
                   help="approximate kNN-LM retrieval (RetoMaton): after a search, the next positions take the "
                        "successors of the neighbours whose value came true, for up to N positions, instead of a "
                        "search (0: search every position; at most 16)")
    v.add_argument("--min-pointers", type=int, default=1, metavar="M",
                   help="with --pointer-steps: search again once fewer than M neighbours still point at the text")
    v.add_argument("--pointer-temperature-scale", type=float, default=2.0, metavar="F",
                   help="with --pointer-steps: followed positions take F x --temperature, and λs of their own "
                        "(swept apart from the searched positions')")
    v.add_argument("--pointer-agreement", type=float, default=0.0, metavar="θ",
                   help="with --pointer-steps: follow only where the surviving chains give at least θ of their "
                        "weight (softmax of -distance / --temperature) to one next token, else search "
                        "(0: off; see --pointer-crowd)")
    v.add_argument("--pointer-crowd", type=int, default=0, metavar="M",
                   help="with --pointer-agreement: positions with at least M chains are followed whatever they "
                        "agree on; only fewer must agree (0: all must; N=4, θ=0.9, M=3 searched 48%% as often as full "
                        "retrieval, at a 2.2%% lower perplexity on the demo, docs/results.md)")
    add_retrieval_args(v, KNNLM_K, "knnlm-")
    add_retrieval_args(v, 0, "retro-", k_help="neighbours per chunk: the RETRO model's (0, the default; it takes no "
                                              "other)")
    add_encoder_lm_arg(v)
    add_security_args(v)
    v.set_defaults(handler=run_eval)


def _check_datastores(args: argparse.Namespace, tokenizer) -> dict | None:
    """Each evaluated family's datastore is of its kind, before any evaluation runs: a --*-datastore's
    manifest, and a --*-target asked (with its tokenizer). A RETRO datastore given a kNN-LM one must not
    be found after the whole kNN-LM evaluation. Returns the RETRO datastore's metadata (its service's, or
    its manifest's; None: without --retro, or a manifest that cannot be read)."""
    metadata = None
    for family, kind, model in (("knnlm-", "knnlm", args.lm), ("retro-", "retro", args.retro)):
        flags = retrieval_flags(args, family)
        if model:
            check_datastore_kind(flags, kind)
        if model and flags.target:
            with open_retriever(flags, k=1, security=security_of(args)) as retriever:
                check_datastore_kind(flags, kind, retriever)
                check_datastore_tokenizer(retriever, tokenizer, flags)
                metadata = dict(retriever.metadata) if kind == "retro" else metadata
        elif model and kind == "retro" and flags.datastore:
            metadata = _manifest_metadata(flags.datastore)
    return metadata


def _manifest_metadata(datastore: Path) -> dict | None:
    """A datastore's manifest metadata before it is served; None where it cannot be read (the server says why)."""
    try:
        metadata = json.loads((datastore / "manifest.json").read_text()).get("metadata")
    except (OSError, ValueError, AttributeError):
        return None
    return metadata if isinstance(metadata, dict) else None


def _join_ray(args: argparse.Namespace) -> None:
    """Joins the Ray cluster of an evaluated model's ray:NAME target (--address, else RAY_ADDRESS, else the
    cluster `ray start` made on this machine) before the deployment is looked up."""
    from lm_worker.retrieval.service import join_cluster_of

    for target, model in ((args.knnlm_target, args.lm), (args.retro_target, args.retro)):
        if model:
            join_cluster_of(target, args.address)


def _check_retro(args: argparse.Namespace, store, config, tokenizer, metadata: dict | None):
    """With --lm and --retro, what would fail RETRO's evaluation only after the whole kNN-LM one, found
    first: with --workers, OUT/shares/retro holding another evaluation's shares; then RETRO's chunk
    encoder (an LM-encoded datastore whose LM is not where it recorded and no --encoder-lm, or an encoder
    here that did not make its keys). Returns the encoder for the evaluation in this process; None with
    --workers (each makes its own), without --lm, or where the datastore's metadata is not known yet."""
    from lm_worker.encoders.registry import chunk_encoder_for
    from lm_worker.evaluation.shares import refuse_another_job

    if not (args.lm and args.retro):
        return None
    if args.workers:  # the job's target does not describe it: the one served later is not needed here
        refuse_another_job(_job(args, "retro", store, config, "").describe(), args.out / "shares" / "retro")
    encoder = chunk_encoder_for(metadata, tokenizer, args.encoder_lm) if metadata is not None else None
    return None if args.workers else encoder


def _in_process(args: argparse.Namespace, store, tokenizer, config, encoder=None):
    """The evaluations in this process; `encoder`: RETRO's chunk encoder when made already."""
    from lm_worker.encoders.registry import chunk_encoder_for
    from lm_worker.evaluation.knnlm_eval import evaluate_knnlm
    from lm_worker.evaluation.retro_eval import evaluate_retro
    from lm_worker.models.checkpoint import load_checkpoint

    knn = retro = None
    progress = not args.no_progress
    if args.lm:
        lm = load_checkpoint(args.lm, kinds=KNNLM_KINDS, flag="--lm").model
        flags = retrieval_flags(args, "knnlm-")
        with open_retriever(flags, security=security_of(args)) as retriever:
            check_datastore_tokenizer(need_retriever(retriever, flags, "with --lm"), tokenizer, flags)
            knn = evaluate_knnlm(lm, store, retriever, config, progress)
    if args.retro:
        model = load_checkpoint(args.retro, kinds=RETRO_KINDS, flag="--retro").model
        flags = retrieval_flags(args, "retro-")
        with open_retriever(flags, k=model.config.n_neighbours, security=security_of(args)) as retriever:
            retriever = need_retriever(retriever, flags, "with --retro")
            check_datastore_tokenizer(retriever, tokenizer, flags)
            if encoder is None:
                encoder = chunk_encoder_for(retriever.metadata, tokenizer, args.encoder_lm)
            retro = evaluate_retro(model, store, retriever, encoder, config, progress)
    return knn, retro


def worker_pool(args: argparse.Namespace):
    """The WorkerPoolConfig of eval's flags: each worker computes with the whole CPUs it reserves."""
    from lm_worker.evaluation.distributed import WorkerPoolConfig

    return WorkerPoolConfig(workers=args.workers, batches_per_share=args.batches_per_share, num_cpus=args.worker_cpus,
                            num_gpus=args.worker_gpus, device="cuda" if args.worker_gpus else "cpu",
                            torch_threads=max(1, int(args.worker_cpus)), address=args.address,
                            progress=not args.no_progress)


def _job(args: argparse.Namespace, kind: str, store, config, target: str):
    """The `EvalJob` of the model of `kind` ("knnlm": --lm, "retro": --retro, which asks for its model's K)."""
    from lm_worker.evaluation.distributed import EvalJob
    from lm_worker.models.checkpoint import checkpoint_config

    flags = retrieval_flags(args, f"{kind}-")
    checkpoint = args.lm if kind == "knnlm" else args.retro
    if kind == "retro":
        config = replace(config, retrieval=retrieval_config(flags, k=checkpoint_config(checkpoint).n_neighbours))
    security = security_of(args) if flags.target else None  # a --datastore is served on loopback
    return EvalJob(kind=kind, checkpoint=checkpoint, store=store.directory, target=target, config=config,
                   tokenizer=args.data / "tokenizer.json", encoder_lm=args.encoder_lm, security=security)


def _distributed(args: argparse.Namespace, store, config):
    from lm_worker.evaluation.distributed import evaluate_distributed

    pool = worker_pool(args)
    results = {}
    for kind, model_flag, checkpoint in (("knnlm", "lm", args.lm), ("retro", "retro", args.retro)):
        if not checkpoint:
            continue
        flags = retrieval_flags(args, f"{kind}-")
        with open_target(flags) as target:
            target = need(target, f"{flags.flag('target')} or {flags.flag('datastore')}", f"with --{model_flag}")
            job = _job(args, kind, store, config, target)
            results[kind] = evaluate_distributed(job, replace(pool, checkpoint_dir=args.out / "shares" / kind))
    return results.get("knnlm"), results.get("retro")


def eval_window(args: argparse.Namespace) -> tuple[int, int]:
    """--context-len and --stride, or their defaults: DEFAULT_CONTEXT cut to the LM's max_len, and half of it.
    An explicit --context-len past the LM's max_len is refused, naming the flag."""
    from lm_worker.models.checkpoint import checkpoint_max_len

    context = args.context_len
    max_len = checkpoint_max_len(args.lm) if args.lm else None  # from its config: the model is not built
    if context is None:
        context = DEFAULT_CONTEXT if max_len is None else min(DEFAULT_CONTEXT, max_len)  # no longer than it takes
    elif max_len is not None and context > max_len:
        raise ValueError(f"--context-len {context} exceeds the max_len {max_len} of the LM at {args.lm}")
    return context, args.stride if args.stride is not None else max(1, context // 2)


def _check_chunks(args: argparse.Namespace, context_len: int, stride: int) -> None:
    """With --retro, before any evaluation: RETRO's windows start at chunk boundaries, so the context and
    the stride must be multiples of its chunk length."""
    from lm_worker.models.checkpoint import checkpoint_config

    L = getattr(checkpoint_config(args.retro), "chunk_len", None) if args.retro else None
    if L and (context_len % L or stride % L):
        raise ValueError(f"--context-len {context_len} and --stride {stride} must be multiples of --retro's chunk "
                         f"length {L} (RETRO reads its neighbours chunk by chunk)")


def _check_numbers(args: argparse.Namespace) -> None:
    """Refuses numbers no evaluation takes, naming the flag, before any work."""
    check_flags(("--workers", args.workers, args.workers >= 0, ">= 0"),
                ("--tokens", args.tokens, args.tokens >= 0, ">= 0 (0: the whole split)"),
                ("--batch-size", args.batch_size, args.batch_size >= 1, ">= 1"),
                ("--context-len", args.context_len, args.context_len is None or args.context_len >= 1, ">= 1"),
                ("--temperature", args.temperature, positive_finite(args.temperature), "> 0 and finite"),
                ("--pointer-steps", args.pointer_steps, 0 <= args.pointer_steps <= 16, "in [0, 16]"),
                ("--min-pointers", args.min_pointers, args.min_pointers >= 1, ">= 1"),
                ("--pointer-temperature-scale", args.pointer_temperature_scale,
                 positive_finite(args.pointer_temperature_scale), "> 0 and finite"),
                ("--pointer-agreement", args.pointer_agreement, 0 <= args.pointer_agreement <= 1, "in [0, 1]"),
                ("--pointer-crowd", args.pointer_crowd, args.pointer_crowd >= 0, ">= 0"),
                ("--batches-per-share", args.batches_per_share, args.batches_per_share >= 1, ">= 1"),
                ("--worker-cpus", args.worker_cpus, positive_finite(args.worker_cpus), "> 0 and finite"),
                ("--worker-gpus", args.worker_gpus, args.worker_gpus == 0 or positive_finite(args.worker_gpus),
                 ">= 0 and finite"),
                ("--knnlm-k", args.knnlm_k, args.knnlm_k >= 1, ">= 1"),
                ("--retro-k", args.retro_k, args.retro_k >= 0, ">= 0"),
                *((f"--{family}{name}", value, value >= 0, ">= 0") for family in ("knnlm-", "retro-")
                  for name, value in (("nprobe", vars(args)[f"{family[:-1]}_nprobe"]),
                                      ("rerank", vars(args)[f"{family[:-1]}_rerank"]))),
                *(search_checks(retrieval_flags(args, "knnlm-"), args.knnlm_k) if args.lm else ()))


def _check_applies(args: argparse.Namespace) -> None:
    """Refuses options for a model that is not evaluated: a family of retrieval options without its model,
    kNN-LM's λs, temperature and pointers without --lm, --encoder-lm without --retro; and the worker actors'
    options without --workers (but --address with a ray:NAME target, whose deployment it finds)."""
    if not args.workers:
        ray_target = any(str(target).startswith("ray:") for target in (args.knnlm_target, args.retro_target))
        given = [flag for flag, dest, default in WORKER_OPTIONS
                 if getattr(args, dest) != default and not (flag == "--address" and ray_target)]
        also = "; --address also finds a ray:NAME target's deployment" if "--address" in given else ""
        refuse_given(given, f"with --workers N > 0 only (without, the evaluation runs in this process{also}): give "
                            "--workers, or leave {them} out")
    for model_flag, checkpoint, family, k in (("--lm", args.lm, "knnlm-", KNNLM_K),
                                              ("--retro", args.retro, "retro-", 0)):
        if checkpoint:
            continue
        flags = retrieval_flags(args, family)
        given = [flags.flag(name) for name, value, default in (
            ("target", flags.target, None), ("datastore", flags.datastore, None), ("k", flags.k, k),
            ("nprobe", flags.nprobe, 0), ("rerank", flags.rerank, 0)) if value != default]
        if model_flag == "--lm":
            given += [flag for flag, dest, default in KNNLM_OPTIONS if getattr(args, dest) != default]
        elif args.encoder_lm is not None:  # the LM that encoded a RETRO datastore
            given.append("--encoder-lm")
        if given:
            what = "kNN-LM" if model_flag == "--lm" else "RETRO"
            one = len(given) == 1
            names = given[0] if one else f"{', '.join(given[:-1])} and {given[-1]}"
            raise ValueError(f"{names} {'applies' if one else 'apply'} to the {what} evaluation only: "
                             f"give {model_flag}, or leave {'it' if one else 'them'} out")


def _lambdas(text: str | None) -> tuple[float, ...] | None:
    """--lambdas as numbers (None: not given); a ValueError naming the flag and the bad entry."""
    if text is None:
        return None
    if not text.strip():
        raise ValueError("--lambdas is empty: give comma-separated numbers in [0, 1], or leave it out for the "
                         "default sweep")
    values = []
    for entry in text.split(","):
        try:
            values.append(float(entry))
        except ValueError:
            raise ValueError(f"--lambdas takes comma-separated numbers in [0, 1], got {entry.strip()!r}") from None
    return tuple(values)


def run_eval(args: argparse.Namespace) -> None:
    from lm_worker.data.token_store import TokenStore
    from lm_worker.data.tokenizer import Tokenizer
    from lm_worker.evaluation.config import DEFAULT_LAMBDAS, EvalConfig
    from lm_worker.evaluation.report import write_report

    if not args.lm and not args.retro:
        raise ValueError("give --lm (with a kNN-LM datastore) and/or --retro (with a RETRO datastore)")
    _check_numbers(args)
    _check_applies(args)
    check_folder(args.out, "--out")
    check_out_kind(args.out, "--out", ("other files",), "an evaluation folder")  # a datastore, a checkpoint...
    check_checkpoints(("--lm", args.lm, KNNLM_KINDS), ("--retro", args.retro, RETRO_KINDS),
                      ("--encoder-lm", args.encoder_lm, LM_KINDS))
    if args.retro:
        from lm_worker.models.checkpoint import checkpoint_config

        K = checkpoint_config(args.retro).n_neighbours
        if args.retro_k and args.retro_k != K:
            raise ValueError(f"--retro-k {args.retro_k}: RETRO retrieves its model's {K} neighbours per chunk "
                             f"({args.retro} takes no other number; leave --retro-k out)")
        check_flags(*search_checks(retrieval_flags(args, "retro-"), K))  # --retro-rerank: at least K
    tokenizer = Tokenizer.load(args.data / "tokenizer.json")
    store = TokenStore.open(args.data / args.split)
    if store.tokenizer_fingerprint != tokenizer.fingerprint:
        raise ValueError(f"{store.directory} was tokenized with {safe_text(store.tokenizer_fingerprint)}, "
                         f"not {tokenizer.fingerprint}")
    check_tokenizers(tokenizer, ("--lm", args.lm), ("--retro", args.retro))
    lambdas = _lambdas(args.lambdas) or DEFAULT_LAMBDAS
    context_len, stride = eval_window(args)
    check_flags(("--stride", stride, 1 <= stride <= context_len, f"in [1, the context {context_len}]"))
    _check_chunks(args, context_len, stride)
    with fields_as_flags(EVAL_FIELDS):
        config = EvalConfig(context_len=context_len, stride=stride, batch_size=args.batch_size,
                            max_tokens=args.tokens, lambdas=lambdas, temperature=args.temperature,
                            retrieval=retrieval_config(retrieval_flags(args, "knnlm-")),
                            exclude_own_document=args.exclude_own_document, pointer_steps=args.pointer_steps,
                            min_pointers=args.min_pointers, pointer_temperature_scale=args.pointer_temperature_scale,
                            pointer_agreement=args.pointer_agreement, pointer_crowd=args.pointer_crowd)
    _join_ray(args)  # before a ray:NAME target is looked up: on the cluster --address names
    encoder = _check_retro(args, store, config, tokenizer, _check_datastores(args, tokenizer))
    with fields_as_flags({"context_len": "--context-len"}):  # a window the model cannot take, found as it loads
        knn, retro = _distributed(args, store, config) if args.workers else _in_process(args, store, tokenizer,
                                                                                        config, encoder)
    meta = {"data": str(args.data), "split": args.split, "lm": str(args.lm), "retro": str(args.retro),
            "workers": args.workers}
    if config.pointer_steps:
        meta.update(pointer_steps=config.pointer_steps, pointer_agreement=config.pointer_agreement,
                    pointer_crowd=config.pointer_crowd)
    print(write_report(args.out, knn, retro, meta))
    print(f"\nwritten: {args.out / 'eval.json'}, {args.out / 'table.md'}"
          + (f", {args.out / 'ppl_vs_lambda.png'}" if knn else ""))
