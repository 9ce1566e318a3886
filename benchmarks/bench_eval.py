"""Benchmark of the eval metrics on CPU: per-video time of motion (DIS flow) and CLIP (tiny set) on synthetic clips.

    .venv/bin/python benchmarks/bench_eval.py [--videos 8] [--frames 16] [--size 256] [--clip DIR]

Synthetic 16-frame clips (a textured square moving over a textured background); --clip defaults to the tiny
set written into a temporary folder. Prints seconds per video for each metric family.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import numpy as np


def clips(n: int, frames: int, size: int) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        bg = (rng.random((size, size, 3)) * 255).astype(np.uint8)
        square = size // 3
        tex = (rng.random((square, square, 3)) * 255).astype(np.uint8)
        video = np.repeat(bg[None], frames, axis=0)
        for t in range(frames):
            x = min(size - square, 2 * t + i)
            video[t, size // 3 : size // 3 + square, x : x + square] = tex
        out.append(video)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--videos", type=int, default=8)
    parser.add_argument("--frames", type=int, default=16)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--clip", default=None, help="CLIP folder (default: the tiny set, written here)")
    args = parser.parse_args()
    from evaluation.clip import ClipEmbedder, clip_temp
    from evaluation.motion import motion_metrics

    videos = clips(args.videos, args.frames, args.size)
    start = time.perf_counter()
    for v in videos:
        motion_metrics(v)
    motion_s = (time.perf_counter() - start) / len(videos)
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.clip
        if folder is None:
            from encoders.tiny import write_tiny_models

            folder = write_tiny_models(tmp)
        clip = ClipEmbedder(folder)
        start = time.perf_counter()
        for v in videos:
            clip_temp(clip.embed_images(v))
        clip_s = (time.perf_counter() - start) / len(videos)
    print(
        f"{args.videos} videos of {args.frames}x{args.size}x{args.size}: motion {motion_s:.3f} s/video, "
        f"CLIP image embeddings {clip_s:.3f} s/video ({folder if args.clip else 'tiny set'})"
    )


if __name__ == "__main__":
    main()
