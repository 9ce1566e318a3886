"""A tiny shard dataset written with ShardWriter, and the exact figures `latentcrafter stats` must find in it."""

from __future__ import annotations

import os
import zlib

import numpy as np

from schemas import error_row
from shards.format import ShardWriter, shard_stem

# (source, stage, shard): (kind, durations of the samples' sources, error rows as (stage, reason))
SHARDS = {
    ("webvid", "256x256", 0): (
        "video",
        [10.0, 20.0, 30.0],
        [("fetch", "http_404"), ("fetch", "http_404"), ("decode", "too_short")],
    ),
    ("webvid", "256x256", 1): (
        "video",
        [12.0, 48.0],
        [("dedup", "duplicate_of:webvid_0_0"), ("filter", "min_duration")],
    ),
    ("webvid", "512x320", 0): ("video", [60.0], []),
    ("laion_coco", "256x256", 0): ("image", [None] * 4, [("filter", "punsafe")]),
    ("jdb", "256x256", 0): ("image", [None] * 2, [("fetch", "timeout")]),
}
CLIP_SECONDS = 2.0  # every video sample spans 2 s (T=4 frames at 2 fps)
LATENT_CHANNELS, TEXT_DIM, IMAGE_TOKENS = 4, 8, (257, 16)


def _arrays(rng, kind: str, stage: str):
    w, h = (int(x) // 64 for x in stage.split("x"))
    t = 4 if kind == "video" else 1
    members = {
        "latent.npy": rng.standard_normal((LATENT_CHANNELS, t, h, w)).astype(np.float16),
        "latent_std.npy": np.full((LATENT_CHANNELS, t, h, w), 0.1, np.float16),
        "text_tokens.npy": rng.standard_normal((77, TEXT_DIM)).astype(np.float16),
        "text_pooled.npy": rng.standard_normal(TEXT_DIM).astype(np.float16),
    }
    if kind == "image":
        members["image_tokens.npy"] = rng.standard_normal(IMAGE_TOKENS).astype(np.float16)
        members["image_pooled.npy"] = rng.standard_normal(IMAGE_TOKENS[1]).astype(np.float16)
    return members


def _row(source, stage, kind, i, duration, arrays) -> dict:
    w, h = (int(x) for x in stage.split("x"))
    caption = " ".join(["word"] * (3 + i))
    video = kind == "video"
    return dict(
        source=source,
        origin_key=f"{source}{i}",
        kind=kind,
        stage=stage,
        width=w,
        height=h,
        latent_shape=list(arrays["latent.npy"].shape),
        latent_dtype="float16",
        text_tokens_shape=list(arrays["text_tokens.npy"].shape),
        image_tokens_shape=list(IMAGE_TOKENS) if not video else None,
        num_frames=arrays["latent.npy"].shape[1],
        fps=25.0 if video else None,
        sample_fps=2.0 if video else None,
        frame_stride=12 if video else None,
        duration=duration,
        clip_duration=CLIP_SECONDS if video else None,
        orig_width=1280 if video else 640,
        orig_height=720 if video else 480,
        caption_words=3 + i,
        caption_tokens=5 + i,
        similarity=0.3 if source == "laion_coco" else None,
        punsafe=0.01 if source == "laion_coco" else None,
        pwatermark=0.1 if source == "laion_coco" else None,
        aesthetic=5.5 if source == "laion_coco" else None,
        scale_factor=0.18215,
        vae_id="tiny-vae",
        text_encoder_id="tiny-clip",
        image_encoder_id="tiny-vit" if not video else None,
    ), caption


def build_dataset(root: str, *, extras: bool = True) -> dict:
    """Write the shards of SHARDS under `root`; return the figures stats must report.

    With `extras`, also a tar without index (a crashed shard) and an index without its tar.
    """
    os.makedirs(root, exist_ok=True)
    expected = {"samples": {}, "errors": {}, "shards": 0, "videos": 0, "images": 0, "keys": {}}
    source_seconds = 0.0
    for (source, stage, shard), (kind, durations, errors) in SHARDS.items():
        rng = np.random.default_rng(zlib.crc32(f"{source}-{stage}-{shard}".encode()))
        writer = ShardWriter(root, shard_stem(source, stage, shard))
        for i, duration in enumerate(durations):
            arrays = _arrays(rng, kind, stage)
            key = f"{source}_{shard}_{i}"
            row, caption = _row(source, stage, kind, i, duration, arrays)
            members = dict(arrays, txt=caption, json={"key": key, "source": source, "kind": kind})
            writer.write(key, members, row)
            expected["keys"].setdefault((source, stage), []).append(key)
        writer.add_errors(
            [
                error_row(
                    key=f"{source}_{shard}_e{j}", source=source, stage=st, reason=r, detail=f"{r} detail"
                )
                for j, (st, r) in enumerate(errors)
            ]
        )
        writer.close()
        expected["shards"] += 1
        expected["samples"][(source, stage)] = expected["samples"].get((source, stage), 0) + len(durations)
        expected["videos" if kind == "video" else "images"] += len(durations)
        source_seconds += sum(d or 0 for d in durations)
        for st, r in errors:
            k = (st, r.split(":")[0])
            expected["errors"][k] = expected["errors"].get(k, 0) + 1
    expected["shards_indexed"] = expected["shards"]
    expected["clip_hours"] = expected["videos"] * CLIP_SECONDS / 3600
    expected["source_hours"] = source_seconds / 3600
    if extras:
        # a crashed shard: tar written, no index yet; and an index whose tar was lost
        with open(os.path.join(root, shard_stem("webvid", "256x256", 2) + ".tar"), "wb") as f:
            f.write(b"\0" * 1024)
        lost = ShardWriter(root, shard_stem("jdb", "256x256", 1))
        arrays = _arrays(np.random.default_rng(1), "image", "256x256")
        row, caption = _row("jdb", "256x256", "image", 0, None, arrays)
        lost.write("jdb_1_0", dict(arrays, txt=caption, json={"key": "jdb_1_0"}), row)
        lost.close()
        os.remove(lost.paths.tar)
        expected["samples"][("jdb", "256x256")] += 1  # the index without tar still counts in fast mode
        expected["images"] += 1
        expected["shards"] += 2
        expected["shards_indexed"] += 1
        expected["no_index"] = [shard_stem("webvid", "256x256", 2) + ".tar"]
        expected["no_tar"] = [shard_stem("jdb", "256x256", 1) + ".index.parquet"]
    return expected
