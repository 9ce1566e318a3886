"""Evaluation fixtures: the tiny CLIP set, synthetic clips, mp4 writing (PyAV) and a TorchScript I3D stand-in."""

from __future__ import annotations

import warnings
from fractions import Fraction

import numpy as np
import pytest
import torch


@pytest.fixture(scope="session")
def tiny_clip(tmp_path_factory):
    """The tiny model set: text_encoder/ (with projection) + tokenizer/ + image_encoder/ in one 32-d space."""
    from encoders.tiny import write_tiny_models

    out = tmp_path_factory.mktemp("eval_tiny_models")
    write_tiny_models(str(out), seed=0)
    return out


def textured(shape, rng, sigma=2.0) -> np.ndarray:
    """Smooth random texture uint8 `shape` (H,W,3), stretched to the full 0..255 range."""
    import cv2

    x = cv2.GaussianBlur((rng.random(shape) * 255).astype(np.uint8), (0, 0), sigma)
    return cv2.normalize(x, None, 0, 255, cv2.NORM_MINMAX)


def moving_square(num_frames=6, size=128, square=48, speed=3, seed=0, top=40, left=16) -> np.ndarray:
    """A textured square moving `speed` px/frame to the right over a static textured background."""
    rng = np.random.default_rng(seed)
    bg, tex = textured((size, size, 3), rng), textured((square, square, 3), rng)
    frames = []
    for t in range(num_frames):
        f = bg.copy()
        x = left + speed * t
        f[top : top + square, x : x + square] = tex
        frames.append(f)
    return np.stack(frames)


def write_video(frames: np.ndarray, path, fps: int = 8) -> None:
    """H.264 mp4 (yuv420p, near-lossless) with PyAV; evaluation must not import the trainer's writer."""
    import av

    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libx264", rate=Fraction(fps))
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": "10"}
        for f in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(f), format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


class TinyI3D(torch.nn.Module):
    """Stand-in with StyleGAN-V's I3D call signature: pooled Conv3d features [N,8]."""

    def __init__(self):
        super().__init__()
        with torch.random.fork_rng(devices=[]):  # seeded without touching the tests' global RNG
            torch.manual_seed(0)
            self.conv = torch.nn.Conv3d(3, 8, kernel_size=3, stride=2)

    def forward(
        self, x: torch.Tensor, rescale: bool = False, resize: bool = False, return_features: bool = False
    ):
        if rescale:
            x = x / 127.5 - 1
        if resize:
            x = torch.nn.functional.interpolate(
                x, size=(x.shape[2], 32, 32), mode="trilinear", align_corners=False
            )
        return torch.relu(self.conv(x)).mean(dim=(2, 3, 4))


@pytest.fixture(scope="session")
def tiny_i3d(tmp_path_factory):
    path = tmp_path_factory.mktemp("i3d") / "i3d_torchscript.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.script(TinyI3D()).save(str(path))
    return path
