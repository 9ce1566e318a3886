"""Motion metrics from OpenCV's DIS optical flow: mean flow magnitude, static ratio and flow-warping error."""

from __future__ import annotations

import numpy as np


def _cv2():
    try:
        import cv2
    except ImportError as exc:  # a dependency of the project; say how to get it
        raise ImportError(
            "the motion metrics need OpenCV: pip install opencv-python-headless (a dependency of latentcrafter)"
        ) from exc
    return cv2


def resize_short(frames: np.ndarray, size: int) -> np.ndarray:
    """uint8 [T,H,W,3] with the shortest side resized to `size` (area interpolation); 0 keeps the frames."""
    if not size or min(frames.shape[1:3]) == size:
        return frames
    cv2 = _cv2()
    h, w = frames.shape[1:3]
    scale = size / min(h, w)
    nw, nh = max(1, round(w * scale)), max(1, round(h * scale))
    return np.stack([cv2.resize(f, (nw, nh), interpolation=cv2.INTER_AREA) for f in frames])


class FlowEstimator:
    """DIS optical flow (OpenCV, preset MEDIUM) between grey frames; flow[t] maps frame t onto frame t+1."""

    def __init__(self):
        cv2 = _cv2()
        self.dis = cv2.DISOpticalFlow_create(cv2.DISOPTICAL_FLOW_PRESET_MEDIUM)
        self.cv2 = cv2

    def grey(self, frames: np.ndarray) -> list[np.ndarray]:
        return [self.cv2.cvtColor(np.ascontiguousarray(f), self.cv2.COLOR_RGB2GRAY) for f in frames]

    def flow(self, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        """float32 [H,W,2] (dx, dy): pixel p of grey frame a is at p + flow[p] in b."""
        return self.dis.calc(a, b, None)

    def forward_flows(self, frames: np.ndarray) -> list[np.ndarray]:
        """Flows between consecutive frames of uint8 [T,H,W,3]: T-1 arrays [H,W,2]."""
        grey = self.grey(frames)
        return [self.flow(grey[t], grey[t + 1]) for t in range(len(grey) - 1)]

    def warp(self, image: np.ndarray, flow: np.ndarray) -> np.ndarray:
        """image sampled at p + flow[p] (bilinear, border replicated): frame t+1 warped back onto frame t."""
        h, w = flow.shape[:2]
        gx, gy = np.meshgrid(np.arange(w, dtype=np.float32), np.arange(h, dtype=np.float32))
        return self.cv2.remap(
            image,
            gx + flow[..., 0],
            gy + flow[..., 1],
            self.cv2.INTER_LINEAR,
            borderMode=self.cv2.BORDER_REPLICATE,
        )


def magnitude(flow: np.ndarray) -> np.ndarray:
    """Per-pixel flow magnitude [H,W] in pixels."""
    return np.sqrt((flow.astype(np.float64) ** 2).sum(-1))


def non_occluded(est: FlowEstimator, fwd: np.ndarray, bwd: np.ndarray) -> np.ndarray:
    """Forward-backward consistency (Sundaram et al. 2010): bool [H,W], True where fwd and the backward flow
    at the target point cancel, |f + b|^2 < 0.01 (|f|^2 + |b|^2) + 0.5."""
    b = est.warp(bwd, fwd)
    diff = ((fwd + b) ** 2).sum(-1)
    return diff < 0.01 * ((fwd**2).sum(-1) + (b**2).sum(-1)) + 0.5


def motion_metrics(
    frames: np.ndarray,
    *,
    static_threshold: float = 0.2,
    size: int = 0,
    estimator: FlowEstimator | None = None,
) -> dict:
    """uint8 [T,H,W,3] -> {motion, static_ratio, warp_error, flow_per_pair}; None values for a single frame.

    motion: mean flow magnitude (px, at the analysed size) over pixels and frame pairs.
    static_ratio: share of frame pairs whose mean magnitude is below `static_threshold` px.
    warp_error: mean |frame t - warp(frame t+1, flow t->t+1)| on non-occluded pixels, RGB in [0,1] (flicker).
    """
    frames = resize_short(np.asarray(frames), size)
    if len(frames) < 2:
        return {"motion": None, "static_ratio": None, "warp_error": None, "flow_per_pair": []}
    est = estimator or FlowEstimator()
    grey = est.grey(frames)
    per_pair, errors = [], []
    for t in range(len(frames) - 1):
        fwd, bwd = est.flow(grey[t], grey[t + 1]), est.flow(grey[t + 1], grey[t])
        per_pair.append(float(magnitude(fwd).mean()))
        mask = non_occluded(est, fwd, bwd)
        if mask.any():
            warped = est.warp(frames[t + 1], fwd).astype(np.float32)
            err = np.abs(frames[t].astype(np.float32) - warped).mean(-1) / 255.0
            errors.append(float(err[mask].mean()))
    return {
        "motion": float(np.mean(per_pair)),
        "static_ratio": float(np.mean([m < static_threshold for m in per_pair])),
        "warp_error": float(np.mean(errors)) if errors else None,
        "flow_per_pair": per_pair,
    }
