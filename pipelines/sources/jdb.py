"""JourneyDB reader: `train_anno_realease_repath.jsonl` lines -> image records (folder or imgs/NNN.tgz)."""

from __future__ import annotations

import json
import os
import posixpath
import re
from collections.abc import Iterator
from itertools import islice

import fsspec
import pyarrow as pa
import pyarrow.compute as pc

from pipelines.sources.base import Row, RowError, SourceReader, is_url, manifest_dir, row_stage
from pipelines.sources.plan import LeanKeys, Scan
from schemas import JDB_REQUIRED, WrongFileError, check_required_columns

# The real dataset ships each image folder as imgs/NNN.tgz; fsspec infers compression from the
# extension and knows ".gz" but not ".tgz". Registering it lets `tar://000/x.jpg::/abs/imgs/000.tgz`
# URLs open anywhere this package has been imported.
fsspec.utils.compressions.setdefault("tgz", "gzip")

_UUID = re.compile(r"[A-Za-z0-9_-]{1,190}")
_SNIFF_LINES = 100  # lines read to decide whether a file is JourneyDB JSONL at all
_BATCH = 8192  # lines per batch of the planning pass
_LEAN_UUID = r"(?P<uuid>[A-Za-z0-9_-]+)[^/]*$"


def _lean_uuid(paths: pa.Array) -> pa.Array:
    """img_path values -> the leading [A-Za-z0-9_-] run of their last "/" part (null: none)."""
    return pc.extract_regex(paths, _LEAN_UUID).flatten()[0]


def _img_path(line: bytes) -> str | None:
    """img_path of a JSON-object line, if it is a string (else the row surely fails: None)."""
    try:
        value = json.loads(line.decode("utf-8"))  # as `parse` decodes (json.loads(bytes) would sniff)
    except (ValueError, RecursionError):
        return None
    path = value.get("img_path") if type(value) is dict else None
    return path if type(path) is str else None


class JourneyDBReader(SourceReader):
    """Lines of a JourneyDB annotation JSONL (`img_path`, `prompt`, `Task1.Style/Content`, `Task2.Caption`).

    media_root defaults to `<manifest dir>/imgs`; the uri is media_root + "/" + img_path (without "./").
    When a local `imgs/NNN/` is absent but `imgs/NNN.tgz` exists, the uri is a fsspec tar URL into the archive
    (`tar://NNN/<uuid>.jpg::/abs/imgs/NNN.tgz`). Remote media roots are used as they are.
    """

    name = "jdb"
    kind = "image"
    stages = ("parse", "validate", "to_record")

    def _lines(self, offset: int | None = None) -> Iterator[bytes]:
        """The manifest's lines (a row each, blank ones too) from byte `offset` (a planned row's start)."""
        with self.open("rb") as f:
            if offset is not None:
                f.seek(offset)
            for line in f:
                yield line.rstrip(b"\r\n")

    def _check(self) -> None:
        first = None
        for i, line in enumerate(self._lines()):
            if i >= _SNIFF_LINES:
                break
            try:
                value = json.loads(line.decode("utf-8"))
            except (UnicodeDecodeError, ValueError):
                continue
            if isinstance(value, dict):
                first = value
                break
        if first is None:
            raise WrongFileError(
                self.manifest,
                self.name,
                JDB_REQUIRED,
                reason=f"no JSON object among its first {_SNIFF_LINES} lines "
                f"(a JourneyDB annotation line has the keys {list(JDB_REQUIRED)})",
            )
        check_required_columns(self.manifest, self.name, first, JDB_REQUIRED)
        if self.media_root is None:
            self.media_root = self.default_media_root(self.manifest)
        self._num_rows: int | None = None
        self._archives: dict[str, str | None] = {}  # folder -> tar URL of its .tgz, or None: the folder

    @staticmethod
    def default_media_root(manifest: str) -> str:
        return manifest_dir(manifest) + "/imgs"

    @property
    def num_rows(self) -> int:
        if self._num_rows is None:
            self._num_rows = sum(1 for _ in self._lines())
        return self._num_rows

    def _known_rows(self, num_rows: int) -> None:
        self._num_rows = num_rows

    def _rows(self, rows: range, offset: int | None = None, offset_row: int = 0) -> Iterator[Row]:
        yield from self.take(self._lines(offset), rows, offset, offset_row)

    def _scan(self, rows_per_shard: int, max_rows: int | None) -> Scan:
        """One pass of json.loads over the lines: shard offsets and each row's lean value (see Scan).

        A good row's key is `jdb_<uuid>`, uuid = the leading [A-Za-z0-9_-] run of img_path's last "/" part
        (whitespace and the extension are not in that class), so that run is the lean value.
        """
        limit = max_rows if max_rows is not None else -1
        lean, offsets, count, pos = LeanKeys(_lean_uuid), [], 0, 0
        with self.open("rb") as f:
            while count != limit:
                want = min(rows_per_shard - count % rows_per_shard, _BATCH)
                got = list(islice(f, want if limit < 0 else min(want, limit - count)))
                if not got:
                    break
                if count % rows_per_shard == 0:
                    offsets.append(pos)
                pos += sum(map(len, got))
                lean.extend(map(_img_path, got))
                count += len(got)
        return Scan(count, offsets, lean.array())

    def _archive(self, folder: str) -> str | None:
        """The tar URL standing in for `media_root/folder/` when only `folder.tgz` is there (local roots)."""
        if folder not in self._archives:
            archive = None
            if not is_url(self.media_root) or self.media_root.startswith("file://"):
                root = os.path.abspath(self.media_root.removeprefix("file://"))
                if not os.path.isdir(f"{root}/{folder}") and os.path.isfile(f"{root}/{folder}.tgz"):
                    archive = f"{root}/{folder}.tgz"
            self._archives[folder] = archive
        return self._archives[folder]

    @row_stage
    def parse(self, row: Row) -> None:
        """A line -> a JSON object, else `bad_json`."""
        try:
            value = json.loads(row.raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError) as exc:
            shown = row.raw[:80].decode("utf-8", errors="replace")
            raise RowError(
                "bad_json", f"{self.manifest}, row {row.index}: not a JSON line ({exc}): {shown!r}"
            ) from None
        if not isinstance(value, dict):
            raise RowError("bad_json", self.problem(row, "<line>", "a JSON object", value))
        row.fields = value

    @row_stage
    def validate(self, row: Row) -> None:
        """img_path `./NNN/<uuid>.<ext>` and a prompt; Task1/Task2 of the right shape when present."""
        f = row.fields
        img_path = f.get("img_path")
        if not isinstance(img_path, str) or not img_path.strip():
            raise RowError(
                "missing_field", self.problem(row, "img_path", "a path like ./000/<uuid>.jpg", img_path)
            )
        relative = img_path.strip().removeprefix("./")
        folder, _, file_name = relative.rpartition("/")
        uuid = posixpath.splitext(file_name)[0]
        if not _UUID.fullmatch(uuid) or ".." in relative.split("/") or relative.startswith("/"):
            raise RowError(
                "bad_value", self.problem(row, "img_path", "a path like ./000/<uuid>.jpg", img_path)
            )
        row.key = f"jdb_{uuid}"
        archive = self._archive(folder) if folder else None
        row.uri = f"tar://{relative}::{archive}" if archive else f"{self.media_root}/{relative}"
        for column in JDB_REQUIRED:
            if not isinstance(f.get(column), str) or not f[column].strip():
                raise RowError(
                    "missing_field", self.problem(row, column, "a non-empty string", f.get(column))
                )
        task1, task2 = f.get("Task1"), f.get("Task2")
        if task1 is not None and not isinstance(task1, dict):
            raise RowError("bad_value", self.problem(row, "Task1", "an object with Style and Content", task1))
        if task2 is not None and not isinstance(task2, dict):
            raise RowError("bad_value", self.problem(row, "Task2", "an object with Caption", task2))

    @row_stage
    def to_record(self, row: Row) -> None:
        f = row.fields
        task1, task2 = f.get("Task1") or {}, f.get("Task2") or {}
        caption = task2.get("Caption")
        caption = caption.strip() if isinstance(caption, str) and caption.strip() else f["prompt"].strip()
        row.record = self.record(
            row,
            origin_key=row.key[len("jdb_") :],
            caption=caption,
            extra=self.extra_json(
                {"Style": task1.get("Style"), "Content": task1.get("Content"), "prompt": f["prompt"]}
            ),
        )
