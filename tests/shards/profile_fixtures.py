"""The same clips and images encoded by the real encode and write stages under each storage profile (no Ray)."""

from __future__ import annotations

import numpy as np

from pipelines.stages.encode import EncodeRowsStage
from pipelines.stages.rows import new_row, rows_of, table_of
from pipelines.stages.write import ShardSink
from pipelines.tools.sample_media import caption, rng_for, video_frames

STAGE = "256x256"
FRAMES = 4


def _rows(source: str, kind: str, count: int, seed: int) -> list[dict]:
    rows = []
    for i in range(count):
        rng = rng_for(f"{source}-{i}", seed)
        n = FRAMES if kind == "video" else 1
        frames = np.stack([f.copy() for f in video_frames(256, 256, n, 8.0, rng)])
        key = f"{source}_{i:04d}"
        rows.append(
            new_row(
                key=key, source=source, origin_key=key, uri=f"/data/{key}", caption=caption(rng, 3, 12),
                kind=kind, stage=STAGE, shard=0, shard_rows=count, frames=frames.tobytes(),
                frames_shape=list(frames.shape), src_fps=24.0 if kind == "video" else None,
                sample_fps=8.0 if kind == "video" else None, frame_stride=3 if kind == "video" else None,
                frame_indices=list(range(0, 3 * n, 3)), orig_width=256, orig_height=256,
                out_width=256, out_height=256,
            )
        )  # fmt: skip
    return rows


def encode_profile_shards(out_dir, model_dir, storage, *, videos: int = 4, images: int = 4, seed: int = 0):
    """webvid (videos) and laion_coco (images) shards of STAGE in `out_dir`, encoded with the tiny models in
    `model_dir` and stored as `storage` says; the same inputs for every profile and seed."""
    stage = EncodeRowsStage({"model_dir": str(model_dir), "device": "cpu"}, {}, storage)
    for source, kind, count in (("webvid", "video", videos), ("laion_coco", "image", images)):
        if not count:
            continue
        sink = ShardSink(str(out_dir), source, STAGE, 0, expected=count, embeddings=False)
        sink.add(rows_of(stage(table_of(_rows(source, kind, count, seed)))))
        summary = sink.close()
        assert summary["samples"] == count, summary
    return out_dir
