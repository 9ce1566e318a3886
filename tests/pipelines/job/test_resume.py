"""Faults: the driver or a shard-writing worker killed with SIGKILL mid-run; the end state equals an uninterrupted run."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq

from tests.pipelines.job.helpers import (
    REPO,
    SOURCES,
    job_command,
    job_config,
    job_env,
    read_output,
    run_job,
    write_config,
)


def _outcome(out):
    result = read_output(out)  # opens every tar (each must be readable and have its index)
    for source in SOURCES:
        keys = [r["key"] for r in result[source]["index"]] + [e["key"] for e in result[source]["errors"]]
        assert len(keys) == len(set(keys)), f"{source}: a key written twice"
    return {
        s: (result[s]["samples"], sorted((e["key"], e["stage"], e["reason"]) for e in result[s]["errors"]))
        for s in SOURCES
    }


def test_kill_9_mid_run_then_rerun_matches_an_uninterrupted_run(
    tmp_path, encoded_shards, sample_data, sample_server, tiny_models
):
    out = tmp_path / "shards"
    job = job_config(sample_data, tiny_models, out, sample_server)
    job["ray"]["encode_batch_size"] = 2  # shards complete one after another, not in one burst
    config = write_config(tmp_path / "job.yaml", job)
    proc = subprocess.Popen(
        job_command(config), cwd=REPO, env=job_env(), start_new_session=True,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and proc.poll() is None:
            if any(out.glob("*.index.parquet")):  # mid-run: a shard done, others not
                break
            time.sleep(0.02)
        assert proc.poll() is None, "the job ended before it could be killed"
        os.killpg(proc.pid, signal.SIGKILL)  # the driver and everything it started in its session
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    done_before = {p.name for p in out.glob("*.index.parquet")}
    total_shards = len(list(encoded_shards.out_dir.glob("*.index.parquet")))
    assert 1 <= len(done_before) < total_shards

    summary = run_job(config, tmp_path / "summary.json")
    assert summary["this_run"]["shards_skipped"] == len(done_before)
    assert summary["this_run"]["shards_written"] == total_shards - len(done_before)
    assert _outcome(out) == _outcome(encoded_shards.out_dir)
    assert not [p for p in out.rglob("*") if ".tmp-" in p.name], "temp files left behind"

    again = run_job(config, tmp_path / "summary2.json")  # everything done: nothing to redo
    assert again["this_run"]["shards_written"] == 0 and again["this_run"]["rows"] == 0
    assert again["total"] == summary["total"]


def _writer_pids(out) -> set[int]:
    """Processes holding an open temp file under `out` (a shard task mid-shard), from /proc/*/fd."""
    pids = set()
    for fd_dir in Path("/proc").glob("[0-9]*/fd"):
        try:
            for fd in fd_dir.iterdir():
                target = os.readlink(fd)
                if target.startswith(str(out)) and ".tmp-" in target:
                    pids.add(int(fd_dir.parent.name))
        except OSError:  # the process ended, or is not ours to read
            continue
    return pids


def test_kill_9_of_a_writing_worker_mid_shard_is_retried(
    tmp_path, encoded_shards, sample_data, sample_server, tiny_models
):
    out = tmp_path / "shards"
    job = job_config(sample_data, tiny_models, out, sample_server)
    job["ray"]["encode_batch_size"] = 2
    config = write_config(tmp_path / "job.yaml", job)
    proc = subprocess.Popen(
        job_command(config, tmp_path / "summary.json"), cwd=REPO, env=job_env(), start_new_session=True,
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    killed = None
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and proc.poll() is None and killed is None:
            pids = _writer_pids(out) - {proc.pid}
            if pids:
                killed = min(pids)
                os.kill(killed, signal.SIGKILL)
            time.sleep(0.01)
        assert killed is not None, "no worker was seen writing a shard"
        _, stderr = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0, stderr[-4000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert killed not in {
        s["writer_pid"] for s in summary["shards"]
    }  # its shard was redone by another worker
    assert summary["driver_pid"] == proc.pid and summary["unfinished_shards"] == []
    assert _outcome(out) == _outcome(encoded_shards.out_dir)
    assert not [p for p in out.rglob("*") if ".tmp-" in p.name], "temp files left behind"


def test_kill_9_of_the_driver_during_dedup_then_rerun_matches_an_uninterrupted_dedup(
    tmp_path, encoded_shards, sample_data, sample_server, tiny_models
):
    """Every shard done already: the job goes straight to the dedup step, is killed there, and rerun."""
    out = tmp_path / "shards"
    shutil.copytree(encoded_shards.out_dir, out, ignore=shutil.ignore_patterns("dedup", "summary.json"))
    reference = tmp_path / "reference"
    shutil.copytree(out, reference)
    threshold = 0.995  # the tiny random encoders put many unrelated images this close: a non-trivial result
    cli = [sys.executable, "-m", "pipelines.cli", "dedup", str(reference), "--threshold", str(threshold)]
    subprocess.run(cli, cwd=REPO, env=job_env(), check=True, capture_output=True, timeout=300)

    job = job_config(sample_data, tiny_models, out, sample_server)
    job["dedup"] = {"enabled": True, "threshold": threshold, "embedding": "image"}
    config = write_config(tmp_path / "job.yaml", job)
    proc = subprocess.Popen(
        job_command(config), cwd=REPO, env=job_env(), start_new_session=True,
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )  # fmt: skip
    try:
        for line in proc.stdout:
            if line.startswith("encode: dedup step"):
                os.killpg(proc.pid, signal.SIGKILL)
                break
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == -signal.SIGKILL, "the job ended before its dedup step could be killed"

    summary = run_job(config, tmp_path / "summary.json")
    assert summary["this_run"]["shards_written"] == 0
    results = sorted(p.name for p in (reference / "dedup").iterdir())
    assert results and sorted(p.name for p in (out / "dedup").iterdir()) == results
    removed = 0
    for name in results:
        got, want = pq.read_table(out / "dedup" / name), pq.read_table(reference / "dedup" / name)
        assert got.equals(want), name
        removed += got.num_rows
    assert removed > 0 and sum(summary["total"]["removed_by_dedup"].values()) == removed
    assert not [p for p in out.rglob("*") if ".tmp-" in p.name], "temp files left behind"
