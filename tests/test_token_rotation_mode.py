"""Token files that other users can read are named in a warning whenever they are read: a server's at
start and after every rotation (a change or SIGHUP), a client's at start and after every change."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest

from retriever_server.security import auth
from retriever_server.security.auth import TokenSet, bearer_metadata
from retriever_server.security.certs import write_private
from retriever_server.security.client_files import WatchedClientSecurity
from retriever_server.security.config import ClientSecurity


def replace_shared(path: Path, data: bytes) -> None:
    """Replaces `path` whole with a file of `data` that other users can read (mode 644)."""
    new = path.with_name(path.name + ".new")
    new.write_bytes(data)
    new.chmod(0o644)
    os.replace(new, path)


def warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]


def shared_warning(path: Path) -> str:
    return f"the token file {path} can be read by other users (mode 644): `chmod 600` it"


def test_a_server_token_file_replaced_by_one_others_can_read_is_named_on_reload(tmp_path, caplog):
    path = write_private(tmp_path / "tokens", b"token-old\n")
    tokens = TokenSet(path)
    replace_shared(path, b"token-new\n")
    with caplog.at_level(logging.WARNING):
        tokens.reload()
    assert tokens.accepts("Bearer token-new")
    assert warnings(caplog) == [shared_warning(path)]


def test_a_server_token_file_replaced_by_one_others_can_read_is_named_when_read_again(tmp_path, caplog,
                                                                                      monkeypatch):
    path = write_private(tmp_path / "tokens", b"token-old\n")
    tokens = TokenSet(path)
    monkeypatch.setattr(auth, "CHECK_EVERY_S", 0.0)
    replace_shared(path, b"token-new\n")
    with caplog.at_level(logging.WARNING):
        assert tokens.accepts("Bearer token-new")
        write_private(path, b"token-newer\n")
        assert tokens.accepts("Bearer token-newer")
    assert warnings(caplog) == [shared_warning(path)]  # the private file that came after it is not named


def test_a_client_token_file_others_can_read_is_named_at_start_and_after_a_change(tmp_path, caplog):
    path = tmp_path / "tokens"
    replace_shared(path, b"token-old\n")
    with caplog.at_level(logging.WARNING):
        watched = WatchedClientSecurity(ClientSecurity(token_file=path), check_every_s=0)
        assert watched.metadata == bearer_metadata("token-old")
        assert warnings(caplog) == [shared_warning(path)]
        write_private(path, b"token-private\n")
        watched.refresh()
        assert len(warnings(caplog)) == 1
        replace_shared(path, b"token-new\n")
        watched.refresh()
    assert watched.metadata == bearer_metadata("token-new")
    assert warnings(caplog) == [shared_warning(path)] * 2
