"""The shared schemas: parquet round trips, precise validation errors, conform, record and error-row helpers."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest

import schemas
from pipelines.sources import make_reader
from schemas import (
    ERROR_SCHEMA,
    JDB_ANNOTATION_SCHEMA,
    LAION_COCO_SCHEMA,
    SAMPLE_JSON_SCHEMA,
    SHARD_INDEX_SCHEMA,
    SOURCE_RECORD_FIELDS,
    SOURCE_RECORD_SCHEMA,
    WEBVID_CSV_SCHEMA,
    FieldProblem,
    SchemaError,
    WrongFileError,
    check_required_columns,
    conform,
    empty_record,
    error_row,
    validate_or_raise,
    validate_table,
)


@pytest.fixture(scope="module")
def expected(sample_data):
    return json.loads((sample_data / "expected.json").read_text())


def round_trip(rows: list[dict], schema: pa.Schema, path) -> list[dict]:
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path)
    table = pq.read_table(path)
    assert table.schema.equals(schema, check_metadata=False)
    return table.to_pylist()


def close(a, b) -> bool:
    """Equal, float32 columns compared at float32 precision."""
    if isinstance(a, float) and isinstance(b, float):
        return abs(a - b) <= 1e-6 * max(1.0, abs(a))
    return a == b


@pytest.mark.parametrize("source", ["webvid", "laion_coco", "jdb"])
def test_records_and_error_rows_round_trip_through_parquet(sample_data, expected, source, tmp_path):
    items = list(make_reader(source, str(sample_data / expected[source]["manifest"])).read())
    records = [i for i in items if "reason" not in i]
    errors = [i for i in items if "reason" in i]
    assert records and errors
    back = round_trip(records, SOURCE_RECORD_SCHEMA, tmp_path / "records.parquet")
    assert len(back) == len(records)
    for before, after in zip(records, back):
        assert tuple(after) == SOURCE_RECORD_FIELDS
        assert all(close(before[f], after[f]) for f in SOURCE_RECORD_FIELDS), (before, after)
    assert round_trip(errors, ERROR_SCHEMA, tmp_path / "errors.parquet") == errors


def test_laion_part_conforms_to_its_schema(sample_data, expected, tmp_path):
    table = pq.read_table(sample_data / expected["laion_coco"]["manifest"])
    assert "LICENSE" in table.column_names  # an extra column the schema does not know
    problems = validate_table(table, LAION_COCO_SCHEMA, "part.parquet")
    (null_url,) = problems  # the planted row without URL, reported exactly
    assert null_url.column == "URL" and null_url.got == "null" and null_url.row is not None
    good = table.filter(pa.compute.is_valid(table.column("URL")))
    conformed = validate_or_raise(good, LAION_COCO_SCHEMA, "part.parquet")
    assert conformed.schema.equals(LAION_COCO_SCHEMA) and conformed.num_rows == table.num_rows - 1
    assert (
        round_trip(conformed.to_pylist(), LAION_COCO_SCHEMA, tmp_path / "l.parquet") == conformed.to_pylist()
    )


def test_webvid_csv_and_jdb_lines_fit_their_schemas(sample_data, expected, tmp_path):
    csv_table = pacsv.read_csv(sample_data / expected["webvid"]["manifest"])
    assert validate_table(csv_table, WEBVID_CSV_SCHEMA, "results.csv") == []
    assert conform(csv_table, WEBVID_CSV_SCHEMA).num_rows == expected["webvid"]["rows"]
    lines = (sample_data / expected["jdb"]["manifest"]).read_text().splitlines()
    rows = []
    for line in lines:
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    rows = [{**r, "Task2": r.get("Task2")} for r in rows]
    assert round_trip(rows, JDB_ANNOTATION_SCHEMA, tmp_path / "jdb.parquet") == rows


def test_validate_table_names_file_row_column_and_expectation():
    table = pa.table({"videoid": ["1", "2", "x3", None], "name": ["a", "b", "c", "d"]})
    problems = validate_table(table, WEBVID_CSV_SCHEMA, "results.csv")
    assert FieldProblem("results.csv", 2, "videoid", "int64", "'x3'") in problems
    assert str(problems[0]) == "results.csv, row 2, column 'videoid': expected int64, got 'x3'"
    nulls = validate_table(pa.table({"videoid": pa.array([1, None], pa.int64())}), WEBVID_CSV_SCHEMA, "f.csv")
    assert nulls == [FieldProblem("f.csv", 1, "videoid", "a non-null int64", "null")]
    missing = validate_table(pa.table({"name": ["a"]}), WEBVID_CSV_SCHEMA, "f.csv")
    assert missing == [FieldProblem("f.csv", None, "videoid", "a int64 column", "no column")]
    with pytest.raises(SchemaError, match=r"f.csv, row 1, column 'videoid'") as caught:
        validate_or_raise(pa.table({"videoid": ["1", "y"]}), WEBVID_CSV_SCHEMA, "f.csv", hint="fix the ids")
    assert "fix: fix the ids" in str(caught.value) and len(caught.value.problems) == 1


def test_conform_drops_extras_adds_optional_and_rejects_missing_required():
    table = pa.table(
        {"URL": ["http://a"], "top_caption": ["c"], "extra_column": [1], "WIDTH": pa.array([3], pa.int32())}
    )
    conformed = conform(table, LAION_COCO_SCHEMA)
    assert conformed.schema.equals(LAION_COCO_SCHEMA)
    assert conformed.column("WIDTH").type == pa.int64() and conformed.column("hash").null_count == 1
    with pytest.raises(SchemaError, match="column 'URL'"):
        conform(pa.table({"top_caption": ["c"]}), LAION_COCO_SCHEMA)


def test_wrong_file_error_names_file_and_missing_columns():
    with pytest.raises(WrongFileError) as caught:
        check_required_columns("x.csv", "webvid", ["videoid", "name"], schemas.WEBVID_REQUIRED)
    assert caught.value.missing == ("page_dir", "duration", "contentUrl")
    assert str(caught.value).startswith("x.csv: not a webvid manifest: missing required columns")
    check_required_columns("x.csv", "webvid", schemas.WEBVID_REQUIRED, schemas.WEBVID_REQUIRED)  # no error


def test_empty_record_and_error_row():
    record = empty_record(key="k", source="jdb")
    assert tuple(record) == SOURCE_RECORD_FIELDS and record["uri"] is None and record["key"] == "k"
    with pytest.raises(KeyError, match="nope"):
        empty_record(nope=1)
    row = error_row(key="k", source="jdb", stage="fetch", reason="http_404", uri="http://x")
    assert set(row) == set(ERROR_SCHEMA.names) and row["row"] is None
    with pytest.raises(ValueError, match="error stage 'download'"):
        error_row(key="k", source="jdb", stage="download", reason="x")


def test_sample_json_and_index_schemas_round_trip(tmp_path):
    sample = {f.name: None for f in SAMPLE_JSON_SCHEMA}
    sample.update(
        key="webvid_1", source="webvid", origin_key="1", kind="video", frame_indices=[0, 3, 6], fps=24.0
    )
    assert round_trip([sample], SAMPLE_JSON_SCHEMA, tmp_path / "s.parquet") == [sample]
    index = {f.name: None for f in SHARD_INDEX_SCHEMA}
    index.update(
        key="webvid_1", source="webvid", origin_key="1", kind="video", shard="webvid-256x256-000000.tar",
        stage="256x256", latent_shape=[4, 16, 32, 32], offset=512, bytes_total=10_000,
    )  # fmt: skip
    assert round_trip([index], SHARD_INDEX_SCHEMA, tmp_path / "i.parquet") == [index]
    with pytest.raises((pa.ArrowInvalid, pa.ArrowTypeError)):
        pa.Table.from_pylist([{**index, "latent_shape": "4,16,32,32"}], schema=SHARD_INDEX_SCHEMA)
