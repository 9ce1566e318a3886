"""The decode stage on real mp4s and images: clip sampling, resize/crop, EXIF, and the guarded decoder."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from pipelines.stages.decode import DecodeStage, GuardedDecoder, default_buckets, frames_of
from pipelines.stages.decode_worker import (
    cover_size,
    crop_box,
    decode,
    nearest_bucket,
    plan_clip,
    resize_crop,
)
from pipelines.stages.rows import new_row, rows_of, table_of
from pipelines.tools.sample_media import NOT_A_VIDEO, rng_for, write_video


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    root = tmp_path_factory.mktemp("clips")
    rng = rng_for("test_decode", 0)
    write_video(str(root / "a.mp4"), 320, 180, 24, 48, rng)  # 2 s at 24 fps
    write_video(str(root / "short.mp4"), 160, 96, 24, 10, rng)
    (root / "empty.mp4").write_bytes(b"")
    (root / "text.mp4").write_bytes(NOT_A_VIDEO)
    data = (root / "a.mp4").read_bytes()
    (root / "truncated.mp4").write_bytes(data[: len(data) // 2])
    return root


def _row(path, kind="video", stage="256x256", **kw):
    kw.setdefault("local_path", str(path))
    return new_row(
        key=f"k_{kind}", source="webvid", uri=str(path), kind=kind, stage=stage, shard=0, shard_rows=1, **kw
    )


def _decode(rows, **cfg):
    stage = DecodeStage({"num_frames": 8, "frame_stride": 2, "start": "start", **cfg})
    try:
        return rows_of(stage(table_of(rows)))
    finally:
        stage.decoder.close()


def test_clip_of_n_frames_at_a_stride_resized_and_cropped(clips):
    (row,) = _decode([_row(clips / "a.mp4", stage="512x320")])
    assert row["err_stage"] == ""
    frames = frames_of(row)
    assert frames.shape == (8, 320, 512, 3) and frames.dtype == np.uint8
    assert row["frame_indices"] == list(range(0, 16, 2)) and row["frame_stride"] == 2
    assert row["src_fps"] == pytest.approx(24) and row["sample_fps"] == pytest.approx(12)
    assert (row["orig_width"], row["orig_height"]) == (320, 180) and row["num_src_frames"] == 48
    assert row["src_duration"] == pytest.approx(2.0)
    assert frames.std() > 1  # real pixels, not a blank buffer


def test_target_fps_random_start_and_adapted_stride(clips):
    (row,) = _decode([_row(clips / "a.mp4")], frame_stride=None, target_fps=6, start="random")
    assert row["frame_stride"] == 4 and row["sample_fps"] == pytest.approx(6)
    assert np.diff(row["frame_indices"]).tolist() == [4] * 7 and row["frame_indices"][-1] < 48
    again = _decode([_row(clips / "a.mp4")], frame_stride=None, target_fps=6, start="random")[0]
    assert again["frame_indices"] == row["frame_indices"]  # seeded by the key
    (short,) = _decode([_row(clips / "short.mp4")], frame_stride=4)  # 10 frames: stride drops to 1
    assert (
        short["err_stage"] == "" and short["frame_stride"] == 1 and short["frame_indices"] == list(range(8))
    )
    (rejected,) = _decode([_row(clips / "short.mp4")], frame_stride=4, adapt_stride=False)
    assert (rejected["err_stage"], rejected["err_reason"]) == ("decode", "too_short")
    (too_few,) = _decode([_row(clips / "short.mp4")], num_frames=16)
    assert too_few["err_reason"] == "too_short"


def test_broken_files_become_error_rows_and_the_stage_goes_on(clips):
    rows = [_row(clips / n) for n in ("empty.mp4", "text.mp4", "truncated.mp4", "a.mp4")]
    for i, row in enumerate(rows):
        row["key"] = f"k{i}"
    out = _decode(rows)
    assert [(r["err_stage"], r["err_reason"]) for r in out] == [
        ("decode", "empty_file"),
        ("decode", "undecodable"),
        ("decode", "undecodable"),
        ("", ""),
    ]
    assert frames_of(out[3]).shape == (8, 256, 256, 3)


def test_bytes_input_decodes_like_the_file(clips):
    by_path = _decode([_row(clips / "a.mp4")])[0]
    row = _row(clips / "a.mp4", local_path="", data=(clips / "a.mp4").read_bytes())
    by_bytes = _decode([row])[0]
    assert by_bytes["err_stage"] == "" and np.array_equal(frames_of(by_path), frames_of(by_bytes))


def _jpeg(size, **save):
    img = Image.new("RGB", size, (200, 30, 30))
    img.paste((30, 30, 200), (0, 0, size[0] // 2, size[1]))  # left half blue
    buf = io.BytesIO()
    img.save(buf, "JPEG", **save)
    return buf.getvalue()


def test_images_exif_modes_and_rejections(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    (tmp_path / "rot.jpg").write_bytes(_jpeg((400, 200), exif=exif))
    Image.new("RGBA", (300, 300), (0, 0, 0, 0)).save(tmp_path / "alpha.png")
    Image.new("P", (300, 200)).save(tmp_path / "pal.gif")
    (tmp_path / "page.jpg").write_bytes(b"<html><body>not an image</body></html>")
    (tmp_path / "empty.jpg").write_bytes(b"")
    names = ["rot.jpg", "alpha.png", "pal.gif", "page.jpg", "empty.jpg"]
    rows = [_row(tmp_path / n, kind="image") for n in names]
    for n, row in zip(names, rows):
        row["key"] = n.replace(".", "_")
    rot, alpha, pal, page, empty = _decode(rows)
    assert (rot["orig_width"], rot["orig_height"]) == (200, 400)  # EXIF orientation applied
    frames = frames_of(rot)
    assert frames.shape == (1, 256, 256, 3)
    top, bottom = frames[0, :64].mean(axis=(0, 1)), frames[0, -64:].mean(axis=(0, 1))
    assert top[2] > top[0] and bottom[0] > bottom[2]  # the blue half went to the top
    assert frames_of(alpha)[0].min() > 250  # transparent -> white, RGB
    assert frames_of(pal).shape == (1, 256, 256, 3)
    assert page["err_reason"] == "not_an_image" and empty["err_reason"] == "empty_file"


def test_bucketing_and_sizes():
    assert default_buckets("512x320") == [(512, 320), (320, 512), (384, 384)]
    assert nearest_bucket(300, 600, default_buckets("512x320")) == (320, 512)
    assert nearest_bucket(1000, 990, default_buckets("512x320")) == (384, 384)
    assert cover_size(596, 336, 256, 256) == (454, 256)
    assert crop_box(596, 336, 256, 256) == (130, 0, 336, 336)
    assert crop_box(320, 180, 256, 320) == (88, 0, 144, 180)
    assert plan_clip(100, 30.0, {"num_frames": 4, "frame_stride": 3, "start": "center", "key": "x"}) == (
        [45, 48, 51, 54],
        3,
    )


def test_bucketing_in_the_stage(tmp_path):
    Image.new("RGB", (300, 600), (9, 9, 9)).save(tmp_path / "tall.png")
    (row,) = _decode([_row(tmp_path / "tall.png", kind="image", stage="512x320")], bucketing=True)
    assert frames_of(row).shape == (1, 512, 320, 3) and (row["out_width"], row["out_height"]) == (320, 512)


def test_guard_timeout_crash_and_memory_cap(clips):
    request = DecodeStage({"num_frames": 8}).request(_row(clips / "a.mp4"))
    guard = GuardedDecoder(timeout_s=0.001)
    try:
        assert guard(request)["reason"] == "decode_timeout"
        guard.timeout_s = 60
        assert guard(request)["ok"]  # a fresh process after the kill
        guard.proc.kill()  # the decoder dies between items (segfault, OOM killer)
        guard.proc.wait()
        assert guard(request)["ok"]
    finally:
        guard.close()
    small = GuardedDecoder(timeout_s=60, memory_limit_mb=256)
    try:
        big = dict(request, width=4096, height=2304, num_frames=40, frame_stride=1)  # 1.1 GB of frames
        result = small(big)
        assert not result["ok"] and result["reason"] == "undecodable"
    finally:
        small.close()


def test_pipelined_results_come_in_order_and_match_in_process_decoding(clips):
    stage = DecodeStage({"num_frames": 8, "frame_stride": 2, "start": "start"})
    rows = [_row(clips / "a.mp4", stage=s) for s in ("256x256", "512x320", "320x512")]
    rows.insert(1, _row(clips / "text.mp4"))
    requests = [stage.request(r) for r in rows]
    try:
        results = stage.decoder.map(requests)
    finally:
        stage.decoder.close()
    assert [r["ok"] for r in results] == [True, False, True, True]
    for request, result in zip(requests, results):
        if result["ok"]:
            local = decode(request)
            assert result["frames_shape"] == local["frames_shape"]
            assert bytes(result["frames"]) == local["frames"].tobytes()
    assert results[2]["frames_shape"] == [8, 320, 512, 3] and results[3]["frames_shape"] == [8, 512, 320, 3]


def _keyed(clips, *keys):
    stage = DecodeStage({"num_frames": 8, "frame_stride": 2})
    return [dict(stage.request(_row(clips / "a.mp4")), key=k) for k in keys]


def test_a_decoder_that_dies_fails_only_the_item_it_died_on(clips, monkeypatch):
    monkeypatch.setenv("LATENTCRAFTER_DECODE_FAULT", "abort:bad")
    guard = GuardedDecoder(timeout_s=60, depth=2)
    try:
        results = guard.map(_keyed(clips, "ok1", "bad", "ok2", "ok3"))
    finally:
        guard.close()
    assert [r["ok"] for r in results] == [True, False, True, True]
    assert results[1]["reason"] == "undecodable" and "died" in results[1]["detail"]
    assert guard.restarts == 2  # once with two items in flight, once retrying "bad" alone


def test_a_hung_item_times_out_and_the_items_behind_it_still_decode(clips, monkeypatch):
    monkeypatch.setenv("LATENTCRAFTER_DECODE_FAULT", "hang:slow")
    guard = GuardedDecoder(timeout_s=8, depth=2)
    try:
        results = guard.map(_keyed(clips, "ok1", "slow", "ok2"))
    finally:
        guard.close()
    assert [r["ok"] for r in results] == [True, False, True]
    assert results[1]["reason"] == "decode_timeout" and guard.restarts == 1


def test_resize_crop_matches_pil_bicubic_on_the_kept_region():
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 256, (2, 336, 596, 3), dtype=np.uint8)  # noise: the hardest case
    out = resize_crop(frames, 256, 256)
    left, top, w, h = crop_box(596, 336, 256, 256)
    for i in range(2):
        ref = np.asarray(
            Image.fromarray(frames[i, top : top + h, left : left + w]).resize((256, 256), Image.BICUBIC)
        )
        diff = np.abs(out[i].astype(int) - ref.astype(int))
        assert diff.max() <= 2 and diff.mean() < 0.5
