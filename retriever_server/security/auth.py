"""Bearer tokens: the `authorization: Bearer <token>` metadata every call but health carries when a
server has a token file, checked in constant time against each accepted token. The file is read
again when it changes (checked at most once a second) or on `reload()` (SIGHUP), so tokens rotate
without a restart: add the new token as a line, move the clients over, remove the old one. Each
read of a token file, the server's or a client's (`read_token_file`), warns where the file read can
be read by other users, so a rotation that puts such a file in place is named too.

A refused call gets UNAUTHENTICATED, whose message never repeats what the caller sent.
"""

from __future__ import annotations

import hmac
import logging
import os
import threading
import time
from pathlib import Path

import grpc

from retriever_server.logs import EventCounter
from retriever_server.security.config import SecurityError, parse_tokens
from retriever_server.security.tls import file_stamps, warn_if_shared

log = logging.getLogger(__name__)

HEADER = "authorization"
SCHEME = "bearer "
OPEN_METHODS = ("/grpc.health.v1.Health/",)  # health stays open: probes and load balancers have no token
CHECK_EVERY_S = 1.0
REFUSED = ("this server needs `authorization: Bearer <token>` metadata with an accepted token "
           "(clients: --auth-token-file or RETRIEVER_AUTH_TOKEN)")


def bearer_metadata(token: str | None) -> tuple[tuple[str, str], ...]:
    """The call metadata that carries `token` (none without one)."""
    return ((HEADER, f"Bearer {token}"),) if token else ()


def read_token_file(path: Path, first_only: bool = False) -> list[str]:
    """The tokens of a token file, as `config.read_tokens` reads them, with a warning where the file read
    is this user's and other users can read it too. The mode checked is the opened file's (fstat), so it is
    the file whose tokens are returned, whatever a rotation puts at `path` before or after.

    Args:
        path: the token file: one token per line, whitespace around them ignored, blank lines skipped.
        first_only: the first token alone (what a client sends), the lines after it not checked.

    Returns:
        The tokens, in the file's order.

    Raises:
        SecurityError: the file cannot be read, holds no token, or a token that no HTTP header can carry
            (not printable ASCII); the message names the file and the line, never the token.
    """
    try:
        with open(path, "rb") as file:
            found = os.fstat(file.fileno())
            data = file.read()
    except OSError as err:
        raise SecurityError(f"cannot read the token file {path}: {err.strerror or err}") from None
    warn_if_shared(path, "the token file", found)
    return parse_tokens(data, path, first_only)


class TokenSet:
    """The accepted tokens of a token file, read again when the file changes."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.lock = threading.Lock()
        self.seen = file_stamps([self.path])  # before the read: a file replaced after it is read again
        self.tokens = [t.encode() for t in read_token_file(self.path)]  # warns where others can read it
        self.checked = time.monotonic()

    def reload(self) -> None:
        """Reads the file now (SIGHUP), with a warning where others can read it; a file that cannot be read
        or is empty keeps the current tokens."""
        try:
            tokens = [t.encode() for t in read_token_file(self.path)]
        except SecurityError as err:
            log.warning("%s; keeping the %d tokens read before", err, len(self.tokens))
            return
        with self.lock:
            self.tokens = tokens
        log.info("read %d accepted tokens from %s", len(tokens), self.path)

    def _refresh(self) -> None:
        now = time.monotonic()
        if now - self.checked < CHECK_EVERY_S:
            return
        self.checked = now
        stamp = file_stamps([self.path])
        if stamp != self.seen:
            self.seen = stamp
            self.reload()

    def accepts(self, header: str) -> bool:
        """Whether an `authorization` value carries an accepted token (every token compared, in constant time)."""
        self._refresh()
        if not header[:len(SCHEME)].lower() == SCHEME:
            return False
        given = header[len(SCHEME):].strip().encode()
        with self.lock:
            tokens = list(self.tokens)
        matched = False
        for token in tokens:
            matched |= hmac.compare_digest(given, token)
        return matched


async def _refuse(requests, context) -> None:
    await context.abort(grpc.StatusCode.UNAUTHENTICATED, REFUSED)


# Whatever the method's kind, the refusal takes its request as a stream and reads none of it: a unary handler
# would first wait for the whole request (up to --max-request-mb) and hold a call slot until it came.
REFUSAL = grpc.stream_stream_rpc_method_handler(_refuse)


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Lets a call through when its metadata carries an accepted token (health always); refusals are
    counted and logged as a count per interval."""

    def __init__(self, tokens: TokenSet, refusals: EventCounter):
        self.tokens = tokens
        self.refusals = refusals

    async def intercept_service(self, continuation, details: grpc.HandlerCallDetails):
        if details.method.startswith(OPEN_METHODS):
            return await continuation(details)
        header = next((v for k, v in details.invocation_metadata or () if k == HEADER), "")
        if isinstance(header, bytes):
            header = header.decode("latin-1")
        if self.tokens.accepts(header):
            return await continuation(details)
        self.refusals.record("unauthenticated call", "no token" if not header else "a token not accepted")
        return REFUSAL
