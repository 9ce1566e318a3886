"""Shard reading: URL expansion, parquet indexes (counts, offsets, encoder ids, dedup), positional tar reads."""

from __future__ import annotations

import logging
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import fsspec
import fsspec.implementations.local
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from webdataset.shardlists import expand_urls

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


# Why a sample (or a stretch of tar) was skipped: the keys of ShardLoader.stats["bad_samples_by_reason"].
BAD_REASONS = {
    "unsafe_member_name": "a tar member named with a path ('/', '\\\\', '..', absolute) or not '<key>.<member>'",
    "unsafe_member_type": "a tar member that is not a regular file (link, directory, device, pax/GNU header)",
    "member_size_mismatch": "tar member sizes disagree with the sample's byte range in the index",
    "member_too_large": "a sample or member larger than MAX_SAMPLE_BYTES (never read into memory)",
    "offset_out_of_range": "the index offset/size lies outside the tar (negative, or past its end)",
    "truncated": "the tar ends inside the sample (cut short, no end-of-archive blocks)",
    "index_mismatch": "index and tar disagree: another key (or nothing) at the offset, or tar bytes no row covers",
    "bad_tar": "unreadable tar (bad header checksum, I/O error)",
    "missing_member": "a required member is absent",
    "bad_npy": "an undecodable .npy member (object dtype/pickle, bad header, size disagreeing with its shape)",
    "shape_mismatch": "a .npy shape differs from the shape in the sample's index row",
    "bad_member": "an undecodable json/txt member",
}
# Cap on one sample's bytes (index bytes_total) and one member's size: nothing larger is read into memory.
MAX_SAMPLE_BYTES = 1 << 30


class BadSample(Exception):
    """One sample that cannot be used (see BAD_REASONS); skipped and counted by reason."""

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
        """{member: shape} the index row promises ("latent.npy", "latent_std.npy", "text_tokens.npy",
        "image_tokens.npy"); members whose index shape is null or absent are left out."""
        out = {}
        for column, array in self._rows()[3].items():
            shape = array[row].as_py()
            if shape is not None:
                for member in SHAPE_COLUMNS[column]:
                    out[member] = shape
        return out


SHAPE_COLUMNS = {
    "latent_shape": ("latent.npy", "latent_std.npy"),
    "text_tokens_shape": ("text_tokens.npy",),
    "image_tokens_shape": ("image_tokens.npy",),
}


def _read_shapes(tar_url: str, storage_options: dict | None) -> dict:
    """The index's shape columns present in its schema, as combined pyarrow list arrays (compact in memory)."""
    fs, path = fsspec.core.url_to_fs(index_url(tar_url), **(storage_options or {}))
    with fs.open(path, "rb") as f:
        pf = pq.ParquetFile(f)
        columns = [c for c in SHAPE_COLUMNS if c in pf.schema_arrow.names]
        table = pf.read(columns=columns) if columns else None
    return {c: table.column(c).combine_chunks() for c in columns}


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
#
# Tars are untrusted (they travel between machines). Nothing here extracts a member to disk; every read is
# bounded by the index's byte range and MAX_SAMPLE_BYTES; member names must be "<key>.<member>" (no paths);
# only regular USTAR members are accepted. Every problem becomes a BadSample with one of BAD_REASONS.


def _header_fields(header: bytes, where: str) -> tuple[str, int, bool]:
    """(name, size, is_regular) of one 512-byte USTAR header; BadSample("bad_tar") for a bad checksum/size."""
    try:
        checksum = int(header[148:156].strip(b"\0 ") or b"0", 8)
        size = int(header[124:136].strip(b"\0 ") or b"0", 8)
    except ValueError:
        raise BadSample("bad_tar", f"{where}: unparsable tar header") from None
    if checksum != sum(header[:148]) + 256 + sum(header[156:]):
        raise BadSample("bad_tar", f"{where}: bad tar header checksum")
    raw_name = header[:100].split(b"\0", 1)[0]
    prefix = header[345:500].split(b"\0", 1)[0]
    if prefix:
        raw_name = prefix + b"/" + raw_name
    name = raw_name.decode("utf-8", "backslashreplace")
    return name, size, header[156:157] in (b"0", b"\0")


def _member_name(name: str, regular: bool, where: str) -> tuple[str, str]:
    """(key, member) of a regular member with a safe name; BadSample otherwise."""
    try:
        key, member = check_member_name(name)
    except ValueError:
        raise BadSample("unsafe_member_name", f"{where}: unsafe tar member name {name!r}") from None
    if not regular:
        raise BadSample("unsafe_member_type", f"{where}: tar member {name!r} is not a regular file")
    return key, member


def parse_sample(data, key: str, where: str):
    """{member: bytes} of one sample's tar bytes (its USTAR headers + data, exactly its index range), or a
    BadSample naming the reason. .npy members come back as memoryviews of `data` (no copy); others as bytes."""
    view, members, p = memoryview(data), {}, 0
    try:
        while p < len(data):
            if p + 512 > len(data):
                raise BadSample(
                    "member_size_mismatch", f"{where}: {len(data) - p} index bytes left after the last member"
                )
            header = data[p : p + 512]
            if not any(header):
                reason = "index_mismatch" if p == 0 else "member_size_mismatch"
                raise BadSample(
                    reason, f"{where}: end-of-archive block at byte {p} of the sample's index range"
                )
            try:
                name, size, regular = _header_fields(header, f"{where}: member at byte {p}")
            except BadSample as bad:
                if p == 0:
                    raise BadSample("index_mismatch", f"{where}: no tar header at the index offset") from None
                raise bad from None
            k, member = _member_name(name, regular, where)
            if k != key:
                if p == 0:
                    raise BadSample("index_mismatch", f"{where}: the index offset holds member {name!r}")
                raise BadSample(
                    "member_size_mismatch", f"{where}: the index byte range runs into member {name!r}"
                )
            if p + 512 + size > len(data):
                raise BadSample(
                    "member_size_mismatch",
                    f"{where}: member {name!r} is {size} bytes, past the sample's index range "
                    f"({len(data)} bytes)",
                )
            body = view[p + 512 : p + 512 + size]
            members[member] = body if member.endswith(".npy") else bytes(body)
            p += 512 + -(-size // 512) * 512
    except BadSample as bad:
        return bad
    return members


class _Tar:
    """An open tar and, computed only when a read comes up short, its size and whether it ends properly."""

    def __init__(self, f, url: str):
        self.f, self.url = f, url
        self._size: int | None = None
        self._clean: bool | None = None

    @property
    def size(self) -> int:
        if self._size is None:
            self._size = int(self.f.seek(0, 2))
        return self._size

    @property
    def ends_cleanly(self) -> bool:
        """True when the tar ends with end-of-archive zero blocks (so it was not cut short)."""
        if self._clean is None:
            size = self.size
            self._clean = False
            if size >= 1024 and size % 512 == 0:
                self.f.seek(size - 1024)
                tail = self.f.read(1024)
                self._clean = len(tail) == 1024 and not any(tail)
        return self._clean

    def read_range(self, key: str, offset: int, nbytes: int):
        """The bytes of one index range, or a BadSample (range invalid, too large, past the end, truncated)."""
        where = f"{self.url} sample {key!r}"
        if nbytes > MAX_SAMPLE_BYTES:
            return BadSample(
                "member_too_large",
                f"{where}: index bytes_total={nbytes} > MAX_SAMPLE_BYTES={MAX_SAMPLE_BYTES}; not read",
            )
        if offset < 0 or offset % 512 or nbytes < 512 or nbytes % 512:
            return BadSample(
                "offset_out_of_range",
                f"{where}: index offset {offset} / bytes_total {nbytes} is no tar range",
            )
        try:
            self.f.seek(offset)
            data = self.f.read(nbytes)
        except (OSError, ValueError) as exn:
            if offset >= self.size:
                data = b""
            else:
                return BadSample("bad_tar", f"{where}: {type(exn).__name__}: {exn}")
        if len(data) == nbytes:
            return data
        if self.ends_cleanly:
            return BadSample(
                "offset_out_of_range",
                f"{where}: index range [{offset}, {offset + nbytes}) lies past the end of the tar "
                f"({self.size} bytes)",
            )
        return BadSample(
            "truncated",
            f"{where}: the tar ends at byte {self.size} (cut short, no end-of-archive blocks), "
            f"before the end of the sample's range [{offset}, {offset + nbytes})",
        )

    def trailing_member(self, end: int):
        """A BadSample when a tar member lies after the last indexed sample (at `end`), else None."""
        try:
            self.f.seek(end)
            block = self.f.read(512)
        except (OSError, ValueError):
            return None
        if len(block) < 512 or not any(block):
            return None
        try:
            name = repr(_header_fields(block, self.url)[0])
        except BadSample:
            name = "(unparsable header)"
        return BadSample(
            "index_mismatch", f"{self.url}: tar member {name} at byte {end} is after the last indexed sample"
        )


READ_BUFFER = 4 << 20  # bytes per read when streaming a tar (local buffer size / fsspec block size)


def _open(url: str, offset: int, storage_options: dict | None, buffer: int = READ_BUFFER):
    """A binary file positioned at `offset`: a plain buffered file when local, else an fsspec file."""
    fs, path = fsspec.core.url_to_fs(url, **(storage_options or {}))
    if isinstance(fs, fsspec.implementations.local.LocalFileSystem):
        f = open(path, "rb", buffering=buffer)
    else:
        f = fs.open(path, "rb", block_size=buffer)
    if offset > 0:
        f.seek(int(offset))
    return f


def _unindexed(tar: _Tar, shard: ShardInfo, row: int, known: set):
    """A BadSample when tar bytes before `row`'s range (after the previous row's) hold a member whose key no
    index row has (a member the index lacks); None when there is no gap or it holds an indexed key (whose
    own row is then counted with its own reason, e.g. an offset out of range, as is a gap starting mid-member)."""
    gap = int(shard.gaps[row])
    if gap <= 0:
        return None
    start = int(shard.offsets[row]) - gap
    try:
        tar.f.seek(start)
        block = tar.f.read(512)
        name = _header_fields(block, shard.url)[0] if len(block) == 512 and any(block) else None
    except (BadSample, OSError, ValueError):
        return None  # not a header: the previous row's size is wrong, and that row is counted for it
    if name is None or name.partition(".")[0] in known:
        return None
    return BadSample(
        "index_mismatch",
        f"{shard.url}: tar member {name!r} at byte {start} (before sample {shard.keys[row]!r}) is in no index row",
    )


def _read_rows_by_offset(shard: ShardInfo, start_row: int, storage_options: dict | None, step: int):
    """Index-guided read: each row's exact byte range (offset, size), rows start_row, start_row + step, ...

    A row whose range is preceded by tar bytes no index row covers first yields (None, BadSample); so does
    a tar member after the last indexed sample (checked by the reader of the last row)."""
    keys, offsets, sizes = shard.keys, shard.offsets, shard.sizes
    rows = range(start_row, shard.num_samples, step)
    done = 0
    try:
        with _open(shard.url, max(0, int(offsets[start_row])), storage_options) as f:
            tar = _Tar(f, shard.url)
            known = None
            for row in rows:
                if shard.gaps[row] > 0:
                    known = known or set(keys) | set(shard.removed)
                    extra = _unindexed(tar, shard, row, known)
                    if extra is not None:
                        yield None, extra
                raw = tar.read_range(keys[row], int(offsets[row]), int(sizes[row]))
                if not isinstance(raw, BadSample):
                    raw = parse_sample(raw, keys[row], f"{shard.url} sample {keys[row]!r}")
                yield row, raw
                done += 1
            if done and rows[-1] == shard.num_samples - 1:
                extra = tar.trailing_member(shard.end)
                if extra is not None:
                    yield None, extra
    except Exception as exn:  # unreadable tar: the rest of the shard is bad
        failure = BadSample("bad_tar", f"{shard.url}: {type(exn).__name__}: {exn}")
        for row in rows[done:]:
            yield row, failure


def read_rows(shard: ShardInfo, start_row: int, storage_options: dict | None = None, step: int = 1):
    """Yield (row, raw) for rows start_row, start_row + step, ... in order; raw is {member: bytes} or a BadSample.

    With byte offsets in the index each row's byte range is read and parsed on its own, so a bad
    member spoils one sample only. Without them (indexes of other tools) the tar is streamed from the
    start with bounded reads. Rows absent from the tar come back as BadSample. Tar content that is no
    index row's (extra members, unsafe names between samples) comes as (None, BadSample): count it, it
    has no position.
    """
    if start_row >= shard.num_samples:
        return
    if shard.offsets is not None:
        yield from _read_rows_by_offset(shard, start_row, storage_options, step)
    else:
        for row, raw in _stream_rows(shard, start_row, storage_options):
            if row is None or (row - start_row) % step == 0:
                yield row, raw


def _iter_tar(f, url: str):
    """(name, is_regular, data) of each tar member in order, reading at most MAX_SAMPLE_BYTES per member;
    a damaged or truncated tar ends the stream with a BadSample (a too-large member yields one and is skipped)."""
    p = 0
    while True:
        header = f.read(512)
        if len(header) < 512:
            yield BadSample("truncated", f"{url}: the tar ends at byte {p + len(header)} without end blocks")
            return
        if not any(header):
            return
        try:
            name, size, regular = _header_fields(header, f"{url}: member at byte {p}")
        except BadSample as bad:
            yield bad
            return
        padded = -(-size // 512) * 512
        if size > MAX_SAMPLE_BYTES:
            yield BadSample(
                "member_too_large", f"{url}: member {name!r} is {size} bytes > MAX_SAMPLE_BYTES; not read"
            )
            f.seek(p + 512 + padded)
        else:
            data = f.read(size)
            if len(data) < size:
                yield BadSample("truncated", f"{url}: the tar ends inside member {name!r}")
                return
            f.read(padded - size)
            yield name, regular, data
        p += 512 + padded


def _stream_rows(shard: ShardInfo, start_row: int, storage_options: dict | None):
    """Stream the whole tar with bounded reads; rows before start_row are read and dropped."""
    keys = shard.keys
    pending = {k: r for r, k in enumerate(keys)}
    row = start_row
    failure = None
    current, group = None, {}

    def flush():
        nonlocal row
        got = pending.pop(current, None)
        if got is None or got < row:
            return  # before start_row, not in the index, or repeated
        while row < got:
            yield row, BadSample("index_mismatch", f"{shard.url}: key {keys[row]!r} not in tar")
            pending.pop(keys[row], None)
            row += 1
        yield row, group
        row += 1

    try:
        with _open(shard.url, 0, storage_options) as f:
            for item in _iter_tar(f, shard.url):
                if isinstance(item, BadSample):
                    if item.reason == "member_too_large":
                        yield None, item
                        continue
                    failure = item
                    break
                name, regular, data = item
                try:
                    key, member = _member_name(name, regular, shard.url)
                except BadSample as bad:
                    yield None, bad
                    continue
                if key != current and group:
                    yield from flush()
                    group = {}
                    if row >= shard.num_samples:
                        return
                current = key
                group[member] = data
            if group and failure is None:
                yield from flush()
    except Exception as exn:  # unreadable tar: the rest of the shard is bad
        failure = BadSample("bad_tar", f"{shard.url}: {type(exn).__name__}: {exn}")
    while row < shard.num_samples:
        yield row, failure or BadSample("index_mismatch", f"{shard.url}: key {keys[row]!r} not in tar")
        row += 1


def read_row(shard: ShardInfo, row: int, storage_options: dict | None = None):
    """The raw members of one index row, by random access (offset, size); a BadSample when unreadable."""
    if shard.offsets is None:
        return next(r for r in _stream_rows(shard, row, storage_options) if r[0] is not None)[1]
    where = f"{shard.url} sample {shard.keys[row]!r}"
    offset, nbytes = int(shard.offsets[row]), int(shard.sizes[row])
    try:
        with _open(shard.url, 0, storage_options, buffer=max(1, min(nbytes, READ_BUFFER))) as f:
            data = _Tar(f, shard.url).read_range(shard.keys[row], offset, nbytes)
    except Exception as exn:
        return BadSample("bad_tar", f"{where}: {type(exn).__name__}: {exn}")
    if isinstance(data, BadSample):
        return data
    return parse_sample(data, shard.keys[row], where)
