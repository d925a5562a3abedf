"""Secrets for a deployment's Ray actors, carried in the actors' runtime environment rather than in
files every node must see: the driver reads the certificates, keys and tokens, each actor writes
them into a folder of its own (0700, files 0600) when it starts, and its servers read them there.

Example:
    >>> env = runtime_env({"shard.pem": pem, "hop-token": b"..."})   # .options(runtime_env=env)
    >>> folder = materialize()                                        # in the actor: its own copies
"""

from __future__ import annotations

import base64
import json
import os
import tempfile
from dataclasses import fields, replace
from pathlib import Path

from retriever_server.security.certs import write_private

ENV = "RETRIEVER_ACTOR_SECRETS"


def runtime_env(files: dict[str, bytes]) -> dict | None:
    """A Ray runtime environment that carries `files` (name -> content) to an actor; None for none."""
    if not files:
        return None
    packed = {name: base64.b64encode(data).decode() for name, data in files.items()}
    return {"env_vars": {ENV: json.dumps(packed)}}


def materialize() -> Path | None:
    """In an actor: writes the files its runtime environment carries into a new private folder and
    returns it; None when it carries none."""
    packed = os.environ.get(ENV)
    if not packed:
        return None
    folder = Path(tempfile.mkdtemp(prefix="retriever-secrets-"))
    os.chmod(folder, 0o700)
    for name, data in json.loads(packed).items():
        write_private(folder / Path(name).name, base64.b64decode(data))
    return folder


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
