"""WebVid-10M reader: `results_*.csv` rows -> video records (ISO-8601 durations parsed to seconds)."""

from __future__ import annotations

import csv
import re
from collections.abc import Iterator

from pipelines.sources.base import Row, RowError, SourceReader, row_stage
from schemas import WEBVID_CSV_SCHEMA, WEBVID_REQUIRED, WrongFileError, check_required_columns

_NUMBER = r"(\d+(?:\.\d+)?)"
_ISO_DURATION = re.compile(rf"P(?:{_NUMBER}D)?(?:T(?:{_NUMBER}H)?(?:{_NUMBER}M)?(?:{_NUMBER}S)?)?")
_INT_COLUMNS = tuple(f.name for f in WEBVID_CSV_SCHEMA if str(f.type) == "int64")


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

    def _csv_rows(self) -> Iterator[list[str]]:
        """Every CSV row after the header (quoted newlines and commas handled by the csv module)."""
        with self.open("rt", encoding="utf-8", errors="replace", newline="") as f:
            reader = csv.reader(f)
            next(reader, None)
            try:
                yield from reader
            except csv.Error as exc:
                raise ValueError(f"{self.manifest}: CSV error near line {reader.line_num}: {exc}") from exc

    def _check(self) -> None:
        try:
            with self.open("rt", encoding="utf-8", errors="replace", newline="") as f:
                header = next(csv.reader(f), None)
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
            self._num_rows = sum(1 for _ in self._csv_rows())
        return self._num_rows

    def _rows(self, rows: range) -> Iterator[Row]:
        if not rows:
            return
        for index, cells in enumerate(self._csv_rows()):
            if index >= rows.stop:
                break
            if index >= rows.start:
                yield Row(index, cells)

    @row_stage
    def parse(self, row: Row) -> None:
        """Cells -> a dict by header; a row with the wrong number of cells is `bad_value`."""
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
