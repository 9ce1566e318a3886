"""`latentcrafter stats` fast mode: exact counts, hours, errors, missing files, JSON schema, HTML, compare."""

from __future__ import annotations

import base64
import json
import re
from collections import Counter

import fsspec
import numpy as np
import pyarrow.parquet as pq
import pytest

from shards.stats import analyse, main
from shards.stats_fast import SPEC_BY_NAME, GroupStats, Hist
from shards.stats_files import discover
from shards.stats_report import SCHEMA_ID
from tests.shards.stats_fixtures import SHARDS, build_dataset


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("stats_ds")
    return root, build_dataset(str(root))


def _run_json(tmp_path, *args) -> tuple[int, dict]:
    out = tmp_path / "report.json"
    rc = main([*map(str, args), "--json", str(out), "--quiet"])
    return rc, json.loads(out.read_text())


def test_fast_counts_hours_and_errors_are_exact(dataset, tmp_path):
    root, want = dataset
    rc, rep = _run_json(tmp_path, root)
    assert rc == 0
    t = rep["totals"]
    assert (t["samples"], t["videos"], t["images"]) == (
        sum(want["samples"].values()),
        want["videos"],
        want["images"],
    )
    assert (t["shards"], t["shards_indexed"]) == (want["shards"], want["shards_indexed"])
    assert t["clip_hours"] == pytest.approx(want["clip_hours"], abs=1e-12)
    assert t["source_hours"] == pytest.approx(want["source_hours"], abs=1e-12)
    assert t["sources"] == ["jdb", "laion_coco", "webvid"] and t["stages"] == ["256x256", "512x320"]
    groups = {(g["source"], g["stage"]): g for g in rep["groups"]}
    assert {k: g["samples"] for k, g in groups.items()} == want["samples"]
    assert (
        groups[("webvid", "256x256")]["shards"] == 3 and groups[("webvid", "256x256")]["shards_indexed"] == 2
    )
    reasons = {(r["stage"], r["reason"]): r for r in rep["errors"]["reasons"]}
    assert {k: r["count"] for k, r in reasons.items()} == want["errors"]
    assert rep["errors"]["total"] == sum(want["errors"].values())
    assert rep["errors"]["by_stage"]["fetch"] == 3
    assert reasons[("fetch", "http_404")]["examples"] == ["webvid_0_e0", "webvid_0_e1"]
    assert reasons[("fetch", "http_404")]["detail"] == "http_404 detail"
    assert reasons[("dedup", "duplicate_of")]["groups"] == {"webvid/256x256": 1}


def test_fast_missing_files_and_bytes(dataset, tmp_path):
    root, want = dataset
    _, rep = _run_json(tmp_path, root)
    missing = rep["missing"]
    assert [p.rsplit("/", 1)[-1] for p in missing["no_index"]] == want["no_index"]
    assert [p.rsplit("/", 1)[-1] for p in missing["no_tar"]] == want["no_tar"]
    assert missing["no_errors"] == [] and missing["not_found"] == [] and missing["unreadable"] == []
    index = pq.read_table([str(p) for p in sorted(root.glob("*.index.parquet"))])
    members = rep["bytes"]["members"]
    assert members["latent"]["total"] == sum(index.column("bytes_latent").to_pylist())
    assert members["image_tokens"]["total"] == sum(index.column("bytes_image_tokens").to_pylist())
    assert rep["bytes"]["index_total"] == sum(index.column("bytes_total").to_pylist())
    tars = sum(p.stat().st_size for p in root.glob("*.tar"))
    assert rep["bytes"]["tar_files"] == tars


def test_distributions_match_the_index(dataset, tmp_path):
    root, want = dataset
    _, rep = _run_json(tmp_path, root)
    d = rep["distributions"]
    durations = [x for kind, ds, _ in SHARDS.values() if kind == "video" for x in ds]
    assert d["duration"]["count"] == len(durations) == want["videos"]
    assert d["duration"]["mean"] == pytest.approx(np.mean(durations))
    assert (d["duration"]["min"], d["duration"]["max"]) == (10.0, 60.0)
    assert d["sample_fps"]["p50"] == pytest.approx(2.0, rel=0.01) and d["fps"]["mean"] == pytest.approx(25.0)
    index = pq.read_table([str(p) for p in sorted(root.glob("*.index.parquet"))])
    words = np.array(index.column("caption_words").to_pylist())
    assert d["caption_words"]["p50"] == np.quantile(
        words, 0.5, method="inverted_cdf"
    )  # integer fields: exact
    assert d["aspect"]["max"] == pytest.approx(1280 / 720)
    assert d["similarity"]["count"] == 4 and "clip_score" not in d  # only fields present in some row
    assert sum(d["orig_width"]["hist"]["counts"]) == index.num_rows


def test_hist_quantiles_are_within_one_bin_and_merge():
    rng = np.random.default_rng(0)
    values = rng.lognormal(2.5, 1.0, 20000)
    spec = SPEC_BY_NAME["duration"]
    whole, a, b = Hist(spec), Hist(spec), Hist(spec)
    whole.add(values)
    a.add(values[:7000])
    b.add(np.append(values[7000:], [np.nan, np.inf]))  # non-finite values are not counted
    a.merge(b)
    assert np.array_equal(a.counts, whole.counts) and a.n == whole.n == 20000
    bin_ratio = 10 ** ((spec.hi - spec.lo) / spec.bins)
    for q in (0.05, 0.5, 0.95):
        exact = np.quantile(values, q)
        assert exact / bin_ratio <= whole.quantile(q) <= exact * bin_ratio


def test_json_schema(dataset, tmp_path):
    root, _ = dataset
    _, rep = _run_json(tmp_path, root)
    assert rep["schema"] == SCHEMA_ID and rep["mode"] == "fast" and "problems" not in rep
    assert set(rep) == {
        "schema",
        "mode",
        "inputs",
        "by",
        "totals",
        "groups",
        "distributions",
        "errors",
        "missing",
        "bytes",
    }
    group_keys = {
        "source",
        "stage",
        "label",
        "shards",
        "shards_indexed",
        "samples",
        "videos",
        "images",
        "errors",
        "clip_hours",
        "source_hours",
        "tar_bytes",
        "bytes_per_sample",
        "buckets",
        "distributions",
    }
    assert all(set(g) == group_keys for g in rep["groups"])
    for d in rep["distributions"].values():
        assert {"label", "unit", "scale", "count", "mean", "min", "max", "p05", "p50", "p95", "hist"} <= set(
            d
        )
        assert len(d["hist"]["edges"]) == len(d["hist"]["counts"]) + 1
    assert set(rep["errors"]) == {"total", "by_stage", "reasons"}
    assert set(rep["missing"]) == {"no_index", "no_tar", "no_errors", "not_found", "unreadable"}
    assert set(rep["bytes"]["members"]) == {"latent", "text_tokens", "image_tokens", "image_frame", "other"}
    assert set(rep["bytes"]) == {"tar_files", "index_total", "per_sample", "members", "profiles"}
    (profile,) = rep["bytes"]["profiles"]  # the fixtures' indexes have no storage_profile: full
    assert profile["profile"] == "full" and profile["samples"] == rep["totals"]["samples"]
    assert set(profile) == {"profile", "text", "samples", "per_sample", "projected_512x320x16"}
    assert {"measured", "from_shapes"} <= set(profile["projected_512x320x16"])


def test_by_source_and_by_stage(dataset, tmp_path):
    root, want = dataset
    _, rep = _run_json(tmp_path, root, "--by", "source")
    assert {g["label"]: g["samples"] for g in rep["groups"]} == {"jdb": 3, "laion_coco": 4, "webvid": 6}
    _, rep = _run_json(tmp_path, root, "--by", "stage")
    assert {g["label"]: g["samples"] for g in rep["groups"]} == {"256x256": 12, "512x320": 1}
    assert {g["label"]: g["errors"] for g in rep["groups"]} == {"256x256": 7, "512x320": 0}


def test_brace_patterns_globs_and_not_found(dataset):
    root, _ = dataset
    found = discover([f"{root}/webvid-256x256-{{000000..000003}}.tar"])
    assert [s.stem for s in found.shards] == [f"webvid-256x256-00000{i}" for i in range(3)]
    assert found.not_found == [f"{root}/webvid-256x256-000003.tar"]
    assert found.shards[0].index and found.shards[0].errors and found.shards[2].index is None
    found = discover([f"{root}/*-256x256-000000.tar", f"{root}/nothing-*.tar"])
    assert [s.source for s in found.shards] == ["jdb", "laion_coco", "webvid"]
    assert found.not_found == [f"{root}/nothing-*.tar"]


def test_terminal_report_fits_100_columns(dataset, capsys):
    root, _ = dataset
    assert main([str(root)]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert max(map(len, lines)) <= 100
    assert re.search(r"laion_coco/256x256\s+1/1\s+4\s", out)
    assert "http_404" in out and "webvid-256x256-000002.tar" in out and "no tar: 1" in out


def test_html_page_holds_the_figures(dataset, tmp_path):
    root, _ = dataset
    out = tmp_path / "stats.html"
    _, rep = _run_json(tmp_path, root, "--html", out)
    page = out.read_text()
    images = re.findall(r"src='data:image/png;base64,([A-Za-z0-9+/=]+)'", page)
    assert len(images) == len(rep["distributions"]) + 1  # one histogram each, plus the bytes bar
    assert all(base64.b64decode(i)[:8] == b"\x89PNG\r\n\x1a\n" for i in images)
    assert "http_404" in page and "laion_coco/256x256" in page and "src='http" not in page
    embedded = re.search(r"<script type='application/json' id='report'>(.*?)</script>", page, re.S).group(1)
    assert json.loads(embedded)["totals"] == rep["totals"]


def test_against_shows_the_difference(dataset, tmp_path):
    root, _ = dataset
    other = tmp_path / "v2"
    build_dataset(str(other), extras=False)
    out = tmp_path / "cmp.html"
    rc, rep = _run_json(tmp_path, other, "--against", root, "--html", out)
    assert rc == 0
    diff = rep["diff"]
    assert diff["totals"]["samples"] == {"a": 12, "b": 13, "delta": -1, "pct": pytest.approx(-100 / 13)}
    assert diff["totals"]["shards"]["delta"] == -2
    jdb = next(g for g in diff["groups"] if g["label"] == "jdb/256x256")
    assert (jdb["samples"]["a"], jdb["samples"]["b"]) == (2, 3)
    assert diff["distributions"]["duration"]["tv_distance"] == 0.0
    assert diff["distributions"]["caption_words"]["tv_distance"] > 0
    assert rep["against"]["totals"]["samples"] == 13
    assert "Compared with --against" in out.read_text()


def test_no_shards_is_a_usage_error(tmp_path, capsys):
    assert main([str(tmp_path), "--quiet"]) == 2
    assert "no shard files found" in capsys.readouterr().err


def test_fsspec_urls(dataset):
    root, want = dataset
    fs = fsspec.filesystem("memory")
    for p in root.iterdir():
        fs.pipe(f"/stats_ds/{p.name}", p.read_bytes())
    try:
        result = analyse(["memory://stats_ds/*-256x256-*.tar"], workers=2)
        rep = result.report
        assert (
            rep["totals"]["samples"]
            == sum(n for (_, stage), n in want["samples"].items() if stage == "256x256") - 1
        )
        (no_index,) = rep["missing"]["no_index"]  # a URL the user can open again
        assert no_index.startswith("memory://") and no_index.endswith("/stats_ds/webvid-256x256-000002.tar")
        assert fs.exists(no_index)
        problems = analyse(["memory://stats_ds"], deep=True, workers=1).report["problems"]
        assert {p["kind"] for p in problems} == {"missing_index", "missing_tar"}
    finally:
        fs.rm("/stats_ds", recursive=True)


def test_error_examples_are_distinct_keys():
    # a row rejected at every resolution stage appears once per stage's errors parquet
    a, b = GroupStats(), GroupStats()
    a.examples[("fetch", "timeout")] = [("k1", "first")]
    b.examples[("fetch", "timeout")] = [("k1", "again"), ("k2", None), ("k3", None), ("k4", None)]
    a.merge(b)
    assert a.examples[("fetch", "timeout")] == [("k1", "first"), ("k2", None), ("k3", None)]


def test_stats_match_the_encode_job(encoded_shards, sample_data, tmp_path):
    """On the real shards of the encode job: counts and reasons equal the job's summary, deep check clean."""
    from tests.pipelines.job.helpers import expected_outcome

    total = encoded_shards.summary["total"]
    rc, rep = _run_json(tmp_path, encoded_shards.out_dir, "--deep")
    assert rc == 0 and rep["problems"] == []
    assert {g["label"]: g["samples"] for g in rep["groups"]} == total["samples"]
    reasons = {f"{r['stage']}/{r['reason']}": r["count"] for r in rep["errors"]["reasons"]}
    assert reasons == total["errors"]
    expected = expected_outcome(sample_data)
    assert (
        rep["totals"]["samples"] + rep["errors"]["total"]
        == total["rows"]
        == sum(e["rows"] for e in expected.values())
    )
    planted = Counter(
        f"{stage}/{reason}" for e in expected.values() for stage, reason in e["errors"].values()
    )
    assert all(reasons.get(k, 0) >= n for k, n in planted.items()), (planted, reasons)
    assert not any(rep["missing"].values())
    index = pq.read_table(
        [str(p) for p in sorted(encoded_shards.out_dir.glob("*.index.parquet"))]
    ).to_pylist()
    videos = [r for r in index if r["kind"] == "video"]
    assert rep["totals"]["videos"] == len(videos) > 0
    assert rep["totals"]["clip_hours"] == pytest.approx(sum(r["clip_duration"] for r in videos) / 3600)
    assert rep["totals"]["source_hours"] == pytest.approx(sum(r["duration"] for r in videos) / 3600)
