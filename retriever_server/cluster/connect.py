"""Joining a Ray cluster, the same way for every job: the cluster at `address`, else RAY_ADDRESS (which
`ray job submit` sets for a job's entry point), else a new local cluster on this machine. A command
never joins by surprise a cluster that `ray start` left on the machine; `address="auto"` joins that one
on purpose."""

from __future__ import annotations

import logging
import os

import ray

LOCAL = "local"  # ray.init's name for "start a new local cluster", whatever clusters this machine has
# Ray announces at WARNING, from this logger, that a new local cluster uses token authentication (its
# default in the Ray this project pins: the token is made once in ~/.ray/auth_token). That is the setting the project
# wants, so a cluster a command starts for itself does not repeat it; RAY_AUTH_MODE still decides.
AUTH_NOTICE_LOGGER = "ray._private.authentication.authentication_token_setup"


def connect(address: str | None = None, num_cpus: int | None = None, existing: bool = False,
            log_to_driver: bool = True) -> None:
    """Connects this process to Ray unless it is already.

    Args:
        address: a cluster address, or "auto" for the cluster `ray start` made on this machine; None:
            RAY_ADDRESS when set, else a new local cluster.
        num_cpus: CPUs of a new local cluster (ignored when joining one).
        existing: with no address and no RAY_ADDRESS, join the cluster started on this machine ("auto":
            ConnectionError if there is none) instead of starting one.
        log_to_driver: show the workers' output here.
    """
    if ray.is_initialized():
        return
    target = address or os.environ.get("RAY_ADDRESS") or ("auto" if existing else LOCAL)
    starting = target == LOCAL
    notice = logging.getLogger(AUTH_NOTICE_LOGGER)
    level = notice.level
    if starting:
        notice.setLevel(logging.ERROR)
    try:
        ray.init(address=target, num_cpus=num_cpus if starting else None, include_dashboard=False,
                 logging_level=logging.WARNING, log_to_driver=log_to_driver)
    finally:
        notice.setLevel(level)
