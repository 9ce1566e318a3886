"""The three dataset readers on the generated sample data, on malformed rows, on wrong files, and sliced."""

from __future__ import annotations

import io
import json
import urllib.error
import urllib.request

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipelines.sources import (
    READERS,
    JourneyDBReader,
    LaionCocoReader,
    WebVidReader,
    input_shards,
    is_error,
    make_reader,
    parse_iso_duration,
    slice_rows,
)
from schemas import ERROR_SCHEMA, SOURCE_RECORD_FIELDS, SOURCE_RECORD_SCHEMA, WrongFileError
from shards.format import check_key


@pytest.fixture(scope="module")
def expected(sample_data):
    return json.loads((sample_data / "expected.json").read_text())


def reader_for(sample_data, expected, source, **options) -> object:
    if source == "webvid":
        options.setdefault("media_root", str(sample_data / expected["webvid"]["media_root"]))
    return make_reader(source, str(sample_data / expected[source]["manifest"]), **options)


def split(items):
    items = list(items)
    return [i for i in items if not is_error(i)], [i for i in items if is_error(i)]


@pytest.mark.parametrize("source", sorted(READERS))
def test_reader_counts_keys_and_read_defects(sample_data, expected, source):
    info = expected[source]
    reader = reader_for(sample_data, expected, source)
    items = list(reader.read())
    assert reader.num_rows == info["rows"] == len(items)
    assert [i["row"] for i in items] == list(range(info["rows"]))
    assert [i["key"] for i in items] == info["keys"]
    records, errors = split(items)
    read_defects = {k: d["reason"] for k, d in info["defects"].items() if d["stage"] == "read"}
    assert {e["key"]: e["reason"] for e in errors} == read_defects
    assert len(records) == info["rows"] - len(read_defects)
    for error in errors:
        assert set(error) == set(ERROR_SCHEMA.names)
        assert error["stage"] == "read" and error["source"] == source
        assert error["manifest"] == str(sample_data / info["manifest"])
        assert f"row {error['row']}" in error["detail"]
    for record in records:
        assert tuple(record) == SOURCE_RECORD_FIELDS
        assert record["source"] == source and record["kind"] == reader.kind
        assert record["key"] == f"{source}_{record['origin_key']}"
        check_key(record["key"])
        assert record["caption"].strip()
    pa.Table.from_pylist(records, schema=SOURCE_RECORD_SCHEMA)  # every record fits the schema
    pa.Table.from_pylist(errors, schema=ERROR_SCHEMA)


def test_webvid_durations_uris_and_captions(sample_data, expected):
    info = expected["webvid"]
    records, errors = split(reader_for(sample_data, expected, "webvid").read())
    by_key = {r["key"]: r for r in records}
    for key, item in info["items"].items():
        assert by_key[key]["duration"] == item["duration"]
    assert by_key[[k for k, d in info["defects"].items() if d["reason"] == "too_short"][0]]["duration"] == 0.0
    assert {r["duration"] for r in records} >= {20.0}
    for key in info["items"]:
        assert (sample_data / "webvid" / "videos").as_posix() in by_key[key]["uri"]
        assert fsspec.open(by_key[key]["uri"]).open().read(8)[4:8] == b"ftyp"
    missing = [k for k, d in info["defects"].items() if d["reason"] == "not_found"][0]
    assert not fsspec.filesystem("file").exists(by_key[missing]["uri"])
    (bad,) = errors
    assert "'duration'" in bad["detail"] and "17 seconds" in bad["detail"] and "PT00H00M17S" in bad["detail"]
    # without media_root the uri is the CSV's contentUrl
    plain, _ = split(WebVidReader(str(sample_data / info["manifest"])).read())
    assert all(r["uri"].startswith(f"http://127.0.0.1:{expected['port']}/webvid/videos/") for r in plain)
    assert {r["caption"] for r in plain} == {r["caption"] for r in records}
    assert any('"' in r["caption"] or "," in r["caption"] for r in records)  # CSV quoting survived


def test_laion_records_urls_and_quality_fields(sample_data, expected, sample_server):
    info = expected["laion_coco"]
    reader = reader_for(
        sample_data, expected, "laion_coco", url_rewrite={info["url_prefix"]: sample_server + "/"}
    )
    records, _ = split(reader.read())
    by_key = {r["key"]: r for r in records}
    assert all(r["uri"].startswith(sample_server + "/laion_coco/images/") for r in records)
    assert any(k.startswith("laion_coco_u") for k in by_key)  # the row without a hash
    for key, item in info["items"].items():
        assert (by_key[key]["width"], by_key[key]["height"]) == (item["width"], item["height"])
        assert json.loads(by_key[key]["extra"])["TEXT"]
    assert {k for k, r in by_key.items() if r["punsafe"] > 0.5} == set(info["high_punsafe"])
    assert all(0 < r["similarity"] < 1 and 0 <= r["pwatermark"] < 1 for r in records)
    # the URLs resolve on the local server, and the planted 404 does 404
    good = by_key[sorted(info["items"])[0]]
    with urllib.request.urlopen(good["uri"], timeout=10) as response:
        assert Image.open(io.BytesIO(response.read())).size == (good["width"], good["height"])
    (gone,) = [k for k, d in info["defects"].items() if d["reason"] == "http_404"]
    with pytest.raises(urllib.error.HTTPError) as caught:
        urllib.request.urlopen(by_key[gone]["uri"], timeout=10)
    assert caught.value.code == 404


def test_laion_manifest_read_over_http(sample_data, expected, sample_server):
    info = expected["laion_coco"]
    local = list(reader_for(sample_data, expected, "laion_coco").read())
    url = f"{sample_server}/{info['manifest']}"
    remote = list(LaionCocoReader(url).read())

    def placeless(item):  # the manifest (and the detail that names it) differ; nothing else may
        return {**item, "manifest": None, "detail": (item.get("detail") or "").replace(item["manifest"], "M")}

    assert [placeless(i) for i in remote] == [placeless(i) for i in local]
    assert remote[0]["manifest"] == url and sum(map(is_error, remote)) == 1


def test_jdb_captions_extra_and_uris(sample_data, expected):
    info = expected["jdb"]
    records, _ = split(reader_for(sample_data, expected, "jdb").read())
    lines = (sample_data / info["manifest"]).read_text().splitlines()
    for record in records:
        line = json.loads(lines[record["row"]])
        assert record["caption"] == line.get("Task2", {}).get("Caption", line["prompt"]).strip()
        assert json.loads(record["extra"])["Style"] == line["Task1"]["Style"]
        assert record["uri"] == str(sample_data / "jdb/data/train/imgs" / line["img_path"][2:])
    assert any("Task2" not in json.loads(lines[r["row"]]) for r in records)  # prompt fallback exercised
    for key, item in info["items"].items():
        uri = next(r["uri"] for r in records if r["key"] == key)
        assert Image.open(uri).size == (item["width"], item["height"])


def test_jdb_packed_tgz_gives_tar_urls_that_fsspec_opens(tmp_path):
    from pipelines.tools.sample_data import generate

    expected = generate(str(tmp_path), seed=2, videos=0, images=0, jdb_images=3, pack_jdb=True)
    assert not (tmp_path / "jdb/data/train/imgs/000").exists()
    records, errors = split(JourneyDBReader(str(tmp_path / expected["jdb"]["manifest"])).read())
    assert len(records) == 4 and len(errors) == 1
    archive = (tmp_path / "jdb/data/train/imgs/000.tgz").as_posix()
    for record in records:
        assert record["uri"] == f"tar://000/{record['origin_key']}.jpg::{archive}"
        item = expected["jdb"]["items"].get(record["key"])
        if item is None:  # the planted missing image is not in the archive either
            with pytest.raises(FileNotFoundError):
                fsspec.open(record["uri"]).open()
            continue
        with fsspec.open(record["uri"]) as f:
            assert Image.open(io.BytesIO(f.read())).size == (item["width"], item["height"])


@pytest.mark.parametrize("source", sorted(READERS))
@pytest.mark.parametrize("n", [1, 3, 4])
def test_slices_cover_the_manifest_exactly(sample_data, expected, source, n):
    reader = reader_for(sample_data, expected, source)
    whole = list(reader.read())
    parts = [list(reader.read_slice(i, n)) for i in range(n)]
    assert [len(p) for p in parts] == [len(slice_rows(reader.num_rows, i, n)) for i in range(n)]
    assert [item for part in parts for item in part] == whole
    shards = input_shards(reader.num_rows, 4)
    assert [item for rows in shards for item in reader.read(rows)] == whole


def test_slice_and_shard_arithmetic():
    assert input_shards(10, 4) == [range(0, 4), range(4, 8), range(8, 10)]
    assert input_shards(0, 4) == []
    assert [slice_rows(10, i, 3) for i in range(3)] == [range(0, 3), range(3, 6), range(6, 10)]
    assert slice_rows(2, 2, 4) == range(1, 1)
    with pytest.raises(ValueError, match="0 <= i < n"):
        slice_rows(10, 3, 3)
    with pytest.raises(ValueError, match="rows_per_shard"):
        input_shards(10, 0)


def test_read_rejects_ranges_outside_the_manifest(sample_data, expected):
    reader = reader_for(sample_data, expected, "jdb")
    with pytest.raises(ValueError, match="not a contiguous range"):
        list(reader.read(range(0, reader.num_rows + 1)))


def write_csv(path, rows, header="videoid,name,page_idx,page_dir,duration,contentUrl"):
    path.write_text("\n".join([header, *rows]) + "\n", encoding="utf-8")
    return str(path)


def test_webvid_malformed_rows_and_duplicates(tmp_path):
    good = "{id},a caption,1,000001_000050,PT00H00M05S,http://x/{id}.mp4"
    manifest = write_csv(
        tmp_path / "r.csv",
        [
            good.format(id=1),
            good.format(id=2).replace("PT00H00M05S", "PT1M2.5S"),
            "abc,caption,1,000001_000050,PT00H00M05S,http://x/a.mp4",
            "3,,1,000001_000050,PT00H00M05S,http://x/3.mp4",
            "4,too,few,cells",
            good.format(id=1).replace("a caption", "the same id again"),
            "5,x,notint,000001_000050,PT5S,http://x/5.mp4",
            good.format(id=6).replace("PT00H00M05S", "PT"),
        ],
    )
    items = list(WebVidReader(manifest).read())
    assert [i.get("reason") for i in items] == [
        None, None, "bad_value", "missing_field", "bad_value", "duplicate_key", "bad_value", "bad_duration",
    ]  # fmt: skip
    assert items[1]["duration"] == 62.5
    assert "column 'videoid'" in items[2]["detail"] and "'abc'" in items[2]["detail"]
    assert "column 'name'" in items[3]["detail"] and items[3]["key"] == "webvid_3"
    assert "expected 6 cells" in items[4]["detail"] and items[4]["key"] == "webvid_row4"
    assert items[5]["key"] == "webvid_1" and "row 0" in items[5]["detail"]
    # a slice that starts after the first occurrence still flags the repeat
    reader = WebVidReader(manifest)
    assert [i.get("reason") for i in reader.read(range(5, 6))] == ["duplicate_key"]
    assert "already used by row 0" in next(reader.read(range(5, 6)))["detail"]
    assert reader.duplicate_rows() == {5: 0}


@pytest.mark.parametrize(
    "text, seconds",
    [("PT00H00M17S", 17.0), ("PT01H02M03S", 3723.0), ("PT1M2.5S", 62.5), ("P1DT1S", 86401.0), ("PT0S", 0.0)],
)
def test_parse_iso_duration(text, seconds):
    assert parse_iso_duration(text) == seconds


@pytest.mark.parametrize("text", ["17 seconds", "", "PT", "P", "00:00:17", "PT17", "PTS", None])
def test_parse_iso_duration_rejects(text):
    with pytest.raises(ValueError, match="ISO-8601"):
        parse_iso_duration(text)


def test_laion_tolerates_missing_optional_columns_and_flags_bad_cells(tmp_path):
    path = tmp_path / "part-00000-x.snappy.parquet"
    table = pa.table(
        {
            "URL": [
                "http://h/a.jpg",
                "http://h/b.jpg",
                "http://h/c.jpg",
                None,
                "http://h/e.jpg",
                "http://h/a.jpg",
            ],
            "top_caption": ["a", None, "c", "d", "e", "f"],
            "TEXT": ["ta", "tb", "tc", "td", "te", "tf"],
            "hash": ["12", "-1", "not a number", "4", None, "12"],  # strings: castable cell by cell
            "something_else": [1, 2, 3, 4, 5, 6],
        }
    )
    pq.write_table(table, path, row_group_size=2)
    reader = LaionCocoReader(str(path), url_rewrite={"http://h/": "file:///data/", "http://": "https://"})
    items = list(reader.read())
    assert [i.get("reason") for i in items] == [
        None,
        None,
        "bad_value",
        "missing_field",
        None,
        "duplicate_key",
    ]
    assert items[0]["key"] == "laion_coco_000000000000000c" and items[0]["uri"] == "file:///data/a.jpg"
    assert items[1]["key"] == "laion_coco_ffffffffffffffff" and items[1]["caption"] == "tb"  # TEXT fallback
    assert (
        "row 2" in items[2]["detail"]
        and "'hash'" in items[2]["detail"]
        and "not a number" in items[2]["detail"]
    )
    assert items[3]["key"] == "laion_coco_0000000000000004" and "'URL'" in items[3]["detail"]
    import zlib

    assert items[4]["key"] == f"laion_coco_u{zlib.crc32(b'http://h/e.jpg'):08x}"
    assert items[0]["width"] is None and items[0]["punsafe"] is None  # absent optional columns read as null


def test_jdb_malformed_lines(tmp_path):
    rows = [
        {"img_path": "./000/aaaa.jpg", "prompt": "p1", "Task2": {"Caption": "c1"}},
        {"img_path": "./000/bbbb.jpg"},
        ["not", "an", "object"],
        {"img_path": "./000/../../etc/passwd", "prompt": "p"},
        {"img_path": "./001/aaaa.jpg", "prompt": "again"},
        {"img_path": "./000/cccc.jpg", "prompt": "p3", "Task1": "flat"},
    ]
    path = tmp_path / "train_anno_realease_repath.jsonl"
    path.write_text("\n".join([*(json.dumps(r) for r in rows), "", "{broken"]) + "\n")
    items = list(JourneyDBReader(str(path), media_root="s3://bucket/imgs").read())
    assert [i.get("reason") for i in items] == [
        None, "missing_field", "bad_json", "bad_value", "duplicate_key", "bad_value", "bad_json", "bad_json",
    ]  # fmt: skip
    assert items[0]["uri"] == "s3://bucket/imgs/000/aaaa.jpg" and items[0]["caption"] == "c1"
    assert "column 'prompt'" in items[1]["detail"] and items[1]["key"] == "jdb_bbbb"
    assert items[7]["key"] == "jdb_row7" and "{broken" in items[7]["detail"]


def test_wrong_files_give_one_clear_error(sample_data, expected, tmp_path):
    manifests = {s: str(sample_data / expected[s]["manifest"]) for s in READERS}
    cases = [
        (WebVidReader, manifests["jdb"]),
        (WebVidReader, manifests["laion_coco"]),
        (LaionCocoReader, manifests["webvid"]),
        (LaionCocoReader, manifests["jdb"]),
        (JourneyDBReader, manifests["webvid"]),
        (JourneyDBReader, manifests["laion_coco"]),
    ]
    for reader_class, manifest in cases:
        with pytest.raises(WrongFileError) as caught:
            reader_class(manifest)
        message = str(caught.value)
        assert message.startswith(f"{manifest}: not a {reader_class.name} manifest")
        assert caught.value.missing  # the required columns it lacks (or, not being JSONL at all, all of them)
    # a CSV that lacks two columns names exactly those
    csv_path = write_csv(tmp_path / "r.csv", ["1,x,000001_000050"], header="videoid,name,page_dir")
    with pytest.raises(WrongFileError, match=r"missing required columns \['duration', 'contentUrl'\]"):
        WebVidReader(csv_path)
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    with pytest.raises(WrongFileError, match="empty file"):
        WebVidReader(str(empty))
    # a parquet without top_caption; a JSONL whose objects lack prompt
    pq.write_table(pa.table({"URL": ["http://a"], "caption": ["x"]}), tmp_path / "p.parquet")
    with pytest.raises(WrongFileError, match=r"missing required columns \['top_caption'\]"):
        LaionCocoReader(str(tmp_path / "p.parquet"))
    (tmp_path / "a.jsonl").write_text('{"img_path": "./000/x.jpg", "caption": "no prompt"}\n')
    with pytest.raises(WrongFileError, match=r"missing required columns \['prompt'\]"):
        JourneyDBReader(str(tmp_path / "a.jsonl"))


def test_make_reader_and_is_error(sample_data, expected):
    with pytest.raises(ValueError, match="unknown source 'webvid10m'"):
        make_reader("webvid10m", "x.csv")
    reader = make_reader("jdb", str(sample_data / expected["jdb"]["manifest"]))
    assert isinstance(reader, JourneyDBReader) and reader.kind == "image" and WebVidReader.kind == "video"
    kinds = [is_error(i) for i in reader.read()]
    assert kinds.count(True) == 1 and kinds.count(False) == expected["jdb"]["rows"] - 1


def test_readers_pickle_for_ray_tasks(sample_data, expected):
    import pickle

    for source in READERS:
        reader = reader_for(sample_data, expected, source)
        clone = pickle.loads(pickle.dumps(reader))
        assert list(clone.read(range(2, 5))) == list(reader.read(range(2, 5)))
