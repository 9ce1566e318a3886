"""Shared pyarrow schemas of every manifest, record, sample, index and error row, and their validation."""

from schemas.manifests import (
    JDB_ANNOTATION_SCHEMA,
    JDB_REQUIRED,
    LAION_COCO_REQUIRED,
    LAION_COCO_SCHEMA,
    WEBVID_CSV_SCHEMA,
    WEBVID_REQUIRED,
)
from schemas.records import KINDS, SOURCE_RECORD_FIELDS, SOURCE_RECORD_SCHEMA, SOURCES, empty_record
from schemas.shards import (
    ARRAY_MEMBERS,
    ERROR_SCHEMA,
    ERROR_STAGES,
    REQUIRED_MEMBERS,
    SAMPLE_JSON_SCHEMA,
    SAMPLE_MEMBERS,
    SHARD_INDEX_SCHEMA,
    error_row,
)
from schemas.validate import (
    FieldProblem,
    SchemaError,
    WrongFileError,
    check_required_columns,
    conform,
    validate_or_raise,
    validate_table,
)

__all__ = [
    "ARRAY_MEMBERS",
    "ERROR_SCHEMA",
    "ERROR_STAGES",
    "JDB_ANNOTATION_SCHEMA",
    "JDB_REQUIRED",
    "KINDS",
    "LAION_COCO_REQUIRED",
    "LAION_COCO_SCHEMA",
    "REQUIRED_MEMBERS",
    "SAMPLE_JSON_SCHEMA",
    "SAMPLE_MEMBERS",
    "SHARD_INDEX_SCHEMA",
    "SOURCES",
    "SOURCE_RECORD_FIELDS",
    "SOURCE_RECORD_SCHEMA",
    "WEBVID_CSV_SCHEMA",
    "WEBVID_REQUIRED",
    "FieldProblem",
    "SchemaError",
    "WrongFileError",
    "check_required_columns",
    "conform",
    "empty_record",
    "error_row",
    "validate_or_raise",
    "validate_table",
]
