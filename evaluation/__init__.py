"""Video metrics (CLIPSIM, CLIP-Temp, motion, aesthetic, FVD) for `latentcrafter eval` and the trainer's previews."""

from __future__ import annotations

from evaluation.preview import load_preview_clip, preview_metrics

__all__ = ["load_preview_clip", "preview_metrics"]
