"""The write stage: one input shard's job rows -> its output shard (tar, errors, embeddings part, index last)."""

from __future__ import annotations

import dataclasses
import json
from collections import Counter

import numpy as np

from pipelines.stages.embeddings import embeddings_folder, write_part
from pipelines.stages.rows import fail, failed, to_error_row
from shards.format import ShardWriter, decode_npy, shard_stem
from shards.profiles import PROFILES

_MEMBERS = {
    "latent.npy": "latent_npy",
    "latent_std.npy": "latent_std_npy",
    "text_tokens.npy": "text_tokens_npy",
    "text_pooled.npy": "text_pooled_npy",
    "image_tokens.npy": "image_tokens_npy",
    "image_pooled.npy": "image_pooled_npy",
    "latent_logstd8.npy": "latent_logstd8_npy",
    "cond_frame.jpg": "cond_frame_jpg",
}


def package_versions() -> str:
    """JSON of the versions that shape an encoding (stored in every sample's json)."""
    from importlib.metadata import PackageNotFoundError, version

    found = {}
    for name in ("latentcrafter", "torch", "diffusers", "transformers", "decord", "pillow", "numpy", "ray"):
        try:
            found[name] = version(name)
        except PackageNotFoundError:
            pass
    return json.dumps(found, sort_keys=True)


def sample_json(row: dict, versions: str) -> dict:
    """The `json` member (schemas.SAMPLE_JSON_SCHEMA fields)."""
    video = row["kind"] == "video"
    duration = row.get("duration") if row.get("duration") is not None else row.get("src_duration")
    return {
        "key": row["key"],
        "source": row["source"],
        "origin_key": row["origin_key"],
        "kind": row["kind"],
        "caption": row.get("caption"),
        "uri": row.get("uri"),
        "fps": row.get("src_fps") if video else None,
        "sample_fps": row.get("sample_fps") if video else None,
        "frame_stride": row.get("frame_stride"),
        "frame_indices": row.get("frame_indices"),
        "duration": duration if video else None,
        "orig_width": row.get("orig_width"),
        "orig_height": row.get("orig_height"),
        "width": row.get("out_width"),
        "height": row.get("out_height"),
        "stage": row["stage"],
        "similarity": row.get("similarity"),
        "punsafe": row.get("punsafe"),
        "pwatermark": row.get("pwatermark"),
        "clip_score": row.get("clip_score"),
        "aesthetic": None,
        "caption_tokens": row.get("caption_tokens"),
        "scale_factor": row.get("scale_factor"),
        "vae_id": row.get("vae_id"),
        "text_encoder_id": row.get("text_encoder_id"),
        "image_encoder_id": row.get("image_encoder_id"),
        "versions": versions,
        "extra": row.get("extra"),
    }


def index_row(row: dict, meta: dict) -> dict:
    """The SHARD_INDEX_SCHEMA columns known before writing (ShardWriter adds shard, offset and bytes)."""
    indices = row.get("frame_indices") or []
    clip_duration = None
    if meta["kind"] == "video" and indices and row.get("src_fps"):
        clip_duration = (indices[-1] - indices[0] + 1) / float(row["src_fps"])
    shape = row.get("latent_shape") or []
    return {
        **{k: meta[k] for k in ("key", "source", "origin_key", "kind", "stage", "width", "height")},
        **{
            k: meta[k] for k in ("fps", "sample_fps", "frame_stride", "duration", "orig_width", "orig_height")
        },
        **{k: meta[k] for k in ("caption_tokens", "similarity", "punsafe", "pwatermark", "clip_score")},
        **{
            k: meta[k] for k in ("aesthetic", "scale_factor", "vae_id", "text_encoder_id", "image_encoder_id")
        },
        "latent_shape": shape,
        "latent_dtype": "float16",
        "text_tokens_shape": row.get("text_tokens_shape"),
        "image_tokens_shape": row.get("image_tokens_shape"),
        "num_frames": shape[1] if len(shape) == 4 else None,
        "clip_duration": clip_duration,
        "caption_words": len((row.get("caption") or "").split()),
        "storage_profile": row.get("storage_profile") or str(PROFILES["full"]),
        "logstd_offset": row.get("logstd_offset"),
        "logstd_step": row.get("logstd_step"),
    }


class ShardSink:
    """The write stage of one output shard: `add(rows)` takes job rows (samples or failures) in order, `close()`
    writes the embeddings part, then ShardWriter's tar, errors parquet and index (the done marker), and returns
    the shard's summary (counts, bytes, reasons, paths). It runs where the shard's task runs, on a worker.
    """

    def __init__(self, out_dir: str, source: str, stage: str, shard: int, *, expected: int, embeddings: bool):
        self.out_dir, self.source, self.stage, self.shard = out_dir.rstrip("/"), source, stage, int(shard)
        self.expected, self.embeddings = int(expected), embeddings
        self.writer = ShardWriter(self.out_dir, shard_stem(source, stage, shard))
        self.versions = package_versions()
        self.seen = 0
        self.reasons: Counter = Counter()
        self.img: list[np.ndarray] = []
        self.text: list[np.ndarray] = []
        self.meta: list[dict] = []

    def add(self, rows: list[dict]) -> None:
        """Account rows of this shard: a sample goes into the tar, a failure into the errors parquet."""
        for row in rows:
            if not failed(row):
                self._add_sample(row)
            if failed(row):
                self.writer.add_errors([to_error_row(row)])
                self.reasons[f"{row['err_stage']}/{row['err_reason'].split(':')[0]}"] += 1
            self.seen += 1

    def close(self) -> dict:
        """Finish the shard (all `expected` rows must be in); returns its summary."""
        if self.seen != self.expected:
            self.writer.abort()
            raise RuntimeError(
                f"{self.writer.name}: {self.seen} rows arrived, {self.expected} expected; the shard was dropped"
            )
        if self.embeddings:
            folder = embeddings_folder(self.out_dir, self.source, self.stage)
            write_part(folder, self.shard, self.img, self.text, self.meta)
        result = self.writer.close()
        return dict(
            result,
            source=self.source,
            stage=self.stage,
            shard=self.shard,
            name=self.writer.name,
            rows=self.seen,
            reasons=dict(sorted(self.reasons.items())),
            paths=dataclasses.asdict(self.writer.paths),
        )

    def abort(self) -> None:
        self.writer.abort()

    def _add_sample(self, row: dict) -> None:
        if row["key"] in self.writer._keys:
            fail(row, "write", "duplicate_key", f"key {row['key']!r} twice in one shard")
            return
        meta = sample_json(row, self.versions)
        members = {name: row[col] for name, col in _MEMBERS.items() if row.get(col) is not None}
        members["txt"] = row.get("caption") or ""
        members["json"] = meta
        self.writer.write(row["key"], members, index_row(row, meta))
        if self.embeddings:
            if row.get("image_pooled_npy"):
                self.img.append(decode_npy(row["image_pooled_npy"]).astype(np.float32))
            self.text.append(decode_npy(row["text_pooled_npy"]).astype(np.float32))
            self.meta.append(
                dict(
                    key=row["key"],
                    image_path=row.get("uri"),
                    caption=row.get("caption"),
                    url=row.get("uri"),
                    source=row["source"],
                    shard=self.writer.name,
                    kind=row["kind"],
                )
            )
