"""Benchmark of the dedup step (`run_dedup`, real Ray and files) on synthetic embeddings with planted pairs.

    .venv/bin/python benchmarks/bench_dedup.py --n 1000000 --dim 1024 --dup-frac 0.05 [--scaling]

Writes N random Gaussian unit vectors (float16) as clip-retrieval parts of PART_ROWS rows in a temp
OUT_DIR, each with its shard's done-marker index parquet, planting DUP_FRAC * N near-duplicates
(cosine 0.97-0.99 to an earlier vector, anywhere: most across parts) and HARD_FRAC * N hard negatives
(cosine 0.90-0.94: must stay). Then runs pipelines.dedup.run_dedup (an embedded local Ray) and prints
one JSON line: recall of planted pairs (target >= 0.99), false removals (target <= 0.1% of N), wall
seconds of the step, and the peak memory of all processes (the driver and every Ray process: summed
RSS, and summed PSS, which counts the shared memory-mapped parts once). --scaling also runs N / 4
and reports the time ratio (target <= 5x).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import threading
import time

import numpy as np
import psutil
import pyarrow.parquet as pq

from pipelines.dedup import run_dedup
from pipelines.dedup.synthetic import write_planted
from shards.format import dedup_path

SOURCE, STAGE = "bench", "512x320"


class PeakMemory:
    """Samples the summed RSS (every `every` s) and PSS (every `pss_every` s: reading it walks the page
    tables, which costs CPU time the step would otherwise get) of this process and its descendants."""

    def __init__(self, every: float = 0.5, pss_every: float = 10.0):
        self.every, self.pss_every, self.rss, self.pss = every, pss_every, 0, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self, pss: bool = True) -> None:
        me = psutil.Process()
        rss_sum = pss_sum = 0
        for p in [me, *me.children(recursive=True)]:
            try:
                if pss:
                    info = p.memory_full_info()
                    pss_sum += getattr(info, "pss", info.rss)
                else:
                    info = p.memory_info()
            except (psutil.Error, OSError):
                continue
            rss_sum += info.rss
        self.rss = max(self.rss, rss_sum)
        if pss:
            self.pss = max(self.pss, pss_sum)

    def _run(self) -> None:
        last = time.monotonic()
        while not self._stop.wait(self.every):
            full = time.monotonic() - last >= self.pss_every
            self._sample(pss=full)
            last = time.monotonic() if full else last

    def __enter__(self):
        self._sample()
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self._sample()


def run_once(n: int, args) -> dict:
    out = tempfile.mkdtemp(prefix="lc_bench_dedup_", dir=args.dir)
    try:
        t0 = time.perf_counter()
        planted = write_planted(
            out,
            SOURCE,
            STAGE,
            n=n,
            dim=args.dim,
            part_rows=args.part_rows,
            dup_frac=args.dup_frac,
            hard_frac=args.hard_frac,
            seed=args.seed,
        )
        generated = time.perf_counter() - t0
        with PeakMemory() as mem:
            t0 = time.perf_counter()
            summary = run_dedup(out, threshold=args.threshold, num_cpus=args.num_cpus)
            seconds = time.perf_counter() - t0
        result = pq.read_table(dedup_path(out, SOURCE, STAGE)).to_pydict()
    finally:
        shutil.rmtree(out, ignore_errors=True)
    removed = np.array([int(k[1:]) for k in result["key"]], dtype=np.int64)
    dup_of = dict(zip(removed.tolist(), (int(k[1:]) for k in result["duplicate_of"])))
    copies, bases = planted.duplicates[:, 1], planted.duplicates[:, 0]
    found = np.isin(copies, removed)
    right = np.array([dup_of.get(int(c)) == int(b) for c, b in zip(copies, bases)], dtype=bool)
    false = np.setdiff1d(removed, copies)
    folder = summary[f"{SOURCE}-{STAGE}"]
    return {
        "n": n,
        "dim": args.dim,
        "parts": -(-n // args.part_rows),
        "planted": len(copies),
        "planted_cos": [
            round(float(planted.duplicate_cos.min()), 4),
            round(float(planted.duplicate_cos.max()), 4),
        ],
        "hard_negatives": len(planted.hard),
        "hard_cos": [round(float(planted.hard_cos.min()), 4), round(float(planted.hard_cos.max()), 4)],
        "recall": round(float(found.mean()), 5) if len(copies) else None,
        "duplicate_of_correct": round(float(right.mean()), 5) if len(copies) else None,
        "removed": int(len(removed)),
        "false_removals": int(len(false)),
        "false_removal_rate": round(len(false) / n, 6),
        "hard_negatives_removed": int(np.isin(planted.hard[:, 1], removed).sum()),
        "clusters": folder["clusters"],
        "nprobe": folder["nprobe"],
        "seconds": round(seconds, 2),
        "generate_seconds": round(generated, 2),
        "peak_rss_gib": round(mem.rss / 2**30, 2),
        "peak_pss_gib": round(mem.pss / 2**30, 2),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=1_000_000, help="vectors (default 1,000,000)")
    p.add_argument("--dim", type=int, default=1024, help="dimension (default 1024, CLIP ViT-H-14)")
    p.add_argument("--dup-frac", type=float, default=0.05, help="planted near-duplicates per vector")
    p.add_argument("--hard-frac", type=float, default=0.01, help="planted hard negatives per vector")
    p.add_argument("--part-rows", type=int, default=10_000, help="rows per part (= per shard)")
    p.add_argument("--threshold", type=float, default=0.95)
    p.add_argument("--num-cpus", type=int, default=None, help="Ray CPUs (default: all)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dir", default=None, help="parent of the temp OUT_DIR (default: the system temp)")
    p.add_argument("--scaling", action="store_true", help="also run N / 4 and report the time ratio")
    args = p.parse_args(argv)
    report = run_once(args.n, args)
    if args.scaling:
        small = run_once(args.n // 4, args)
        report["scaling"] = {
            "n_small": small["n"],
            "seconds_small": small["seconds"],
            "recall_small": small["recall"],
            "ratio": round(report["seconds"] / max(small["seconds"], 1e-9), 2),
        }
    report["targets_met"] = bool(
        (report["recall"] or 0) >= 0.99
        and report["false_removal_rate"] <= 0.001
        and report["hard_negatives_removed"] == 0
        and (not args.scaling or report["scaling"]["ratio"] <= 5.0)
    )
    sys.stdout.write(json.dumps(report) + "\n")
    return 0 if report["targets_met"] else 1


if __name__ == "__main__":
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    sys.exit(main())
