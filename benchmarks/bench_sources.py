"""Benchmark of manifest planning: one plan pass vs a bare parse, then first/middle/last shard reads as tasks do them.

    .venv/bin/python benchmarks/bench_sources.py --manifest results_10M_train.csv --source webvid --shard-rows 1000
    .venv/bin/python benchmarks/bench_sources.py --rows 10700000 --source webvid   # synthetic, deleted after
    .venv/bin/python benchmarks/bench_sources.py --rows 1000000 --source jdb

Plans the manifest in a fresh child process (its peak RSS, VmHWM, is the plan's), times
a bare pass over the same file (csv.reader over the text; for jdb a line loop with json.loads of the decoded line; for laion_coco
the URL and hash columns to Python), then reads the first, middle and last input shard each with a FRESH
reader, seeking to the span's offset with the span's duplicates, as a read task does. Prints one JSON line
(wall seconds, and the CPU seconds of plan and bare pass: steadier when other work shares the machine).
With --rows it first writes a synthetic manifest in the source's real format (captions with quoted commas,
embedded newlines, "" quotes and non-ASCII text; a few duplicate keys, including one of a bad row, and bad
rows; JDB blank and non-JSON lines). --repeat N keeps the best of N plan and bare timings (busy machines).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import random
import resource
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context

import pyarrow as pa
import pyarrow.parquet as pq

from pipelines.sources import ManifestPlan, make_reader, plan_manifest

WORDS = "aerial shot of a forest in winter café 日本の街 slow motion sunset over the ocean, drone".split(" ")
BATCH = 100_000


def _caption(rng: random.Random, i: int) -> str:
    text = " ".join(rng.choices(WORDS, k=rng.randint(3, 9)))
    if i % 7 == 0:
        text += ", with a comma"
    if i % 11 == 0:
        text += ' and "quotes"'
    if i % 997 == 0:
        text += "\nsecond line"
    return text


def write_webvid(path: str, rows: int) -> None:
    """WebVid-10M results CSV: `videoid,name,page_idx,page_dir,duration,contentUrl`, ISO durations."""
    rng, every = random.Random(0), max(rows // 100, 20)
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["videoid", "name", "page_idx", "page_dir", "duration", "contentUrl"])
        for start in range(0, rows, BATCH):
            batch = []
            for i in range(start, min(start + BATCH, rows)):
                videoid = 1_000_000_000 + i
                page = f"{i // 50 * 50 + 1:06d}_{i // 50 * 50 + 50:06d}"
                duration = f"PT00H00M{i % 60 + 5:02d}S"
                if i % every == every // 2 and i >= every:  # a duplicate key of an earlier good row
                    videoid = 1_000_000_000 + i - every // 4
                elif i % every == 3:  # a bad row (its key stays free)...
                    duration = "17 seconds"
                elif i % every == 13 and i > 13:  # ...so this row with the same id is good, not a duplicate
                    videoid = 1_000_000_000 + i - 10
                url = f"https://ak.picdn.net/v/{videoid}.mp4"
                row = [videoid, _caption(rng, i), i // 50 + 1, page, duration, url]
                batch.append(row[:3] if i % every == 7 else row)  # too few cells
            writer.writerows(batch)


def write_jdb(path: str, rows: int) -> None:
    """JourneyDB annotation JSONL: img_path, prompt, Task1 (Style, Content), Task2 (Caption)."""
    rng, every = random.Random(0), max(rows // 100, 20)
    with open(path, "w", encoding="utf-8") as f:
        for start in range(0, rows, BATCH):
            lines = []
            for i in range(start, min(start + BATCH, rows)):
                uuid = f"{i:08x}-{i * 2654435761 % 2**32:08x}"
                if i % every == every // 2 and i >= every:
                    uuid = f"{i - every // 4:08x}-{(i - every // 4) * 2654435761 % 2**32:08x}"
                elif i % every == 13 and i > 13:
                    uuid = f"{i - 10:08x}-{(i - 10) * 2654435761 % 2**32:08x}"
                item = {
                    "img_path": f"./{i // 1000 % 200:03d}/{uuid}.jpg",
                    "prompt": _caption(rng, i) + " --ar 16:9 --v 5",
                    "Task1": {"Style": ["cinematic"], "Content": rng.choices(WORDS, k=3)},
                    "Task2": {"Caption": _caption(rng, i + 1)},
                }
                if i % every == 3:
                    del item["prompt"]
                line = json.dumps(item, ensure_ascii=False)
                lines.append("" if i % every == 5 else "{broken" if i % every == 7 else line)
            f.write("\n".join(lines) + "\n")


def write_laion(path: str, rows: int) -> None:
    every = max(rows // 100, 20)
    hashes = [i * 7919 if i % every != every // 2 else (i - 1) * 7919 for i in range(rows)]
    table = pa.table(
        {
            "URL": [f"http://x/{i}.jpg" for i in range(rows)],
            "TEXT": ["alt text"] * rows,
            "top_caption": [f"caption {i}, a cat" for i in range(rows)],
            "hash": hashes,
        }
    )
    pq.write_table(table, path, row_group_size=100_000)


WRITERS = {
    "webvid": (write_webvid, ".csv"),
    "jdb": (write_jdb, ".jsonl"),
    "laion_coco": (write_laion, ".parquet"),
}


def bare_pass(source: str, manifest: str) -> tuple[float, float]:
    """(wall, CPU) seconds of a bare parse of the whole file."""
    start, cpu = time.perf_counter(), time.process_time()
    if source == "webvid":
        with open(manifest, encoding="utf-8", errors="replace", newline="") as f:
            for _ in csv.reader(f):
                pass
    elif source == "jdb":
        with open(manifest, "rb") as f:
            for line in f:
                try:
                    json.loads(line.decode("utf-8"))
                except ValueError:
                    pass
    else:
        parquet = pq.ParquetFile(manifest)
        for g in range(parquet.metadata.num_row_groups):
            parquet.read_row_group(g, columns=["URL", "hash"]).to_pylist()
    return time.perf_counter() - start, time.process_time() - cpu


def timed_plan(source: str, manifest: str, shard_rows: int) -> tuple[ManifestPlan, float, float, float]:
    """(plan, wall s, CPU s, peak RSS MB of this process): run in a fresh child process."""
    start, cpu = time.perf_counter(), time.process_time()
    plan = plan_manifest(source, manifest, shard_rows)
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu
    return plan, wall, cpu, peak_rss_mb()


def peak_rss_mb() -> float:
    """This process's peak RSS: VmHWM (ru_maxrss would include the parent's from before exec)."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def read_shard(source: str, manifest: str, plan: ManifestPlan, i: int) -> float:
    """Seconds to read input shard i as a task does: a fresh reader, the span, its duplicates."""
    start = time.perf_counter()
    span = plan.spans[i]
    items = list(make_reader(source, manifest).read_span(span, duplicates=plan.duplicates_in(span)))
    assert len(items) == len(span.rows)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--manifest", help="an existing manifest file")
    what.add_argument("--rows", type=int, help="write a synthetic manifest of this many rows first")
    parser.add_argument("--source", choices=sorted(WRITERS), default="webvid")
    parser.add_argument("--shard-rows", type=int, default=1000, help="rows per input shard")
    parser.add_argument("--repeat", type=int, default=1, help="best of N plan and bare timings")
    parser.add_argument("--dir", default=tempfile.gettempdir(), help="where a synthetic manifest goes")
    parser.add_argument("--keep", action="store_true", help="keep the synthetic manifest")
    args = parser.parse_args()

    manifest = args.manifest
    if manifest is None:
        write, ext = WRITERS[args.source]
        manifest = os.path.join(args.dir, f"bench_sources_{args.source}_{args.rows}{ext}")
        write(manifest, args.rows)
    try:
        plans, bare = [], []
        for _ in range(args.repeat):
            bare.append(bare_pass(args.source, manifest))
            with ProcessPoolExecutor(1, mp_context=get_context("spawn")) as pool:
                plans.append(pool.submit(timed_plan, args.source, manifest, args.shard_rows).result())
        plan = plans[0][0]
        n = len(plan.spans)
        reads = {
            name: read_shard(args.source, manifest, plan, i)
            for name, i in [("first", 0), ("middle", n // 2), ("last", n - 1)]
        }
        plan_s, plan_cpu, bare_s, bare_cpu = (
            min(p[1] for p in plans),
            min(p[2] for p in plans),
            *map(min, zip(*bare)),
        )
        result = {
            "source": args.source,
            "rows": plan.num_rows,
            "bytes": os.path.getsize(manifest),
            "shards": n,
            "duplicates": len(plan.duplicates),
            "plan_s": round(plan_s, 2),
            "plan_peak_rss_mb": round(max(p[3] for p in plans)),
            "bare_csv_s": round(bare_s, 2),
            "plan_vs_bare": round(plan_s / bare_s, 2),
            "plan_cpu_s": round(plan_cpu, 2),  # CPU seconds: steadier than wall time on a shared machine
            "bare_cpu_s": round(bare_cpu, 2),
            **{f"{name}_s": round(seconds, 4) for name, seconds in reads.items()},
        }
        print(json.dumps(result))
    finally:
        if args.manifest is None and not args.keep:
            os.remove(manifest)


if __name__ == "__main__":
    main()
