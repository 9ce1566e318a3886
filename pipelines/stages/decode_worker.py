"""Decoding proper (video clips by decord or PyAV, PIL images, resize + center crop), run inside the guarded decoder process."""

from __future__ import annotations

import math
import mmap
import os
import pickle
import struct
import sys
import time
import warnings
import zlib

import numpy as np

from pipelines.stages.media_caps import (
    DecodeFailure,
    _source,
    check_image,
    check_video,
    image_pixel_cap,
)


# ---- sizes ------------------------------------------------------------------------------------------
def nearest_bucket(width: int, height: int, buckets: list[tuple[int, int]]) -> tuple[int, int]:
    """The bucket whose aspect ratio is nearest (in log space) to width/height; ties: first listed."""
    aspect = math.log(width / height)
    return min(buckets, key=lambda b: abs(math.log(b[0] / b[1]) - aspect))


def cover_size(width: int, height: int, target_w: int, target_h: int) -> tuple[int, int]:
    """Smallest size of the same aspect that covers the target (short-side resize before a center crop)."""
    scale = max(target_w / width, target_h / height)
    return max(target_w, round(width * scale)), max(target_h, round(height * scale))


def crop_box(width: int, height: int, target_w: int, target_h: int) -> tuple[int, int, int, int]:
    """(left, top, w, h) of the centered region with the target's aspect ratio: what a short-side resize
    followed by a center crop keeps, cut before resizing so only kept pixels are resampled."""
    if width * target_h >= height * target_w:  # wider than the target: trim the sides
        w, h = min(width, max(1, round(height * target_w / target_h))), height
    else:
        w, h = width, min(height, max(1, round(width * target_h / target_w)))
    return (width - w) // 2, (height - h) // 2, w, h


def resize_crop(frames, target_w: int, target_h: int) -> np.ndarray:
    """uint8 [T,H,W,3] (numpy or torch) -> center crop to the target's aspect, then antialiased bicubic
    resize (PIL-equivalent, torch's uint8 kernels: ~8x faster than PIL per frame) to [T,target_h,target_w,3]."""
    import torch

    x = torch.as_tensor(frames)
    t, h, w, _ = x.shape
    left, top, cw, ch = crop_box(w, h, target_w, target_h)
    x = x[:, top : top + ch, left : left + cw]
    if (cw, ch) == (target_w, target_h):
        return np.ascontiguousarray(x.numpy())
    y = torch.nn.functional.interpolate(
        x.permute(0, 3, 1, 2),  # NCHW view of channels-last memory: no copy
        size=(target_h, target_w),
        mode="bicubic" if min(ch, cw) > 1 else "bilinear",
        antialias=True,
    )
    return np.ascontiguousarray(y.permute(0, 2, 3, 1).numpy())


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
# Measured (benchmarks/bench_decode.py, 1 thread): at 596x336 -> 256x256 decord's decode-time scaling
# costs 4 ms/clip more than decoding full size and resizing the crop; at 1280x720 it saves 10 ms.
DECODE_RESIZE_MIN_RATIO = 2.0


def decode_scale(req: dict, size: tuple[int, int]) -> tuple[int, int] | None:
    """The size to scale to while decoding (cover size of the target), or None where scaling costs more
    than it saves: unless it shrinks the frames at least DECODE_RESIZE_MIN_RATIO times."""
    rw, rh = cover_size(*size, *_target(req, *size))
    return (rw, rh) if size[0] >= DECODE_RESIZE_MIN_RATIO * rw else None


def decode_video(req: dict) -> dict:
    """A clip of num_frames frames at a stride, by the request's backend (decord | pyav; video_backends.py),
    at decoded size (`finish` resizes to "target")."""
    from pipelines.stages.video_backends import open_video

    _source(req)  # empty_file before any library sees it
    clip = open_video(req, lambda size: decode_scale(req, size))  # probes the headers: caps, streams
    num_src, fps = clip.num_frames, clip.fps
    try:
        if not fps or not math.isfinite(fps) or fps <= 0:
            fps = float(req.get("fps") or 0.0)
            if fps <= 0:
                raise DecodeFailure("undecodable", "the video has no frame rate")
        check_video(req, 0, 0, num_src, num_src / fps)  # the backend's own count: headers can understate it
        indices, stride = plan_clip(num_src, fps, req)
        frames = clip.read(indices)
    except BaseException:
        clip.close()
        raise
    if frames.ndim != 4 or frames.shape[0] != len(indices) or frames.shape[-1] != 3:
        raise DecodeFailure("undecodable", f"the decoder returned frames of shape {list(frames.shape)}")
    orig_w, orig_h = clip.size if clip.size else (frames.shape[2], frames.shape[1])
    return {
        "frames": frames,
        "reader": clip,  # closed by `finish`, off the decoding thread (closing decord costs ~0.4 ms)
        "target": _target(req, orig_w, orig_h),
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
    """An image with EXIF orientation applied, as RGB frames [1,H,W,3] (`finish` resizes to "target")."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    src = _source(req)
    cap = image_pixel_cap(req)
    bomb_limit = Image.MAX_IMAGE_PIXELS
    try:
        with warnings.catch_warnings():
            # PIL's own bomb check (a warning over MAX_IMAGE_PIXELS, an error over twice that) at our cap,
            # its warning raised: any path on which PIL meets a huge size ends as too_many_pixels.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            if cap:
                Image.MAX_IMAGE_PIXELS = cap
            img = Image.open(src)  # lazy: reads the header only
            ow, oh = img.size
            check_image(ow, oh, cap)  # before draft() and load(): nothing is decoded yet
            if req.get("decode_resize") and img.format == "JPEG":  # decode-time downscale (DCT scaling)
                tw, th = _target(req, ow, oh)
                img.draft("RGB", cover_size(ow, oh, tw, th))
            orig = (ow, oh)
            img.load()
            img = ImageOps.exif_transpose(img)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise DecodeFailure("too_many_pixels", f"{str(exc)[:300]} (decode.max_pixels={cap})") from exc
    except DecodeFailure:
        raise
    except UnidentifiedImageError as exc:
        raise DecodeFailure("not_an_image", str(exc)[:300]) from exc
    except Exception as exc:  # truncated data, broken headers, ...
        raise DecodeFailure("undecodable", f"{type(exc).__name__}: {str(exc)[:300]}") from exc
    finally:
        Image.MAX_IMAGE_PIXELS = bomb_limit
    if img.mode in ("RGBA", "LA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, rgba)
    img = img.convert("RGB")
    w, h = img.size
    if orig != img.size and (orig[1], orig[0]) != img.size:  # drafted: report the file's own size
        w, h = (orig[1], orig[0]) if (w > h) != (orig[0] > orig[1]) else orig
    return {
        "frames": np.array(img)[None],  # writable: torch refuses read-only arrays
        "target": _target(req, *img.size),
        "orig_width": w,
        "orig_height": h,
        "frame_indices": [0],
        "frame_stride": 1,
    }


def _failure(exc: BaseException) -> dict:
    if isinstance(exc, DecodeFailure):
        return {"ok": False, "reason": exc.reason, "detail": exc.detail}
    if isinstance(exc, MemoryError):
        return {"ok": False, "reason": "undecodable", "detail": "out of memory (decode.memory_limit_mb)"}
    return {"ok": False, "reason": "undecodable", "detail": f"{type(exc).__name__}: {str(exc)[:300]}"}


def decode_raw(req: dict) -> dict:
    """The decoding half of a request: {"ok": True, "frames" at decoded size, "target", ...} or a failure."""
    try:
        result = decode_video(req) if req["kind"] == "video" else decode_image(req)
    except Exception as exc:  # DecodeFailure, MemoryError, anything a broken file provokes
        return _failure(exc)
    result["ok"] = True
    return result


def finish(result: dict) -> dict:
    """The resizing half: an ok result's frames resized and center-cropped to its target, contiguous."""
    reader = result.pop("reader", None)
    if not result.get("ok"):
        return result
    try:
        frames = resize_crop(result.pop("frames"), *result.pop("target"))
    except Exception as exc:
        return _failure(exc)
    finally:
        if reader is not None:
            reader.close()
    result.update(frames=frames, frames_shape=list(frames.shape))
    return result


def decode(req: dict) -> dict:
    """Decode one request in this process; returns {"ok": True, "frames", ...} or {"ok": False, "reason", "detail"}."""
    return finish(decode_raw(req))


# ---- the process protocol ------------------------------------------------------------------------
# Requests: 8-byte length + pickle. Results: 16-byte header (metadata length, inline frames length), the
# pickled metadata, then the frames inline; or, when the parent shares a frame buffer, the frames lie in
# that buffer and the metadata says how many bytes ("shared_bytes").
class SharedFrames:
    """A frame buffer both processes map: a nameless memfd (nothing to leak when either dies), grown on demand."""

    STEP = 4 << 20

    def __init__(self, fd: int):
        self.fd, self.map = fd, None

    def view(self, n: int) -> memoryview:
        """The first n bytes of the buffer; grows the file (decoder side) and remaps as needed."""
        if self.map is None or len(self.map) < n:
            size = os.fstat(self.fd).st_size
            if size < n:
                size = -(-n // self.STEP) * self.STEP
                os.ftruncate(self.fd, size)
            if self.map is not None:
                self.map.close()
            self.map = mmap.mmap(self.fd, size)
        return memoryview(self.map)[:n]

    def close(self) -> None:
        if self.map is not None:
            self.map.close()
            self.map = None


def write_msg(stream, obj) -> None:
    data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    stream.write(struct.pack("<Q", len(data)))
    stream.write(data)
    stream.flush()


def write_result(stream, result: dict, shared: SharedFrames | None = None) -> None:
    """A decode result: the frames go to the shared buffer (or inline, raw from the array's memory) and
    only the metadata is pickled: no tobytes or pickle copies of a multi-MB clip."""
    frames = result.pop("frames", None)
    payload = b""
    if frames is not None and shared is not None:
        try:
            with shared.view(frames.nbytes) as view:
                np.copyto(np.frombuffer(view, dtype=np.uint8).reshape(frames.shape), frames)
            result["shared_bytes"] = frames.nbytes
        except (OSError, MemoryError, ValueError) as exc:  # no room under decode.memory_limit_mb
            result = {"ok": False, "reason": "undecodable", "detail": f"frame buffer: {exc}"}
    elif frames is not None:
        payload = memoryview(frames).cast("B")
    meta = pickle.dumps(result, protocol=pickle.HIGHEST_PROTOCOL)
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


def _mapped_bytes() -> int:
    """This process's current address-space size (VmSize), 0 where /proc is missing."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmSize:"):
                    return int(line.split()[1]) << 10
    except OSError:
        pass
    return 0


def serve(memory_limit_mb: int, shared_fds: list[int] | None = None) -> None:
    """Answer decode requests on stdin/stdout until stdin closes (stray prints go to stderr).

    Two steps overlap: while a helper thread resizes clip i and writes its result, the main thread is
    already decoding clip i+1 (decord and torch both release the GIL). Results leave in request order;
    a request's "slot" names the shared buffer its frames go to (the parent keeps slots of unread results busy).
    """
    out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    inp = sys.stdin.buffer
    import av  # noqa: F401  (the pyav backend and media_caps.probe_video; loaded before the memory limit)
    import decord  # noqa: F401  (loaded before the memory limit: the limit is for decoding)
    import torch
    from PIL import Image  # noqa: F401

    import pipelines.stages.video_backends  # noqa: F401

    torch.set_num_threads(1)
    slots = [SharedFrames(fd) for fd in shared_fds or []]
    if memory_limit_mb:
        import resource

        limit = _mapped_bytes() + (int(memory_limit_mb) << 20)  # room for decoding on top of the libraries
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    def finish_and_send(raw: dict, slot: int | None) -> None:
        try:
            write_result(out, finish(raw), slots[slot] if slot is not None and slots else None)
        except BaseException:  # the parent sees the process die and retries its items one by one
            os._exit(70)

    from concurrent.futures import ThreadPoolExecutor

    # Fault injection for the guard's tests: "abort:KEY" or "hang:KEY" makes the request with that key
    # crash or hang this process (never set outside tests).
    fault, _, fault_key = os.environ.get("LATENTCRAFTER_DECODE_FAULT", "").partition(":")

    with ThreadPoolExecutor(1, thread_name_prefix="finish") as finisher:
        while True:
            try:
                (size,) = struct.unpack("<Q", read_exact(inp, 8))
                req = pickle.loads(read_exact(inp, size))
            except EOFError:
                return
            if fault and req.get("key") == fault_key:
                os.abort() if fault == "abort" else time.sleep(3600)
            finisher.submit(finish_and_send, decode_raw(req), req.get("slot"))


if __name__ == "__main__":
    serve(
        int(sys.argv[1]) if len(sys.argv) > 1 else 0,
        [int(fd) for fd in sys.argv[2].split(",")] if len(sys.argv) > 2 else None,
    )
