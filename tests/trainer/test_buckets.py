"""Aspect buckets end to end: shards with three buckets per kind train for a few DeepSpeed steps on 2 ranks
(ZeRO-2, fp32, gradient accumulation over micro batches of different shapes); the preview is written at the
stage's own size. Resume with open partial batches is checked on the loader (tests/shards/test_buckets.py)."""

from __future__ import annotations

import numpy as np
import pytest

from shards.format import parse_resolution
from tests.shards.conftest import write_shard
from tests.trainer.conftest import (
    DOWN,
    FRAMES,
    TEXT_DIM,
    launch,
    read_metrics,
    run_config,
    tail,
    write_config,
)

STAGE = "512x320"
BUCKETS = ("512x320", "320x512", "384x384")  # shards.buckets.default_buckets(STAGE)
STEPS = 4


def write_bucketed(out, source, kind):
    """Two shards of 4 samples per bucket; keys `{source}_{W}_{H}_...` name their bucket."""
    shard = 0
    for tag in BUCKETS:
        w, h = parse_resolution(tag)
        for _ in range(2):
            write_shard(
                out,
                source,
                shard,
                4,
                kind=kind,
                stage=STAGE,
                frames=FRAMES,
                image_tokens=False,
                latent_hw=(h // DOWN, w // DOWN),
                text_dim=TEXT_DIM,
                std=(0.05, 0.1),
                key_prefix=f"{source}_{w}_{h}",
                rng=np.random.default_rng([shard, len(source), w]),
                width=w,
                height=h,
                sample_fps=8.0,
                scale_factor=0.18215,
                vae_id="tiny-vae",
                text_encoder_id="tiny-text",
            )
            shard += 1


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_models):
    shards = tmp_path_factory.mktemp("bucket_shards")
    write_bucketed(shards, "webvid", "video")
    write_bucketed(shards, "laion_coco", "image")
    out = tmp_path_factory.mktemp("bucket_train") / "out"
    config = run_config(shards, tiny_models, out, every_ckpt=0)
    phase = config["phases"][1]  # vc1-512: webvid + laion_coco at 512x320
    phase.update(steps=STEPS, global_batch_size=4, grad_accum=2)  # video_batch_size 1 x 2 micro x 2 ranks
    phase["data"].update(bucketing=True, shuffle_buffer=8)
    config["phases"] = [phase]
    config["preview"].update(resolution=None, num_frames=2)  # at the stage's own size
    path = write_config(out.parent / "run.yaml", config)
    first = launch(path)
    assert first.returncode == 0, tail(first)
    return {"out": out, "first": read_metrics(out)}


def micro_batches(record) -> list[list[str]]:
    """Split a step's keys into its micro batches (bucket batch sizes: video 1, image 2 in every bucket)."""
    keys, out = list(record["keys"]), []
    for kind in record["kinds"]:
        n = 1 if kind == "video" else 2
        out.append(keys[:n])
        keys = keys[n:]
    assert not keys
    return out


def bucket_of(key: str) -> str:
    w, h = key.split("_")[-4:-2]
    return f"{w}x{h}"


def test_bucketed_training_one_shape_per_micro_batch(runs):
    records = [r for r in runs["first"] if "keys" in r]
    assert [r["global_step"] for r in records] == list(range(1, STEPS + 1))
    buckets = set()
    for r in records:
        assert np.isfinite(r["loss"])
        for batch in micro_batches(r):
            assert len({bucket_of(k) for k in batch}) == 1, batch
            buckets.add(bucket_of(batch[0]))
    assert len(buckets) >= 2  # several shapes within the run (and within accumulated steps)
    assert [p for p in runs["out"].rglob("step00000004-vc1-512-*") if p.suffix in (".gif", ".mp4")]  # preview
