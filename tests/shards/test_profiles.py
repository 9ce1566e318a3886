"""Storage profiles: parsing, codecs, sizes from shapes, and the same inputs written and read under each profile."""

from __future__ import annotations

import io
import tarfile

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from encoders.models import FrozenEncoders, ModelsConfig, write_tiny_models
from shards.loader import LoaderConfig, ShardLoader, ShardMismatchError, SourceSpec
from shards.profiles import (
    PROFILES,
    StorageProfile,
    bytes_from_shapes,
    decode_cond_frame,
    dequantize_logstd,
    encode_cond_frame,
    quantize_logstd,
)
from tests.shards.profile_fixtures import STAGE, encode_profile_shards


def test_profiles_parse_from_names_text_and_mappings():
    assert StorageProfile.parse("lean") == StorageProfile(latent="mean", image="frame", text="caption")
    assert StorageProfile.parse(str(PROFILES["compact"])).name == "compact"
    assert StorageProfile.parse({"text": "caption"}) == StorageProfile(text="caption")
    assert StorageProfile.parse(None).name == "full"  # indexes from before profiles
    with pytest.raises(ValueError, match="storage.latent='std8'"):
        StorageProfile.parse("latent=std8,image=tokens,text=tokens")
    with pytest.raises(ValueError, match="name a profile"):
        StorageProfile.parse("tiny")
    assert PROFILES["lean"].members(image=True) == ("image_pooled.npy", "cond_frame.jpg")
    assert "latent_std.npy" in PROFILES["full"].members(image=False)


def test_logstd8_comes_back_within_half_a_step():
    rng = np.random.default_rng(0)
    std = np.exp(rng.uniform(-23 / 2, -13 / 2, (4, 3, 5, 6))).astype(np.float16)  # SD VAE's range of logvar
    q, offset, step = quantize_logstd(std)
    assert q.dtype == np.uint8 and q.min() == 0 and q.max() == 255
    back = dequantize_logstd(q, offset, step)
    rel = np.abs(back / std.astype(np.float32) - 1)
    assert rel.max() <= np.exp(step / 2) - 1 + 1e-6 and rel.max() < 0.02
    q, offset, step = quantize_logstd(np.full((2, 2), 0.25, np.float16))  # a constant std: exact
    assert np.allclose(dequantize_logstd(q, offset, step), 0.25)
    with pytest.raises(ValueError, match="logstd_step"):
        dequantize_logstd(q, 0.0, 0.0)


def test_cond_frame_codec_and_hostile_frames():
    rng = np.random.default_rng(1)
    x = np.linspace(0, 255, 64).astype(np.uint8)
    frame = np.stack([np.add.outer(x, x) // 2, np.tile(x, (64, 1)), rng.integers(100, 110, (64, 64))], -1)
    back = decode_cond_frame(encode_cond_frame(frame.astype(np.uint8)))
    assert back.shape == (64, 64, 3) and np.abs(back.astype(int) - frame).mean() < 2.0
    for bad, why in (
        (b"not a jpeg", "cannot identify"),
        (_jpeg((64, 32)), "square RGB JPEG"),
        (_jpeg((2048, 2048)), "side <= 1024"),
        (_jpeg((16, 16), mode="L"), "square RGB JPEG"),
    ):
        with pytest.raises(Exception, match=why):
            decode_cond_frame(bad)
    with pytest.raises(ValueError, match="uint8"):
        encode_cond_frame(np.zeros((8, 9, 3), np.uint8))


def _jpeg(size, mode="RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size).save(buf, format="JPEG")
    return buf.getvalue()


def test_lean_is_under_half_a_megabyte_at_real_sizes():
    sizes = {name: bytes_from_shapes(p)["total"] for name, p in PROFILES.items()}
    assert 1.4e6 < sizes["full"] < 1.5e6  # the 1.48 MB for a 512x320x16 sample with image tokens
    assert sizes["compact"] < sizes["full"] - 150_000
    assert sizes["lean"] <= 500_000  # even with the JPEG bounded by its raw pixels


# ---------------------------------------------------------------- written and read


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    """{profile name: shard folder} of the same inputs, plus the tiny model folder under "models"."""
    root = tmp_path_factory.mktemp("profiles")
    models = write_tiny_models(str(root / "models"), seed=0)
    out = {name: encode_profile_shards(root / name, models, name) for name in PROFILES}
    out["models"] = models
    return out


def _loader(folder, *, seed=0, **kw) -> ShardLoader:
    sources = [SourceSpec(name="webvid", urls=[f"{folder}/webvid-{{stage}}-*.tar"])]
    if "extra" in kw:
        sources.append(SourceSpec(name="laion_coco", urls=[f"{kw.pop('extra')}/laion_coco-{{stage}}-*.tar"]))
    config = LoaderConfig(
        sources=sources, stage=STAGE, video_batch_size=4, image_batch_size=4, shuffle_buffer=1,
        shard_shuffle=False, resampled=False, seed=seed, on_bad_sample="raise", **kw,
    )  # fmt: skip
    return ShardLoader(config)


def _first(folder, **kw) -> dict:
    return next(iter(_loader(folder, **kw)))


def test_each_profile_stores_its_members_and_records_itself(written):
    for name, profile in PROFILES.items():
        tar = f"{written[name]}/webvid-{STAGE}-000000.tar"
        with tarfile.open(tar) as t:
            members = {m.name.partition(".")[2] for m in t.getmembers()}
        want = {"latent.npy", "txt", "json", "text_pooled.npy", *profile.members(image=True)}
        assert members == want, name
        index = pq.read_table(tar.replace(".tar", ".index.parquet")).to_pylist()
        assert {r["storage_profile"] for r in index} == {str(profile)}
        assert all((r["logstd_step"] is not None) == (profile.latent == "mean+logstd8") for r in index)
        assert all((r["bytes_image_frame"] > 0) == (profile.image == "frame") for r in index)
    full, lean = (
        pq.read_table(f"{written[n]}/webvid-{STAGE}-000000.index.parquet") for n in ("full", "lean")
    )
    assert sum(lean.column("bytes_total").to_pylist()) < 0.55 * sum(full.column("bytes_total").to_pylist())


def test_compact_std_and_lean_mean_match_full(written):
    full = _first(written["full"], sample_latents=False, return_latent_std=True)
    compact = _first(written["compact"], sample_latents=False, return_latent_std=True)
    assert full["keys"] == compact["keys"]
    assert torch.equal(full["latent"], compact["latent"])  # the mean is the same fp16 array
    rel = (compact["latent_std"] / full["latent_std"] - 1).abs().max()
    assert 0 < rel < 0.01
    # lean stores no std: the latent is the mean whatever the seed, with sampling on
    lean = [_first(written["lean"], seed=s)["latent"] for s in (0, 1)]
    assert torch.equal(lean[0], lean[1]) and torch.equal(lean[0], full["latent"])
    sampled = [_first(written["full"], seed=s)["latent"] for s in (0, 1)]
    assert not torch.equal(sampled[0], sampled[1])


def test_lean_batches_carry_captions_and_frames_whose_tokens_match_full(written):
    full, lean = _first(written["full"]), _first(written["lean"])
    assert "text_tokens" not in lean and lean["text_tokens_list"] == [None] * 4
    assert lean["captions"] == full["captions"]
    frames = lean["image_cond_list"]
    assert all(f.dtype == torch.uint8 and f.shape == (32, 32, 3) for f in frames)  # the tiny encoder's 32 px
    enc = FrozenEncoders(ModelsConfig(model_dir=written["models"], device="cpu", vae=False))
    assert enc.vae is None
    text = torch.from_numpy(enc.encode_text(lean["captions"])["tokens"]).float()
    assert torch.equal(text, full["text_tokens"])  # the same encoder and caption: the stored fp16 tokens
    tokens = torch.from_numpy(enc.encode_images(np.stack([f.numpy() for f in frames]))["tokens"]).float()
    scale = full["image_tokens"].abs().mean()
    assert (tokens - full["image_tokens"]).abs().mean() < 0.1 * scale  # 8-bit pixels and JPEG, nothing more


def test_mixed_profiles_are_refused_or_read_per_shard(written):
    with pytest.raises(
        ShardMismatchError, match=r"mix storage profiles .*full: 1 shard.*lean: 1 shard.*mixed_profiles"
    ):
        _loader(written["full"], extra=written["lean"])
    loader = _loader(written["full"], extra=written["lean"], mixed_profiles=True)
    assert loader.needs_encoders() == {"text": True, "image": True}
    batches = {b["kind"]: b for b in _take(loader, 2)}
    assert "text_tokens" in batches["video"] and "text_tokens_list" in batches["image"]


def _take(loader, n):
    it = iter(loader)
    return [next(it) for _ in range(n)]
