"""The encode job's driver: plan, schedule one Ray task per input shard, collect summaries, dedup, summary.json."""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import fsspec
import pyarrow.parquet as pq

from pipelines.config import PipelineConfig, to_dict
from pipelines.job.cluster import init_ray, shard_task_slots, start_encoders
from pipelines.job.plan import check_done_profiles, plan
from shards.format import ShardPaths, shard_stem


def _local(path: str | None) -> str | None:
    """Absolute path for local paths (Ray workers may run elsewhere); URLs unchanged."""
    if path is None or "://" in path or "::" in path:
        return path
    return os.path.abspath(os.path.expanduser(path))


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


def clean_temporaries(out_dir: str) -> int:
    """Remove the temp files a killed run left (writers write NAME.tmp-XXXXXXXX, then rename)."""
    fs, root = fsspec.core.url_to_fs(out_dir)
    stale = [p for p in fs.find(root) if ".tmp-" in os.path.basename(p)] if fs.exists(root) else []
    for path in stale:
        fs.rm(path)
    return len(stale)


def _shard_totals(out_dir: str, item: dict) -> tuple[str, int, Counter]:
    paths = ShardPaths.of(out_dir, shard_stem(item["source"], item["stage"], item["shard"]))
    with fsspec.open(paths.index, "rb") as f:
        samples = pq.read_metadata(f).num_rows
    with fsspec.open(paths.errors, "rb") as f:
        table = pq.read_table(f, columns=["stage", "reason"])
    reasons = Counter(
        f"{stage}/{reason.split(':')[0]}"
        for stage, reason in zip(table.column("stage").to_pylist(), table.column("reason").to_pylist())
    )
    return f"{item['source']}/{item['stage']}", samples, reasons


def totals(out_dir: str, shards: list[dict], removed: dict[str, int]) -> dict:
    """Samples per source/stage and errors per stage/reason over every written shard (from their files);
    `removed`: samples removed by dedup per source/stage. rows = samples + errors (each row counted once)."""
    samples, errors = Counter(), Counter()
    with ThreadPoolExecutor(16) as pool:
        for name, n, reasons in pool.map(lambda item: _shard_totals(out_dir, item), shards):
            samples[name] += n
            errors.update(reasons)
    rows = sum(samples.values()) + sum(errors.values())
    kept = {name: n - removed.get(name, 0) for name, n in samples.items()}
    return {
        "rows": rows,
        "samples": dict(sorted(samples.items())),
        "removed_by_dedup": dict(sorted(removed.items())),
        "samples_after_dedup": dict(sorted(kept.items())),
        "errors": dict(sorted(errors.items())),
    }


def _start_servers(config: PipelineConfig) -> tuple[dict[str, dict], list]:
    from pipelines.tools.serve import serve_in_thread

    rewrites, servers = {}, []
    for src in config.sources:
        rewrite = dict(src.url_rewrite)
        if src.serve_root:
            server = serve_in_thread(src.serve_root)
            servers.append(server)
            rewrite[src.serve_prefix] = server.url + "/"
        rewrites[src.name] = rewrite
    return rewrites, servers


def _local_roots(config: PipelineConfig) -> dict[str, list[str]]:
    """Per source name: the folders its local paths may be under (fetch refuses other local paths unless
    fetch.allow_local): its media_root (or the reader's default, JourneyDB's <manifest dir>/imgs) and the
    local targets of its url_rewrite."""
    from pipelines.sources import READERS
    from pipelines.sources.base import is_url

    roots: dict[str, list[str]] = {}
    for src in config.sources:
        media_root = src.media_root or READERS[src.name].default_media_root(src.manifest)
        found = roots.setdefault(src.name, [])
        for root in (media_root, *src.url_rewrite.values()):
            if root and (not is_url(root) or root.startswith("file://")):
                root = _local(root.removeprefix("file://"))
                if root not in found:
                    found.append(root)
    return roots


def _allow_servers(config: PipelineConfig, servers: list) -> PipelineConfig:
    """The job's own sample servers (127.0.0.1:PORT, started for serve_root) added to fetch.allowed_hosts:
    loopback is refused otherwise, and the job knows these are its own."""
    if not servers:
        return config
    hosts = [*config.fetch.allowed_hosts, *(s.url.removeprefix("http://") for s in servers)]
    return dataclasses.replace(config, fetch=dataclasses.replace(config.fetch, allowed_hosts=hosts))


def _progress(total: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(
        total=total, unit="row", desc="encode", disable=not enabled, dynamic_ncols=True, file=sys.stderr
    )


def _settings(config: PipelineConfig) -> dict:
    """What every shard task needs besides its own span (put in the object store once)."""
    return {
        "out_dir": config.out_dir,
        "clip_retrieval": config.clip_retrieval or config.dedup.enabled,
        "seed": config.seed,
        "filters": dataclasses.asdict(config.filters),
        "fetch": dataclasses.asdict(config.fetch),
        "local_roots": _local_roots(config),
        "decode": dataclasses.asdict(config.decode),
        "rows_per_unit": config.ray.rows_per_unit,
        "encode_batch_size": config.ray.encode_batch_size,
    }


def run_shards(
    config: PipelineConfig, tasks: list[dict], actors: list, nodes: list
) -> tuple[list, list, list]:
    """Run the shard tasks, at most `slots` at once, calling the encoder `actors` (started by
    `start_encoders`); (summaries of written shards, failed shards, encoder stats)."""
    import ray

    from pipelines.job.shard import encode_shard

    encoders = list(zip(actors, nodes))  # node-id refs inside a list reach the tasks unresolved
    slots = shard_task_slots(config, len(encoders))
    remote = ray.remote(encode_shard).options(
        num_cpus=config.ray.cpus_per_shard_task,
        max_retries=config.ray.task_retries,  # a worker killed mid-shard: the shard is redone from scratch
        retry_exceptions=False,
        scheduling_strategy="SPREAD",
    )
    settings = ray.put(_settings(config))
    written, failed, pending, queue = [], [], {}, list(reversed(tasks))
    with _progress(sum(t["stop"] - t["start"] for t in tasks), config.ray.progress) as bar:
        while queue or pending:
            while queue and len(pending) < slots:
                task = queue.pop()
                pending[remote.remote(task, encoders, settings)] = task
            ready, _ = ray.wait(list(pending), num_returns=1)
            task = pending.pop(ready[0])
            try:
                written.append(ray.get(ready[0]))
            except (ray.exceptions.RayError, OSError) as exc:
                where = shard_stem(task["source"], task["stage"], task["shard"])
                print(f"encode: shard {where} failed, rerun the job to redo it: {exc}", file=sys.stderr)
                failed.append(
                    dict(source=task["source"], stage=task["stage"], shard=task["shard"], error=str(exc))
                )
            bar.update(task["stop"] - task["start"])
    return written, failed, ray.get([actor.stats.remote() for actor in actors])


def _dedup(config: PipelineConfig) -> tuple[dict, dict[str, int]]:
    """The dedup step over the stored embeddings (when dedup.enabled): its summary and removed counts."""
    if not config.dedup.enabled:
        return {}, {}
    from pipelines.dedup import run_dedup

    print(
        f"encode: dedup step (threshold {config.dedup.threshold}, {config.dedup.embedding} embeddings)",
        flush=True,
    )
    result = run_dedup(config.out_dir, threshold=config.dedup.threshold, embedding=config.dedup.embedding)
    removed = {name.replace("-", "/", 1): int(info["removed"]) for name, info in result.items()}
    return result, removed


def run(config: PipelineConfig) -> dict:
    """Run the job to the end; returns (and writes to out_dir/summary.json) the accounting summary."""
    config = resolve_paths(config)
    started = time.perf_counter()
    fs, root = fsspec.core.url_to_fs(config.out_dir)
    fs.makedirs(root, exist_ok=True)
    stale = clean_temporaries(config.out_dir)
    check_done_profiles(config)  # before Ray starts: a rerun with another profile fails at once
    rewrites, servers = _start_servers(config)
    config = _allow_servers(config, servers)
    started_ray = init_ray(config.ray)
    import ray

    actors: list = []
    try:
        actors, nodes = start_encoders(config)  # the models load while the manifests are planned
        tasks, done = plan(config, rewrites)
        print(
            f"encode: {len(tasks)} shards to write ({sum(t['stop'] - t['start'] for t in tasks)} rows), "
            f"{len(done)} already done" + (f", {stale} stale temp files removed" if stale else ""),
            flush=True,
        )
        first = time.perf_counter()
        planned_after = first - started
        written, failed, encoder_stats = run_shards(config, tasks, actors, nodes) if tasks else ([], [], [])
        encoded_s = time.perf_counter() - first
        for actor in actors:
            ray.kill(actor)  # their CPUs/GPUs are the dedup step's now
        # temp files of workers killed mid-shard (their shards were redone): no task runs any more
        stale += clean_temporaries(config.out_dir)
        dedup, removed = _dedup(config)
    finally:
        if started_ray:
            ray.shutdown()
        for server in servers:
            server.stop()
    elapsed = time.perf_counter() - started
    rows = sum(w["rows"] for w in written)
    samples = sum(w["samples"] for w in written)
    run_errors = Counter()
    for w in written:
        run_errors.update(w["reasons"])
    summary = {
        "out_dir": config.out_dir,
        "driver_pid": os.getpid(),
        "this_run": {
            "rows": rows,
            "shards_written": len(written),
            "shards_skipped": len(done),
            "errors": dict(sorted(run_errors.items())),
            "seconds": round(elapsed, 2),
            "planned_after_s": round(planned_after, 2),  # Ray start and the planning tasks
            "rows_per_s": round(rows / elapsed, 3) if elapsed > 0 else None,
            "samples_per_s": round(samples / elapsed, 3) if elapsed > 0 else None,
            # from the first shard task submitted to the last summary (planning and dedup excluded)
            "steady_samples_per_s": round(samples / encoded_s, 3) if written and encoded_s > 0 else None,
            "bytes_written": sum(w["bytes"] for w in written),
            "temp_files_removed": stale,
            "encoders": encoder_stats,  # per encoder actor: busy seconds, calls, rows
            # seconds the shard tasks spent per part, summed over tasks (where a run's time goes)
            "task_seconds": {
                part: round(sum(w["spent"][part] for w in written), 2)
                for part in (written[0]["spent"] if written else {})
            },
        },
        "shards": sorted(
            (
                {k: w[k] for k in ("name", "rows", "samples", "errors", "bytes", "writer_node", "writer_pid")}
                for w in written
            ),
            key=lambda w: w["name"],
        ),
        "dedup": dedup,
        "total": totals(config.out_dir, done + written, removed),
        "unfinished_shards": failed,
        "config": to_dict(config),
    }
    with fsspec.open(f"{config.out_dir}/summary.json", "w") as f:
        json.dump(summary, f, indent=1, sort_keys=True, default=str)
    return summary
