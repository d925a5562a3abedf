"""The build job on a simulated 3-node cluster: its shard tasks are spread over the nodes, and the
manifest records where each shard was built."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import simulated_cluster, synthetic

from retriever_server.datastore.build import BuildConfig, build_datastore

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def test_build_places_shards_on_different_nodes(tmp_path):
    import ray

    np.save(tmp_path / "keys.npy", synthetic(6000, 16))
    with simulated_cluster(workers=2, cpus=4):  # room for every shard on the head: only SPREAD spreads them
        manifest = build_datastore(BuildConfig(keys=tmp_path / "keys.npy", out=tmp_path / "ds", shards=3,
                                               factory="IVF16,Flat"), progress=False)
        alive = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
    assert len(set(manifest.build["nodes"])) == 3 and set(manifest.build["nodes"]) <= alive
