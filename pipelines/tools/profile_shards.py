"""The same synthetic clips and images encoded by the real encode and write stages under a storage profile (no Ray)."""

from __future__ import annotations

import numpy as np

from pipelines.stages.encode import EncodeRowsStage
from pipelines.stages.rows import new_row, rows_of, table_of
from pipelines.stages.write import ShardSink
from pipelines.tools.sample_media import caption, rng_for, video_frames

STAGE = "256x256"
SOURCES = (("webvid", "video"), ("laion_coco", "image"))  # (source, kind) of the shards written


def decoded_rows(source: str, kind: str, count: int, *, frames: int = 4, size: int = 256, seed: int = 0):
    """Job rows (pipelines.stages.rows) of seeded synthetic clips (kind video) or images of size x size, as
    the decode stage hands them to the encode stage."""
    rows = []
    video = kind == "video"
    for i in range(count):
        rng = rng_for(f"{source}-{i}", seed)
        n = frames if video else 1
        pixels = np.stack([f.copy() for f in video_frames(size, size, n, 8.0, rng)])
        key = f"{source}_{i:04d}"
        rows.append(
            new_row(
                key=key, source=source, origin_key=key, uri=f"/data/{key}", caption=caption(rng, 3, 12),
                kind=kind, stage=STAGE, shard=0, shard_rows=count, frames=pixels.tobytes(),
                frames_shape=list(pixels.shape), src_fps=24.0 if video else None,
                sample_fps=8.0 if video else None, frame_stride=3 if video else None,
                frame_indices=list(range(0, 3 * n, 3)), orig_width=size, orig_height=size,
                out_width=size, out_height=size,
            )
        )  # fmt: skip
    return rows


def encode_profile_shards(
    out_dir,
    model_dir,
    storage,
    *,
    videos: int = 4,
    images: int = 4,
    frames: int = 4,
    seed: int = 0,
    batch=None,
):
    """webvid (videos) and laion_coco (images) shards of STAGE in `out_dir`, encoded on CPU with the models
    in `model_dir` and stored as `storage` says; the same inputs for every profile and seed. `batch`: rows
    per encode-stage call (None: all of a source at once)."""
    stage = EncodeRowsStage({"model_dir": str(model_dir), "device": "cpu"}, {}, storage)
    counts = {"video": videos, "image": images}
    for source, kind in SOURCES:
        if not counts[kind]:
            continue
        rows = decoded_rows(source, kind, counts[kind], frames=frames, seed=seed)
        step = batch or len(rows)
        sink = ShardSink(str(out_dir), source, STAGE, 0, expected=len(rows), embeddings=False)
        for start in range(0, len(rows), step):
            sink.add(rows_of(stage(table_of(rows[start : start + step]))))
        summary = sink.close()
        if summary["samples"] != len(rows):
            raise RuntimeError(f"{out_dir}/{source}: wrote {summary['samples']} of {len(rows)} samples")
    return out_dir
