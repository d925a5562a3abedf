"""The transport floor: the service's topology with no work in it.

A client sends a request, through a relay, to two shard processes, as `RetrieverClient` does
through a router: a blocking Python channel into a `grpc.aio` relay process, which calls two
`grpc.aio` shard processes in parallel and answers once both have. Nothing is parsed, searched,
merged or copied: each shard answers with a ready-made block of zero bytes, the relay with
another. The request names the sizes (two little-endian uint64s at its start) and is padded to
the size of the real request, so the bytes on the wire are the service's.

Its latency is what Python gRPC alone costs this machine for one Search through the router; any
implementation of the service pays at least this, on top of its search. The floor's servers set the
heap thresholds the service's servers set (`grpc_setup.keep_freed_memory`): without them a relay
of large answers spends much of its CPU faulting in fresh pages for every call, a cost of the heap,
not of gRPC.

    python benchmarks/grpc_floor.py    # a quick look: p50 of the floor for a 1.5 KB request
"""

from __future__ import annotations

import argparse
import asyncio
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from retriever_server.cli.common import stop_when_orphaned  # noqa: E402
from retriever_server.cluster.supervisor import child_environment  # noqa: E402
from retriever_server.serving.grpc_setup import keep_freed_memory  # noqa: E402

METHOD = "/floor.v1.Floor/Call"
HEADER = struct.Struct("<QQ")  # bytes each shard answers with, bytes the relay answers with
START_TIMEOUT_S = 60.0


def request_bytes(request_size: int, shard_answer: int, relay_answer: int) -> bytes:
    """A request of `request_size` bytes (at least the header) asking for answers of these sizes."""
    header = HEADER.pack(shard_answer, relay_answer)
    return header + bytes(max(0, request_size - len(header)))


class _Blocks:
    """Zero-byte answers, one per size, made once (the floor copies nothing per call)."""

    def __init__(self):
        self._blocks: dict[int, bytes] = {}

    def get(self, size: int) -> bytes:
        block = self._blocks.get(size)
        if block is None:
            block = self._blocks[size] = bytes(size)
        return block


async def _serve(handler, port_file: Path) -> None:
    keep_freed_memory()
    server = grpc.aio.server(options=[("grpc.max_receive_message_length", -1),
                                      ("grpc.max_send_message_length", -1)])
    method = grpc.unary_unary_rpc_method_handler(handler)
    service, name = METHOD.rsplit("/", 1)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service.strip("/"), {name: method}),))
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    written = port_file.with_suffix(".tmp")
    written.write_text(str(port))
    written.replace(port_file)  # whole, never half-written, when the parent reads it
    await stop_when_orphaned(asyncio.Event())  # returns once the parent is gone (a SIGTERM ends it sooner)
    await server.stop(0)
    port_file.unlink(missing_ok=True)  # the parent never cleans up now: the last process out removes the folder
    try:
        port_file.parent.rmdir()
    except OSError:
        pass


async def _shard(port_file: Path) -> None:
    blocks = _Blocks()

    async def answer(request: bytes, context) -> bytes:
        return blocks.get(HEADER.unpack_from(request)[0])

    await _serve(answer, port_file)


async def _relay(port_file: Path, shards: list[str]) -> None:
    blocks = _Blocks()
    options = [("grpc.max_receive_message_length", -1), ("grpc.max_send_message_length", -1)]
    calls = [grpc.aio.insecure_channel(a, options=options).unary_unary(METHOD) for a in shards]

    async def answer(request: bytes, context) -> bytes:
        await asyncio.gather(*(call(request) for call in calls))
        return blocks.get(HEADER.unpack_from(request)[1])

    await _serve(answer, port_file)


class FloorDeployment:
    """Two shard processes and a relay on 127.0.0.1; `call(request)` goes through the relay,
    `fan_out(request)` calls both shards at once from this process (the client's direct fan-out).
    They stop with this process however it ends, as the service's servers do (`child_environment`).

    Example:
        >>> with FloorDeployment() as floor:
        ...     floor.call(request_bytes(1600, 200, 200))
        ...     floor.fan_out(request_bytes(1600, 200, 0))
    """

    def __init__(self):
        self._dir = Path(tempfile.mkdtemp(prefix="grpc-floor-"))
        self._processes: list[subprocess.Popen] = []
        self._channels: list[grpc.Channel] = []
        self._shard_calls: list = []
        self.call = None

    @property
    def pids(self) -> dict[str, int]:
        """The floor's processes by role: "shard 0", "shard 1" and "relay"."""
        names = ["shard 0", "shard 1", "relay"]
        return {name: process.pid for name, process in zip(names, self._processes)}

    def fan_out(self, request: bytes) -> list[bytes]:
        """Calls every shard at once (futures, as the client's fan-out does) and waits for all."""
        futures = [call.future(request) for call in self._shard_calls]
        return [future.result() for future in futures]

    def _spawn(self, role: str, *args: str) -> str:
        port_file = self._dir / f"{role}-{len(self._processes)}.port"
        self._processes.append(subprocess.Popen([sys.executable, __file__, role, str(port_file), *args],
                                                env=child_environment()))  # stops when this process dies
        deadline = time.monotonic() + START_TIMEOUT_S
        while not port_file.is_file():
            if self._processes[-1].poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the floor's {role} process did not start")
            time.sleep(0.05)
        return f"127.0.0.1:{port_file.read_text()}"

    def __enter__(self) -> FloorDeployment:
        try:
            shards = [self._spawn("shard") for _ in range(2)]
            relay = self._spawn("relay", *shards)
        except BaseException:
            self.__exit__()
            raise
        options = [("grpc.max_receive_message_length", -1), ("grpc.max_send_message_length", -1)]
        self._channels = [grpc.insecure_channel(a, options=options) for a in [relay, *shards]]
        self.call = self._channels[0].unary_unary(METHOD)
        self._shard_calls = [channel.unary_unary(METHOD) for channel in self._channels[1:]]
        return self

    def __exit__(self, *exc) -> None:
        for channel in self._channels:
            channel.close()
        for process in self._processes:
            process.terminate()
        for process in self._processes:
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
        for path in self._dir.iterdir():
            path.unlink()
        self._dir.rmdir()


def _quick_look() -> None:
    with FloorDeployment() as floor:
        request = request_bytes(1600, 200, 200)
        for _ in range(200):
            floor.call(request)
        latencies = []
        for _ in range(2000):
            started = time.perf_counter()
            floor.call(request)
            latencies.append(time.perf_counter() - started)
    latencies.sort()
    print(f"floor p50 {latencies[len(latencies) // 2] * 1e3:.3f} ms over {len(latencies)} calls")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("role", nargs="?", choices=("shard", "relay"), help="(internal) run one process")
    parser.add_argument("port_file", nargs="?", type=Path)
    parser.add_argument("shards", nargs="*")
    args = parser.parse_args(argv)
    if args.role == "shard":
        asyncio.run(_shard(args.port_file))
    elif args.role == "relay":
        asyncio.run(_relay(args.port_file, args.shards))
    else:
        _quick_look()


if __name__ == "__main__":
    main()
