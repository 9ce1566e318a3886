"""Reader tests: index counts, rank x worker split, typed samples, latent sampling, checks, bad samples."""

from __future__ import annotations

import io
import json
import os
import tarfile
from collections import Counter

import numpy as np
import pytest
import torch

from shards.config import SourceSpec
from shards.format import decode_npy
from shards.loader import ShardLoader, ShardMismatchError, count_samples
from shards.reader import BadSample
from tests.shards.conftest import DOWN, IMAGE_TOKENS, SCALE, TEXT_DIM, make_config, write_shard, write_source


def _tar_members(path):
    """{key: {member: bytes}} read straight from a tar (the reference)."""
    out = {}
    with tarfile.open(path) as tar:
        for m in tar.getmembers():
            key, _, member = m.name.partition(".")
            out.setdefault(key, {})[member] = tar.extractfile(m).read()
    return out


def test_count_samples_from_indexes(two_sources):
    video_url, video_keys = two_sources["video"]
    counts = count_samples([video_url])
    assert len(counts) == 8 and set(counts.values()) == {6}
    assert sum(counts.values()) == len(video_keys)
    loader = ShardLoader(make_config({"webvid": (video_url, 1.0), "laion": (two_sources["image"][0], 1.0)}))
    assert loader.num_samples == {"webvid": 48, "laion": 56}
    assert loader.kinds == {"webvid": "video", "laion": "image"}


def test_rank_worker_split_covers_every_sample_once(two_sources):
    """2 ranks x 2 workers, bounded pass: every sample of both sources exactly once."""
    video_url, video_keys = two_sources["video"]
    image_url, image_keys = two_sources["image"]
    seen = Counter()
    for rank in range(2):
        cfg = make_config(
            {"webvid": (video_url, 1.0), "laion": (image_url, 2.0)}, num_workers=2, resampled=False
        )
        loader = ShardLoader(cfg, rank=rank, world_size=2)
        for batch in loader:
            seen.update(batch["keys"])
            assert batch["kind"] in ("video", "image")
            assert set(batch["sources"]) == ({"webvid"} if batch["kind"] == "video" else {"laion"})
    assert set(seen) == set(video_keys) | set(image_keys)
    assert set(seen.values()) == {1}


def test_batch_types_and_unsampled_latent_equals_scaled_mean(two_sources):
    video_url, _ = two_sources["video"]
    image_url, _ = two_sources["image"]
    cfg = make_config(
        {"webvid": (video_url, 1.0), "laion": (image_url, 1.0)},
        sample_latents=False,
        resampled=False,
        image_fps=7.5,
    )
    members = {}
    for name in os.listdir(two_sources["dir"]):
        if name.endswith(".tar"):
            members.update(_tar_members(os.path.join(two_sources["dir"], name)))
    batches = list(ShardLoader(cfg))
    assert {b["kind"] for b in batches} == {"video", "image"}
    for b in batches:
        n = len(b["keys"])
        t = 2 if b["kind"] == "video" else 1
        assert b["latent"].dtype == torch.float32 and tuple(b["latent"].shape) == (
            n,
            4,
            t,
            256 // DOWN,
            256 // DOWN,
        )
        assert tuple(b["text_tokens"].shape) == (n, 77, TEXT_DIM) and tuple(b["text_pooled"].shape) == (
            n,
            TEXT_DIM,
        )
        assert tuple(b["image_tokens"].shape) == (n, *IMAGE_TOKENS)
        assert b["fps"].dtype == torch.float32 and tuple(b["fps"].shape) == (n,)
        for i, key in enumerate(b["keys"]):
            raw = members[key]
            mean = decode_npy(raw["latent.npy"]).astype(np.float32)
            np.testing.assert_allclose(b["latent"][i].numpy(), SCALE * mean, rtol=1e-6)
            assert b["captions"][i] == raw["txt"].decode()
            want_fps = json.loads(raw["json"])["sample_fps"] if b["kind"] == "video" else 7.5
            assert b["fps"][i].item() == pytest.approx(want_fps)


def test_sampled_latent_is_seeded_and_uses_std(two_sources):
    video_url, _ = two_sources["video"]
    members = {}
    for name in os.listdir(two_sources["dir"]):
        if name.startswith("webvid") and name.endswith(".tar"):
            members.update(_tar_members(os.path.join(two_sources["dir"], name)))

    def first_batches(seed):
        loader = ShardLoader(make_config({"webvid": (video_url, 1.0)}, seed=seed, video_batch_size=8))
        return [b for _, b in zip(range(4), loader)]

    a, b, c = first_batches(1), first_batches(1), first_batches(2)
    assert all(torch.equal(x["latent"], y["latent"]) and x["keys"] == y["keys"] for x, y in zip(a, b))
    assert [x["keys"] for x in a] != [x["keys"] for x in c]
    eps = []
    for batch in a:
        for i, key in enumerate(batch["keys"]):
            mean = decode_npy(members[key]["latent.npy"]).astype(np.float32)
            std = decode_npy(members[key]["latent_std.npy"]).astype(np.float32)
            eps.append((batch["latent"][i].numpy() / SCALE - mean) / std)
    eps = np.concatenate([e.ravel() for e in eps])
    assert abs(eps.mean()) < 0.05 and abs(eps.std() - 1.0) < 0.05


def test_encoder_or_scale_mismatch_raises_naming_the_shard(tmp_path):
    url, _ = write_source(tmp_path, "webvid", 2, 3)
    write_shard(tmp_path, "webvid", 2, 3, vae_id="another-vae")
    with pytest.raises(ShardMismatchError, match=r"webvid-256x256-000002\.tar.*vae_id"):
        ShardLoader(make_config({"webvid": (f"{tmp_path}/*.tar", 1.0)}))
    with pytest.raises(ShardMismatchError, match=r"webvid-256x256-000000\.tar.*text_encoder_id"):
        ShardLoader(make_config({"webvid": (url, 1.0)}, expect_text_encoder_id="other-clip"))
    with pytest.raises(ShardMismatchError, match=r"scale_factor"):
        ShardLoader(make_config({"webvid": (url, 1.0)}, expect_scale_factor=0.13025))


def test_stage_shard_set_and_wrong_shape(tmp_path):
    write_source(tmp_path, "webvid", 1, 2, stage="512x320")
    url_stage, _ = write_source(tmp_path, "webvid", 1, 2, stage="256x256")
    # "{stage}" selects the shard set of the loader's stage
    loader = ShardLoader(
        make_config({"webvid": (f"{tmp_path}/webvid-{{stage}}-*.tar", 1.0)}, stage="512x320")
    )
    assert loader.num_samples == {"webvid": 2}
    batch = next(iter(loader))
    assert tuple(batch["latent"].shape[-2:]) == (320 // DOWN, 512 // DOWN)
    with pytest.raises(ShardMismatchError, match="512x320.*256x256"):
        ShardLoader(make_config({"webvid": (f"{tmp_path}/webvid-512x320-*.tar", 1.0)}, stage="256x256"))
    bad = tmp_path / "bad"
    write_shard(bad, "webvid", 0, 2, latent_hw=(4, 4))
    loader = ShardLoader(make_config({"webvid": (f"{bad}/*.tar", 1.0)}, on_bad_sample="skip"))
    with pytest.raises(ShardMismatchError, match=r"latent shape \[4, 2, 4, 4\] does not fit stage 256x256"):
        next(iter(loader))


def test_truncated_tar_and_bad_member_are_skipped_and_counted(tmp_path):
    _, keys = write_source(tmp_path, "webvid", 3, 6)
    write_shard(tmp_path, "webvid", 3, 6, bad_member_at=2)
    tar = tmp_path / "webvid-256x256-000001.tar"
    data = tar.read_bytes()
    tar.write_bytes(data[: len(data) // 2 + 100])  # cut inside the 4th sample
    cfg = make_config({"webvid": (f"{tmp_path}/*.tar", 1.0)}, on_bad_sample="skip", resampled=False)
    loader = ShardLoader(cfg)
    got = [k for b in loader for k in b["keys"]]
    by_reason = loader.stats["bad_samples_by_reason"]
    assert len(got) == len(set(got)) == 24 - 1 - by_reason["truncated"]
    assert by_reason["bad_npy"] == 1 and "webvid_003_0002" not in got
    assert 2 <= by_reason["truncated"] <= 4
    assert loader.stats["bad_samples"] == 24 - len(got)
    assert set(keys[:6]) <= set(got)  # shard 0 untouched
    with pytest.raises(BadSample):
        list(
            ShardLoader(
                make_config({"webvid": (f"{tmp_path}/*.tar", 1.0)}, on_bad_sample="raise", resampled=False)
            )
        )


def test_tar_without_index_is_not_read(tmp_path):
    write_source(tmp_path, "webvid", 2, 3)
    os.remove(tmp_path / "webvid-256x256-000001.index.parquet")
    loader = ShardLoader(make_config({"webvid": (f"{tmp_path}/*.tar", 1.0)}, resampled=False))
    assert loader.num_samples == {"webvid": 3}
    assert sorted(k for b in loader for k in b["keys"]) == [f"webvid_000_{i:04d}" for i in range(3)]


def test_unsafe_member_name_is_a_bad_sample(tmp_path):
    write_source(tmp_path, "webvid", 1, 3)
    tar = tmp_path / "webvid-256x256-000000.tar"
    buf = io.BytesIO()
    with tarfile.open(tar) as src, tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as dst:
        for m in src.getmembers():
            data = src.extractfile(m).read()
            if m.name.startswith("webvid_000_0001.txt"):
                m.name = "../evil.txt"
            dst.addfile(m, io.BytesIO(data))
    tar.write_bytes(buf.getvalue())
    loader = ShardLoader(make_config({"webvid": (str(tar), 1.0)}, on_bad_sample="skip", resampled=False))
    got = [k for b in loader for k in b["keys"]]
    assert "webvid_000_0000" in got and loader.stats["bad_samples"] >= 1
    assert loader.stats["bad_samples_by_reason"]["unsafe_member_name"] == 1


def test_config_errors_name_the_option(two_sources):
    url = two_sources["video"][0]
    with pytest.raises(ValueError, match="schedule"):
        make_config({"webvid": (url, 1.0)}, schedule="sometimes")
    with pytest.raises(ValueError, match="stage"):
        make_config({"webvid": (url, 1.0)}, stage="300x300")
    with pytest.raises(ValueError, match="SourceSpec.weight"):
        SourceSpec(name="webvid", urls=[url], weight=-1)


def test_fewer_shards_than_readers_splits_by_sample(tmp_path):
    """3 shards for 2 ranks x 2 workers: every sample still exactly once per pass, resampled works too."""
    url, keys = write_source(tmp_path, "jdb", 3, 5, kind="image")
    seen = Counter()
    for rank in range(2):
        cfg = make_config({"jdb": (url, 1.0)}, num_workers=2, resampled=False, image_batch_size=2)
        for batch in ShardLoader(cfg, rank=rank, world_size=2):
            seen.update(batch["keys"])
    assert set(seen) == set(keys) and set(seen.values()) == {1}
    cfg = make_config({"jdb": (url, 1.0)}, num_workers=2, image_batch_size=2)
    batches = [b for _, b in zip(range(20), ShardLoader(cfg, rank=1, world_size=2))]
    assert {b["kind"] for b in batches} == {"image"} and all(len(b["keys"]) == 2 for b in batches)


def test_fsspec_urls_and_globs(tmp_path):
    """Shards on another fsspec filesystem (memory://), addressed by brace pattern and by glob."""
    import fsspec

    _, keys = write_source(tmp_path, "webvid", 2, 3)
    fs = fsspec.filesystem("memory")
    for name in os.listdir(tmp_path):
        fs.pipe(f"/lc_test/{name}", (tmp_path / name).read_bytes())
    try:
        brace = "memory://lc_test/webvid-256x256-{000000..000001}.tar"
        assert sum(count_samples([brace]).values()) == 6
        for urls in (brace, "memory://lc_test/webvid-*.tar"):
            loader = ShardLoader(make_config({"webvid": (urls, 1.0)}, resampled=False))
            assert sorted(k for b in loader for k in b["keys"]) == sorted(keys)
    finally:
        fs.rm("/lc_test", recursive=True)


def test_index_without_offsets_streams_the_tar(tmp_path):
    """Indexes of other tools may lack byte offsets: the tar is streamed (webdataset) and resume still works."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    _, keys = write_source(tmp_path, "webvid", 2, 5)
    for index in tmp_path.glob("*.index.parquet"):
        table = pq.read_table(index)
        i = table.schema.get_field_index("offset")
        table = table.set_column(i, "offset", pa.nulls(table.num_rows, pa.int64()))
        pq.write_table(table, index)
    cfg = make_config({"webvid": (f"{tmp_path}/*.tar", 1.0)}, resampled=False, video_batch_size=2)
    batches = list(ShardLoader(cfg))
    assert sorted(k for b in batches for k in b["keys"]) == sorted(keys)
    part = ShardLoader(cfg)
    it = iter(part)
    [next(it) for _ in range(2)]
    again = ShardLoader(cfg)
    again.load_state_dict(part.state_dict())
    assert [b["keys"] for b in again] == [b["keys"] for b in batches[2:]]


def test_return_latent_std_for_device_side_sampling(two_sources):
    video_url, _ = two_sources["video"]
    members = {}
    for name in os.listdir(two_sources["dir"]):
        if name.startswith("webvid") and name.endswith(".tar"):
            members.update(_tar_members(os.path.join(two_sources["dir"], name)))
    with pytest.raises(ValueError, match="sample_latents=False"):
        make_config({"webvid": (video_url, 1.0)}, return_latent_std=True)
    cfg = make_config({"webvid": (video_url, 1.0)}, return_latent_std=True, sample_latents=False)
    batch = next(iter(ShardLoader(cfg)))
    assert batch["latent_std"].shape == batch["latent"].shape
    for i, key in enumerate(batch["keys"]):
        std = decode_npy(members[key]["latent_std.npy"]).astype(np.float32)
        mean = decode_npy(members[key]["latent.npy"]).astype(np.float32)
        np.testing.assert_allclose(batch["latent_std"][i].numpy(), SCALE * std, rtol=1e-6)
        np.testing.assert_allclose(batch["latent"][i].numpy(), SCALE * mean, rtol=1e-6)
