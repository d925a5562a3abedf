"""TLS, mutual TLS and bearer tokens on real servers on loopback: accepted with the right credentials,
refused with UNAUTHENTICATED or at the handshake otherwise; health open; tokens and certificates
rotated without a restart; a non-loopback port refused without TLS and a token."""

from __future__ import annotations

import dataclasses
import logging
import os
import stat
import threading
import time
from pathlib import Path

import grpc
import pytest
from conftest import build, serve, synthetic
from grpc_health.v1 import health_pb2, health_pb2_grpc

from retriever_server.client import RetrieverClient, RetrieverError
from retriever_server.cluster.launcher import NO_DRAIN, LocalDeployment
from retriever_server.security.certs import make_ca, make_leaf, write_private
from retriever_server.security.config import TOKEN_ENV, ClientSecurity, SecurityError, ServerSecurity
from retriever_server.serving.shard_server import ShardServerConfig, start_shard_server

pytestmark = pytest.mark.ray
N, D = 2000, 8
HOSTS = ["127.0.0.1", "localhost"]


@pytest.fixture(scope="module")
def keys():
    return synthetic(N, D, seed=5)


@pytest.fixture(scope="module")
def datastore(ray_cluster, keys, tmp_path_factory):
    return build(tmp_path_factory.mktemp("secure"), keys, "ds", shards=2, factory="IVF8,Flat")


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> dict[str, Path]:
    """A CA with a server and a client certificate, and a second CA with its own client certificate."""
    tmp = tmp_path_factory.mktemp("pki")
    ca, other = make_ca("test CA"), make_ca("another CA")
    files = {}
    for name, pair in (("ca", ca), ("other-ca", other), ("server", make_leaf(ca, "server", HOSTS)),
                       ("client", make_leaf(ca, "client", [])), ("stranger", make_leaf(other, "stranger", []))):
        files[f"{name}.pem"] = write_private(tmp / f"{name}.pem", pair.cert_pem)
        files[f"{name}.key"] = write_private(tmp / f"{name}.key", pair.key_pem)
    files["tokens"] = write_private(tmp / "tokens", b"  first-secret-token \n\nsecond-token\n")
    return files


def code_of(call) -> grpc.StatusCode | None:
    try:
        call()
    except RetrieverError as err:
        return err.code
    return None


def health(address: str, security: ClientSecurity = ClientSecurity()) -> str:
    from retriever_server.security.tls import open_channel

    with open_channel(address, security, []) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)


def test_tokens_accepted_refused_and_health_open(aio, datastore, keys, pki, monkeypatch):
    security = ServerSecurity(token_file=pki["tokens"])
    hop = ClientSecurity(token_file=pki["tokens"])
    with serve(aio, datastore, 2, security=security, shard_client=hop) as served:
        for token in ("first-secret-token", "second-token"):  # either line of the file, whitespace ignored
            with RetrieverClient(served.address, security=ClientSecurity(token=token)) as client:
                assert client.search(keys[:3], k=4).ids.shape == (3, 4)
        for token in (None, "wrong", "first-secret-token-and-more", "first-secret"):
            with RetrieverClient(served.address, security=ClientSecurity(token=token)) as client:
                with pytest.raises(RetrieverError) as caught:
                    client.search(keys[:3], k=4)
                assert caught.value.code == grpc.StatusCode.UNAUTHENTICATED, token
                assert "Bearer" in caught.value.message and "first-secret" not in caught.value.message
                assert str(caught.value).startswith("UNAUTHENTICATED: this server needs")  # the code said once
                assert code_of(client.info) == grpc.StatusCode.UNAUTHENTICATED
        monkeypatch.setenv(TOKEN_ENV, "second-token")  # a client's default: the environment's token
        with RetrieverClient(served.address) as client:
            assert client.info().ntotal == N
        assert health(served.address) == "SERVING"  # probes carry no token


def test_a_call_without_a_token_is_refused_before_its_request_is_read(aio, datastore, pki):
    """The refusal reads nothing of the request: a caller without a token that never finishes sending
    one (or sends hundreds of MiB) is refused at once, not held in a call slot until its body comes."""
    gate = threading.Event()

    def never_finished():  # the request's bytes, held back until the test ends
        gate.wait(20)
        yield b""

    with serve(aio, datastore, 2, security=ServerSecurity(token_file=pki["tokens"]),
               shard_client=ClientSecurity(token_file=pki["tokens"])) as served, \
            grpc.insecure_channel(served.address) as channel:
        for method in ("Search", "GetInfo"):
            call = channel.stream_unary(f"/retrieval.v1.Retriever/{method}")
            with pytest.raises(grpc.RpcError) as refused:
                call(never_finished(), timeout=10)
            assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED, method
        gate.set()


def test_the_servers_serve_starts_do_not_inherit_the_callers_token(monkeypatch):
    """`serve`'s children authenticate with their own files; the caller's RETRIEVER_AUTH_TOKEN stays out of
    their environment, which is readable while they run."""
    from retriever_server.cluster.supervisor import PARENT_ENV, child_environment

    monkeypatch.setenv(TOKEN_ENV, "callers-secret")
    environment = child_environment()
    assert TOKEN_ENV not in environment and "callers-secret" not in environment.values()
    assert environment[PARENT_ENV] == str(os.getpid()) and environment["PATH"] == os.environ["PATH"]


def test_tls_and_mutual_tls(aio, datastore, keys, pki):
    tls = ServerSecurity(tls_cert=pki["server.pem"], tls_key=pki["server.key"])
    mutual = ServerSecurity(tls_cert=pki["server.pem"], tls_key=pki["server.key"], tls_ca=pki["ca.pem"])
    trusting = ClientSecurity(tls_ca=pki["ca.pem"])
    with_cert = ClientSecurity(tls_ca=pki["ca.pem"], tls_cert=pki["client.pem"], tls_key=pki["client.key"])
    stranger = ClientSecurity(tls_ca=pki["ca.pem"], tls_cert=pki["stranger.pem"], tls_key=pki["stranger.key"])
    wrong_ca = ClientSecurity(tls_ca=pki["other-ca.pem"])
    with serve(aio, datastore, 2, security=tls, shard_client=trusting) as served:
        with RetrieverClient(served.address, security=trusting, timeout=5) as client:
            assert client.search(keys[:2], k=3).ids.shape == (2, 3)
        for refused in (ClientSecurity(), wrong_ca):  # plaintext, or a server certificate it cannot verify
            with RetrieverClient(served.address, security=refused, timeout=5) as client:
                assert code_of(lambda c=client: c.search(keys[:2], k=3)) == grpc.StatusCode.UNAVAILABLE
    with serve(aio, datastore, 2, security=mutual, shard_client=with_cert) as served:
        with RetrieverClient(served.address, security=with_cert, timeout=5) as client:
            assert client.search(keys[:2], k=3).ids.shape == (2, 3)
        for refused in (trusting, stranger):  # no client certificate, or one of another CA
            with RetrieverClient(served.address, security=refused, timeout=5) as client:
                assert code_of(lambda c=client: c.search(keys[:2], k=3)) == grpc.StatusCode.UNAVAILABLE


def test_a_failed_handshake_is_one_line_of_the_cli(aio, datastore, pki, monkeypatch):
    """`info` with a CA that did not sign the server's certificate: the command's one error line, without
    gRPC's own log line about the handshake."""
    import subprocess
    import sys

    monkeypatch.delenv("GRPC_VERBOSITY", raising=False)
    security = ServerSecurity(tls_cert=pki["server.pem"], tls_key=pki["server.key"])
    running = aio.run(start_shard_server(ShardServerConfig(datastore, 0, metrics_port=None, security=security)))
    try:
        done = subprocess.run([sys.executable, "-m", "retriever_server.cli", "info", running.address, "--tls-ca",
                               str(pki["other-ca.pem"])], capture_output=True, text=True, timeout=60)
    finally:
        aio.run(running.drain(grace=0))
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert done.returncode == 1 and len(lines) == 1, done.stderr
    assert lines[0].startswith("retriever-server info: error: UNAVAILABLE") and "handshake" in lines[0].lower()


def test_tokens_and_certificates_rotate_without_a_restart(aio, datastore, keys, pki, tmp_path):
    tokens = write_private(tmp_path / "tokens", b"old-token\n")
    cert, key = tmp_path / "server.pem", tmp_path / "server.key"
    cert.write_bytes(pki["server.pem"].read_bytes())
    key.write_bytes(pki["server.key"].read_bytes())
    security = ServerSecurity(tls_cert=cert, tls_key=key, token_file=tokens)
    running = aio.run(start_shard_server(ShardServerConfig(datastore, 0, metrics_port=None, security=security)))
    try:
        old = ClientSecurity(tls_ca=pki["ca.pem"], token="old-token")
        new = ClientSecurity(tls_ca=pki["ca.pem"], token="new-token")
        with RetrieverClient(running.address, security=old, timeout=5) as client:
            assert client.info().ntotal == N // 2
        tokens.write_text("old-token\nnew-token\n")  # both accepted while clients move over
        running.reload_security()  # SIGHUP
        with RetrieverClient(running.address, security=new, timeout=5) as client:
            assert client.info().ntotal == N // 2
        tokens.write_text("new-token\n")  # noticed by itself, within a second
        deadline = time.monotonic() + 5
        with RetrieverClient(running.address, security=old, timeout=5) as client:
            while code_of(client.info) is None and time.monotonic() < deadline:
                time.sleep(0.2)  # polling, with a deadline
            assert code_of(client.info) == grpc.StatusCode.UNAUTHENTICATED
        ca2 = make_ca("the next CA")
        pair = make_leaf(ca2, "server", HOSTS)
        key.write_bytes(pair.key_pem)
        cert.write_bytes(pair.cert_pem)  # the new certificate serves new connections, no restart
        (tmp_path / "ca2.pem").write_bytes(ca2.cert_pem)
        with RetrieverClient(running.address, security=ClientSecurity(tls_ca=tmp_path / "ca2.pem", token="new-token"),
                             timeout=5) as client:
            assert client.info().ntotal == N // 2
    finally:
        aio.run(running.drain(grace=0))


def wait_until(check, seconds: float = 5.0) -> bool:
    """Polls `check` every 0.2 s until it holds or `seconds` pass; whether it held."""
    deadline = time.monotonic() + seconds
    while not check():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)
    return True


def test_a_router_takes_up_a_rotated_token_and_a_renewed_client_certificate(aio, datastore, keys, pki, tmp_path):
    """The router reads the token file it shares with its shards again, and opens new channels when its
    client certificate is renewed: a rotation the shards took up does not cut the router off from them."""
    tokens = write_private(tmp_path / "tokens", b"old-token\n")
    client_ca, cert, key = tmp_path / "client-ca.pem", tmp_path / "router.pem", tmp_path / "router.key"
    client_ca.write_bytes(pki["ca.pem"].read_bytes())
    cert.write_bytes(pki["client.pem"].read_bytes())
    key.write_bytes(pki["client.key"].read_bytes())
    shards = ServerSecurity(tls_cert=pki["server.pem"], tls_key=pki["server.key"], tls_ca=client_ca,
                            token_file=tokens)
    hops = ClientSecurity(tls_ca=pki["ca.pem"], tls_cert=cert, tls_key=key, token_file=tokens)
    public = ClientSecurity(tls_ca=pki["ca.pem"], tls_cert=pki["client.pem"], tls_key=pki["client.key"])
    with serve(aio, datastore, 2, security=shards, shard_client=hops) as served:
        def search_with(token: str) -> grpc.StatusCode | None:
            with RetrieverClient(served.address, security=dataclasses.replace(public, token=token),
                                 timeout=5) as client:
                return code_of(lambda: client.search(keys[:3], k=4))
        assert search_with("old-token") is None
        tokens.write_text("old-token\nnew-token\n")  # every server accepts both
        tokens.write_text("new-token\nold-token\n")  # the router sends the first: it moves over
        tokens.write_text("new-token\n")  # the old one is gone from every server
        assert wait_until(lambda: search_with("old-token") == grpc.StatusCode.UNAUTHENTICATED)
        assert wait_until(lambda: search_with("new-token") is None)  # the router sends the new one

        ca2 = make_ca("the next client CA")  # the shards trust client certificates of a new CA alone...
        renewed = make_leaf(ca2, "router", [])
        key.write_bytes(renewed.key_pem)
        cert.write_bytes(renewed.cert_pem)  # ...and the router's certificate is renewed by it
        client_ca.write_bytes(ca2.cert_pem)
        public = ClientSecurity(tls_ca=pki["ca.pem"], tls_cert=cert, tls_key=key)
        shard = served.shards[0][0]
        port = shard.port
        aio.run(shard.drain(grace=0))  # a shard restarts: the router connects to it again
        served.shards[0][0] = aio.run(start_shard_server(ShardServerConfig(datastore, 0, port=port, metrics_port=None,
                                                                           security=shards)))
        assert wait_until(lambda: search_with("new-token") is None, seconds=10)


def test_a_shard_refusing_the_routers_token_is_unavailable_not_the_callers_fault(aio, datastore, keys, pki, tmp_path):
    """The shards stop accepting the router's own token while the caller's is sound: the caller gets
    UNAVAILABLE naming the shard and the router's flags, never UNAUTHENTICATED (which would tell it to fix
    a token that is fine)."""
    tokens = write_private(tmp_path / "tokens", b"caller-token\nrouter-token\n")  # every server's
    router_token = write_private(tmp_path / "router-token", b"router-token\n")  # the router's, to its shards
    servers = ServerSecurity(tls_cert=pki["server.pem"], tls_key=pki["server.key"], token_file=tokens)
    hops = ClientSecurity(tls_ca=pki["ca.pem"], token_file=router_token)
    caller = ClientSecurity(tls_ca=pki["ca.pem"], token="caller-token")
    with serve(aio, datastore, 2, security=servers, shard_client=hops) as served, \
            RetrieverClient(served.address, security=caller, timeout=5) as client:
        assert client.search(keys[:3], k=4).ids.shape == (3, 4)
        tokens.write_text("caller-token\n")  # the router's token is no longer any shard's
        assert wait_until(lambda: code_of(lambda: client.search(keys[:3], k=4)) == grpc.StatusCode.UNAVAILABLE)
        with pytest.raises(RetrieverError) as refused:
            client.search(keys[:3], k=4)
    assert "refused the router's credentials (UNAUTHENTICATED)" in str(refused.value)
    assert "--shard-auth-token-file" in str(refused.value) and "shard-0000" in str(refused.value)


@pytest.mark.parametrize("fan_out", [False, True], ids=["one-address", "fan-out"])
def test_a_client_takes_up_a_renewed_certificate_on_new_channels(aio, datastore, keys, pki, tmp_path, fan_out):
    """A long-lived client (an evaluation job) whose certificate is renewed by a new CA, which the shards
    trust alone once they restart: the client connects again with the renewed certificate, not the one
    it read when it was made."""
    client_ca, cert, key = tmp_path / "client-ca.pem", tmp_path / "client.pem", tmp_path / "client.key"
    client_ca.write_bytes(pki["ca.pem"].read_bytes())
    cert.write_bytes(pki["client.pem"].read_bytes())
    key.write_bytes(pki["client.key"].read_bytes())
    security = ServerSecurity(tls_cert=pki["server.pem"], tls_key=pki["server.key"], tls_ca=client_ca)
    shards = [aio.run(start_shard_server(ShardServerConfig(datastore, s, metrics_port=None, security=security)))
              for s in (0, 1)]
    target = [r.address for r in shards] if fan_out else shards[0].address
    try:
        with RetrieverClient(target, security=ClientSecurity(tls_ca=pki["ca.pem"], tls_cert=cert, tls_key=key),
                             timeout=5) as client:
            assert client.search(keys[:3], k=4).ids.shape == (3, 4)
            ca2 = make_ca("the next client CA")
            renewed = make_leaf(ca2, "client", [])
            key.write_bytes(renewed.key_pem)
            cert.write_bytes(renewed.cert_pem)
            client_ca.write_bytes(ca2.cert_pem)
            for s, running in enumerate(shards):  # the shards restart: the client connects again
                aio.run(running.drain(grace=0))
                shards[s] = aio.run(start_shard_server(ShardServerConfig(datastore, s, port=running.port,
                                                                         metrics_port=None, security=security)))
            assert wait_until(lambda: code_of(lambda: client.search(keys[:3], k=4)) is None, seconds=10)
    finally:
        for running in shards:
            aio.run(running.drain(grace=0))


def test_a_client_keeps_its_connections_when_the_changed_tls_files_cannot_be_opened(aio, datastore, keys, pki,
                                                                                     tmp_path, monkeypatch, caplog):
    """TLS files rewritten again between the check and the opening of new channels: the client's calls go
    on over the channels it has, and it says why, instead of failing the call."""
    import logging

    from retriever_server.serving import client as client_module

    cert, key = tmp_path / "client.pem", tmp_path / "client.key"
    cert.write_bytes(pki["client.pem"].read_bytes())
    key.write_bytes(pki["client.key"].read_bytes())
    security = ServerSecurity(tls_cert=pki["server.pem"], tls_key=pki["server.key"], tls_ca=pki["ca.pem"])
    running = aio.run(start_shard_server(ShardServerConfig(datastore, 0, metrics_port=None, security=security)))
    try:
        with RetrieverClient(running.address, security=ClientSecurity(tls_ca=pki["ca.pem"], tls_cert=cert,
                                                                      tls_key=key), timeout=5) as client:
            assert client.search(keys[:3], k=4).ids.shape == (3, 4)
            renewed = make_leaf(make_ca("another CA"), "client", [])
            key.write_bytes(renewed.key_pem)
            cert.write_bytes(renewed.cert_pem)

            def half_written(*args, **kwargs):
                raise OSError("the certificate is being written")

            monkeypatch.setattr(client_module, "open_channel", half_written)
            def searched() -> bool:  # a search answers (it checks the files first, at most once a second)
                assert client.search(keys[:3], k=4).ids.shape == (3, 4)
                return "keeping the current connections" in caplog.text

            with caplog.at_level(logging.WARNING, logger="retriever_server.serving.client"):
                assert wait_until(searched)
    finally:
        aio.run(running.drain(grace=0))


def test_a_client_sends_the_token_its_file_holds_now(aio, datastore, pki, tmp_path):
    accepted = write_private(tmp_path / "accepted", b"old-token\nnew-token\n")
    mine = write_private(tmp_path / "mine", b"old-token\n")
    running = aio.run(start_shard_server(ShardServerConfig(datastore, 0, metrics_port=None,
                                                           security=ServerSecurity(token_file=accepted))))
    try:
        with RetrieverClient(running.address, security=ClientSecurity(token_file=mine), timeout=5) as client:
            assert client.info().ntotal == N // 2
            mine.write_text("new-token\n")  # the client moves over, without a restart
            accepted.write_text("new-token\n")
            assert wait_until(lambda: code_of(client.info) is None and client.metadata[0][1] == "Bearer new-token")
    finally:
        aio.run(running.drain(grace=0))


def test_watched_client_files_keep_what_works_until_the_change_is_whole(pki, tmp_path):
    from retriever_server.security.client_files import WatchedClientSecurity

    tokens = write_private(tmp_path / "tokens", b"first\nsecond\n")
    cert, key = tmp_path / "c.pem", tmp_path / "c.key"
    cert.write_bytes(pki["client.pem"].read_bytes())
    key.write_bytes(pki["client.key"].read_bytes())
    watched = WatchedClientSecurity(ClientSecurity(tls_ca=pki["ca.pem"], tls_cert=cert, tls_key=key,
                                                   token_file=tokens), check_every_s=0.0)
    assert watched.metadata == (("authorization", "Bearer first"),)
    assert watched.refresh() is False  # nothing changed
    tokens.write_text("")  # emptied while being rewritten: the token read before stays
    assert watched.refresh() is False and watched.metadata == (("authorization", "Bearer first"),)
    tokens.write_text("second\n")
    assert watched.refresh() is False and watched.metadata == (("authorization", "Bearer second"),)
    renewed = make_leaf(make_ca("next"), "client", [])
    cert.write_bytes(renewed.cert_pem)  # the key is not written yet: a pair that does not match
    assert watched.refresh() is False
    key.write_bytes(renewed.key_pem)
    assert watched.refresh() is True  # whole now: new channels
    assert watched.refresh() is False  # once
    slow = WatchedClientSecurity(ClientSecurity(token_file=tokens))  # checks at most once a second
    tokens.write_text("third\n")
    assert slow.refresh() is False and slow.metadata == (("authorization", "Bearer second"),)


def test_bad_tls_files_are_named_before_anything_binds(aio, datastore, pki):
    """A certificate and key swapped, or a key of another certificate, or a CA file without a
    certificate: a SecurityError naming the files, not gRPC's failed bind or failed handshakes."""
    import subprocess
    import sys

    swapped = ServerSecurity(tls_cert=pki["server.key"], tls_key=pki["server.pem"])
    mismatched = ServerSecurity(tls_cert=pki["server.pem"], tls_key=pki["client.key"])
    for security in (swapped, mismatched):
        with pytest.raises(SecurityError, match="are not a PEM certificate and its unencrypted private key"):
            aio.run(start_shard_server(ShardServerConfig(datastore, 0, metrics_port=None, security=security)))
    for target in ("127.0.0.1:1", ["127.0.0.1:1", "127.0.0.1:2"]):  # one channel; the fan-out's loop
        with pytest.raises(SecurityError, match=r"--tls-ca .*ca.key holds no PEM certificate"):
            RetrieverClient(target, security=ClientSecurity(tls_ca=pki["ca.key"]))
    done = subprocess.run([sys.executable, "-m", "retriever_server.cli", "router", "--shards", "127.0.0.1:1",
                           "--tls-cert", str(pki["server.key"]), "--tls-key", str(pki["server.pem"])],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 1 and "Traceback" not in done.stderr and "could not bind" not in done.stderr
    assert f"--tls-cert {pki['server.key']} and --tls-key {pki['server.pem']} are not a PEM" in done.stderr
    hop = subprocess.run([sys.executable, "-m", "retriever_server.cli", "router", "--shards", "127.0.0.1:1",
                          "--shard-tls-ca", str(pki["ca.key"])], capture_output=True, text=True, timeout=60)
    assert hop.returncode == 1 and f"--shard-tls-ca {pki['ca.key']} holds no PEM certificate" in hop.stderr


def test_tls_files_are_checked_for_their_form_not_this_machines_key_size_policy(tmp_path):
    """A 1024-bit RSA pair, which gRPC serves, passes the check (this OpenSSL's default security
    level would refuse its size); a key of another certificate still does not."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import rsa
    from cryptography.x509.oid import NameOID

    from retriever_server.security.tls import check_pem

    def pair(name: str) -> tuple[Path, Path]:
        key = rsa.generate_private_key(public_exponent=65537, key_size=1024)
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        now = datetime.datetime.now(datetime.timezone.utc)
        cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
                .serial_number(1).not_valid_before(now).not_valid_after(now + datetime.timedelta(days=1))
                .sign(key, hashes.SHA256()))
        key_file, cert_file = tmp_path / f"{name}.key", tmp_path / f"{name}.pem"
        key_file.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                               serialization.NoEncryption()))
        cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        return cert_file, key_file

    (cert, key), (_, other_key) = pair("small"), pair("other")
    check_pem(cert, key, cert)
    with pytest.raises(SecurityError, match="are not a PEM certificate and its unencrypted private key"):
        check_pem(cert, other_key, None)


def test_a_non_loopback_port_needs_tls_and_a_token(pki):
    with pytest.raises(SecurityError, match="without TLS .* and a token"):
        ServerSecurity().check("0.0.0.0")
    with pytest.raises(SecurityError, match="without a token"):
        ServerSecurity(tls_cert=pki["server.pem"], tls_key=pki["server.key"]).check("10.1.2.3")
    ServerSecurity(tls_cert=pki["server.pem"], tls_key=pki["server.key"], token_file=pki["tokens"]).check("0.0.0.0")
    ServerSecurity(insecure=True).check("0.0.0.0")
    ServerSecurity().check("127.0.0.1")
    with pytest.raises(SecurityError, match="go together"):
        ServerSecurity(tls_cert=pki["server.pem"]).check("127.0.0.1")
    assert "s3cret" not in repr(ClientSecurity(token="s3cret")) and "token=***" in repr(ClientSecurity(token="s3cret"))
    for host in ("127.0.0.1", "127.8.9.10", "::1", "[::1]", "localhost"):
        ServerSecurity().check(host)
    for name in ("127.attacker.example", "127.0.0.1.nip.io", "ip6-localhost"):  # names that may resolve anywhere
        with pytest.raises(SecurityError, match="without TLS .* and a token"):
            ServerSecurity().check(name)


def test_a_client_sends_no_token_in_plaintext_off_loopback_unless_told_to(aio, datastore, pki, monkeypatch):
    """A token over plaintext to an address that is not loopback is refused where a channel would open:
    a client, a fan-out client, a router's calls to its shards, the CLI (one line). TLS, loopback, no
    token, or `plaintext_token` pass; no connection is made to the documentation address dialled."""
    from retriever_server.serving.router import RouterConfig, start_router

    far = "192.0.2.77:7000"  # TEST-NET-1: never routed
    token = ClientSecurity(token="s3cret")
    for target in (far, [[far]], [["127.0.0.1:7000"], [f"ipv4:{far}"]], f"dns:///{far}"):
        with pytest.raises(SecurityError, match="refusing to send the bearer token .*without TLS") as refused:
            RetrieverClient(target, security=token)
        assert "s3cret" not in str(refused.value)
    RetrieverClient(far, security=dataclasses.replace(token, plaintext_token=True)).close()
    RetrieverClient(far, security=ClientSecurity(tls_ca=pki["ca.pem"], token="s3cret")).close()
    RetrieverClient(far).close()  # no token to send
    RetrieverClient("127.0.0.1:7000", security=token).close()
    monkeypatch.setenv(TOKEN_ENV, "s3cret")
    with pytest.raises(SecurityError, match=TOKEN_ENV):
        RetrieverClient([[far]])
    with pytest.raises(SecurityError, match="--shard-auth-token-file"):
        aio.run(start_router(RouterConfig(((far,),), metrics_port=None, shard_security=ClientSecurity(
            token_file=pki["tokens"], flags="shard-"))))
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "retriever_server.cli", "info", far], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 1 and "Traceback" not in done.stderr and "s3cret" not in done.stderr
    assert "--allow-plaintext-token on a network you trust" in done.stderr


def test_actor_secrets_arrive_as_private_files():
    import shutil

    from retriever_server.cluster.ray_secrets import materialize, pack

    folder = materialize(pack({"shard.key": b"-----BEGIN PRIVATE KEY-----", "../hop-token": b"t0k3n"}))
    try:
        assert oct(folder.stat().st_mode)[-3:] == "700"
        assert {f.name: (f.read_bytes(), oct(f.stat().st_mode)[-3:]) for f in folder.iterdir()} == {
            "shard.key": (b"-----BEGIN PRIVATE KEY-----", "600"), "hop-token": (b"t0k3n", "600")}
        assert materialize(pack({})) is None and materialize(None) is None
    finally:
        shutil.rmtree(folder)


def test_a_deployments_own_hop_credentials_leave_no_folder_behind(pki, tmp_path, monkeypatch):
    """The hops' CA, certificates and token are made in a folder, read into the actors' secrets, and the
    folder removed: only the actors' private copies remain while they run."""
    import tempfile

    from retriever_server.cluster.ray_security import plan_security

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    users = ServerSecurity(tls_cert=pki["server.pem"], tls_key=pki["server.key"], token_file=pki["tokens"])
    plan = plan_security("127.0.0.1", users, None)
    assert {"hop-token", "shard.key"} <= set(plan.shard_secrets) and "public-tls_key" in plan.router_secrets
    assert list(tmp_path.iterdir()) == []
    from retriever_server.cluster import ray_security

    def unreadable(files):  # a file gone between the check and the read
        raise OSError(2, "No such file or directory", "router.key")

    monkeypatch.setattr(ray_security, "read_files", unreadable)
    with pytest.raises(OSError):
        plan_security("127.0.0.1", users, None)
    assert list(tmp_path.iterdir()) == []  # no CA, keys or tokens left behind
    with pytest.raises(SecurityError, match="--tls-cert"):  # the user's files checked before anything is made
        plan_security("127.0.0.1", dataclasses.replace(users, tls_cert=tmp_path / "nothere.pem"), None)
    assert list(tmp_path.iterdir()) == []


def test_deploy_names_a_missing_tls_file_before_it_starts_anything(datastore, pki, tmp_path):
    import os
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "retriever_server.cli", "deploy", "--datastore", str(datastore),
                           "--tls-cert", str(tmp_path / "nothere.pem"), "--tls-key", str(pki["server.key"]),
                           "--auth-token-file", str(pki["tokens"])], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "TMPDIR": str(tmp_path), "RAY_ADDRESS": ""})
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert "--tls-cert" in done.stderr and "nothere.pem" in done.stderr
    assert not list(tmp_path.glob("retriever-hops-*")) and not list(tmp_path.glob("ray*"))  # nor a Ray cluster


def test_an_insecure_ray_deployment_serves_its_shards_on_node_ips_too():
    """`deploy --insecure` (a network you trust): every server, shards included, may bind a node's IP
    without TLS or a token; without it, none may."""
    from retriever_server.cluster.ray_security import plan_security

    plan = plan_security(None, ServerSecurity(insecure=True), None)
    for server in (plan.shard, plan.router):
        server.check("192.0.2.7")  # does not raise
    with pytest.raises(SecurityError, match="without TLS"):
        plan_security(None, ServerSecurity(), None)


def test_a_deployment_that_secures_its_router_gives_clients_a_token_the_shards_refuse(tmp_path):
    """`secrets_dir`: the clients' token (what `client_security` names, and the router's port takes) is not
    the hops' token (what the shards take), so a client of the router cannot call a shard."""
    import base64

    from retriever_server.cluster.ray_security import plan_security

    plan = plan_security("127.0.0.1", ServerSecurity(), tmp_path / "own")
    clients = plan.client.token_file.read_bytes()
    hops = base64.b64decode(plan.shard_secrets["hop-token"])
    assert clients.strip() and hops.strip() and clients != hops
    assert base64.b64decode(plan.router_secrets["public-token_file"]) == clients  # the router's port takes it
    assert base64.b64decode(plan.router_secrets["hop-token"]) == hops  # and sends the hops' to the shards
    assert plan.shard_secrets["hop-token"] == plan.router_secrets["hop-token"]
    assert plan.client.tls_cert is None  # no certificate: the shards' mutual TLS refuses it too


def test_private_files_are_made_private_even_when_they_existed(tmp_path):
    path = tmp_path / "server.key"
    path.write_text("old")
    path.chmod(0o644)
    write_private(path, b"-----BEGIN PRIVATE KEY-----")
    assert path.stat().st_mode & 0o777 == 0o600 and path.read_bytes() == b"-----BEGIN PRIVATE KEY-----"


def test_serve_secures_its_own_hops(datastore, keys, pki, tmp_path):
    """`serve --tls-cert --tls-key --auth-token-file` alone: the router presents the user's certificate,
    the shards only answer the router's certificate from the deployment's own CA, with its own token."""
    security = ServerSecurity(tls_cert=pki["server.pem"], tls_key=pki["server.key"], token_file=pki["tokens"])
    with LocalDeployment(datastore, security=security, extra_args=NO_DRAIN, router_args=NO_DRAIN) as deployment:
        user = ClientSecurity(tls_ca=pki["ca.pem"], token="second-token")
        with RetrieverClient(deployment.router_address, security=user, timeout=10) as client:
            result = client.search(keys[:5], k=3)
        assert (result.ids >= 0).all() and not result.partial
        shard = deployment.shard_addresses[0][0]
        assert deployment.hops is not None and oct(deployment.hops.token.stat().st_mode)[-3:] == "600"
        for outsider in (ClientSecurity(), user, ClientSecurity(tls_ca=deployment.hops.ca, token="second-token",
                                                                server_name="retriever-shard.internal")):
            with RetrieverClient(shard, security=outsider, timeout=5) as client:
                assert code_of(client.info) in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.UNAUTHENTICATED)
        with RetrieverClient(shard, security=deployment.hops.client(), timeout=5) as client:
            assert client.info().ntotal == N // 2


def test_a_deployment_that_fails_to_start_keeps_its_logs_but_not_its_hop_keys(datastore, pki):
    """The router cannot bind a taken port: the deployment stops, its logs stay for the user to read,
    and the CA, keys and token of its hops are gone."""
    import shutil
    import socket

    from retriever_server.cluster.launcher import LaunchError

    security = ServerSecurity(tls_cert=pki["server.pem"], tls_key=pki["server.key"], token_file=pki["tokens"])
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        deployment = LocalDeployment(datastore, security=security, router_port=taken.getsockname()[1],
                                     restart=False, startup_timeout_s=60)
        with pytest.raises(LaunchError, match="router exited"):
            deployment.start()
    assert deployment.log_dir.is_dir() and (deployment.log_dir / "router.log").is_file()
    assert deployment.hops is not None and not deployment.hops.token.parent.exists()
    left = sorted(p.name for p in deployment.log_dir.rglob("*"))
    assert not any(name.endswith(".key") or name == "hop-token" for name in left), left
    shutil.rmtree(deployment.log_dir)


def test_cli_refuses_a_public_port_in_one_line(datastore):
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "retriever_server.cli", "serve", "--datastore", str(datastore),
                           "--shard", "0", "--host", "0.0.0.0"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert "refusing to serve 0.0.0.0 without TLS (--tls-cert, --tls-key) and a token" in done.stderr


def test_a_secret_file_others_can_read_is_named_in_a_warning(tmp_path, caplog):
    """A token file or key of this user that others can read is accepted, with a warning naming it; one
    for the owner alone, or of another owner (a Kubernetes Secret mounted for the pod), is not named."""
    from retriever_server.security.auth import TokenSet

    shared, private = write_private(tmp_path / "shared", b"a-token\n"), write_private(tmp_path / "private", b"t\n")
    shared.chmod(0o644)
    with caplog.at_level(logging.WARNING, logger="retriever_server.security.tls"):
        TokenSet(shared)
        TokenSet(private)
    warned = [r.getMessage() for r in caplog.records]
    assert warned == [f"the token file {shared} can be read by other users (mode 644): `chmod 600` it"]


def test_a_token_file_rewritten_in_place_with_its_old_times_is_read_again(tmp_path, monkeypatch):
    """A rotation that keeps the file's size and sets its modification time back (`cp -p`) still counts
    as a change: the file's change time moved."""
    import os

    from retriever_server.security import auth
    from retriever_server.security.auth import TokenSet

    path = write_private(tmp_path / "tokens", b"token-b\n")
    before = path.stat()
    tokens = TokenSet(path)
    time.sleep(0.01)
    path.write_bytes(b"token-c\n")  # the same size...
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))  # ...and modification time
    monkeypatch.setattr(auth, "CHECK_EVERY_S", 0.0)
    assert tokens.accepts("Bearer token-c") and not tokens.accepts("Bearer token-b")


@pytest.mark.parametrize("content, message", [
    (b"\xff\xfesecret\n", "the token file {}: line 1 is not a token: a token is printable ASCII"),
    (b"good\n\nsec\x01ret\n", "the token file {}: line 3 is not a token: a token is printable ASCII"),
    (b"good\ncaf\xc3\xa9\n", "the token file {}: line 2 is not a token: a token is printable ASCII"),
])
def test_a_token_file_that_no_header_can_carry_is_named_and_a_running_server_keeps_its_tokens(
        tmp_path, monkeypatch, caplog, content, message):
    """Bytes that are not printable ASCII: refused at start in one line naming the file (it used to be a
    bare UnicodeDecodeError), and a server whose file is rewritten so keeps the tokens read before (it used
    to fail the next call with UNKNOWN). The message never holds the token."""
    from retriever_server.security import auth
    from retriever_server.security.auth import TokenSet
    from retriever_server.security.config import read_tokens

    bad = write_private(tmp_path / "bad", content)
    with pytest.raises(SecurityError) as refused:
        read_tokens(bad)
    assert str(refused.value) == message.format(bad)
    path = write_private(tmp_path / "tokens", b"token-a\n")
    tokens = TokenSet(path)
    path.write_bytes(content)
    monkeypatch.setattr(auth, "CHECK_EVERY_S", 0.0)
    with caplog.at_level(logging.WARNING, logger="retriever_server.security.auth"):
        assert tokens.accepts("Bearer token-a")
    assert [r.getMessage() for r in caplog.records] == [message.format(path) + "; keeping the 1 tokens read before"]
    if content.startswith(b"good\n"):  # a client sends the first line: what follows it is not its business
        assert read_tokens(bad, first_only=True) == ["good"]
        assert ClientSecurity(token_file=bad).bearer_token() == "good"


def test_a_private_file_is_replaced_whole_and_an_old_reader_does_not_see_it(tmp_path):
    """write_private over a file others could read: its old readers keep the old bytes (it was truncated
    and written in place, so an open handle read the new key), the new file is 0600, nothing else is left."""
    path = tmp_path / "token"
    path.write_bytes(b"old-token\n")
    os.chmod(path, 0o644)
    with open(path, "rb") as reader:
        write_private(path, b"new-token\n")
        assert reader.read() == b"old-token\n"
    assert path.read_bytes() == b"new-token\n" and stat.S_IMODE(path.stat().st_mode) == 0o600
    assert [p.name for p in tmp_path.iterdir()] == ["token"]
