"""Exact near-duplicate search within clusters (numpy + faiss, no Ray, no files), and the in-memory whole.

Result semantics: row j is a duplicate when some EARLIER row i (global order) has cos(i, j) >= threshold
among the pairs the clusters compare; `duplicate_of` is the earliest such i. Candidates come from float32
matrix products (BLAS); every one within `margin` of the threshold, and the earliest sure one per j, is
re-checked in float64 from the same unit rows (`exact_cosines`), so the result is exact and identical
whatever the processing order, task grouping or BLAS blocking.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from pipelines.dedup.core import (
    SearchConfig,
    centroid_index,
    cluster_rows,
    kmeans_sample,
    plan_search,
    probe,
    train_centroids,
    unit_rows,
)

Pairs = tuple[np.ndarray, np.ndarray, np.ndarray]  # (j, i, cosine): j removed as a duplicate of i < j
Rows = Callable[[np.ndarray], np.ndarray]  # ascending unique ids -> unit float32 rows; has a `dim` attribute


def empty_pairs(dtype=np.float32) -> Pairs:
    return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, dtype)


def concat_pairs(pairs: list[Pairs], dtype=np.float32) -> Pairs:
    if not pairs:
        return empty_pairs(dtype)
    return tuple(np.concatenate([p[n] for p in pairs]) for n in range(3))  # type: ignore[return-value]


def _earliest(s: np.ndarray, cand: np.ndarray, sure: np.ndarray, axis: int) -> np.ndarray:
    """Mask of candidates to keep along `axis` (ordered by id): those up to the first sure one."""
    size = s.shape[axis]
    first = np.where(sure.any(axis=axis), sure.argmax(axis=axis), size)
    pos = np.arange(size)
    if axis == 1:
        return cand & (pos[None, :] <= first[:, None])
    return cand & (pos[:, None] <= first[None, :])


def _block_pairs(s: np.ndarray, q_ids: np.ndarray, m_ids: np.ndarray, lo: float, hi: float) -> list[Pairs]:
    """Candidates of one similarity block (query rows x member columns, both ascending ids)."""
    cand = s >= lo
    rows, cols = np.flatnonzero(cand.any(axis=1)), np.flatnonzero(cand.any(axis=0))
    s, cand = s[np.ix_(rows, cols)], cand[np.ix_(rows, cols)]
    q_ids, m_ids = q_ids[rows], m_ids[cols]
    sure = s >= hi
    member_first = m_ids[None, :] < q_ids[:, None]  # the column's member is the earlier of the pair
    out = []
    # j = the query row, i = an earlier member: the earliest member columns per row
    keep = _earliest(s, cand & member_first, sure & member_first, axis=1)
    r, c = np.nonzero(keep)
    out.append((q_ids[r], m_ids[c], s[r, c]))
    # j = the member column, i = an earlier query row: the earliest query rows per column
    query_first = ~member_first  # self pairs are already below lo
    keep = _earliest(s, cand & query_first, sure & query_first, axis=0)
    r, c = np.nonzero(keep)
    out.append((m_ids[c], q_ids[r], s[r, c]))
    return out


def search_cluster(
    ids: np.ndarray, x: np.ndarray, is_member: np.ndarray, threshold: float, cfg: SearchConfig
) -> Pairs:
    """Candidate pairs of one cluster: every probing row (ids, ascending; x its unit rows) against the
    cluster's members. Per j only the earliest candidates are kept (see `prune`)."""
    lo, hi = threshold - cfg.margin, threshold + cfg.margin
    m_ids, xm = ids[is_member], x[is_member]
    out: list[Pairs] = []
    for a in range(0, len(ids), cfg.block_rows):
        q_ids, xq = ids[a : a + cfg.block_rows], x[a : a + cfg.block_rows]
        for b in range(0, len(m_ids), cfg.block_cols):
            mb = m_ids[b : b + cfg.block_cols]
            s = xq @ xm[b : b + cfg.block_cols].T
            _, qi, mi = np.intersect1d(q_ids, mb, assume_unique=True, return_indices=True)
            s[qi, mi] = -np.inf  # a row is not its own duplicate
            if s.size and s.max() >= lo:
                out += _block_pairs(s, q_ids, mb, lo, hi)
    return prune(concat_pairs(out), threshold, cfg.margin)


def prune(pairs: Pairs, threshold: float, margin: float) -> Pairs:
    """Sorted by (j, i), one entry per pair; per j only the candidates up to its first sure one
    (similarity >= threshold + margin: it passes the exact check, so nothing later can be the answer)."""
    j, i, s = pairs
    if len(j) == 0:
        return pairs
    order = np.lexsort((-s, i, j))
    j, i, s = j[order], i[order], s[order]
    first = np.ones(len(j), bool)
    first[1:] = (j[1:] != j[:-1]) | (i[1:] != i[:-1])
    j, i, s = j[first], i[first], s[first]
    starts = np.flatnonzero(np.r_[True, j[1:] != j[:-1]])
    pos = np.arange(len(j))
    first_sure = np.minimum.reduceat(np.where(s >= threshold + margin, pos, len(j)), starts)
    keep = pos <= np.repeat(first_sure, np.diff(np.r_[starts, len(j)]))
    return j[keep], i[keep], s[keep]


def exact_cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """float64 cosine of unit float32 row pairs, summed the same way every time (row-wise numpy sum);
    identical rows give exactly 1.0 (so a threshold of 1.0 keeps exact copies out)."""
    cos = (a.astype(np.float64) * b.astype(np.float64)).sum(axis=1)
    cos[(a == b).all(axis=1) & a.any(axis=1)] = 1.0
    return cos


def verify(pairs: Pairs, rows: Rows, threshold: float, chunk: int = 16384) -> Pairs:
    """Exact check of candidates (sorted by (j, i)): per j the earliest i with float64 cos >= threshold."""
    j, i, _ = pairs
    if len(j) == 0:
        return empty_pairs()
    need = np.unique(np.concatenate([j, i]))
    x = rows(need)
    cos = np.empty(len(j), np.float64)
    for a in range(0, len(j), chunk):
        pj = np.searchsorted(need, j[a : a + chunk])
        pi = np.searchsorted(need, i[a : a + chunk])
        cos[a : a + chunk] = exact_cosines(x[pj], x[pi])
    ok = cos >= threshold
    return earliest_per_j((j[ok], i[ok], cos[ok].astype(np.float32)))


def earliest_per_j(pairs: Pairs) -> Pairs:
    """One row per j: the smallest i (and its cosine), sorted by j."""
    j, i, c = pairs
    if len(j) == 0:
        return j, i, c
    order = np.lexsort((i, j))
    j, i, c = j[order], i[order], c[order]
    first = np.r_[True, j[1:] != j[:-1]]
    return j[first], i[first], c[first]


def search_clusters(
    groups: list[tuple[int, np.ndarray, np.ndarray]],
    rows: Rows,
    threshold: float,
    cfg: SearchConfig,
    on_cluster: Callable[[], None] | None = None,
) -> Pairs:
    """Verified duplicates found in the given clusters ((cluster, ids, is_member) from cluster_rows).

    Clusters are taken in chunks whose gathered rows fit cfg.gather_mib; candidates are pruned as they come.
    """
    found: list[Pairs] = []
    chunk: list[tuple[int, np.ndarray, np.ndarray]] = []
    budget = max(1, (cfg.gather_mib << 20) // 4)  # float32 values

    def flush():
        nonlocal found
        if not chunk:
            return
        union = np.unique(np.concatenate([ids for _, ids, _ in chunk]))
        x = rows(union)
        for _, ids, member in chunk:
            found.append(search_cluster(ids, x[np.searchsorted(union, ids)], member, threshold, cfg))
            if on_cluster is not None:
                on_cluster()
        found = [prune(concat_pairs(found), threshold, cfg.margin)]
        chunk.clear()

    size = 0
    for group in groups:
        if chunk and (size + len(group[1])) * rows.dim > budget:
            flush()
            size = 0
        chunk.append(group)
        size += len(group[1])
    flush()
    return verify(concat_pairs(found), rows, threshold)


class ArrayRows:
    """Rows of an in-memory array of unit float32 vectors."""

    def __init__(self, x: np.ndarray):
        self.x, self.dim = x, x.shape[1]

    def __call__(self, ids: np.ndarray) -> np.ndarray:
        return self.x[ids]


def find_duplicates(vectors: np.ndarray, threshold: float, cfg: SearchConfig | None = None) -> Pairs:
    """(j, i, cosine) of every row j removed as a near-duplicate of an earlier row i, sorted by j.

    `vectors` (n, d) in global order; rows are scaled to unit length first. In memory, single process:
    the Ray step (pipelines.dedup.step) runs the same functions over files.
    """
    cfg = cfg or SearchConfig()
    x = unit_rows(vectors)
    n = len(x)
    if n < 2:
        return empty_pairs()
    k, nprobe = plan_search(n, cfg)
    centroids = train_centroids(x[kmeans_sample(n, k, cfg)], k, cfg)
    probes = probe(centroid_index(centroids, nprobe, cfg), x, nprobe)
    groups = cluster_rows([probes], np.ones(k, bool))
    return search_clusters(groups, ArrayRows(x), threshold, cfg)


def exact_duplicates(vectors: np.ndarray, threshold: float, chunk: int = 1024) -> Pairs:
    """The O(n^2) reference: every pair compared (float64), earliest i per j. For tests and benchmarks."""
    x = unit_rows(vectors)
    x64 = x.astype(np.float64)
    out: list[Pairs] = []
    for a in range(0, len(x), chunk):
        g = x64[a : a + chunk] @ x64[: a + chunk].T
        g[np.arange(g.shape[0])[:, None] + a <= np.arange(g.shape[1])[None, :]] = -np.inf  # i < j only
        r, c = np.nonzero(g >= threshold - 1e-6)
        out.append((r.astype(np.int64) + a, c.astype(np.int64), g[r, c]))
    j, i, _ = concat_pairs(out, np.float64)
    cos = exact_cosines(x[j], x[i]) if len(j) else np.zeros(0)
    ok = cos >= threshold
    return earliest_per_j((j[ok], i[ok], cos[ok].astype(np.float32)))
