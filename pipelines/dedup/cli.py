"""`latentcrafter dedup OUT_DIR`: remove near-duplicate samples of an encode job's output (see step.py)."""

from __future__ import annotations

import argparse
import json
import sys

from pipelines.dedup.parts import DedupError

EXIT_OK, EXIT_USAGE = 0, 2


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="latentcrafter dedup",
        description="Find near-duplicate samples from the pooled CLIP embeddings of an encode job's\n"
        "OUT_DIR (OUT_DIR/embeddings/SOURCE-WxH, parts of done shards only) and write\n"
        "OUT_DIR/dedup/SOURCE-WxH.parquet (key, duplicate_of, cosine). The shard loader and\n"
        "`latentcrafter stats` skip the listed keys. A sample is removed when an earlier one\n"
        "(shard, row order) has cosine >= THRESHOLD; the earliest is kept. Runs on a running Ray\n"
        "(RAY_ADDRESS) or an embedded local one; rerunning gives the identical file.",
        epilog="example:\n  latentcrafter dedup out/shards --threshold 0.95 --embedding image",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("out_dir", metavar="OUT_DIR", help="the encode job's output folder (local path or URL)")
    p.add_argument(
        "--threshold",
        type=float,
        default=0.95,
        help="cosine at or above which two samples are near-duplicates (default: 0.95)",
    )
    p.add_argument(
        "--embedding",
        choices=("image", "text"),
        default="image",
        help="which pooled embedding to compare (default: image)",
    )
    p.add_argument(
        "--num-cpus", type=int, default=None, help="CPUs to use (default: all of the machine or cluster)"
    )
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not 0.0 < args.threshold <= 1.0:
        print(
            f"latentcrafter dedup: --threshold {args.threshold} must be in (0, 1], e.g. 0.95", file=sys.stderr
        )
        return EXIT_USAGE
    if args.num_cpus is not None and args.num_cpus < 1:
        print("latentcrafter dedup: --num-cpus must be >= 1", file=sys.stderr)
        return EXIT_USAGE
    from pipelines.dedup.step import run_dedup

    try:
        summary = run_dedup(
            args.out_dir, threshold=args.threshold, embedding=args.embedding, num_cpus=args.num_cpus
        )
    except DedupError as e:
        print(f"latentcrafter dedup: {e}", file=sys.stderr)
        return EXIT_USAGE
    print(json.dumps(summary, sort_keys=True))
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
