"""The write stage on Ray workers: samples/s into tars with 1, 2 or 4 writer tasks, and the driver's CPU per sample.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_sink.py --writers 1 2 4 [--samples 1200 --shard 100]

Real-size encoded rows (a 256x256x16 video: latent mean+std 2x[4,16,32,32] fp16, text tokens [77,1024],
image tokens [257,1280], pooled [1024]; ~1.1 MB) are put in Ray's object store first, in batches of 8 as the
encoder actors return them. Then, for each writer count W, W shard tasks run at once, each taking its batches
from the object store and writing its output shards with the job's own ShardSink (tar, errors, embeddings
part, index) to local disk, as `pipelines/job/shard.py` does; the driver only submits tasks and collects
their summaries. Prints one JSON line per W: samples/s, the writers' CPU seconds and the driver's CPU
seconds per 1000 samples (and as a share of the writers').
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pipelines.stages.rows import new_row, rows_of, table_of  # noqa: E402
from pipelines.stages.write import ShardSink  # noqa: E402
from shards.format import encode_npy  # noqa: E402


def encoded_rows(n: int, shard: int, rows: int, seed: int) -> list[dict]:
    """n job rows as the encoder actor returns them (npy members ready for the tar), real encoder sizes."""
    rng = np.random.default_rng(seed)
    f16 = lambda *s: rng.standard_normal(s, dtype=np.float32).astype(np.float16)  # noqa: E731
    out = []
    for i in range(n):
        key = f"webvid_{seed}_{i}"
        out.append(
            new_row(
                key=key, source="webvid", origin_key=key, uri=f"/videos/{key}.mp4", caption="a red bird",
                kind="video", stage="256x256", shard=shard, shard_rows=rows, out_width=256, out_height=256,
                frame_indices=list(range(0, 64, 4)), src_fps=25.0, sample_fps=6.25, frame_stride=4,
                latent_npy=encode_npy(f16(4, 16, 32, 32)), latent_std_npy=encode_npy(f16(4, 16, 32, 32)),
                text_tokens_npy=encode_npy(f16(77, 1024)), text_pooled_npy=encode_npy(f16(1024)),
                image_tokens_npy=encode_npy(f16(257, 1280)), image_pooled_npy=encode_npy(f16(1024)),
                latent_shape=[4, 16, 32, 32], text_tokens_shape=[77, 1024], image_tokens_shape=[257, 1280],
                scale_factor=0.18215, vae_id="vae", text_encoder_id="text", image_encoder_id="image",
            )
        )  # fmt: skip
    return out


def write_shard(out_dir: str, shard: int, batches: list) -> dict:
    """A writer task: its encoded batches from the object store -> one output shard; returns its summary."""
    import ray

    cpu = time.process_time()
    rows = [rows_of(ray.get(ref)) for ref in batches]
    sink = ShardSink(out_dir, "webvid", "256x256", shard, expected=sum(map(len, rows)), embeddings=True)
    for part in rows:
        sink.add(part)
    summary = sink.close()
    return {"samples": summary["samples"], "bytes": summary["bytes"], "cpu_s": time.process_time() - cpu}


def _run(remote, refs: list, out: str, writers: int) -> dict:
    """Write every shard with at most `writers` tasks at once; the figures of that run."""
    import ray

    wall, cpu = time.perf_counter(), time.process_time()
    pending, done, queue = [], [], list(range(len(refs)))
    while queue or pending:
        while queue and len(pending) < writers:
            k = queue.pop(0)
            pending.append(remote.remote(out, k, refs[k]))
        ready, pending = ray.wait(pending, num_returns=1)
        done += ray.get(ready)
    wall, driver_cpu = time.perf_counter() - wall, time.process_time() - cpu
    samples, writer_cpu = sum(d["samples"] for d in done), sum(d["cpu_s"] for d in done)
    shutil.rmtree(out, ignore_errors=True)
    os.sync()  # no dirty pages of this run left for the kernel to write back during the next
    return {
        "writers": writers, "samples": samples, "seconds": round(wall, 2),
        "samples_per_s": round(samples / wall, 1), "mb_per_s": round(sum(d["bytes"] for d in done) / wall / 1e6, 1),
        "writer_cpu_s_per_1000": round(writer_cpu / samples * 1000, 3),
        "driver_cpu_s_per_1000": round(driver_cpu / samples * 1000, 4),
        "driver_cpu_share": round(driver_cpu / writer_cpu, 4),
    }  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--writers", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--samples", type=int, default=1200, help="samples written per writer count")
    parser.add_argument("--shard", type=int, default=100, help="samples per output shard")
    parser.add_argument(
        "--repeats", type=int, default=3, help="rounds over the writer counts (medians reported)"
    )
    parser.add_argument("--dir", default=None, help="output folder (default: a temp folder, removed after)")
    args = parser.parse_args()
    import ray

    shards, batch = args.samples // args.shard, 8
    ray.init(num_cpus=max(args.writers), include_dashboard=False, log_to_driver=False,
             object_store_memory=int(args.samples * 1.3e6) + (200 << 20))  # fmt: skip
    # every shard's rows in the object store before timing (what the encoder actors leave there)
    refs = []
    for k in range(shards):
        rows = encoded_rows(args.shard, k, args.shard, seed=k)
        refs.append([ray.put(table_of(rows[i : i + batch])) for i in range(0, len(rows), batch)])
    remote = ray.remote(write_shard).options(num_cpus=1)
    root = args.dir or tempfile.mkdtemp(prefix="lc_bench_sink_")
    warm = [remote.remote(os.path.join(root, f"warm{i}"), 0, refs[0][:1]) for i in range(max(args.writers))]
    ray.get(warm)  # every worker process started and its imports done before timing
    runs: dict[int, list[dict]] = {w: [] for w in args.writers}
    try:
        for r in range(args.repeats):  # counts interleaved, order rotated: noise and warm-up hit each alike
            for writers in args.writers[r % len(args.writers) :] + args.writers[: r % len(args.writers)]:
                runs[writers].append(_run(remote, refs, os.path.join(root, f"w{writers}"), writers))
                print(json.dumps(runs[writers][-1]), flush=True)
    finally:
        if not args.dir:
            shutil.rmtree(root, ignore_errors=True)
        ray.shutdown()
    median = {w: sorted(r, key=lambda x: x["samples_per_s"])[len(r) // 2] for w, r in runs.items()}
    base = median[args.writers[0]]["samples_per_s"]
    print(json.dumps({
        "median_samples_per_s": {w: m["samples_per_s"] for w, m in median.items()},
        "speedup_vs_first": {w: round(m["samples_per_s"] / base, 2) for w, m in median.items()},
        "driver_cpu_share": {w: m["driver_cpu_share"] for w, m in median.items()},
    }))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
