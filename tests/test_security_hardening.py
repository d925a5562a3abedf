"""Security defects found in review, each pinned: loopback channels that never go through an HTTP proxy,
a deployment's `secrets_dir` that holds what clients need and nothing else, exposure checks that count
`secrets_dir` only where it applies, certificates that pass strict X.509 verification, a bad
RETRIEVER_AUTH_TOKEN named, secrets kept out of reprs, one warning per half-rotated TLS file set, and token
files stamped before they are read. No Ray cluster: each test takes well under a second."""

from __future__ import annotations

import asyncio
import base64
import logging
import socket
import ssl
import stat
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import pytest

from retriever_server.cluster.hop_credentials import make_hop_credentials
from retriever_server.cluster.ray_security import check_exposure, plan_security
from retriever_server.security import auth, client_files
from retriever_server.security.auth import TokenSet, bearer_metadata
from retriever_server.security.certs import make_ca, make_leaf, write_private
from retriever_server.security.client_files import WatchedClientSecurity
from retriever_server.security.config import TOKEN_ENV, ClientSecurity, SecurityError, ServerSecurity
from retriever_server.security.tls import open_aio_channel, open_channel

HOSTS = ["127.0.0.1", "localhost"]
ECHO = "/test.Echo/Call"
PROXY_VARS = ("grpc_proxy", "https_proxy", "http_proxy", "no_grpc_proxy", "no_proxy", "NO_PROXY", "HTTP_PROXY",
              "HTTPS_PROXY")


def _pipe(source: socket.socket, sink: socket.socket) -> None:
    try:
        while chunk := source.recv(65536):
            sink.sendall(chunk)
    except OSError:
        pass


class ConnectProxy:
    """An HTTP CONNECT proxy on loopback that records each CONNECT line and tunnels it on, as a proxy
    set in http_proxy on a cluster would."""

    def __init__(self):
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        self.requests: list[bytes] = []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._tunnel, args=(conn,), daemon=True).start()

    def _tunnel(self, conn: socket.socket) -> None:
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = conn.recv(1)
            if not chunk:
                return conn.close()
            head += chunk
        line = head.split(b"\r\n")[0]
        self.requests.append(line)
        host, port = line.split()[1].decode().rsplit(":", 1)
        upstream = socket.create_connection((host.strip("[]"), int(port)))
        conn.sendall(b"HTTP/1.1 200 OK\r\n\r\n")
        for a, b in ((conn, upstream), (upstream, conn)):
            threading.Thread(target=_pipe, args=(a, b), daemon=True).start()

    def close(self) -> None:
        self.listener.shutdown(socket.SHUT_RDWR)
        self.listener.close()


@pytest.fixture
def proxy(monkeypatch):
    """A CONNECT proxy that http_proxy names (and no other proxy variable is set)."""
    found = ConnectProxy()
    for name in PROXY_VARS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("http_proxy", found.url)
    yield found
    found.close()


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("pki")
    ca = make_ca("test CA")
    files = {"ca.pem": write_private(tmp / "ca.pem", ca.cert_pem)}
    for name, pair in (("server", make_leaf(ca, "server", HOSTS)), ("client", make_leaf(ca, "client", [])),
                       ("other", make_leaf(ca, "other", []))):
        files[f"{name}.pem"] = write_private(tmp / f"{name}.pem", pair.cert_pem)
        files[f"{name}.key"] = write_private(tmp / f"{name}.key", pair.key_pem)
    return files


def echo_server(pki: dict[str, Path] | None = None) -> tuple[grpc.Server, int]:
    """A gRPC server on loopback answering ECHO with b"ok": plaintext, or TLS with `pki`'s server pair."""
    server = grpc.server(ThreadPoolExecutor(2))
    handler = grpc.unary_unary_rpc_method_handler(lambda request, context: b"ok")
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("test.Echo", {"Call": handler}),))
    if pki is None:
        port = server.add_insecure_port("127.0.0.1:0")
    else:
        pair = (pki["server.key"].read_bytes(), pki["server.pem"].read_bytes())
        port = server.add_secure_port("127.0.0.1:0", grpc.ssl_server_credentials([pair]))
    server.start()
    return server, port


@pytest.mark.parametrize("kind", ["plaintext", "plaintext-aio", "tls"])
def test_a_call_to_a_loopback_server_never_goes_through_an_http_proxy(proxy, pki, kind):
    """A token sent in plaintext to loopback (what `check_channel` lets through) went to the proxy in
    http_proxy, in clear, and a proxy off the machine cannot reach this machine's loopback at all."""
    server, port = echo_server(pki if kind == "tls" else None)
    security = ClientSecurity(token="s3cr3t", tls_ca=pki["ca.pem"] if kind == "tls" else None)
    metadata = bearer_metadata(security.token)
    try:
        if kind == "plaintext-aio":
            async def call() -> bytes:
                async with open_aio_channel(f"127.0.0.1:{port}", security, []) as channel:
                    return await channel.unary_unary(ECHO)(b"", metadata=metadata, timeout=5)
            answer = asyncio.run(call())
        else:
            with open_channel(f"localhost:{port}", security, []) as channel:
                answer = channel.unary_unary(ECHO)(b"", metadata=metadata, timeout=5)
    finally:
        server.stop(0)
    assert answer == b"ok" and proxy.requests == []


def test_the_ray_token_probe_does_not_go_through_an_http_proxy(proxy, monkeypatch):
    """As Ray's own channels (RAY_grpc_enable_http_proxy off), the probe of the head's token
    authentication goes straight to the head, never with Ray's token through a proxy."""
    import ray

    from retriever_server.cluster.connect import GCS_PROBE_METHOD, ClusterUnreachable, connect

    def refuse(request, context):
        context.abort(grpc.StatusCode.UNAUTHENTICATED, "no token")

    service, method = GCS_PROBE_METHOD.strip("/").split("/")
    server = grpc.server(ThreadPoolExecutor(2))
    handler = grpc.unary_unary_rpc_method_handler(refuse)
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service, {method: handler}),))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    monkeypatch.setattr(ray, "is_initialized", lambda: False)  # never ray.init: the fake head refuses first
    monkeypatch.delenv("RAY_AUTH_MODE", raising=False)
    try:
        with pytest.raises(ClusterUnreachable, match="takes token authentication"):
            connect(address=f"127.0.0.1:{port}", timeout_s=5)
    finally:
        server.stop(0)
    assert proxy.requests == []


def test_secrets_dir_gets_what_clients_need_and_the_hops_keys_stay_private(tmp_path, monkeypatch):
    """`secrets_dir`, the folder handed to clients, holds the CA and the clients' token alone: no hop
    token or keys, which would let a client call the shards; the hops' own folder is gone."""
    private_tmp = tmp_path / "tmp"
    private_tmp.mkdir()
    monkeypatch.setattr("tempfile.tempdir", str(private_tmp))
    own = tmp_path / "new" / "own"
    plan = plan_security(None, ServerSecurity(), own)
    assert sorted(p.name for p in own.iterdir()) == ["ca.pem", "client-token"]
    assert stat.S_IMODE(own.stat().st_mode) == 0o700
    assert {stat.S_IMODE(p.stat().st_mode) for p in own.iterdir()} == {0o600}
    assert plan.client.tls_ca == own / "ca.pem" and plan.client.token_file == own / "client-token"
    assert base64.b64decode(plan.router_secrets["public-token_file"]) == plan.client.token_file.read_bytes()
    assert list(private_tmp.iterdir()) == []  # the hops' CA key, certificates and token: gone
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o755)
    (shared / "notes.txt").write_text("mine")
    plan_security("127.0.0.1", ServerSecurity(), shared)
    assert stat.S_IMODE(shared.stat().st_mode) == 0o755  # the caller's folder, as the caller left it
    assert sorted(p.name for p in shared.iterdir()) == ["ca.pem", "client-token", "notes.txt"]
    assert list(private_tmp.iterdir()) == []


def test_hop_credentials_leave_the_mode_of_a_folder_that_existed(tmp_path):
    existing = tmp_path / "existing"
    existing.mkdir()
    existing.chmod(0o750)
    make_hop_credentials(existing)
    assert stat.S_IMODE(existing.stat().st_mode) == 0o750
    made = make_hop_credentials(tmp_path / "made" / "hops")
    assert stat.S_IMODE(made.ca.parent.stat().st_mode) == 0o700
    assert stat.S_IMODE(made.shard_key.stat().st_mode) == 0o600


def test_secrets_dir_does_not_excuse_half_of_the_users_security(pki, tmp_path):
    """`secrets_dir` secures the router's port only when the user gave neither TLS nor a token: TLS
    without a token, or a token without TLS, on the nodes' IPs is refused before any cluster starts."""
    own = tmp_path / "own"
    half = {"without a token": ServerSecurity(tls_cert=pki["server.pem"], tls_key=pki["server.key"]),
            "without TLS": ServerSecurity(token_file=write_private(tmp_path / "tokens", b"t0k3n\n"))}
    for missing, security in half.items():
        with pytest.raises(SecurityError, match=missing):
            check_exposure(None, security, own)
        with pytest.raises(SecurityError, match=missing):
            plan_security("10.1.2.3", security, own)
    check_exposure(None, ServerSecurity(), own)  # secrets_dir alone: the deployment secures it
    assert not own.exists()


def strict_handshake(pki: dict[str, Path], client_cert: str, server_name: str) -> None:
    """A TLS handshake in memory with VERIFY_X509_STRICT on both sides (Python 3.13's default for
    create_default_context), the client certificate required."""
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(pki["server.pem"], pki["server.key"])
    server_ctx.load_verify_locations(cafile=str(pki["ca.pem"]))
    server_ctx.verify_mode = ssl.CERT_REQUIRED
    client_ctx = ssl.create_default_context(cafile=str(pki["ca.pem"]))
    client_ctx.load_cert_chain(pki[f"{client_cert}.pem"], pki[f"{client_cert}.key"])
    for context in (server_ctx, client_ctx):
        context.verify_flags |= ssl.VERIFY_X509_STRICT
    bios = [ssl.MemoryBIO() for _ in range(4)]
    server = server_ctx.wrap_bio(bios[0], bios[1], server_side=True)
    client = client_ctx.wrap_bio(bios[2], bios[3], server_hostname=server_name)
    done = {server: False, client: False}
    for _ in range(10):
        for side in (client, server):
            if not done[side]:
                try:
                    side.do_handshake()
                    done[side] = True
                except ssl.SSLWantReadError:
                    pass
        bios[0].write(bios[3].read())
        bios[2].write(bios[1].read())
        if all(done.values()):
            return
    raise AssertionError("the handshake did not finish")


def test_generated_certificates_pass_strict_x509_verification(pki):
    from cryptography import x509

    for name in ("127.0.0.1", "localhost"):
        strict_handshake(pki, "client", name)
    leaf = x509.load_pem_x509_certificate(pki["server.pem"].read_bytes())
    usage = leaf.extensions.get_extension_for_class(x509.KeyUsage).value
    assert usage.digital_signature and not usage.key_cert_sign


@pytest.mark.parametrize("value", ["bad\x01token", "caf\u00e9-token", "tab\ttoken"])
def test_a_token_in_the_environment_that_no_header_can_carry_is_named(monkeypatch, value):
    """It used to be sent, and fail the call with an opaque INTERNAL "Invalid metadata"."""
    monkeypatch.setenv(TOKEN_ENV, value)
    with pytest.raises(SecurityError, match=TOKEN_ENV) as refused:
        ClientSecurity().bearer_token()
    assert value not in str(refused.value) and "printable ASCII" in str(refused.value)
    with pytest.raises(SecurityError, match=TOKEN_ENV):
        WatchedClientSecurity(ClientSecurity())
    monkeypatch.setenv(TOKEN_ENV, "  good-token \n")
    assert ClientSecurity().bearer_token() == "good-token"


def test_a_deployment_plans_repr_holds_no_secret(tmp_path, monkeypatch):
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    tokens = write_private(tmp_path / "tokens", b"s3cr3t-user-token\n")
    plan = plan_security("127.0.0.1", ServerSecurity(token_file=tokens), None)
    shown = repr(plan)
    carried = {**plan.shard_secrets, **plan.router_secrets}
    assert carried and not [name for name, data in carried.items() if data in shown]
    assert "s3cr3t-user-token" not in shown


def test_a_half_rotated_client_certificate_is_reported_once_per_change(pki, tmp_path, caplog):
    files = {name: write_private(tmp_path / name, pki[name].read_bytes()) for name in ("client.pem", "client.key")}
    watched = WatchedClientSecurity(ClientSecurity(tls_ca=pki["ca.pem"], tls_cert=files["client.pem"],
                                                   tls_key=files["client.key"]), check_every_s=0)
    with caplog.at_level(logging.WARNING, logger="retriever_server.security.client_files"):
        write_private(files["client.pem"], pki["other.pem"].read_bytes())  # the new certificate, the old key
        assert [watched.refresh() for _ in range(3)] == [False] * 3
        assert len(caplog.records) == 1 and "cannot be used yet" in caplog.records[0].getMessage()
        write_private(files["client.pem"], pki["server.pem"].read_bytes())  # another change, still no match
        assert not watched.refresh() and not watched.refresh()
        assert len(caplog.records) == 2
        write_private(files["client.key"], pki["server.key"].read_bytes())
        assert watched.refresh()


def replaced_after_first_read(monkeypatch, module, path: Path, content: bytes) -> None:
    """`module.read_token_file` replaces `path` with `content` right after its first read: a rotation
    that lands between a reader's read and its stamp of the file."""
    real = module.read_token_file
    calls = []

    def read_then_replace(*args, **kwargs):
        tokens = real(*args, **kwargs)
        if not calls:
            calls.append(1)
            write_private(path, content)
        return tokens

    monkeypatch.setattr(module, "read_token_file", read_then_replace)


def test_a_token_file_replaced_while_a_server_reads_it_is_read_again(tmp_path, monkeypatch):
    path = write_private(tmp_path / "tokens", b"token-old\n")
    replaced_after_first_read(monkeypatch, auth, path, b"token-new\n")
    tokens = TokenSet(path)
    monkeypatch.setattr(auth, "CHECK_EVERY_S", 0.0)
    assert tokens.accepts("Bearer token-new") and not tokens.accepts("Bearer token-old")


def test_a_token_file_replaced_while_a_client_reads_it_is_read_again(tmp_path, monkeypatch):
    path = write_private(tmp_path / "tokens", b"token-old\n")
    replaced_after_first_read(monkeypatch, client_files, path, b"token-new\n")
    watched = WatchedClientSecurity(ClientSecurity(token_file=path), check_every_s=0)
    assert watched.metadata == bearer_metadata("token-old")
    watched.refresh()
    assert watched.metadata == bearer_metadata("token-new")
