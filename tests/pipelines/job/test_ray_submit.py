"""`ray up` / `ray submit` / `ray down` for real: a provider-local cluster on 127.0.0.1 over SSH runs the job."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

import pyarrow.parquet as pq
import yaml

from tests.pipelines.job.helpers import REPO, job_config, write_config
from tests.pipelines.job.ray_submit_helpers import (
    USER,
    Traversable,
    authorize_key,
    cleanup_home,
    cluster_yaml,
    ensure_user,
    free_port,
    launcher_env,
    require_tools,
    run,
    start_sshd,
)


def test_cluster_file_is_a_valid_launcher_config():
    import jsonschema
    import ray.autoscaler

    config = yaml.safe_load((REPO / "ray_cluster.yaml").read_text())
    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(config, schema)  # the launcher's own schema (what `ray up` checks first)
    gpu = config["available_node_types"]["gpu_worker"]
    assert config["provider"]["type"] == "aws" and gpu["node_config"]["InstanceType"].startswith("g")
    assert any("pip install" in c and "latentcrafter" in c for c in config["setup_commands"])


def test_ray_submit_runs_the_job_on_a_local_provider_cluster(tmp_path, sample_data, tiny_models):
    require_tools()
    sshd = start_sshd()
    venv_bin = Path(sys.executable).parent
    ray_cli = str(venv_bin / "ray")
    # what the cluster user reads and writes lives outside root's private pytest folders
    work = Path(tempfile.mkdtemp(prefix="lc-submit-", dir="/tmp"))
    try:
        expected = json.loads((sample_data / "expected.json").read_text())["jdb"]
        shutil.copytree(sample_data / "jdb", work / "data" / "jdb")
        shutil.copytree(tiny_models, work / "models")
        (work / "shards").mkdir()
        config = job_config(sample_data, work / "models", work / "shards", "http://127.0.0.1:1")
        config["sources"] = [dict(config["sources"][2], manifest=str(work / "data" / expected["manifest"]))]
        config["ray"] = dict(config["ray"], address="auto", num_cpus=None, object_store_memory_mb=None)
        write_config(work / "job.yaml", config)
        subprocess.run(["chmod", "-R", "a+rwX", str(work)], check=True)

        home = ensure_user(venv_bin)
        key = authorize_key(home, tmp_path)
        name = f"lc-test-{uuid.uuid4().hex[:6]}"
        cluster = tmp_path / "cluster.yaml"
        cluster.write_text(cluster_yaml(name, key, free_port(), cpus=4))
        env = launcher_env()
        with Traversable(sys.executable), Traversable(str(venv_bin / "activate")):
            try:
                run([ray_cli, "up", "-y", "--no-config-cache", str(cluster)], timeout=300, env=env)
                submitted = run(
                    [ray_cli, "submit", str(cluster), str(REPO / "pipelines" / "encode_latents.py"), "--",
                     "--config", str(work / "job.yaml")],
                    timeout=400, env=env,
                )  # fmt: skip
            finally:
                down = run([ray_cli, "down", "-y", str(cluster)], timeout=120, check=False, env=env)
                cleanup_home(home)
                for path in Path("/tmp").glob(f"cluster-{name}.*"):
                    path.unlink()
                left = subprocess.run(
                    ["pgrep", "-u", USER, "-f", "raylet|gcs_server"], capture_output=True, text=True
                )
        assert "joined the Ray cluster" in submitted.stdout, submitted.stdout[-3000:]
        assert down.returncode == 0, down.stderr[-3000:]
        assert left.stdout.strip() == "", f"ray down left processes of {USER}: {left.stdout}"
        assert not list(home.glob("ray_bootstrap_*"))

        index = pq.read_table(work / "shards" / "jdb-256x256-000000.index.parquet").to_pylist()
        index += pq.read_table(work / "shards" / "jdb-256x256-000001.index.parquet").to_pylist()
        errors = [
            e
            for f in sorted((work / "shards").glob("*.errors.parquet"))
            for e in pq.read_table(f).to_pylist()
        ]
        assert {e["key"]: (e["stage"], e["reason"]) for e in errors} == {
            k: (d["stage"], d["reason"]) for k, d in expected["defects"].items()
        }
        assert sorted(r["key"] for r in index) == sorted(set(expected["keys"]) - set(expected["defects"]))
        owner = os.stat(work / "shards" / "jdb-256x256-000000.tar").st_uid
        assert owner != 0, "the job ran as root, not on the cluster user's head node"
    finally:
        shutil.rmtree(work, ignore_errors=True)
        for leftover in (f"/tmp/{USER}-ray/ray", f"/tmp/torchinductor_{USER}"):  # the cluster user's Ray logs
            shutil.rmtree(leftover, ignore_errors=True)
        if sshd is not None:
            sshd.terminate()
            sshd.wait(timeout=10)
