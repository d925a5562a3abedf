"""A whole datastore on one machine: every shard (x replicas) and a router, as local processes.

`retriever-server serve --datastore DIR` (no `--shard`) runs this. Each server writes its bound
address to a file once listening; the launcher waits for every shard to turn SERVING, then starts
the router over them. Stopping sends SIGTERM, so every server drains.

Example:
    >>> with LocalDeployment(Path("ds"), replicas=2) as deployment:
    ...     client = RetrieverClient(deployment.router_address)
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from retriever_server.cluster.cpus import format_cpus
from retriever_server.cluster.hop_credentials import HopCredentials, make_hop_credentials
from retriever_server.cluster.reaper import remove_when_gone
from retriever_server.cluster.supervisor import (
    Child,
    RestartPolicy,
    Supervisor,
    exit_reason,
    uninterrupted,
    without_option,
)
from retriever_server.datastore.manifest import read_manifest
from retriever_server.security.config import ServerSecurity
from retriever_server.wire.untrusted import one_line

log = logging.getLogger(__name__)
ERROR_LINE = re.compile(r"\b(ERROR|CRITICAL)\b|: error: ")  # a log record's level (text or JSON), a command's error
NO_DRAIN = ("--drain-delay", "0")  # servers that no load balancer routes to: nobody to tell before they stop


class LaunchError(RuntimeError):
    """A server process did not come up; the message names it, says how it ended (the signal that killed
    it, or its exit code and last log line) and gives the directory that keeps its log."""


@dataclass
class LocalDeployment:
    """Starts S shards x R replicas on 127.0.0.1 and a router on `host`, ephemeral ports unless
    `router_port` is set.

    `security` protects the router's port, the public endpoint. When it has TLS or a token, the
    deployment makes its own CA, certificates and token for the hops between the router and the shards
    (`hop_credentials`), so those hops are mutual TLS with a token whatever the public certificate is.
    `extra_args` go to every shard server, `router_args` to the router; `log_level` and `log_format`
    to all of them. `cpus` (default: any core) confines every process to those cores, e.g. to keep
    them off the cores an LM worker on the same machine computes on. Unless `extra_args` set
    `--threads` (to other than 0), each shard process gets an equal share of those cores (all of this
    process's by default) as FAISS threads: S x R processes searching at once with FAISS's default
    (every core each) would oversubscribe the cores. With `pin_shards` (the default) and no more shard
    processes than cores, each shard process also runs on its share alone, cores of its own
    (`placement`): a process that stays on its cores finds its index and its code still in their
    caches, which cut a one-query search's CPU by about a sixth on a 2-core machine. The router runs on
    any of them. Their logs and address files live in `log_dir` until `stop()` removes it; it is kept
    when a process fails to start, and the LaunchError names it, or exits while the deployment serves.
    `stop()` gives the router, then the shards, `stop_timeout_s` each to drain before it kills them.

    Once started, the deployment supervises its processes (unless `restart` is off): one that exits
    (a shard replica or the router) is started again by `restart_policy`, with backoff, under the same
    name and on the same port. While every replica of a shard is down the router stays up, answering
    UNAVAILABLE naming the shard, or a partial answer to a request that allows one.
    """

    datastore: Path
    replicas: int = 1
    host: str = "127.0.0.1"
    router_port: int = 0
    extra_args: tuple[str, ...] = ()
    router_args: tuple[str, ...] = ()
    startup_timeout_s: float = 300.0
    log_level: str = "WARNING"
    log_format: str = "text"
    cpus: tuple[int, ...] = ()
    security: ServerSecurity = field(default_factory=ServerSecurity)
    restart: bool = True
    restart_policy: RestartPolicy = field(default_factory=RestartPolicy)
    pin_shards: bool = True
    stop_timeout_s: float = 10.0
    shards: list[list[Child]] = field(default_factory=list)
    router: Child | None = None

    def __post_init__(self):
        self._dir = Path(tempfile.mkdtemp(prefix="retriever-local-"))
        self._keep_dir = False
        self.hops: HopCredentials | None = None
        self._reaper: subprocess.Popen | None = None  # removes the hops' folder should this process be killed
        self._supervisor: Supervisor | None = None
        self._stopped = threading.Event()
        self._done = False  # stop() has run

    @property
    def log_dir(self) -> Path:
        """The directory holding each process's log (NAME.log) and address file (NAME.json)."""
        return self._dir

    def _spawn(self, name: str, args: list[str], cpus: tuple[int, ...] | None = None) -> Child:
        health = [] if "--health-port" in args else ["--health-port", "0"]  # probed on 127.0.0.1 (supervisor)
        command = [sys.executable, "-m", "retriever_server.cli", "--log-level", self.log_level,
                   "--log-format", self.log_format, *args, "--address-file", str(self._dir / f"{name}.json"),
                   *health]
        cpus = self.cpus if cpus is None else cpus
        command += ["--cpus", format_cpus(cpus)] if cpus else []
        child = Child(name, command, self._dir / f"{name}.log", self._dir / f"{name}.json")
        child.spawn()
        return child

    def _failed(self, process: Child, why: str) -> LaunchError:
        self._keep_dir = True
        return LaunchError(f"{process.name} {why} (logs in {self._dir})")

    def _wait_serving(self, process: Child, deadline: float) -> None:
        """Until `process` is SERVING: LaunchError naming any process started so far that exits meanwhile
        (a shard killed while the router waits for it), or `process` at the deadline."""
        while time.monotonic() < deadline:
            if exited := next((p for p in self.processes() if p.exited()), None):
                raise self._failed(exited, _ended(exited))
            if process.check_serving():
                return
            time.sleep(0.1)
        raise self._failed(process, f"did not turn SERVING within {self.startup_timeout_s:g}s")

    def _spawn_shard(self, shard: int, replica: int, threads: list[str], cpus: tuple[int, ...]) -> Child:
        extra = without_option(self.extra_args, "--threads") if threads else list(self.extra_args)
        hops = self.hops.shard_args() if self.hops else []
        return self._spawn(f"shard-{shard:05d}-r{replica}", [
            "serve", "--datastore", str(self.datastore), "--shard", str(shard), "--replica", str(replica),
            "--host", "127.0.0.1", "--port", "0", *extra, *threads, *hops], cpus)

    def _router_security_args(self) -> list[str]:
        """The router's flags for its public port, and for its calls to the shards."""
        s = self.security
        args = [flag for flag, path in (("--tls-cert", s.tls_cert), ("--tls-key", s.tls_key), ("--tls-ca", s.tls_ca),
                                        ("--auth-token-file", s.token_file)) if path is not None
                for flag in (flag, str(Path(path).resolve()))]
        args += ["--insecure"] if s.insecure else []
        args += ["--reflection"] if s.reflection else []
        return args + (self.hops.router_args() if self.hops else [])

    def _threads(self, processes: int) -> list[str]:
        """`--threads N`: the cores' share of each of `processes` shard processes, unless set by the caller."""
        args = list(self.extra_args)
        given = args[args.index("--threads") + 1:][:1] if "--threads" in args else []
        if given and given[0] != "0":
            return []
        return ["--threads", str(max(1, len(self._pool()) // processes))]

    def _pool(self) -> tuple[int, ...]:
        """The cores the deployment runs on: `cpus`, else every core this process may run on."""
        return self.cpus or tuple(sorted(os.sched_getaffinity(0)))

    def placement(self, processes: int, threads: list[str]) -> list[tuple[int, ...]]:
        """The cores of each of `processes` shard processes, in spawn order: an equal share of the pool
        each, disjoint, when pinning is on, the deployment chose their threads and each gets a core at
        least; else the pool (or any core) for all."""
        pool = self._pool()
        share = len(pool) // processes
        if not self.pin_shards or not threads or share < 1:
            return [self.cpus] * processes
        return [pool[i * share:(i + 1) * share] for i in range(processes)]

    def start(self) -> LocalDeployment:
        """Starts every process and returns once the router is SERVING.

        Raises:
            LaunchError: a process exited or did not turn SERVING in time; every process is stopped.
            RuntimeError: started before (`with LocalDeployment(...)` starts it: no `.start()` there).
        """
        if self.shards:
            raise RuntimeError(f"this deployment of {self.datastore} was started already (router at "
                               f"{self.router_address or 'none'}): start a new LocalDeployment for another")
        deadline = time.monotonic() + self.startup_timeout_s
        try:  # stop() removes the log folder made for this deployment, whatever fails
            manifest = read_manifest(self.datastore)
            self.security.check(self.host)  # before any process starts
            if self.security.tls or self.security.token_file is not None:
                self._reaper = remove_when_gone(self._dir / "hops")  # first: the keys go with this process, even
                self.hops = make_hop_credentials(self._dir / "hops")  # killed as they are written
            threads = self._threads(len(manifest.shards) * self.replicas)
            cores = iter(self.placement(len(manifest.shards) * self.replicas, threads))
            for i in range(len(manifest.shards)):
                self.shards.append([self._spawn_shard(i, r, threads, next(cores)) for r in range(self.replicas)])
            for process in self.processes():
                self._wait_serving(process, deadline)
            self.router = self._spawn("router", ["router", "--shards", self.shards_target, "--host", self.host,
                                                 "--port", str(self.router_port), *self.router_args,
                                                 *self._router_security_args()])
            self._wait_serving(self.router, deadline)
            if self.restart:  # known to stop() before its thread starts
                self._supervisor = Supervisor(self.processes, self.restart_policy)
                self._supervisor.start()
            log.info("datastore %s served by %d shards x %d replicas behind %s", self.datastore,
                     len(self.shards), self.replicas, self.router_address)
        except BaseException:
            self.stop()
            raise
        return self

    def processes(self) -> list[Child]:
        """Every shard replica, then the router once started."""
        return [p for replicas in self.shards for p in replicas] + ([self.router] if self.router else [])

    @property
    def router_address(self) -> str:
        return self.router.address if self.router else ""

    @property
    def shard_addresses(self) -> list[list[str]]:
        return [[p.address for p in replicas] for replicas in self.shards]

    @property
    def shards_target(self) -> str:
        """The shards as one target, "a:1|a:2,b:1" (shards by comma, replicas by '|'): what `--shards`
        takes, and what a client fans out to by itself, without the router's hop."""
        return ",".join("|".join(p.address for p in replicas) for replicas in self.shards)

    def reload_security(self) -> None:
        """Has every running process read its TLS and token files again now (SIGHUP to each). A process
        still starting (no address file yet) is left alone: SIGHUP would end it before its handler is in
        place, and it reads the files as it starts."""
        for process in self.processes():
            if process.popen is not None and not process.exited() and process.address_file.is_file():
                process.popen.send_signal(signal.SIGHUP)
        log.info("asked every process to read its TLS and token files again")

    def kill(self, shard: int, replica: int = 0, sig: int = signal.SIGKILL) -> None:
        """Sends `sig` to one shard replica and waits for it to exit (fault injection in tests and
        drills); the supervisor then restarts it."""
        process = self.shards[shard][replica]
        os.kill(process.popen.pid, sig)
        process.popen.wait(timeout=30)

    def stop(self, grace_s: float | None = None) -> None:
        """Stops supervising, then SIGTERM to the router and waits for it (so it has stopped sending before
        a shard drains), then to every shard, waiting for them all; each group gets `grace_s` (default
        `stop_timeout_s`) before SIGKILL. Removes `log_dir` unless a process failed to start, exited or
        was restarted (the hops' credentials in it are removed either way, and their reaper ended). Once is
        enough: a second call does nothing. On the main thread, SIGINT and SIGTERM are ignored until every
        process has ended: a second Ctrl-C cuts no drain short (and leaves no process running)."""
        if self._done:
            return
        grace_s = self.stop_timeout_s if grace_s is None else grace_s
        with uninterrupted():  # from the first step: the supervisor's join too
            self._done = True
            if self._supervisor is not None:
                self._supervisor.stop()
            self._stopped.set()
            _terminate([self.router] if self.router else [], grace_s)
            _terminate([p for replicas in self.shards for p in replicas], grace_s)
        if self.hops is not None:  # the hops' keys and token go even where the logs are kept
            self.hops.remove()
        if self._reaper is not None:  # nothing left for it to remove
            self._reaper.terminate()
            try:
                self._reaper.wait(timeout=5.0)
            except subprocess.TimeoutExpired:
                self._reaper.kill()
                self._reaper.wait()
        if not self._keep_dir and not any(p.restarts for p in self.processes()):  # a crash's logs stay
            shutil.rmtree(self._dir, ignore_errors=True)
        elif self._dir.is_dir():
            log.warning("the servers' logs stay in %s", self._dir)

    def _why_stop(self, reported: set[str]) -> str:
        """Without restarts: why the deployment must stop ("" while it can serve); warns once per
        replica that exits."""
        if self.router and self.router.exited():
            self._keep_dir = True  # its log says why
            return f"router {_ended(self.router)} (logs in {self._dir})"
        for i, replicas in enumerate(self.shards):
            if all(p.exited() for p in replicas):
                self._keep_dir = True
                return f"every replica of shard {i} exited ({replicas[0].name} {_ended(replicas[0])}; logs in " \
                       f"{self._dir})"
            for process in replicas:
                if process.exited() and process.name not in reported:
                    reported.add(process.name)
                    log.warning("%s exited with code %s; %d other replicas of shard %d still serve", process.name,
                                process.popen.returncode, sum(not p.exited() for p in replicas), i)
        return ""

    def wait(self, poll_s: float = 0.5) -> str:
        """Blocks while the deployment serves, then stops every process.

        With restarts (the default) it serves until `stop()` (from another thread) or an exception here
        (KeyboardInterrupt from SIGINT, or SIGTERM turned into one by the caller). Without, it also stops
        when the router exits or every replica of some shard has exited (a replica that exits while
        others of its shard remain is logged).

        Returns:
            Why it stopped, e.g. "every replica of shard 0 exited" or "stopped".
        """
        reported: set[str] = set()
        try:
            while not self._stopped.wait(poll_s):
                if not self.restart and (why := self._why_stop(reported)):
                    log.error("%s; stopping the deployment", why)
                    return why
            return "stopped"
        finally:
            self.stop()

    @classmethod
    def for_one_command(cls, datastore: Path) -> LocalDeployment:
        """A deployment that only the command starting it calls (`--datastore` of the LM worker's commands):
        its servers stop without the drain delay, which gives load balancers time to notice, as none
        sends it traffic. It stops about 2 s sooner."""
        return cls(datastore, extra_args=NO_DRAIN, router_args=NO_DRAIN)

    def __enter__(self) -> LocalDeployment:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def _ended(process: Child) -> str:
    """How an exited process ended (`exit_reason`: its signal, or its exit code and last log line); for one
    killed by a signal, also its last log line where that is an error line (an INFO line says nothing)."""
    reason = exit_reason(process)
    if process.popen.returncode < 0 and ERROR_LINE.search(line := process.last_line()):
        reason += f"; its last error line: {one_line(line, 300)}"
    return reason


def _terminate(processes: list[Child], grace_s: float) -> None:
    """SIGTERM to every running one of `processes`, then waits for them all until `grace_s` from now;
    SIGKILL for those still running then."""
    for process in processes:
        if process.popen is not None and not process.exited():
            process.popen.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    for process in processes:
        if process.popen is None:
            continue
        try:
            process.popen.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            process.popen.kill()
            process.popen.wait()
