"""Shard reading: rows of a tar by index byte range (or streamed), every read bounded (see shards.tarsafe)."""

from __future__ import annotations

import logging

import fsspec
import fsspec.implementations.local

from shards.index import (
    INDEX_COLUMNS,
    SHAPE_COLUMNS,
    ShardInfo,
    ShardMismatchError,
    count_samples,
    expand_shard_urls,
    index_url,
    read_shard_info,
    read_shard_infos,
)
from shards.tarsafe import (
    BAD_REASONS,
    MAX_SAMPLE_BYTES,
    BadSample,
    _header_fields,
    _iter_tar,
    _member_name,
    _Tar,
    parse_sample,
)

# Names other modules import from here (shards.reader was one module before shards.index and shards.tarsafe).
__all__ = [
    "BAD_REASONS",
    "INDEX_COLUMNS",
    "MAX_SAMPLE_BYTES",
    "READ_BUFFER",
    "SHAPE_COLUMNS",
    "BadSample",
    "ShardInfo",
    "ShardMismatchError",
    "count_samples",
    "expand_shard_urls",
    "index_url",
    "parse_sample",
    "read_row",
    "read_rows",
    "read_shard_info",
    "read_shard_infos",
]

log = logging.getLogger(__name__)


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
