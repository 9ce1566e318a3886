"""Fast dataset statistics: streaming scans of index, error and dedup parquet files into mergeable histograms."""

from __future__ import annotations

import math
from collections import Counter, deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from shards.format import dedup_result
from shards.stats_files import ShardFiles
from shards.stats_profiles import PROFILE_COLUMNS, scan_profiles


@dataclass(frozen=True)
class Spec:
    """One distribution: which index column(s), its unit, and fixed bins (so partial results merge)."""

    name: str
    label: str
    unit: str
    scale: str  # "int": one bin per integer in [lo, hi]; "linear"/"log": `bins` uniform bins (log10 space)
    lo: float
    hi: float
    bins: int = 0
    columns: tuple[str, ...] = ()

    def __post_init__(self):
        if self.scale == "int":
            object.__setattr__(self, "bins", int(self.hi - self.lo) + 1)
        if not self.columns:
            object.__setattr__(self, "columns", (self.name,))


# The distributions of fast mode. Integer fields are exact; others are exact to one bin width.
SPECS = (
    Spec("duration", "source duration s", "s", "log", -2, 5, 1400),
    Spec("clip_duration", "clip length s", "s", "log", -2, 5, 1400),
    Spec("fps", "fps", "fps", "linear", 0, 240, 9600),
    Spec("sample_fps", "fps after stride", "fps", "linear", 0, 240, 9600),
    Spec("orig_width", "width px", "px", "int", 0, 16384),
    Spec("orig_height", "height px", "px", "int", 0, 16384),
    Spec("aspect", "aspect w/h", "", "log", -1.5, 1.5, 3000, ("orig_width", "orig_height")),
    Spec("caption_tokens", "caption tokens", "tokens", "int", 0, 4096),
    Spec("caption_words", "caption words", "words", "int", 0, 4096),
    Spec("aesthetic", "aesthetic", "", "linear", 0, 10, 1000),
    Spec("similarity", "similarity", "", "linear", -1, 1, 2000),
    Spec("clip_score", "CLIP score", "", "linear", -1, 1, 2000),
    Spec("punsafe", "punsafe", "", "linear", 0, 1, 1000),
    Spec("pwatermark", "pwatermark", "", "linear", 0, 1, 1000),
    Spec("bytes_total", "bytes/sample", "B", "log", 1, 11, 2000),
)
SPEC_BY_NAME = {s.name: s for s in SPECS}
# bytes_image_frame and storage_profile are absent from indexes written before storage profiles (0 and full)
BYTE_COLUMNS = ("bytes_latent", "bytes_text_tokens", "bytes_image_tokens", "bytes_image_frame", "bytes_total")
NUMERIC_COLUMNS = sorted({"width", "height", *BYTE_COLUMNS, *(c for s in SPECS for c in s.columns)})
INDEX_COLUMNS = sorted({"kind", *NUMERIC_COLUMNS, *PROFILE_COLUMNS})
ERROR_COLUMNS = ["key", "stage", "reason", "detail"]
EXAMPLES = 3  # example keys kept per (error stage, reason)
BATCH_ROWS = 1 << 18


class Hist:
    """Count, sum, min, max and fixed-bin counts (with under/overflow bins) of one distribution."""

    def __init__(self, spec: Spec):
        self.spec = spec
        self.counts = np.zeros(spec.bins + 2, np.int64)  # [underflow, bins..., overflow]
        self.n, self.total, self.lo, self.hi = 0, 0.0, math.inf, -math.inf

    def add(self, values: np.ndarray) -> None:
        v = np.asarray(values)
        if v.dtype.kind == "f":
            finite = np.isfinite(v)
            if not finite.all():
                v = v[finite]
        if v.size == 0:
            return
        s = self.spec
        self.n += int(v.size)
        self.total += float(v.sum(dtype=np.float64))
        self.lo, self.hi = min(self.lo, float(v.min())), max(self.hi, float(v.max()))
        if s.scale == "int" and v.dtype.kind in "iu":
            idx = v.astype(np.int64) - (int(s.lo) - 1)
            np.clip(idx, 0, s.bins + 1, out=idx)
        else:
            if s.scale == "log":
                v = np.log10(np.maximum(v, 1e-300))
            width = (s.hi - s.lo + (s.scale == "int")) / s.bins
            # +1 then clip at 0 first: truncation toward zero is then floor (values below lo -> underflow)
            idx = np.clip((v - s.lo) / width + 1, 0, s.bins + 1).astype(np.int64)
        self.counts += np.bincount(idx, minlength=s.bins + 2)

    def merge(self, other: Hist) -> Hist:
        self.counts += other.counts
        self.n += other.n
        self.total += other.total
        self.lo, self.hi = min(self.lo, other.lo), max(self.hi, other.hi)
        return self

    def edges(self) -> np.ndarray:
        """Bin edges in value units (bins + 1 of them)."""
        s = self.spec
        if s.scale == "int":
            return np.arange(s.lo, s.hi + 2, dtype=np.float64)
        e = np.linspace(s.lo, s.hi, s.bins + 1)
        return 10.0**e if s.scale == "log" else e

    def quantile(self, q: float) -> float | None:
        """Quantile exact for integer fields, else to one bin width (interpolated inside the bin)."""
        if self.n == 0:
            return None
        target = q * self.n
        cum = np.cumsum(self.counts)
        i = int(np.searchsorted(cum, max(target, 1e-9)))
        if i == 0:
            return self.lo
        if i == len(self.counts) - 1:
            return self.hi
        e = self.edges()
        if self.spec.scale == "int":
            value = e[i - 1]
        else:
            before = cum[i] - self.counts[i]
            frac = (target - before) / max(self.counts[i], 1)
            value = e[i - 1] + frac * (e[i] - e[i - 1])
        return float(min(max(value, self.lo), self.hi))

    def summary(self) -> dict:
        if self.n == 0:
            return {"count": 0}
        out = {"count": self.n, "mean": self.total / self.n, "min": self.lo, "max": self.hi}
        for q in (0.05, 0.25, 0.5, 0.75, 0.95):
            out[f"p{int(q * 100):02d}"] = self.quantile(q)
        return out


@dataclass
class GroupStats:
    """Everything fast mode learns about a set of shards (one group, or one shard before merging)."""

    shards: int = 0
    shards_indexed: int = 0
    samples: int = 0  # index rows that remain (rows removed by the dedup step are not samples)
    removed: int = 0  # index rows whose key the dedup step removed (dedup/{source}-{stage}.parquet)
    deduped: bool = False  # a dedup result exists for (some of) these shards
    videos: int = 0
    images: int = 0
    clip_seconds: float = 0.0
    source_seconds: float = 0.0
    tar_bytes: int = 0
    member_bytes: dict = field(default_factory=lambda: dict.fromkeys(BYTE_COLUMNS, 0))
    hists: dict = field(default_factory=lambda: {s.name: Hist(s) for s in SPECS})
    errors: Counter = field(default_factory=Counter)  # (error stage, reason) -> rows
    examples: dict = field(default_factory=dict)  # (error stage, reason) -> [(key, detail)]
    # (kind, "WxH" the latent encodes) -> samples: the aspect buckets (one per stage without decode.bucketing)
    buckets: Counter = field(default_factory=Counter)
    # storage profile text -> shards.stats_profiles.ProfileBytes (bytes per member kind, real-size projection)
    profiles: dict = field(default_factory=dict)

    def merge(self, other: GroupStats) -> GroupStats:
        for name in ("shards", "shards_indexed", "samples", "removed", "videos", "images", "tar_bytes"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.deduped = self.deduped or other.deduped
        self.clip_seconds += other.clip_seconds
        self.source_seconds += other.source_seconds
        for k, v in other.member_bytes.items():
            self.member_bytes[k] += v
        for k, h in other.hists.items():
            self.hists[k].merge(h)
        self.errors.update(other.errors)
        self.buckets.update(other.buckets)
        for k, p in other.profiles.items():
            if k in self.profiles:
                self.profiles[k].merge(p)
            else:
                self.profiles[k] = type(p)().merge(p)
        for k, ex in other.examples.items():
            _add_examples(self.examples.setdefault(k, []), ex)
        return self


def _add_examples(have: list, new) -> None:
    """Append (key, detail) examples up to EXAMPLES distinct keys (a row rejected at every stage repeats)."""
    seen = {k for k, _ in have}
    for key, detail in new:
        if len(have) >= EXAMPLES:
            return
        if key not in seen:
            seen.add(key)
            have.append((key, detail))


def _open_parquet(url: str, storage_options: dict | None):
    fs, path = fsspec.core.url_to_fs(url, **(storage_options or {}))
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    if protocol in ("file", "local"):
        return pq.ParquetFile(path, memory_map=True)
    return pq.ParquetFile(fs.open(path, "rb"))


def _numpy(batch: pa.RecordBatch, name: str) -> np.ndarray:
    """A numeric column as float64 numpy, nulls as NaN (no Python objects)."""
    col = batch.column(name)
    if col.null_count:
        col = pc.fill_null(pc.cast(col, pa.float64()), float("nan"))
    return col.to_numpy(zero_copy_only=False)


def scan_index(
    url: str, stats: GroupStats, storage_options: dict | None = None, removed: set[str] | None = None
) -> None:
    """Add one index parquet to `stats`, reading only the projected columns, batch by batch.

    Rows whose key is in `removed` (the dedup step's result) count as `removed`, not as samples.
    """
    pf = _open_parquet(url, storage_options)
    present = set(pf.schema_arrow.names)
    columns = [c for c in INDEX_COLUMNS if c in present]
    dedup = bool(removed) and "key" in present
    for batch in pf.iter_batches(batch_size=BATCH_ROWS, columns=columns + ["key"] * dedup):
        if dedup:
            keep = np.fromiter(
                (k not in removed for k in batch.column("key").to_pylist()), dtype=bool, count=batch.num_rows
            )
            stats.removed += int(batch.num_rows - keep.sum())
            batch = batch.filter(pa.array(keep))
        n = batch.num_rows
        stats.samples += n
        if "kind" in present:
            video = pc.fill_null(pc.equal(batch.column("kind"), "video"), False).to_numpy(
                zero_copy_only=False
            )
        else:
            video = np.ones(n, bool)
        n_video = int(video.sum())
        if "width" in present and "height" in present:
            _add_buckets(stats.buckets, batch, video)
        stats.videos += n_video
        stats.images += n - n_video
        scan_profiles(batch, stats.profiles, video)
        cols = {
            c: _numpy(batch, c) for c in columns if c in NUMERIC_COLUMNS and batch.column(c).null_count < n
        }
        for c in BYTE_COLUMNS:
            if c in cols:
                stats.member_bytes[c] += int(np.nansum(cols[c]))
        if "clip_duration" in cols:
            stats.clip_seconds += float(np.nansum(cols["clip_duration"][video]))
        if "duration" in cols:
            stats.source_seconds += float(np.nansum(cols["duration"][video]))
        for spec in SPECS:
            if spec.name == "aspect":
                if "orig_width" in cols and "orig_height" in cols:
                    with np.errstate(divide="ignore", invalid="ignore"):
                        stats.hists["aspect"].add(cols["orig_width"] / cols["orig_height"])
            elif spec.name in cols:
                stats.hists[spec.name].add(cols[spec.name])


def _add_buckets(buckets: Counter, batch: pa.RecordBatch, video: np.ndarray) -> None:
    """Count rows per (kind, "WxH") from the index's width/height (the size the latent encodes; "?" if null)."""
    table = pa.table(
        {"video": pa.array(video), "width": batch.column("width"), "height": batch.column("height")}
    )
    grouped = table.group_by(["video", "width", "height"]).aggregate([([], "count_all")])
    for row in grouped.to_pylist():
        w, h = row["width"], row["height"]
        tag = f"{w}x{h}" if w is not None and h is not None else "?"
        buckets[("video" if row["video"] else "image", tag)] += row["count_all"]


def scan_errors(url: str, stats: GroupStats, storage_options: dict | None = None) -> None:
    """Add one errors parquet: rows per (error stage, reason) and a few example keys each.

    Reasons carrying a key ("duplicate_of:<key>") are counted under their prefix ("duplicate_of").
    """
    pf = _open_parquet(url, storage_options)
    for batch in pf.iter_batches(batch_size=BATCH_ROWS, columns=ERROR_COLUMNS):
        if batch.num_rows == 0:
            continue
        reason = pc.replace_substring_regex(batch.column("reason"), r":.*$", "")
        pair = pc.binary_join_element_wise(batch.column("stage"), reason, "\t")
        for item in pc.value_counts(pair).to_pylist():
            stage, why = item["values"].split("\t", 1)
            stats.errors[(stage, why)] += item["counts"]
            have = stats.examples.setdefault((stage, why), [])
            if len(have) < EXAMPLES:
                rows = batch.filter(pc.equal(pair, item["values"])).slice(0, 4 * EXAMPLES)
                _add_examples(have, zip(rows.column("key").to_pylist(), rows.column("detail").to_pylist()))


@dataclass
class FileProblem:
    """A shard-level file problem (unreadable parquet) found in fast mode."""

    shard: str
    kind: str
    detail: str


def scan_shard(shard: ShardFiles, storage_options: dict | None = None, removed: set[str] | None = None):
    """(GroupStats, [FileProblem]) of one shard from its index and errors parquet; `removed`: the keys
    the dedup step removed from the shard's (source, stage)."""
    stats = GroupStats(shards=1, tar_bytes=shard.tar_bytes)
    problems = []
    for url, scan, kind in (
        (shard.index, lambda u, p, so: scan_index(u, p, so, removed), "bad_index"),
        (shard.errors, scan_errors, "bad_errors"),
    ):
        if url is None:
            continue
        try:
            part = GroupStats()
            scan(url, part, storage_options)
            stats.merge(part)
            stats.shards_indexed += kind == "bad_index"
        except (OSError, pa.ArrowException, KeyError, ValueError) as e:
            problems.append(FileProblem(shard.name, kind, f"{url}: {type(e).__name__}: {e}"))
    return stats, problems


def scan_all(shards: list[ShardFiles], *, workers: int = 4, storage_options=None, progress=None):
    """Per-shard stats merged into {(source, stage): GroupStats}, plus file problems.

    Threads suffice: pyarrow decoding and the numpy reductions release the GIL for most of the work.
    `progress` (optional) is called once per finished shard. The dedup result of each (folder, source,
    stage) (shards.format.removed_keys) is read once; its keys count as removed, not as samples.
    """
    groups: dict[tuple[str, str], GroupStats] = {}
    problems: list[FileProblem] = []
    window: deque = deque()  # futures in flight, bounded so finished partials never pile up
    removed: dict[tuple[str, str, str], set[str] | None] = {}
    for shard in shards:
        where = (shard.dir, shard.source, shard.stage)
        if where not in removed:
            try:
                removed[where] = dedup_result(*where, storage_options)
            except (OSError, pa.ArrowException, KeyError, ValueError) as e:
                removed[where] = None
                problems.append(FileProblem(shard.name, "bad_dedup", f"{shard.dir}: {type(e).__name__}: {e}"))
            if removed[where] is not None:
                groups.setdefault((shard.source, shard.stage), GroupStats()).deduped = True

    def consume():
        shard, future = window.popleft()
        stats, probs = future.result()
        groups.setdefault((shard.source, shard.stage), GroupStats()).merge(stats)
        problems.extend(probs)
        if progress is not None:
            progress()

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        for shard in shards:
            removed_here = removed[(shard.dir, shard.source, shard.stage)]
            window.append((shard, pool.submit(scan_shard, shard, storage_options, removed_here)))
            if len(window) >= 4 * max(1, workers):
                consume()
        while window:
            consume()
    return groups, problems


def coarse_plan(hists: list[Hist], max_bins: int = 60) -> tuple[int, int, int] | None:
    """(first bin, end bin, merge factor) covering the non-empty bins of all `hists` in <= max_bins bins."""
    inner = sum(h.counts[1:-1] for h in hists)
    nz = np.flatnonzero(inner)
    if nz.size == 0:
        return None
    i0, i1 = int(nz[0]), int(nz[-1]) + 1
    k = max(1, math.ceil((i1 - i0) / max_bins))
    return i0, min(i0 + k * math.ceil((i1 - i0) / k), len(inner)), k


def coarse(hist: Hist, max_bins: int = 60, plan=None) -> tuple[np.ndarray, np.ndarray]:
    """(edges, counts) of a histogram over `plan` (default: its own non-empty span), bins merged."""
    plan = plan or coarse_plan([hist], max_bins)
    if plan is None:
        return np.zeros(0), np.zeros(0, np.int64)
    i0, i1, k = plan
    counts = np.add.reduceat(hist.counts[1:-1][i0:i1], np.arange(0, i1 - i0, k))
    all_edges = hist.edges()
    edges = all_edges[i0 : i1 + 1 : k]
    if len(edges) < len(counts) + 1:
        edges = np.append(edges, all_edges[i1])
    return edges, counts
