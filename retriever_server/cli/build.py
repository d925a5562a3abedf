"""`retriever-server build`: a sharded datastore from an (N, d) matrix, as a Ray job."""

from __future__ import annotations

import argparse
import signal
from pathlib import Path

from retriever_server.cli.common import (
    RAY_ADDRESS_HELP,
    CliError,
    int_in,
    interrupt,
    key_value,
    non_negative_int,
    positive_int,
)
from retriever_server.datastore.index import canonical_metric


def metric_arg(text: str) -> str:
    """argparse type for a datastore's metric: l2, ip or inner_product (any case)."""
    try:
        canonical_metric(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"a metric must be l2, ip or inner_product, got {text!r}") from None
    return text


def add_parser(command) -> None:
    """Adds `build` to the command parsers."""
    b = command("build", "build a sharded datastore from an (N, d) .npy matrix",
                "Runs as a Ray job: on --address, or on a local cluster started for it.")
    b.add_argument("keys", type=Path, help="(N, d) float .npy matrix (or a .parts.json index); memory-mapped")
    b.add_argument("--out", type=Path, required=True, help="datastore directory to create")
    b.add_argument("--payload", type=key_value, action="append", default=[], metavar="NAME=FILE.npy",
                   help="per-row payload array (first dimension N; .npy or .parts.json); repeatable")
    b.add_argument("--factory", default="auto",
                   help='FAISS factory string (default "auto": IVF lists sized for N with 8-bit scalar codes, '
                        'SQ8; a graph over the lists from 8,192 lists; IVF-Flat below ~10k rows). An IVF index, or '
                        '"IDMap,Flat" for exact search')
    b.add_argument("--metric", type=metric_arg, default="l2", help="l2 or ip (inner product)")
    b.add_argument("--shards", type=positive_int, default=2)
    b.add_argument("--seed", type=int_in(0, 2**31 - 2, "a seed"), default=0,
                   help="seed of the training sample and k-means, in [0, 2147483646]")
    b.add_argument("--train-size", type=non_negative_int, default=0,
                   help="codec training sample; 0 sizes it for the index")
    b.add_argument("--keep-keys", action="store_true", help="store float16 keys for exact re-ranking")
    b.add_argument("--meta", type=key_value, action="append", default=[], metavar="KEY=VALUE",
                   help="metadata recorded in the manifest (tokenizer, encoder, chunk length)")
    b.add_argument("--address", help=RAY_ADDRESS_HELP)
    b.add_argument("--num-cpus", type=positive_int, help="CPUs of the local Ray cluster")
    b.add_argument("--cpus-per-shard", type=positive_int, default=1, help="CPUs each shard task takes")
    b.add_argument("--gpu", action="store_true",
                   help="k-means and each row's list on the GPU (faiss GPU build); codes are still made on CPU")
    b.add_argument("--overwrite", action="store_true",
                   help="replace an existing datastore at --out (one whose folder holds nothing else)")
    b.add_argument("--no-progress", action="store_true")


def run(args: argparse.Namespace) -> int:
    """Builds the datastore and prints what was built."""
    from retriever_server.datastore.build import BuildConfig, BuildError, build_datastore  # imports Ray: only here

    for flag, pairs in (("--payload", args.payload), ("--meta", args.meta)):
        names = [name for name, _ in pairs]
        for name in sorted({n for n in names if names.count(n) > 1}):
            raise CliError(f"{flag} {name} given twice: give each name once")
    config = BuildConfig(keys=args.keys, out=args.out, payloads={k: Path(v) for k, v in args.payload},
                         factory=args.factory, metric=args.metric, shards=args.shards, seed=args.seed,
                         train_size=args.train_size, keep_keys=args.keep_keys, overwrite=args.overwrite,
                         cpus_per_shard=args.cpus_per_shard, gpu=args.gpu, metadata=dict(args.meta))
    previous = signal.signal(signal.SIGTERM, interrupt)  # as Ctrl-C, from the start: while Ray starts too
    try:
        manifest = build_datastore(config, address=args.address, num_cpus=args.num_cpus,
                                   progress=not args.no_progress,
                                   on_ray=lambda: signal.signal(signal.SIGTERM, interrupt))  # over Ray's, if any
    except BuildError as err:
        raise CliError(str(err)) from None
    finally:
        signal.signal(signal.SIGTERM, previous)
    print(f"built {args.out}: {manifest.ntotal} rows, {len(manifest.shards)} shards, {manifest.factory}, "
          f"{manifest.metric}, version {manifest.version}")
    return 0
