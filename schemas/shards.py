"""Schemas of what the encode job writes: sample members, the per-tar index, and error rows."""

from __future__ import annotations

import pyarrow as pa

# Members of one webdataset sample (tar member "<key>.<member>"). Arrays are .npy (never pickled).
# latent.npy is the VAE posterior mean [C, T, h, w] float16, *unscaled*; latent_std.npy its std (or
# latent_logstd8.npy, its log quantised to 8 bits); the loader draws mean + std * eps and multiplies by
# json["scale_factor"] (shards.decode does this). Which optional members a shard holds is its storage
# profile (shards.profiles), recorded in the index column `storage_profile`.
SAMPLE_MEMBERS = pa.schema(
    [
        pa.field("__key__", pa.string(), nullable=False),
        pa.field(
            "latent.npy", pa.binary(), nullable=False, metadata={"dtype": "float16", "shape": "C,T,h,w"}
        ),
        pa.field("latent_std.npy", pa.binary(), metadata={"dtype": "float16", "shape": "C,T,h,w"}),
        # round((log std - logstd_offset) / logstd_step), the two numbers in the index row
        pa.field("latent_logstd8.npy", pa.binary(), metadata={"dtype": "uint8", "shape": "C,T,h,w"}),
        pa.field("txt", pa.string(), nullable=False),
        pa.field("text_tokens.npy", pa.binary(), metadata={"dtype": "float16", "shape": "77,D"}),
        pa.field("text_pooled.npy", pa.binary(), nullable=False, metadata={"dtype": "float16", "shape": "D"}),
        pa.field("image_tokens.npy", pa.binary(), metadata={"dtype": "float16", "shape": "257,Dv"}),
        pa.field("image_pooled.npy", pa.binary(), metadata={"dtype": "float16", "shape": "P"}),
        # the Image2Video conditioning frame, a quality-95 JPEG at the image encoder's input size (S x S)
        pa.field("cond_frame.jpg", pa.binary(), metadata={"shape": "S,S,3"}),
        pa.field("json", pa.string(), nullable=False),
    ]
)
REQUIRED_MEMBERS = tuple(f.name for f in SAMPLE_MEMBERS if not f.nullable and f.name != "__key__")
ARRAY_MEMBERS = tuple(f.name for f in SAMPLE_MEMBERS if f.name.endswith(".npy"))

# The `json` member of a sample (also the source of most index columns).
SAMPLE_JSON_SCHEMA = pa.schema(
    [
        pa.field("key", pa.string(), nullable=False),
        pa.field("source", pa.string(), nullable=False),
        pa.field("origin_key", pa.string(), nullable=False),
        pa.field("kind", pa.string(), nullable=False),
        pa.field("caption", pa.string()),
        pa.field("uri", pa.string()),
        pa.field("fps", pa.float32()),  # original fps of the video
        pa.field("sample_fps", pa.float32()),  # fps of the sampled clip after striding (the conditioning)
        pa.field("frame_stride", pa.int32()),
        pa.field("frame_indices", pa.list_(pa.int32())),
        pa.field("duration", pa.float64()),  # source duration, seconds
        pa.field("orig_width", pa.int32()),
        pa.field("orig_height", pa.int32()),
        pa.field("width", pa.int32()),  # pixel size the latent encodes
        pa.field("height", pa.int32()),
        pa.field("stage", pa.string()),  # resolution tag "WxH", e.g. "256x256"
        pa.field("similarity", pa.float32()),
        pa.field("punsafe", pa.float32()),
        pa.field("pwatermark", pa.float32()),
        pa.field("clip_score", pa.float32()),  # CLIP text-image cosine, when computed
        pa.field("aesthetic", pa.float32()),
        pa.field("caption_tokens", pa.int32()),  # tokenizer tokens before padding/truncation
        pa.field("scale_factor", pa.float32()),
        pa.field("vae_id", pa.string()),
        pa.field("text_encoder_id", pa.string()),
        pa.field("image_encoder_id", pa.string()),
        pa.field("versions", pa.string()),  # JSON: package versions used to encode
        pa.field("extra", pa.string()),
    ]
)

# One row per sample, in a parquet file beside each tar, written last (the tar's done-marker).
SHARD_INDEX_SCHEMA = pa.schema(
    [
        pa.field("key", pa.string(), nullable=False),
        pa.field("source", pa.string(), nullable=False),
        pa.field("origin_key", pa.string(), nullable=False),
        pa.field("kind", pa.string(), nullable=False),
        pa.field("shard", pa.string(), nullable=False),  # tar file name (not path)
        pa.field("offset", pa.int64()),  # byte offset of the sample's first member header in the tar
        pa.field("stage", pa.string(), nullable=False),  # "WxH"
        pa.field("width", pa.int32()),
        pa.field("height", pa.int32()),
        pa.field("latent_shape", pa.list_(pa.int32())),  # [C, T, h, w]
        pa.field("latent_dtype", pa.string()),
        pa.field("text_tokens_shape", pa.list_(pa.int32())),
        pa.field("image_tokens_shape", pa.list_(pa.int32())),  # null when not computed
        pa.field("num_frames", pa.int32()),  # T
        pa.field("fps", pa.float32()),
        pa.field("sample_fps", pa.float32()),
        pa.field("frame_stride", pa.int32()),
        pa.field("duration", pa.float64()),  # source seconds (videos)
        pa.field("clip_duration", pa.float64()),  # seconds the sampled clip spans
        pa.field("orig_width", pa.int32()),
        pa.field("orig_height", pa.int32()),
        pa.field("caption_words", pa.int32()),
        pa.field("caption_tokens", pa.int32()),
        pa.field("similarity", pa.float32()),
        pa.field("punsafe", pa.float32()),
        pa.field("pwatermark", pa.float32()),
        pa.field("clip_score", pa.float32()),
        pa.field("aesthetic", pa.float32()),
        pa.field("bytes_latent", pa.int64()),  # latent.npy + latent_std.npy + latent_logstd8.npy
        pa.field("bytes_text_tokens", pa.int64()),  # text_tokens.npy + text_pooled.npy
        pa.field("bytes_image_tokens", pa.int64()),  # image_tokens.npy + image_pooled.npy
        pa.field("bytes_image_frame", pa.int64()),  # cond_frame.jpg
        pa.field("bytes_total", pa.int64()),  # all members, tar headers included
        # what the sample stores (shards.profiles.StorageProfile as text); null in shards written before it: full
        pa.field("storage_profile", pa.string()),
        pa.field("logstd_offset", pa.float32()),  # latent_logstd8.npy: log std = offset + step * q
        pa.field("logstd_step", pa.float32()),
        pa.field("scale_factor", pa.float32()),
        pa.field("vae_id", pa.string()),
        pa.field("text_encoder_id", pa.string()),
        pa.field("image_encoder_id", pa.string()),
    ]
)

ERROR_STAGES = ("read", "fetch", "decode", "filter", "encode", "dedup", "write")

# One row per input row that did not become a sample. Written beside each tar as <stem>.errors.parquet.
ERROR_SCHEMA = pa.schema(
    [
        pa.field("key", pa.string(), nullable=False),
        pa.field("source", pa.string(), nullable=False),
        pa.field("stage", pa.string(), nullable=False),  # one of ERROR_STAGES
        pa.field(
            "reason", pa.string(), nullable=False
        ),  # short machine-readable, e.g. "http_404", "too_short"
        pa.field("detail", pa.string()),  # human-readable message
        pa.field("uri", pa.string()),
        pa.field("manifest", pa.string()),
        pa.field("row", pa.int64()),
    ]
)


def error_row(*, key, source, stage, reason, detail=None, uri=None, manifest=None, row=None) -> dict:
    """One ERROR_SCHEMA row as a dict; `stage` must be one of ERROR_STAGES."""
    if stage not in ERROR_STAGES:
        raise ValueError(f"error stage {stage!r} is not one of {ERROR_STAGES}")
    return dict(
        key=key, source=source, stage=stage, reason=reason, detail=detail, uri=uri, manifest=manifest, row=row
    )
