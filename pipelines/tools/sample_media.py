"""Media for the sample datasets: seeded H.264 mp4s with moving content, images, captions, broken files."""

from __future__ import annotations

import io
import zlib
from collections.abc import Iterator

import av
import numpy as np
from PIL import Image, ImageDraw

WORDS = (
    "a slow aerial shot of green hills under a cloudy sky; close up of coffee being poured into a white cup, "
    "a woman walking her dog along the beach at sunset. timelapse of city traffic at night with light trails; "
    "young man typing on a laptop in a bright modern office - snow falling on pine trees in the mountains, "
    "waves crashing against dark rocks, a red kite flying above a field of sunflowers: golden wheat moving "
    "in the wind, an old steam train crossing a stone bridge. cat sleeping on a sofa near the window"
).split()


def rng_for(name: str, seed: int) -> np.random.Generator:
    """A generator seeded from a name and the user's seed (never from an index)."""
    return np.random.default_rng([seed, zlib.crc32(name.encode("utf-8"))])


def caption(rng: np.random.Generator, min_words: int = 3, max_words: int = 40) -> str:
    """A caption of varied length; some carry quotes, commas or a non-ASCII word (CSV quoting is tested)."""
    n = int(rng.integers(min_words, max_words + 1))
    words = [WORDS[i] for i in rng.integers(0, len(WORDS), n)]
    text = " ".join(words).strip(" ,;:.-")
    style = int(rng.integers(0, 5))
    if style == 1:
        text = f'"{text}", stock footage'
    elif style == 2:
        text = text + ", café, 4k"
    return text[0].upper() + text[1:]


def video_frames(
    width: int, height: int, count: int, fps: float, rng: np.random.Generator
) -> Iterator[np.ndarray]:
    """`count` RGB frames: a horizontally moving gradient and a square on a Lissajous path."""
    ramp = (np.arange(2 * width) % width * 255 // width).astype(np.uint8)
    vertical = (np.arange(height) * 255 // height).astype(np.uint8)[:, None]
    color = rng.integers(0, 256, 3).astype(np.uint8)
    speed, side = float(rng.uniform(0.15, 0.6)), min(width, height) // 4
    frame = np.empty((height, width, 3), np.uint8)
    for t in range(count):
        seconds = t / fps
        shift = int(seconds * width * speed) % width
        frame[..., 0] = ramp[shift : shift + width]
        frame[..., 1] = vertical
        frame[..., 2] = 255 - frame[..., 0]
        x = int((width - side) * (0.5 + 0.5 * np.sin(seconds * 2.0)))
        y = int((height - side) * (0.5 + 0.5 * np.cos(seconds * 1.5)))
        frame[y : y + side, x : x + side] = color
        yield frame


def write_video(path: str, width: int, height: int, fps: int, frames: int, rng: np.random.Generator) -> None:
    """An H.264 (libx264, yuv420p, ultrafast) mp4; moov at the end (no faststart), like most encoders."""
    with av.open(path, "w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"preset": "ultrafast", "crf": "30"}
        stream.codec_context.thread_count = 1  # one thread: the same bytes on every run
        for array in video_frames(width, height, frames, fps, rng):
            for packet in stream.encode(av.VideoFrame.from_ndarray(array, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def image_bytes(width: int, height: int, fmt: str, rng: np.random.Generator) -> bytes:
    """An image of the given size and format (JPEG, PNG, WEBP): a gradient with an ellipse and a bar."""
    xs = np.linspace(0, 1, width, dtype=np.float32)[None, :]
    ys = np.linspace(0, 1, height, dtype=np.float32)[:, None]
    base = rng.uniform(0, 1, (3, 2)).astype(np.float32)
    channels = [(a * xs + b * ys) / max(a + b, 1e-3) for a, b in base]
    array = (np.stack(np.broadcast_arrays(*channels), axis=-1) * 255).astype(np.uint8)
    image = Image.fromarray(array)
    draw = ImageDraw.Draw(image)
    x0, y0 = int(rng.integers(0, width // 2)), int(rng.integers(0, height // 2))
    draw.ellipse(
        [x0, y0, x0 + width // 3, y0 + height // 3], fill=tuple(int(v) for v in rng.integers(0, 256, 3))
    )
    draw.rectangle([0, height * 3 // 4, width - 1, height * 3 // 4 + max(2, height // 20)], fill=(20, 20, 20))
    out = io.BytesIO()
    options = {"JPEG": {"quality": 85}, "PNG": {"optimize": False}, "WEBP": {"quality": 80, "method": 0}}[fmt]
    image.save(out, format=fmt, **options)
    return out.getvalue()


NOT_A_VIDEO = b"This is a text file named .mp4 on purpose: the decode stage must reject it.\n" * 4
HTML_PAGE = (
    b"<!DOCTYPE html>\n<html><head><title>Image not found</title></head>\n"
    b"<body><h1>Sorry, this image is no longer available.</h1></body></html>\n"
)
