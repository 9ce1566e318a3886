"""`latentcrafter stats`: what a shard dataset holds, from its parquet indexes (fast) or every tar (--deep)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from contextlib import contextmanager
from dataclasses import dataclass

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from shards.stats_fast import GroupStats, scan_all
from shards.stats_files import discover
from shards.stats_report import BY_CHOICES, build_report, merge_groups, render_terminal

EXIT_OK, EXIT_PROBLEMS, EXIT_USAGE = 0, 1, 2


@dataclass
class Result:
    """One analysed dataset: the JSON report plus the in-memory histograms (for HTML and --against)."""

    report: dict
    groups: dict  # {(group key...): GroupStats} by the report's `by`
    total: GroupStats


@contextmanager
def _progress(quiet: bool):
    """A rich progress bar on stderr (only when stderr is a terminal); yields start(label, n) -> tick()."""
    console = Console(stderr=True)
    bar = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=True,
        disable=quiet or not console.is_terminal,
    )

    def start(label: str, total: int):
        task = bar.add_task(label, total=total)
        return lambda: bar.advance(task)

    with bar:
        yield start


def analyse(
    inputs: list[str],
    *,
    by: str = "source,stage",
    deep: bool = False,
    workers: int = 0,
    quiet: bool = True,
    storage_options: dict | None = None,
) -> Result:
    """Discover shards, scan their indexes (and, with `deep`, their tars) and build the report."""
    workers = workers or min(8, os.cpu_count() or 1)
    found = discover(inputs, storage_options)
    with _progress(quiet) as start:
        tick = start("reading indexes", len(found.shards))
        groups, file_problems = scan_all(
            found.shards, workers=workers, storage_options=storage_options, progress=tick
        )
        problems = None
        if deep:
            from shards.stats_deep import check_all

            tick = start("checking tars", len(found.shards))
            problems = check_all(
                found.shards, workers=workers, storage_options=storage_options, progress=tick
            )
            problems += [
                {"shard": p.shard, "key": None, "kind": p.kind, "detail": p.detail}
                for p in file_problems
                if p.kind != "bad_index"  # check_all reports unreadable indexes itself
            ]
    report = build_report(found, groups, file_problems, inputs=inputs, by=by, problems=problems)
    merged = merge_groups(groups, BY_CHOICES[by])
    total = GroupStats()
    for g in merged.values():
        total.merge(g)
    return Result(report, merged, total)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="latentcrafter stats",
        description="Statistics of a latent shard dataset. Fast mode reads only the index and errors\n"
        "parquet files; --deep also opens every tar and checks it against its index (exit status 1\n"
        "when problems are found, so it can gate a training run; 2 when no shard is found).",
        epilog="examples:\n  latentcrafter stats out/shards\n"
        "  latentcrafter stats 'out/webvid-256x256-{000000..000099}.tar' --deep\n"
        "  latentcrafter stats v2/ --against v1/ --html diff.html",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "inputs", nargs="+", metavar="PATH_OR_URL", help="shard folders, files, globs, brace patterns"
    )
    p.add_argument("--deep", action="store_true", help="open every tar and check members against the index")
    p.add_argument("--json", metavar="OUT", help="write the JSON report to OUT ('-' for stdout)")
    p.add_argument("--html", metavar="OUT.html", help="write a self-contained HTML page with histograms")
    p.add_argument(
        "--by",
        choices=sorted(BY_CHOICES),
        default="source,stage",
        metavar="source|stage|source,stage",
        help="grouping of the tables (default: source,stage)",
    )
    p.add_argument(
        "--against",
        nargs="+",
        metavar="PATH_OR_URL",
        help="compare with another dataset version (put it last)",
    )
    p.add_argument("--workers", type=int, default=0, help="parallel readers (default: CPUs, at most 8)")
    p.add_argument("--quiet", action="store_true", help="no progress bar and no terminal report")
    return p.parse_args(argv)


def _write_json(doc: dict, out: str) -> None:
    text = json.dumps(doc, indent=1, allow_nan=False, default=float)
    if out == "-":
        sys.stdout.write(text + "\n")
    else:
        with open(out, "w") as f:
            f.write(text + "\n")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.workers < 0:
        print("latentcrafter stats: --workers must be >= 0", file=sys.stderr)
        return EXIT_USAGE
    probe = Console(stderr=args.json == "-")
    console = Console(stderr=args.json == "-", width=min(100, probe.width) if probe.is_terminal else 100)
    quiet = args.quiet or args.json == "-"
    result = analyse(args.inputs, by=args.by, deep=args.deep, workers=args.workers, quiet=args.quiet)
    report = result.report
    if report["totals"]["shards"] == 0:
        print(f"latentcrafter stats: no shard files found in {args.inputs}", file=sys.stderr)
        return EXIT_USAGE
    doc, against = report, None
    if args.against:
        from shards.stats_compare import compare, render_compare

        against = analyse(args.against, by=args.by, workers=args.workers, quiet=args.quiet)
        diff = compare(result, against)
        doc = {**report, "against": against.report, "diff": diff}
        if not quiet:
            render_compare(diff, console)
    elif not quiet:
        render_terminal(report, console)
    if args.json:
        _write_json(doc, args.json)
    if args.html:
        from shards.stats_html import write_html

        write_html(args.html, result, against=against)
        if not quiet:
            console.print(f"wrote {args.html}")
    return EXIT_PROBLEMS if report.get("problems") else EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
