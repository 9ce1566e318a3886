"""End-to-end encode job throughput with the tiny models on this machine, and peak memory of the job's processes.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_pipeline.py [--videos 24 --images 24 --jdb 16]

Generates sample data (real mp4s, images, HTTP-served LAION URLs), runs `pipelines/encode_latents.py` in a
subprocess on an embedded Ray (4 logical CPUs, 400 MB object store), polls the RSS of the driver and every
process under it, and prints samples/s (from the job's own summary) and the peak memory.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def tree_rss(proc: psutil.Process) -> tuple[int, int]:
    """(driver RSS, driver + all descendants RSS) in bytes."""
    try:
        own = proc.memory_info().rss
        kids = proc.children(recursive=True)
    except psutil.NoSuchProcess:
        return 0, 0
    total = own
    for kid in kids:
        try:
            total += kid.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return own, total


def main(argv=None) -> int:
    from encoders.models import write_tiny_models
    from pipelines.tools.sample_data import generate
    from pipelines.tools.serve import serve_in_thread
    from tests.pipelines.job.helpers import job_config

    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--videos", type=int, default=24)
    parser.add_argument("--images", type=int, default=24)
    parser.add_argument("--jdb", type=int, default=16)
    parser.add_argument("--stage", default="256x256")
    parser.add_argument("--num-frames", type=int, default=16)
    parser.add_argument(
        "--shard-tasks", type=int, default=None, help="shard tasks at once (default: the job's)"
    )
    parser.add_argument(
        "--rows-per-unit", type=int, default=None, help="rows decoded together (default: the job's)"
    )
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        generate(str(tmp / "data"), seed=0, videos=args.videos, images=args.images, jdb_images=args.jdb)
        write_tiny_models(str(tmp / "models"), seed=0)
        server = serve_in_thread(str(tmp / "data"))
        try:
            config = job_config(tmp / "data", tmp / "models", tmp / "shards", server.url)
            for src in config["sources"]:
                src.update(resolutions=[args.stage], rows_per_shard=16)
            config["decode"]["num_frames"] = args.num_frames
            config["ray"].update(object_store_memory_mb=400)
            if args.shard_tasks:
                config["ray"]["shard_tasks"] = args.shard_tasks
            if args.rows_per_unit:
                config["ray"]["rows_per_unit"] = args.rows_per_unit
            (tmp / "job.yaml").write_text(yaml.safe_dump(config))
            cmd = [
                sys.executable,
                str(REPO / "pipelines" / "encode_latents.py"),
                "--config",
                str(tmp / "job.yaml"),
            ]
            cmd += ["--summary-json", str(tmp / "summary.json")]
            start = time.perf_counter()
            proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            ps = psutil.Process(proc.pid)
            peak_driver = peak_tree = 0
            while proc.poll() is None:
                own, total = tree_rss(ps)
                peak_driver, peak_tree = max(peak_driver, own), max(peak_tree, total)
                time.sleep(0.25)
            wall = time.perf_counter() - start
        finally:
            server.stop()
        if proc.returncode != 0:
            print(f"job failed: exit {proc.returncode}")
            return 1
        summary = json.loads((tmp / "summary.json").read_text())
    run = summary["this_run"]
    samples = sum(summary["total"]["samples"].values())
    print(f"rows {run['rows']}  samples {samples}  stage {args.stage}  video frames {args.num_frames}")
    print(f"wall (process, incl. Ray start + model load): {wall:.1f} s")
    print(f"job summary: {run['seconds']} s, {run['samples_per_s']} samples/s, {run['rows_per_s']} rows/s")
    print(
        f"planned after {run['planned_after_s']} s (Ray start, planning tasks; the encoders load meanwhile)"
    )
    print(f"steady {run['steady_samples_per_s']} samples/s (from the first shard task to the last summary)")
    print(
        f"peak RSS: driver {peak_driver / 2**20:.0f} MiB, driver + Ray processes {peak_tree / 2**20:.0f} MiB"
    )
    print(f"encoder actors: {run['encoders']}")
    print(f"shard task seconds by part (summed over tasks): {run['task_seconds']}")
    writers = {s["writer_pid"] for s in summary["shards"]}
    print(f"shards written by {len(writers)} worker processes, none by the driver ({summary['driver_pid']})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
