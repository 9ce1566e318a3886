"""The Ray encode job's entry point: sources -> fetch -> decode -> filter -> encode -> write shards -> dedup.

The job itself lives in pipelines/job/ (plan, shard tasks, driver); this script is what `ray submit` runs.

python pipelines/encode_latents.py --config configs/pipeline/demo.yaml
latentcrafter encode --config configs/pipeline/webvid-256.yaml
ray submit ray_cluster.yaml pipelines/encode_latents.py -- --config configs/pipeline/webvid-256.yaml
"""

from __future__ import annotations

import argparse
import json
import os
import sys

if __package__ in (None, ""):  # run as a script: the repository, not pipelines/, goes first on sys.path
    sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # nothing is sent off the machine
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pipelines.config import load_config  # noqa: E402
from pipelines.job.run import run  # noqa: E402


def print_summary(summary: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(stderr=False)
    this, total = summary["this_run"], summary["total"]
    console.print(
        f"[bold]encode done[/]: {this['rows']} rows in {this['seconds']} s ({this['rows_per_s']} rows/s, "
        f"{this['samples_per_s']} samples/s); {this['shards_written']} shards written, {this['shards_skipped']} skipped"
    )
    table = Table(title=f"all shards in {summary['out_dir']}: {total['rows']} rows")
    table.add_column("what")
    table.add_column("count", justify="right")
    for name, n in total["samples"].items():
        table.add_row(f"samples {name}", str(n))
    for name, n in total["removed_by_dedup"].items():
        if n:
            table.add_row(f"removed by dedup {name}", str(n))
    for name, n in total["errors"].items():
        table.add_row(f"errors {name}", str(n))
    console.print(table)
    if summary["unfinished_shards"]:
        names = [f"{u['source']}-{u['stage']}-{u['shard']:06d}" for u in summary["unfinished_shards"]]
        console.print(f"[red]unfinished shards (rerun the job to redo them): {names}[/]")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="latentcrafter encode",
        description="Encode datasets into webdataset latent shards on Ray (embedded, or the cluster it runs on).",
    )
    parser.add_argument("--config", required=True, help="pipeline YAML, e.g. configs/pipeline/demo.yaml")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override an option, e.g. --set ray.num_cpus=2",
    )
    parser.add_argument("--summary-json", help="also write the summary to this file")
    args = parser.parse_args(argv)
    try:
        config = load_config(args.config, args.set)
    except (ValueError, FileNotFoundError) as exc:
        print(f"encode: bad config {args.config}: {exc}", file=sys.stderr)
        return 2
    summary = run(config)
    print_summary(summary)
    if args.summary_json:
        with open(args.summary_json, "w") as f:
            json.dump(summary, f, indent=1, sort_keys=True, default=str)
    return 1 if summary["unfinished_shards"] else 0


if __name__ == "__main__":
    sys.exit(main())
