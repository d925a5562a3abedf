"""A whole datastore on one machine: every shard (x replicas) and a router, as local processes.

`retriever-server serve --datastore DIR` (no `--shard`) runs this. Each server writes its bound
address to a file once listening; the launcher waits for every shard to turn SERVING, then starts
the router over them. Stopping sends SIGTERM, so every server drains.

Example:
    >>> with LocalDeployment(Path("ds"), replicas=2) as deployment:
    ...     client = RetrieverClient(deployment.router_address)
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from retriever_server.grpc_util import health_status
from retriever_server.manifest import read_manifest

log = logging.getLogger(__name__)


class LaunchError(RuntimeError):
    """A server process did not come up; the message names it and quotes its last error line."""


@dataclass
class _Process:
    name: str
    popen: subprocess.Popen
    address_file: Path
    log_file: Path
    address: str = ""


@dataclass
class LocalDeployment:
    """Starts S shards x R replicas and a router on 127.0.0.1 ephemeral ports."""

    datastore: Path
    replicas: int = 1
    host: str = "127.0.0.1"
    router_port: int = 0
    extra_args: tuple[str, ...] = ()
    startup_timeout_s: float = 300.0
    log_level: str = "WARNING"
    shards: list[list[_Process]] = field(default_factory=list)
    router: _Process | None = None

    def __post_init__(self):
        self._dir = Path(tempfile.mkdtemp(prefix="retriever-local-"))

    def _spawn(self, name: str, args: list[str]) -> _Process:
        address_file = self._dir / f"{name}.json"
        log_file = self._dir / f"{name}.log"
        command = [sys.executable, "-m", "retriever_server.cli", "--log-level", self.log_level, *args,
                   "--address-file", str(address_file)]
        with open(log_file, "w") as out:
            popen = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        return _Process(name, popen, address_file, log_file)

    def _last_error(self, process: _Process) -> str:
        lines = [line for line in process.log_file.read_text(errors="replace").splitlines() if line.strip()]
        return lines[-1] if lines else f"exit code {process.popen.returncode}"

    def _wait_serving(self, process: _Process, deadline: float) -> None:
        while time.monotonic() < deadline:
            if process.popen.poll() is not None:
                raise LaunchError(f"{process.name} exited: {self._last_error(process)}")
            if not process.address and process.address_file.is_file():
                process.address = json.loads(process.address_file.read_text())["address"]
            if process.address and health_status(process.address, timeout=1.0) == "SERVING":
                return
            time.sleep(0.1)
        raise LaunchError(f"{process.name} did not turn SERVING within {self.startup_timeout_s:.0f}s")

    def start(self) -> LocalDeployment:
        """Starts every process and returns once the router is SERVING; raises LaunchError."""
        manifest = read_manifest(self.datastore)
        deadline = time.monotonic() + self.startup_timeout_s
        try:
            for i in range(len(manifest.shards)):
                self.shards.append([
                    self._spawn(f"shard-{i:05d}-r{r}", ["serve", "--datastore", str(self.datastore), "--shard",
                                                        str(i), "--replica", str(r), "--host", self.host,
                                                        "--port", "0", *self.extra_args])
                    for r in range(self.replicas)
                ])
            for process in self.processes():
                self._wait_serving(process, deadline)
            spec = ",".join("|".join(p.address for p in replicas) for replicas in self.shards)
            self.router = self._spawn("router", ["router", "--shards", spec, "--host", self.host,
                                                 "--port", str(self.router_port)])
            self._wait_serving(self.router, deadline)
        except BaseException:
            self.stop()
            raise
        log.info("datastore %s served by %d shards x %d replicas behind %s", self.datastore,
                 len(self.shards), self.replicas, self.router_address)
        return self

    def processes(self) -> list[_Process]:
        return [p for replicas in self.shards for p in replicas] + ([self.router] if self.router else [])

    @property
    def router_address(self) -> str:
        return self.router.address if self.router else ""

    @property
    def shard_addresses(self) -> list[list[str]]:
        return [[p.address for p in replicas] for replicas in self.shards]

    def kill(self, shard: int, replica: int = 0, sig: int = signal.SIGKILL) -> None:
        """Sends `sig` to one shard replica (fault injection in tests and drills)."""
        process = self.shards[shard][replica]
        os.kill(process.popen.pid, sig)
        process.popen.wait(timeout=30)

    def stop(self, grace_s: float = 10.0) -> None:
        """SIGTERM to every process (router first, so it stops sending), then waits; SIGKILL stragglers."""
        for process in reversed(self.processes()):
            if process.popen.poll() is None:
                process.popen.send_signal(signal.SIGTERM)
        for process in reversed(self.processes()):
            try:
                process.popen.wait(timeout=grace_s)
            except subprocess.TimeoutExpired:
                process.popen.kill()
                process.popen.wait()

    def wait(self) -> None:
        """Blocks until any process exits (or this process gets SIGTERM/SIGINT), then stops all."""
        try:
            while all(p.popen.poll() is None for p in self.processes()):
                time.sleep(0.5)
            dead = [p.name for p in self.processes() if p.popen.poll() is not None]
            log.error("%s exited; stopping the deployment", ", ".join(dead))
        finally:
            self.stop()

    def __enter__(self) -> LocalDeployment:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
