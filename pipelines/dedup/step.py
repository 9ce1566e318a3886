"""The dedup step on Ray: per embeddings folder, k-means, assignment and cluster-search tasks, one result file.

Per OUT_DIR/embeddings/{source}-{stage} folder (parts of done shards only, global order = (shard, row)):
  1. one task trains k-means on a seeded sample and returns the serialized centroid index;
  2. assignment tasks (one per group of parts) rank each vector's nearest centroids -> probe arrays
     (int32, kept in the object store) and per-cluster counts (to the driver);
  3. search tasks (clusters grouped to balance members x probing rows) gather the rows they need from
     the memory-mapped parts and return their verified duplicates (pipelines.dedup.search);
  4. the driver keeps the earliest duplicate_of per removed row, looks up the keys and writes
     OUT_DIR/dedup/{source}-{stage}.parquet (shards.format.DEDUP_SCHEMA, sorted by key) atomically.
The driver holds no embeddings: only counts and the duplicate rows. Results are byte-identical across
runs (seeded k-means, exact float64 verification, stable sorts); a killed run leaves at most a temp
file, removed by the next run, which writes the identical file.
"""

from __future__ import annotations

import io
import logging
import os
import sys
import time

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import ray
from tqdm import tqdm

from pipelines.dedup import core, search
from pipelines.dedup.core import SearchConfig
from pipelines.dedup.parts import DedupError, Part, PartRows, done_parts, keys_of, list_folders
from shards.format import DEDUP_SCHEMA, _atomic_write, dedup_path

TASKS_PER_CPU = 4  # assignment and search tasks per CPU (load balance; each task reads all probe arrays)


def _threads(n: int) -> dict:
    """A runtime_env fixing the BLAS/OpenMP threads of the task's worker process from its start (numpy's
    OpenBLAS reads them when loaded): n per task, so tasks never oversubscribe the CPUs they hold."""
    n = str(int(n))
    return {"env_vars": {"OMP_NUM_THREADS": n, "OPENBLAS_NUM_THREADS": n, "MKL_NUM_THREADS": n}}


@ray.remote(num_cpus=1)
def _kmeans_task(parts: list[Part], dim: int, sample: np.ndarray, k: int, nprobe: int, cfg, threads: int):
    x = PartRows(parts, dim)(sample)
    centroids = core.train_centroids(x, k, cfg, threads=threads)
    return core.index_to_bytes(core.centroid_index(centroids, nprobe, cfg))


@ray.remote(num_cpus=1, num_returns=3)
def _assign_task(parts: list[Part], dim: int, index_bytes: np.ndarray, nprobe: int, k: int):
    """(probes, counts, inverse norms) of a run of parts (see core.probe, core.cluster_counts)."""
    import faiss

    faiss.omp_set_num_threads(1)
    index = core.index_from_bytes(index_bytes)
    probes, inverse = [], []
    for p in parts:
        raw = PartRows([p], dim).raw(np.arange(p.start, p.start + p.rows))
        inverse.append(core.inverse_norms(raw))
        probes.append(core.probe(index, core.unit_rows(raw, inverse[-1]), nprobe))
    probes_all = np.concatenate(probes)
    return probes_all, core.cluster_counts(probes_all, k), np.concatenate(inverse)


@ray.remote(num_cpus=1)
def _search_task(parts: list[Part], dim: int, clusters: np.ndarray, k: int, threshold: float, cfg, *refs):
    """Verified duplicates found in `clusters`; refs: every assignment task's probes, then its norms."""
    probes, inverse = refs[: len(refs) // 2], np.concatenate(refs[len(refs) // 2 :])
    wanted = np.zeros(k, bool)
    wanted[clusters] = True
    groups = core.cluster_rows(probes, wanted)
    return search.search_clusters(groups, PartRows(parts, dim, inverse), threshold, cfg)


@ray.remote(num_cpus=1)
def _whole_task(parts: list[Part], dim: int, n: int, threshold: float, cfg):
    """A small folder searched whole in one task (search.find_duplicates over its n rows)."""
    return search.find_duplicates(PartRows(parts, dim).raw(np.arange(n)), threshold, cfg)  # normalised once


def _wait(refs: list, label: str) -> list:
    """ray.get with a tqdm bar over finished tasks (shown when stderr is a terminal)."""
    pending = list(refs)
    with tqdm(
        total=len(refs), desc=label, file=sys.stderr, leave=False, disable=not sys.stderr.isatty()
    ) as bar:
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            bar.update(len(done))
    return ray.get(list(refs))


def _split(parts: list[Part], groups: int) -> list[list[Part]]:
    """Consecutive runs of parts with about equal rows."""
    total = sum(p.rows for p in parts)
    out: list[list[Part]] = [[] for _ in range(max(1, groups))]
    for p in parts:
        out[min(len(out) - 1, p.start * len(out) // max(1, total))].append(p)
    return [g for g in out if g]


def _cpus(num_cpus: int | None) -> tuple[int, int]:
    """(CPUs to plan tasks for, threads for the k-means task: at most one node's CPUs)."""
    total = int(ray.cluster_resources().get("CPU", 1))
    node = max([int(n["Resources"].get("CPU", 0)) for n in ray.nodes() if n.get("Alive")] or [1])
    cpus = max(1, min(total, num_cpus or total))
    return cpus, max(1, min(cpus, node))


def _clean_temp(path: str) -> None:
    """Remove temp files of a killed earlier run (PATH.tmp-XXXXXXXX)."""
    fs, p = fsspec.core.url_to_fs(path)
    for tmp in fs.glob(f"{p}.tmp-*"):
        fs.rm(tmp)


def _write(path: str, parts: list[Part], pairs: search.Pairs) -> int:
    j, i, cos = pairs
    keys = keys_of(parts, np.concatenate([j, i])) if len(j) else {}
    removed = [keys[g] for g in j.tolist()]
    order = sorted(range(len(removed)), key=removed.__getitem__)
    table = pa.table(
        {
            "key": pa.array([removed[r] for r in order], pa.string()),
            "duplicate_of": pa.array([keys[int(i[r])] for r in order], pa.string()),
            "cosine": pa.array(cos[np.asarray(order, dtype=np.int64)], pa.float32()),
        },
        schema=DEDUP_SCHEMA,
    )
    buf = io.BytesIO()
    pq.write_table(table, buf)
    _clean_temp(path)
    _atomic_write(path, buf.getvalue())
    return len(removed)


def dedup_folder(
    out_dir: str, source: str, stage: str, parts: list[Part], dim: int, *, threshold: float, cfg, num_cpus
) -> dict:
    """Dedup one (source, stage) on the running Ray; writes its result file and returns its summary."""
    start = time.perf_counter()
    n = sum(p.rows for p in parts)
    k, nprobe = core.plan_search(n, cfg)
    path = dedup_path(out_dir, source, stage)
    pairs = search.empty_pairs()
    phases: dict[str, float] = {}
    if 2 <= n <= cfg.single_task_max:
        pairs = ray.get(_whole_task.remote(parts, dim, n, threshold, cfg))
        phases["search"] = time.perf_counter() - start
    elif n >= 2:
        cpus, threads = _cpus(num_cpus)
        parts_ref = ray.put(parts)
        sample = core.kmeans_sample(n, k, cfg)
        index = _kmeans_task.options(num_cpus=threads, runtime_env=_threads(threads)).remote(
            parts_ref, dim, sample, k, nprobe, cfg, threads
        )
        assigned = [
            _assign_task.options(runtime_env=_threads(1)).remote(group, dim, index, nprobe, k)
            for group in _split(parts, TASKS_PER_CPU * cpus)
        ]
        probes, count_refs, norms = ([a[r] for a in assigned] for r in range(3))
        ray.wait([index])
        phases["kmeans"] = time.perf_counter() - start
        counts = np.sum(_wait(count_refs, f"{source}-{stage} assign"), axis=0)
        phases["assign"] = time.perf_counter() - start - phases["kmeans"]
        costs = counts[0] * np.maximum(counts[1] - 1, 0)
        groups = core.balance(costs.astype(np.float64), TASKS_PER_CPU * cpus)
        found = _wait(
            [
                _search_task.options(runtime_env=_threads(1)).remote(
                    parts_ref, dim, g, k, threshold, cfg, *probes, *norms
                )
                for g in groups
            ],
            f"{source}-{stage} search",
        )
        pairs = search.earliest_per_j(search.concat_pairs(found))
        phases["search"] = time.perf_counter() - start - phases["kmeans"] - phases["assign"]
    removed = _write(path, parts, pairs)
    seconds = time.perf_counter() - start
    timing = ", ".join(f"{name} {sec:.1f} s" for name, sec in phases.items())
    print(
        f"dedup {source}-{stage}: {n:,} samples in {len(parts)} parts, {k} clusters x {nprobe} probes: "
        f"removed {removed:,} ({100 * removed / max(1, n):.2f}%) in {seconds:.1f} s ({timing}) -> {path}",
        file=sys.stderr,
        flush=True,
    )
    return {
        "samples": n,
        "removed": removed,
        "seconds": seconds,
        "clusters": k,
        "nprobe": nprobe,
        "phases": phases,
        "path": path,
    }


def _start_ray(num_cpus: int | None) -> bool:
    """Use a running Ray; else start an embedded local one (no dashboard). True when started here."""
    if ray.is_initialized():
        return False
    kwargs: dict = {"include_dashboard": False, "logging_level": logging.WARNING}
    if os.environ.get("RAY_ADDRESS"):
        ray.init(**kwargs)  # an existing cluster named by the environment: its CPUs are its own
    else:
        ray.init(num_cpus=num_cpus, dashboard_host="127.0.0.1", **kwargs)
    return True


def run_dedup(
    out_dir: str,
    *,
    threshold: float = 0.95,
    embedding: str = "image",
    sources: list[tuple[str, str]] | None = None,
    num_cpus: int | None = None,
    config: SearchConfig | None = None,
) -> dict:
    """Find near-duplicates in every OUT_DIR/embeddings/{source}-{stage} folder (or the given pairs) and
    write OUT_DIR/dedup/{source}-{stage}.parquet for each. Returns {"source-stage": {samples, removed,
    seconds, clusters, nprobe, path}}. Only parts whose shard is done (.index.parquet exists) are read."""
    if not -1.0 <= float(threshold) <= 1.0:
        raise DedupError(f"threshold {threshold} is not a cosine; give a value in [-1, 1] such as 0.95")
    if embedding not in ("image", "text"):
        raise DedupError(f"embedding {embedding!r} must be 'image' or 'text'")
    cfg = config or SearchConfig()
    out_dir = str(out_dir).rstrip("/")
    available = list_folders(out_dir)
    if sources is None:
        folders = available
        if not folders:
            raise DedupError(
                f"{out_dir}/embeddings has no SOURCE-WxH folders: run the encode job with embeddings "
                "enabled (pooled CLIP embeddings are written per shard), then dedup its OUT_DIR"
            )
    else:
        folders = [tuple(s) for s in sources]
        missing = [f"{s}-{st}" for s, st in folders if (s, st) not in available]
        if missing:
            raise DedupError(f"{out_dir}/embeddings has no folder {missing}; it has {available}")
    work = []
    for source, stage in folders:  # every folder checked before anything starts
        parts, info = done_parts(out_dir, source, stage, embedding)
        work.append((source, stage, parts, info["dim"]))
    started = _start_ray(num_cpus)
    try:
        return {
            f"{source}-{stage}": dedup_folder(
                out_dir, source, stage, parts, dim, threshold=float(threshold), cfg=cfg, num_cpus=num_cpus
            )
            for source, stage, parts, dim in work
        }
    finally:
        if started:
            ray.shutdown()
