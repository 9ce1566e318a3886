"""The miniature datasets: real formats, the planted defects really broken, deterministic, and the CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import decord
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipelines.tools.sample_data import generate

CLI = str(Path(sys.executable).parent / "latentcrafter")


@pytest.fixture(scope="module")
def expected(sample_data):
    return json.loads((sample_data / "expected.json").read_text())


def defect_keys(info, reason):
    return [k for k, d in info["defects"].items() if d["reason"] == reason]


def test_expected_json_describes_the_layout(sample_data, expected):
    assert expected["seed"] == 0 and expected["port"] == 8765
    assert expected["webvid"]["rows"] == 12 + 6 and expected["laion_coco"]["rows"] == 12 + 3
    assert expected["jdb"]["rows"] == 8 + 2
    for name in ("webvid", "laion_coco", "jdb"):
        info = expected[name]
        assert (sample_data / info["manifest"]).is_file()
        assert len(info["keys"]) == len(set(info["keys"])) == info["rows"]
        assert set(info["defects"]) <= set(info["keys"]) and not set(info["defects"]) & set(info["items"])
        assert len(info["items"]) + len(info["defects"]) == info["rows"]
    assert expected["laion_coco"]["manifest"].startswith("laion_coco/part-00000-")
    assert expected["laion_coco"]["manifest"].endswith(".snappy.parquet")
    assert expected["laion_coco"]["url_prefix"] == "http://127.0.0.1:8765/"
    assert len(expected["laion_coco"]["high_punsafe"]) == 2
    total = sum(p.stat().st_size for p in sample_data.rglob("*") if p.is_file())
    assert 200_000 < total < 10_000_000  # a few MB


def test_good_videos_decode_with_their_sizes_fps_and_lengths(sample_data, expected):
    info = expected["webvid"]
    by_key = dict(zip(info["keys"], range(info["rows"])))
    lines = (sample_data / info["manifest"]).read_text().splitlines()
    assert lines[0] == "videoid,name,page_idx,page_dir,duration,contentUrl"
    sizes, rates = set(), set()
    for key, item in info["items"].items():
        videoid = key.removeprefix("webvid_")
        (path,) = (sample_data / info["media_root"]).glob(f"*/{videoid}.mp4")
        reader = decord.VideoReader(str(path))
        assert len(reader) == item["frames"] == round(item["fps"] * item["duration"])
        assert reader.get_avg_fps() == pytest.approx(item["fps"])
        frame = reader[len(reader) // 2].asnumpy()
        assert frame.shape == (item["height"], item["width"], 3)
        assert abs(frame.astype(int) - reader[0].asnumpy().astype(int)).mean() > 5  # the content moves
        sizes.add((item["width"], item["height"]))
        rates.add(item["fps"])
        assert by_key[key] >= 0
    assert sizes == {(596, 336), (640, 360), (480, 270)} and rates == {24, 25, 30}
    durations = sorted(i["duration"] for i in info["items"].values())
    assert durations[-1] == 20 and 2 <= durations[0] and durations[-2] <= 8


def test_planted_video_defects_are_really_broken(sample_data, expected):
    info = expected["webvid"]
    media = sample_data / info["media_root"]

    def path_of(key):
        found = list(media.glob(f"*/{key.removeprefix('webvid_')}.mp4"))
        return found[0] if found else None

    (empty,) = defect_keys(info, "empty_file")
    assert path_of(empty).stat().st_size == 0
    undecodable = defect_keys(info, "undecodable")
    assert len(undecodable) == 2
    for key in undecodable:
        assert path_of(key).stat().st_size > 0
        with pytest.raises(RuntimeError, match="Error reading"):
            decord.VideoReader(str(path_of(key)))
    (missing,) = defect_keys(info, "not_found")
    assert path_of(missing) is None
    (short,) = defect_keys(info, "too_short")
    assert 0 < len(decord.VideoReader(str(path_of(short)))) < 8
    (bad_duration,) = defect_keys(info, "bad_duration")
    row = info["keys"].index(bad_duration) + 1
    assert ",17 seconds," in (sample_data / info["manifest"]).read_text().splitlines()[row]


def test_laion_images_and_defects(sample_data, expected):
    info = expected["laion_coco"]
    table = pq.read_table(sample_data / info["manifest"])
    assert {"URL", "TEXT", "top_caption", "all_captions", "hash", "punsafe", "LICENSE"} <= set(
        table.column_names
    )
    assert pq.ParquetFile(sample_data / info["manifest"]).metadata.num_row_groups > 1
    rows = table.to_pylist()
    images = sample_data / "laion_coco" / "images"
    formats = set()
    for row in rows:
        if row["URL"] is None:
            continue
        assert row["URL"].startswith(info["url_prefix"] + "laion_coco/images/")
        path = sample_data / row["URL"].removeprefix(info["url_prefix"])
        if not path.exists():
            continue
        try:
            with Image.open(path) as image:
                assert image.size == (row["WIDTH"], row["HEIGHT"])
                formats.add(image.format)
        except Image.UnidentifiedImageError:
            assert path.read_bytes().startswith(b"<!DOCTYPE html>")
    assert formats == {"JPEG", "PNG", "WEBP"}
    assert len({(r["WIDTH"], r["HEIGHT"]) for r in rows}) >= 6
    assert sum(r["URL"] is None for r in rows) == 1
    assert len(list(images.iterdir())) == 12 + 1  # the good images and the HTML page; the 404 one is absent


def test_jdb_layout(sample_data, expected):
    info = expected["jdb"]
    lines = (sample_data / info["manifest"]).read_text().splitlines()
    parsed = []
    for line in lines:
        try:
            parsed.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    assert len(parsed) == info["rows"] - 1
    imgs = sample_data / "jdb/data/train/imgs"
    present = [row for row in parsed if (imgs / row["img_path"]).exists()]
    assert len(present) == 8 and all(row["img_path"].startswith("./000/") for row in parsed)
    assert all(set(row["Task1"]) == {"Style", "Content"} for row in parsed)
    assert any("Task2" in row for row in parsed) and any("Task2" not in row for row in parsed)


def test_same_seed_same_bytes_other_seed_other_data(tmp_path):
    """The console script, twice with one seed: identical files; another seed: other keys."""
    runs = [tmp_path / "a", tmp_path / "b"]
    for out in runs:
        proc = subprocess.run(
            [CLI, "sample-data", str(out), "--seed", "1", "--videos", "3", "--images", "3"],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert proc.returncode == 0, proc.stderr
        assert "webvid" in proc.stdout and "expected.json" in proc.stdout
    files = [sorted(p.relative_to(out) for p in out.rglob("*") if p.is_file()) for out in runs]
    assert files[0] == files[1] and len(files[0]) > 10
    for relative in files[0]:
        assert (runs[0] / relative).read_bytes() == (runs[1] / relative).read_bytes(), relative
    first = json.loads((runs[0] / "expected.json").read_text())
    assert first["webvid"]["rows"] == 3 + 6 and first["laion_coco"]["rows"] == 3 + 3
    other = generate(str(tmp_path / "c"), seed=2, videos=3, images=3, jdb_images=1)
    for name in ("webvid", "laion_coco", "jdb"):
        assert not set(other[name]["keys"]) & set(first[name]["keys"])


def test_cli_help_and_bad_arguments(tmp_path):
    proc = subprocess.run([CLI, "sample-data", "--help"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "--videos" in proc.stdout and "--pack-jdb" in proc.stdout
    with pytest.raises(ValueError, match="videos must be >= 0"):
        generate(str(tmp_path), videos=-1)
