"""Joining a Ray cluster, the same way for every job.

Which cluster a command joins: `--address` when given, else RAY_ADDRESS (which `ray job submit` sets
for a job's entry point), else a new local cluster on this machine, started for the command and
ended with it, even when the command is killed (`reaper`). A command never joins by surprise a
cluster that `ray start` made (or once made) on the machine; `--address auto` joins that one on
purpose, and Ray's record of it (in Ray's temp directory, which every user may write in) is taken only
as a file of this user's that no one else may write. What is to outlive the command (`lasting`: detached
actors) never goes to a local cluster the command starts.

Joining a cluster that is not there fails fast with `ClusterUnreachable`, naming the address and
what to do: the head's port is probed first (a refused connection fails within REFUSED_S), and
joining as a whole is given `timeout_s` (RETRIEVER_RAY_CONNECT_TIMEOUT, default 30 s), instead of
Ray's wait on a head that never answers.
"""

from __future__ import annotations

import atexit
import logging
import math
import os
import signal
import socket
import stat
import sys
import threading
import time
from pathlib import Path

import ray

from retriever_server.cluster.reaper import start_reaper

log = logging.getLogger(__name__)
LOCAL = "local"  # ray.init's name for "start a new local cluster", whatever clusters this machine has
TIMEOUT_ENV = "RETRIEVER_RAY_CONNECT_TIMEOUT"
DEFAULT_TIMEOUT_S = 30.0
REFUSED_S = 3.0  # how long a head that refuses connections, or a name that does not resolve, gets (it may be starting)
# Ray announces at WARNING, from this logger, that a new local cluster uses token authentication (its
# default in the Ray this project pins: the token is made once in ~/.ray/auth_token). That is the setting the project
# wants, so a cluster a command starts for itself does not repeat it; RAY_AUTH_MODE still decides.
AUTH_NOTICE_LOGGER = "ray._private.authentication.authentication_token_setup"
AUTH_MODE_ENV = "RAY_AUTH_MODE"  # Ray's switch for token authentication ("token")
GCS_PROBE_METHOD = "/ray.rpc.NodeInfoGcsService/GetClusterId"  # the head's first answer to a joining process
CLIENT_PROBE_METHOD = "/ray.rpc.RayletDriver/ClusterInfo"  # the same from a Ray Client server (ray://)
AUTH_PROBE_S = 3.0


class ClusterUnreachable(ConnectionError):
    """No Ray cluster answered at the address a command was told to join."""


def connect_timeout_s() -> float:
    """Seconds a command waits to join a cluster: RETRIEVER_RAY_CONNECT_TIMEOUT, else 30."""
    value = os.environ.get(TIMEOUT_ENV, "")
    try:
        seconds = float(value) if value else DEFAULT_TIMEOUT_S
    except ValueError:
        seconds = math.nan
    if not 0 < seconds < math.inf:
        raise ValueError(f"{TIMEOUT_ENV} must be a number of seconds above 0, got {value[:40]!r}")
    return seconds


def _advice(target: str, source: str | None, local: bool) -> str:
    """What to do about a cluster that is not there; `source`: where its address came from ("--address",
    "RAY_ADDRESS"), None for the `ray start` cluster that deploy, lookup and undeploy join by default;
    `local`: without an address the command would start a local cluster of its own."""
    if source is None:
        return ("start it again (ray start --head) and deploy there, or give the --address (or RAY_ADDRESS) of the "
                "cluster that runs the deployment (Ray's record of the last `ray start` cluster on this machine "
                "is stale)")
    if target == "auto":
        drop = "drop --address auto" if source == "--address" else "unset RAY_ADDRESS=auto"
        instead = f", or {drop} to run on a new local cluster" if local else ""
        return (f"start it again (ray start --head){instead} (Ray's record of the last `ray start` cluster on "
                "this machine is stale)")
    return f"start that cluster, correct {source}" + (", or unset it to run on a new local cluster" if local else "")


def cluster_target(address: str | None, existing: bool = False) -> str:
    """What `connect(address, existing=existing)` joins: `address`, else RAY_ADDRESS, else "auto" (`existing`)
    or LOCAL, a new local cluster that ends with this process."""
    return address or os.environ.get("RAY_ADDRESS") or ("auto" if existing else LOCAL)


def _read_record(record: Path) -> str:
    """The address in Ray's record of the last `ray start` cluster, "" where there is none. Ray's temp
    directory is everyone's to write in (/tmp/ray), so the record is taken only as a regular file of this
    user (or root) that no one else may write (its group may where the group is this user's own, as a
    umask of 002 leaves it): else ClusterUnreachable, as another user could have pointed it at a cluster
    of theirs, to be sent this command's Ray token and its deployment's secrets."""
    try:  # no link followed, no wait on a FIFO; what is checked is what is read (fstat of the file opened)
        fd = os.open(record, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except FileNotFoundError:
        return ""
    except OSError as err:
        why = "a symbolic link" if os.path.islink(record) else (err.strerror or type(err).__name__)
    else:
        with os.fdopen(fd, "rb") as file:
            found = os.fstat(file.fileno())
            if not stat.S_ISREG(found.st_mode):
                why = "not a regular file"
            elif found.st_uid not in (os.getuid(), 0):
                why = f"owned by uid {found.st_uid}, not by this user (uid {os.getuid()})"
            elif found.st_mode & stat.S_IWOTH or (found.st_mode & stat.S_IWGRP and found.st_gid != os.getgid()):
                why = f"writable by other users (mode {stat.S_IMODE(found.st_mode):o}; chmod go-w it if it is yours)"
            else:
                return file.read(4096).decode(errors="replace").strip()
    raise ClusterUnreachable(f"{record}, Ray's record of the last `ray start` cluster on this machine, is not to be "
                             f"trusted ({why}): another user may have written it, to have this command join their "
                             "cluster; give the cluster's address (--address, where the command takes one, or "
                             "RAY_ADDRESS)")


def _recorded_head(source: str | None, local: bool) -> str:
    """The address Ray recorded for the last cluster `ray start` made on this machine (in its temp
    directory: RAY_TMPDIR, else /tmp); ClusterUnreachable when there is none, or the record is not this
    user's own (`_read_record`). `source`: where "auto" came from (--address, RAY_ADDRESS), None where the
    command needs a running cluster and no address was given; `local`: as for `_advice`."""
    from ray._common.utils import get_ray_address_file

    record = Path(get_ray_address_file(None))
    address = _read_record(record)
    if address:
        return address
    if source is not None:
        given = "--address auto" if source == "--address" else "RAY_ADDRESS=auto"
        drop = f", or {'drop' if source == '--address' else 'unset'} {given} to run on a new local cluster" \
            if local else ""
        raise ClusterUnreachable(f"{given}: no cluster made by `ray start` is recorded on this machine "
                                 f"({record} is missing): start one with ray start --head{drop}")
    raise ClusterUnreachable(f"no Ray cluster runs on this machine ({record} is missing), and this command needs the "
                             "one that runs the deployment: give its address (--address, where the command takes "
                             "one, or RAY_ADDRESS), or start one with ray start --head and deploy there")


def _head(target: str, source: str | None) -> tuple[str, int]:
    """The host and port of the cluster's head (GCS) that `target` names ("auto": already resolved);
    `source`: where it came from (--address, RAY_ADDRESS), named in the error."""
    given = f"{source} {target!r}" if source else f"Ray address {target!r}"
    if target.startswith(("http://", "https://")):
        raise ValueError(f"{given} is a dashboard URL (what `ray job submit` takes): give the "
                         "cluster's address, host:port of its head (6379 by default), or auto")
    address = target.removeprefix("ray://")
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ValueError(f"{given} is not host:port with a port in [1, 65535] (or auto, or "
                         "ray://host:port)")
    return host.strip("[]"), int(port)


def dial_target(host: str, port: int) -> str:
    """HOST:PORT as gRPC and Ray parse it: an IPv6 host in brackets ("[::1]:6379")."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _probe(target: str, source: str | None, local: bool, host: str, port: int, timeout_s: float) -> None:
    """Returns once the head accepts a TCP connection; ClusterUnreachable when it refuses, or its name
    does not resolve, for REFUSED_S, or it does not answer within `timeout_s` (`source`, `local`: as for
    `_advice`)."""
    started = time.monotonic()
    while True:
        elapsed = time.monotonic() - started
        try:
            with socket.create_connection((host, port), timeout=max(0.1, min(2.0, timeout_s - elapsed))):
                return
        except OSError as err:
            refused = isinstance(err, ConnectionRefusedError)
            unknown = isinstance(err, socket.gaierror) and err.errno == socket.EAI_NONAME  # a typo, as a rule
            if elapsed >= (min(REFUSED_S, timeout_s) if refused or unknown else timeout_s):
                why = "connection refused" if refused else \
                    "no such host" if unknown else (str(err) or type(err).__name__)
                named = "the cluster `ray start` last made on this machine" if target == "auto" else target
                raise ClusterUnreachable(f"no Ray cluster answers at {named} ({dial_target(host, port)}: {why}, for "
                                         f"{elapsed:.0f} s): {_advice(target, source, local)}") from None
        time.sleep(0.25)


def _check_token(named: str, host: str, port: int, client: bool, timeout_s: float = AUTH_PROBE_S) -> None:
    """ClusterUnreachable at once when the head takes token authentication and this process would not
    present a token it takes (Ray's own join would retry for about 20 s, logging a warning a second).
    One call to the head's GCS (`client`: to its Ray Client server, a ray:// address), with the token Ray
    would send, for at most `timeout_s` (AUTH_PROBE_S); any other answer is left to ray.init. `named`:
    "at ADDRESS", or which cluster."""
    import grpc
    from ray._private.ray_constants import GLOBAL_GRPC_OPTIONS
    from ray._raylet import AuthenticationTokenLoader

    token_mode = os.environ.get(AUTH_MODE_ENV, "").lower() == "token"
    token = AuthenticationTokenLoader.instance().get_raw_token(ignore_auth_mode=True) if token_mode else ""
    metadata = [("authorization", f"Bearer {token}")] if token else []
    # Ray's own options: no HTTP proxy (unless RAY_grpc_enable_http_proxy), so that Ray's token goes
    # where Ray itself would send it, never in plaintext to a proxy of http_proxy
    head = dial_target(host, port)
    with grpc.insecure_channel(head, options=list(GLOBAL_GRPC_OPTIONS)) as channel:
        try:
            channel.unary_unary(CLIENT_PROBE_METHOD if client else GCS_PROBE_METHOD)(
                b"", timeout=max(0.1, min(AUTH_PROBE_S, timeout_s)), metadata=metadata)
            return
        except grpc.RpcError as err:
            if err.code() != grpc.StatusCode.UNAUTHENTICATED:
                return
    where = f"the Ray cluster {named}" + ("" if named.endswith(head) else f" ({head})")
    if not token_mode:
        raise ClusterUnreachable(f"{where} takes token authentication, and this shell does not use it: set "
                                 f"{AUTH_MODE_ENV}=token (the token is then read from RAY_AUTH_TOKEN, else the file "
                                 "RAY_AUTH_TOKEN_PATH names, else ~/.ray/auth_token; `ray get-auth-token` on the head "
                                 "prints it)")
    held = next((f"{name}{'' if name == 'RAY_AUTH_TOKEN' else ' ' + os.environ[name]}"
                 for name in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH") if os.environ.get(name)), "~/.ray/auth_token")
    raise ClusterUnreachable(f"{where} refuses this process's token ({held}{'' if token else ': none found'}): "
                             "give it the cluster's token (`ray get-auth-token` on the head prints it) in "
                             "RAY_AUTH_TOKEN")


class _NotMainThread(logging.Filter):
    """Drops Ray's warning that a driver joining from another thread has no SIGTERM handler: the
    join below runs in a thread, and the caller's thread installs the handler once it has joined."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "SIGTERM handler is not set" not in record.getMessage()


def _init_within(target: str, timeout_s: float, waited_s: float | None = None, **kwargs) -> None:
    """ray.init, given `timeout_s` (in a thread, so that a head that never answers cannot hold the
    caller); ClusterUnreachable when it has not joined by then, naming the whole wait (`waited_s`, by
    default `timeout_s`)."""
    outcome: list[BaseException | None] = []

    def run() -> None:
        try:
            ray.init(address=target, **kwargs)
            outcome.append(None)
        except BaseException as err:  # handed to the caller's thread
            outcome.append(err)

    quiet = _NotMainThread()
    ray_worker_log = logging.getLogger("ray._private.worker")
    ray_worker_log.addFilter(quiet)
    try:
        thread = threading.Thread(target=run, name="ray-connect", daemon=True)
        thread.start()
        thread.join(timeout_s)
    finally:
        ray_worker_log.removeFilter(quiet)
    if not outcome:
        raise ClusterUnreachable(f"the Ray cluster at {target} accepted a connection but did not let this process "
                                 f"join within {waited_s or timeout_s:.0f} s ({TIMEOUT_ENV} sets the wait): check that "
                                 "it runs "
                                 f"Ray {ray.__version__}, as here, and its token authentication (RAY_AUTH_MODE, "
                                 f"~/.ray/auth_token)")
    if isinstance(outcome[0], ConnectionError) and not isinstance(outcome[0], ClusterUnreachable):
        raise ClusterUnreachable(f"could not join the Ray cluster at {target}: {outcome[0]}: check that it runs Ray "
                                 f"{ray.__version__}, as here, and its token authentication ({AUTH_MODE_ENV}, "
                                 "RAY_AUTH_TOKEN, ~/.ray/auth_token)") from None
    if outcome[0] is not None:
        raise outcome[0]
    in_main = threading.current_thread() is threading.main_thread()
    if in_main and signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:  # as ray.init does from the main thread
        signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(signum))


def _uninterrupted_exit() -> None:
    """At exit, before Ray's own shutdown (atexit runs the last registered first): a Ctrl-C or SIGTERM
    from now on is ignored, as one raised inside Ray's shutdown crashes the process (a traceback, an
    abort or a segfault) instead of letting it end."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)


def connect(address: str | None = None, num_cpus: int | None = None, existing: bool = False,
            log_to_driver: bool = True, timeout_s: float | None = None, lasting: bool = False) -> bool:
    """Connects this process to Ray unless it is already; returns whether it started a local cluster (one
    that no node will join).

    Args:
        address: a cluster address, or "auto" for the cluster `ray start` made on this machine; None:
            RAY_ADDRESS when set, else a new local cluster.
        num_cpus: CPUs of a new local cluster (ignored when joining one).
        existing: with no address and no RAY_ADDRESS, join the cluster started on this machine ("auto")
            instead of starting one.
        log_to_driver: show the workers' output here.
        timeout_s: how long joining a cluster may take (default: `connect_timeout_s()`).
        lasting: what the caller starts is to outlive it (detached actors): a running cluster, never a new
            local one, which ends with this process.

    Raises:
        ClusterUnreachable: no cluster answered at the address, named in the message with what to do.
        ValueError: `lasting`, and the address ("local") says to start a new local cluster.
    """
    if ray.is_initialized():
        return False
    target = cluster_target(address, existing)
    starting = target == LOCAL
    if starting and lasting:
        given = f"address {LOCAL!r}" if address else \
            f"RAY_ADDRESS={LOCAL}" if os.environ.get("RAY_ADDRESS") else "no address and no RAY_ADDRESS"
        raise ValueError(f"with {given}, this process would start a new local Ray cluster, which ends with it, and "
                         "what runs there is to outlive it: start a cluster with `ray start --head` and give its "
                         "address")
    kwargs = {"num_cpus": num_cpus if starting else None, "include_dashboard": False,
              "logging_level": logging.WARNING, "log_to_driver": log_to_driver}
    if starting:
        notice = logging.getLogger(AUTH_NOTICE_LOGGER)
        level = notice.level
        notice.setLevel(logging.ERROR)
        try:
            ray.init(address=LOCAL, **kwargs)
        finally:
            notice.setLevel(level)
        atexit.register(_uninterrupted_exit)  # after ray.init's own handler: runs before it
        start_reaper(ray._private.worker.global_worker.node.get_session_dir_path())  # ends it if we are killed
        return True
    timeout_s = connect_timeout_s() if timeout_s is None else timeout_s
    named = target
    source = "--address" if address else ("RAY_ADDRESS" if os.environ.get("RAY_ADDRESS") else None)
    if target == "auto":  # that cluster alone, never another one Ray's own "auto" would find running here
        target, named = _recorded_head(source, local=not existing), "auto"
    host, port = _head(target, source if named != "auto" else None)
    deadline = time.monotonic() + timeout_s  # the probes' time counts against the wait, not beside it
    _probe(named, source, not existing, host, port, timeout_s)
    _check_token("that `ray start` last made on this machine" if named == "auto" else f"at {named}", host, port,
                 client=target.startswith("ray://"), timeout_s=deadline - time.monotonic())
    log.info("joining the Ray cluster at %s", target)
    _init_within(target, max(0.1, deadline - time.monotonic()), waited_s=timeout_s, **kwargs)
    atexit.register(_uninterrupted_exit)
    return False


def free_resources() -> str:
    """What the connected cluster has free of what it has, e.g. "0.0 of 2.0 CPUs, 0.0 of 0.0 GPUs free"."""
    free, total = ray.available_resources(), ray.cluster_resources()
    return ", ".join(f"{free.get(r, 0.0):.1f} of {total.get(r, 0.0):.1f} {r}s" for r in ("CPU", "GPU")) + " free"
