"""Fixtures for the reader tests: small latent shards written with shards.format.ShardWriter from random arrays."""

from __future__ import annotations

import os

import numpy as np
import pytest

from shards.config import LoaderConfig, SourceSpec
from shards.format import ShardWriter, parse_resolution, shard_stem

VAE_ID, TEXT_ID, SCALE = "tiny-vae", "tiny-clip", 0.18215
TEXT_DIM, IMAGE_TOKENS = 8, (5, 6)
DOWN = 32  # vae_downsample used by the fixtures, so 256x256 latents are 8x8 (small and fast)


def write_shard(
    out_dir,
    source,
    shard,
    n,
    *,
    kind="video",
    stage="256x256",
    frames=2,
    seed=0,
    image_tokens=True,
    latent_hw=None,
    bad_member_at=None,
    text_dim=TEXT_DIM,
    std=(0.1, 1.0),
    key_prefix=None,
    rng=None,
    **meta,
):
    """One finished shard of `n` random samples; returns the list of keys. `meta` overrides json fields
    (width/height: an aspect bucket's size, also in the index and, without latent_hw, the latent's);
    latent std is `std[0] + std[1] * uniform`; keys are `{key_prefix or source}_{shard:03d}_{i:04d}`."""
    rng = rng or np.random.default_rng([seed, shard, len(source)])
    width, height = parse_resolution(stage)
    width, height = meta.get("width", width), meta.get("height", height)  # a bucket's size (in the index too)
    hw = latent_hw or (height // DOWN, width // DOWN)
    shape = [4, frames if kind == "video" else 1, *hw]
    os.makedirs(out_dir, exist_ok=True)
    writer = ShardWriter(str(out_dir), shard_stem(source, stage, shard))
    keys = []
    for i in range(n):
        key = f"{key_prefix or source}_{shard:03d}_{i:04d}"
        js = dict(
            key=key,
            source=source,
            origin_key=key,
            kind=kind,
            caption=f"caption {key}",
            sample_fps=4.0 + i % 3,
            width=width,
            height=height,
            stage=stage,
            scale_factor=SCALE,
            vae_id=VAE_ID,
            text_encoder_id=TEXT_ID,
        )
        js.update(meta)
        members = {
            "latent.npy": rng.standard_normal(shape).astype(np.float16),
            "latent_std.npy": (std[0] + std[1] * rng.random(shape)).astype(np.float16),
            "txt": js["caption"],
            "text_tokens.npy": rng.standard_normal((77, text_dim)).astype(np.float16),
            "text_pooled.npy": rng.standard_normal(text_dim).astype(np.float16),
            "json": js,
        }
        if image_tokens:
            members["image_tokens.npy"] = rng.standard_normal(IMAGE_TOKENS).astype(np.float16)
        if i == bad_member_at:
            members["latent.npy"] = b"this is not an npy file"
        row = dict(
            source=source,
            origin_key=key,
            kind=kind,
            stage=js["stage"],
            width=width,
            height=height,
            latent_shape=shape,
            num_frames=shape[1],
            sample_fps=js["sample_fps"],
            scale_factor=js["scale_factor"],
            vae_id=js["vae_id"],
            text_encoder_id=js["text_encoder_id"],
        )
        writer.write(key, members, row)
        keys.append(key)
    writer.close()
    return keys


def write_source(out_dir, source, num_shards, per_shard, **kw):
    """`num_shards` shards of `per_shard` samples; returns (brace URL pattern, all keys)."""
    keys = []
    for s in range(num_shards):
        keys += write_shard(out_dir, source, s, per_shard, **kw)
    stage = kw.get("stage", "256x256")
    return f"{out_dir}/{source}-{stage}-{{000000..{num_shards - 1:06d}}}.tar", keys


def make_config(sources, **kw) -> LoaderConfig:
    """A small LoaderConfig for the fixtures (sources: {name: (urls, weight)})."""
    kw.setdefault("stage", "256x256")
    kw.setdefault("video_batch_size", 3)
    kw.setdefault("image_batch_size", 5)
    kw.setdefault("shuffle_buffer", 8)
    kw.setdefault("vae_downsample", DOWN)
    kw.setdefault("on_bad_sample", "raise")
    specs = [
        SourceSpec(name=n, urls=[u] if isinstance(u, str) else u, weight=w) for n, (u, w) in sources.items()
    ]
    return LoaderConfig(sources=specs, **kw)


@pytest.fixture(scope="module")
def two_sources(tmp_path_factory):
    """A video source (8 shards x 6) and an image source (8 shards x 7) at 256x256."""
    out = tmp_path_factory.mktemp("shards")
    video_url, video_keys = write_source(out, "webvid", 8, 6, kind="video")
    image_url, image_keys = write_source(out, "laion", 8, 7, kind="image")
    return {"dir": out, "video": (video_url, video_keys), "image": (image_url, image_keys)}
