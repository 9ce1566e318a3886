"""The dataset reader base: manifest rows -> small generator stages -> unified records or error rows."""

from __future__ import annotations

import json
import os
import posixpath
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from itertools import islice
from typing import TYPE_CHECKING, Any, ClassVar

import fsspec

from schemas import FieldProblem, empty_record, error_row

if TYPE_CHECKING:
    from pipelines.sources.plan import Scan, ShardSpan


class RowError(Exception):
    """Raised by a row stage: this row becomes an error row with `reason` (a read-error reason)."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason, self.detail = reason, detail


@dataclass
class Row:
    """One manifest row on its way through the stages."""

    index: int  # 0-based data row number in the manifest (header excluded)
    raw: Any  # what the manifest holds: a list of CSV cells, a dict of parquet cells, a JSONL line
    fields: dict = field(default_factory=dict)  # parsed values, filled by the stages
    key: str | None = None  # the sample key, once known (error rows use it too)
    uri: str | None = None
    record: dict | None = None  # the SOURCE_RECORD dict, set by the last stage
    error: dict | None = None  # the ERROR_SCHEMA dict, set by the first stage that fails


Stage = Callable[[Iterable[Row]], Iterator[Row]]


def row_stage(method: Callable[[Any, Row], None]) -> Callable[[Any, Iterable[Row]], Iterator[Row]]:
    """Turn a per-row method (which fills `row` or raises RowError) into a generator stage.

    Rows that already failed pass through untouched; a RowError becomes the row's error row.
    """

    def stage(self, rows: Iterable[Row]) -> Iterator[Row]:
        for row in rows:
            if row.error is None:
                try:
                    method(self, row)
                except RowError as exc:
                    row.error = self.error(row, exc.reason, exc.detail)
            yield row

    stage.__name__ = method.__name__
    stage.__doc__ = method.__doc__
    return stage


def slice_rows(num_rows: int, i: int, n: int) -> range:
    """Rows of slice `i` of `n`: contiguous, deterministic, sizes differing by at most one."""
    if n < 1 or not 0 <= i < n:
        raise ValueError(f"slice {i} of {n}: need n >= 1 and 0 <= i < n")
    return range(i * num_rows // n, (i + 1) * num_rows // n)


def input_shards(num_rows: int, rows_per_shard: int) -> list[range]:
    """Input shard k is rows [k*S, (k+1)*S) of the manifest (the last one may be shorter)."""
    if rows_per_shard < 1:
        raise ValueError(f"rows_per_shard must be >= 1, got {rows_per_shard}")
    return [range(s, min(s + rows_per_shard, num_rows)) for s in range(0, num_rows, rows_per_shard)]


def is_url(path: str) -> bool:
    return "://" in path or "::" in path


def manifest_dir(manifest: str) -> str:
    """The folder of a manifest: absolute for local paths, the URL's parent for URLs."""
    if is_url(manifest):
        return posixpath.dirname(manifest)
    return os.path.dirname(os.path.abspath(manifest))


class SourceReader:
    """Base of the dataset readers: a generator of unified records from one manifest (local or fsspec URL).

    Subclasses set `name`, `kind`, implement `_check()` (open the manifest, raise schemas.WrongFileError),
    `num_rows`, `_rows(rows, offset, offset_row)` (yield a Row per manifest row in `rows`; with `offset`,
    start reading at that byte offset, which is where row `offset_row` begins), `_scan(rows_per_shard,
    max_rows)` (the lean planning pass, see pipelines.sources.plan.Scan) and list their row stages in
    `stages`.
    `read()` composes: rows -> stages... -> unique keys -> records / error rows.
    """

    name: ClassVar[str]
    kind: ClassVar[str]
    stages: ClassVar[tuple[str, ...]] = ()  # names of the stage methods, applied in order

    def __init__(
        self,
        manifest: str,
        *,
        media_root: str | None = None,
        url_rewrite: dict[str, str] | None = None,
        storage_options: dict | None = None,
    ):
        self.manifest = str(manifest)
        self.media_root = None if media_root is None else str(media_root).rstrip("/")
        # longest prefix first, so a specific rewrite wins over a general one
        self.url_rewrite = dict(sorted((url_rewrite or {}).items(), key=lambda kv: -len(kv[0])))
        self.storage_options = dict(storage_options or {})
        self._duplicates: dict[int, int] | None = None  # see duplicate_rows()
        self._check()

    # --- what subclasses provide -------------------------------------------------------------
    @staticmethod
    def default_media_root(manifest: str) -> str | None:
        """Where the media is when no media_root is configured (None: the manifest's URLs)."""
        return None

    def _check(self) -> None:
        raise NotImplementedError

    @property
    def num_rows(self) -> int:
        raise NotImplementedError

    def _rows(self, rows: range, offset: int | None = None, offset_row: int = 0) -> Iterator[Row]:
        raise NotImplementedError

    def _scan(self, rows_per_shard: int, max_rows: int | None) -> Scan:
        raise NotImplementedError

    # --- shared helpers ----------------------------------------------------------------------
    def open(self, mode: str = "rb", **kwargs):
        """The manifest opened through fsspec (a context manager)."""
        return fsspec.open(self.manifest, mode, **self.storage_options, **kwargs)

    def error(self, row: Row, reason: str, detail: str) -> dict:
        """The read-stage error row of `row`."""
        return error_row(
            key=row.key or f"{self.name}_row{row.index}",
            source=self.name,
            stage="read",
            reason=reason,
            detail=detail,
            uri=row.uri,
            manifest=self.manifest,
            row=row.index,
        )

    def problem(self, row: Row, column: str, expected: str, got: Any) -> str:
        """A precise message: file, row, column, what was expected, what was there."""
        return str(FieldProblem(self.manifest, row.index, column, expected, repr(got)))

    def record(self, row: Row, **values) -> dict:
        """The SOURCE_RECORD dict of `row` (every field present)."""
        return empty_record(
            key=row.key,
            source=self.name,
            kind=self.kind,
            uri=row.uri,
            manifest=self.manifest,
            row=row.index,
            **values,
        )

    def take(self, raws: Iterable[Any], rows: range, offset: int | None, first: int) -> Iterator[Row]:
        """Rows `rows` out of `raws`, the manifest's raw rows numbered from `first`.

        Reading from a byte offset, a file that ends early means it changed since it was planned.
        """
        count = 0
        for index, raw in enumerate(islice(raws, rows.start - first, rows.stop - first), rows.start):
            count += 1
            yield Row(index, raw)
        if offset is not None and count < len(rows):
            raise ValueError(
                f"{self.manifest}: rows {rows.start}..{rows.stop - 1} read from byte offset {offset} "
                f"(row {first}) ended after {count} rows: the file changed since it was planned; "
                "plan it again (pipelines.sources.plan_manifest)"
            )

    def rewrite_url(self, url: str) -> str:
        for prefix, replacement in self.url_rewrite.items():
            if url.startswith(prefix):
                return replacement + url[len(prefix) :]
        return url

    @staticmethod
    def extra_json(values: dict) -> str | None:
        values = {k: v for k, v in values.items() if v is not None}
        return json.dumps(values, ensure_ascii=False, sort_keys=True) if values else None

    # --- the pipeline ------------------------------------------------------------------------
    def _range(self, rows: range | None, offset: int | None = None, offset_row: int = 0) -> range:
        if offset is not None:  # a planned read: no row count needed (that would be a pass over the file)
            if rows is None or rows.step != 1 or not 0 <= offset_row <= rows.start <= rows.stop:
                raise ValueError(
                    f"{self.manifest}: rows {rows} with offset {offset} of row {offset_row}: "
                    "give a contiguous range that starts at or after offset_row"
                )
            return rows
        n = self.num_rows
        if rows is None:
            return range(n)
        if rows.step != 1 or not 0 <= rows.start <= rows.stop <= n:
            raise ValueError(f"{self.manifest}: rows {rows} is not a contiguous range within [0, {n}]")
        return rows

    def _staged(
        self, rows: range, offset: int | None = None, offset_row: int = 0, only: set[int] | None = None
    ) -> Iterator[Row]:
        """Rows `rows` through every stage (`only`: just those rows, the others are parsed to skip them)."""
        items: Iterable[Row] = self._rows(rows, offset, offset_row) if rows else iter(())
        if only is not None:
            items = (row for row in items if row.index in only)
        for name in self.stages:
            items = getattr(self, name)(items)
        return iter(items)

    def _duplicate(self, row: Row, first: int) -> None:
        detail = f"{self.manifest}, row {row.index}: key {row.key!r} already used by row {first}"
        row.record, row.error = None, self.error(row, "duplicate_key", detail)

    def _unique(self, items: Iterable[Row], found: dict[int, int] | None = None) -> Iterator[Row]:
        """A read from row 0: a key already used by an earlier good row makes this row `duplicate_key`."""
        first: dict[str, int] = {}
        for row in items:
            if row.error is None:
                if row.key in first:
                    self._duplicate(row, first[row.key])
                    if found is not None:
                        found[row.index] = first[row.key]
                else:
                    first[row.key] = row.index
            yield row

    def duplicate_rows(self) -> dict[int, int]:
        """{row: first row with the same key} over the whole manifest; computed once per reader.

        A slice that starts past row 0 and is given no `duplicates` consults it, so every slicing flags the
        same rows as a whole read. It is the duplicate map of a plan (pipelines.sources.plan): with a plan,
        give each read its `duplicates_in(span)` instead, and no reader computes this.
        """
        if self._duplicates is None:
            from pipelines.sources.plan import plan_reader

            plan = plan_reader(self, 1 << 12)
            self._duplicates = plan.duplicates
            self._known_rows(plan.num_rows)
        return self._duplicates

    def _known_rows(self, num_rows: int) -> None:
        """Remember the row count a whole-file plan found (readers that count by a pass override this)."""

    def _mark_duplicates(self, items: Iterable[Row], duplicates: Mapping[int, int]) -> Iterator[Row]:
        for row in items:
            if row.error is None and row.index in duplicates:
                self._duplicate(row, duplicates[row.index])
            yield row

    def read(
        self,
        rows: range | None = None,
        *,
        offset: int | None = None,
        offset_row: int | None = None,
        duplicates: Mapping[int, int] | None = None,
    ) -> Iterator[dict]:
        """Yield, in row order, one SOURCE_RECORD or ERROR_SCHEMA dict per manifest row in `rows`.

        offset: the byte offset where row `offset_row` (default rows.start) begins, from a plan's ShardSpan
          (span.offset, span.start): the reader seeks there instead of reading from the top, and parses
          rows offset_row..rows.start-1 only to skip them. None (parquet spans, or no plan): rows are
          reached the reader's own way.
        duplicates: {row: first row with the same key} for at least the rows read (a plan's
          `duplicates_in(span)`; string keys, as after a JSON round trip, are accepted). Without it, a read
          from row 0 finds repeats itself and any other read uses `duplicate_rows()`.
        """
        if offset is None:
            offset_row = 0  # rows are counted from the top
        elif offset_row is None:
            offset_row = rows.start if rows is not None else 0
        rows = self._range(rows, offset, offset_row)
        items = self._staged(rows, offset, offset_row)
        if duplicates is not None:
            items = self._mark_duplicates(items, {int(k): int(v) for k, v in duplicates.items()})
        elif rows.start == 0:
            items = self._unique(items)
        else:
            items = self._mark_duplicates(items, self.duplicate_rows())
        for row in items:
            yield row.error if row.error is not None else row.record

    def read_span(
        self, span: ShardSpan, rows: range | None = None, *, duplicates: Mapping[int, int] | None = None
    ) -> Iterator[dict]:
        """`read()` of planned input shard `span` (or of `rows`, a part of it, such as a read unit)."""
        rows = span.rows if rows is None else rows
        if not span.start <= rows.start <= rows.stop <= span.stop:
            raise ValueError(f"{self.manifest}: rows {rows} are not within the span {span.rows}")
        return self.read(rows, offset=span.offset, offset_row=span.start, duplicates=duplicates)

    def read_slice(self, i: int, n: int) -> Iterator[dict]:
        """`read()` of slice `i` of `n` (see slice_rows)."""
        return self.read(slice_rows(self.num_rows, i, n))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.manifest!r})"
