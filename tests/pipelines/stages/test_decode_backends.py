"""decode.backend: decord | pyav give the same frames for the same indices (decord's: the n-th frame in
presentation order), pixel for pixel, on real H.264 mp4s written here: constant, rational (30000/1001) and
variable frame rates, with B-frames and short GOPs so that clips start after a seek."""

from __future__ import annotations

import fractions

import av
import numpy as np
import pytest

import tests.reliability.test_hostile_media as hostile
from pipelines.config import DecodeConfig
from pipelines.stages.decode import DecodeStage, frames_of
from pipelines.stages.decode_worker import decode, decode_scale
from pipelines.stages.rows import new_row, table_of
from pipelines.stages.video_backends import DecordClip, PyAVClip
from tests.reliability.test_hostile_media import media  # noqa: F401  (fixture)

BITS, CELL, BAND = 9, 16, 32  # the frame number, drawn as 9 black/white cells across the top band


def _pattern(n: int, w: int, h: int, rng: np.random.Generator) -> np.ndarray:
    """A frame that says its number: binary cells in a band over textured content unique to the frame."""
    frame = rng.integers(40, 216, (h // 8, w // 8, 3), dtype=np.uint8).repeat(8, 0).repeat(8, 1)
    frame = np.ascontiguousarray(frame[:h, :w])
    frame[:BAND] = 128
    for bit in range(BITS):
        frame[4 : BAND - 4, bit * CELL * 2 + 4 : bit * CELL * 2 + 4 + CELL] = 255 if (n >> bit) & 1 else 0
    return frame


def frame_number(frame: np.ndarray, drawn=(320, 192)) -> int:
    """The number _pattern drew on a frame of size `drawn` (read at each cell's center: survives lossy
    coding and downscaling)."""
    h, w = frame.shape[:2]
    y = int(BAND / 2 * h / drawn[1])
    xs = [int((bit * CELL * 2 + 4 + CELL / 2) * w / drawn[0]) for bit in range(BITS)]
    return sum(1 << bit for bit, x in enumerate(xs) if frame[y, x].mean() > 128)


def write_h264(path, w, h, frames, *, rate=30, pts=None, bframes=True, gop=12):
    """An H.264 mp4 of `frames` numbered frames; `pts` (in 1/90000 s) makes it variable-frame-rate."""
    rng = np.random.default_rng(frames)
    with av.open(str(path), "w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=rate)
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        stream.options = {"preset": "veryfast", "crf": "18", "g": str(gop), "bf": "2" if bframes else "0"}
        stream.codec_context.thread_count = 1
        if pts is not None:
            stream.codec_context.time_base = fractions.Fraction(1, 90000)
        for n in range(frames):
            frame = av.VideoFrame.from_ndarray(_pattern(n, w, h, rng), format="rgb24")
            if pts is not None:
                frame.pts, frame.time_base = pts[n], fractions.Fraction(1, 90000)
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


W, H = 320, 192


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    root = tmp_path_factory.mktemp("backends")
    steps = np.random.default_rng(7).choice([1500, 3000, 6000], 89)  # 60, 30 and 15 fps steps
    files = {
        "cfr30": (30, None, True),
        "ntsc": (fractions.Fraction(30000, 1001), None, True),
        "vfr": (30, [0, *np.cumsum(steps).tolist()], True),
        "no_bframes": (25, None, False),
    }
    out = {}
    for name, (rate, pts, bframes) in files.items():
        out[name] = root / f"{name}.mp4"
        write_h264(out[name], W, H, 90, rate=rate, pts=pts, bframes=bframes)
    return out


def _req(path, **kw):
    return {"path": str(path), "kind": "video", "key": "k", "threads": 1, "decode_resize": False, **kw}


def _read(cls, path, indices, scale=lambda size: None, **kw):
    clip = cls(_req(path, **kw), scale)
    try:
        return clip.num_frames, clip.fps, np.asarray(clip.read(indices))
    finally:
        clip.close()


INDEX_SETS = [
    list(range(0, 48, 3)),  # from the start
    list(range(41, 89, 3)),  # after a seek, to the last frame
    [5, 6, 7, 30, 29, 70, 70, 13],  # any order, repeats, across GOPs
    [89],
]


@pytest.mark.parametrize("name", ["cfr30", "ntsc", "vfr", "no_bframes"])
def test_same_frames_for_the_same_indices(videos, name):
    path = videos[name]
    for indices in INDEX_SETS:
        n_d, fps_d, ref = _read(DecordClip, path, indices)
        n_p, fps_p, got = _read(PyAVClip, path, indices)
        assert (n_p, fps_p) == (n_d, pytest.approx(fps_d, rel=1e-9)) and n_d == 90
        assert [frame_number(f) for f in ref] == indices  # decord's index is the n-th frame shown
        assert got.dtype == np.uint8 and got.shape == ref.shape
        assert np.array_equal(got, ref), f"{name} {indices}: max diff {np.abs(got.astype(int) - ref).max()}"
    if name == "vfr":
        assert 15 < fps_d < 60  # a real VFR average, not the 30 the stream was declared at
    if name == "ntsc":
        assert fps_d == pytest.approx(30000 / 1001)


def test_same_frames_when_scaled_while_decoding(videos):
    """decode-time scaling: PyAV runs the filter graph decord runs (scale=W:H:flags=bilinear -> rgb24)."""
    for name in ("ntsc", "vfr"):
        indices = list(range(10, 58, 3))
        scale = lambda size: (144, 86)  # noqa: E731
        _, _, ref = _read(
            DecordClip, videos[name], indices, scale, known_width=W, known_height=H, decode_resize=True
        )
        _, _, got = _read(PyAVClip, videos[name], indices, scale, decode_resize=True)
        assert ref.shape == (16, 86, 144, 3)
        assert np.array_equal(got, ref)
        assert [frame_number(f) for f in got] == indices


@pytest.mark.parametrize("start", ["start", "random", "center"])
def test_the_decode_stage_with_either_backend(videos, start):
    """Through the guarded decoder process, from files and bytes: same rows, same frames, same metadata."""
    rows = [
        new_row(
            key=f"k{i}",
            source="webvid",
            uri=str(p),
            local_path=str(p),
            kind="video",
            stage="128x128",
            shard=0,
            shard_rows=1,
        )
        for i, p in enumerate(videos.values())
    ]
    rows.append(dict(rows[1], key="bytes", local_path=None, data=videos["ntsc"].read_bytes()))
    out = {}
    for backend in ("decord", "pyav"):
        stage = DecodeStage({"num_frames": 16, "frame_stride": 3, "start": start, "backend": backend})
        try:
            table = stage(table_of([dict(r) for r in rows]))
        finally:
            stage.decoder.close()
        out[backend] = table.to_pylist()
    for a, b in zip(out["decord"], out["pyav"]):
        assert not a["err_stage"] and not b["err_stage"], (a["err_detail"], b["err_detail"])
        for field in (
            "frame_indices",
            "frame_stride",
            "num_src_frames",
            "orig_width",
            "orig_height",
            "frames_shape",
        ):
            assert a[field] == b[field], field
        assert a["src_fps"] == pytest.approx(b["src_fps"])
        assert np.array_equal(frames_of(a), frames_of(b))


def test_decode_time_resize_in_process_matches(tmp_path):
    """A source >= 2x the target: both backends scale while decoding, to identical output."""
    path = tmp_path / "big.mp4"
    write_h264(path, 640, 384, 40, rate=fractions.Fraction(60000, 1001))
    base = _req(path, num_frames=8, frame_stride=3, start="center", width=128, height=128, decode_resize=True)
    assert decode_scale(base, (640, 384)) == (213, 128)
    results = [decode(dict(base, backend=b)) for b in ("decord", "pyav")]
    assert all(r["ok"] for r in results), results
    assert results[0]["frame_indices"] == results[1]["frame_indices"]
    assert (results[1]["orig_width"], results[1]["orig_height"]) == (640, 384)
    assert np.array_equal(results[0]["frames"], results[1]["frames"])


def test_backend_config():
    assert DecodeConfig().backend == "pyav"  # the faster stage (benchmarks/bench_decode.py)
    with pytest.raises(ValueError, match="decode.backend"):
        DecodeConfig(backend="opencv")


# ---- hostile media: the same checks (tests/reliability run the default, pyav), on the decord backend -----
@pytest.fixture
def decord_backend(monkeypatch):
    monkeypatch.setattr(
        hostile, "DecodeStage", lambda cfg, **kw: DecodeStage({**cfg, "backend": "decord"}, **kw)
    )


def test_hostile_media_under_the_default_caps_decord(media, decord_backend):  # noqa: F811
    hostile.test_hostile_media_under_the_default_caps(media)


def test_tight_caps_reject_big_and_long_media_decord(media, decord_backend):  # noqa: F811
    hostile.test_tight_caps_reject_big_and_long_media_and_keep_the_rest(media)


def test_broken_videos_fail_as_rows_on_pyav(tmp_path, videos):
    good = videos["cfr30"].read_bytes()
    cases = {
        "truncated": good[: len(good) // 2],
        "garbage": b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 20,
        "empty": b"",
    }
    rows = []
    for name, data in cases.items():
        p = tmp_path / f"{name}.mp4"
        p.write_bytes(data)
        rows.append(
            new_row(
                key=name,
                source="webvid",
                uri=str(p),
                local_path=str(p),
                kind="video",
                stage="64x64",
                shard=0,
                shard_rows=1,
            )
        )
    stage = DecodeStage({"num_frames": 8, "frame_stride": 2, "start": "start", "backend": "pyav"})
    try:
        out = stage(table_of(rows)).to_pylist()
        assert [r["err_reason"] for r in out][1:] == ["undecodable", "empty_file"]
        assert out[0]["err_reason"] in ("undecodable", None)  # the moov is at the end: nothing to index
        assert stage.decoder.restarts == 0
    finally:
        stage.decoder.close()
