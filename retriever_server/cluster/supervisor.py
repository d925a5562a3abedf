"""Child server processes kept running: each is restarted with backoff when it exits, on the port it
had, so that whoever calls it (the router, a client) finds it at the same address again.

A child writes its bound address to a JSON file once listening (`--address-file`) and answers health
checks on a plaintext port (`--health-port 0`); `Child` reads both. `Supervisor` is a thread that
watches the children, restarts the ones that exit, and logs each exit and each return to SERVING.
`uninterrupted` holds off SIGINT and SIGTERM while a deployment stops.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from retriever_server.security.config import TOKEN_ENV
from retriever_server.serving.grpc_setup import health_status
from retriever_server.wire.untrusted import one_line

log = logging.getLogger(__name__)


def without_option(args: tuple[str, ...] | list[str], option: str) -> list[str]:
    """`args` without `option` and the value after it, wherever it appears."""
    out, skip = [], False
    for arg in args:
        if skip:
            skip = False
        elif arg == option:
            skip = True
        else:
            out.append(arg)
    return out


PARENT_ENV = "RETRIEVER_PARENT_PID"  # set in a child's environment: the process whose death ends it


def child_environment() -> dict[str, str]:
    """The servers' environment: every process here shares this machine's cores, so OpenMP threads
    sleep between searches instead of spinning (a user's own OMP_WAIT_POLICY wins); and this process's
    pid, so that a child whose parent dies, however it dies, stops too (`orphaned`). Never the caller's
    RETRIEVER_AUTH_TOKEN: the servers authenticate with their own files, and a child's environment is
    readable as long as it runs."""
    inherited = {k: v for k, v in os.environ.items() if k != TOKEN_ENV}
    return {**inherited, "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE"),
            PARENT_ENV: str(os.getpid())}


def orphaned() -> bool:
    """Whether this process was started as a supervised child and its parent has died since (it was
    handed to another parent, as Linux does to a process whose parent exits)."""
    parent = os.environ.get(PARENT_ENV, "")
    return parent.isdigit() and os.getppid() != int(parent)


@dataclass(frozen=True)
class RestartPolicy:
    """When an exited child starts again: `first_delay_s` after its exit, doubling with each exit
    that follows a short run, up to `max_delay_s`; a child that served `healthy_after_s` starts over."""

    first_delay_s: float = 0.5
    max_delay_s: float = 30.0
    healthy_after_s: float = 30.0

    def delay(self, quick_exits: int) -> float:
        return min(self.max_delay_s, self.first_delay_s * 2.0 ** min(max(0, quick_exits - 1), 64))  # no overflow


LOG_TAIL_BYTES = 1 << 16  # how much of a log's end is read for the last line a process wrote


@dataclass
class Child:
    """One server process: its command (argv names what it serves), log and address file."""

    name: str
    command: list[str]
    log_file: Path
    address_file: Path
    popen: subprocess.Popen | None = None
    address: str = ""
    metrics_port: int | None = None
    health_port: int | None = None
    serving: bool = False
    restarts: int = 0
    started_at: float = 0.0
    served_at: float | None = None  # when this run turned SERVING; None until it has
    restart_at: float | None = None
    quick_exits: int = 0
    log_start: int = 0  # where this run's lines begin in the log (the log is appended to on a restart)

    def spawn(self) -> None:
        """Starts the process (its log appended to on a restart), in a session of its own."""
        self.address_file.unlink(missing_ok=True)
        self.serving, self.health_port, self.served_at = False, None, None
        self.log_start = self.log_file.stat().st_size if self.popen and self.log_file.is_file() else 0
        with open(self.log_file, "a" if self.popen else "w") as out:
            self.popen = subprocess.Popen(self.command, stdout=out, stderr=subprocess.STDOUT,
                                          start_new_session=True, env=child_environment())
        self.started_at = time.monotonic()

    def exited(self) -> bool:
        return self.popen is not None and self.popen.poll() is not None

    def last_line(self) -> str:
        """The last line this run of the process wrote to its log (its error line, as a rule), read from
        the log's last LOG_TAIL_BYTES; "" where it wrote none."""
        with open(self.log_file, "rb") as log_file:
            start = max(self.log_start, log_file.seek(0, os.SEEK_END) - LOG_TAIL_BYTES)
            log_file.seek(start)
            text = log_file.read().decode(errors="replace")
        lines = [line for line in text.splitlines() if line.strip()]
        return lines[-1] if lines else ""

    def last_error(self) -> str:
        """`last_line` made safe for a message (one line, control characters escaped, at most 300
        characters), or the exit code where the process wrote nothing."""
        return one_line(self.last_line(), 300) or f"exit code {self.popen.returncode}"

    def check_serving(self) -> bool:
        """Reads the address file once written, then asks the health port; True once SERVING. From then
        on the command binds the same ports (gRPC, metrics, health), so a restart comes back at the same
        addresses, those the address file and the logs gave."""
        if not self.address_file.is_file():
            return False
        written = json.loads(self.address_file.read_text())
        self.address, self.metrics_port = written["address"], written.get("metrics_port")
        self.health_port = written.get("health_port")
        if health_status(f"127.0.0.1:{self.health_port}", timeout=1.0) != "SERVING":
            return False
        self.serving = True
        self.served_at = time.monotonic() if self.served_at is None else self.served_at
        pinned = {"--port": self.address.rsplit(":", 1)[1], "--metrics-port": self.metrics_port,
                  "--health-port": self.health_port}
        for option, port in pinned.items():
            if port is not None:
                self.command = [*without_option(self.command, option), option, str(port)]
        return True


def exit_reason(child: Child) -> str:
    """How a child ended: the signal that killed it, or its exit code and its log's last line (a server's
    error line: "checksum does not match", a port in use), cut to one line of at most 300 characters."""
    code = child.popen.returncode
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    line = child.last_line()
    return f"exited with code {code}" + (f": {one_line(line, 300)}" if line else "")


@dataclass
class Supervisor:
    """Restarts the children that exit, by `policy`, until `stop()`. `children` returns them (the
    list may grow while it runs)."""

    children: Callable[[], list[Child]]
    policy: RestartPolicy = field(default_factory=RestartPolicy)
    poll_s: float = 0.2
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> Supervisor:
        self._thread = threading.Thread(target=self._run, name="supervisor", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stops restarting; returns once the thread has (children are the caller's to stop)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def _run(self) -> None:
        while not self._stop.wait(self.poll_s):
            for child in self.children():
                try:
                    self.tend(child)
                except Exception:  # a health check or an address file that failed: try again next poll
                    log.exception("supervising %s", child.name)

    def tend(self, child: Child) -> None:
        """One look at `child`: schedule the restart of an exit, restart when due, note a return."""
        now = time.monotonic()
        if child.restart_at is None and child.exited():
            ran = now - child.started_at
            served = 0.0 if child.served_at is None else now - child.served_at  # a long load is no health
            child.quick_exits = 1 if served >= self.policy.healthy_after_s else child.quick_exits + 1
            delay = self.policy.delay(child.quick_exits)
            child.restart_at = now + delay
            log.warning("%s %s after %.1fs; restarting it in %.1fs (log: %s)", child.name, exit_reason(child),
                        ran, delay, child.log_file)
        elif child.restart_at is not None and now >= child.restart_at:
            child.restart_at = None
            child.restarts += 1
            try:
                child.spawn()
            except Exception as err:  # noqa: BLE001 - no fork, no log folder, no files: a quick exit, backed off
                child.quick_exits += 1
                delay = self.policy.delay(child.quick_exits)
                child.restart_at = now + delay
                log.warning("%s could not start (%s: %s); trying again in %.1fs", child.name, type(err).__name__,
                            err, delay)
        elif child.restarts and not child.serving and not child.exited() and child.check_serving():
            log.warning("%s SERVING again at %s (restart %d)", child.name, child.address, child.restarts)


@contextlib.contextmanager
def uninterrupted() -> Iterator[None]:
    """SIGINT and SIGTERM ignored for the duration, on the main thread (their handlers live there; elsewhere
    this does nothing): a second Ctrl-C cuts no cleanup short."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    saved = {sig: handler for sig in (signal.SIGINT, signal.SIGTERM)
             if (handler := signal.getsignal(sig)) is not None}  # None: not set from Python, left as it is
    for sig in saved:
        signal.signal(sig, signal.SIG_IGN)
    try:
        yield
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)
