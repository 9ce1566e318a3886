"""WebVid-10M reader: `results_*.csv` rows -> video records (ISO-8601 durations parsed to seconds)."""

from __future__ import annotations

import csv
import re
from collections.abc import Iterable, Iterator
from functools import partial
from itertools import chain, islice

import pyarrow as pa
import pyarrow.compute as pc

from pipelines.sources.base import Row, RowError, SourceReader, row_stage
from pipelines.sources.plan import LeanKeys, Scan
from schemas import WEBVID_CSV_SCHEMA, WEBVID_REQUIRED, WrongFileError, check_required_columns

_NUMBER = r"(\d+(?:\.\d+)?)"
_ISO_DURATION = re.compile(rf"P(?:{_NUMBER}D)?(?:T(?:{_NUMBER}H)?(?:{_NUMBER}M)?(?:{_NUMBER}S)?)?")
_INT_COLUMNS = tuple(f.name for f in WEBVID_CSV_SCHEMA if str(f.type) == "int64")
_BATCH = 8192  # rows per batch of the planning pass
_decode = partial(bytes.decode, encoding="utf-8", errors="replace")
# what str.strip() strips: every c with c.isspace() (tests check the list)
_WHITESPACE = "\t\n\x0b\x0c\r\x1c\x1d\x1e\x1f \x85\xa0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007\u2008\u2009\u200a\u2028\u2029\u202f\u205f\u3000"


def _csv_problem(exc: csv.Error) -> str:
    return (
        f"the csv module cannot parse this ({exc}). An unmatched double quote makes the rest of the file one "
        "field, and a carriage return outside quotes must end its line (\\r\\n): fix the quoting or the "
        "line endings there (lines end in \\n or \\r\\n), then plan the file again"
    )


def _lean_videoid(cells: pa.Array) -> pa.Array:
    """videoid cells -> lean values: stripped, "-..." merged into "-", "" (surely bad) null."""
    keys = pc.utf8_trim(cells, characters=_WHITESPACE)  # = str.strip()
    keys = pc.if_else(pc.starts_with(keys, "-"), "-", keys)
    return pc.if_else(pc.equal(keys, ""), None, keys)


class _BadRecord:
    """A record the csv module could not parse: one manifest row, made a `bad_csv` error row by `parse`."""

    def __init__(self, line: int, offset: int | None, exc: csv.Error):
        where = f"line {line}" if offset is None else f"line {line} after byte {offset}"
        self.detail = f"{where}: {_csv_problem(exc)}"


class _Records:
    """csv records of `lines`, where a record the csv module rejects becomes one _BadRecord and parsing goes
    on at the next line (a stray carriage return or quote costs that record, not the file).

    `line_num`: lines consumed so far, over every restart (between records: the next record's first line).
    """

    def __init__(self, lines: Iterable[str], offset: int | None = None):
        self.lines, self.base, self.offset = iter(lines), 0, offset  # offset: where `lines` start, if not 0
        self.reader = csv.reader(self.lines)

    @property
    def line_num(self) -> int:
        return self.base + self.reader.line_num

    def __iter__(self) -> Iterator[list[str] | _BadRecord]:
        while True:
            try:
                yield from self.reader
                return
            except csv.Error as exc:
                yield _BadRecord(self.line_num, self.offset, exc)
                self.base += self.reader.line_num
                self.reader = csv.reader(self.lines)


class _CountedLines:
    """The lines of a binary file, split on b"\\n" and decoded as a read decodes them, with their byte offsets.

    Lines go to csv.reader in batches, C-level (no Python per line). csv.reader pulls lines only while a
    record is incomplete, so between records its line_num is the next record's first line: `offset()`.
    """

    def __init__(self, f: Iterable[bytes]):
        self.f, self.lines, self.pos = f, 0, 0  # lines and bytes handed out so far
        self.last: tuple[int, int, list[bytes]] = (0, 0, [])  # the latest batch: first line, its offset

    def _batch(self, batch: list[bytes]) -> Iterator[str]:
        self.last = (self.lines, self.pos, batch)
        self.lines += len(batch)
        self.pos += sum(map(len, batch))
        return map(_decode, batch)

    def __iter__(self) -> Iterator[str]:
        batches = iter(lambda: list(islice(self.f, 512)), [])
        return chain.from_iterable(map(self._batch, batches))

    def offset(self, line: int) -> int:
        """Byte offset of line `line` (0-based): a line of the latest batch or the first line after it."""
        first, pos, batch = self.last
        return self.pos if line >= self.lines else pos + sum(map(len, batch[: line - first]))


def parse_iso_duration(text: str) -> float:
    """Seconds of an ISO-8601 duration such as "PT00H00M17S" or "PT1M2.5S"; ValueError otherwise."""
    match = _ISO_DURATION.fullmatch(text.strip()) if isinstance(text, str) else None
    if not match or not any(match.groups()) or text.strip().endswith("T"):
        raise ValueError(f"not an ISO-8601 duration: {text!r}")
    days, hours, minutes, seconds = (float(g) if g else 0.0 for g in match.groups())
    return ((days * 24 + hours) * 60 + minutes) * 60 + seconds


class WebVidReader(SourceReader):
    """Rows of a WebVid-10M results CSV (`videoid,name,page_idx,page_dir,duration,contentUrl`).

    The uri is `{media_root}/{page_dir}/{videoid}.mp4` when `media_root` is given (videos already
    downloaded, as the dataset's own download script lays them out), else `contentUrl`.
    """

    name = "webvid"
    kind = "video"
    stages = ("parse", "validate", "to_record")

    def _records(self, offset: int | None = None) -> Iterator[list[str]]:
        """CSV records from byte `offset` (where a planned row begins), else every record after the header.

        Lines are split on b"\\n" in binary (as the plan splits them) and decoded one by one, so a planned
        read parses exactly the bytes a whole read parses (quoted newlines and commas: the csv module).
        """
        with self.open("rb") as f:
            if offset is not None:
                f.seek(offset)
            records = iter(_Records(map(_decode, f), offset))
            if offset is None:
                next(records, None)  # the header (_check parsed it)
            yield from records

    def _check(self) -> None:
        try:
            with self.open("rb") as f:
                header = next(csv.reader(map(_decode, f)), None)
        except csv.Error as exc:
            raise WrongFileError(
                self.manifest, self.name, WEBVID_REQUIRED, reason=f"not a CSV ({exc})"
            ) from exc
        if not header:
            raise WrongFileError(
                self.manifest, self.name, WEBVID_REQUIRED, reason="empty file, no CSV header"
            )
        self.header = [h.strip() for h in header]
        check_required_columns(self.manifest, self.name, self.header, WEBVID_REQUIRED)
        self._num_rows: int | None = None

    @property
    def num_rows(self) -> int:
        if self._num_rows is None:
            self._num_rows = sum(1 for _ in self._records())
        return self._num_rows

    def _known_rows(self, num_rows: int) -> None:
        self._num_rows = num_rows

    def _rows(self, rows: range, offset: int | None = None, offset_row: int = 0) -> Iterator[Row]:
        yield from self.take(self._records(offset), rows, offset, offset_row)

    def _scan(self, rows_per_shard: int, max_rows: int | None) -> Scan:
        """One pass of the bare csv module: shard offsets and each row's stripped videoid (see Scan).

        A good row's key is `webvid_<videoid>` (videoid all digits) or None (videoid "-<digits>"), so the
        stripped videoid is a lean value, with every value that starts with "-" merged into one.
        """
        width, column = len(self.header), {h: i for i, h in enumerate(self.header)}["videoid"]
        limit = max_rows if max_rows is not None else -1
        lean, offsets, count = LeanKeys(_lean_videoid), [], 0
        with self.open("rb") as f:
            lines = _CountedLines(f)
            records = _Records(lines)
            items = iter(records)
            next(items, None)  # the header
            while count != limit:
                start = lines.offset(records.line_num)  # where the next record begins
                want = min(rows_per_shard - count % rows_per_shard, _BATCH)
                batch = islice(items, want if limit < 0 else min(want, limit - count))
                # no rows kept; a record the csv module rejected is surely bad (None)
                got = [c[column] if isinstance(c, list) and len(c) == width else None for c in batch]
                if not got:
                    break
                if count % rows_per_shard == 0:
                    offsets.append(start)
                lean.extend(got)
                count += len(got)
        return Scan(count, offsets, lean.array())

    @row_stage
    def parse(self, row: Row) -> None:
        """Cells -> a dict by header; a row with the wrong number of cells is `bad_value`."""
        if isinstance(row.raw, _BadRecord):
            raise RowError("bad_csv", f"{self.manifest}, row {row.index}, {row.raw.detail}")
        if len(row.raw) != len(self.header):
            raise RowError(
                "bad_value",
                f"{self.manifest}, row {row.index}: expected {len(self.header)} cells "
                f"({','.join(self.header)}), got {len(row.raw)}",
            )
        row.fields = dict(zip(self.header, row.raw))
        videoid = row.fields["videoid"].strip()
        if re.fullmatch(r"\d+", videoid):
            row.key = f"webvid_{videoid}"
        if self.media_root is not None:
            row.uri = f"{self.media_root}/{row.fields['page_dir'].strip()}/{videoid}.mp4"
        else:
            row.uri = row.fields["contentUrl"].strip() or None

    @row_stage
    def validate(self, row: Row) -> None:
        """Required cells non-empty, integer columns integers, duration ISO-8601."""
        f = row.fields
        for column in WEBVID_REQUIRED:
            if not f[column].strip():
                raise RowError("missing_field", self.problem(row, column, "a non-empty value", f[column]))
        for column in _INT_COLUMNS:
            value = f.get(column, "").strip()
            if value and not re.fullmatch(r"-?\d+", value):
                raise RowError("bad_value", self.problem(row, column, "an integer", value))
        try:
            f["seconds"] = parse_iso_duration(f["duration"])
        except ValueError:
            raise RowError(
                "bad_duration",
                self.problem(row, "duration", 'an ISO-8601 duration like "PT00H00M17S"', f["duration"]),
            ) from None

    @row_stage
    def to_record(self, row: Row) -> None:
        f = row.fields
        videoid, page_dir = f["videoid"].strip(), f["page_dir"].strip()
        page_idx = f.get("page_idx", "").strip()
        row.record = self.record(
            row,
            origin_key=videoid,
            caption=f["name"].strip(),
            duration=f["seconds"],
            extra=self.extra_json(
                {
                    "page_dir": page_dir,
                    "page_idx": int(page_idx) if page_idx else None,
                    "contentUrl": f["contentUrl"],
                }
            ),
        )
