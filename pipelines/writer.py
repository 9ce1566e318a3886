"""Assembles finished job rows into output shards (one per input shard) on top of shards.format.ShardWriter."""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import numpy as np

from pipelines.clip_retrieval import embeddings_folder, read_part, write_part
from pipelines.dedup import Deduplicator
from pipelines.rows import fail, failed, to_error_row
from shards.format import ShardWriter, decode_npy, shard_stem

_MEMBERS = {
    "latent.npy": "latent_npy",
    "latent_std.npy": "latent_std_npy",
    "text_tokens.npy": "text_tokens_npy",
    "text_pooled.npy": "text_pooled_npy",
    "image_tokens.npy": "image_tokens_npy",
    "image_pooled.npy": "image_pooled_npy",
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
    }


@dataclass
class _OpenShard:
    writer: ShardWriter
    expected: int
    seen: int = 0
    img: list = field(default_factory=list)
    text: list = field(default_factory=list)
    meta: list = field(default_factory=list)


class ShardAssembler:
    """Receives every job row (sample or failure) and closes output shard k once all rows of input shard k
    are in: embeddings part first, then ShardWriter.close() (tar, errors, index = done marker)."""

    def __init__(
        self, out_dir: str, *, embeddings: bool, dedup_threshold: float | None, dedup_on: str = "image"
    ):
        self.out_dir = out_dir.rstrip("/")
        self.embeddings = embeddings or dedup_threshold is not None
        self.dedup_threshold, self.dedup_on = dedup_threshold, dedup_on
        self.versions = package_versions()
        self.open: dict[tuple, _OpenShard] = {}
        self.dedups: dict[tuple, Deduplicator] = {}
        self.max_open = 0

    def seed_dedup(self, source: str, stage: str, done_shards: list[int]) -> int:
        """Load the embeddings of shards written by an earlier run into the dedup index; returns how many."""
        if self.dedup_threshold is None:
            return 0
        dedup = self.dedups.setdefault((source, stage), Deduplicator(self.dedup_threshold))
        folder = embeddings_folder(self.out_dir, source, stage)
        for n in done_shards:
            part = read_part(folder, n, "img" if self.dedup_on == "image" else "text")
            if part and len(part[0]):
                dedup.add(*part)
        return len(dedup)

    def add(self, row: dict) -> dict | None:
        """Account one row; returns the shard's close() result when this row completed it."""
        sid = (row["source"], row["stage"], int(row["shard"]))
        shard = self.open.get(sid)
        if shard is None:
            stem = shard_stem(*sid)
            shard = self.open[sid] = _OpenShard(ShardWriter(self.out_dir, stem), int(row["shard_rows"]))
            self.max_open = max(self.max_open, len(self.open))
        if not failed(row):
            self._add_sample(shard, sid, row)
        if failed(row):
            shard.writer.add_errors([to_error_row(row)])
        shard.seen += 1
        if shard.seen < shard.expected:
            return None
        del self.open[sid]
        if self.embeddings:
            write_part(
                embeddings_folder(self.out_dir, sid[0], sid[1]), sid[2], shard.img, shard.text, shard.meta
            )
        result = shard.writer.close()
        return dict(result, source=sid[0], stage=sid[1], shard=sid[2], name=shard.writer.name)

    def _add_sample(self, shard: _OpenShard, sid: tuple, row: dict) -> None:
        img = decode_npy(row["image_pooled_npy"]) if row.get("image_pooled_npy") else None
        text = decode_npy(row["text_pooled_npy"])
        if self.dedup_threshold is not None:
            vector = img if self.dedup_on == "image" else text
            if vector is not None:
                dedup = self.dedups.setdefault(sid[:2], Deduplicator(self.dedup_threshold))
                first = dedup.check(row["key"], vector)
                if first is not None:
                    fail(row, "dedup", f"duplicate_of:{first}", "pooled embedding cosine >= dedup.threshold")
                    return
        if row["key"] in shard.writer._keys:
            fail(row, "write", "duplicate_key", f"key {row['key']!r} twice in one shard")
            return
        meta = sample_json(row, self.versions)
        members = {name: row[col] for name, col in _MEMBERS.items() if row.get(col) is not None}
        members["txt"] = row.get("caption") or ""
        members["json"] = meta
        shard.writer.write(row["key"], members, index_row(row, meta))
        if self.embeddings:
            if img is not None:
                shard.img.append(np.asarray(img, dtype=np.float32))
            shard.text.append(np.asarray(text, dtype=np.float32))
            shard.meta.append(
                dict(
                    key=row["key"],
                    image_path=row.get("uri"),
                    caption=row.get("caption"),
                    url=row.get("uri"),
                    source=row["source"],
                    shard=shard.writer.name,
                    kind=row["kind"],
                )
            )

    def drop_unfinished(self) -> list[dict]:
        """Shards still open (rows missing): dropped here (their temp tars removed); a rerun redoes them."""
        for o in self.open.values():
            o.writer.abort()
        return [
            {"source": s, "stage": st, "shard": k, "seen": o.seen, "expected": o.expected}
            for (s, st, k), o in self.open.items()
        ]
