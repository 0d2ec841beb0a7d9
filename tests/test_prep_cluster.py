"""`kiln prep` across a real two-node Ray cluster (ray.cluster_utils: head + worker node on this machine)."""

from __future__ import annotations

import json

import pytest
from test_prep_e2e import build_corpus, config

pytestmark = pytest.mark.slow


def test_prep_on_a_two_node_cluster(tmp_path):
    import ray
    from ray.cluster_utils import Cluster

    from data_prep.runner import prep

    want = build_corpus(tmp_path / "corpus")
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    cluster.add_node(num_cpus=1)
    try:
        cfg = config(tmp_path / "corpus", workers=2, ray_address=cluster.address)
        summary = prep([str(tmp_path / "corpus")], tmp_path / "out", cfg)  # joins the cluster via ray_address
        assert not ray.is_initialized()  # prep shut its connection down; the cluster itself stays up
        ray.init(address=cluster.address)
        assert len([n for n in ray.nodes() if n["Alive"]]) == 2
        one = prep([str(tmp_path / "corpus")], tmp_path / "one", config(tmp_path / "corpus", workers=1))  # reuses this connection
        ray.shutdown()
    finally:
        cluster.shutdown()
    assert summary["counts"]["documents_kept"] == want["kept"]
    assert summary["counts"]["removed"] == want["removed"]
    assert summary["digest"] == one["digest"]
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["config"]["workers"] == 2 and "ray_address" not in manifest["config"]
