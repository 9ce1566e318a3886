"""Dedup results in the reader: the loader never yields a removed key (epoch, ranks, resume); stats count them."""

from __future__ import annotations

import io
import json
from collections import Counter

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from rich.console import Console

from shards.format import DEDUP_SCHEMA, _atomic_write, dedup_path, removed_keys
from shards.loader import ShardLoader, count_samples
from shards.stats import analyse
from shards.stats_html import write_html
from shards.stats_report import render_terminal
from tests.shards.conftest import make_config, write_source


def write_dedup(out_dir, source: str, stage: str, removed: dict[str, str]) -> None:
    """A dedup result as `latentcrafter dedup` writes it: {removed key: duplicate_of}, sorted by key."""
    keys = sorted(removed)
    table = pa.table(
        {
            "key": keys,
            "duplicate_of": [removed[k] for k in keys],
            "cosine": pa.array([0.97] * len(keys), pa.float32()),
        },
        schema=DEDUP_SCHEMA,
    )
    buf = io.BytesIO()
    pq.write_table(table, buf)
    _atomic_write(dedup_path(str(out_dir), source, stage), buf.getvalue())


@pytest.fixture(scope="module")
def deduped(tmp_path_factory):
    """webvid: 5 shards x 6 with every 3rd key and all of shard 2 removed; laion: 4 x 7, 5 removed;
    jdb: 2 x 5 without a dedup result."""
    out = tmp_path_factory.mktemp("deduped")
    video_url, video_keys = write_source(out, "webvid", 5, 6, kind="video")
    image_url, image_keys = write_source(out, "laion", 4, 7, kind="image")
    jdb_url, jdb_keys = write_source(out, "jdb", 2, 5, kind="image")
    video_removed = {k: video_keys[0] for i, k in enumerate(video_keys) if i % 3 == 1 or "_002_" in k}
    image_removed = {k: image_keys[0] for k in image_keys[3:28:6]}
    write_dedup(out, "webvid", "256x256", video_removed)
    write_dedup(out, "laion", "256x256", image_removed)
    return {
        "dir": out,
        "video": (video_url, video_keys, set(video_removed)),
        "image": (image_url, image_keys, set(image_removed)),
        "jdb": (jdb_url, jdb_keys, set()),
    }


def _config(d, **kw):
    return make_config({"webvid": (d["video"][0], 1.0), "laion": (d["image"][0], 2.0)}, **kw)


def test_removed_keys_reader_and_path(deduped, tmp_path):
    out = str(deduped["dir"])
    assert dedup_path(out, "webvid", "256x256") == f"{out}/dedup/webvid-256x256.parquet"
    want = deduped["video"][2]
    assert removed_keys(out, "webvid", "256x256") == want
    assert removed_keys(f"{out}/webvid-256x256-000000.tar", "webvid", "256x256") == want
    assert removed_keys(f"file://{out}/", "webvid", "256x256") == want
    assert removed_keys(out, "jdb", "256x256") == set() == removed_keys(str(tmp_path), "webvid", "256x256")


def test_counts_leave_removed_keys_out(deduped):
    video_url, video_keys, video_removed = deduped["video"]
    counts = count_samples([video_url])
    assert sum(counts.values()) == len(video_keys) - len(video_removed)
    assert counts[f"{deduped['dir']}/webvid-256x256-000002.tar"] == 0  # every row of shard 2 removed
    assert sum(count_samples([video_url], dedup=False).values()) == len(video_keys)
    loader = ShardLoader(_config(deduped))
    assert loader.num_samples == {
        "webvid": len(video_keys) - len(video_removed),
        "laion": len(deduped["image"][1]) - len(deduped["image"][2]),
    }
    assert len(loader.shards["webvid"]) == 4  # the fully removed shard is not read at all


@pytest.mark.parametrize("workers, world", [(0, 1), (2, 1), (1, 2)])
def test_epoch_never_yields_a_removed_key(deduped, workers, world):
    """A bounded pass over every rank and worker: each remaining key exactly once, no removed key."""
    seen = Counter()
    for rank in range(world):
        loader = ShardLoader(
            _config(deduped, num_workers=workers, resampled=False), rank=rank, world_size=world
        )
        for batch in loader:
            seen.update(batch["keys"])
    removed = deduped["video"][2] | deduped["image"][2]
    remaining = (set(deduped["video"][1]) | set(deduped["image"][1])) - removed
    assert not set(seen) & removed
    assert set(seen) == remaining and set(seen.values()) == {1}


def test_endless_stream_never_yields_a_removed_key(deduped):
    removed = deduped["video"][2] | deduped["image"][2]
    it = iter(ShardLoader(_config(deduped, seed=3, shuffle_buffer=4)))
    keys = [k for _ in range(60) for k in next(it)["keys"]]  # several epochs of both sources
    assert len(keys) > 2 * 48 and not set(keys) & removed


def test_skip_duplicates_false_reads_every_row(deduped):
    loader = ShardLoader(_config(deduped, resampled=False, skip_duplicates=False))
    keys = [k for batch in loader for k in batch["keys"]]
    assert sorted(keys) == sorted(deduped["video"][1] + deduped["image"][1])


@pytest.mark.parametrize("k, workers", [(7, 0), (13, 2)])
def test_resume_gives_the_same_next_batches(deduped, k, workers):
    cfg = _config(deduped, num_workers=workers, seed=5, schedule="probability")
    ref = iter(ShardLoader(cfg))
    for _ in range(k):
        next(ref)
    expected = [next(ref) for _ in range(8)]
    first = ShardLoader(cfg)
    it = iter(first)
    for _ in range(k):
        next(it)
    state = json.loads(json.dumps(first.state_dict()))
    del it, first
    restored = ShardLoader(cfg)
    restored.load_state_dict(state)
    it = iter(restored)
    got = [next(it) for _ in range(8)]
    assert [b["keys"] for b in got] == [b["keys"] for b in expected]
    for a, b in zip(got, expected):
        assert torch.equal(a["latent"], b["latent"])
    removed = deduped["video"][2] | deduped["image"][2]
    assert not {key for b in got for key in b["keys"]} & removed


def test_state_from_before_the_dedup_result_is_refused(deduped, tmp_path):
    out = tmp_path / "later"
    url, keys = write_source(out, "webvid", 2, 6, kind="video")
    cfg = make_config({"webvid": (url, 1.0)})
    before = ShardLoader(cfg)
    it = iter(before)
    next(it)
    state = before.state_dict()
    write_dedup(out, "webvid", "256x256", {keys[4]: keys[0]})
    after = ShardLoader(cfg)
    assert after.num_samples == {"webvid": 11}
    with pytest.raises(ValueError, match="sources"):
        after.load_state_dict(state)


def test_stats_count_removed_samples(deduped, tmp_path):
    rep = analyse([str(deduped["dir"])]).report
    groups = {g["label"]: g for g in rep["groups"]}
    video_keys, video_removed = deduped["video"][1], deduped["video"][2]
    image_keys, image_removed = deduped["image"][1], deduped["image"][2]
    assert groups["webvid/256x256"]["removed_dedup"] == len(video_removed)
    assert groups["webvid/256x256"]["samples"] == len(video_keys) - len(video_removed)
    assert groups["laion/256x256"]["removed_dedup"] == len(image_removed)
    assert groups["laion/256x256"]["samples"] == len(image_keys) - len(image_removed)
    assert groups["jdb/256x256"]["removed_dedup"] == 0
    assert groups["jdb/256x256"]["samples"] == len(deduped["jdb"][1])
    t = rep["totals"]
    assert t["removed_dedup"] == len(video_removed) + len(image_removed)
    # accounting: every index row is a sample or removed, once
    all_rows = len(video_keys) + len(image_keys) + len(deduped["jdb"][1])
    assert t["samples"] + t["removed_dedup"] == all_rows
    assert t["videos"] == len(video_keys) - len(video_removed)
    dist = rep["distributions"]["bytes_total"]
    assert dist["count"] == t["samples"]  # distributions cover the remaining samples only
    console = Console(record=True, width=100)
    render_terminal(rep, console)
    text = console.export_text()
    assert f"removed by dedup: {t['removed_dedup']}" in text
    assert f"webvid/256x256: removed by dedup: {len(video_removed)}" in text
    write_html(str(tmp_path / "r.html"), analyse([str(deduped["dir"])]))
    assert "Removed by dedup" in (tmp_path / "r.html").read_text()


def test_stats_without_dedup_result_has_no_dedup_fields(tmp_path):
    write_source(tmp_path, "webvid", 1, 4, kind="video")
    rep = analyse([str(tmp_path)]).report
    assert "removed_dedup" not in rep["totals"]
    assert all("removed_dedup" not in g for g in rep["groups"])
    assert rep["totals"]["samples"] == 4
