"""Aspect buckets in the loader: one latent shape per batch, per-bucket batch sizes, exact mixing and resume."""

from __future__ import annotations

import hashlib
from collections import Counter

import pytest

from shards.buckets import default_buckets, latent_bucket, pixel_budget_batch_size
from shards.loader import ShardLoader
from shards.reader import ShardMismatchError
from tests.shards.conftest import DOWN, make_config, write_shard, write_source

STAGE = "512x320"
BUCKETS = [(512, 320), (320, 512), (384, 384)]  # default_buckets(STAGE)
VIDEO_COUNTS, IMAGE_COUNTS = (7, 5, 4), (9, 6, 3)  # samples per bucket (one shard each)


def digest(batches) -> str:
    h = hashlib.sha256()
    for b in batches:
        h.update(b["kind"].encode())
        h.update("|".join(b["keys"]).encode())
        h.update("|".join(b["sources"]).encode())
        for name in ("latent", "latent_std", "text_tokens", "text_pooled", "fps", "image_tokens"):
            if name in b:
                h.update(name.encode())
                h.update(b[name].numpy().tobytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def bucketed(tmp_path_factory):
    """webvid (video) and laion (image) at 512x320, one shard per bucket, uneven bucket sizes."""
    out = tmp_path_factory.mktemp("bucketed")
    index = Counter()
    for source, kind, counts in (("webvid", "video", VIDEO_COUNTS), ("laion", "image", IMAGE_COUNTS)):
        for shard, ((w, h), n) in enumerate(zip(BUCKETS, counts)):
            write_shard(out, source, shard, n, kind=kind, stage=STAGE, width=w, height=h)
            index[(kind, f"{w}x{h}")] += n
    urls = {s: f"{out}/{s}-{STAGE}-*.tar" for s in ("webvid", "laion")}
    return {"urls": urls, "index": index}


def config(data, **kw):
    kw.setdefault("bucketing", True)
    kw.setdefault("video_batch_size", 2)
    kw.setdefault("image_batch_size", 3)
    kw.setdefault("shuffle_buffer", 32)  # samples of all buckets interleave
    return make_config(
        {"webvid": (data["urls"]["webvid"], 1.0), "laion": (data["urls"]["laion"], 1.0)}, stage=STAGE, **kw
    )


def test_default_buckets_match_the_encode_job():
    from pipelines.stages.decode import default_buckets as encode_default

    for stage in ("256x256", "512x320", "1024x576"):
        assert default_buckets(stage) == encode_default(stage)
    assert default_buckets(STAGE) == BUCKETS
    assert latent_bucket((4, 2, 16, 10), 32) == "320x512"


def test_pixel_budget_and_configured_batch_sizes(bucketed):
    assert [pixel_budget_batch_size(3, STAGE, t) for t in ("512x320", "320x512", "384x384")] == [3, 3, 3]
    assert pixel_budget_batch_size(8, STAGE, "384x384") == 8  # 8 * 163840 // 147456
    assert (
        pixel_budget_batch_size(8, STAGE, "640x640") == 3
        and pixel_budget_batch_size(1, STAGE, "640x640") == 1
    )
    cfg = config(
        bucketed, buckets={"512x320": 2, "320x512": {"video": 1}, "384x384": {"video": 3, "image": 4}}
    )
    sizes = {t: {k: cfg.bucket_batch_size(k, t) for k in ("video", "image")} for t in cfg.bucket_tags()}
    assert sizes == {
        "512x320": {"video": 2, "image": 2},
        "320x512": {"video": 1, "image": 3},  # image left out: the pixel budget
        "384x384": {"video": 3, "image": 4},
    }
    for bad in ({"512x320": 0}, {"512x320": {"audio": 1}}, {"51x320": 1}):
        with pytest.raises(ValueError):
            config(bucketed, buckets=bad)
    with pytest.raises(ValueError, match="bucketing"):
        config(bucketed, bucketing=False, buckets={"512x320": 1})


def test_bucketing_off_refuses_bucket_shapes_and_unlisted_buckets_are_refused(bucketed):
    with pytest.raises(ShardMismatchError, match="does not fit stage"):
        list(ShardLoader(config(bucketed, bucketing=False, on_bad_sample="raise", resampled=False)))
    cfg = config(bucketed, buckets={"512x320": 2, "320x512": 2}, resampled=False)
    with pytest.raises(ShardMismatchError, match="fits none of the buckets"):
        list(ShardLoader(cfg))


def test_every_batch_has_one_shape_and_its_bucket_batch_size(bucketed):
    cfg = config(bucketed, buckets={"512x320": 2, "320x512": {"video": 1, "image": 2}, "384x384": 3})
    batches = [b for _, b in zip(range(40), ShardLoader(cfg))]
    assert "".join(b["kind"][0] for b in batches) == "vi" * 20  # the schedule holds
    seen = set()
    for b in batches:
        w, h = (int(v) for v in b["bucket"].split("x"))
        assert tuple(b["latent"].shape[-2:]) == (h // DOWN, w // DOWN)
        assert b["latent"].shape[0] == len(b["keys"]) == cfg.bucket_batch_size(b["kind"], b["bucket"])
        seen.add((b["kind"], b["bucket"]))
    assert len(seen) == 6  # no bucket starves


@pytest.mark.parametrize("world, workers", [(1, 0), (2, 0), (2, 2)])
def test_bounded_pass_counts_per_bucket_match_the_index(bucketed, world, workers):
    keys, per_bucket = [], Counter()
    for rank in range(world):
        for b in ShardLoader(
            config(bucketed, resampled=False, num_workers=workers), rank=rank, world_size=world
        ):
            assert b["latent"].shape[-2:] == b["latent"][0].shape[-2:]
            keys += b["keys"]
            per_bucket[(b["kind"], b["bucket"])] += len(b["keys"])
    assert len(keys) == len(set(keys)) == sum(VIDEO_COUNTS) + sum(IMAGE_COUNTS)
    assert per_bucket == bucketed["index"]


def test_buckets_emit_exactly_the_samples_the_mixers_drew(bucketed):
    """Source weights hold: per kind, the emitted plus the waiting samples are the mixer's first draws."""
    ones = config(bucketed, buckets={t: 1 for t in ("512x320", "320x512", "384x384")}, sample_latents=False)
    draws = {"video": [], "image": []}  # each draw is its own batch: the mixers' draw order
    for _, b in zip(range(80), ShardLoader(ones)):
        draws[b["kind"]] += b["keys"]
    loader = ShardLoader(config(bucketed, sample_latents=False))
    emitted = {"video": [], "image": []}
    for _, b in zip(range(12), loader):
        emitted[b["kind"]] += b["keys"]
    (worker,) = loader.state_dict()["workers"].values()
    for kind in ("video", "image"):
        waiting = sum(len(o) for k, _, o in worker["open"] if k == kind)
        n = worker["mixers"][kind]["draws"]
        assert len(emitted[kind]) + waiting == n
        assert set(emitted[kind]) <= set(draws[kind][:n]) and len(set(emitted[kind])) == len(emitted[kind])


@pytest.mark.parametrize("k, workers, rank, world", [(3, 0, 0, 1), (7, 0, 1, 2), (5, 2, 0, 1), (10, 2, 1, 2)])
def test_resume_mid_epoch_gives_identical_next_batches(bucketed, k, workers, rank, world):
    cfg = config(bucketed, num_workers=workers)
    reference = ShardLoader(cfg, rank=rank, world_size=world)
    it = iter(reference)
    head = [next(it) for _ in range(k)]
    state = reference.state_dict()
    while not any(w["open"] for w in state["workers"].values()):  # a state with open partial batches
        head.append(next(it))
        state = reference.state_dict()
        assert len(head) < 60
    tail = [next(it) for _ in range(8)]
    restored = ShardLoader(cfg, rank=rank, world_size=world)
    restored.load_state_dict(state)
    again = [b for _, b in zip(range(8), restored)]
    assert [b["keys"] for b in again] == [b["keys"] for b in tail]
    assert digest(again) == digest(tail)


def test_resume_refuses_other_buckets(bucketed):
    loader = ShardLoader(config(bucketed))
    next(iter(loader))
    other = ShardLoader(config(bucketed, buckets={"512x320": 1, "320x512": 1, "384x384": 1}))
    with pytest.raises(ValueError, match="buckets"):
        other.load_state_dict(loader.state_dict())


def test_every_rank_gets_the_same_kind_at_each_step(bucketed):
    kinds = [
        [
            b["kind"]
            for _, b in zip(
                range(16), ShardLoader(config(bucketed, image_per_video=2.0), rank=r, world_size=2)
            )
        ]
        for r in range(2)
    ]
    assert kinds[0] == kinds[1]


def test_single_bucket_data_with_bucketing_equals_bucketing_off(tmp_path):
    v, _ = write_source(tmp_path, "webvid", 3, 5, kind="video")
    i, _ = write_source(tmp_path, "laion", 3, 6, kind="image")

    def run(**kw):
        cfg = make_config({"webvid": (v, 1.0), "laion": (i, 1.0)}, image_per_video=2.0, **kw)
        return digest(b for _, b in zip(range(12), ShardLoader(cfg, rank=1, world_size=2)))

    assert run(bucketing=True) == run()


def test_bucketing_off_is_bit_identical_to_the_unbucketed_loader(tmp_path):
    """Digests of today's loader (recorded before buckets existed) on the same fixture and configs."""
    v, _ = write_source(tmp_path, "webvid", 4, 6, kind="video")
    i, _ = write_source(tmp_path, "laion", 4, 7, kind="image")

    def cfg(**kw):
        return make_config({"webvid": (v, 1.0), "laion": (i, 2.0)}, image_per_video=2.0, **kw)

    endless = [b for _, b in zip(range(14), ShardLoader(cfg(), rank=1, world_size=2))]
    bounded = list(ShardLoader(cfg(resampled=False, sample_latents=False, return_latent_std=True)))
    assert digest(endless) == "397065be2bb9187e58d036c41a5c54583a739ac8a7b728176513aef47633e78e"
    assert digest(bounded) == "4706e94fac4065d631b36d07f687720042b0ca46bd00cb4db931bf78662f2cc3"
    assert len(bounded) == 14 and all("bucket" not in b for b in endless + bounded)


def test_stats_show_samples_per_bucket(bucketed):
    from rich.console import Console

    from shards.stats import analyse
    from shards.stats_report import render_terminal

    report = analyse([str(bucketed["urls"]["webvid"]).rsplit("/", 1)[0]], by="source,stage").report
    got = Counter()
    for group in report["groups"]:
        for b in group["buckets"]:
            got[(b["kind"], b["bucket"])] += b["samples"]
    assert got == bucketed["index"]
    assert sum(b["samples"] for b in report["totals"]["buckets"]) == sum(VIDEO_COUNTS) + sum(IMAGE_COUNTS)
    console = Console(record=True, width=100)
    render_terminal(report, console)
    text = console.export_text()
    assert "Samples per bucket" in text and "320x512" in text and "384x384" in text
