"""Property-based fuzzing of the three manifest readers: random bytes, random CSV/JSONL/parquet shapes and encodings.

The property, for every generated file: opening the reader either raises WrongFileError, or reading yields
exactly one record or error row per manifest row (rows 0..n-1, in order), with no other exception; and the
planning pass (pipelines.sources.plan) counts the same rows and reads every planned shard to the same items.
"""

from __future__ import annotations

import csv
import io
import json
import os
import tempfile

import pyarrow as pa
import pyarrow.parquet as pq
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from pipelines.sources import is_error, make_reader
from pipelines.sources.plan import plan_manifest
from schemas import WrongFileError

SETTINGS = settings(
    max_examples=int(os.environ.get("LATENTCRAFTER_FUZZ_EXAMPLES", "60")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
    derandomize=True,  # the suite is reproducible; raise the count locally to search harder
)
SUFFIX = {"webvid": ".csv", "laion_coco": ".parquet", "jdb": ".jsonl"}

text = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=40)
cell = st.one_of(
    text,
    st.integers(-(2**63), 2**63 - 1).map(str),
    st.floats(allow_nan=True).map(str),
    st.sampled_from(["", "PT00H00M17S", "PT1M", "P1D", "-PT5S", "http://127.0.0.1:1/a.mp4", "/etc/hostname"]),
)


def check(source: str, data: bytes) -> None:
    """The property on one file's bytes."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "manifest" + SUFFIX[source])
        with open(path, "wb") as f:
            f.write(data)
        options = {"media_root": tmp} if source != "laion_coco" else {}
        try:
            reader = make_reader(source, path, **options)
        except WrongFileError:
            event("refused at open (WrongFileError)")
            return
        items = list(reader.read())
        event(
            f"read: {'no rows' if not items else 'errors only' if all(map(is_error, items)) else 'records'}"
        )
        assert [item["row"] for item in items] == list(range(reader.num_rows))
        assert all(set(item) >= {"key", "source", "row"} for item in items)
        assert all(item["reason"] for item in items if is_error(item))
        plan = plan_manifest(source, path, 3, **options)
        assert plan.num_rows == reader.num_rows
        planned = []
        for span in plan.spans:
            planned += list(
                make_reader(source, path, **options).read_span(span, duplicates=plan.duplicates_in(span))
            )
        assert [(i["row"], i["key"], is_error(i)) for i in planned] == [
            (i["row"], i["key"], is_error(i)) for i in items
        ]


def csv_bytes(header: list[str], rows: list[list[str]], encoding: str, newline: str) -> bytes:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator=newline)
    writer.writerow(header)
    writer.writerows(rows)
    return buf.getvalue().encode(encoding, errors="replace")


WEBVID_COLUMNS = ["videoid", "name", "page_idx", "page_dir", "duration", "contentUrl", "extra"]


@SETTINGS
@given(data=st.binary(max_size=600))
def test_webvid_random_bytes(data: bytes) -> None:
    check("webvid", data)


@SETTINGS
@given(garbage=st.binary(max_size=400))
def test_webvid_header_then_random_bytes(garbage: bytes) -> None:
    check("webvid", ",".join(WEBVID_COLUMNS[:-1]).encode() + b"\n" + garbage)


@SETTINGS
@given(
    header=st.one_of(
        st.permutations(WEBVID_COLUMNS[:-1]),  # every required column, in any order
        st.lists(st.sampled_from(WEBVID_COLUMNS), min_size=1, max_size=8),
    ),
    rows=st.lists(st.lists(cell, max_size=9), max_size=12),
    encoding=st.sampled_from(["utf-8", "utf-8-sig", "latin-1", "utf-16"]),
    newline=st.sampled_from(["\n", "\r\n", "\r"]),
)
def test_webvid_random_csv(header, rows, encoding, newline) -> None:
    check("webvid", csv_bytes(header, rows, encoding, newline))


@SETTINGS
@given(data=st.binary(max_size=600))
def test_jdb_random_bytes(data: bytes) -> None:
    check("jdb", data)


@SETTINGS
@given(garbage=st.binary(max_size=400))
def test_jdb_first_line_then_random_bytes(garbage: bytes) -> None:
    check("jdb", b'{"img_path": "./000/a.jpg", "prompt": "a cat"}\n' + garbage)


json_value = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | text,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(text, inner, max_size=3),
    max_leaves=8,
)
jdb_line = st.one_of(
    st.fixed_dictionaries(
        {
            "img_path": st.one_of(text, st.just("./000/a.jpg"), json_value),
            "prompt": st.one_of(text, json_value),
        },
        optional={"Task1": json_value, "Task2": json_value},
    ),
    json_value,
    text,  # not JSON at all
)


@SETTINGS
@given(
    lines=st.lists(jdb_line, max_size=12),
    blank=st.booleans(),
    encoding=st.sampled_from(["utf-8", "latin-1"]),
)
def test_jdb_random_jsonl(lines, blank, encoding) -> None:
    out = []
    for line in lines:
        out.append(line if isinstance(line, str) else json.dumps(line))
        if blank:
            out.append("")
    check("jdb", "\n".join(out).encode(encoding, errors="replace"))


@SETTINGS
@given(data=st.binary(max_size=600))
def test_laion_coco_random_bytes(data: bytes) -> None:
    check("laion_coco", data)


COLUMN_TYPES = {
    "URL": st.one_of(st.none(), text, st.just("http://127.0.0.1:1/x.jpg")),
    "TEXT": st.one_of(st.none(), text),
    "top_caption": st.one_of(st.none(), text),
    "similarity": st.one_of(st.none(), st.floats(allow_nan=True)),
    "punsafe": st.one_of(st.none(), st.floats(allow_nan=True)),
    "pwatermark": st.one_of(st.none(), st.floats(allow_nan=True)),
    "WIDTH": st.one_of(st.none(), st.integers(-5, 10**6)),
    "HEIGHT": st.one_of(st.none(), st.integers(-5, 10**6)),
    "hash": st.one_of(st.none(), st.integers(-(2**63), 2**63 - 1)),
}


@st.composite
def parquet_bytes(draw) -> bytes:
    names = draw(st.lists(st.sampled_from(sorted(COLUMN_TYPES)), unique=True, min_size=1))
    n = draw(st.integers(0, 12))
    columns = {}
    for name in names:
        values = draw(st.lists(COLUMN_TYPES[name], min_size=n, max_size=n))
        if draw(st.booleans()):  # the wrong type for the column now and then
            values = [None if v is None else str(v) for v in values]
        columns[name] = values
    buf = io.BytesIO()
    pq.write_table(pa.table(columns), buf, row_group_size=draw(st.integers(1, 5)))
    return buf.getvalue()


@SETTINGS
@given(data=parquet_bytes())
def test_laion_coco_random_parquet(data: bytes) -> None:
    check("laion_coco", data)


@SETTINGS
@given(
    data=parquet_bytes(), flips=st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), max_size=4)
)
def test_laion_coco_corrupted_parquet(data: bytes, flips) -> None:
    raw = bytearray(data)
    for position, value in flips:
        raw[position % len(raw)] = value
    check("laion_coco", bytes(raw))


def test_laion_coco_footer_with_a_non_utf8_column_name_is_a_wrong_file(tmp_path) -> None:
    """Found by the fuzzer: a flipped byte in a column name of the footer (pyarrow raises UnicodeDecodeError)."""
    buf = io.BytesIO()
    pq.write_table(pa.table({"URL": ["http://127.0.0.1:1/x.jpg"], "top_caption": ["a cat"]}), buf)
    path = tmp_path / "part.parquet"
    path.write_bytes(buf.getvalue().replace(b"top_caption", b"\x80op_caption"))  # the parquet schema's names
    try:
        make_reader("laion_coco", str(path))
    except WrongFileError as exc:
        assert str(path) in str(exc)
    else:
        raise AssertionError("a footer that does not decode must be refused at open")
