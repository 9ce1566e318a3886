"""Manifest planning: one pass per manifest file finds where every input shard starts and every duplicate key.

The encode job reads input shard k of a manifest (rows [k*S, (k+1)*S)) in its own task with a fresh reader.
Without a plan every such read walks the file from the top (CSV, JSONL) and finds duplicate keys by a scan of
the whole file: quadratic over a 10.7M-row WebVid CSV. With one:

    plan = plan_manifest("webvid", "results_10M_train.csv", rows_per_shard=1000)   # once, on the driver
    span = plan.spans[k]                              # task k gets these two small values
    dups = plan.duplicates_in(span)
    reader = make_reader("webvid", manifest, ...)     # inside the task, as before
    items = reader.read_span(span, duplicates=dups)   # seeks to span.offset: no row before it is read
    # a read unit (part of a span): reader.read_span(span, range(a, b), duplicates=dups)
    # equivalently: reader.read(range(a, b), offset=span.offset, offset_row=span.start, duplicates=dups)

Every slicing of a manifest so read gives exactly the records and error rows of one whole `read()`, in order.

How the plan is made (the choice measured for issue #11):
- Offsets. CSV: csv.reader is driven over the file's lines (split on b"\\n" in binary, each decoded as utf-8
  with errors="replace"), counting the bytes of every line handed out; csv.reader pulls lines only while a
  record is incomplete, so between records the count is the next record's byte offset, exact under quoted
  newlines, quoted commas, "" escapes, CRLF and non-ASCII text. The reader seeks there and parses with the
  same line splitting. JSONL: a row is a line, offsets are summed line lengths. Parquet: None (row groups).
- Duplicates. A row is `duplicate_key` when an EARLIER row that passed every stage (no error) had the same
  key; the detail names that first row. Rows with errors never claim a key. Running the per-row stages
  over the whole file would cost ~10 us a row, so the pass records instead a lean value per row (Scan:
  the stripped WebVid videoid, the JourneyDB uuid run of img_path, the LAION key): equal keys of good
  rows imply equal lean values, and a null lean value means the row surely fails. Lean values go to
  Arrow in chunks of 256k rows, are normalised there and kept only as 64-bit hashes (8 bytes a row, no
  Python str per row: ~450 MB peak for 10.7M WebVid rows); repeats are found by a numpy sort. Only rows
  whose hash repeats (real repeats, and the rare hash collision) are re-read through the real stages,
  seeking to their span and staging just those rows; their keys, in row order, decide the map. So the
  map is exact, and the plan costs ~1.5x a bare csv.reader pass over a 10.7M-row WebVid CSV and ~1.6x a
  bare json.loads loop over JSONL (benchmarks/bench_sources.py).
- num_rows is min(rows in the file, max_rows); a reader planned from a whole file knows its count.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

from pipelines.sources.base import SourceReader

_P = 0x100000001B3  # the FNV-1 64-bit prime: odd, so invertible modulo 2**64


def hash64(values: pa.Array) -> np.ndarray:
    """A 64-bit polynomial hash of each string, vectorised: 0 for nulls, odd otherwise. Equal strings get
    equal hashes; unequal ones rarely do (a collision only makes a row a candidate, see `repeated`)."""
    values = values.cast(pa.large_string())
    n = len(values)
    if n == 0:
        return np.zeros(0, np.uint64)
    offsets = np.frombuffer(values.buffers()[1], np.int64, n + 1, values.offset * 8)
    first, last = int(offsets[0]), int(offsets[-1])
    data = (
        np.frombuffer(values.buffers()[2], np.uint8, last - first, first)
        if last > first
        else np.zeros(0, np.uint8)
    )
    powers = np.full(len(data) + 1, _P, np.uint64)
    powers[0] = 1
    inverse = np.full(len(data) + 1, pow(_P, -1, 2**64), np.uint64)
    inverse[0] = 1
    np.cumprod(powers, out=powers)  # P**k, wrapping modulo 2**64
    np.cumprod(inverse, out=inverse)
    prefix = np.zeros(len(data) + 1, np.uint64)
    np.cumsum(data * powers[:-1], out=prefix[1:])
    starts, ends = offsets[:-1] - first, offsets[1:] - first
    hashes = (prefix[ends] - prefix[starts]) * inverse[starts]  # sum of byte * P**(its place in the string)
    hashes = hashes * np.uint64(0x9E3779B97F4A7C15) + (ends - starts).astype(np.uint64) | np.uint64(1)
    hashes[~values.is_valid().to_numpy(zero_copy_only=False)] = 0
    return hashes


@dataclass
class Scan:
    """What a reader's lean planning pass (`_scan`) found.

    `lean` holds a hash of one lean value per row, from which duplicates are looked for. Each reader
    guarantees: two rows that pass every stage with the same key have the same lean value (lean values may
    be coarser than keys); 0 (a null lean value) means the row surely fails a stage. Rows whose hash
    repeats are then re-read through the real stages, so the duplicate map is exact.
    """

    num_rows: int  # rows scanned: min(rows in the file, max_rows)
    offsets: list[int | None]  # byte offset of the first row of every input shard (None: not seekable)
    lean: np.ndarray  # uint64, one per row


class LeanKeys:
    """Collects per-row lean values (strings or None) as 64-bit hashes, 8 bytes a row: each chunk goes to
    Arrow, through `transform` (vectorised normalisation) and `hash64`."""

    def __init__(self, transform: Callable[[pa.Array], pa.Array] | None = None, chunk: int = 1 << 18):
        self.transform, self.chunk = transform, chunk
        self.pending: list[str | None] = []
        self.chunks: list[np.ndarray] = []

    def extend(self, values: Iterable[str | None]) -> None:
        self.pending.extend(values)
        if len(self.pending) >= self.chunk:
            self.flush()

    def flush(self) -> None:
        if self.pending:
            values = pa.array(self.pending, pa.string())
            self.chunks.append(hash64(values if self.transform is None else self.transform(values)))
            self.pending = []

    def array(self) -> np.ndarray:
        self.flush()
        return np.concatenate(self.chunks) if self.chunks else np.zeros(0, np.uint64)


@dataclass(frozen=True, kw_only=True)
class ShardSpan:
    """Input shard of a manifest: its rows and where the first of them begins."""

    start: int  # first data row (0-based, header excluded)
    stop: int  # one past the last row
    offset: int | None  # byte offset in the manifest of row `start`'s first byte (None for parquet)

    @property
    def rows(self) -> range:
        return range(self.start, self.stop)


@dataclass(kw_only=True)
class ManifestPlan:
    """The plan of one manifest file: input shard i is spans[i]; the duplicate rows of the whole file."""

    source: str
    manifest: str
    num_rows: int  # rows planned: min(rows in the file, max_rows)
    rows_per_shard: int
    spans: list[ShardSpan]
    duplicates: dict[int, int]  # {row: first row with the same key}, over the rows planned
    _sorted: np.ndarray | None = field(default=None, init=False, repr=False, compare=False)

    def duplicates_in(self, span: ShardSpan | range) -> dict[int, int]:
        """The part of `duplicates` a read of `span` (or of a range of rows) needs: small, for a task."""
        rows = span.rows if isinstance(span, ShardSpan) else span
        if self._sorted is None:
            self._sorted = np.fromiter(sorted(self.duplicates), np.int64, len(self.duplicates))
        lo, hi = np.searchsorted(self._sorted, [rows.start, rows.stop])
        return {int(r): self.duplicates[int(r)] for r in self._sorted[lo:hi]}


def plan_manifest(
    source: str,
    manifest: str,
    rows_per_shard: int,
    *,
    max_rows: int | None = None,
    media_root: str | None = None,
    url_rewrite: dict[str, str] | None = None,
    storage_options: dict | None = None,
) -> ManifestPlan:
    """The plan of `manifest` (read by the `source` reader) cut into input shards of `rows_per_shard` rows,
    over its first `max_rows` rows when given. One pass over the file, plus re-reads of the spans that hold
    rows whose keys may repeat."""
    from pipelines.sources import make_reader

    reader = make_reader(
        source, manifest, media_root=media_root, url_rewrite=url_rewrite, storage_options=storage_options
    )
    return plan_reader(reader, rows_per_shard, max_rows=max_rows)


def plan_reader(reader: SourceReader, rows_per_shard: int, *, max_rows: int | None = None) -> ManifestPlan:
    """`plan_manifest` with a reader already open (which learns the file's row count when it is all read)."""
    if rows_per_shard < 1:
        raise ValueError(f"{reader.manifest}: rows_per_shard must be >= 1, got {rows_per_shard}")
    if max_rows is not None and max_rows < 0:
        raise ValueError(f"{reader.manifest}: max_rows must be >= 0 or None, got {max_rows}")
    scan = reader._scan(rows_per_shard, max_rows)
    n = scan.num_rows
    if len(scan.lean) != n or len(scan.offsets) != len(range(0, n, rows_per_shard)):
        raise AssertionError(
            f"{reader!r}: the planning pass found {n} rows, {len(scan.lean)} lean values and "
            f"{len(scan.offsets)} shard offsets (rows_per_shard={rows_per_shard})"
        )
    spans = [
        ShardSpan(start=start, stop=min(start + rows_per_shard, n), offset=offset)
        for start, offset in zip(range(0, n, rows_per_shard), scan.offsets)
    ]
    if max_rows is None or n < max_rows:
        reader._known_rows(n)
    return ManifestPlan(
        source=reader.name,
        manifest=reader.manifest,
        num_rows=n,
        rows_per_shard=rows_per_shard,
        spans=spans,
        duplicates=exact_duplicates(reader, spans, repeated(scan.lean)),
    )


def repeated(lean: np.ndarray) -> np.ndarray:
    """Rows (ascending) whose lean hash (non-zero) occurs more than once: a sort, no hash table."""
    order = np.argsort(lean)
    ordered = lean[order]
    same = ordered[1:] == ordered[:-1]
    mark = np.zeros(len(lean), bool)
    mark[1:] |= same
    mark[:-1] |= same
    return np.sort(order[mark & (ordered != 0)])


def _good_keys(reader: SourceReader, spans: list[ShardSpan], rows: np.ndarray) -> Iterator[tuple[int, str]]:
    """(row, key) of every row of `rows` (ascending) that passes all stages, read through the real stages
    (for each span holding some: seek to it, parse up to the last of them, stage only them)."""
    if not len(rows):
        return
    size = spans[0].stop - spans[0].start  # every span but the last has this many rows
    for group in np.split(rows, np.flatnonzero(np.diff(rows // size)) + 1):
        span, wanted = spans[int(group[0]) // size], set(group.tolist())
        for row in reader._staged(range(span.start, int(group[-1]) + 1), span.offset, span.start, wanted):
            if row.error is None:
                yield row.index, row.key


def exact_duplicates(reader: SourceReader, spans: list[ShardSpan], candidates: np.ndarray) -> dict[int, int]:
    """{row: first good row with its key}: the rows of one read from row 0 that become `duplicate_key`,
    given every row that may share a key with another good row (`candidates`, ascending)."""
    first: dict[str, int] = {}
    found: dict[int, int] = {}
    for row, key in _good_keys(reader, spans, candidates):
        if key in first:
            found[row] = first[key]
        else:
            first[key] = row
    return found
