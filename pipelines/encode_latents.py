"""The Ray encode job: sources -> fetch -> decode -> filter -> encode -> dedup -> webdataset latent shards.

python pipelines/encode_latents.py --config configs/pipeline/demo.yaml
latentcrafter encode --config configs/pipeline/webvid-256.yaml
ray submit ray_cluster.yaml pipelines/encode_latents.py -- --config configs/pipeline/webvid-256.yaml
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from collections import Counter

if __package__ in (None, ""):  # run as a script: the repository, not pipelines/, goes first on sys.path
    sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")  # nothing is sent off the machine
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import fsspec  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

from pipelines.config import PipelineConfig, SourceConfig, load_config, to_dict  # noqa: E402
from pipelines.job_ray import build_dataset, init_ray  # noqa: E402
from pipelines.writer import ShardAssembler  # noqa: E402
from shards.format import ShardPaths, shard_is_done, shard_stem  # noqa: E402


def _local(path: str | None) -> str | None:
    """Absolute path for local paths (Ray workers may run elsewhere); URLs unchanged."""
    if path is None or "://" in path or "::" in path:
        return path
    return os.path.abspath(os.path.expanduser(path))


def rows_per_shard(src: SourceConfig, config: PipelineConfig) -> int:
    """rows_per_shard, or one derived from shard_target_bytes with an estimate of a sample's size."""
    if not src.shard_target_bytes:
        return int(src.rows_per_shard)
    w, h = (int(v) for v in src.resolutions[0].split("x"))
    frames = config.decode.num_frames if src.name == "webvid" else 1
    estimate = 2 * 2 * 4 * frames * (h // 8) * (w // 8) + 2 * 78 * 1024 + 2 * 258 * 1280 + 4096
    return max(1, int(src.shard_target_bytes) // estimate)


def expand_manifests(pattern: str) -> list[str]:
    """The manifest files of a source: a glob (LAION-COCO's part-*.parquet) expands to its sorted matches.

    Input shards never cross files: file 0's shards come first, then file 1's, numbered on.
    """
    if not any(c in pattern for c in "*?["):
        return [pattern]
    fs, path = fsspec.core.url_to_fs(pattern)
    found = sorted(fs.glob(path))
    if not found:
        raise FileNotFoundError(f"sources[].manifest={pattern!r} matches no file")
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    return [p if protocol in ("file", "local") else f"{protocol}://{p}" for p in found]


def read_units(shard: dict, unit: int) -> list[dict]:
    """An input shard cut into read units of <= `unit` rows: the Ray Data items. Small units keep the
    stream flowing (each becomes its own block through fetch, decode and encode); every unit carries
    its shard's full row count, which is what closes the output shard."""
    units = []
    for start in range(shard["start"], shard["stop"], unit):
        stop = min(start + unit, shard["stop"])
        units.append(dict(shard, start=start, stop=stop, shard_rows=shard["stop"] - shard["start"]))
    return units or [dict(shard, shard_rows=0)]


def plan(config: PipelineConfig, rewrites: dict[str, dict]) -> tuple[list[dict], list[dict]]:
    """(read units to run, shards already done) over every source, manifest file, stage and input shard."""
    from pipelines.sources import input_shards, make_reader

    tasks, done = [], []
    for src in config.sources:
        per_shard, k, budget = rows_per_shard(src, config), 0, src.max_rows
        for manifest in expand_manifests(src.manifest):
            reader = make_reader(
                src.name, manifest, media_root=src.media_root, url_rewrite=rewrites[src.name]
            )
            num_rows = reader.num_rows if budget is None else min(reader.num_rows, budget)
            budget = None if budget is None else budget - num_rows
            ranges = input_shards(num_rows, per_shard)
            for stage in src.resolutions:
                for i, rows in enumerate(ranges):
                    item = dict(source=src.name, stage=stage, shard=k + i, start=rows.start, stop=rows.stop)
                    if shard_is_done(config.out_dir, shard_stem(src.name, stage, k + i)):
                        done.append(item)
                        continue
                    item.update(manifest=manifest, media_root=src.media_root)
                    item["url_rewrite"] = json.dumps(rewrites[src.name])
                    tasks += read_units(item, config.ray.rows_per_read_unit)
            k += len(ranges)
    return tasks, done


def clean_temporaries(out_dir: str) -> int:
    """Remove the temp files a killed run left (ShardWriter writes NAME.tmp-XXXXXXXX, then renames)."""
    fs, root = fsspec.core.url_to_fs(out_dir)
    stale = [p for p in fs.find(root) if ".tmp-" in os.path.basename(p)] if fs.exists(root) else []
    for path in stale:
        fs.rm(path)
    return len(stale)


def totals(out_dir: str, shards: list[dict]) -> dict:
    """Samples per source and errors per stage/reason over every written shard of the plan."""
    samples, errors, rows = Counter(), Counter(), 0
    for item in shards:
        paths = ShardPaths.of(out_dir, shard_stem(item["source"], item["stage"], item["shard"]))
        with fsspec.open(paths.index, "rb") as f:
            n = pq.read_metadata(f).num_rows
        samples[f"{item['source']}/{item['stage']}"] += n
        with fsspec.open(paths.errors, "rb") as f:
            table = pq.read_table(f, columns=["stage", "reason"])
        for stage, reason in zip(table.column("stage").to_pylist(), table.column("reason").to_pylist()):
            reason = "duplicate_of" if reason.startswith("duplicate_of:") else reason
            errors[f"{stage}/{reason}"] += 1
        rows += n + table.num_rows
    return {"rows": rows, "samples": dict(sorted(samples.items())), "errors": dict(sorted(errors.items()))}


def _start_servers(config: PipelineConfig) -> tuple[dict[str, dict], list]:
    from pipelines.serve import serve_in_thread

    rewrites, servers = {}, []
    for src in config.sources:
        rewrite = dict(src.url_rewrite)
        if src.serve_root:
            server = serve_in_thread(src.serve_root)
            servers.append(server)
            rewrite[src.serve_prefix] = server.url + "/"
        rewrites[src.name] = rewrite
    return rewrites, servers


def _progress(total: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(
        total=total, unit="row", desc="encode", disable=not enabled, dynamic_ncols=True, file=sys.stderr
    )


def resolve_paths(config: PipelineConfig) -> PipelineConfig:
    sources = [
        dataclasses.replace(
            s, manifest=_local(s.manifest), media_root=_local(s.media_root), serve_root=_local(s.serve_root)
        )
        for s in config.sources
    ]
    models = dataclasses.replace(
        config.models,
        model_dir=_local(config.models.model_dir),
        image_encoder_dir=_local(config.models.image_encoder_dir),
    )
    return dataclasses.replace(config, out_dir=_local(config.out_dir), sources=sources, models=models)


def run(config: PipelineConfig) -> dict:
    """Run the job to the end; returns (and writes to out_dir/summary.json) the accounting summary."""
    config = resolve_paths(config)
    started = time.perf_counter()
    fs, root = fsspec.core.url_to_fs(config.out_dir)
    fs.makedirs(root, exist_ok=True)
    stale = clean_temporaries(config.out_dir)
    rewrites, servers = _start_servers(config)
    try:
        tasks, done = plan(config, rewrites)
        todo_rows = sum(t["stop"] - t["start"] for t in tasks)
        todo_shards = len({(t["source"], t["stage"], t["shard"]) for t in tasks})
        assembler = ShardAssembler(
            config.out_dir,
            embeddings=config.clip_retrieval,
            dedup_threshold=config.dedup.threshold if config.dedup.enabled else None,
            dedup_on=config.dedup.embedding,
        )
        for src in config.sources:
            for stage in src.resolutions:
                ks = [d["shard"] for d in done if d["source"] == src.name and d["stage"] == stage]
                assembler.seed_dedup(src.name, stage, ks)
        print(
            f"encode: {todo_shards} shards to write ({todo_rows} rows), {len(done)} already done"
            + (f", {stale} stale temp files removed" if stale else ""),
            flush=True,
        )
        written, processed, run_errors, first_row = [], 0, Counter(), None
        if tasks:
            started_ray = init_ray(config.ray)
            try:
                dataset = build_dataset(tasks, config)
                with _progress(todo_rows, config.ray.progress) as bar:
                    for batch in dataset.iter_batches(batch_format="pyarrow", batch_size=None):
                        first_row = first_row or time.perf_counter()
                        for row in batch.to_pylist():
                            closed = assembler.add(row)
                            processed += 1
                            if row["err_stage"]:
                                run_errors[f"{row['err_stage']}/{row['err_reason'].split(':')[0]}"] += 1
                            if closed:
                                written.append(closed)
                        bar.update(batch.num_rows)
                if os.environ.get("LATENTCRAFTER_JOB_STATS"):  # Ray Data's per-operator timings
                    print(dataset.stats(), file=sys.stderr)
            finally:
                if started_ray:
                    import ray

                    ray.shutdown()
        unfinished = assembler.drop_unfinished()
        elapsed = time.perf_counter() - started
        done_now = done + [dict(source=w["source"], stage=w["stage"], shard=w["shard"]) for w in written]
        summary = {
            "out_dir": config.out_dir,
            "this_run": {
                "rows": processed,
                "shards_written": len(written),
                "shards_skipped": len(done),
                "errors": dict(sorted(run_errors.items())),
                "seconds": round(elapsed, 2),
                "rows_per_s": round(processed / elapsed, 3) if elapsed > 0 else None,
                "samples_per_s": round(sum(w["samples"] for w in written) / elapsed, 3)
                if elapsed > 0
                else None,
                "max_open_shards": assembler.max_open,
                # after the first row arrived (Ray start-up and model loading excluded)
                "first_row_after_s": round(first_row - started, 2) if first_row else None,
                "steady_samples_per_s": round(
                    sum(w["samples"] for w in written) / (time.perf_counter() - first_row), 3
                )
                if first_row
                else None,
            },
            "total": totals(config.out_dir, done_now),
            "unfinished_shards": unfinished,
            "config": to_dict(config),
        }
        with fsspec.open(f"{config.out_dir}/summary.json", "w") as f:
            json.dump(summary, f, indent=1, sort_keys=True, default=str)
        return summary
    finally:
        for server in servers:
            server.stop()


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
    for name, n in total["errors"].items():
        table.add_row(f"errors {name}", str(n))
    console.print(table)
    if summary["unfinished_shards"]:
        console.print(f"[red]unfinished shards (rerun to redo them): {summary['unfinished_shards']}[/]")


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
