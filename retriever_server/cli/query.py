"""`retriever-server info` and `search`: describe a datastore or a server, search a server."""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import sys
import zipfile
from pathlib import Path

import numpy as np

from retrieval.v1 import retriever_pb2 as pb
from retriever_server.cli.common import (
    CliError,
    add_client_security,
    client_security_of,
    non_negative_int,
    positive_int,
)
from retriever_server.datastore.manifest import Manifest, read_manifest
from retriever_server.datastore.row_parts import NPY_ERRORS, check_npy_start
from retriever_server.serving.client import RetrieverClient
from retriever_server.serving.fanout import parse_target
from retriever_server.wire.search_args import MAX_TIMEOUT_S
from retriever_server.wire.tensors import numpy_dtype
from retriever_server.wire.untrusted import one_line

MAX_SHOWN_CHARS = 4096  # of one value `info` prints
# HOST:PORT, [IPv6]:PORT or unix:PATH: what `info` and `search` take as a server's address.
ADDRESS = re.compile(r"unix:.+|\[[0-9A-Fa-f:.]+\]:\d+|[\w.-]+:\d+")
SHOWN_ROWS = 5  # `search` prints the neighbours of this many queries


def add_parsers(command) -> None:
    """Adds `info` and `search` to the command parsers."""
    i = command("info", "describe a datastore directory or a running server",
                "Shows the same fields for both: role, dimension, metric, factory, rows, lists, default "
                "nprobe, stored keys, version, checksum, shards, payloads and metadata.")
    i.add_argument("target", help="datastore directory or HOST:PORT")
    i.add_argument("--json", action="store_true", help="the same fields as one JSON object")
    i.add_argument("--timeout", type=seconds_arg, default=10.0, help="seconds to wait for a server (default 10)")
    add_client_security(i)

    q = command("search", "search a running server with queries from a .npy file")
    q.add_argument("target", help="HOST:PORT of a router or shard, or a shard list to fan out to itself "
                                  "(HOST:PORT,HOST:PORT; a shard's replicas joined by |)")
    q.add_argument("--queries", type=Path, required=True,
                   help="(nq, d) float32 or float16 .npy (float64 is converted to float32, with a note)")
    q.add_argument("-k", type=positive_int, default=10)
    q.add_argument("--nprobe", type=non_negative_int, default=0,
                   help="inverted lists probed (0: the datastore's default)")
    q.add_argument("--rerank", type=non_negative_int, nargs="?", const=0, metavar="N",
                   help="re-rank N candidates (alone: k) by exact distance to the stored keys (a datastore built "
                        "with --keep-keys)")
    q.add_argument("--payload", action="append", default=[], help="payload to return and print; repeatable")
    q.add_argument("--out", type=Path,
                   help="write ids, distances and payloads to this .npz file (.npz added if missing)")
    q.add_argument("--timeout", type=seconds_arg, default=30.0, help="seconds the search may take (default 30)")
    q.add_argument("--allow-partial", action="store_true",
                   help="when shards do not answer (down, or not within the timeout), print the others' neighbours "
                        "and name the missing shards, instead of failing")
    add_client_security(q)


def seconds_arg(text: str) -> float:
    """argparse type for a timeout: a finite number of seconds above 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if not math.isfinite(value) or not 0 < value <= MAX_TIMEOUT_S:
        raise argparse.ArgumentTypeError(f"must be a finite number of seconds in (0, {MAX_TIMEOUT_S:g}], got {text}")
    return value


def describe_manifest(directory: Path, manifest: Manifest) -> dict:
    """`info`'s fields for a datastore directory."""
    return {
        "role": "datastore", "target": str(directory), "dimension": manifest.dimension, "metric": manifest.metric,
        "factory": manifest.factory, "ntotal": manifest.ntotal, "datastore_ntotal": manifest.ntotal,
        "nlist": manifest.nlist, "default_nprobe": manifest.default_nprobe, "has_keys": manifest.has_keys,
        "datastore_version": manifest.version, "datastore_checksum": manifest.checksum,
        "shards": [{"name": s.name, "id_start": s.id_start, "id_end": s.id_end} for s in manifest.shards],
        "payloads": [{"name": p.name, "dtype": np.dtype(p.dtype).name, "row_shape": list(p.row_shape)}
                     for p in manifest.payloads],
        "metadata": dict(manifest.metadata),
    }


def describe_server(address: str, info: pb.InfoResponse) -> dict:
    """`info`'s fields for a running server (`ntotal` is the rows this server answers for)."""
    return {
        "role": info.role, "target": address, "dimension": info.dimension, "metric": info.metric,
        "factory": info.factory, "ntotal": info.ntotal, "datastore_ntotal": info.datastore_ntotal or info.ntotal,
        "nlist": info.nlist, "default_nprobe": info.default_nprobe, "has_keys": info.has_keys,
        "datastore_version": info.datastore_version, "datastore_checksum": info.datastore_checksum,
        "shards": [{"name": s.name, "id_start": s.id_start, "id_end": s.id_end} for s in info.shards],
        "payloads": [{"name": p.name, "dtype": numpy_dtype(p.dtype).name, "row_shape": list(p.row_shape)}
                     for p in info.payloads],
        "metadata": dict(info.metadata),
    }


def run_info(args: argparse.Namespace) -> int:
    """Prints the description of a datastore directory or a server."""
    if Path(args.target).is_dir():
        body = describe_manifest(Path(args.target), read_manifest(Path(args.target)))
    elif ADDRESS.fullmatch(args.target):
        with RetrieverClient(args.target, timeout=args.timeout, security=client_security_of(args)) as client:
            body = describe_server(args.target, client.info())
    else:
        raise CliError(f"{args.target!r} is neither a datastore directory nor a server's HOST:PORT")
    if args.json:
        print(json.dumps(body, indent=2))
        return 0
    for key, value in body.items():
        if key not in ("shards", "payloads", "metadata"):
            print(f"{key:>18}: {_shown(value)}")
    for shard in body["shards"]:
        print(f"{'shard':>18}: {_shown(shard['name'])} ids [{shard['id_start']}, {shard['id_end']})")
    for payload in body["payloads"]:
        print(f"{'payload':>18}: {_shown(payload['name'])} {payload['dtype']} {tuple(payload['row_shape'])}")
    for key, value in sorted(body["metadata"].items()):
        print(f"{'metadata':>18}: {_shown(key)}={_shown(value)}")
    return 0


def _shown(value: object) -> str:
    """A server's (or a datastore's) text as one line of the terminal: newlines and control characters
    (terminal escapes) escaped, so that it cannot forge other lines or restyle the screen."""
    return one_line(str(value), MAX_SHOWN_CHARS)


def _load_queries(path: Path) -> np.ndarray:
    if not path.is_file():
        raise CliError(f"queries file {path} is a directory, not a .npy array" if path.is_dir()
                       else f"queries file {path} not found")
    try:
        check_npy_start(path)
        # mapped first: a header that claims more than the file holds is refused before anything is allocated
        mapped = np.load(path, mmap_mode="r", allow_pickle=False)
        if not isinstance(mapped, np.ndarray):  # a .npz archive, such as `search --out` writes
            mapped.close()
            raise CliError(f"queries file {path} is a .npz archive of arrays, not one .npy array: save the "
                           "queries with np.save")
        queries = np.array(mapped)
    except (*NPY_ERRORS, zipfile.BadZipFile) as err:
        raise CliError(f"queries file {path} is not a loadable .npy array: {one_line(str(err), 300)}") from None
    except MemoryError:
        raise CliError(f"queries file {path} is larger than this machine's free memory") from None
    if queries.dtype.kind != "f":
        raise CliError(f"queries file {path} holds {queries.dtype} values: give float32 rows (float16 and float64 "
                       "are taken too)")
    if queries.dtype == np.float64:
        print(f"note: {path} holds float64 queries; they are sent as float32", file=sys.stderr)
        queries = queries.astype(np.float32)
    return queries


def _payload_lines(name: str, rows: np.ndarray) -> list[str]:
    """One line of a scalar payload's values per query, or one line per neighbour of a row payload."""
    if rows.ndim == 1:
        return [f"{name} {' '.join(str(v) for v in rows.tolist())}"]
    return [f"{name}[{n}] {' '.join(str(v) for v in row.reshape(-1).tolist())}" for n, row in enumerate(rows)]


def _out_path(out: Path | None) -> Path | None:
    """Where `--out` writes (with `.npz` added, as NumPy does), checked before any search is made."""
    if out is None:
        return None
    if out.is_dir() or out.name in ("", ".", ".."):
        raise CliError(f"--out {out} is a directory: give the name of a .npz file")
    path = out if out.suffix == ".npz" else out.with_name(out.name + ".npz")
    if not path.parent.is_dir():
        raise CliError(f"--out {out}: folder {path.parent} does not exist")
    if not os.access(path.parent, os.W_OK | os.X_OK):
        raise CliError(f"--out {out}: folder {path.parent} is not writable by this user")
    return path


def _saved_arrays(result) -> dict[str, np.ndarray]:
    """What `--out` holds: ids, distances and each payload by its name (one named ids or distances as
    payload.NAME)."""
    arrays = {"ids": result.ids, "distances": result.distances}
    for name, values in result.payloads.items():
        arrays[f"payload.{name}" if name in arrays else name] = values
    return arrays


def _write_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """`np.savez` of `arrays`, whatever their names (savez takes some as its own arguments: file,
    allow_pickle), written whole to a temporary file first."""
    import zipfile

    tmp = path.with_name(path.name + ".tmp")
    try:
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as archive:
            for name, array in arrays.items():
                with archive.open(f"{name}.npy", "w", force_zip64=True) as member:
                    np.lib.format.write_array(member, np.asanyarray(array), allow_pickle=False)
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)


def _search_target(target: str) -> str | list[list[str]]:
    """One address, or a shard list (commas between shards, | between a shard's replicas)."""
    try:
        return parse_target(target)
    except ValueError as err:
        raise CliError(str(err)) from None


def run_search(args: argparse.Namespace) -> int:
    """Searches a server and prints the first queries' neighbours (and payloads)."""
    queries = _load_queries(args.queries)
    out = _out_path(args.out)
    with RetrieverClient(_search_target(args.target), timeout=args.timeout, security=client_security_of(args)) \
            as client:
        result = client.search(queries, k=args.k, nprobe=args.nprobe, exact_rerank=args.rerank is not None,
                               rerank_candidates=args.rerank or 0, payloads=args.payload,
                               allow_partial=args.allow_partial)
    if result.partial:
        missing = "; ".join(f"{one_line(name, 200)} ({one_line(why, 200)})"  # the server's words: escaped
                            for name, why in sorted(result.failed_shards.items()))
        print(f"partial answer: no neighbours from {missing}", file=sys.stderr)
    if out is not None:
        try:
            _write_npz(out, _saved_arrays(result))
        except OSError as err:
            raise CliError(f"--out {out}: cannot write there ({err.strerror})") from None
    for row in range(min(len(queries), SHOWN_ROWS)):
        print(f"query {row}: ids {' '.join(str(i) for i in result.ids[row, :10])}")
        print(f"{'':>9}distances {' '.join(f'{d:.4f}' for d in result.distances[row, :10])}")
        for name, values in result.payloads.items():
            for line in _payload_lines(name, values[row, :10]):
                print(f"{'':>9}{line}")
    if len(queries) > SHOWN_ROWS:
        print(f"({len(queries) - SHOWN_ROWS} more queries{'; all in ' + str(out) if out else ''})")
    return 0
