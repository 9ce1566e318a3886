"""The unified source record: what every dataset reader yields, whatever the dataset."""

from __future__ import annotations

import pyarrow as pa

SOURCES = ("webvid", "laion_coco", "jdb")
KINDS = ("video", "image")

SOURCE_RECORD_SCHEMA = pa.schema(
    [
        pa.field("key", pa.string(), nullable=False),  # "<source>_<origin_key>", unique, tar-safe
        pa.field("source", pa.string(), nullable=False),  # one of SOURCES
        pa.field("origin_key", pa.string(), nullable=False),  # the dataset's own id (videoid, hash, uuid)
        pa.field("uri", pa.string(), nullable=False),  # media: local path, file://, http(s)://, s3://, ...
        pa.field("caption", pa.string(), nullable=False),
        pa.field("kind", pa.string(), nullable=False),  # one of KINDS
        pa.field("duration", pa.float64()),  # seconds, videos only
        pa.field("width", pa.int32()),  # as the manifest states it, if it does
        pa.field("height", pa.int32()),
        pa.field("fps", pa.float32()),  # if the manifest knows it
        pa.field("similarity", pa.float32()),  # LAION-COCO quality fields
        pa.field("punsafe", pa.float32()),
        pa.field("pwatermark", pa.float32()),
        pa.field("extra", pa.string()),  # JSON of other source-specific fields (JDB style/content, ...)
        pa.field("manifest", pa.string(), nullable=False),  # the file this row came from
        pa.field("row", pa.int64(), nullable=False),  # 0-based data row number in that file
    ]
)
SOURCE_RECORD_FIELDS = tuple(SOURCE_RECORD_SCHEMA.names)


def empty_record(**values) -> dict:
    """A record dict with every field present (None where not given)."""
    record = dict.fromkeys(SOURCE_RECORD_FIELDS)
    unknown = set(values) - set(record)
    if unknown:
        raise KeyError(f"not fields of SOURCE_RECORD_SCHEMA: {sorted(unknown)}")
    record.update(values)
    return record
