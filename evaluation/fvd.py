"""Frechet Video Distance: I3D features (a StyleGAN-V-format TorchScript file) and a stable Frechet distance."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch


@dataclass(kw_only=True)
class FVDProtocol:
    """How clips are taken from the videos; FVD values are only comparable under the same protocol."""

    num_frames: int = 16  # frames per clip, from the start at `stride` (shorter videos skipped)
    stride: int = 1  # frame stride within a clip
    size: int = 224  # frames resized (shortest side, bilinear antialiased) and center-cropped to size x size
    max_samples: int = 0  # at most this many clips per set (0: all); the counts used are recorded
    detector: str = "i3d"  # name recorded with the number (the TorchScript file's name)

    def __post_init__(self):
        if self.num_frames < 2:
            raise ValueError(f"--fvd-frames={self.num_frames}: must be >= 2 (I3D needs a clip)")
        if self.stride < 1:
            raise ValueError(f"--fvd-stride={self.stride}: must be >= 1")
        if self.size < 8:
            raise ValueError(f"--fvd-size={self.size}: must be >= 8")
        if self.max_samples < 0:
            raise ValueError(f"--fvd-max-samples={self.max_samples}: must be >= 0 (0 = all)")

    def as_dict(self) -> dict:
        return asdict(self)


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """||mu1 - mu2||^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^1/2), in float64.

    tr((S1 S2)^1/2) = sum sqrt(eig(sqrt(S1) S2 sqrt(S1))): that product is symmetric PSD, so numpy's eigh
    gives it stably (no complex parts, no eps offsets), also for the rank-deficient covariances of few samples.
    """
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    s1, s2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (mu1.size, mu1.size):
        raise ValueError(f"shape mismatch: mu {mu1.shape} vs {mu2.shape}, sigma {s1.shape} vs {s2.shape}")
    vals, vecs = np.linalg.eigh((s1 + s1.T) / 2)
    root1 = (vecs * np.sqrt(np.clip(vals, 0, None))) @ vecs.T
    prod = root1 @ s2 @ root1
    eig = np.linalg.eigvalsh((prod + prod.T) / 2)
    tr_covmean = np.sqrt(np.clip(eig, 0, None)).sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * tr_covmean)


def feature_stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    feats = np.asarray(features, np.float64)
    if feats.ndim != 2 or len(feats) < 2:
        raise ValueError(f"FVD needs at least 2 clips per set, got features {list(feats.shape)}")
    return feats.mean(0), np.cov(feats, rowvar=False)


def load_i3d(path: str | Path, device: str = "cpu"):
    """The TorchScript I3D (StyleGAN-V's i3d_torchscript.pt); never downloaded."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"{path}: no such file; set --i3d to StyleGAN-V's i3d_torchscript.pt (a TorchScript I3D) on disk"
        )
    import warnings

    with warnings.catch_warnings():  # torch >= 2.9 flags TorchScript as deprecated; the file format is fixed
        warnings.simplefilter("ignore", DeprecationWarning)
        return torch.jit.load(str(path), map_location=device).eval()


def take_clip(frames: np.ndarray, protocol: FVDProtocol) -> np.ndarray | None:
    """uint8 [T,H,W,3] -> the protocol's clip uint8 [num_frames,H,W,3], or None when the video is too short."""
    need = (protocol.num_frames - 1) * protocol.stride + 1
    if len(frames) < need:
        return None
    return frames[: need : protocol.stride]


def clip_tensor(clip: np.ndarray, size: int) -> torch.Tensor:
    """uint8 [T,H,W,3] -> float [3,T,size,size] in [-1,1]: shortest side to size, center crop."""
    x = torch.from_numpy(np.ascontiguousarray(clip)).permute(0, 3, 1, 2).float() / 127.5 - 1  # [T,3,H,W]
    h, w = x.shape[-2:]
    scale = size / min(h, w)
    nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
    if (nh, nw) != (h, w):
        x = torch.nn.functional.interpolate(
            x, size=(nh, nw), mode="bilinear", antialias=True, align_corners=False
        )
    top, left = (nh - size) // 2, (nw - size) // 2
    return x[:, :, top : top + size, left : left + size].clamp(-1, 1).permute(1, 0, 2, 3)


@torch.inference_mode()
def i3d_features(model, clips: list[np.ndarray], protocol: FVDProtocol, *, batch_size: int = 8, device="cpu"):
    """Features [N,D] float64 of uint8 clips, called as StyleGAN-V's FVD calls I3D with inputs already in [-1,1]:
    model(x [N,3,T,H,W], rescale=False, resize=True, return_features=True)."""
    out = []
    for i in range(0, len(clips), batch_size):
        x = torch.stack([clip_tensor(c, protocol.size) for c in clips[i : i + batch_size]]).to(device)
        feats = model(x, rescale=False, resize=True, return_features=True)
        out.append(feats.reshape(len(x), -1).double().cpu().numpy())
    return np.concatenate(out)


def fvd_from_clips(model, real: list[np.ndarray], gen: list[np.ndarray], protocol: FVDProtocol, **kw) -> dict:
    """FVD of two lists of protocol clips, with the protocol and the sample counts recorded beside the number."""
    if protocol.max_samples:
        real, gen = real[: protocol.max_samples], gen[: protocol.max_samples]
    mu_r, s_r = feature_stats(i3d_features(model, real, protocol, **kw))
    mu_g, s_g = feature_stats(i3d_features(model, gen, protocol, **kw))
    return {
        "fvd": frechet_distance(mu_r, s_r, mu_g, s_g),
        "protocol": protocol.as_dict(),
        "num_real": len(real),
        "num_gen": len(gen),
    }


class FeatureCollector:
    """I3D features computed while the videos stream by (clips batched, never all held in memory)."""

    def __init__(self, model, protocol: FVDProtocol, *, batch_size: int = 8, device: str = "cpu"):
        self.model, self.protocol, self.batch_size, self.device = model, protocol, batch_size, device
        self.pending: list[np.ndarray] = []
        self.features: list[np.ndarray] = []
        self.count = self.too_short = 0

    def add(self, frames: np.ndarray) -> bool:
        """Take the protocol's clip of a video; False when it is too short or the sample budget is full."""
        if self.protocol.max_samples and self.count >= self.protocol.max_samples:
            return False
        clip = take_clip(frames, self.protocol)
        if clip is None:
            self.too_short += 1
            return False
        self.pending.append(clip)
        self.count += 1
        if len(self.pending) >= self.batch_size:
            self.flush()
        return True

    def flush(self) -> None:
        if self.pending:
            feats = i3d_features(
                self.model, self.pending, self.protocol, batch_size=self.batch_size, device=self.device
            )
            self.features.append(feats)
            self.pending = []

    def result(self) -> np.ndarray:
        self.flush()
        return np.concatenate(self.features) if self.features else np.zeros((0, 0))
