"""Shard reading: URL expansion, parquet indexes (counts, offsets, encoder ids, dedup), positional tar reads."""

from __future__ import annotations

import logging
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import fsspec
import fsspec.implementations.local
import numpy as np
import pyarrow.parquet as pq
from webdataset.shardlists import expand_urls
from webdataset.tariterators import tar_file_iterator

from shards.format import (
    INDEX_SUFFIX,
    TAR_SUFFIX,
    check_member_name,
    parse_shard_stem,
    removed_keys,
    shard_folder,
)

log = logging.getLogger(__name__)

INDEX_COLUMNS = ["kind", "stage", "vae_id", "text_encoder_id", "scale_factor"]


class ShardMismatchError(ValueError):
    """A shard does not belong to this run (other encoder, scale factor or resolution stage). Never skipped."""


class BadSample(Exception):
    """One sample that cannot be used (missing/undecodable member, truncated tar); skipped and counted."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


# ---------------------------------------------------------------- URLs and indexes


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

    def _rows(self) -> tuple[list[str], np.ndarray, np.ndarray]:
        cache_key = (self.url, self.removed)
        rows = _ROWS_CACHE.get(cache_key)
        if rows is None:
            table = _read_index(self.url, ["key", "offset", "bytes_total"], self.storage_options)
            keys = table.column("key").to_pylist()
            offsets, sizes = table.column("offset"), table.column("bytes_total")
            if offsets.null_count or sizes.null_count:
                offsets = sizes = None  # not written by ShardWriter: stream the tar instead
            else:
                offsets = np.asarray(offsets.to_numpy(zero_copy_only=False), dtype=np.int64)
                sizes = np.asarray(sizes.to_numpy(zero_copy_only=False), dtype=np.int64)
            if self.removed:
                keep = np.fromiter((k not in self.removed for k in keys), dtype=bool, count=len(keys))
                keys = [k for k, kept in zip(keys, keep.tolist()) if kept]
                if offsets is not None:
                    offsets, sizes = offsets[keep], sizes[keep]
            rows = (keys, offsets, sizes)
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


def _read_index(tar_url: str, columns: list[str], storage_options: dict | None):
    fs, path = fsspec.core.url_to_fs(index_url(tar_url), **(storage_options or {}))
    with fs.open(path, "rb") as f:
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
    table = _read_index(url, INDEX_COLUMNS + (["key"] if removed else []), storage_options)
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


# ---------------------------------------------------------------- tar reading


def _group_members(members):
    """(key, {member: bytes}) for runs of consecutive tar members sharing a key; unsafe names raise."""
    key, group = None, {}
    for item in members:
        k, member = check_member_name(item["fname"])
        if k != key and group:
            yield key, group
            group = {}
        key = k
        group[member] = item["data"]
    if group:
        yield key, group


READ_BUFFER = 4 << 20  # bytes per read when streaming a tar (local buffer size / fsspec block size)


def _open(url: str, offset: int, storage_options: dict | None, buffer: int = READ_BUFFER):
    """A binary file positioned at `offset`: a plain buffered file when local, else an fsspec file."""
    fs, path = fsspec.core.url_to_fs(url, **(storage_options or {}))
    if isinstance(fs, fsspec.implementations.local.LocalFileSystem):
        f = open(path, "rb", buffering=buffer)
    else:
        f = fs.open(path, "rb", block_size=buffer)
    f.seek(int(offset))
    return f


def parse_sample(data, key: str, where: str):
    """{member: bytes} of one sample's tar bytes (its USTAR headers + data), or a BadSample.

    Only regular members with a valid header checksum and a safe "<key>.<member>" name are accepted.
    .npy members come back as memoryviews of `data` (no copy); others as bytes.
    """
    view, members, p = memoryview(data), {}, 0
    try:
        while p + 512 <= len(data):
            header = data[p : p + 512]
            if not any(header):
                break  # end-of-archive blocks
            checksum = int(header[148:156].strip(b"\0 ") or b"0", 8)
            if checksum != sum(header[:148]) + 256 + sum(header[156:]):
                raise ValueError(f"bad tar header checksum at byte {p}")
            name = header[:100].split(b"\0", 1)[0].decode("utf-8")
            prefix = header[345:500].split(b"\0", 1)[0]
            if prefix:
                name = prefix.decode("utf-8") + "/" + name
            if header[156:157] not in (b"0", b"\0"):
                raise ValueError(f"member {name!r} is not a regular file")
            k, member = check_member_name(name)
            if k != key:
                raise ValueError(f"member {name!r} inside the byte range of sample {key!r}")
            size = int(header[124:136].strip(b"\0 ") or b"0", 8)
            if p + 512 + size > len(data):
                raise ValueError(f"member {name!r} is cut short")
            body = view[p + 512 : p + 512 + size]
            members[member] = body if member.endswith(".npy") else bytes(body)
            p += 512 + -(-size // 512) * 512
    except (ValueError, UnicodeDecodeError) as exn:
        return BadSample("bad_member", f"{where}: {exn}")
    if not members:
        return BadSample("missing_sample", f"{where}: no member at the index offset")
    return members


def _read_rows_by_offset(shard: ShardInfo, start_row: int, storage_options: dict | None, step: int):
    """Index-guided read: each row's exact byte range (offset, size), rows start_row, start_row + step, ..."""
    keys, offsets, sizes = shard.keys, shard.offsets, shard.sizes
    rows = range(start_row, shard.num_samples, step)
    done = 0
    try:
        with _open(shard.url, offsets[start_row], storage_options) as f:
            pos = int(offsets[start_row])
            for row in rows:
                if offsets[row] != pos:
                    f.seek(int(offsets[row]))
                data = f.read(int(sizes[row]))
                pos = int(offsets[row]) + len(data)
                if len(data) < sizes[row]:
                    raise EOFError(f"tar ends at byte {pos}, inside sample {keys[row]!r}")
                yield row, parse_sample(data, keys[row], f"{shard.url} sample {keys[row]!r}")
                done += 1
    except Exception as exn:  # truncated or unreadable tar: the rest of the shard is bad
        failure = BadSample("bad_tar", f"{shard.url}: {type(exn).__name__}: {exn}")
        for row in rows[done:]:
            yield row, failure


def read_rows(shard: ShardInfo, start_row: int, storage_options: dict | None = None, step: int = 1):
    """Yield (row, raw) for rows start_row, start_row + step, ... in order; raw is {member: bytes} or a BadSample.

    With byte offsets in the index each row's byte range is read and parsed on its own, so a bad
    member spoils one sample only. Without them (indexes of other tools) the tar is streamed with
    webdataset's tar iterator from the start. Rows absent from the tar (truncated tar, bad member
    name, key out of order) come back as BadSample.
    """
    if start_row >= shard.num_samples:
        return
    if shard.offsets is not None:
        yield from _read_rows_by_offset(shard, start_row, storage_options, step)
    else:
        for row, raw in _stream_rows(shard, start_row, storage_options):
            if (row - start_row) % step == 0:
                yield row, raw


def _stream_rows(shard: ShardInfo, start_row: int, storage_options: dict | None):
    """Stream the whole tar with webdataset's tar iterator; rows before start_row are read and dropped."""
    keys = shard.keys
    pending = {k: r for r, k in enumerate(keys)}
    row = start_row
    failure = None
    try:
        with _open(shard.url, 0, storage_options) as f:
            for key, group in _group_members(tar_file_iterator(f)):
                got = pending.pop(key, None)
                if got is None or got < row:
                    continue  # before start_row, not in the index, or repeated
                while row < got:
                    yield row, BadSample("missing_sample", f"{shard.url}: key {keys[row]!r} not in tar")
                    pending.pop(keys[row], None)
                    row += 1
                yield row, group
                row += 1
                if row >= shard.num_samples:
                    return
    except Exception as exn:  # truncated or unreadable tar: the rest of the shard is bad
        failure = BadSample("bad_tar", f"{shard.url}: {type(exn).__name__}: {exn}")
    while row < shard.num_samples:
        yield row, failure or BadSample("missing_sample", f"{shard.url}: key {keys[row]!r} not in tar")
        row += 1


def read_row(shard: ShardInfo, row: int, storage_options: dict | None = None):
    """The raw members of one index row, by random access (offset, size); a BadSample when unreadable."""
    if shard.offsets is None:
        return next(_stream_rows(shard, row, storage_options))[1]
    where = f"{shard.url} sample {shard.keys[row]!r}"
    try:
        with _open(shard.url, shard.offsets[row], storage_options, buffer=int(shard.sizes[row])) as f:
            data = f.read(int(shard.sizes[row]))
    except Exception as exn:
        return BadSample("bad_tar", f"{where}: {type(exn).__name__}: {exn}")
    if len(data) < shard.sizes[row]:
        return BadSample("bad_tar", f"{where}: tar ends inside the sample")
    return parse_sample(data, shard.keys[row], where)
