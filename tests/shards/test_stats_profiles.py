"""`latentcrafter stats` per storage profile: bytes per member kind, the 512x320x16 projection, old indexes."""

from __future__ import annotations

import copy
import json
import shutil

import pyarrow.parquet as pq
import pytest

from encoders.models import write_tiny_models
from shards.profiles import PROFILES, REAL_SHAPES, bytes_from_shapes
from shards.stats import analyse, main
from shards.stats_compare import compare
from shards.stats_fast import GroupStats
from tests.shards.profile_fixtures import encode_profile_shards

LIMIT = 500_000  # issue #17: a lean 512x320x16 video sample at real encoder sizes
PER_SOURCE = 2  # videos and images per profile


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("stats_profiles")
    write_tiny_models(str(root / "models"), seed=0)
    return {
        name: encode_profile_shards(root / name, root / "models", name, videos=PER_SOURCE, images=PER_SOURCE)
        for name in ("full", "compact", "lean")
    }


def _index(folder):
    return pq.read_table([str(p) for p in sorted(folder.glob("*.index.parquet"))]).to_pylist()


def _profiles(report) -> dict:
    return {p["profile"]: p for p in report["bytes"]["profiles"]}


def test_bytes_per_member_kind_and_profile(shards):
    rep = analyse([str(shards["full"]), str(shards["lean"])]).report
    profiles = _profiles(rep)
    assert list(profiles) == ["full", "lean"]
    full, lean = profiles["full"], profiles["lean"]
    assert full["samples"] == lean["samples"] == 2 * PER_SOURCE
    assert full["text"] == str(PROFILES["full"]) and lean["text"] == str(PROFILES["lean"])
    assert lean["per_sample"]["total"] < full["per_sample"]["total"]
    assert lean["per_sample"]["image_frame"] > 0 and full["per_sample"]["image_frame"] == 0
    for name, row in profiles.items():  # per-sample bytes are the index's, member kind by member kind
        index = _index(shards[name])
        for kind in ("latent", "text_tokens", "image_tokens", "image_frame", "total"):
            want = sum(r[f"bytes_{kind}"] for r in index) / len(index)
            assert row["per_sample"][kind] == pytest.approx(want)
        assert sum(
            row["per_sample"][k] for k in ("latent", "text_tokens", "image_tokens", "image_frame", "other")
        ) == (pytest.approx(row["per_sample"]["total"]))
    members = rep["bytes"]["members"]
    frames = sum(r["bytes_image_frame"] for r in _index(shards["lean"]))
    assert members["image_frame"]["total"] == frames > 0
    assert list(members) == ["latent", "text_tokens", "image_tokens", "image_frame", "other"]
    # the target: a lean 512x320x16 video sample is <= 0.5 MB at the real encoder sizes
    proj = lean["projected_512x320x16"]
    assert proj["from_shapes"] == bytes_from_shapes(PROFILES["lean"])["total"] <= LIMIT
    assert proj["video_samples"] == PER_SOURCE and proj["frame"] == "scaled"
    assert 300_000 < proj["measured"] <= LIMIT
    assert full["projected_512x320x16"]["from_shapes"] > 2 * LIMIT


def test_measured_projection_matches_the_shapes(shards):
    """.npy members scale to their exact real sizes; the measured total stays under the bound from shapes."""
    rep = analyse([str(shards[n]) for n in ("lean", "compact", "full")]).report
    profiles = _profiles(rep)
    assert list(profiles) == ["full", "compact", "lean"]  # named profiles in their order
    mean = 2 * 4 * 16 * 40 * 64 + 128  # latent.npy: float16 [4, 16, 40, 64] and its header
    for name, want in (("full", 2 * mean), ("compact", mean + mean // 2 + 64), ("lean", mean)):
        proj = profiles[name]["projected_512x320x16"]
        assert proj["measured_members"]["latent"] == pytest.approx(want)
        assert proj["measured"] <= proj["from_shapes"]
    text = 2 * (77 * 1024 + 1024) + 2 * 128
    assert profiles["full"]["projected_512x320x16"]["measured_members"]["text_tokens"] == pytest.approx(text)
    assert profiles["lean"]["projected_512x320x16"]["measured_members"]["text_tokens"] == pytest.approx(
        2 * REAL_SHAPES["text_pooled"][0] + 128
    )
    full = profiles["full"]["projected_512x320x16"]
    assert full["measured"] == pytest.approx(full["from_shapes"], rel=0.01)


def test_an_old_index_counts_as_full(shards, tmp_path):
    old = tmp_path / "old"
    shutil.copytree(shards["full"], old)
    for path in old.glob("*.index.parquet"):
        table = pq.read_table(path)
        pq.write_table(table.drop_columns(["storage_profile", "bytes_image_frame"]), path)
    rep = analyse([str(old)]).report
    assert [(p["profile"], p["samples"]) for p in rep["bytes"]["profiles"]] == [("full", 2 * PER_SOURCE)]
    assert rep["bytes"]["members"]["image_frame"]["total"] == 0
    assert rep["totals"]["samples"] == 2 * PER_SOURCE and not rep["missing"]["unreadable"]
    new = _profiles(analyse([str(shards["full"])]).report)["full"]
    assert rep["bytes"]["profiles"][0]["per_sample"] == new["per_sample"]
    assert analyse([str(old)], deep=True, workers=1).report["problems"] == []


def test_deep_mode_accepts_every_profile_and_finds_a_wrong_one(shards, tmp_path):
    rep = analyse([str(shards[n]) for n in ("full", "compact", "lean")], deep=True, workers=1).report
    assert rep["problems"] == []
    wrong = tmp_path / "wrong"
    shutil.copytree(shards["lean"], wrong)
    path = next(wrong.glob("webvid-*.index.parquet"))
    table = pq.read_table(path)
    profiles = [str(PROFILES["full"])] + table.column("storage_profile").to_pylist()[1:]
    i = table.schema.get_field_index("storage_profile")
    pq.write_table(table.set_column(i, table.schema.field(i), [profiles]), path)
    kinds = {p["kind"] for p in analyse([str(wrong)], deep=True, workers=1).report["problems"]}
    assert {"missing_member", "profile_mismatch"} <= kinds


def test_terminal_table_and_compare(shards, tmp_path, capsys):
    assert main([str(shards["full"]), str(shards["lean"])]) == 0
    out = capsys.readouterr().out
    assert max(map(len, out.splitlines())) <= 100
    assert "Bytes per sample by storage profile" in out
    lines = [line.split() for line in out.splitlines()]
    assert any(row[:2] == ["lean", str(2 * PER_SOURCE)] for row in lines if row)
    report = tmp_path / "cmp.json"
    assert main([str(shards["lean"]), "--against", str(shards["full"]), "--json", str(report)]) == 0
    assert "Storage profiles" in capsys.readouterr().out
    diff = json.loads(report.read_text())["diff"]
    assert diff["bytes"]["image_frame"]["b"] == 0 < diff["bytes"]["image_frame"]["a"]
    assert diff["profiles"]["lean"]["samples"]["a"] == diff["profiles"]["full"]["samples"]["b"] == 4
    # a report written before storage profiles (no image_frame, no profiles) still compares
    a, b = analyse([str(shards["lean"])]), analyse([str(shards["full"])])
    b.report = copy.deepcopy(b.report)
    del b.report["bytes"]["members"]["image_frame"], b.report["bytes"]["profiles"]
    diff = compare(a, b)
    assert diff["bytes"]["image_frame"]["b"] == 0 and diff["profiles"]["lean"]["samples"]["b"] == 0
    html = tmp_path / "stats.html"
    assert main([str(shards["full"]), str(shards["lean"]), "--html", str(html), "--quiet"]) == 0
    assert "Bytes per sample by storage profile" in html.read_text()


def test_profile_sums_merge_without_aliasing(shards):
    one = analyse([str(shards["lean"])]).total
    merged = GroupStats().merge(one).merge(one)
    key = str(PROFILES["lean"])
    assert merged.profiles[key] is not one.profiles[key]
    assert merged.profiles[key].samples == 2 * one.profiles[key].samples
    assert merged.profiles[key].projected["total"] == 2 * one.profiles[key].projected["total"]
