"""How a Ray deployment secures its ports (see `RayServeConfig`): the router's port with the user's
certificate and tokens, or with the deployment's own CA and token (`secrets_dir`), or not at all on
loopback; and, whenever the router's port is secured, the hops from the router to the shards with
mutual TLS and a token of the deployment's own. The actors get their files as a constructor argument
(`ray_secrets`), under names of their own.
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass, fields, replace
from pathlib import Path

from retriever_server.cluster.hop_credentials import make_hop_credentials
from retriever_server.cluster.ray_secrets import Secrets, pack, read_files
from retriever_server.security.config import ClientSecurity, ServerSecurity, is_loopback_host
from retriever_server.security.tls import check_pem


@dataclass(frozen=True)
class DeploymentSecurity:
    """What each actor runs with, and what clients of the router use (None: the user's own)."""

    shard: ServerSecurity
    shard_secrets: Secrets | None
    router: ServerSecurity
    router_to_shards: ClientSecurity
    router_secrets: Secrets | None
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
    if exposed and not (public.tls and public.token_file) and not public.insecure and secrets_dir is None:
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
        return DeploymentSecurity(shard, None, public, ClientSecurity(), None, ClientSecurity())
    folder = secrets_dir if by_itself else Path(tempfile.mkdtemp(prefix="retriever-hops-"))
    try:
        hops = make_hop_credentials(Path(folder), ("127.0.0.1", "localhost") + ((host,) if host else ()))
        shard = hops.shard_server()
        source = hops.router_server() if by_itself else public
        router = replace(source, **{name: Path(f"public-{name}") for name in _paths(source)})
        to_shards = hops.client()
        files = {f"public-{name}": path for name, path in _paths(source).items()}
        files.update({path.name: path for path in _paths(to_shards).values()})
        shard_files = {path.name: path for path in _paths(shard).values()}
        shard_secrets, router_secrets = pack(read_files(shard_files)), pack(read_files(files))
    finally:
        if not by_itself:  # a folder of its own, read now (or failed): the actors carry their copies
            shutil.rmtree(folder, ignore_errors=True)
    return DeploymentSecurity(shard=shard, shard_secrets=shard_secrets, router=router,
                              router_to_shards=to_shards, router_secrets=router_secrets,
                              client=hops.router_client() if by_itself else None)
