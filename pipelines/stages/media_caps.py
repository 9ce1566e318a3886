"""Hostile-media rules, checked on headers before any pixel is decoded: image pixel cap, video probe and caps."""

from __future__ import annotations

import io
import os
import struct


class DecodeFailure(Exception):
    """A rejected item: `reason` is the error row's reason (undecodable, too_short, ...)."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


def image_pixel_cap(req: dict) -> int | None:
    """decode.max_pixels from the request (None: no cap)."""
    return int(req["max_pixels"]) if req.get("max_pixels") else None


def check_image(width: int, height: int, cap: int | None) -> None:
    """DecodeFailure too_many_pixels if an image's header size is over decode.max_pixels (`cap`)."""
    if cap and width * height > cap:
        raise DecodeFailure(
            "too_many_pixels", f"{width}x{height} = {width * height} pixels > decode.max_pixels={cap}"
        )


def _source(req: dict):
    if req.get("path"):
        if os.path.getsize(req["path"]) == 0:
            raise DecodeFailure("empty_file", f"{req['path']} is empty")
        return req["path"]
    data = req.get("data") or b""
    if not data:
        raise DecodeFailure("empty_file", "no bytes")
    return io.BytesIO(data)


def _boxes(f, start: int, end: int):
    pos = start
    while pos + 8 <= end:
        f.seek(pos)
        size, kind = struct.unpack(">I4s", f.read(8))
        header = 8
        if size == 1:
            size, header = struct.unpack(">Q", f.read(8))[0], 16
        elif size == 0:
            size = end - pos
        if size < header:
            return
        yield kind, pos + header, pos + size
        pos += size


def mp4_size(src) -> tuple[int, int] | None:
    """(width, height) of an MP4/MOV's first video track from its tkhd box, without decoding; None if unknown."""
    try:
        f = open(src, "rb") if isinstance(src, str) else src
        with f:
            f.seek(0, 2)
            end = f.tell()
            for kind, s, e in _boxes(f, 0, end):
                if kind != b"moov":
                    continue
                for kind2, s2, e2 in _boxes(f, s, e):
                    if kind2 != b"trak":
                        continue
                    for kind3, _s3, e3 in _boxes(f, s2, e2):
                        if kind3 == b"tkhd":
                            f.seek(e3 - 8)
                            w, h = struct.unpack(">II", f.read(8))
                            if w >> 16 and h >> 16:
                                return w >> 16, h >> 16
    except (OSError, struct.error):
        pass
    return None


def _cap(req: dict, name: str):
    """A size cap from the request (None: no cap)."""
    value = req.get(name)
    return None if value is None else float(value)


def check_video(req: dict, width: int, height: int, frames: int | None, duration: float | None) -> None:
    """DecodeFailure if a video is over the request's caps: video_too_large (frame size) or too_long."""
    cap_px, cap_side = _cap(req, "max_video_pixels"), _cap(req, "max_video_side")
    if cap_px is not None and width * height > cap_px:
        raise DecodeFailure(
            "video_too_large",
            f"{width}x{height} = {width * height} pixels > decode.max_video_pixels={cap_px:.0f}",
        )
    if cap_side is not None and max(width, height) > cap_side:
        raise DecodeFailure(
            "video_too_large", f"{width}x{height}: a side > decode.max_video_side={cap_side:.0f}"
        )
    cap_s, cap_n = _cap(req, "max_duration_s"), _cap(req, "max_frames")
    if cap_s is not None and duration is not None and duration > cap_s:
        raise DecodeFailure("too_long", f"{duration:.1f} s > decode.max_duration_s={cap_s:g}")
    if cap_n is not None and frames is not None and frames > cap_n:
        raise DecodeFailure("too_long", f"{frames} frames > decode.max_frames={cap_n:.0f}")


def probe_video(req: dict) -> tuple[int, int]:
    """(width, height) of the first video stream from the container's headers (PyAV: no frames decoded
    here), after checking the caps. no_video_stream for audio-only and zero-stream files."""
    import av

    try:
        container = av.open(_source(req), metadata_errors="ignore")
    except Exception as exc:  # av.FFmpegError (not a container FFmpeg knows), OSError, ...
        raise DecodeFailure("undecodable", f"{type(exc).__name__}: {str(exc)[:300]}") from exc
    with container:
        return probe_container(req, container)


def probe_container(req: dict, container) -> tuple[int, int]:
    """probe_video's checks on an already open PyAV container (the pyav backend decodes from it next)."""
    import av

    try:
        if not container.streams.video:
            kinds = sorted({s.type for s in container.streams}) or ["no streams"]
            raise DecodeFailure("no_video_stream", f"streams: {', '.join(kinds)}")
        stream = container.streams.video[0]
        width, height = int(stream.codec_context.width or 0), int(stream.codec_context.height or 0)
        frames = int(stream.frames or 0) or None  # 0: the header does not say
        if stream.duration and stream.time_base:
            duration = float(stream.duration * stream.time_base)
        elif container.duration:
            duration = container.duration / av.time_base
        else:
            duration = None
    except DecodeFailure:
        raise
    except Exception as exc:  # av.FFmpegError, broken headers, ...
        raise DecodeFailure("undecodable", f"{type(exc).__name__}: {str(exc)[:300]}") from exc
    if width <= 0 or height <= 0:
        raise DecodeFailure("undecodable", f"the video stream has no frame size ({width}x{height})")
    check_video(req, width, height, frames, duration)
    return width, height
