"""Synthetic embedding parts for dedup tests and benchmarks: unit vectors with planted near-duplicates."""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipelines.dedup.core import unit_rows
from pipelines.stages.embeddings import METADATA_SCHEMA, embeddings_folder, normalised_f16
from schemas import SHARD_INDEX_SCHEMA
from shards.format import _atomic_write, shard_stem, write_parquet_atomic


def noise_scale(cosine: np.ndarray | float, dim: int) -> np.ndarray:
    """sigma such that normalize(v + sigma * g), g ~ N(0, I_dim), has about this cosine with unit v."""
    return np.sqrt((1.0 / np.square(cosine) - 1.0) / dim)


def near(base: np.ndarray, cosine: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Unit rows at about `cosine` (one per row) from the unit `base` rows."""
    sigma = noise_scale(np.asarray(cosine, np.float64), base.shape[1])[:, None]
    g = rng.standard_normal(base.shape, dtype=np.float32)
    return unit_rows(base + (sigma * g).astype(np.float32))


def stored_cos(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine of rows as the dedup step sees them: float16 storage, unit rows, float64 dot."""
    a, b = unit_rows(normalised_f16(a)), unit_rows(normalised_f16(b))
    return (a.astype(np.float64) * b.astype(np.float64)).sum(axis=1)


def near_within(
    base: np.ndarray, lo: float, hi: float, rng: np.random.Generator, tries: int = 50
) -> np.ndarray:
    """A unit row whose stored cosine with the unit `base` row lies in [lo, hi] (redrawn until it does)."""
    for _ in range(tries):
        y = near(base[None, :], np.array([rng.uniform(lo, hi)]), rng)
        if lo <= stored_cos(base[None, :], y)[0] <= hi:
            return y[0]
    raise RuntimeError(f"no vector at cosine in [{lo}, {hi}] after {tries} draws; widen the range")


def write_part(
    out_dir: str,
    source: str,
    stage: str,
    shard: int,
    vectors: np.ndarray,
    keys: list[str],
    *,
    image: bool = True,
    text: bool = True,
    done: bool = True,
) -> None:
    """Part `shard` of OUT_DIR/embeddings/{source}-{stage} in clip-retrieval's layout (float16 unit rows;
    the text embeddings are the same vectors); with `done`, also the shard's (empty) index parquet."""
    folder = embeddings_folder(out_dir, source, stage)
    rows = normalised_f16(vectors) if len(vectors) else np.zeros((0, 0), np.float16)
    for flag, prefix in ((image, "img"), (text, "text")):
        if flag and len(rows):
            buf = io.BytesIO()
            np.save(buf, rows, allow_pickle=False)
            _atomic_write(f"{folder}/{prefix}_emb/{prefix}_emb_{shard}.npy", buf.getvalue())
    stem = shard_stem(source, stage, shard)
    meta = pa.table(
        {
            "key": keys,
            "image_path": [None] * len(keys),
            "caption": [f"caption {k}" for k in keys],
            "url": [None] * len(keys),
            "source": [source] * len(keys),
            "shard": [f"{stem}.tar"] * len(keys),
            "kind": ["image"] * len(keys),
        },
        schema=METADATA_SCHEMA,
    )
    buf = io.BytesIO()
    pq.write_table(meta, buf)
    _atomic_write(f"{folder}/metadata/metadata_{shard}.parquet", buf.getvalue())
    if done:
        write_parquet_atomic(f"{out_dir.rstrip('/')}/{stem}.index.parquet", [], SHARD_INDEX_SCHEMA)


@dataclass
class Planted:
    """What was planted: pairs (earlier id, later id) with their cosine (after float16 storage)."""

    duplicates: np.ndarray  # (m, 2) int64: the later row is a near-duplicate (cosine >= 0.97)
    duplicate_cos: np.ndarray
    hard: np.ndarray  # (h, 2) int64: the later row is close (cosine 0.90-0.94) but no duplicate
    hard_cos: np.ndarray


def key_of(i: int) -> str:
    return f"s{i:09d}"


def write_planted(
    out_dir: str,
    source: str,
    stage: str,
    *,
    n: int,
    dim: int,
    part_rows: int,
    dup_frac: float,
    hard_frac: float,
    seed: int = 0,
    dup_cos: tuple[float, float] = (0.97, 0.99),
    hard_cos: tuple[float, float] = (0.90, 0.94),
) -> Planted:
    """n random Gaussian unit vectors (keys key_of(i)) in parts of `part_rows`, with dup_frac * n planted
    near-duplicates of earlier rows (stored cosine within dup_cos) and hard_frac * n hard negatives
    (within hard_cos); pairs sit anywhere, so most cross parts. Written part by part: memory is one part
    plus the planted bases."""
    rng = np.random.default_rng(seed)
    m, h = int(round(dup_frac * n)), int(round(hard_frac * n))
    ids = rng.choice(n, size=2 * (m + h), replace=False).reshape(-1, 2)
    pairs = np.sort(ids, axis=1).astype(np.int64)
    dups, hards = pairs[:m], pairs[m:]
    base_of = {int(b): r for r, b in enumerate(pairs[:, 0])}
    copy_of = {int(c): r for r, c in enumerate(pairs[:, 1])}
    bases = np.zeros((len(pairs), dim), np.float32)
    stored = np.zeros((len(pairs), 2, dim), np.float16)
    for shard, start in enumerate(range(0, n, part_rows)):
        prng = np.random.default_rng([seed, shard])
        x = unit_rows(prng.standard_normal((min(part_rows, n - start), dim), dtype=np.float32))
        for row in range(len(x)):
            r = base_of.get(start + row)
            if r is not None:
                bases[r] = x[row]
        for row in range(len(x)):
            r = copy_of.get(start + row)
            if r is not None:
                x[row] = near_within(bases[r], *(dup_cos if r < m else hard_cos), prng)
        f16 = normalised_f16(x)
        for row in range(len(x)):
            for side, lookup in ((0, base_of), (1, copy_of)):
                r = lookup.get(start + row)
                if r is not None:
                    stored[r, side] = f16[row]
        write_part(out_dir, source, stage, shard, x, [key_of(start + i) for i in range(len(x))])
    a, b = unit_rows(stored[:, 0]), unit_rows(stored[:, 1])
    cos = (a.astype(np.float64) * b.astype(np.float64)).sum(axis=1).astype(np.float32)
    return Planted(duplicates=dups, duplicate_cos=cos[:m], hard=hards, hard_cos=cos[m:])
