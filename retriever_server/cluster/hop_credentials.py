"""The credentials a deployment makes for the hops between its own processes: a private CA, a
certificate for the shards and one for the router, and a random token, written 0600 into a folder
only this user can read. The shards require both (mutual TLS and the token); the router presents
them. The public endpoint (the router's port) keeps the certificate and tokens the user gave; a
deployment that secures its router's port itself gives its clients a token of their own
(`client-token`), which the shards refuse, and the CA (`ca.pem`) to check the router with.

Example:
    >>> hops = make_hop_credentials(Path(tempfile.mkdtemp()))
    >>> hops.shard_args()   # --tls-cert ... --tls-key ... --tls-ca ... --auth-token-file ...
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path

from retriever_server.security.certs import make_ca, make_leaf, new_token, write_private
from retriever_server.security.config import ClientSecurity, ServerSecurity

SHARD_NAME = "retriever-shard.internal"  # every shard's certificate carries it, whatever its address
ROUTER_NAME = "retriever-router.internal"  # and the router's, for a deployment that secures its own port


@dataclass(frozen=True)
class HopCredentials:
    """Files of a deployment's own CA, shard and router certificates, and hop token."""

    ca: Path
    shard_cert: Path
    shard_key: Path
    router_cert: Path
    router_key: Path
    token: Path
    client_token: Path

    def remove(self) -> None:
        """Deletes the files and their folder (when nothing else is in it)."""
        for path in (self.ca, self.shard_cert, self.shard_key, self.router_cert, self.router_key, self.token,
                     self.client_token):
            path.unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            self.ca.parent.rmdir()

    def shard_args(self) -> list[str]:
        """The flags that make a shard require the router's certificate and the hop token."""
        return ["--tls-cert", str(self.shard_cert), "--tls-key", str(self.shard_key), "--tls-ca", str(self.ca),
                "--auth-token-file", str(self.token)]

    def router_args(self) -> list[str]:
        """The flags that make the router call the shards with its certificate and the hop token."""
        return ["--shard-tls-ca", str(self.ca), "--shard-tls-cert", str(self.router_cert), "--shard-tls-key",
                str(self.router_key), "--shard-tls-server-name", SHARD_NAME, "--shard-auth-token-file",
                str(self.token)]

    def client(self) -> ClientSecurity:
        """What a process of the deployment (the launcher) uses to call the shards itself."""
        return ClientSecurity(tls_ca=self.ca, tls_cert=self.router_cert, tls_key=self.router_key,
                              server_name=SHARD_NAME, token_file=self.token)

    def shard_server(self) -> ServerSecurity:
        """A shard's port: mutual TLS with this CA, and the hop token."""
        return ServerSecurity(tls_cert=self.shard_cert, tls_key=self.shard_key, tls_ca=self.ca, token_file=self.token)

    def router_server(self) -> ServerSecurity:
        """The router's own port secured by the deployment itself: its certificate from this CA
        (carrying `ROUTER_NAME`) and the clients' token, not the hops'; clients use `router_client()`."""
        return ServerSecurity(tls_cert=self.router_cert, tls_key=self.router_key, token_file=self.client_token)

    def router_client(self) -> ClientSecurity:
        """What a client of a router secured by `router_server()` uses: the CA and the clients' token (the
        shards refuse it, and ask for a certificate a client does not have)."""
        return ClientSecurity(tls_ca=self.ca, server_name=ROUTER_NAME, token_file=self.client_token)


def make_hop_credentials(directory: Path, hosts: tuple[str, ...] = ("127.0.0.1", "localhost")) -> HopCredentials:
    """Makes a CA, the shard and router certificates (for `hosts` and `SHARD_NAME`) and a token in
    `directory`, each file 0600: a folder created here is 0700; one that existed keeps its mode (a
    caller's folder is the caller's to set)."""
    directory = Path(directory)
    try:
        directory.mkdir(mode=0o700, parents=True)
        os.chmod(directory, 0o700)  # whatever the umask
    except FileExistsError:
        pass
    ca = make_ca()
    shard = make_leaf(ca, "retriever shard", [*hosts, SHARD_NAME])
    router = make_leaf(ca, "retriever router", [*hosts, ROUTER_NAME])
    paths = HopCredentials(ca=directory / "ca.pem", shard_cert=directory / "shard.pem",
                           shard_key=directory / "shard.key", router_cert=directory / "router.pem",
                           router_key=directory / "router.key", token=directory / "hop-token",
                           client_token=directory / "client-token")
    for path, data in ((paths.ca, ca.cert_pem), (paths.shard_cert, shard.cert_pem), (paths.shard_key, shard.key_pem),
                       (paths.router_cert, router.cert_pem), (paths.router_key, router.key_pem),
                       (paths.token, (new_token() + "\n").encode()),
                       (paths.client_token, (new_token() + "\n").encode())):
        write_private(path, data)
    return paths
