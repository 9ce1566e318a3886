"""Benchmark of `latentcrafter stats` fast mode on a synthetic 10M-row index: wall time and peak memory.

    .venv/bin/python benchmarks/bench_stats.py [--rows 10000000] [--files 100] [--dir /tmp/lc_bench_stats]

Writes (once, reused while --rows/--files match) FILES index parquet files of the real schema with
pyarrow, an errors parquet and a sparse placeholder tar beside each, then runs the CLI in a child
process and prints its wall time and peak RSS. Target on the dev machine: < 10 s and < 2 GiB.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
import zlib

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from schemas import ERROR_SCHEMA, SHARD_INDEX_SCHEMA
from shards.format import shard_stem

REASONS = [
    ("fetch", "http_404"),
    ("fetch", "timeout"),
    ("decode", "too_short"),
    ("filter", "min_resolution"),
    ("filter", "punsafe"),
    ("dedup", "duplicate_of:x"),
]


def _shape_column(shape: list[int], n: int) -> pa.Array:
    offsets = np.arange(0, (n + 1) * len(shape), len(shape), dtype=np.int32)
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(np.tile(np.int32(shape), n)))


def _strings(prefix: str, ids: np.ndarray) -> pa.Array:
    return pc.binary_join_element_wise(pa.scalar(prefix), pc.cast(pa.array(ids), pa.string()), "")


def make_index(source: str, stage: str, shard: int, n: int) -> pa.Table:
    """n index rows of plausible values (vectorised; no Python objects per row)."""
    rng = np.random.default_rng(zlib.crc32(f"{source}-{stage}-{shard}".encode()))
    video = source == "webvid"
    ids = np.arange(shard * n, (shard + 1) * n)
    w, h = (int(x) for x in stage.split("x"))
    duration = rng.lognormal(2.6, 0.6, n) if video else None
    fps = rng.choice(np.float32([23.976, 25, 29.97, 30]), n) if video else None
    words = rng.integers(3, 40, n, dtype=np.int32)
    full = lambda v, t: pa.array(np.full(n, v, t))  # noqa: E731
    nulls = lambda t: pa.nulls(n, t)  # noqa: E731
    latent = 4 * (16 if video else 1) * (h // 8) * (w // 8) * 2 + 128
    cols = {
        "key": _strings(f"{source}_", ids),
        "source": pa.array([source] * n, pa.string()),
        "origin_key": _strings("", ids),
        "kind": pa.array(["video" if video else "image"] * n, pa.string()),
        "shard": pa.array([shard_stem(source, stage, shard) + ".tar"] * n, pa.string()),
        "offset": pa.array(np.arange(n, dtype=np.int64) * 300_000),
        "stage": pa.array([stage] * n, pa.string()),
        "width": full(w, np.int32),
        "height": full(h, np.int32),
        "latent_shape": _shape_column([4, 16 if video else 1, h // 8, w // 8], n),
        "latent_dtype": pa.array(["float16"] * n, pa.string()),
        "text_tokens_shape": _shape_column([77, 1024], n),
        "image_tokens_shape": _shape_column([257, 1280], n),
        "num_frames": full(16 if video else 1, np.int32),
        "fps": pa.array(fps) if video else nulls(pa.float32()),
        "sample_fps": pa.array(fps / 6) if video else nulls(pa.float32()),
        "frame_stride": full(6, np.int32) if video else nulls(pa.int32()),
        "duration": pa.array(duration) if video else nulls(pa.float64()),
        "clip_duration": pa.array(np.minimum(duration, 16 * 6 / 25.0)) if video else nulls(pa.float64()),
        "orig_width": pa.array(rng.choice(np.int32([640, 1280, 1920, 512]), n)),
        "orig_height": pa.array(rng.choice(np.int32([360, 720, 1080, 512]), n)),
        "caption_words": pa.array(words),
        "caption_tokens": pa.array((words * 1.3).astype(np.int32) + 2),
        "similarity": nulls(pa.float32())
        if video
        else pa.array(rng.uniform(0.25, 0.4, n).astype(np.float32)),
        "punsafe": nulls(pa.float32()) if video else pa.array(rng.beta(1, 30, n).astype(np.float32)),
        "pwatermark": nulls(pa.float32()) if video else pa.array(rng.beta(1, 10, n).astype(np.float32)),
        "clip_score": pa.array(rng.uniform(0.2, 0.35, n).astype(np.float32)),
        "aesthetic": pa.array(rng.normal(5.5, 0.7, n).astype(np.float32)),
        "bytes_latent": full(2 * latent, np.int64),
        "bytes_text_tokens": full(77 * 1024 * 2 + 2176, np.int64),
        "bytes_image_tokens": full(257 * 1280 * 2 + 2176, np.int64),
        "bytes_image_frame": full(0, np.int64),
        "bytes_total": pa.array(2 * latent + 161_000 + 660_000 + rng.integers(1000, 3000, n)),
        "storage_profile": pa.array(["latent=mean+std,image=tokens,text=tokens"] * n, pa.string()),
        "logstd_offset": nulls(pa.float32()),
        "logstd_step": nulls(pa.float32()),
        "scale_factor": full(0.18215, np.float32),
        "vae_id": pa.array(["sd21-vae"] * n, pa.string()),
        "text_encoder_id": pa.array(["openclip-h"] * n, pa.string()),
        "image_encoder_id": pa.array(["clip-vit-h-14"] * n, pa.string()),
    }
    return pa.table([cols[f.name] for f in SHARD_INDEX_SCHEMA], schema=SHARD_INDEX_SCHEMA)


def make_errors(source: str, shard: int, n: int) -> pa.Table:
    rng = np.random.default_rng(shard)
    pick = rng.integers(0, len(REASONS), n)
    cols = {
        "key": _strings(f"{source}_e{shard}_", np.arange(n)),
        "source": pa.array([source] * n, pa.string()),
        "stage": pa.array([REASONS[i][0] for i in pick], pa.string()),
        "reason": pa.array([REASONS[i][1] for i in pick], pa.string()),
        "detail": pa.array(["synthetic"] * n, pa.string()),
        "uri": pa.nulls(n, pa.string()),
        "manifest": pa.nulls(n, pa.string()),
        "row": pa.array(np.arange(n, dtype=np.int64)),
    }
    return pa.table([cols[f.name] for f in ERROR_SCHEMA], schema=ERROR_SCHEMA)


def generate(out: str, rows: int, files: int) -> None:
    marker = os.path.join(out, "bench.json")
    if os.path.exists(marker) and json.load(open(marker)) == {"rows": rows, "files": files}:
        return
    os.makedirs(out, exist_ok=True)
    per = rows // files
    t0 = time.perf_counter()
    for i in range(files):
        source = "webvid" if i < files * 0.6 else "laion_coco" if i < files * 0.9 else "jdb"
        stage = "512x320" if source == "webvid" and i % 4 == 0 else "256x256"
        stem = os.path.join(out, shard_stem(source, stage, i))
        index = make_index(source, stage, i, per)
        pq.write_table(make_errors(source, i, per // 20), stem + ".errors.parquet")
        pq.write_table(index, stem + ".index.parquet")
        with open(stem + ".tar", "wb") as f:
            f.truncate(int(pc.sum(index.column("bytes_total")).as_py()))  # sparse: no disk used
    json.dump({"rows": rows, "files": files}, open(marker, "w"))
    print(f"generated {rows:,} rows in {files} index files under {out} in {time.perf_counter() - t0:.1f} s")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=10_000_000)
    p.add_argument("--files", type=int, default=100)
    p.add_argument("--dir", default="/tmp/lc_bench_stats")
    p.add_argument("--workers", type=int, default=0, help="passed to `stats --workers` (0: default)")
    args = p.parse_args(argv)
    generate(args.dir, args.rows, args.files)
    report = os.path.join(args.dir, "report.json")
    cmd = [
        sys.executable,
        "-m",
        "shards.stats",
        args.dir,
        "--json",
        report,
        "--quiet",
        "--workers",
        str(args.workers),
    ]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True)
    wall = time.perf_counter() - t0
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    peak = usage.ru_maxrss / 2**20  # KiB -> GiB
    totals = json.load(open(report))["totals"]
    assert totals["samples"] == args.rows // args.files * args.files, totals
    print(
        f"stats fast mode: {totals['samples']:,} rows, {totals['shards']} shards, {totals['errors']:,} error rows"
    )
    print(f"wall {wall:.2f} s (target < 10 s), peak RSS {peak:.2f} GiB (target < 2 GiB)")
    print(f"CPU time {usage.ru_utime + usage.ru_stime:.2f} s (user + sys, all threads; load-independent)")
    print("command: " + " ".join(cmd))
    return 0


if __name__ == "__main__":
    sys.exit(main())
