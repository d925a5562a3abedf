"""Joining Ray as every command does: a command that starts its own local cluster uses Ray's token
authentication without Ray's notice about it on every job."""

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.ray

STARTS_ONE = """
import ray
from retriever_server.cluster.connect import connect
connect(num_cpus=1)
print("nodes", len(ray.nodes()))
ray.shutdown()
"""


def test_a_new_local_cluster_starts_quietly():
    env = {"PATH": "/usr/bin:/bin", "HOME": str(Path.home())}  # no RAY_ADDRESS, no RAY_AUTH_MODE
    done = subprocess.run([sys.executable, "-c", STARTS_ONE], capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0, done.stderr
    assert "nodes 1" in done.stdout
    assert "Token authentication" not in done.stderr, done.stderr
