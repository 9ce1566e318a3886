"""The row every encode-job stage passes on: one fixed pyarrow schema, error fields, and batch helpers."""

from __future__ import annotations

import struct

import pyarrow as pa

from schemas import SOURCE_RECORD_SCHEMA, error_row

# One schema from read to write, so Ray Data blocks never disagree on types. Stages fill columns in;
# a row whose err_stage is set is passed through untouched to the writer (it becomes an error row).
JOB_ROW_SCHEMA = pa.schema(
    [
        # the input shard this row belongs to (accounting: samples + errors == shard_rows closes it)
        pa.field("stage", pa.string()),  # resolution tag "WxH"
        pa.field("shard", pa.int64()),
        pa.field("shard_rows", pa.int64()),
        *[f.with_nullable(True) for f in SOURCE_RECORD_SCHEMA],
        pa.field("err_stage", pa.string()),  # "" when the row is fine so far
        pa.field("err_reason", pa.string()),
        pa.field("err_detail", pa.string()),
        # fetch
        pa.field("local_path", pa.string()),  # local file to decode in place, or ""
        pa.field("data", pa.binary()),  # fetched bytes when not local
        # decode
        pa.field("frames", pa.binary()),  # raw uint8 [T,H,W,3]
        pa.field("frames_shape", pa.list_(pa.int32())),
        pa.field("src_fps", pa.float32()),
        pa.field("sample_fps", pa.float32()),
        pa.field("frame_stride", pa.int32()),
        pa.field("frame_indices", pa.list_(pa.int32())),
        pa.field("num_src_frames", pa.int64()),
        pa.field("src_duration", pa.float64()),
        pa.field("orig_width", pa.int32()),
        pa.field("orig_height", pa.int32()),
        pa.field("out_width", pa.int32()),
        pa.field("out_height", pa.int32()),
        # encode: members as .npy bytes, ready for the tar
        pa.field("latent_npy", pa.binary()),
        pa.field("latent_std_npy", pa.binary()),
        pa.field("text_tokens_npy", pa.binary()),
        pa.field("text_pooled_npy", pa.binary()),
        pa.field("image_tokens_npy", pa.binary()),
        pa.field("image_pooled_npy", pa.binary()),
        pa.field("latent_logstd8_npy", pa.binary()),  # storage latent=mean+logstd8 (uint8 .npy)
        pa.field("cond_frame_jpg", pa.binary()),  # storage image=frame (JPEG)
        pa.field("storage_profile", pa.string()),  # shards.profiles.StorageProfile as text
        pa.field("logstd_offset", pa.float32()),
        pa.field("logstd_step", pa.float32()),
        pa.field("latent_shape", pa.list_(pa.int32())),
        pa.field("text_tokens_shape", pa.list_(pa.int32())),
        pa.field("image_tokens_shape", pa.list_(pa.int32())),
        pa.field("caption_tokens", pa.int32()),
        pa.field("clip_score", pa.float32()),
        pa.field("scale_factor", pa.float32()),
        pa.field("vae_id", pa.string()),
        pa.field("text_encoder_id", pa.string()),
        pa.field("image_encoder_id", pa.string()),
    ]
)
JOB_COLUMNS = tuple(JOB_ROW_SCHEMA.names)


def new_row(**values) -> dict:
    """A row with every column present; err_* default to ""."""
    row = dict.fromkeys(JOB_COLUMNS)
    row.update(err_stage="", err_reason="", err_detail="")
    unknown = set(values) - set(row)
    if unknown:
        raise KeyError(f"not job-row columns: {sorted(unknown)}")
    row.update(values)
    return row


def fail(row: dict, stage: str, reason: str, detail: str = "") -> dict:
    """Mark a row as failed at `stage` with a machine-readable `reason`; drops its heavy columns."""
    row.update(err_stage=stage, err_reason=reason, err_detail=str(detail)[:500], data=None, frames=None)
    return row


def failed(row: dict) -> bool:
    return bool(row.get("err_stage"))


def to_error_row(row: dict) -> dict:
    """The ERROR_SCHEMA row of a failed job row."""
    return error_row(
        key=row.get("key") or f"{row.get('source')}_row{row.get('row')}",
        source=row.get("source") or "",
        stage=row["err_stage"],
        reason=row["err_reason"],
        detail=row.get("err_detail") or None,
        uri=row.get("uri"),
        manifest=row.get("manifest"),
        row=row.get("row"),
    )


def rows_of(table: pa.Table) -> list[dict]:
    """A Ray Data pyarrow batch as row dicts."""
    return table.to_pylist()


def table_of(rows: list[dict], zero_copy: tuple[str, ...] = ()) -> pa.Table:
    """Row dicts back to a pyarrow batch with the fixed job schema; the binary `zero_copy` columns wrap
    their bytes objects in place (one chunk per row) instead of copying multi-MB values."""
    if not zero_copy:
        return pa.Table.from_pylist(rows, schema=JOB_ROW_SCHEMA)
    table = pa.Table.from_pylist([{**r, **dict.fromkeys(zero_copy)} for r in rows], schema=JOB_ROW_SCHEMA)
    for name in zero_copy:
        chunks = [_binary_scalar(r.get(name)) for r in rows]
        column = pa.chunked_array(chunks, type=pa.binary()) if chunks else table.column(name)
        table = table.set_column(table.schema.get_field_index(name), JOB_ROW_SCHEMA.field(name), column)
    return table


def _binary_scalar(value) -> pa.Array:
    """A one-row binary array over `value`'s own memory (bytes-like, or None for null)."""
    if value is None:
        return pa.nulls(1, pa.binary())
    data = pa.py_buffer(value)
    offsets = pa.py_buffer(struct.pack("<ii", 0, data.size))
    return pa.Array.from_buffers(pa.binary(), 1, [None, offsets, data])
