"""Helpers for the encode-job tests: a small job config on the sample data, running it, reading its shards."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pyarrow.parquet as pq
import yaml

REPO = Path(__file__).resolve().parents[3]
SOURCES = ("webvid", "laion_coco", "jdb")
STAGE = "256x256"


def job_config(data: Path, models: Path, out: Path, server_url: str, **overrides) -> dict:
    """The job on all three sample datasets at 256x256, tiny models, a small embedded Ray."""
    expected = json.loads((data / "expected.json").read_text())
    config = {
        "out_dir": str(out),
        "seed": 0,
        "models": {"model_dir": str(models), "tiny": True, "device": "cpu", "image_tokens": True},
        "sources": [
            {
                "name": "webvid",
                "manifest": str(data / expected["webvid"]["manifest"]),
                "media_root": str(data / expected["webvid"]["media_root"]),
                "resolutions": [STAGE],
                "rows_per_shard": 5,
            },
            {
                "name": "laion_coco",
                "manifest": str(data / expected["laion_coco"]["manifest"]),
                "url_rewrite": {expected["laion_coco"]["url_prefix"]: server_url + "/"},
                "resolutions": [STAGE],
                "rows_per_shard": 5,
            },
            {
                "name": "jdb",
                "manifest": str(data / expected["jdb"]["manifest"]),
                "resolutions": [STAGE],
                "rows_per_shard": 5,
            },
        ],
        "fetch": {
            "connect_timeout_s": 5,
            "read_timeout_s": 10,
            "total_timeout_s": 30,
            "retries": 1,
            "backoff_s": 0.1,
            "allowed_hosts": [server_url.removeprefix("http://")],  # the test server: loopback, so explicit
        },
        "decode": {"num_frames": 8, "frame_stride": 2, "timeout_s": 60, "memory_limit_mb": 4096},
        "filters": {"max_punsafe": 0.5},
        "dedup": {"enabled": True, "threshold": 0.99999},
        "ray": {
            "address": "local",
            "num_cpus": 4,
            "object_store_memory_mb": 300,
            "shard_tasks": 3,
            "encode_actors": 1,
            "encode_batch_size": 8,
            "progress": False,
        },
    }
    for key, value in overrides.items():
        config[key] = value
    return config


def write_config(path: Path, config: dict) -> Path:
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def job_env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", RAY_USAGE_STATS_ENABLED="0", HF_HUB_OFFLINE="1")
    env["PYTHONPATH"] = str(REPO)
    return env


def job_command(config_path: Path, summary: Path | None = None) -> list[str]:
    cmd = [sys.executable, str(REPO / "pipelines" / "encode_latents.py"), "--config", str(config_path)]
    return cmd + (["--summary-json", str(summary)] if summary else [])


def run_job(config_path: Path, summary: Path, timeout: float = 400) -> dict:
    """Run the job to the end in a subprocess; its summary (AssertionError with the output if it failed)."""
    proc = subprocess.run(
        job_command(config_path, summary),
        cwd=REPO,
        env=job_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, (
        f"encode job failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}"
    )
    return json.loads(summary.read_text())


def expected_outcome(data: Path) -> dict:
    """Per source: every row key, and {key: (stage, reason)} of the rows that must be error rows."""
    expected = json.loads((data / "expected.json").read_text())
    out = {}
    for source in SOURCES:
        info = expected[source]
        errors = {k: (d["stage"], d["reason"]) for k, d in info["defects"].items()}
        for key in info.get("high_punsafe", []):  # the job config filters punsafe > 0.5
            errors[key] = ("filter", "punsafe")
        out[source] = {"keys": list(info["keys"]), "rows": info["rows"], "errors": errors}
    return out


def read_output(out: Path) -> dict:
    """Everything written: per source the sample keys (from the tars), index rows, error rows, tar members."""
    result = {s: {"samples": [], "index": [], "errors": [], "members": {}} for s in SOURCES}
    for tar_path in sorted(out.glob("*.tar")):
        source = tar_path.name.split("-")[0]
        index = out / tar_path.name.replace(".tar", ".index.parquet")
        assert index.exists(), f"{tar_path.name} has no index: the shard is unfinished"
        with tarfile.open(tar_path) as tar:
            for member in tar.getmembers():
                key, _, name = member.name.partition(".")
                result[source]["members"].setdefault(key, {})[name] = tar.extractfile(member).read()
        result[source]["index"] += pq.read_table(index).to_pylist()
        errors = out / tar_path.name.replace(".tar", ".errors.parquet")
        result[source]["errors"] += pq.read_table(errors).to_pylist()
    for source in SOURCES:
        result[source]["samples"] = sorted(result[source]["members"])
    return result
