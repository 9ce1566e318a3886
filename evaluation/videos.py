"""Finding the videos of a folder, decoding them (PyAV) and matching each one with its prompt."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

VIDEO_EXTS = (".mp4", ".gif", ".webm", ".mov", ".avi", ".mkv")


def list_videos(folder: str | Path) -> list[Path]:
    """The folder's video files (not recursive), sorted by name."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: not a folder; pass a folder of mp4/gif videos")
    videos = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in VIDEO_EXTS)
    if not videos:
        raise FileNotFoundError(
            f"{folder}: no videos here ({', '.join(VIDEO_EXTS)}); point eval at such a folder"
        )
    return videos


def read_video(path: str | Path, max_frames: int = 0) -> np.ndarray:
    """All frames (or the first `max_frames`) as uint8 [T,H,W,3] RGB, decoded with PyAV (mp4, gif, ...)."""
    import av

    frames = []
    try:
        with av.open(str(path)) as container:
            for frame in container.decode(video=0):
                frames.append(frame.to_ndarray(format="rgb24"))
                if max_frames and len(frames) >= max_frames:
                    break
    except (av.error.FFmpegError, StopIteration) as exc:
        raise ValueError(f"{path}: cannot decode this video ({exc}); re-encode it as mp4 (H.264)") from exc
    if not frames:
        raise ValueError(f"{path}: no video frames decoded; re-encode it as mp4 (H.264)")
    return np.stack(frames)


def _generate_json_prompts(folder: Path, videos: list[Path]) -> dict[str, str] | None:
    path = folder / "generate.json"
    if not path.is_file():
        return None
    data = json.loads(path.read_text())
    samples = data.get("samples", []) if isinstance(data, dict) else data
    if not isinstance(samples, list):
        raise ValueError(
            f"{path}: expected a list of samples with `prompt` and `path` (or {{'samples': [...]}})"
        )
    by_name = {}
    for sample in samples:
        if isinstance(sample, dict) and sample.get("path") and isinstance(sample.get("prompt"), str):
            by_name[Path(sample["path"]).name] = sample["prompt"]
    return {v.name: by_name[v.name] for v in videos if v.name in by_name}


def match_prompts(folder: str | Path, videos: list[Path], prompts_file: str | None = None) -> dict[str, str]:
    """video file name -> prompt: generate.json in the folder, else `prompts_file` (one per line, in sorted
    file order), else a sidecar `<video stem>.txt`. Videos without a prompt are absent from the result."""
    folder = Path(folder)
    found = _generate_json_prompts(folder, videos)
    if found is not None:
        return found
    if prompts_file:
        lines = [line.strip() for line in Path(prompts_file).read_text().splitlines() if line.strip()]
        if len(lines) != len(videos):
            raise ValueError(
                f"{prompts_file}: {len(lines)} prompts for {len(videos)} videos in {folder}; --prompts needs "
                "one line per video, in the sorted order of the file names"
            )
        return {v.name: p for v, p in zip(videos, lines)}
    out = {}
    for v in videos:
        sidecar = v.with_suffix(".txt")
        if sidecar.is_file():
            out[v.name] = sidecar.read_text().strip()
    return out
