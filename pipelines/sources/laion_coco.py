"""LAION-COCO reader: `part-*.snappy.parquet` rows -> image records (URL rewritten, quality fields kept)."""

from __future__ import annotations

import dataclasses
import zlib
from collections.abc import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipelines.sources.base import Row, RowError, SourceReader, row_stage
from pipelines.sources.plan import Scan, hash64
from schemas import (
    LAION_COCO_REQUIRED,
    LAION_COCO_SCHEMA,
    WrongFileError,
    check_required_columns,
    validate_table,
)


def laion_key(hash_value: int | None, url: str) -> str:
    """`laion_coco_<hash as 16 hex digits of the unsigned 64-bit value>`, or `laion_coco_u<crc32(URL)>`."""
    if hash_value is None:
        return f"laion_coco_u{zlib.crc32(url.encode('utf-8')):08x}"
    return f"laion_coco_{hash_value & 0xFFFFFFFFFFFFFFFF:016x}"


def _typed(column: pa.ChunkedArray, type_: pa.DataType) -> list:
    """Python values of `column` cast to `type_`; cells that cannot be cast become None."""
    try:
        return (column.cast(type_) if column.type != type_ else column).to_pylist()
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError):
        values = []
        for value in column.to_pylist():
            try:
                values.append(pa.array([value]).cast(type_)[0].as_py())
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError):
                values.append(None)
        return values


# What reading a damaged row group raises (bad pages, thrift headers, invalid UTF-8 in a string column).
_GROUP_ERRORS = (pa.ArrowException, OSError, ValueError, UnicodeDecodeError)


class _BadGroup:
    """Stands for each row of a row group that cannot be read; `validate` makes it a `bad_parquet` row."""

    def __init__(self, group: int, exc: BaseException):
        self.detail = f"row group {group} cannot be read ({type(exc).__name__}: {str(exc).splitlines()[0]})"


def _lean(table: pa.Table) -> pa.Array:
    """Per row: "h<hash>" when the hash casts to int64 (the key is that hash's), else the URL key `validate`
    makes (laion_coco_u<crc32>), else null (no hash, no URL: surely bad)."""
    hashes = pa.nulls(table.num_rows, pa.int64())
    if "hash" in table.column_names:
        try:
            hashes = table.column("hash").cast(pa.int64()).combine_chunks()
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError):
            hashes = pa.array(_typed(table.column("hash"), pa.int64()), pa.int64())
    lean = pc.binary_join_element_wise("h", hashes.cast(pa.string()), "")
    missing = pc.is_null(hashes)
    if pc.any(missing).as_py():
        urls = _typed(table.column("URL").filter(missing), pa.string())
        keys = [laion_key(None, u.strip()) if isinstance(u, str) and u.strip() else None for u in urls]
        lean = pc.replace_with_mask(lean, missing, pa.array(keys, pa.string()))
    return lean


class LaionCocoReader(SourceReader):
    """Rows of a LAION-COCO parquet part. Extra columns are ignored, absent optional ones read as null.

    The uri is `URL` after `url_rewrite` (prefix -> prefix), the caption `top_caption` (else `TEXT`).
    """

    name = "laion_coco"
    kind = "image"
    stages = ("validate", "to_record")

    def _parquet(self, f) -> pq.ParquetFile:
        try:
            return pq.ParquetFile(f)
        except _GROUP_ERRORS as exc:  # not parquet, or a footer that does not parse (bad thrift, bad UTF-8)
            raise WrongFileError(
                self.manifest, self.name, LAION_COCO_REQUIRED, reason=f"not a parquet file ({exc})"
            ) from exc

    def _check(self) -> None:
        with self.open("rb") as f:
            parquet = self._parquet(f)
            try:
                names = parquet.schema_arrow.names
                self._num_rows = parquet.metadata.num_rows
            except _GROUP_ERRORS as exc:  # a damaged footer: column names that are not UTF-8, ...
                raise WrongFileError(
                    self.manifest, self.name, LAION_COCO_REQUIRED, reason=f"unreadable parquet footer ({exc})"
                ) from exc
        check_required_columns(self.manifest, self.name, names, LAION_COCO_REQUIRED)
        self.columns = [c for c in LAION_COCO_SCHEMA.names if c in names]
        self._group: tuple[int, pa.Table] | None = None

    @property
    def num_rows(self) -> int:
        return self._num_rows

    def _row_group(self, parquet: pq.ParquetFile, g: int) -> pa.Table:
        """Row group g, kept until another is read (consecutive reads within one group read it once)."""
        if self._group is None or self._group[0] != g:
            self._group = (g, parquet.read_row_group(g, columns=self.columns))
        return self._group[1]

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_group": None}  # a reader sent to a task travels without its cache

    def _rows(self, rows: range, offset: int | None = None, offset_row: int = 0) -> Iterator[Row]:
        """Rows of the row groups that overlap `rows` only (reading the last shard costs what the first
        does); parquet rows have no byte offsets, so `offset` must be None."""
        if offset is not None:
            raise ValueError(f"{self.manifest}: parquet rows are read by row group; give offset=None")
        with self.open("rb") as f:
            parquet = self._parquet(f)
            group_start = 0
            for g in range(parquet.metadata.num_row_groups):
                group_rows = parquet.metadata.row_group(g).num_rows
                start, stop = max(rows.start, group_start), min(rows.stop, group_start + group_rows)
                if start < stop:
                    try:
                        table = self._row_group(parquet, g)
                    except _GROUP_ERRORS as exc:  # every row of the group becomes one error row
                        bad = _BadGroup(g, exc)
                        yield from (Row(i, bad) for i in range(start, stop))
                    else:
                        yield from self._table_rows(table.slice(start - group_start, stop - start), start)
                group_start += group_rows
                if group_start >= rows.stop:
                    break

    def _scan(self, rows_per_shard: int, max_rows: int | None) -> Scan:
        """The URL and hash columns only, vectorised: each row's lean value (see `_lean`)."""
        num_rows = self._num_rows if max_rows is None else min(self._num_rows, max_rows)
        columns = [c for c in ("URL", "hash") if c in self.columns]
        lean, done = [np.zeros(0, np.uint64)], 0
        with self.open("rb") as f:
            parquet = self._parquet(f)
            for g in range(parquet.metadata.num_row_groups):
                if done >= num_rows:
                    break
                n = min(parquet.metadata.row_group(g).num_rows, num_rows - done)
                try:
                    table = parquet.read_row_group(g, columns=columns).slice(0, n)
                    lean.append(hash64(_lean(table)))
                except _GROUP_ERRORS:  # unreadable: surely bad rows (read() makes them bad_parquet)
                    lean.append(np.zeros(n, np.uint64))
                done += n
        return Scan(num_rows, [None] * len(range(0, num_rows, rows_per_shard)), np.concatenate(lean))

    def _table_rows(self, table: pa.Table, first: int) -> Iterator[Row]:
        """Rows of a slice starting at manifest row `first`, each with its schema problems attached."""
        problems: dict[int, list] = {}
        for p in validate_table(table, LAION_COCO_SCHEMA, self.manifest):
            if p.row is None:  # a whole column of the wrong type, e.g. URL given as a list
                continue
            problems.setdefault(p.row, []).append(dataclasses.replace(p, row=p.row + first))
        columns = {c: _typed(table.column(c), LAION_COCO_SCHEMA.field(c).type) for c in self.columns}
        for i in range(table.num_rows):
            cells = {c: columns[c][i] if c in columns else None for c in LAION_COCO_SCHEMA.names}
            yield Row(first + i, cells, fields={"problems": problems.get(i, [])})

    @row_stage
    def validate(self, row: Row) -> None:
        """Cells castable to LAION_COCO_SCHEMA, a URL, and a caption (top_caption or TEXT)."""
        cells = row.raw
        if isinstance(cells, _BadGroup):
            raise RowError("bad_parquet", f"{self.manifest}, row {row.index}: {cells.detail}")
        url = cells["URL"]
        if isinstance(url, str) and url.strip():
            row.key = laion_key(cells["hash"], url.strip())
            row.uri = self.rewrite_url(url.strip())
        elif cells["hash"] is not None:
            row.key = laion_key(cells["hash"], "")
        for problem in row.fields["problems"]:
            reason = "missing_field" if problem.got == "null" else "bad_value"
            raise RowError(reason, str(problem))
        if row.uri is None:
            raise RowError("missing_field", self.problem(row, "URL", "a non-empty URL", url))
        if not (cells["top_caption"] or "").strip() and not (cells["TEXT"] or "").strip():
            raise RowError(
                "missing_field",
                self.problem(row, "top_caption", "a caption (or a TEXT)", cells["top_caption"]),
            )

    @row_stage
    def to_record(self, row: Row) -> None:
        c = row.raw
        caption = (c["top_caption"] or "").strip() or c["TEXT"].strip()
        row.record = self.record(
            row,
            origin_key=row.key[len("laion_coco_") :],
            caption=caption,
            width=c["WIDTH"],
            height=c["HEIGHT"],
            similarity=c["similarity"],
            punsafe=c["punsafe"],
            pwatermark=c["pwatermark"],
            extra=self.extra_json({"TEXT": c["TEXT"], "URL": c["URL"]}),
        )
