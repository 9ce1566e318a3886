"""The shard task: one input shard end to end on a worker (read, filter, fetch, decode, encode via an actor, write)."""

from __future__ import annotations

import json
import os
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor

from pipelines.job import faults
from pipelines.stages.rows import failed, rows_of, table_of

_STAGES: dict[str, tuple] = {}  # per worker process: stages are built once and reused by its next tasks


def _stages(settings: dict) -> tuple:
    """(filter, fetch, decode) stages for these settings, cached in this worker process."""
    from pipelines.stages.decode import DecodeStage
    from pipelines.stages.fetch import FetchStage
    from pipelines.stages.filters import FilterStage

    local_roots = settings.get("local_roots") or {}  # source -> folders its local paths may be under
    cache_key = json.dumps(
        [settings["filters"], settings["fetch"], local_roots, settings["decode"], settings["seed"]]
    )
    if cache_key not in _STAGES:
        _STAGES.clear()  # a new job's settings: drop the old decoder process
        _STAGES[cache_key] = (
            FilterStage(settings["filters"], "metadata"),
            FetchStage(settings["fetch"], local_roots=local_roots),  # the row's source picks its roots
            DecodeStage(settings["decode"], seed=settings["seed"]),
        )
    return _STAGES[cache_key]


def _pick_encoder(encoders: list[tuple], shard: int):
    """An encoder actor on this task's node when there is one (frames stay on the node), else any.

    encoders: [(actor, ref of its node id)]; the refs resolve once the actors have loaded their models, so a
    task asks only when it has its first decoded rows (fetching and decoding overlap the model loading)."""
    import ray

    node = ray.get_runtime_context().get_node_id()
    nodes = ray.get([ref for _, ref in encoders])
    local = [actor for (actor, _), actor_node in zip(encoders, nodes) if actor_node == node]
    choices = local or [actor for actor, _ in encoders]
    return choices[shard % len(choices)]


def encode_shard(task: dict, encoders: list[tuple], settings: dict) -> dict:
    """Write output shard `task["shard"]` of (source, stage) and return its summary, never its samples.

    settings: out_dir, clip_retrieval, seed, filters, fetch, decode (dicts), local_roots (source -> folders),
    rows_per_unit, encode_batch_size.
    The next unit is fetched (threads) while this one decodes; two encoder calls stay in flight. Any failure
    drops the unfinished shard (its temp tar) and raises: the shard is redone by a retry or the next run.
    """
    import ray

    from pipelines.stages.read import read_shard
    from pipelines.stages.write import ShardSink

    started = time.perf_counter()
    filter_stage, fetch_stage, decode_stage = _stages(settings)
    faults.at("read", task)
    rows = read_shard(task)
    sink = ShardSink(
        settings["out_dir"],
        task["source"],
        task["stage"],
        task["shard"],
        expected=len(rows),
        embeddings=settings["clip_retrieval"],
    )
    encoder = None
    unit, batch = int(settings["rows_per_unit"]), int(settings["encode_batch_size"])
    units = [rows[i : i + unit] for i in range(0, len(rows), unit)]

    def prepare(unit_rows: list[dict]) -> list[dict]:
        faults.at("fetch", task)
        return list(fetch_stage.pool.map(fetch_stage.fetch_row, map(filter_stage.filter_row, unit_rows)))

    in_flight: deque = deque()  # encoder results (ObjectRefs) or rows that need no encoder, in row order
    spent = dict.fromkeys(("read", "fetch_wait", "decode", "encode_wait", "write"), 0.0)  # seconds, per part
    spent["read"] = time.perf_counter() - started

    def drain(keep: int) -> None:
        while len(in_flight) > keep:
            item = in_flight.popleft()
            t = time.perf_counter()
            rows = rows_of(ray.get(item)) if isinstance(item, ray.ObjectRef) else item
            t2 = time.perf_counter()
            faults.at("write", task)
            sink.add(rows)
            spent["encode_wait"] += t2 - t
            spent["write"] += time.perf_counter() - t2

    try:
        with faults.write_limit(task), ThreadPoolExecutor(1, thread_name_prefix="prefetch") as prefetch:
            upcoming = prefetch.submit(prepare, units[0]) if units else None
            for i in range(len(units)):
                t = time.perf_counter()
                fetched = upcoming.result()
                upcoming = prefetch.submit(prepare, units[i + 1]) if i + 1 < len(units) else None
                t2 = time.perf_counter()
                faults.at("decode", task)
                decoded = decode_stage.decode_rows(fetched)
                spent["fetch_wait"] += t2 - t
                spent["decode"] += time.perf_counter() - t2
                for j in range(0, len(decoded), batch):
                    part = decoded[j : j + batch]
                    if all(failed(r) for r in part):
                        in_flight.append(part)
                    else:
                        encoder = encoder or _pick_encoder(encoders, int(task["shard"]))
                        in_flight.append(encoder.encode.remote(table_of(part, zero_copy=("frames",))))
                    drain(keep=2)
            drain(keep=0)
            t = time.perf_counter()
            summary = sink.close()
            spent["write"] += time.perf_counter() - t
    except BaseException:
        sink.abort()
        raise
    summary.update(
        writer_node=ray.get_runtime_context().get_node_id(),
        writer_pid=os.getpid(),
        seconds=round(time.perf_counter() - started, 3),
        spent={k: round(v, 3) for k, v in spent.items()},
    )
    return summary
