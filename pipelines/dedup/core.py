"""Dedup search plan (numpy + faiss, no Ray, no files): cluster counts, seeded k-means, centroid probing.

SemDeDup / NeMo Curator style: spherical k-means on a seeded sample of the unit vectors; every vector is a
member of its nearest cluster and is compared, exactly, with the members of its `nprobe` nearest clusters
(pipelines.dedup.search). A pair (i, j) is compared when i's cluster is among j's probed clusters or j's
cluster among i's, so pairs straddling a cluster border are found.

Choice of k and nprobe (`plan_search`). With s vectors per cluster (k = n / s), the work per vector is
k dot products to rank the centroids plus about nprobe * s in the probed clusters: n * d * (n / s +
nprobe * s) in all. s = 1000 keeps the first term small (it is the minor one up to about nprobe * s^2
= 8M vectors per folder), so the cost grows ~linearly in n; above 16,384 clusters the centroids get
an HNSW index, so ranking them costs ~log k and the total stays ~linear beyond that. nprobe = 8 up to
1,024 clusters, then one more per doubling of k (at most 16): the more centroids, the closer the
runners-up. On random Gaussian 1024-d vectors (no cluster structure: the worst case) planted
near-duplicates at cosine 0.97-0.99 are found 99.9% of the time at n = 1M (k = 1000, nprobe = 8; see
benchmarks/bench_dedup.py); clustered real embeddings do better. With k <= nprobe every pair is
compared (exact): up to ~8,500 vectors per folder; k = 1 below 1,500.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass(kw_only=True)
class SearchConfig:
    """How near-duplicates are searched; the defaults suit ~10k to ~100M vectors per folder."""

    # Target vectors per cluster: k = round(n / cluster_size) (see the module docstring for the cost).
    cluster_size: int = 1000
    # Nearest clusters each vector is compared in. None: 8, plus one per doubling of k above 1,024.
    nprobe: int | None = None
    # Fixed number of clusters instead of n / cluster_size (tests force several with it).
    num_clusters: int | None = None
    # k-means training: sample size per cluster (a seeded sample of the vectors) and iterations.
    kmeans_points_per_cluster: int = 40
    kmeans_iters: int = 10
    # Seed of the k-means sample and initialisation (two runs with the same seed give the same result).
    seed: int = 0
    # Up to this many clusters the centroids are ranked exactly (flat index); above it by an HNSW graph.
    exact_assign_max_clusters: int = 16384
    # float32 similarities within `margin` of the threshold are re-checked in float64, so results are
    # exact and do not depend on BLAS blocking or on how clusters are grouped into tasks.
    margin: float = 1e-3
    # Block of the similarity matrix computed at once: query rows x member columns (float32).
    block_rows: int = 2048
    block_cols: int = 4096
    # Memory for the vectors a search task gathers at once (MiB); bounds its resident size.
    gather_mib: int = 256
    # Folders of up to this many vectors are searched whole in one task (same result, no task fan-out:
    # k-means, assignment and search tasks each cost a worker start-up that small folders don't repay).
    single_task_max: int = 20000

    def __post_init__(self):
        for name in ("cluster_size", "kmeans_points_per_cluster", "kmeans_iters", "block_rows", "block_cols"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"SearchConfig.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("nprobe", "num_clusters"):
            if getattr(self, name) is not None and int(getattr(self, name)) < 1:
                raise ValueError(f"SearchConfig.{name} must be >= 1 or None, got {getattr(self, name)}")
        if not 0 <= self.margin < 0.1:
            raise ValueError(f"SearchConfig.margin must be in [0, 0.1), got {self.margin}")


def plan_search(n: int, cfg: SearchConfig) -> tuple[int, int]:
    """(clusters k, probes per vector) for n vectors."""
    k = cfg.num_clusters or max(1, round(n / cfg.cluster_size))
    k = max(1, min(int(k), max(1, n)))
    nprobe = cfg.nprobe or min(16, max(8, math.ceil(math.log2(k)) - 2))
    return k, max(1, min(int(nprobe), k))


def inverse_norms(x: np.ndarray) -> np.ndarray:
    """float32 1 / |row| (rows of zeros: 1e12), row by row: a row's value never depends on the others."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim != 2:
        raise ValueError(f"expected a 2-d array of row vectors, got shape {x.shape}")
    norms = np.sqrt((x * x).sum(axis=1, dtype=np.float32))
    return (np.float32(1.0) / np.maximum(norms, np.float32(1e-12))).astype(np.float32)


def unit_rows(x: np.ndarray, inverse: np.ndarray | None = None) -> np.ndarray:
    """Rows as float32 scaled to unit length: x * inverse_norms(x) (pass `inverse` when already known)."""
    x = np.array(x, dtype=np.float32, order="C", copy=True)
    x *= inverse_norms(x)[:, None] if inverse is None else inverse[:, None]
    return x


def kmeans_sample(n: int, k: int, cfg: SearchConfig) -> np.ndarray:
    """Sorted ids of the seeded k-means training sample (all ids when n is small)."""
    m = min(n, k * cfg.kmeans_points_per_cluster)
    if m >= n:
        return np.arange(n, dtype=np.int64)
    rng = np.random.default_rng([cfg.seed, n, k])
    return np.sort(rng.choice(n, size=m, replace=False)).astype(np.int64)


def train_centroids(sample: np.ndarray, k: int, cfg: SearchConfig, threads: int | None = None) -> np.ndarray:
    """k unit centroids from spherical k-means (faiss, seeded) on unit sample rows."""
    import faiss

    sample = np.ascontiguousarray(sample, dtype=np.float32)
    d = sample.shape[1]
    if k == 1:
        c = sample.astype(np.float64).sum(axis=0)
        if not np.any(c):
            c = np.eye(1, d)[0]
        return unit_rows(c[None, :])
    if threads is not None:
        faiss.omp_set_num_threads(int(threads))
    km = faiss.Kmeans(
        d,
        k,
        niter=cfg.kmeans_iters,
        seed=cfg.seed,
        spherical=True,
        verbose=False,
        min_points_per_centroid=1,
        max_points_per_centroid=1 << 30,  # train on exactly our sample (faiss would subsample otherwise)
    )
    km.train(sample)
    return unit_rows(km.centroids)


def centroid_index(centroids: np.ndarray, nprobe: int, cfg: SearchConfig):
    """A faiss inner-product index over the centroids: exact, or HNSW above cfg.exact_assign_max_clusters.

    The HNSW graph is built single-threaded, so it (and every lookup) is the same in every run.
    """
    import faiss

    k, d = centroids.shape
    if k <= cfg.exact_assign_max_clusters:
        index = faiss.IndexFlatIP(d)
        index.add(np.ascontiguousarray(centroids, dtype=np.float32))
        return index
    index = faiss.IndexHNSWFlat(d, 32, faiss.METRIC_INNER_PRODUCT)
    index.hnsw.efConstruction = 80
    index.hnsw.efSearch = max(64, 4 * nprobe)
    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    try:
        index.add(np.ascontiguousarray(centroids, dtype=np.float32))
    finally:
        faiss.omp_set_num_threads(threads)
    return index


def index_to_bytes(index) -> np.ndarray:
    import faiss

    return faiss.serialize_index(index)


def index_from_bytes(data: np.ndarray):
    import faiss

    return faiss.deserialize_index(np.asarray(data, dtype=np.uint8))


PROBE_CHUNK = 8192  # rows ranked per faiss call; fixed, so a row's probes depend on its part only


def probe(index, x: np.ndarray, nprobe: int) -> np.ndarray:
    """int32 (n, nprobe): each unit row's nearest centroids, nearest first (column 0 = its cluster)."""
    out = np.empty((len(x), nprobe), dtype=np.int32)
    for a in range(0, len(x), PROBE_CHUNK):
        _, ids = index.search(np.ascontiguousarray(x[a : a + PROBE_CHUNK], dtype=np.float32), nprobe)
        if (ids < 0).any():
            raise RuntimeError(f"centroid index returned fewer than {nprobe} clusters for some rows")
        out[a : a + PROBE_CHUNK] = ids
    return out


def cluster_counts(probes: np.ndarray, k: int) -> np.ndarray:
    """int64 (2, k): members and probing rows (members included) of each cluster."""
    return np.stack(
        [
            np.bincount(probes[:, 0], minlength=k),
            np.bincount(probes.ravel(), minlength=k),
        ]
    ).astype(np.int64)


def cluster_rows(probe_parts, wanted: np.ndarray) -> list[tuple[int, np.ndarray, np.ndarray]]:
    """[(cluster, ids, is_member)] for the wanted clusters (bool mask over k), ids ascending.

    `probe_parts` are probe arrays of consecutive rows in global order (row 0 of the first is id 0).
    ids are the rows probing the cluster (its members included); is_member marks its members.
    """
    rows, clusters, members = [], [], []
    offset = 0
    for probes in probe_parts:
        r, col = np.nonzero(wanted[probes])
        rows.append(r.astype(np.int64) + offset)
        clusters.append(probes[r, col])
        members.append(col == 0)
        offset += len(probes)
    if not rows:
        return []
    r, c, m = np.concatenate(rows), np.concatenate(clusters), np.concatenate(members)
    order = np.lexsort((r, c))
    r, c, m = r[order], c[order], m[order]
    bounds = np.flatnonzero(np.diff(c)) + 1
    return [
        (int(cs[0]), rs, ms)
        for rs, cs, ms in zip(np.split(r, bounds), np.split(c, bounds), np.split(m, bounds))
        if len(cs) and ms.any()
    ]


def balance(costs: np.ndarray, tasks: int) -> list[np.ndarray]:
    """Clusters split into `tasks` groups of about equal cost (greedy, largest first; deterministic).

    Clusters of cost 0 (no member, or no other row to compare with) are left out.
    """
    order = np.argsort(-costs, kind="stable")
    order = order[costs[order] > 0]
    tasks = max(1, min(tasks, len(order)))
    loads = np.zeros(tasks, dtype=np.float64)
    groups: list[list[int]] = [[] for _ in range(tasks)]
    for c in order.tolist():
        t = int(np.argmin(loads))
        groups[t].append(c)
        loads[t] += costs[c]
    return [np.sort(np.asarray(g, dtype=np.int64)) for g in groups if g]
