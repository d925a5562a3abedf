"""Malformed Search requests, for the fuzz test (tests/test_bounds.py) and the chaos benchmark.

`fuzzed(rng, base)` turns a valid serialized SearchRequest into one of five kinds of broken ones;
`call(channel, body)` sends raw bytes as a Search and returns the status. A server must answer every
one with a status in `ANSWERED` (never UNKNOWN or INTERNAL) and keep serving.
"""

from __future__ import annotations

import grpc
import numpy as np

from retrieval.v1 import retriever_pb2 as pb

SEARCH = "/retrieval.v1.Retriever/Search"
ANSWERED = frozenset({grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED,
                      grpc.StatusCode.FAILED_PRECONDITION})


def call(channel: grpc.Channel, body: bytes, timeout: float = 10) -> tuple[grpc.StatusCode, str]:
    """Sends raw bytes as a Search; the status and its message."""
    try:
        channel.unary_unary(SEARCH)(body, timeout=timeout)
        return grpc.StatusCode.OK, ""
    except grpc.RpcError as err:
        return err.code(), err.details() or ""


def fuzzed(rng: np.random.Generator, base: bytes) -> bytes:
    """A malformed request: random bytes, a truncated or bit-flipped valid one, or a valid one with
    wild field values and unknown fields."""
    kind = rng.integers(5)
    if kind == 0:
        return rng.bytes(int(rng.integers(1, 300)))
    if kind == 1:
        return base[:int(rng.integers(0, len(base)))]
    if kind == 2:
        body = bytearray(base)
        for i in rng.integers(0, len(body), int(rng.integers(1, 8))):
            body[i] ^= 1 << int(rng.integers(8))
        return bytes(body)
    request = pb.SearchRequest.FromString(base)
    choice = rng.integers(6)
    if choice == 0:
        request.k = int(rng.integers(-5, 1 << 30))
    elif choice == 1:
        del request.queries.shape[:]
        request.queries.shape.extend(int(s) for s in rng.integers(-3, 1 << 20, int(rng.integers(0, 4))))
    elif choice == 2:
        request.queries.dtype = int(rng.integers(0, 40))
    elif choice == 3:
        request.payloads.append(rng.bytes(40).hex() + "\n" + "x" * int(rng.integers(0, 5000)))
    elif choice == 4:
        request.exclude.ranges.add(start=int(rng.integers(-10, 10)), end=int(rng.integers(-10, 10)))
    else:
        request.expected_datastore_version = "v" * int(rng.integers(0, 2000))
    body = request.SerializeToString()
    return body + (bytes([0xFA, 0x07]) + bytes([3]) + b"abc" if kind == 4 else b"")  # unknown field 127
