"""The cheap metrics the trainer logs for its previews: CLIPSIM and CLIP-Temp (when a CLIP is at hand) and motion."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def load_preview_clip(model_dir: str | Path, device: str = "cpu"):
    """A ClipEmbedder from a model folder whose text_encoder/ projects into image_encoder/'s space (the tiny
    set, or a real CLIP laid out so); None when the folder has no such pair (e.g. SD 2.1's CLIPTextModel)."""
    import json

    folder = Path(model_dir)
    text_cfg, image_cfg = folder / "text_encoder/config.json", folder / "image_encoder/config.json"
    if not (text_cfg.is_file() and image_cfg.is_file() and (folder / "tokenizer").is_dir()):
        return None
    text, image = json.loads(text_cfg.read_text()), json.loads(image_cfg.read_text())
    if "CLIPTextModelWithProjection" not in (text.get("architectures") or []):
        return None
    if text.get("projection_dim") != image.get("projection_dim"):
        return None
    from evaluation.clip import ClipEmbedder

    return ClipEmbedder(folder, device=device)


def preview_metrics(
    frames_uint8: np.ndarray, prompt: str | None, clip=None, *, static_threshold: float = 0.2
) -> dict:
    """uint8 [T,H,W,3] -> {"motion", "static_ratio", "warp_error"} plus {"clipsim", "clip_temp"} with a
    ClipEmbedder `clip` (clipsim only with a prompt); None values (one frame) are left out."""
    from evaluation.motion import motion_metrics

    frames = np.asarray(frames_uint8)
    out = motion_metrics(frames, static_threshold=static_threshold)
    out.pop("flow_per_pair")
    if clip is not None:
        from evaluation.clip import clip_temp, clipsim

        images = clip.embed_images(frames)
        out["clip_temp"] = clip_temp(images)
        if prompt and clip.has_text:
            out["clipsim"] = clipsim(images, clip.embed_texts([prompt])[0])
    return {k: v for k, v in out.items() if v is not None}
