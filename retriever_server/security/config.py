"""Who may talk to a server, and how: TLS (mutual TLS as an option), bearer tokens, and the safe
default that refuses to serve a non-loopback address in plaintext or without a token.

Servers take `ServerSecurity` (`--tls-cert`, `--tls-key`, `--tls-ca`, `--auth-token-file`,
`--insecure`, `--reflection`); clients take `ClientSecurity` (`--tls-ca`, `--tls-cert`, `--tls-key`,
`--tls-server-name`, `--auth-token-file` or `RETRIEVER_AUTH_TOKEN`). A token file holds one token per
line (surrounding whitespace ignored, blank lines skipped; several lines let tokens rotate). Tokens
are never taken from argv and never logged. On loopback, with no TLS and no token, servers and
clients speak plaintext, as on a developer's machine.

Example:
    >>> ServerSecurity(tls_cert=Path("server.pem"), tls_key=Path("server.key"),
    ...                token_file=Path("tokens.txt")).check("0.0.0.0")     # passes
    >>> ServerSecurity().check("0.0.0.0")                                   # SecurityError
"""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

TOKEN_ENV = "RETRIEVER_AUTH_TOKEN"  # where clients find their token when no file is given
# "localhost" is reserved to the machine (RFC 6761); "ip6-localhost" is only a hosts-file name, which a
# machine without that line resolves through DNS, anywhere
LOOPBACK_NAMES = ("localhost", "::1", "[::1]")


class SecurityError(ValueError):
    """A security setting that cannot work, or that would expose the service; the message says which."""


def is_loopback_host(host: str) -> bool:
    """Whether `host` (as a server binds it or a client dials it) is this machine's loopback only."""
    host = host.strip()
    if host in LOOPBACK_NAMES or host.startswith(("unix:", "unix-abstract:")):
        return True
    try:  # an address, not a name: "127.example.com" may resolve anywhere
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def dialled_hosts(address: str) -> list[str]:
    """The hosts a gRPC target dials: "HOST:PORT", "[V6]:PORT", "ipv4:a:p,b:p", "ipv6:[a]:p",
    "dns:[//authority/]HOST:PORT"; "localhost" for a unix socket; [address] for another scheme."""
    if address.startswith(("unix:", "unix-abstract:")):
        return ["localhost"]
    if address.startswith(("ipv4:", "ipv6:")):
        return [h for part in address.split(":", 1)[1].split(",") for h in dialled_hosts(part)]
    if address.startswith("dns:"):
        address = address[4:].rsplit("/", 1)[-1]
    elif "://" in address:
        return [address]
    host = address.rpartition(":")[0] if address.count(":") == 1 or address.startswith("[") else address
    return [host.strip("[]") or address]


def is_header_token(token: str) -> bool:
    """Whether an HTTP header (gRPC metadata) can carry `token`: printable ASCII, spaces inside it only."""
    return token.isascii() and token.isprintable()


def env_token() -> str | None:
    """The token in RETRIEVER_AUTH_TOKEN, whitespace around it ignored; None when unset or blank.

    Raises:
        SecurityError: it is not printable ASCII, which no header can carry; the message never holds it.
    """
    token = os.environ.get(TOKEN_ENV, "").strip()
    if token and not is_header_token(token):
        raise SecurityError(f"{TOKEN_ENV} is not a token: a token is printable ASCII")
    return token or None


def read_tokens(path: Path, first_only: bool = False) -> list[str]:
    """The tokens of a token file: one per line, whitespace around them ignored, blank lines skipped;
    `first_only`: the first alone (what a client sends), the lines after it unread.

    Raises:
        SecurityError: the file cannot be read, holds no token, or a token that no HTTP header can carry
            (not printable ASCII); the message names the file and the line, never the token.
    """
    try:
        data = Path(path).read_bytes()
    except OSError as err:
        raise SecurityError(f"cannot read the token file {path}: {err.strerror or err}") from None
    return parse_tokens(data, path, first_only)


def parse_tokens(data: bytes, path: Path, first_only: bool = False) -> list[str]:
    """The tokens in the bytes `data` of the token file `path` (named in errors), as `read_tokens` reads them."""
    tokens = []
    for n, line in enumerate(data.splitlines(), 1):
        if not line.strip():
            continue
        token = line.strip().decode("ascii", errors="replace")  # a byte past ASCII decodes as U+FFFD
        if not is_header_token(token):
            raise SecurityError(f"the token file {path}: line {n} is not a token: a token is printable ASCII")
        tokens.append(token)
        if first_only:
            break
    if not tokens:
        raise SecurityError(f"the token file {path} holds no token")
    return tokens


def _check_files(flags: dict[str, Path | None]) -> None:
    for flag, path in flags.items():
        if path is not None and not Path(path).is_file():
            raise SecurityError(f"{flag} {path}: no such file")


@dataclass(frozen=True)
class ServerSecurity:
    """How a server secures its port.

    Attributes:
        tls_cert, tls_key: the server's certificate chain and private key (PEM): TLS on the port.
        tls_ca: with TLS, require client certificates signed by this CA (mutual TLS).
        token_file: accepted bearer tokens, one per line; every call but health needs one.
        insecure: serve a non-loopback address without TLS or without a token anyway.
        reflection: offer gRPC server reflection (off by default: it tells anyone the API).
    """

    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_ca: Path | None = None
    token_file: Path | None = None
    insecure: bool = False
    reflection: bool = False

    @property
    def tls(self) -> bool:
        return self.tls_cert is not None

    def check(self, host: str) -> None:
        """Raises SecurityError for settings that cannot work, or that would expose `host` unprotected."""
        if (self.tls_cert is None) != (self.tls_key is None):
            raise SecurityError("--tls-cert and --tls-key go together")
        if self.tls_ca is not None and not self.tls:
            raise SecurityError("--tls-ca (client certificates required) needs --tls-cert and --tls-key")
        _check_files({"--tls-cert": self.tls_cert, "--tls-key": self.tls_key, "--tls-ca": self.tls_ca})
        if self.token_file is not None:
            read_tokens(self.token_file)
        if not is_loopback_host(host) and not (self.tls and self.token_file) and not self.insecure:
            missing = " and ".join(what for what, given in (("TLS (--tls-cert, --tls-key)", self.tls),
                                                              ("a token (--auth-token-file)", self.token_file))
                                   if not given)
            raise SecurityError(f"refusing to serve {host} without {missing}: anyone who can reach the port could "
                                "use it. Give them, bind 127.0.0.1, or pass --insecure to serve it unprotected")

    def describe(self) -> str:
        """What protects the port, for logs: e.g. "TLS with client certificates, bearer tokens"."""
        parts = ["mutual TLS" if self.tls_ca else "TLS"] if self.tls else ["plaintext"]
        parts.append("bearer tokens" if self.token_file else "no token")
        return ", ".join(parts)


@dataclass(frozen=True)
class ClientSecurity:
    """How a client reaches servers.

    Attributes:
        tls_ca: verify servers with this CA (PEM); TLS on.
        tls_cert, tls_key: the client's certificate and key, for servers that require them (mutual TLS).
        server_name: the name to check the server's certificate against, when it is not the host dialled.
        use_tls: TLS with the system's trusted roots, when no `tls_ca` is given.
        token_file: the bearer token (the file's first); else the RETRIEVER_AUTH_TOKEN environment variable.
        token: the bearer token itself, for callers that hold it in memory (never printed).
        plaintext_token: send the bearer token unencrypted to an address off this machine's loopback
            (a network that is trusted); without it, a channel to one without TLS is refused where
            there is a token to send (`check_channel`).
        flags: the prefix of the command-line flags these came from ("shard-" for a router's
            --shard-tls-ca ...), so that an error names the flag the user gave.
    """

    tls_ca: Path | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    server_name: str | None = None
    use_tls: bool = False
    token_file: Path | None = None
    token: str | None = None
    plaintext_token: bool = False
    flags: str = ""

    def __repr__(self) -> str:  # never the token
        shown = {k: v for k, v in vars(self).items() if k != "token" and v not in (None, False, "")}
        return f"ClientSecurity({', '.join(f'{k}={v}' for k, v in shown.items())}{', token=***' * bool(self.token)})"

    @property
    def tls(self) -> bool:
        return self.use_tls or self.tls_ca is not None or self.tls_cert is not None

    def check(self) -> None:
        """Raises SecurityError for settings that cannot work (missing files, a certificate without its key)."""
        f = self.flags
        if (self.tls_cert is None) != (self.tls_key is None):
            raise SecurityError(f"--{f}tls-cert and --{f}tls-key go together")
        if self.server_name and not self.tls:  # else ignored: the call would go in plaintext
            raise SecurityError(f"--{f}tls-server-name needs TLS: give --{f}tls-ca, the CA that signed the server's "
                                "certificate")
        _check_files({f"--{f}tls-ca": self.tls_ca, f"--{f}tls-cert": self.tls_cert, f"--{f}tls-key": self.tls_key})

    def check_channel(self, address: str) -> None:
        """Raises SecurityError where a channel to `address` would carry the bearer token unencrypted
        off this machine: no TLS, a token to send, a host that is not loopback, no `plaintext_token`."""
        if self.tls or self.plaintext_token or self.bearer_token() is None:
            return
        if all(is_loopback_host(host) for host in dialled_hosts(address)):
            return
        f = self.flags
        where = f"--{f}auth-token-file" if self.token_file else ("the token given" if self.token else TOKEN_ENV)
        raise SecurityError(f"refusing to send the bearer token ({where}) to {address[:200]!r} without TLS: anyone "
                            f"on the way could read it and use it. Give --{f}tls-ca (TLS), or pass "
                            f"--{f}allow-plaintext-token on a network you trust")

    def bearer_token(self) -> str | None:
        """The token to send: the token given, else the token file's first, else RETRIEVER_AUTH_TOKEN
        (SecurityError, naming the file or the variable, where it is not one a header can carry)."""
        if self.token:
            return self.token
        if self.token_file is not None:
            return read_tokens(self.token_file, first_only=True)[0]
        return env_token()
