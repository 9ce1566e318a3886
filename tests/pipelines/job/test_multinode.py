"""The job on a two-node local Ray cluster: shards are written by worker processes on both nodes, none by the driver (lean profile)."""

from __future__ import annotations

import subprocess

import pytest

from shards.profiles import PROFILES
from tests.pipelines.job.helpers import (
    REPO,
    expected_outcome,
    job_command,
    job_config,
    job_env,
    read_output,
    run_job,
    write_config,
)


@pytest.fixture
def two_nodes():
    """A head and a second node (`ray.cluster_utils.Cluster`: separate raylets on 127.0.0.1), 2 CPUs each."""
    from ray.cluster_utils import Cluster

    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 2, "include_dashboard": False, "object_store_memory": 150 << 20},
    )
    cluster.add_node(num_cpus=2, object_store_memory=150 << 20)
    cluster.wait_for_nodes()
    try:
        yield cluster
    finally:
        cluster.shutdown()


def test_shards_are_written_on_both_nodes_not_by_the_driver(
    tmp_path, two_nodes, sample_data, sample_server, tiny_models
):
    out = tmp_path / "shards"
    config = job_config(sample_data, tiny_models, out, sample_server)
    config["ray"].update(address=two_nodes.address, shard_tasks=3, num_cpus=None, object_store_memory_mb=None)
    config["dedup"]["enabled"] = False
    config["storage"] = "lean"  # the profile reaches the encoder actors on both nodes
    summary = run_job(write_config(tmp_path / "job.yaml", config), tmp_path / "summary.json")

    shards = summary["shards"]
    assert len(shards) == summary["this_run"]["shards_written"] == len(list(out.glob("*.index.parquet")))
    assert len({s["writer_node"] for s in shards}) == 2, "every shard was written on one node"
    assert all(s["writer_pid"] != summary["driver_pid"] for s in shards)
    expected = expected_outcome(sample_data)
    written = read_output(out)
    for source, want in expected.items():
        assert len(written[source]["samples"]) + len(written[source]["errors"]) == want["rows"], source
        assert {r["storage_profile"] for r in written[source]["index"]} == {str(PROFILES["lean"])}
        for members in written[source]["members"].values():
            assert set(members) == {
                "latent.npy",
                "txt",
                "json",
                "text_pooled.npy",
                "image_pooled.npy",
                "cond_frame.jpg",
            }

    # a rerun over these shards with another profile is refused before any work, naming them
    config["storage"] = "full"
    proc = subprocess.run(
        job_command(write_config(tmp_path / "full.yaml", config), tmp_path / "s2.json"),
        cwd=REPO, env=job_env(), capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode != 0
    assert "another storage profile than this job's full" in proc.stderr and "(lean)" in proc.stderr
