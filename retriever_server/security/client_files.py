"""A long-lived client's credentials, read again when their files change: the token and certificate a
router presents to its shards, and the token a `RetrieverClient` sends. Servers re-read their token
file and certificates without a restart (`auth`, `tls`); their clients do too, so that a rotation the
servers took up does not cut them off.

The files are checked at most once a second, when a call is about to go out. A token file that
changed is read again (its first token is sent from then on); one that other users can read is named
in a warning each time it is read, as a server's is (`auth.read_token_file`). TLS files that changed
are reported, for the caller to open new channels (the router and `RetrieverClient` do, and keep the
channels they replace open RETIRED_CLOSE_S for the calls on them; connections already open keep their
TLS session). Files that cannot be read, or do not hold a certificate and its key, keep the current
credentials, as the servers do.

Example:
    >>> watched = WatchedClientSecurity(ClientSecurity(token_file=Path("tokens")))
    >>> stub.Search(request, metadata=watched.metadata)
    >>> if watched.refresh():  # the TLS files changed: new channels
    ...     reopen_channels()
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from retriever_server.security.auth import bearer_metadata, read_token_file
from retriever_server.security.config import ClientSecurity, SecurityError
from retriever_server.security.tls import check_pem, file_stamps

log = logging.getLogger(__name__)
CHECK_EVERY_S = 1.0
RETIRED_CLOSE_S = 600.0  # how long channels replaced after a TLS change stay open for the calls on them


class WatchedClientSecurity:
    """A client's security with its token file and TLS files watched (see the module doc).

    Attributes:
        security: the settings, as given.
        metadata: the call metadata carrying the current bearer token (empty without one).
    """

    def __init__(self, security: ClientSecurity, check_every_s: float = CHECK_EVERY_S):
        self.security = security
        self.check_every_s = check_every_s
        self._token_file = None if security.token else security.token_file
        self._tls_files = [p for p in (security.tls_ca, security.tls_cert, security.tls_key) if p is not None]
        # stamped before the token is read: a file replaced in between is read again at the next refresh
        self._token_seen = file_stamps([self._token_file]) if self._token_file is not None else None
        self._tls_seen = file_stamps(self._tls_files)
        self._tls_refused: tuple | None = None  # the TLS files' stamp last reported unusable: reported once
        if self._token_file is not None:  # read here, as at each change, to warn where others can read it
            self.metadata = bearer_metadata(read_token_file(self._token_file, first_only=True)[0])
        else:
            self.metadata = bearer_metadata(security.bearer_token())
        self._checked = time.monotonic()

    def refresh(self) -> bool:
        """Checks the files (at most once every `check_every_s`): re-reads a changed token file into
        `metadata`; returns True when the TLS files changed and hold a usable certificate setup, so the
        caller opens new channels (`security` reads them again)."""
        now = time.monotonic()
        if now - self._checked < self.check_every_s:
            return False
        self._checked = now
        if self._token_file is not None:
            stamp = file_stamps([self._token_file])
            if stamp != self._token_seen:
                self._token_seen = stamp
                self._read_token(self._token_file)
        if not self._tls_files:
            return False
        stamp = file_stamps(self._tls_files)
        if stamp == self._tls_seen:
            return False
        s = self.security
        try:
            check_pem(s.tls_cert, s.tls_key, s.tls_ca, side=s.flags)
        except SecurityError as err:  # half-written, or a pair that does not match yet: try again later
            if stamp != self._tls_refused:  # once per change, not at every call out until the rotation ends
                self._tls_refused = stamp
                log.warning("TLS files of the calls out changed but cannot be used yet (%s); keeping the current "
                            "ones", err)
            return False
        self._tls_seen = stamp
        log.info("TLS files of the calls out changed: %s", ", ".join(str(p) for p in self._tls_files))
        return True

    def _read_token(self, path: Path) -> None:
        try:
            token = read_token_file(path, first_only=True)[0]
        except SecurityError as err:
            log.warning("%s; keeping the token read before", err)
            return
        metadata = bearer_metadata(token)
        if metadata != self.metadata:
            self.metadata = metadata
            log.info("the token sent is now the first of %s, read again", path)
