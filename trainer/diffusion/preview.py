"""Previews: decode latents with the VAE and write mp4 (PyAV libx264) and GIF (PIL) files."""

from __future__ import annotations

from fractions import Fraction

import numpy as np
import torch


@torch.no_grad()
def decode_to_frames(vae, latents: torch.Tensor, scale_factor: float = 0.18215, chunk: int = 8) -> np.ndarray:
    """diffusers AutoencoderKL decode of scaled latents `[B,C,T,h,w]` -> uint8 frames `[B,T,H,W,3]`."""
    b, c, t, h, w = latents.shape
    z = (latents / scale_factor).permute(0, 2, 1, 3, 4).reshape(b * t, c, h, w)
    dtype = next(vae.parameters()).dtype
    device = next(vae.parameters()).device
    images = [
        vae.decode(z[i : i + chunk].to(device, dtype)).sample.float().cpu() for i in range(0, b * t, chunk)
    ]
    x = torch.cat(images).clamp(-1, 1)
    x = ((x + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1)
    return x.reshape(b, t, *x.shape[1:]).numpy()


def _check_frames(frames: np.ndarray) -> np.ndarray:
    frames = np.asarray(frames)
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(f"frames must be uint8 [T,H,W,3], got {frames.dtype} {frames.shape}")
    return frames


def write_mp4(frames: np.ndarray, path: str, fps: float) -> None:
    """H.264 mp4 (yuv420p, so H and W are padded to even sizes by edge replication)."""
    import av

    frames = _check_frames(frames)
    _, h, w, _ = frames.shape
    if h % 2 or w % 2:
        frames = np.pad(frames, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)), mode="edge")
    with av.open(str(path), mode="w") as container:
        stream = container.add_stream("libx264", rate=Fraction(fps).limit_denominator(1001))
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": "18"}
        for f in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def write_gif(frames: np.ndarray, path: str, fps: float) -> None:
    """Looping GIF via PIL."""
    from PIL import Image

    frames = _check_frames(frames)
    images = [Image.fromarray(f) for f in frames]
    images[0].save(
        str(path), save_all=True, append_images=images[1:], duration=max(int(round(1000 / fps)), 20), loop=0
    )
