"""Mixing tests: weighted source ratios, exact interleave schedule, per-kind batch sizes, image-only runs."""

from __future__ import annotations

from collections import Counter

import pytest

from shards.loader import ShardLoader
from shards.mixing import KindSchedule
from tests.shards.conftest import make_config, write_source


@pytest.mark.parametrize(
    "ratio, pattern",
    [(1.0, "VIVIVIVI"), (2.0, "VIIVIIVII"), (0.5, "VVIVVIVVI"), (0.0, "VVVV"), (3.0, "VIIIVIII")],
)
def test_ratio_schedule_is_exact(ratio, pattern):
    schedule = KindSchedule("ratio", ratio, seed=0, kinds={"video", "image"})
    assert "".join(schedule(b)[0].upper() for b in range(len(pattern))) == pattern


def test_probability_schedule_is_seeded_and_holds_its_rate():
    a = KindSchedule("probability", 1.0 / 3.0, seed=5, kinds={"video", "image"})
    b = KindSchedule("probability", 1.0 / 3.0, seed=5, kinds={"video", "image"})
    c = KindSchedule("probability", 1.0 / 3.0, seed=6, kinds={"video", "image"})
    kinds = [a(i) for i in range(20000)]
    assert kinds == [b(i) for i in range(20000)] and kinds != [c(i) for i in range(20000)]
    assert abs(kinds.count("image") / len(kinds) - 0.25) < 0.01
    assert a(12345) == kinds[12345]  # addressable: no replay needed


def test_single_kind_runs_only_that_kind():
    assert {KindSchedule("ratio", 1.0, 0, {"image"})(b) for b in range(10)} == {"image"}
    assert {KindSchedule("probability", 5.0, 0, {"video"})(b) for b in range(10)} == {"video"}


def test_loader_interleaves_with_per_kind_batch_sizes(two_sources):
    cfg = make_config(
        {"webvid": (two_sources["video"][0], 1.0), "laion": (two_sources["image"][0], 1.0)},
        image_per_video=2.0,
        video_batch_size=2,
        image_batch_size=6,
    )
    batches = [b for _, b in zip(range(12), ShardLoader(cfg))]
    assert "".join(b["kind"][0].upper() for b in batches) == "VIIVIIVIIVII"
    for b in batches:
        assert len(b["keys"]) == (2 if b["kind"] == "video" else 6)
        assert b["latent"].shape[2] == (2 if b["kind"] == "video" else 1)


def test_image_only_run_yields_image_batches(two_sources):
    loader = ShardLoader(make_config({"laion": (two_sources["image"][0], 1.0)}, image_per_video=1.0))
    assert {b["kind"] for _, b in zip(range(6), loader)} == {"image"}


def test_mixing_ratios_hold_over_many_samples(tmp_path):
    """Two video sources weighted 3:1 and two image sources 1:1 (+ one disabled) over ~1500 samples."""
    urls = {}
    for name, kind in (
        ("webvid", "video"),
        ("hdvila", "video"),
        ("laion", "image"),
        ("coco", "image"),
        ("jdb", "image"),
    ):
        urls[name], _ = write_source(tmp_path, name, 4, 10, kind=kind, frames=1, image_tokens=False)
    weights = {"webvid": 3.0, "hdvila": 1.0, "laion": 1.0, "coco": 1.0, "jdb": 0.0}
    cfg = make_config(
        {n: (urls[n], w) for n, w in weights.items()},
        video_batch_size=16,
        image_batch_size=16,
        sample_latents=False,
    )
    counts = Counter()
    for _, batch in zip(range(100), ShardLoader(cfg)):
        counts.update(batch["sources"])
        assert "image_tokens" not in batch
    assert counts["jdb"] == 0
    video = counts["webvid"] + counts["hdvila"]
    image = counts["laion"] + counts["coco"]
    assert video == image == 800
    assert abs(counts["webvid"] / video - 0.75) < 0.04
    assert abs(counts["laion"] / image - 0.5) < 0.04


def test_source_stream_depends_on_its_name_not_its_position(two_sources):
    """Each source has its own generator derived from its name: adding a source leaves its order intact."""
    video_url, image_url = two_sources["video"][0], two_sources["image"][0]
    alone = ShardLoader(make_config({"webvid": (video_url, 1.0)}, seed=3))
    mixed = ShardLoader(make_config({"laion": (image_url, 1.0), "webvid": (video_url, 1.0)}, seed=3))
    a = [k for _, b in zip(range(6), alone) for k in b["keys"]]
    b = [k for _, b in zip(range(12), mixed) if b["kind"] == "video" for k in b["keys"]]
    assert a == b


def test_every_rank_gets_the_same_kind_at_each_step(two_sources):
    """The schedule is per step, not per rank: data-parallel ranks run the same (video or image) graph."""
    cfg = make_config(
        {"webvid": (two_sources["video"][0], 1.0), "laion": (two_sources["image"][0], 1.0)},
        schedule="probability",
        image_per_video=0.5,
        seed=4,
    )
    kinds = [[b["kind"] for _, b in zip(range(16), ShardLoader(cfg, rank=r, world_size=2))] for r in range(2)]
    assert kinds[0] == kinds[1] and set(kinds[0]) == {"video", "image"}
