"""Shard indexes: URL expansion, the parquet index beside each tar (counts, offsets, encoder ids, dedup)."""

from __future__ import annotations

from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from webdataset.shardlists import expand_urls

from shards.format import (
    INDEX_SUFFIX,
    TAR_SUFFIX,
    parse_shard_stem,
    removed_keys,
    shard_folder,
)
from shards.profiles import PROFILES, StorageProfile

INDEX_COLUMNS = ["kind", "stage", "vae_id", "text_encoder_id", "scale_factor"]
PROFILE_COLUMN = "storage_profile"  # absent or null in indexes written before storage profiles: full


class ShardMismatchError(ValueError):
    """A shard does not belong to this run (other encoder, scale factor or resolution stage). Never skipped."""


def expand_shard_urls(urls: list[str], *, stage: str | None = None, storage_options: dict | None = None):
    """Tar URLs from paths, globs, brace patterns and fsspec URLs, sorted and de-duplicated."""
    out: list[str] = []
    for pattern in [urls] if isinstance(urls, str) else urls:
        if stage is not None:
            pattern = pattern.replace("{stage}", stage)
        for url in expand_urls(pattern):
            if any(c in url for c in "*?["):
                fs, path = fsspec.core.url_to_fs(url, **(storage_options or {}))
                found = sorted(fs.glob(path))
                if not found:
                    raise FileNotFoundError(f"shard pattern {url!r} matches no file")
                protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
                out += [p if protocol in ("file", "local") else fs.unstrip_protocol(p) for p in found]
            else:
                out.append(url)
    bad = [u for u in out if not u.endswith(TAR_SUFFIX)]
    if bad:
        raise ValueError(f"shard URLs must name .tar files, got {bad[:3]}")
    return sorted(dict.fromkeys(out))


def index_url(tar_url: str) -> str:
    """The index parquet beside a tar: x-256x256-000001.tar -> x-256x256-000001.index.parquet."""
    return tar_url[: -len(TAR_SUFFIX)] + INDEX_SUFFIX


_ROWS_CACHE: OrderedDict = OrderedDict()
_ROWS_CACHE_SIZE = 64  # shards whose keys/offsets are kept in memory (per process)


@dataclass
class ShardInfo:
    """What the index parquet says about one tar: sample count, kind, stage and encoder ids.

    The per-row columns (keys, byte offsets, sizes) are loaded lazily from the index when the shard is
    read, and cached for a few shards only, so a run over millions of samples stays small in memory.
    Rows whose key is in `removed` (the dedup step's result) are left out of those columns and of
    `num_samples`, so positions, offsets and resume only ever see the samples that remain.
    """

    url: str
    source: str
    stage: str
    kind: str
    num_samples: int
    vae_id: str | None
    text_encoder_id: str | None
    scale_factor: float | None
    storage_options: dict = field(default_factory=dict)
    # Keys of this shard removed by the dedup step (skipped; not counted in num_samples).
    removed: frozenset = frozenset()
    # What its samples store (index column storage_profile; shards written before profiles: full).
    profile: StorageProfile = PROFILES["full"]

    def _rows(self) -> tuple[list[str], np.ndarray, np.ndarray]:
        cache_key = (self.url, self.removed)
        rows = _ROWS_CACHE.get(cache_key)
        if rows is None:
            table = _read_index(self.url, ["key", "offset", "bytes_total"], self.storage_options)
            shapes = _read_shapes(self.url, self.storage_options)
            keys = table.column("key").to_pylist()
            offsets, sizes = table.column("offset"), table.column("bytes_total")
            if offsets.null_count or sizes.null_count:
                offsets = sizes = None  # not written by ShardWriter: stream the tar instead
            else:
                offsets = np.asarray(offsets.to_numpy(zero_copy_only=False), dtype=np.int64)
                sizes = np.asarray(sizes.to_numpy(zero_copy_only=False), dtype=np.int64)
            gaps, end = None, 0
            if offsets is not None and len(keys):
                # tar bytes between a row's range and the previous row's (removed rows included): a
                # ShardWriter tar has none, so any gap holds members the index lacks
                ends = offsets + sizes
                gaps = offsets - np.concatenate([[0], ends[:-1]])
                end = int(ends[-1])
            if self.removed:
                keep = np.fromiter((k not in self.removed for k in keys), dtype=bool, count=len(keys))
                keys = [k for k, kept in zip(keys, keep.tolist()) if kept]
                if offsets is not None:
                    offsets, sizes, gaps = offsets[keep], sizes[keep], gaps[keep]
                shapes = {c: a.filter(pa.array(keep)) for c, a in shapes.items()}
            rows = (keys, offsets, sizes, shapes, gaps, end)
            if len(keys) != self.num_samples:
                raise ShardMismatchError(f"{self.url}: index changed while reading ({len(keys)} rows)")
            _ROWS_CACHE[cache_key] = rows
            while len(_ROWS_CACHE) > _ROWS_CACHE_SIZE:
                _ROWS_CACHE.popitem(last=False)
        else:
            _ROWS_CACHE.move_to_end(cache_key)
        return rows

    @property
    def keys(self) -> list[str]:
        return self._rows()[0]

    @property
    def offsets(self) -> np.ndarray | None:
        """int64 byte offset of each sample's first tar header (None when the index has none)."""
        return self._rows()[1]

    @property
    def sizes(self) -> np.ndarray | None:
        """int64 bytes of each sample, tar headers included."""
        return self._rows()[2]

    @property
    def gaps(self) -> np.ndarray | None:
        """int64 tar bytes between each row's range and the end of the previous index row's (0 when contiguous)."""
        return self._rows()[4]

    @property
    def end(self) -> int:
        """Byte where the last index row's range ends (removed rows included): the end-of-archive blocks."""
        return self._rows()[5]

    def index_shapes(self, row: int) -> dict[str, list[int]]:
        """{member: shape} the index row promises ("latent.npy", "latent_std.npy", "latent_logstd8.npy",
        "text_tokens.npy", "image_tokens.npy"); members whose index shape is null or absent are left out."""
        out = {}
        for column, array in self._rows()[3].items():
            shape = array[row].as_py() if column in SHAPE_COLUMNS else None
            if shape is not None:
                for member in SHAPE_COLUMNS[column]:
                    out[member] = shape
        return out

    def logstd_scale(self, row: int) -> tuple[float, float] | None:
        """(logstd_offset, logstd_step) of a mean+logstd8 row (None when the index has none)."""
        columns = self._rows()[3]
        if "logstd_offset" not in columns or "logstd_step" not in columns:
            return None
        offset, step = columns["logstd_offset"][row].as_py(), columns["logstd_step"][row].as_py()
        return None if offset is None or step is None else (float(offset), float(step))


SHAPE_COLUMNS = {
    "latent_shape": ("latent.npy", "latent_std.npy", "latent_logstd8.npy"),
    "text_tokens_shape": ("text_tokens.npy",),
    "image_tokens_shape": ("image_tokens.npy",),
}
ROW_COLUMNS = ("logstd_offset", "logstd_step")  # per-row numbers the decoder needs besides the shapes


def _read_shapes(tar_url: str, storage_options: dict | None) -> dict:
    """The index's shape (and ROW_COLUMNS) columns present in its schema, as combined pyarrow arrays."""
    fs, path = fsspec.core.url_to_fs(index_url(tar_url), **(storage_options or {}))
    with fs.open(path, "rb") as f:
        pf = pq.ParquetFile(f)
        columns = [c for c in (*SHAPE_COLUMNS, *ROW_COLUMNS) if c in pf.schema_arrow.names]
        table = pf.read(columns=columns) if columns else None
    return {c: table.column(c).combine_chunks() for c in columns}


def _read_index(tar_url: str, columns: list[str], storage_options: dict | None, optional=()):
    """Columns of a tar's index parquet; those in `optional` are left out when the index lacks them."""
    fs, path = fsspec.core.url_to_fs(index_url(tar_url), **(storage_options or {}))
    with fs.open(path, "rb") as f:
        if optional:
            pf = pq.ParquetFile(f)
            have = set(pf.schema_arrow.names)
            return pf.read(columns=[c for c in columns if c in have or c not in optional])
        return pq.read_table(f, columns=columns)


def _single(table, column: str, url: str):
    values = set(table.column(column).to_pylist()) if table.num_rows else {None}
    if len(values) > 1:
        raise ShardMismatchError(
            f"shard {url}: index column {column!r} is not constant ({sorted(map(str, values))})"
        )
    return values.pop()


def read_shard_info(
    url: str, storage_options: dict | None = None, removed: set[str] | frozenset | None = None
) -> ShardInfo | None:
    """The ShardInfo of a tar from its index parquet; None when the index is absent (shard not done).

    `removed`: keys the dedup step removed from the shard's (source, stage) (see shards.format.removed_keys);
    those of this shard are left out of the ShardInfo's rows and count.
    """
    fs, path = fsspec.core.url_to_fs(index_url(url), **(storage_options or {}))
    if not fs.exists(path):
        return None
    columns = INDEX_COLUMNS + [PROFILE_COLUMN] + (["key"] if removed else [])
    table = _read_index(url, columns, storage_options, optional=(PROFILE_COLUMN,))
    skip = frozenset(k for k in table.column("key").to_pylist() if k in removed) if removed else frozenset()
    name = parse_shard_stem(url)
    kind = _single(table, "kind", url) or "video"
    if kind not in ("video", "image"):
        raise ShardMismatchError(f"shard {url}: index kind {kind!r} is neither 'video' nor 'image'")
    stage = _single(table, "stage", url) or name["stage"]
    if stage != name["stage"]:
        raise ShardMismatchError(
            f"shard {url}: file name says stage {name['stage']} but its index says {stage}"
        )
    scale = _single(table, "scale_factor", url)
    try:
        profile = StorageProfile.parse(
            _single(table, PROFILE_COLUMN, url) if PROFILE_COLUMN in table.column_names else None
        )
    except ValueError as exn:
        raise ShardMismatchError(f"shard {url}: index column {PROFILE_COLUMN}: {exn}") from None
    return ShardInfo(
        url=url,
        source=name["source"],
        stage=stage,
        kind=kind,
        num_samples=table.num_rows - len(skip),
        vae_id=_single(table, "vae_id", url),
        text_encoder_id=_single(table, "text_encoder_id", url),
        scale_factor=None if scale is None else float(scale),
        storage_options=dict(storage_options or {}),
        removed=skip,
        profile=profile,
    )


def _dedup_groups(urls: list[str]) -> dict[str, tuple[str, str, str]]:
    """url -> (shard folder, source, stage) of every parseable shard URL (its dedup result's address)."""
    out = {}
    for url in urls:
        try:
            name = parse_shard_stem(url)
        except ValueError:
            continue  # read_shard_info raises naming it
        out[url] = (shard_folder(url), name["source"], name["stage"])
    return out


def read_shard_infos(
    urls: list[str], storage_options: dict | None = None, threads: int = 16, *, dedup: bool = True
) -> list:
    """read_shard_info of many tars, in parallel threads (index reads are small and latency-bound).

    With `dedup`, each (folder, source, stage)'s dedup result is read once and its keys are skipped.
    """
    groups = _dedup_groups(urls) if dedup else {}
    with ThreadPoolExecutor(max(1, min(threads, len(urls)))) as pool:
        distinct = sorted(set(groups.values()))
        removed = dict(zip(distinct, pool.map(lambda g: removed_keys(*g, storage_options), distinct)))
        return list(pool.map(lambda u: read_shard_info(u, storage_options, removed.get(groups.get(u))), urls))


def count_samples(urls, storage_options: dict | None = None, *, dedup: bool = True) -> dict:
    """Samples per tar URL, from the parquet indexes (shards without an index are left out); with
    `dedup`, samples removed by the dedup step are not counted."""
    urls = expand_shard_urls(urls, storage_options=storage_options)
    infos = read_shard_infos(urls, storage_options, dedup=dedup)
    return {info.url: info.num_samples for info in infos if info is not None}
