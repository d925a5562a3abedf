"""`lm-worker encode`, `build` and `neighbours`: datastore sources, their datastores, RETRO's neighbours."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from lm_worker.cli.common import (
    KNNLM_KINDS,
    LM_KINDS,
    add_encoder_lm_arg,
    add_ray_address,
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
    int_in,
    need,
    need_retriever,
    open_retriever,
    positive_finite,
    refuse_given,
    retrieval_flags,
    safe_text,
    search_checks,
    security_of,
)
from lm_worker.encoders.registry import ENCODERS

DEFAULT_CONTEXT = 256  # kNN-LM: tokens per window unless the LM takes fewer


def add_parsers(sub) -> None:
    """Adds `encode`, `build` and `neighbours`."""
    e = sub.add_parser("encode", help="write a kNN-LM or RETRO datastore source")
    e.add_argument("kind", choices=("knnlm", "retro"))
    e.add_argument("--data", type=Path, required=True)
    e.add_argument("--out", type=Path, required=True,
                   help="the source folder: new, empty, or a source of this kind to replace (it stays whole until "
                        "the new one is; the folder's other files are kept)")
    e.add_argument("--checkpoint", type=Path,
                   help="the base LM: kNN-LM, whose keys are stored; RETRO with --encoder lm, whose keys embed chunks")
    e.add_argument("--encoder", choices=ENCODERS, default="minilm",
                   help="RETRO: the frozen chunk encoder (MiniLM, or the base LM's key at the chunk's last token)")
    e.add_argument("--split", choices=("train", "heldout"), default="train")
    e.add_argument("--context-len", type=int,
                   help=f"kNN-LM: tokens per window (default: {DEFAULT_CONTEXT}, or the LM's max_len where that is "
                        "shorter)")
    e.add_argument("--stride", type=int, help="kNN-LM: positions each window keys after the first window "
                                              "(default: half the context)")
    e.add_argument("--chunk-len", type=int, default=16, help="RETRO: tokens per chunk")
    e.add_argument("--device", default="cpu", help="cpu or cuda (each worker actor then takes a GPU), or "
                                                   "auto (cuda where this machine has it)")
    e.add_argument("--workers", type=int, default=2,
                   help="Ray Data actors holding the model, writing the source in parts (resumed part by part); "
                        "0: a plain loop in this process, one .npy per array")
    e.add_argument("--rows-per-part", type=int, default=0,
                   help="rows per part (0: 65536 kNN-LM, 4096 RETRO); kNN-LM parts hold whole batches of 16 "
                        "windows: at least 16 x --stride rows, rounded up to a multiple of that")
    e.add_argument("--worker-cpus", type=float, default=1.0, help="CPUs per worker actor")
    add_ray_address(e)
    e.set_defaults(handler=run_encode)

    b = sub.add_parser("build", help="build the datastore of a source (a Ray job)")
    b.add_argument("source", type=Path)
    b.add_argument("--out", type=Path, required=True)
    b.add_argument("--shards", type=int, default=2)
    b.add_argument("--factory", default="auto")
    b.add_argument("--num-cpus", type=int_in(1), help="CPUs of the local Ray cluster, when one is started")
    b.add_argument("--cpus-per-shard", type=int_in(1), default=1,
                   help="CPUs each shard's build task takes, and FAISS's threads in it (default: 1)")
    b.add_argument("--overwrite", action="store_true")
    add_ray_address(b)
    b.set_defaults(handler=run_build)

    n = sub.add_parser("neighbours", help="fetch RETRO neighbours of every train (own document excluded), "
                                          "held-out and retro-split chunk")
    n.add_argument("--source", type=Path, required=True, help="the RETRO source folder; results go there")
    n.add_argument("--data", type=Path, required=True)
    n.add_argument("--seq-len", type=int_in(1), default=256,
                   help="the training window these neighbours serve (train --seq-len; default: 256): a train "
                        "chunk leaves out every document that a window holding it predicts")
    add_retrieval_args(n, 2)
    add_encoder_lm_arg(n)
    add_security_args(n)
    n.set_defaults(handler=run_neighbours)


def encode_window(args: argparse.Namespace) -> tuple[int, int]:
    """kNN-LM's --context-len and --stride, or their defaults: DEFAULT_CONTEXT cut to the LM's max_len, and
    half of it. An explicit --context-len past the LM's max_len is refused, naming the flag."""
    from lm_worker.models.checkpoint import checkpoint_max_len

    max_len = checkpoint_max_len(args.checkpoint) if args.kind == "knnlm" and args.checkpoint else None
    context = args.context_len
    if context is None:
        context = min(DEFAULT_CONTEXT, max_len) if max_len is not None else DEFAULT_CONTEXT
    elif max_len is not None and context > max_len:
        raise ValueError(f"--context-len {context} exceeds the max_len {max_len} of the LM at {args.checkpoint}")
    return context, args.stride if args.stride is not None else max(1, context // 2)


def check_device(args: argparse.Namespace) -> None:
    """Refuses a --device this machine lacks before any Ray work, unless the workers run on a cluster that
    --address or RAY_ADDRESS names (its GPUs are not this machine's); "auto" becomes cuda or cpu here. A device
    index (cuda:N) is refused with --workers > 0: each worker actor sees only the GPU it was given, as cuda."""
    import os

    from lm_worker.training.config import pick_device

    if args.workers > 0 and args.device.startswith("cuda:"):
        raise ValueError(f"--device {args.device} names one GPU, but each of the --workers {args.workers} actors "
                         "takes a GPU of its own (seen as cuda): give --device cuda, or --workers 0")
    if args.device == "auto" or args.workers == 0 or not (args.address or os.environ.get("RAY_ADDRESS")):
        with fields_as_flags({"device": "--device"}):
            args.device = str(pick_device(args.device))


def check_encode_applies(args: argparse.Namespace) -> None:
    """Refuses encode's flags given where they do nothing: kNN-LM's window for RETRO, RETRO's chunks and
    encoder for kNN-LM, --checkpoint for MiniLM chunks, the job's options without --workers."""
    if args.kind == "retro":
        refuse_given([flag for flag, value in (("--context-len", args.context_len), ("--stride", args.stride))
                      if value is not None], "to `encode knnlm` only: RETRO keys chunks of --chunk-len; leave {them} "
                                             "out")
        if args.encoder != "lm":
            refuse_given(["--checkpoint"] if args.checkpoint else [],
                         f"to `encode knnlm` and --encoder lm only: --encoder {args.encoder} embeds the chunks "
                         "without it; leave {them} out, or give --encoder lm")
    else:
        refuse_given([flag for flag, value, default in (("--chunk-len", args.chunk_len, 16),
                                                        ("--encoder", args.encoder, "minilm")) if value != default],
                     "to `encode retro` only: kNN-LM keys each position with the LM; leave {them} out")
    if not args.workers:
        refuse_given([flag for flag, value, default in (("--worker-cpus", args.worker_cpus, 1.0),
                                                        ("--rows-per-part", args.rows_per_part, 0),
                                                        ("--address", args.address, None)) if value != default],
                     "with --workers N > 0 only (--workers 0 encodes in this process): give --workers, or leave "
                     "{them} out")


def run_encode(args: argparse.Namespace) -> None:
    from lm_worker.sources.output import refuse_foreign

    check_flags(("--workers", args.workers, args.workers >= 0, ">= 0"),
                ("--chunk-len", args.chunk_len, args.chunk_len >= 1, ">= 1"),
                ("--context-len", args.context_len, args.context_len is None or args.context_len >= 1, ">= 1"),
                ("--rows-per-part", args.rows_per_part, args.rows_per_part >= 0, ">= 0"),
                ("--worker-cpus", args.worker_cpus, positive_finite(args.worker_cpus), "> 0 and finite"))
    check_encode_applies(args)
    check_folder(args.out, "--out")
    own = {"knnlm": "a kNN-LM source", "retro": "a RETRO source"}[args.kind]
    check_out_kind(args.out, "--out", (own, "other files"), own)  # other files: parts of an encode to resume,
    refuse_foreign(args.out, "--out")  # and nothing else, reading only: an interrupted swap is finished under
    # the encode's lock (`check_out`); an encode never replaces files it did not write
    check_device(args)
    if args.kind == "knnlm":
        check_checkpoints(("--checkpoint", need(args.checkpoint, "--checkpoint", "for a kNN-LM source"), KNNLM_KINDS))
    elif args.encoder == "lm":
        from lm_worker.jobs.encode_plan import check_lm_chunk_len

        check_checkpoints(("--checkpoint", need(args.checkpoint, "--checkpoint", "for --encoder lm"), LM_KINDS))
        with fields_as_flags({"chunk_len": "--chunk-len"}):
            check_lm_chunk_len(args.chunk_len, args.checkpoint)
    if args.kind == "knnlm" or args.encoder == "lm":  # the LM reads the split's token ids
        from lm_worker.data.tokenizer import Tokenizer

        check_tokenizers(Tokenizer.load(args.data / "tokenizer.json"), ("--checkpoint", args.checkpoint))
    args.context_len, args.stride = encode_window(args)
    check_flags(("--stride", args.stride, 1 <= args.stride <= args.context_len,
                 f"in [1, --context-len {args.context_len}]"))
    if args.workers:
        from lm_worker.jobs.encode_job import run_encode_job
        from lm_worker.jobs.encode_plan import EncodeJobConfig

        config = EncodeJobConfig(kind=args.kind, data=args.data, split=args.split, checkpoint=args.checkpoint,
                                 encoder=args.encoder, chunk_len=args.chunk_len, context_len=args.context_len,
                                 stride=args.stride, rows_per_part=args.rows_per_part, workers=args.workers,
                                 device=args.device, num_cpus=args.worker_cpus, address=args.address,
                                 progress=not args.no_progress)
        info = run_encode_job(config, args.out)
    else:
        info = _encode_in_process(args)
    print(f"{info.kind} source {info.directory}: {info.rows} rows of dimension {info.dimension}")


def _encode_in_process(args: argparse.Namespace):
    from lm_worker.data.prepare import load_prepared

    tokenizer, train, heldout = load_prepared(args.data)
    store = train if args.split == "train" else heldout
    if args.kind == "knnlm":
        from lm_worker.models.checkpoint import load_checkpoint
        from lm_worker.sources.knnlm import encode_knnlm

        model = load_checkpoint(args.checkpoint, args.device).model
        return encode_knnlm(model, store, args.out, args.context_len, args.stride, device=args.device,
                            progress=not args.no_progress)
    from lm_worker.encoders.registry import make_chunk_encoder
    from lm_worker.sources.retro import encode_retro

    encoder = make_chunk_encoder(args.encoder, tokenizer, args.checkpoint, device=args.device)
    return encode_retro(store, encoder, args.chunk_len, args.out, progress=not args.no_progress)


def run_build(args: argparse.Namespace) -> None:
    from lm_worker.sources.build import build_source

    out = build_source(args.source, args.out, shards=args.shards, factory=args.factory, num_cpus=args.num_cpus,
                       overwrite=args.overwrite, progress=not args.no_progress, address=args.address,
                       cpus_per_shard=args.cpus_per_shard)
    print(f"datastore {out}")


def run_neighbours(args: argparse.Namespace) -> None:
    import numpy as np

    from lm_worker.data.prepare import load_prepared
    from lm_worker.data.token_store import RETRO_SPLIT, TokenStore, write_text_atomically
    from lm_worker.encoders.registry import chunk_encoder_for
    from lm_worker.sources.exclusions import chunk_exclusions
    from lm_worker.sources.neighbours import WINDOW_RECORD, precompute_neighbours, record_search
    from lm_worker.sources.retro import embed_chunks, keys_made_from, keys_record
    from lm_worker.sources.source import read_source

    flags = retrieval_flags(args)
    check_flags(("--k", args.k, args.k >= 1, ">= 1"), *search_checks(flags, args.k))
    check_checkpoints(("--encoder-lm", args.encoder_lm, LM_KINDS))
    source = read_source(args.source, kinds=("retro",), flag="--source")  # neighbours are RETRO's
    tokenizer, train, heldout = load_prepared(args.data)
    if source.tokenizer_fingerprint != tokenizer.fingerprint:  # its chunks are other text: nothing is written
        raise ValueError(f"--source {args.source} holds tokens of tokenizer "
                         f"{safe_text(source.tokenizer_fingerprint)}, but --data's is {tokenizer.fingerprint}: "
                         "give the --data it was encoded from")
    L = source.chunk_len
    splits = {"heldout": heldout}
    if (args.data / RETRO_SPLIT).is_dir():  # text the LM never saw: no document of it is in the datastore
        splits[RETRO_SPLIT] = TokenStore.open(args.data / RETRO_SPLIT)
    encoder = None  # loaded once, and only when some split's chunks still need embedding
    check_datastore_kind(flags, "retro")
    with open_retriever(flags, security=security_of(args)) as retriever:
        need_retriever(retriever, flags, "to fetch neighbours")
        check_datastore_kind(flags, "retro", retriever)
        check_datastore_tokenizer(retriever, tokenizer, flags)
        check_built_from(retriever, source, args.source, flags)  # the train rows it excludes are --source's
        jobs = [("train", source.open_keys(), chunk_exclusions(train, L, args.seq_len))]
        for name, store in splits.items():
            keys, record = args.source / f"{name}-keys.npy", keys_record(store, L, source.encoder_fingerprint)
            if not keys_made_from(keys, record):  # not there, or made from other chunks or by another encoder
                encoder = encoder or chunk_encoder_for(source.encoder_metadata, tokenizer, args.encoder_lm)
                record = {**record, "encoder": encoder.fingerprint}  # the encoder that runs, as the record says
                if not keys_made_from(keys, record):
                    if keys.is_file():
                        print(f"{name}: {keys} was made from other data, or by another encoder: embedding again")
                    embed_chunks(store, encoder, L, keys, progress=not args.no_progress, record=record)
            jobs.append((name, np.load(keys, mmap_mode="r"), None))
        for name, keys, exclude in jobs:
            out = args.source / f"neighbours-{name}.npy"
            precompute_neighbours(retriever, keys, exclude, out, progress=not args.no_progress)  # whole or none: a
            if name == "train":  # failed fetch keeps the old file and its record; the window it was fetched for
                write_text_atomically(args.source / WINDOW_RECORD, json.dumps({"window": int(args.seq_len)}))
            record_search(args.source, name, retriever.config)  # once the file is whole, as the pipeline does
            print(f"{name}: neighbours -> {out}")


def check_built_from(retriever, source, path: Path, flags) -> None:
    """A ValueError naming the flags when the datastore was not built from the RETRO source at `path`: other
    rows, another chunk length or another encoder (the train split's exclusions are the source's rows, and
    its queries that encoder's)."""
    metadata = getattr(retriever, "metadata", None) or {}
    differ = []
    if retriever.ntotal != source.rows:
        differ.append(f"{retriever.ntotal} rows, --source {source.rows}")
    if str(metadata.get("chunk_len", source.chunk_len)) != str(source.chunk_len):
        differ.append(f"chunk_len {str(metadata['chunk_len'])[:20]!r}, --source {source.chunk_len}")
    if str(metadata.get("encoder", source.encoder_fingerprint)) != source.encoder_fingerprint:
        differ.append(f"encoder {str(metadata['encoder'])[:80]!r}, --source {source.encoder_fingerprint!r}")
    if differ:
        raise ValueError(f"the datastore of {flags.flag('target')} / {flags.flag('datastore')} was not built from "
                         f"--source {path}: it has {'; '.join(differ)}")
