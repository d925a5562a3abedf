"""Joining a Ray cluster, the same way for every job: the one at `address`, else RAY_ADDRESS (which
`ray job submit` sets for a job's entry point), else a new local cluster on this machine."""

from __future__ import annotations

import logging
import os

import ray


def connect(address: str | None = None, num_cpus: int | None = None, existing: bool = False,
            log_to_driver: bool = True) -> None:
    """Connects this process to Ray unless it is already.

    Args:
        address: a cluster address; None: RAY_ADDRESS when set, else a new local cluster.
        num_cpus: CPUs of a new local cluster (ignored when joining one).
        existing: with no address, join the cluster started on this machine ("auto": ConnectionError
            if there is none) instead of starting one.
        log_to_driver: show the workers' output here.
    """
    if ray.is_initialized():
        return
    target = address or ("auto" if existing else None)
    joining = bool(target or os.environ.get("RAY_ADDRESS"))
    ray.init(address=target, num_cpus=None if joining else num_cpus, include_dashboard=False,
             logging_level=logging.WARNING, log_to_driver=log_to_driver)
