"""How a Ray deployment secures its ports (see `RayServeConfig`): the router's port with the user's
certificate and tokens, or with the deployment's own CA and token (`secrets_dir`), or not at all on
loopback; and, whenever the router's port is secured, the hops from the router to the shards with
mutual TLS and a token of the deployment's own. The actors get their files as a constructor argument
(`ray_secrets`), under names of their own; the deployment's CA and keys are made in a private temporary
folder, removed once read, and `secrets_dir` gets what clients need alone (`ca.pem`, `client-token`).
The servers authenticate with these files alone: never with the RETRIEVER_AUTH_TOKEN of the user who
deploys (the router's calls to the shards are `OwnCredentials`, and the actors drop that variable).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

from retriever_server.cluster.hop_credentials import HopCredentials, make_hop_credentials
from retriever_server.cluster.ray_secrets import Secrets, pack, read_files, relocated
from retriever_server.security.certs import write_private
from retriever_server.security.config import ClientSecurity, ServerSecurity, is_loopback_host
from retriever_server.security.tls import check_pem


class OwnCredentials(ClientSecurity):
    """A server's calls out (the router's, to its shards): the token given, or the token file's, never
    RETRIEVER_AUTH_TOKEN, the token of the user who deploys (Ray actors inherit their environment), which
    would go to the shards, in plaintext where the hops are."""

    def bearer_token(self) -> str | None:
        return super().bearer_token() if self.token or self.token_file is not None else None


@dataclass(frozen=True)
class DeploymentSecurity:
    """What each actor runs with, and what clients of the router use (None: the user's own)."""

    shard: ServerSecurity
    shard_secrets: Secrets | None = field(repr=False)  # keys and tokens: never in a repr or a log
    router: ServerSecurity
    router_to_shards: ClientSecurity
    router_secrets: Secrets | None = field(repr=False)
    client: ClientSecurity | None


def _paths(settings) -> dict[str, Path]:
    """The file paths of a ServerSecurity or ClientSecurity, by field name."""
    return {f.name: getattr(settings, f.name) for f in fields(settings) if isinstance(getattr(settings, f.name), Path)}


def check_exposure(host: str | None, public: ServerSecurity, secrets_dir: Path | None) -> None:
    """SecurityError when servers binding `host` (None: each node's IP) would serve a node's IP with
    neither the user's TLS and token, nor `secrets_dir`, nor `public.insecure` (no side effects: a
    command checks it before it joins or starts a cluster)."""
    public.check("127.0.0.1")  # the files given: each there, readable, a certificate with its key
    check_pem(public.tls_cert, public.tls_key, public.tls_ca)
    exposed = host is None or not is_loopback_host(host)
    by_itself = secrets_dir is not None and not (public.tls or public.token_file)  # else the user's settings
    if exposed and not (public.tls and public.token_file) and not public.insecure and not by_itself:
        public.check("a node's IP")  # raises, saying what is missing


def plan_security(host: str | None, public: ServerSecurity, secrets_dir: Path | None) -> DeploymentSecurity:
    """The security of a deployment whose servers bind `host` (None: each node's IP).

    Raises:
        SecurityError: the servers would bind a node's IP with neither the user's TLS and token, nor
            `secrets_dir`, nor `public.insecure`.
    """
    check_exposure(host, public, secrets_dir)
    by_itself = not (public.tls or public.token_file) and secrets_dir is not None and not public.insecure
    if not (public.tls or public.token_file or by_itself):
        shard = ServerSecurity(insecure=public.insecure)  # --insecure: the shards on the node IPs too
        return DeploymentSecurity(shard, None, public, OwnCredentials(), None, ClientSecurity())
    folder = Path(tempfile.mkdtemp(prefix="retriever-hops-"))  # 0700, this process's alone
    try:
        hops = make_hop_credentials(folder, ("127.0.0.1", "localhost") + ((host,) if host else ()))
        shard = hops.shard_server()
        source = replace(hops.router_server(), reflection=public.reflection) if by_itself else public  # asked for
        router = replace(source, **{name: Path(f"public-{name}") for name in _paths(source)})
        to_shards = OwnCredentials(**vars(hops.client()))  # its hop token: no fallback, were it ever missing
        files = {f"public-{name}": path for name, path in _paths(source).items()}
        files.update({path.name: path for path in _paths(to_shards).values()})
        shard_files = {path.name: path for path in _paths(shard).values()}
        shard_secrets, router_secrets = pack(read_files(shard_files)), pack(read_files(files))
        client = publish_for_clients(hops, Path(secrets_dir)) if by_itself else None
    finally:  # read now (or failed): the actors carry their copies, the clients theirs in secrets_dir
        shutil.rmtree(folder, ignore_errors=True)
    return DeploymentSecurity(shard=shard, shard_secrets=shard_secrets, router=router,
                              router_to_shards=to_shards, router_secrets=router_secrets, client=client)


def publish_for_clients(hops: HopCredentials, secrets_dir: Path) -> ClientSecurity:
    """Writes what a client of a router secured by `hops.router_server()` needs, the CA (`ca.pem`) and
    the clients' token (`client-token`), 0600 into `secrets_dir`, and nothing else: no key, no hop
    token. A folder created here is 0700; one that existed keeps its mode. Returns the clients' settings."""
    try:
        secrets_dir.mkdir(mode=0o700, parents=True)
        os.chmod(secrets_dir, 0o700)  # whatever the umask
    except FileExistsError:
        pass
    client = hops.router_client()
    for path in (client.tls_ca, client.token_file):
        write_private(secrets_dir / path.name, path.read_bytes())
    return relocated(client, secrets_dir)
