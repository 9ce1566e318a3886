"""Resume tests: consume K batches, save, rebuild, load; the next 8 batches equal an uninterrupted run's."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from shards.loader import ShardLoader
from shards.resume import shuffle_order
from tests.shards.conftest import make_config, write_shard, write_source


def _take(iterator, n):
    return [next(iterator) for _ in range(n)]


def _same(a, b):
    assert [x["kind"] for x in a] == [y["kind"] for y in b]
    assert [x["keys"] for x in a] == [y["keys"] for y in b]
    for x, y in zip(a, b):
        assert torch.equal(x["latent"], y["latent"]) and torch.equal(x["fps"], y["fps"])


def test_shuffle_order_is_a_bounded_permutation():
    order = shuffle_order(500, 16, seed=[1, 2])
    assert sorted(order.tolist()) == list(range(500))
    assert all(order[t] < t + 16 for t in range(500))
    assert order.tolist() != list(range(500))
    assert np.array_equal(order, shuffle_order(500, 16, seed=[1, 2]))
    assert shuffle_order(5, 1, seed=0).tolist() == [0, 1, 2, 3, 4]


@pytest.mark.parametrize(
    "k, workers, rank, world",
    [(0, 0, 0, 1), (5, 0, 0, 1), (23, 0, 0, 1), (7, 2, 1, 2), (10, 2, 0, 2)],
)
def test_resume_next_8_batches_equal_reference(two_sources, k, workers, rank, world):
    """K=23 crosses epoch boundaries (the video slot holds 48 samples / 3 per batch, half of the batches)."""
    cfg = make_config(
        {"webvid": (two_sources["video"][0], 1.0), "laion": (two_sources["image"][0], 1.0)},
        num_workers=workers,
        seed=11,
        schedule="probability",
        image_per_video=1.0,
    )
    reference = ShardLoader(cfg, rank=rank, world_size=world)
    ref_iter = iter(reference)
    _take(ref_iter, k)
    expected = _take(ref_iter, 8)

    first = ShardLoader(cfg, rank=rank, world_size=world)
    it = iter(first)
    _take(it, k)
    state = json.loads(json.dumps(first.state_dict()))  # plain data: survives JSON / torch.save
    del it, first

    restored = ShardLoader(cfg, rank=rank, world_size=world)
    restored.load_state_dict(state)
    got = _take(iter(restored), 8)
    _same(got, expected)
    assert restored.stats["batches"] == k + 8


def test_resume_with_bad_samples_and_bounded_pass(tmp_path):
    write_source(tmp_path, "webvid", 3, 7)
    write_shard(tmp_path, "webvid", 3, 7, bad_member_at=3)
    url = f"{tmp_path}/*.tar"
    cfg = make_config({"webvid": (url, 1.0)}, on_bad_sample="skip", shuffle_buffer=5, video_batch_size=2)
    reference = _take(iter(ShardLoader(cfg)), 30)
    first = ShardLoader(cfg)
    _take(iter(first), 12)
    restored = ShardLoader(cfg)
    restored.load_state_dict(first.state_dict())
    _same(_take(iter(restored), 18), reference[12:])
    assert restored.stats["bad_samples"] >= 1  # 28 samples per epoch, 60 drawn: the bad one was met

    bounded = make_config({"webvid": (url, 1.0)}, on_bad_sample="skip", resampled=False, video_batch_size=2)
    full = list(ShardLoader(bounded))
    part = ShardLoader(bounded)
    _take(iter(part), 4)
    again = ShardLoader(bounded)
    again.load_state_dict(part.state_dict())
    _same(list(again), full[4:])


def test_load_state_with_other_config_is_refused(two_sources):
    url = two_sources["video"][0]
    loader = ShardLoader(make_config({"webvid": (url, 1.0)}, seed=1))
    _take(iter(loader), 2)
    state = loader.state_dict()
    other = ShardLoader(make_config({"webvid": (url, 1.0)}, seed=2))
    with pytest.raises(ValueError, match=r"seed \(saved 1, now 2\)"):
        other.load_state_dict(state)
    with pytest.raises(ValueError, match="world_size"):
        ShardLoader(make_config({"webvid": (url, 1.0)}, seed=1), rank=0, world_size=2).load_state_dict(state)


def test_resume_when_split_by_sample(tmp_path):
    """2 shards for 2 ranks x 2 workers (sample split) with a bad member: resume is still exact."""
    write_source(tmp_path, "jdb", 1, 9, kind="image")
    write_shard(tmp_path, "jdb", 1, 9, kind="image", bad_member_at=4)
    cfg = make_config(
        {"jdb": (f"{tmp_path}/*.tar", 1.0)}, num_workers=2, on_bad_sample="skip", image_batch_size=2
    )
    reference = _take(iter(ShardLoader(cfg, rank=1, world_size=2)), 14)
    first = ShardLoader(cfg, rank=1, world_size=2)
    _take(iter(first), 5)
    restored = ShardLoader(cfg, rank=1, world_size=2)
    restored.load_state_dict(first.state_dict())
    _same(_take(iter(restored), 9), reference[5:])
