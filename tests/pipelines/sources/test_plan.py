"""Manifest plans: every slicing through plan spans equals one whole read; spans seek; errors name the file."""

from __future__ import annotations

import json
import re

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines.sources import ShardSpan, make_reader, plan_manifest, plan_reader
from pipelines.sources.plan import LeanKeys, hash64, repeated
from pipelines.sources.webvid import _WHITESPACE

HEADER = "videoid,name,page_idx,page_dir,duration,contentUrl"
GOOD = "{id},{caption},1,000001_000050,PT00H00M{s:02d}S,http://x/{id}.mp4"
CSV_ROWS = [
    GOOD.format(id=1, caption='"a caption, with a comma"', s=5),
    GOOD.format(id=2, caption='"two\nlines and ""quotes"""', s=6),
    GOOD.format(id=3, caption="café 日本の街", s=7),
    GOOD.format(id=1, caption="repeat of row 0", s=8),  # duplicate of a good row
    "4,bad duration,1,000001_000050,PT,http://x/4.mp4",  # bad: does not claim key 4
    GOOD.format(id=4, caption='"first good 4,\r\nwith a CRLF inside quotes"', s=9),  # not a duplicate
    GOOD.format(id=" 4 ", caption='"again 4, padded id"', s=10),  # duplicate of row 5
    "",  # a blank line is a row of no cells
    "5,too,few",
    GOOD.format(id=6, caption='"""quoted"" start"', s=11),
    GOOD.format(id=-7, caption="negative id: key None", s=12),
    GOOD.format(id=-8, caption="another None key", s=13),
    GOOD.format(id="٣", caption="a Unicode digit id", s=14),
    GOOD.format(id="٣", caption="that id again", s=15),
    "abc,not an id,1,000001_000050,PT5S,http://x/a.mp4",
    "abc,not an id,1,000001_000050,PT5S,http://x/a.mp4",
    GOOD.format(id=9, caption='"bytes \xff\xfe that are not UTF-8"', s=16),
    GOOD.format(id=6, caption="6 once more", s=17),
    GOOD.format(id=10, caption="last row: no newline at the end", s=18),
]


def write_csv(path, rows=CSV_ROWS, newline="\n", trailing=True) -> str:
    text = newline.join([HEADER, *rows]) + (newline if trailing else "")
    data = text.encode("utf-8").replace("\xff\xfe".encode(), b"\xff\xfe")  # raw invalid UTF-8 bytes
    path.write_bytes(data)
    return str(path)


JSONL_ROWS = [
    {"img_path": "./000/aaaa.jpg", "prompt": "p0", "Task2": {"Caption": "c0"}},
    {"img_path": "./000/bbbb.jpg"},  # bad (no prompt): does not claim bbbb
    "",
    "{not json",
    {"img_path": "./001/bbbb.png", "prompt": "first good bbbb"},
    {"img_path": "  ./002/bbbb  ", "prompt": "duplicate of row 4"},
    {"img_path": "./000/aaaa.jpg", "prompt": "duplicate of row 0", "Task1": {"Style": ["x"]}},
    ["not", "an", "object"],
    {"img_path": "./000/cccc.jpg", "prompt": "p", "Task1": "flat"},  # bad
    {"img_path": "./000/cccc.jpg", "prompt": "good cccc"},
    {"img_path": "./000/../x/cccc.jpg", "prompt": "bad path"},
    {"img_path": "./000/dddd.jpg", "prompt": "ünïcödé"},
]


def write_jsonl(path, rows=JSONL_ROWS, newline="\n") -> str:
    lines = [r if isinstance(r, str) else json.dumps(r, ensure_ascii=False) for r in rows]
    path.write_bytes(newline.join(lines).encode("utf-8") + b"\n")
    return str(path)


def write_parquet(path, hashes_as_text=False) -> str:
    hashes = [1, 2, 3, 4, 1, 4, None, None, None, 7]  # row 3 (no caption) is bad: row 5 claims hash 4
    table = pa.table(
        {
            "URL": ["http://h/a", "http://h/b", None, "http://h/d", "http://h/a", "http://h/e", "http://h/b"]
            + [" http://h/z", "http://h/z ", "http://h/y"],  # rows 7 and 8: the same URL key (no hash)
            "top_caption": ["a", "b", "c", None, "a again", "e", "b again", "z", "z again", "y"],
            "hash": [str(h) if hashes_as_text and h is not None else h for h in hashes[:-1]]
            + ["not a number" if hashes_as_text else 7],
            "TEXT": [None, "tb", None, None, None, None, "tb", None, None, None],
        }
    )
    pq.write_table(table, path, row_group_size=3)
    return str(path)


def whole(source, path, **options) -> list[dict]:
    return list(make_reader(source, path, **options).read())


def planned(source, path, size, unit=None, **options) -> list[dict]:
    """Every span read by a fresh reader (in read units of `unit` rows when given), as a job's tasks do."""
    plan = plan_manifest(source, path, size, **options)
    items = []
    for span in plan.spans:
        duplicates = json.loads(json.dumps(plan.duplicates_in(span)))  # what a task receives
        units = (
            [span.rows] if unit is None else [range(a, min(a + unit, span.stop)) for a in span.rows[::unit]]
        )
        for rows in units:
            items += make_reader(source, path, **options).read_span(span, rows, duplicates=duplicates)
    return items


def duplicate_map(items) -> dict[int, int]:
    found = {}
    for item in items:
        if item.get("reason") == "duplicate_key":
            found[item["row"]] = int(re.search(r"already used by row (\d+)", item["detail"])[1])
    return found


@pytest.fixture(params=["\n", "\r\n"], ids=["lf", "crlf"])
def manifests(request, tmp_path):
    return {
        "webvid": write_csv(tmp_path / "results.csv", newline=request.param),
        "jdb": write_jsonl(tmp_path / "anno.jsonl", newline=request.param),
        "laion_coco": write_parquet(tmp_path / "part-0.parquet", hashes_as_text=request.param == "\r\n"),
    }


@pytest.mark.parametrize("source", ["webvid", "jdb", "laion_coco"])
def test_every_slicing_equals_one_whole_read(manifests, source):
    path = manifests[source]
    expected = whole(source, path)
    n = len(expected)
    assert n == make_reader(source, path).num_rows
    for size in sorted({1, 2, 3, 7, n - 1, n, n + 5}):
        assert planned(source, path, size) == expected, f"rows_per_shard={size}"
    assert planned(source, path, 7, unit=2) == expected  # read units inside spans
    plan = plan_manifest(source, path, 4)
    assert plan.duplicates == duplicate_map(expected) and plan.duplicates
    assert plan.num_rows == n and [s.rows for s in plan.spans] == [
        range(a, min(a + 4, n)) for a in range(0, n, 4)
    ]


def test_a_manifest_of_many_line_batches(tmp_path):
    """Thousands of rows: planning reads lines in batches, so offsets must hold across batch edges."""
    rows = []
    for i in range(3000):
        caption = f'"row {i}, line one\r\nline two ""q"" é"' if i % 7 == 0 else f"row {i} 日本"
        rows.append(GOOD.format(id=i - 50 if i % 100 == 99 else i, caption=caption, s=i % 50))
    rows[1234] = "5,too,few"
    path = write_csv(tmp_path / "big.csv", rows, newline="\r\n")
    expected = whole("webvid", path)
    assert len(expected) == 3000 and len(duplicate_map(expected)) == 30
    for size in (97, 512, 1000, 2999):
        assert planned("webvid", path, size) == expected, f"rows_per_shard={size}"
    jsonl = write_jsonl(tmp_path / "big.jsonl", [*JSONL_ROWS * 300])
    expected = whole("jdb", jsonl)
    assert planned("jdb", jsonl, 1000) == expected and len(expected) == 3600


def test_duplicate_semantics(tmp_path):
    items = whole("webvid", write_csv(tmp_path / "r.csv"))
    reasons = {i["row"]: i.get("reason") for i in items}
    assert reasons[4] == "bad_duration" and reasons[5] is None  # a bad row does not claim its key
    assert duplicate_map(items) == {3: 0, 6: 5, 11: 10, 13: 12, 17: 9}
    for hashes_as_text in (False, True):  # row 3 is bad: row 5 (hash 4) is no duplicate
        laion = whole("laion_coco", write_parquet(tmp_path / f"{hashes_as_text}.parquet", hashes_as_text))
        assert duplicate_map(laion) == {4: 0, 8: 7} and laion[3]["reason"] == "missing_field"
    jdb = whole("jdb", write_jsonl(tmp_path / "a.jsonl"))
    assert duplicate_map(jdb) == {5: 4, 6: 0}
    assert [jdb[i].get("reason") for i in (1, 2, 3, 8, 9)] == [
        "missing_field", "bad_json", "bad_json", "bad_value", None
    ]  # fmt: skip


def test_csv_offsets_are_record_starts(tmp_path):
    path = write_csv(tmp_path / "r.csv", newline="\r\n", trailing=False)
    data = open(path, "rb").read()
    plan = plan_manifest("webvid", path, 1)
    assert plan.spans[0].offset == len(HEADER) + 2
    assert data[plan.spans[2].offset :].startswith("3,café".encode())  # after row 1's quoted newline
    assert data[plan.spans[-1].offset :].startswith(b"10,") and not data.endswith(b"\n")
    assert all(
        s.offset is None for s in plan_manifest("laion_coco", write_parquet(tmp_path / "p.parquet"), 2).spans
    )


def test_a_span_read_never_touches_the_rows_before_it(tmp_path):
    path = write_csv(tmp_path / "r.csv")
    plan = plan_manifest("webvid", path, 6)
    expected = whole("webvid", path)[plan.spans[-1].start :]
    data = bytearray(open(path, "rb").read())
    first, last = plan.spans[0].offset, plan.spans[-1].offset
    data[first:last] = (b"x\ry," * last)[: last - first - 1] + b"\n"  # csv.reader chokes on these bytes
    open(path, "wb").write(bytes(data))
    damaged = whole("webvid", path)  # the unparseable bytes cost their record, not the file
    assert (
        damaged[0]["reason"] == "bad_csv"
        and f"{path}, row 0, line 2: the csv module cannot parse" in (damaged[0]["detail"])
    )
    span = plan.spans[-1]
    assert list(make_reader("webvid", path).read_span(span, duplicates=plan.duplicates_in(span))) == expected
    # the same for JSONL: the first lines replaced by one long line change nothing after them
    jsonl = write_jsonl(tmp_path / "a.jsonl")
    jplan = plan_manifest("jdb", jsonl, 5)
    span = jplan.spans[-1]
    expected = whole("jdb", jsonl)[span.start :]
    data = bytearray(open(jsonl, "rb").read())
    data[: span.offset] = (
        json.dumps({"img_path": "./0/x.jpg", "prompt": "p" * span.offset})[: span.offset - 1].encode() + b"\n"
    )
    open(jsonl, "wb").write(bytes(data))
    assert list(make_reader("jdb", jsonl).read_span(span, duplicates=jplan.duplicates_in(span))) == expected


def test_plan_knows_the_row_count_and_honours_max_rows(tmp_path):
    path = write_csv(tmp_path / "r.csv")
    reader = make_reader("webvid", path)
    plan = plan_reader(reader, 4)
    assert plan.num_rows == len(CSV_ROWS) == make_reader("webvid", path).num_rows
    assert reader._num_rows == plan.num_rows  # no second pass to count
    short = plan_manifest("webvid", path, 4, max_rows=7)
    assert short.num_rows == 7 and [s.rows for s in short.spans] == [range(0, 4), range(4, 7)]
    assert short.duplicates == {3: 0, 6: 5} and short.spans == plan.spans[:1] + [
        ShardSpan(start=4, stop=7, offset=plan.spans[1].offset)
    ]
    fresh = make_reader("webvid", path)
    assert [i for s in short.spans for i in fresh.read_span(s, duplicates=short.duplicates_in(s))] == list(
        make_reader("webvid", path).read(range(7))
    )
    assert plan_manifest("webvid", path, 4, max_rows=100).num_rows == len(CSV_ROWS)
    assert plan_manifest("jdb", write_jsonl(tmp_path / "a.jsonl"), 3, max_rows=0).spans == []


def test_errors_name_the_file_and_the_fix(tmp_path):
    path = write_csv(tmp_path / "r.csv", rows=[*CSV_ROWS[:3], "11,a\rb,1,x,PT1S,u", *CSV_ROWS[3:]])
    plan = plan_manifest("webvid", path, 2)  # the stray carriage return costs its row, not the file
    items = [
        i
        for s in plan.spans
        for i in make_reader("webvid", path).read_span(s, duplicates=plan.duplicates_in(s))
    ]
    assert plan.num_rows == len(items) == len(CSV_ROWS) + 1
    assert [(i["row"], i["key"]) for i in items] == [(i["row"], i["key"]) for i in whole("webvid", path)]
    bad = [i for i in whole("webvid", path) if i.get("reason") == "bad_csv"]
    assert len(bad) == 1 and re.search(
        rf"{re.escape(path)}, row 3, line 6: .*fix the quoting or the line", bad[0]["detail"]
    )
    path = write_csv(tmp_path / "ok.csv")
    plan = plan_manifest("webvid", path, 4)
    data = open(path, "rb").read()
    open(path, "wb").write(data[: plan.spans[-1].offset + 10])  # the file shrank
    with pytest.raises(ValueError, match="changed since it was planned; plan it again"):
        list(make_reader("webvid", path).read_span(plan.spans[-1]))
    with pytest.raises(ValueError, match="not within the span"):
        list(make_reader("webvid", path).read_span(plan.spans[0], range(3, 5)))
    with pytest.raises(ValueError, match="rows_per_shard must be >= 1"):
        plan_manifest("webvid", path, 0)


def test_lean_hashes_do_not_depend_on_chunks_and_repeats_are_found():
    values = ["12", None, "", "é日本", "12", "x" * 300, "21", "é日本", None, "x" * 300]
    whole = hash64(pa.array(values))
    assert whole[1] == whole[8] == 0 and all(h % 2 == 1 for i, h in enumerate(whole) if values[i] is not None)
    assert list(hash64(pa.array(values).slice(4))) == list(whole[4:])
    small = LeanKeys(chunk=3)
    for value in values:
        small.extend([value])
    assert list(small.array()) == list(whole)
    assert list(repeated(whole)) == [0, 3, 4, 5, 7, 9]  # nulls never repeat
    assert _WHITESPACE == "".join(c for c in map(chr, range(0x110000)) if c.isspace())  # str.strip()'s set
