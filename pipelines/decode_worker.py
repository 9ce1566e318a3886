"""Decoding proper (decord clips, PIL images, resize + center crop), run inside the guarded decoder process."""

from __future__ import annotations

import io
import math
import os
import pickle
import struct
import sys
import zlib

import numpy as np


class DecodeFailure(Exception):
    """A rejected item: `reason` is the error row's reason (undecodable, too_short, ...)."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason, self.detail = reason, detail


# ---- sizes ------------------------------------------------------------------------------------------
def nearest_bucket(width: int, height: int, buckets: list[tuple[int, int]]) -> tuple[int, int]:
    """The bucket whose aspect ratio is nearest (in log space) to width/height; ties: first listed."""
    aspect = math.log(width / height)
    return min(buckets, key=lambda b: abs(math.log(b[0] / b[1]) - aspect))


def cover_size(width: int, height: int, target_w: int, target_h: int) -> tuple[int, int]:
    """Smallest size of the same aspect that covers the target (short-side resize before a center crop)."""
    scale = max(target_w / width, target_h / height)
    return max(target_w, round(width * scale)), max(target_h, round(height * scale))


def resize_crop(frames: np.ndarray, target_w: int, target_h: int) -> np.ndarray:
    """uint8 [T,H,W,3] -> short-side resize (bicubic, PIL) and center crop to [T,target_h,target_w,3]."""
    from PIL import Image

    t, h, w, _ = frames.shape
    rw, rh = cover_size(w, h, target_w, target_h)
    left, top = (rw - target_w) // 2, (rh - target_h) // 2
    if (rw, rh) == (w, h):  # already the cover size (decode-time resize): crop only
        return np.ascontiguousarray(frames[:, top : top + target_h, left : left + target_w])
    out = np.empty((t, target_h, target_w, 3), dtype=np.uint8)
    for i in range(t):
        img = Image.fromarray(frames[i])
        if (rw, rh) != (w, h):
            img = img.resize((rw, rh), Image.BICUBIC)
        out[i] = np.asarray(img)[top : top + target_h, left : left + target_w]
    return out


# ---- clip planning ----------------------------------------------------------------------------------
def plan_clip(num_src: int, fps: float, req: dict) -> tuple[list[int], int]:
    """Frame indices and the stride used for a clip of req['num_frames'] frames; DecodeFailure if too short."""
    n = int(req["num_frames"])
    if req.get("target_fps"):
        stride = max(1, round(fps / float(req["target_fps"])))
    else:
        stride = int(req["frame_stride"])
    if num_src < n:
        raise DecodeFailure("too_short", f"{num_src} frames < decode.num_frames={n}")
    span = (n - 1) * stride + 1
    if span > num_src:
        if not req.get("adapt_stride", True):
            raise DecodeFailure("too_short", f"{num_src} frames < {span} needed at stride {stride}")
        stride = max(1, (num_src - 1) // max(1, n - 1))
        span = (n - 1) * stride + 1
    slack = num_src - span
    policy = req.get("start", "random")
    if policy == "start" or slack == 0:
        start = 0
    elif policy == "center":
        start = slack // 2
    else:
        rng = np.random.default_rng(zlib.crc32(f"{req.get('seed', 0)}:{req['key']}".encode()))
        start = int(rng.integers(0, slack + 1))
    return [start + i * stride for i in range(n)], stride


def _target(req: dict, width: int, height: int) -> tuple[int, int]:
    buckets = req.get("buckets") or []
    if buckets:
        return nearest_bucket(width, height, [tuple(b) for b in buckets])
    return int(req["width"]), int(req["height"])


# ---- decoders ---------------------------------------------------------------------------------------
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


def decode_video(req: dict) -> dict:
    """A clip of num_frames frames at a stride, resized and center-cropped to the target size."""
    import decord

    src = _source(req)
    threads = int(req.get("threads", 1))
    size, scaled = None, {}
    if req.get("decode_resize"):  # decord scales while decoding (cheap) when the source size is known
        size = (req["known_width"], req["known_height"]) if req.get("known_width") else mp4_size(_source(req))
    if size:
        rw, rh = cover_size(*size, *_target(req, *size))
        if rw < size[0]:
            scaled = {"width": rw, "height": rh}
    try:
        vr = decord.VideoReader(src, ctx=decord.cpu(0), num_threads=threads, **scaled)
        num_src, fps = len(vr), float(vr.get_avg_fps())
    except Exception as exc:  # decord raises RuntimeError or DECORDError (a plain Exception subclass)
        raise DecodeFailure("undecodable", f"{type(exc).__name__}: {str(exc)[:300]}") from exc
    if not fps or not math.isfinite(fps) or fps <= 0:
        fps = float(req.get("fps") or 0.0)
        if fps <= 0:
            raise DecodeFailure("undecodable", "the video has no frame rate")
    indices, stride = plan_clip(num_src, fps, req)
    try:
        frames = vr.get_batch(indices).asnumpy()
    except Exception as exc:  # broken files often fail only here, on a later batch
        raise DecodeFailure("undecodable", f"{type(exc).__name__}: {str(exc)[:300]}") from exc
    if frames.ndim != 4 or frames.shape[0] != len(indices) or frames.shape[-1] != 3:
        raise DecodeFailure("undecodable", f"decord returned frames of shape {list(frames.shape)}")
    orig_w, orig_h = size if size else (frames.shape[2], frames.shape[1])
    tw, th = _target(req, orig_w, orig_h)
    out = resize_crop(frames, tw, th)
    return {
        "frames": out,
        "src_fps": fps,
        "sample_fps": fps / stride,
        "frame_stride": stride,
        "frame_indices": indices,
        "num_src_frames": num_src,
        "src_duration": num_src / fps,
        "orig_width": orig_w,
        "orig_height": orig_h,
    }


def decode_image(req: dict) -> dict:
    """An image with EXIF orientation applied, as RGB, resized and center-cropped: frames [1,H,W,3]."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    src = _source(req)
    try:
        img = Image.open(src)
        if req.get("decode_resize") and img.format == "JPEG":  # decode-time downscale (DCT scaling)
            ow, oh = img.size
            tw, th = _target(req, ow, oh)
            img.draft("RGB", cover_size(ow, oh, tw, th))
            img.info["orig_size"] = (ow, oh)
        orig = img.info.get("orig_size", img.size)
        img.load()
        img = ImageOps.exif_transpose(img)
    except UnidentifiedImageError as exc:
        raise DecodeFailure("not_an_image", str(exc)[:300]) from exc
    except Exception as exc:  # truncated data, decompression bombs, ...
        raise DecodeFailure("undecodable", f"{type(exc).__name__}: {str(exc)[:300]}") from exc
    if img.mode in ("RGBA", "LA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, rgba)
    img = img.convert("RGB")
    w, h = img.size
    if orig != img.size and (orig[1], orig[0]) != img.size:  # drafted: report the file's own size
        w, h = (orig[1], orig[0]) if (w > h) != (orig[0] > orig[1]) else orig
    tw, th = _target(req, *img.size)
    out = resize_crop(np.asarray(img)[None], tw, th)
    return {"frames": out, "orig_width": w, "orig_height": h, "frame_indices": [0], "frame_stride": 1}


def decode(req: dict) -> dict:
    """Decode one request; returns {"ok": True, ...} or {"ok": False, "reason", "detail"}."""
    try:
        result = decode_video(req) if req["kind"] == "video" else decode_image(req)
    except DecodeFailure as exc:
        return {"ok": False, "reason": exc.reason, "detail": exc.detail}
    except MemoryError:
        return {"ok": False, "reason": "undecodable", "detail": "out of memory (decode.memory_limit_mb)"}
    except Exception as exc:
        return {"ok": False, "reason": "undecodable", "detail": f"{type(exc).__name__}: {str(exc)[:300]}"}
    frames = np.ascontiguousarray(result["frames"])
    result.update(ok=True, frames=frames, frames_shape=list(frames.shape))
    return result


# ---- the process protocol: requests 8-byte length + pickle; results see write_result ----------------------------------------
def write_msg(stream, obj) -> None:
    data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    stream.write(struct.pack("<Q", len(data)))
    stream.write(data)
    stream.flush()


def write_result(stream, result: dict) -> None:
    """A decode result: 16-byte header (metadata length, frames length), pickled metadata, then the raw
    frames straight from the array's memory (no tobytes or pickle copies of a multi-MB clip)."""
    frames = result.pop("frames", None)
    meta = pickle.dumps(result, protocol=pickle.HIGHEST_PROTOCOL)
    payload = memoryview(frames).cast("B") if frames is not None else b""
    stream.write(struct.pack("<QQ", len(meta), len(payload)))
    stream.write(meta)
    if len(payload):
        stream.write(payload)
    stream.flush()


def read_exact(stream, n: int) -> bytes:
    parts, got = [], 0
    while got < n:
        chunk = stream.read(n - got)
        if not chunk:
            raise EOFError("stream closed")
        parts.append(chunk)
        got += len(chunk)
    return b"".join(parts)


def serve(memory_limit_mb: int) -> None:
    """Answer decode requests on stdin/stdout until stdin closes (stray prints go to stderr)."""
    out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    inp = sys.stdin.buffer
    import decord  # noqa: F401  (loaded before the memory limit: the limit is for decoding)
    from PIL import Image  # noqa: F401

    if memory_limit_mb:
        import resource

        limit = int(memory_limit_mb) << 20
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    while True:
        try:
            (size,) = struct.unpack("<Q", read_exact(inp, 8))
            req = pickle.loads(read_exact(inp, size))
        except EOFError:
            return
        write_result(out, decode(req))


if __name__ == "__main__":
    serve(int(sys.argv[1]) if len(sys.argv) > 1 else 0)
