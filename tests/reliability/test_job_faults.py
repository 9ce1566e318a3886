"""The encode job under faults: a worker SIGKILLed in each stage, the encoder actor killed, a shard whose writes
the kernel refuses (RLIMIT_FSIZE, the failure path of a full disk). Every row ends accounted exactly once."""

from __future__ import annotations

import json
import subprocess

from tests.pipelines.job.helpers import job_command, job_config, job_env, run_job, write_config
from tests.pipelines.job.test_resume import _outcome

STAGE = "256x256"


def test_kills_in_every_stage_and_a_refused_write_lose_no_row(
    tmp_path, encoded_shards, sample_data, sample_server, tiny_models
):
    out = tmp_path / "shards"
    config = write_config(tmp_path / "job.yaml", job_config(sample_data, tiny_models, out, sample_server))
    markers = tmp_path / "markers"
    markers.mkdir()
    faults = {
        "dir": str(markers),
        "kill": [
            f"read:webvid/{STAGE}/0",
            f"fetch:laion_coco/{STAGE}/0",
            f"decode:jdb/{STAGE}/0",
            f"write:webvid/{STAGE}/1",
            "encode_actor",
        ],
        "fsize": {f"laion_coco/{STAGE}/1": 2048},  # the shard's tar cannot grow past 2 KiB
    }
    env = {**job_env(), "LATENTCRAFTER_TEST_FAULTS": json.dumps(faults)}
    first = subprocess.run(
        job_command(config, tmp_path / "summary1.json"), cwd=tmp_path, env=env, capture_output=True, text=True,
        timeout=400,
    )  # fmt: skip
    fired = sorted(p.name for p in markers.iterdir())
    assert len(fired) == 6, (fired, first.stderr[-4000:])  # every fault happened
    # the killed workers' shards and the killed actor's calls were retried by Ray; the refused write was not
    # retryable: the job names the shard, the file system error and what to do, and leaves it unfinished
    assert first.returncode != 0
    assert f"laion_coco-{STAGE}-000001 failed, rerun the job to redo it" in first.stderr
    assert "File too large" in first.stderr
    summary = json.loads((tmp_path / "summary1.json").read_text())
    assert [(s["source"], s["shard"]) for s in summary["unfinished_shards"]] == [("laion_coco", 1)]
    assert not (out / f"laion_coco-{STAGE}-000001.tar").exists()
    assert not [p for p in out.rglob("*") if ".tmp-" in p.name], "temp files left behind"

    run_job(config, tmp_path / "summary2.json")  # the rerun does only that shard, and completes
    assert _outcome(out) == _outcome(encoded_shards.out_dir)
