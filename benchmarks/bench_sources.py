"""Benchmark of the dataset readers on synthetic manifests: rows/s of a whole read and the cost of a late slice.

    .venv/bin/python benchmarks/bench_sources.py [--rows 200000] [--dir /tmp/lc_bench_sources]

Writes (once, reused while --rows matches) a WebVid CSV, a LAION-COCO parquet and a JourneyDB JSONL of
ROWS rows each, then prints for each reader: rows/s of `read()`, the time of the first slice past row 0
(it builds the duplicate-key map: one scan of the manifest per reader object) and of a second slice.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipelines.sources import input_shards, make_reader


def write_manifests(folder: str, rows: int) -> dict[str, str]:
    os.makedirs(folder, exist_ok=True)
    paths = {
        "webvid": os.path.join(folder, f"results_{rows}.csv"),
        "laion_coco": os.path.join(folder, f"part-{rows}.snappy.parquet"),
        "jdb": os.path.join(folder, f"anno_{rows}.jsonl"),
    }
    if all(os.path.exists(p) for p in paths.values()):
        return paths
    with open(paths["webvid"], "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["videoid", "name", "page_idx", "page_dir", "duration", "contentUrl"])
        for i in range(rows):
            writer.writerow(
                [
                    i + 1,
                    f"caption {i}, a slow aerial shot",
                    1,
                    "000001_000050",
                    "PT00H00M17S",
                    f"http://x/{i}.mp4",
                ]
            )
    hashes = np.random.default_rng(0).integers(-(2**63), 2**63 - 1, rows, dtype=np.int64)
    table = pa.table(
        {
            "URL": [f"http://x/{i}.jpg" for i in range(rows)],
            "TEXT": ["alt text"] * rows,
            "top_caption": [f"caption {i}" for i in range(rows)],
            "hash": hashes,
            "similarity": np.full(rows, 0.3),
            "punsafe": np.full(rows, 0.01),
            "pwatermark": np.full(rows, 0.1),
            "WIDTH": np.full(rows, 512),
            "HEIGHT": np.full(rows, 384),
        }
    )
    pq.write_table(table, paths["laion_coco"], row_group_size=100_000)
    with open(paths["jdb"], "w") as f:
        for i in range(rows):
            row = {
                "img_path": f"./000/{i:032x}.jpg",
                "prompt": f"prompt {i}",
                "Task2": {"Caption": f"cap {i}"},
            }
            f.write(json.dumps(row) + "\n")
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=int, default=200_000, help="rows per synthetic manifest")
    parser.add_argument("--dir", default="/tmp/lc_bench_sources", help="where the manifests are written")
    args = parser.parse_args()
    paths = write_manifests(args.dir, args.rows)
    print(f"{'reader':<11} {'rows/s (whole read)':>20} {'1st late slice s':>17} {'2nd late slice s':>17}")
    for source, path in paths.items():
        reader = make_reader(source, path)
        start = time.perf_counter()
        count = sum(1 for _ in reader.read())
        whole = time.perf_counter() - start
        shards = input_shards(reader.num_rows, max(1, reader.num_rows // 10))
        timings = []
        for rows in (shards[-1], shards[-2]):
            start = time.perf_counter()
            assert sum(1 for _ in reader.read(rows)) == len(rows)
            timings.append(time.perf_counter() - start)
        print(f"{source:<11} {count / whole:>20,.0f} {timings[0]:>17.2f} {timings[1]:>17.2f}")


if __name__ == "__main__":
    main()
