"""The Retriever stub that the router and the client call through.

Its Search takes a SearchRequest or its wire bytes (a router forwards the bytes it received) and
answers with a `SearchResult` read by `decode_search_response`, large answers in place; its GetInfo
answers with an InfoResponse. An answer that does not read fails the call with INTERNAL, as a failed
call fails: a `grpc.aio.AioRpcError` (a `grpc.RpcError`), which the failover policy takes like any
other, moving on to the next replica. gRPC's own response deserializer cannot do that on an asyncio
channel, where an exception in it is logged and the call answers None with status OK; so these
stubs take the answer's bytes and read them once the call is done.

Example:
    >>> stub = retriever_stub(channel)                   # a blocking or an asyncio channel
    >>> result = stub.Search(request, timeout=5.0)       # await it on an asyncio channel
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import grpc

from retrieval.v1 import retriever_pb2 as pb
from retriever_server.wire.response_reader import decode_search_response
from retriever_server.wire.result import AnswerShape
from retriever_server.wire.untrusted import one_line

SERVICE = "/retrieval.v1.Retriever"


def _serialize(message) -> bytes:
    return message if isinstance(message, bytes) else message.SerializeToString()


def _unreadable(method: str, err: Exception) -> grpc.aio.AioRpcError:
    """The error of a call whose answer does not read: INTERNAL, saying why."""
    return grpc.aio.AioRpcError(grpc.StatusCode.INTERNAL, grpc.aio.Metadata(), grpc.aio.Metadata(),
                                details=f"the {method} answer does not read: {type(err).__name__}: "
                                        f"{one_line(str(err), 200)}")


class _ReadingCall:
    """A unary method whose answer's bytes are read by `read` once the call is done (blocking, or
    awaited on an asyncio channel)."""

    def __init__(self, channel, method: str, read: Callable[[bytes], object]):
        self._call = channel.unary_unary(f"{SERVICE}/{method}", request_serializer=_serialize,
                                         response_deserializer=None, _registered_method=True)
        self._method, self._read = method, read
        self._asyncio = isinstance(channel, grpc.aio.Channel)

    def __call__(self, request, **kwargs):
        return self._issue(request, self._read, kwargs)

    def _issue(self, request, read: Callable[[bytes], object], kwargs: dict):
        if self._asyncio:
            return self._read_when_done(self._call(request, **kwargs), read)
        return self._answer(self._call(request, **kwargs), read)

    async def _read_when_done(self, call, read: Callable[[bytes], object]) -> object:
        return self._answer(await call, read)

    def _answer(self, raw: bytes, read: Callable[[bytes], object]) -> object:
        try:
            return read(raw)
        except Exception as err:  # noqa: BLE001 - any answer that does not read fails the call alike
            raise _unreadable(self._method, err) from None


class _SearchCall(_ReadingCall):
    """Search, whose answer must also have the shape its request asks for: `expect`, else the request's
    own where it is a message (bytes forwarded as they came are checked with `expect` alone)."""

    def __call__(self, request, expect: AnswerShape | None = None, **kwargs):
        if expect is None and isinstance(request, pb.SearchRequest):
            expect = AnswerShape.of(request)
        if expect is None:
            return self._issue(request, self._read, kwargs)
        return self._issue(request, lambda raw: expect.check(self._read(raw)), kwargs)


class _Stub:
    def __init__(self, channel, aligned: bool):
        self.Search = _SearchCall(channel, "Search", functools.partial(decode_search_response, aligned=aligned))
        self.GetInfo = _ReadingCall(channel, "GetInfo", pb.InfoResponse.FromString)


def retriever_stub(channel, aligned: bool = True):
    """The stub of the Retriever service on `channel` (blocking or asyncio): `.Search(request, expect=None,
    ...)`, whose answer not of the shape `expect` (else the request's) fails the call with INTERNAL, and
    `.GetInfo(request, ...)`, with the keyword arguments of any gRPC call. `aligned=False` leaves
    misaligned arrays as views (a router, whose merge copies them anyway)."""
    return _Stub(channel, aligned)
