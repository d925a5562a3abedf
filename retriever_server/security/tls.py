"""TLS credentials for servers and channels, read from PEM files.

A server's certificate, key and client CA are read again when any of the files changes (checked
when a client connects) or when `reload()` is called (on SIGHUP), so a rotated certificate takes
effect for new connections without a restart; connections already open keep theirs.
"""

from __future__ import annotations

import logging
import os
import ssl
import threading
from pathlib import Path

import grpc

from retriever_server.security.config import (
    ClientSecurity,
    SecurityError,
    ServerSecurity,
    dialled_hosts,
    is_loopback_host,
)

log = logging.getLogger(__name__)


def _read(path: Path, flag: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as err:
        raise SecurityError(f"cannot read {flag} {path}: {err.strerror or err}") from None


def check_pem(cert: Path | None, key: Path | None, ca: Path | None, side: str = "") -> None:
    """SecurityError unless `cert` and `key` are a PEM certificate (chain) and its unencrypted private
    key, and `ca` holds PEM certificates: checked here, with a clear message, because gRPC answers a bad
    file with a failed bind or a failed handshake and C-level log lines. `side` prefixes the flags
    ("shard-": --shard-tls-ca ...)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.set_ciphers("DEFAULT:@SECLEVEL=0")  # the files' form and match, not this OpenSSL's policy on key sizes
    if cert is not None and key is not None:
        try:
            context.load_cert_chain(cert, key, password=b"")  # an encrypted key fails, never prompts
        except ssl.SSLError as err:
            raise SecurityError(f"--{side}tls-cert {cert} and --{side}tls-key {key} are not a PEM certificate and "
                                f"its unencrypted private key ({err.reason or err})") from None
        except OSError as err:
            raise SecurityError(f"cannot read --{side}tls-cert {cert} or --{side}tls-key {key}: "
                                f"{err.strerror or err}") from None
    if ca is not None:
        try:
            context.load_verify_locations(cafile=str(ca))
        except ssl.SSLError as err:
            raise SecurityError(f"--{side}tls-ca {ca} holds no PEM certificate ({err.reason or err})") from None
        except OSError as err:
            raise SecurityError(f"cannot read --{side}tls-ca {ca}: {err.strerror or err}") from None


def file_stamps(paths: list[Path]) -> tuple:
    """What changes when any of the files is rewritten or replaced: its change time too, which no copy
    that keeps the modification time (`cp -p`, `rsync -t`) can set back."""
    out = []
    for path in paths:
        try:
            st = Path(path).stat()
            out.append((st.st_mtime_ns, st.st_ctime_ns, st.st_size, st.st_ino))
        except OSError:
            out.append(None)
    return tuple(out)


def warn_if_shared(path: Path, what: str, found: os.stat_result | None = None) -> None:
    """Warns where a secret's file (a key, a token file) of this process's user can be read by others too;
    `found`: the file's status as read (an opened file's fstat), else it is looked up by `path`.
    (A file of another owner, such as a Kubernetes Secret mounted read-only for the pod alone, was made
    readable to this user on purpose.)"""
    if found is None:
        try:
            found = Path(path).stat()
        except OSError:
            return  # reading it says why
    if found.st_uid == os.getuid() and found.st_mode & 0o077:
        log.warning("%s %s can be read by other users (mode %03o): `chmod 600` it", what, path, found.st_mode & 0o777)


class ServerCertificates:
    """A server's certificate configuration, reloaded when its files change."""

    def __init__(self, security: ServerSecurity):
        self.security = security
        self.paths = [p for p in (security.tls_cert, security.tls_key, security.tls_ca) if p is not None]
        self.lock = threading.Lock()
        self.forced = False
        self.seen = file_stamps(self.paths)
        self.initial = self._config()
        warn_if_shared(security.tls_key, "the TLS key")

    def _config(self) -> grpc.ServerCertificateConfiguration:
        s = self.security
        check_pem(s.tls_cert, s.tls_key, s.tls_ca)
        pair = (_read(s.tls_key, "--tls-key"), _read(s.tls_cert, "--tls-cert"))
        ca = _read(s.tls_ca, "--tls-ca") if s.tls_ca is not None else None
        return grpc.ssl_server_certificate_configuration([pair], root_certificates=ca)

    def reload(self) -> None:
        """Reads the files again at the next connection, changed or not (SIGHUP)."""
        with self.lock:
            self.forced = True

    def fetch(self) -> grpc.ServerCertificateConfiguration | None:
        """gRPC's callback before each handshake: a new configuration when the files changed, else None."""
        with self.lock:
            stamp = file_stamps(self.paths)
            if stamp == self.seen and not self.forced:
                return None
            self.seen, self.forced = stamp, False
        try:
            config = self._config()
        except (SecurityError, ValueError) as err:  # a half-written file: keep serving with the old pair
            log.warning("TLS files changed but could not be read (%s); keeping the current certificate", err)
            return None
        log.info("TLS certificate reloaded from %s", self.security.tls_cert)
        return config

    def credentials(self) -> grpc.ServerCredentials:
        return grpc.dynamic_ssl_server_credentials(self.initial, self.fetch,
                                                   require_client_authentication=self.security.tls_ca is not None)


def channel_credentials(security: ClientSecurity) -> grpc.ChannelCredentials:
    """TLS credentials of a channel: the CA to verify servers with (None: the system's roots) and,
    for mutual TLS, the client's certificate and key."""
    f = security.flags
    check_pem(security.tls_cert, security.tls_key, security.tls_ca, side=f)
    ca = _read(security.tls_ca, f"--{f}tls-ca") if security.tls_ca is not None else None
    key = _read(security.tls_key, f"--{f}tls-key") if security.tls_key is not None else None
    cert = _read(security.tls_cert, f"--{f}tls-cert") if security.tls_cert is not None else None
    return grpc.ssl_channel_credentials(root_certificates=ca, private_key=key, certificate_chain=cert)


def channel_options(security: ClientSecurity, options: list[tuple[str, object]],
                    address: str = "") -> list[tuple[str, object]]:
    """`options`, plus the name a server's certificate must carry when it is not the host dialled, and,
    where every host `address` dials is loopback, no HTTP proxy: gRPC would send such a call (a token in
    plaintext, as `check_channel` lets through on loopback) to the proxy of grpc_proxy, https_proxy or
    http_proxy, off this machine, where this machine's loopback is not even reachable."""
    options = list(options)
    if security.tls and security.server_name:
        options.append(("grpc.ssl_target_name_override", security.server_name))
    if address and all(is_loopback_host(host) for host in dialled_hosts(address)):
        options.append(("grpc.enable_http_proxy", 0))
    return options


def open_channel(address: str, security: ClientSecurity, options: list[tuple[str, object]]) -> grpc.Channel:
    """A blocking channel to `address`: TLS when the security says so, else plaintext (SecurityError
    where that would carry a token off this machine: `ClientSecurity.check_channel`)."""
    security.check_channel(address)
    options = channel_options(security, options, address)
    if security.tls:
        return grpc.secure_channel(address, channel_credentials(security), options)
    return grpc.insecure_channel(address, options=options)


def open_aio_channel(address: str, security: ClientSecurity,
                     options: list[tuple[str, object]]) -> grpc.aio.Channel:
    """An asyncio channel to `address`: TLS when the security says so, else plaintext (SecurityError
    where that would carry a token off this machine: `ClientSecurity.check_channel`)."""
    security.check_channel(address)
    options = channel_options(security, options, address)
    if security.tls:
        return grpc.aio.secure_channel(address, channel_credentials(security), options)
    return grpc.aio.insecure_channel(address, options=options)
