"""Hostile media through the real DecodeStage (guarded subprocess): decompression bombs, oversized and
overlong videos, files without a video stream. Each becomes exactly one error row with its own reason,
decided from headers before any pixel is decoded; normal media next to them still decode."""

from __future__ import annotations

import io
import struct
import time
import zlib
from fractions import Fraction

import av
import numpy as np
import pytest
from PIL import Image

from pipelines.stages.decode import DecodeStage, frames_of
from pipelines.stages.decode_worker import decode
from pipelines.stages.rows import new_row, rows_of, table_of
from pipelines.tools.sample_media import rng_for, video_frames

BOMB_SIDE = 30000  # 900 MP: 2.7 GB as RGB


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_claiming(width: int, height: int, *, complete: bool) -> bytes:
    """A 1-bit grayscale PNG whose IHDR says width x height. complete: a valid zlib stream of every
    (all-zero) row, ~110 KB that inflates to width*height/8 bytes (a real bomb); else a few rows only."""
    row = bytes(1 + -(-width // 8))  # filter byte + packed bits
    comp = zlib.compressobj(9)
    rows = height if complete else 4
    parts = [comp.compress(row * 1000) for _ in range(rows // 1000)] + [comp.compress(row * (rows % 1000))]
    idat = b"".join(parts) + comp.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", idat) + _chunk(b"IEND", b"")


def jpeg_bytes(width: int, height: int) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (width, height), (40, 120, 200)).save(out, "JPEG", quality=80)
    return out.getvalue()


def jpeg_claiming(width: int, height: int) -> bytes:
    """A small real JPEG with its SOF0 frame size rewritten to width x height (header bomb)."""
    data = bytearray(jpeg_bytes(64, 64))
    sof = data.index(b"\xff\xc0")  # marker, length (2), precision (1), height (2), width (2)
    data[sof + 5 : sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def write_clip(path, width: int, height: int, fps: int, frames: int, fmt: str = "mp4") -> None:
    """A real H.264 clip (libx264) in an mp4 or matroska container."""
    with av.open(str(path), "w", format=fmt) as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"preset": "ultrafast", "crf": "35"}
        for array in video_frames(width, height, frames, fps, rng_for("hostile", width)):
            for packet in stream.encode(av.VideoFrame.from_ndarray(array, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def write_audio_only(path) -> None:
    """An m4a with one AAC stream (a 1 s sine) and no video."""
    rate = 16000
    with av.open(str(path), "w", format="mp4") as container:
        stream = container.add_stream("aac", rate=rate)
        stream.layout = "mono"
        pcm = (0.3 * np.sin(2 * np.pi * 440 * np.arange(rate) / rate)).astype(np.float32)[None]
        frame = av.AudioFrame.from_ndarray(pcm, format="fltp", layout="mono")
        frame.sample_rate = rate
        for packet in [*stream.encode(frame), *stream.encode()]:
            container.mux(packet)


def write_zero_streams(path) -> None:
    """A container with no streams at all (FFmpeg's metadata format; the video muxers refuse zero streams)."""
    container = av.open(str(path), "w", format="ffmetadata")
    container.start_encoding()
    container.close()


def write_subtitles_only(path) -> None:
    """A matroska file whose only stream is an ASS subtitle track."""
    with av.open(str(path), "w", format="matroska") as container:
        stream = container.add_stream("ass")
        container.start_encoding()
        packet = av.Packet(b"0,0,Default,,0,0,0,,hello")
        packet.stream, packet.pts, packet.dts, packet.duration = stream, 0, 0, 1000
        packet.time_base = Fraction(1, 1000)
        container.mux(packet)


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile")
    (root / "bomb.png").write_bytes(png_claiming(BOMB_SIDE, BOMB_SIDE, complete=True))
    (root / "header_bomb.png").write_bytes(png_claiming(BOMB_SIDE, BOMB_SIDE, complete=False))
    (root / "header_bomb.jpg").write_bytes(jpeg_claiming(60000, 60000))
    (root / "big.jpg").write_bytes(jpeg_bytes(1200, 1000))  # 1.2 MP: over the tight cap below
    Image.new("RGB", (300, 200), (200, 30, 30)).save(root / "ok.png")
    write_clip(root / "clip64.mp4", 64, 64, 24, 48)  # 2 s
    write_clip(root / "clip32.mp4", 32, 32, 24, 48)  # 2 s
    write_clip(root / "long32.mp4", 32, 32, 12, 144)  # 12 s
    write_clip(root / "clip32.mkv", 32, 32, 24, 48, fmt="matroska")  # no frame count in the header
    write_audio_only(root / "audio.m4a")
    write_zero_streams(root / "zero.ffmeta")
    write_subtitles_only(root / "subs.mkv")
    return root


def _row(path, kind: str, *, as_bytes: bool = False):
    source = {"data": path.read_bytes(), "local_path": ""} if as_bytes else {"local_path": str(path)}
    return new_row(
        key=f"{kind}_{path.name.replace('.', '_')}_{int(as_bytes)}",
        source="hostile",
        uri=str(path),
        kind=kind,
        stage="64x64",
        shard=0,
        shard_rows=1,
        **source,
    )


def _run(stage: DecodeStage, rows: list[dict]) -> list[dict]:
    out = rows_of(stage(table_of(rows)))
    assert [r["key"] for r in out] == [r["key"] for r in rows]  # one row out per row in, in order
    for row in out:  # exactly one of: a decoded sample, an error row
        assert (row["err_stage"] == "") == (row["frames"] is not None)
    return out


def _outcome(row: dict) -> str:
    return row["err_reason"] if row["err_stage"] else "ok"


def test_hostile_media_under_the_default_caps(media):
    stage = DecodeStage({"num_frames": 8, "frame_stride": 2, "start": "start"})
    try:
        cases = [
            (_row(media / "ok.png", "image"), "ok"),
            (_row(media / "clip64.mp4", "video"), "ok"),
            (_row(media / "header_bomb.png", "image"), "too_many_pixels"),
            (_row(media / "header_bomb.jpg", "image", as_bytes=True), "too_many_pixels"),
            (_row(media / "audio.m4a", "video"), "no_video_stream"),
            (_row(media / "audio.m4a", "video", as_bytes=True), "no_video_stream"),
            (_row(media / "zero.ffmeta", "video"), "no_video_stream"),
            (_row(media / "subs.mkv", "video"), "no_video_stream"),
        ]
        out = _run(stage, [row for row, _ in cases])
        assert [_outcome(r) for r in out] == [want for _, want in cases]
        assert all(r["err_stage"] == "decode" for r in out[2:])
        assert frames_of(out[0]).shape == (1, 64, 64, 3) and frames_of(out[1]).shape == (8, 64, 64, 3)
        assert "decode.max_pixels" in out[2]["err_detail"] and "decode.max_pixels" in out[3]["err_detail"]
        assert "audio" in out[4]["err_detail"] and "no streams" in out[6]["err_detail"]

        # A real bomb (every row present: 112 MB of bits, 2.7 GB as RGB) is refused on its header, in
        # far less time than inflating and converting 900 MP would take, by the already running decoder.
        t0 = time.monotonic()
        (bomb,) = _run(stage, [_row(media / "bomb.png", "image")])
        elapsed = time.monotonic() - t0
        assert (bomb["err_stage"], bomb["err_reason"]) == ("decode", "too_many_pixels")
        assert f"{BOMB_SIDE}x{BOMB_SIDE}" in bomb["err_detail"] or "900000000" in bomb["err_detail"]
        assert elapsed < 1.0, elapsed
        assert stage.decoder.restarts == 0  # nothing above crashed or hung the decoder
    finally:
        stage.decoder.close()


def test_tight_caps_reject_big_and_long_media_and_keep_the_rest(media):
    stage = DecodeStage(
        {
            "num_frames": 8,
            "frame_stride": 2,
            "start": "start",
            "max_pixels": 1_000_000,
            "max_video_pixels": 2000,  # 32x32 passes, 64x64 does not
            "max_duration_s": 5,
            "max_frames": 40,
        }
    )
    try:
        stage.config.max_frames = None  # first batch: duration and size caps only
        cases = [
            (_row(media / "big.jpg", "image"), "too_many_pixels"),
            (_row(media / "ok.png", "image"), "ok"),
            (_row(media / "clip64.mp4", "video"), "video_too_large"),
            (_row(media / "clip64.mp4", "video", as_bytes=True), "video_too_large"),
            (_row(media / "long32.mp4", "video"), "too_long"),
            (_row(media / "clip32.mp4", "video"), "ok"),
        ]
        out = _run(stage, [row for row, _ in cases])
        assert [_outcome(r) for r in out] == [want for _, want in cases]
        assert "decode.max_pixels=1000000" in out[0]["err_detail"]
        assert "decode.max_video_pixels=2000" in out[2]["err_detail"]
        assert "decode.max_duration_s=5" in out[4]["err_detail"]
        assert frames_of(out[5]).shape == (8, 64, 64, 3)

        # The frame cap: the mp4 says 48 frames in its header; the matroska file does not, so there
        # decord's own count (after opening, before any frame is decoded) is what rejects it.
        with av.open(str(media / "clip32.mkv")) as container:
            assert container.streams.video[0].frames == 0  # matroska: no frame count in the header
        stage.config.max_frames = 40
        mp4, mkv = _run(stage, [_row(media / "clip32.mp4", "video"), _row(media / "clip32.mkv", "video")])
        assert (_outcome(mp4), _outcome(mkv)) == ("too_long", "too_long")
        assert "48 frames > decode.max_frames=40" in mkv["err_detail"]
    finally:
        stage.decoder.close()


def test_the_pixel_cap_is_checked_before_load(media):
    """header_bomb.png holds 4 of its 30000 rows: load() would fail (undecodable); the cap answers first.
    In-process decode, where PIL's own module-wide bomb limit is restored afterwards."""
    before = Image.MAX_IMAGE_PIXELS
    stage = DecodeStage({"num_frames": 8})
    request = stage.request(_row(media / "header_bomb.png", "image"))
    stage.decoder.close()
    result = decode(request)
    assert (result["ok"], result["reason"]) == (False, "too_many_pixels")
    assert decode(dict(request, max_pixels=None))["reason"] == "too_many_pixels"  # PIL's own limit
    assert Image.MAX_IMAGE_PIXELS == before
