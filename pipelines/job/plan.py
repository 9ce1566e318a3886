"""The job's plan: every source's manifest files planned once (Ray tasks), cut into input shards, done ones skipped."""

from __future__ import annotations

import os

import fsspec

from pipelines.config import PipelineConfig, SourceConfig
from shards.format import INDEX_SUFFIX, ShardPaths, shard_stem
from shards.index import read_shard_infos


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


def plan_file(source: str, manifest: str, per_shard: int, max_rows: int | None, media_root, rewrite) -> dict:
    """One manifest file's plan as plain data: {num_rows, spans: [{start, stop, offset, duplicates}]}.

    Runs as a Ray task: the one O(rows) pass over the file (pipelines.sources.plan) happens on a worker,
    and only span boundaries and the (few) duplicate-key rows come back.
    """
    from pipelines.sources import plan_manifest

    plan = plan_manifest(
        source, manifest, per_shard, max_rows=max_rows, media_root=media_root, url_rewrite=rewrite
    )
    spans = [
        dict(start=s.start, stop=s.stop, offset=s.offset, duplicates=plan.duplicates_in(s))
        for s in plan.spans
    ]
    return {"num_rows": plan.num_rows, "spans": spans}


def done_stems(out_dir: str) -> set[str]:
    """Stems of the shards whose index (the done marker) exists: one listing, not one stat per shard."""
    fs, root = fsspec.core.url_to_fs(out_dir)
    if not fs.exists(root):
        return set()
    names = [os.path.basename(p) for p in fs.ls(root, detail=False)]
    return {n[: -len(INDEX_SUFFIX)] for n in names if n.endswith(INDEX_SUFFIX)}


def _plans(config: PipelineConfig, rewrites: dict[str, dict]) -> dict[tuple[str, str], dict]:
    """{(source, manifest): plan_file result} for every source and file, planned as parallel Ray tasks
    (files of a source with max_rows one after another: each file's row budget depends on the earlier ones)."""
    import ray

    remote = ray.remote(plan_file).options(num_cpus=config.ray.cpus_per_shard_task, max_retries=2)
    plans, pending = {}, {}
    for src in config.sources:
        per_shard = rows_per_shard(src, config)
        budget = src.max_rows
        for manifest in expand_manifests(src.manifest):
            args = (src.name, manifest, per_shard, budget, src.media_root, rewrites[src.name])
            if budget is None:
                while len(pending) >= config.ray.plan_tasks:
                    ready, _ = ray.wait(list(pending), num_returns=1)
                    plans[pending.pop(ready[0])] = ray.get(ready[0])
                pending[remote.remote(*args)] = (src.name, manifest)
            else:
                plans[(src.name, manifest)] = ray.get(remote.remote(*args))
                budget -= plans[(src.name, manifest)]["num_rows"]
    for ref, name in pending.items():
        plans[name] = ray.get(ref)
    return plans


def plan(config: PipelineConfig, rewrites: dict[str, dict]) -> tuple[list[dict], list[dict]]:
    """(shard tasks to run, shards already done), over every source, manifest file, stage and input shard."""
    plans, done_now = _plans(config, rewrites), done_stems(config.out_dir)
    tasks, done = [], []
    for src in config.sources:
        k = 0
        for manifest in expand_manifests(src.manifest):
            spans = plans[(src.name, manifest)]["spans"]
            for stage in src.resolutions:
                for i, span in enumerate(spans):
                    item = dict(
                        source=src.name, stage=stage, shard=k + i, start=span["start"], stop=span["stop"]
                    )
                    if shard_stem(src.name, stage, k + i) in done_now:
                        done.append(item)
                        continue
                    item.update(manifest=manifest, media_root=src.media_root, url_rewrite=rewrites[src.name])
                    item.update(offset=span["offset"], duplicates=span["duplicates"])
                    tasks.append(item)
            k += len(spans)
    return tasks, done


def check_done_profiles(config: PipelineConfig) -> None:
    """Finished shards in out_dir (skipped by a rerun) must have the job's storage profile: a set mixing
    profiles would only be refused by the loader, much later. ValueError naming a few and the options."""
    stems = sorted(done_stems(config.out_dir))
    if not stems:
        return
    urls = [ShardPaths.of(config.out_dir, stem).tar for stem in stems]
    infos = read_shard_infos(urls, dedup=False)
    other = [(u, i.profile) for u, i in zip(urls, infos) if i is not None and i.profile != config.storage]
    if other:
        listing = ", ".join(f"{os.path.basename(u)} ({p.name})" for u, p in other[:3])
        raise ValueError(
            f"{len(other)} finished shard(s) in {config.out_dir} have another storage profile than this job's "
            f"{config.storage.name}: {listing}{' ...' if len(other) > 3 else ''}. Rerun with their `storage`, "
            "or give a new out_dir (one shard set holds one profile)"
        )
