"""Secrets for a deployment's Ray actors, carried as an argument of each actor's constructor rather
than in files every node must see: the driver reads the certificates, keys and tokens, each actor
writes them into a folder of its own (0700, files 0600) when it starts, and its servers read them there.

Not in the actors' runtime environment: Ray's runtime-env agent logs every environment it creates,
variables included, in the session's logs, which every user of the node (and the dashboard) can read.
A constructor's arguments stay in Ray's object store; a restarted actor gets them again.

An actor removes its folder when it stops. One that is killed (a crash, `ray.kill`, its node's raylet
ending it) removes nothing, and Ray ends any process it could have left to do so; so each folder is
named after its actor's process, and `sweep` removes those whose process has ended: every actor does
when it starts, and a deployment's driver does on its own node when it stops or fails.

Example:
    >>> secrets = pack({"shard.pem": pem, "hop-token": b"..."})   # ShardReplica.remote(..., secrets)
    >>> folder = materialize(secrets)                               # in the actor: its own copies
"""

from __future__ import annotations

import base64
import os
import shutil
import tempfile
from dataclasses import fields, replace
from pathlib import Path

from retriever_server.cluster.reaper import alive
from retriever_server.security.certs import write_private

Secrets = dict[str, str]  # file name -> its content, base64
PREFIX = "retriever-secrets-"  # then the actor process's pid, "-", and mkdtemp's random part


def pack(files: dict[str, bytes]) -> Secrets | None:
    """`files` (name -> content) as an actor's constructor carries them; None for none."""
    return {name: base64.b64encode(data).decode() for name, data in files.items()} if files else None


def materialize(secrets: Secrets | None) -> Path | None:
    """In an actor: writes the files `secrets` carries into a new private folder and returns it; None
    when it carries none."""
    if not secrets:
        return None
    sweep()
    folder = Path(tempfile.mkdtemp(prefix=f"{PREFIX}{os.getpid()}-"))
    os.chmod(folder, 0o700)
    for name, data in secrets.items():
        write_private(folder / Path(name).name, base64.b64decode(data))
    return folder


def sweep(directory: Path | None = None) -> list[Path]:
    """Removes this user's folders of secrets (in `directory`, default the temp directory) whose actor's
    process has ended; returns them."""
    gone = []
    for folder in Path(directory or tempfile.gettempdir()).glob(f"{PREFIX}*-*"):
        pid = folder.name[len(PREFIX):].split("-", 1)[0]
        try:
            mine = folder.stat().st_uid == os.getuid()
        except OSError:
            continue
        if pid.isdigit() and mine and not alive(int(pid)):
            shutil.rmtree(folder, ignore_errors=True)
            gone.append(folder)
    return gone


def relocated(settings, folder: Path | None):
    """`settings` (a ServerSecurity or ClientSecurity) with every file path moved into `folder`, where
    `materialize` wrote the files under their names; unchanged when there is no folder."""
    if folder is None:
        return settings
    moved = {f.name: folder / Path(getattr(settings, f.name)).name for f in fields(settings)
             if isinstance(getattr(settings, f.name), Path)}
    return replace(settings, **moved)


def read_files(paths: dict[str, Path | None]) -> dict[str, bytes]:
    """name -> content of the paths that are set (read by the driver)."""
    return {name: Path(path).read_bytes() for name, path in paths.items() if path is not None}
