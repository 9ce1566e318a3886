"""`latentcrafter eval` end to end on mp4s written here: eval.json, per-video JSON, report.html, --against."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.evaluation.conftest import moving_square, write_video

PROMPTS = ["a dog runs along the beach", "two cats sleeping on a red sofa", "snow falling on a quiet village"]


@pytest.fixture
def video_dir(tmp_path):
    folder = tmp_path / "gen"
    folder.mkdir()
    samples = []
    for i, prompt in enumerate(PROMPTS):
        frames = moving_square(num_frames=8, size=64, square=24, seed=i, speed=i)
        write_video(frames, folder / f"v{i}.mp4")
        samples.append({"prompt": prompt, "path": str(folder / f"v{i}.mp4"), "seed": i})
    (folder / "generate.json").write_text(json.dumps(samples))
    return folder


def test_eval_cli_end_to_end(video_dir, tiny_clip, tiny_i3d, tmp_path, capsys):
    from pipelines.cli import main

    torch.save({"weight": torch.randn(1, 32), "bias": torch.zeros(1)}, tmp_path / "head.pth")
    out = tmp_path / "out"
    args = [str(video_dir), "--out", str(out), "--clip", str(tiny_clip), "--real", str(video_dir)]
    args += ["--i3d", str(tiny_i3d), "--fvd-frames", "4", "--fvd-stride", "2", "--fvd-size", "32"]
    args += ["--aesthetic", str(tmp_path / "head.pth"), "--aesthetic-clip", str(tiny_clip), "--no-progress"]
    assert main(["eval", *args]) == 0
    summary = json.loads((out / "eval.json").read_text())
    assert summary["num_videos"] == 3 and summary["skipped"] == {}
    for key in ("clipsim", "clip_temp", "motion", "static_ratio", "warp_error", "aesthetic"):
        assert summary["counts"][key] == 3 and summary["metrics"][key] is not None
    assert summary["metrics"]["fvd"] == pytest.approx(0.0, abs=1e-6)  # the folder against itself
    assert summary["fvd"]["protocol"] == {
        "num_frames": 4,
        "stride": 2,
        "size": 32,
        "max_samples": 0,
        "detector": "i3d_torchscript.pt",
    }
    v0 = json.loads((out / "videos" / "v0.mp4.json").read_text())
    assert v0["prompt"] == PROMPTS[0] and v0["static_ratio"] == 1.0  # speed 0: static
    v2 = json.loads((out / "videos" / "v2.mp4.json").read_text())
    assert v2["static_ratio"] == 0.0 and v2["motion"] > 0.1
    html = (out / "report.html").read_text()
    assert "data:image/png;base64," in html and "CLIPSIM" in html and "http" not in html.split("<body>")[1]

    # --against: the same run compared with itself -> zero deltas; a run without models shows skips
    out2 = tmp_path / "out2"
    assert main(["eval", str(video_dir), "--out", str(out2), "--against", str(out), "--no-progress"]) == 0
    second = json.loads((out2 / "eval.json").read_text())
    assert "--clip" in second["skipped"]["clipsim"] and "--i3d" in second["skipped"]["fvd"]
    assert "--aesthetic" in second["skipped"]["aesthetic"]
    assert "--clip" in capsys.readouterr().err
    rows = second["against"]["metrics"]
    assert rows["motion"]["delta"] == pytest.approx(0.0, abs=1e-9)
    assert rows["clipsim"]["ours"] is None and rows["clipsim"]["theirs"] == summary["metrics"]["clipsim"]
    assert "Against" in (out2 / "report.html").read_text()


def test_prompts_file_sidecar_and_errors(tmp_path, tiny_clip):
    from evaluation.cli import main
    from evaluation.videos import list_videos, match_prompts

    folder = tmp_path / "vids"
    folder.mkdir()
    for i in range(2):
        write_video(
            moving_square(num_frames=3, size=32, square=12, seed=i, top=8, left=4), folder / f"b{i}.mp4"
        )
    videos = list_videos(folder)
    (folder / "b1.txt").write_text("a cat\n")
    assert match_prompts(folder, videos) == {"b1.mp4": "a cat"}
    (tmp_path / "prompts.txt").write_text("first\nsecond\n")
    assert match_prompts(folder, videos, str(tmp_path / "prompts.txt")) == {
        "b0.mp4": "first",
        "b1.mp4": "second",
    }
    (tmp_path / "short.txt").write_text("only one\n")
    with pytest.raises(ValueError, match="--prompts"):
        match_prompts(folder, videos, str(tmp_path / "short.txt"))
    assert main([str(tmp_path / "nothing-here"), "--no-progress"]) == 2
    out = tmp_path / "o"
    assert main([str(folder), "--out", str(out), "--clip", str(tiny_clip), "--no-progress"]) == 0
    summary = json.loads((out / "eval.json").read_text())
    assert summary["counts"]["clipsim"] == 1 and summary["counts"]["clip_temp"] == 2
    missing = main([str(folder), "--out", str(out), "--clip", str(tmp_path / "nope"), "--no-progress"])
    assert missing == 0 and "--clip" in json.loads((out / "eval.json").read_text())["skipped"]["clipsim"]


def test_preview_hook_logs_metrics(tiny_clip):
    """PreviewWriter._log_metrics: CLIP metrics with the tiny set, motion only otherwise, failures only warn."""
    from types import SimpleNamespace

    from trainer.preview import PreviewWriter

    class Logger:
        def __init__(self):
            self.scalars, self.messages = {}, []

        def add_scalar(self, tag, value, step):
            self.scalars[tag] = value

        def message(self, text):
            self.messages.append(text)

    frames = moving_square(num_frames=4, size=64, square=24)
    writer, logger = SimpleNamespace(_clip=None, model_dir=str(tiny_clip)), Logger()
    PreviewWriter._log_metrics(writer, logger, frames, "a dog", "p0-1234", 7)
    assert {t.split("/")[1] for t in logger.scalars} == {
        "motion",
        "static_ratio",
        "warp_error",
        "clip_temp",
        "clipsim",
    }
    writer, logger = SimpleNamespace(_clip=None, model_dir="/nonexistent"), Logger()
    PreviewWriter._log_metrics(writer, logger, frames, "a dog", "p0", 7)
    assert {t.split("/")[1] for t in logger.scalars} == {"motion", "static_ratio", "warp_error"}
    PreviewWriter._log_metrics(writer, logger, np.zeros((2, 4, 4), np.uint8), "a dog", "p0", 8)  # bad frames
    assert logger.messages and "warning: preview metrics" in logger.messages[0]


def test_evaluation_never_imports_trainer_or_pipelines():
    root = Path(__file__).resolve().parents[2] / "evaluation"
    for path in root.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            for name in names:
                assert name.split(".")[0] not in ("trainer", "pipelines"), f"{path.name} imports {name}"


def test_gif_videos_are_read(tmp_path):
    from PIL import Image

    from evaluation.videos import list_videos, read_video

    frames = moving_square(num_frames=4, size=32, square=12, top=8, left=4)
    images = [Image.fromarray(f) for f in frames]
    images[0].save(tmp_path / "a.gif", save_all=True, append_images=images[1:], duration=100, loop=0)
    (tmp_path / "notes.md").write_text("not a video")
    assert list_videos(tmp_path) == [tmp_path / "a.gif"]
    video = read_video(tmp_path / "a.gif")
    assert video.shape == (4, 32, 32, 3) and video.dtype == np.uint8
    assert read_video(tmp_path / "a.gif", max_frames=2).shape[0] == 2
