"""CLIP embeddings from a local folder (CLIPModel, or text_encoder/ + image_encoder/), CLIPSIM and CLIP-Temp."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch

from encoders.models import clip_preprocess

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing downloads: every model comes from a local folder


def _is_clip_model(folder: Path) -> bool:
    if not (folder / "config.json").is_file():
        return False
    config = json.loads((folder / "config.json").read_text())
    return config.get("model_type") == "clip" or "CLIPModel" in (config.get("architectures") or [])


def _unit(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)


class ClipEmbedder:
    """Projected, L2-normalised CLIP text and image embeddings; images preprocessed with the usual CLIP
    protocol (shortest side to S bicubic antialiased, center crop, CLIP mean/std; S from
    preprocessor_config.json, else the vision model's image_size, e.g. 224 for ViT-B/32).

    `folder`: a CLIPModel folder, a folder with text_encoder/ (CLIPTextModelWithProjection), tokenizer/ and
    image_encoder/ (CLIPVisionModelWithProjection), or (image_only) a CLIPVisionModelWithProjection folder.
    """

    def __init__(self, folder: str | Path, *, device: str = "cpu", image_only: bool = False, option="--clip"):
        from encoders.models import image_preprocess_settings

        folder = Path(folder)
        self.device = torch.device(device)
        self.text_model = self.tokenizer = None
        if _is_clip_model(folder):
            from transformers import CLIPModel

            model = CLIPModel.from_pretrained(str(folder), local_files_only=True).eval().to(self.device)
            self._vision, self._vproj = model.vision_model, model.visual_projection
            self._text, self._tproj = model.text_model, model.text_projection
            image_size, prep_dir = int(model.config.vision_config.image_size), folder
            if not image_only:
                from encoders.models import load_tokenizer

                tok_dir = folder / "tokenizer" if (folder / "tokenizer").is_dir() else folder
                self.tokenizer = load_tokenizer(tok_dir)
        else:
            self._load_parts(folder, image_only, option)
            image_size = int(self._vision_config.image_size)
            prep_dir = self._image_dir
        self.image_prep = image_preprocess_settings(prep_dir, image_size)
        self.folder = str(folder)
        self.max_length = 77 if self._text is None else int(self._text.config.max_position_embeddings)

    def _load_parts(self, folder: Path, image_only: bool, option: str) -> None:
        from transformers import CLIPVisionModelWithProjection

        from encoders.models import load_text_encoder, load_tokenizer

        image_dir = folder / "image_encoder" if (folder / "image_encoder").is_dir() else folder
        if not (image_dir / "config.json").is_file():
            raise FileNotFoundError(
                f"{folder}: no CLIP here (expected a CLIPModel config.json, or image_encoder/ + text_encoder/ "
                f"+ tokenizer/); set {option} to a local transformers CLIP folder"
            )
        vision = CLIPVisionModelWithProjection.from_pretrained(str(image_dir), local_files_only=True)
        vision = vision.eval().to(self.device)
        self._vision, self._vproj, self._vision_config = (
            vision.vision_model,
            vision.visual_projection,
            vision.config,
        )
        self._image_dir = image_dir
        self._text = self._tproj = None
        if image_only:
            return
        text = load_text_encoder(folder / "text_encoder").eval().to(self.device)
        if not hasattr(text, "text_projection") or text.config.projection_dim != vision.config.projection_dim:
            raise ValueError(
                f"{folder}/text_encoder: no projection into the image embedding space (a CLIPTextModel, e.g. "
                f"SD 2.1's); set {option} to a CLIP folder whose text encoder is CLIPTextModelWithProjection"
            )
        self._text, self._tproj = text.text_model, text.text_projection
        self.tokenizer = load_tokenizer(folder / "tokenizer")

    @property
    def has_text(self) -> bool:
        return self._text is not None

    def preprocess(self, frames: np.ndarray) -> torch.Tensor:
        """uint8 [N,H,W,3] -> float [N,3,S,S]: shortest side to S (bicubic), center crop, CLIP mean/std."""
        x = torch.from_numpy(np.ascontiguousarray(frames)).to(self.device).permute(0, 3, 1, 2).float() / 255
        size, crop = int(self.image_prep["size"]), int(self.image_prep["crop"])
        return clip_preprocess(x, size, crop, self.image_prep["mean"], self.image_prep["std"])

    @torch.inference_mode()
    def embed_images(self, frames: np.ndarray, batch_size: int = 32) -> torch.Tensor:
        """uint8 [N,H,W,3] -> unit-norm float32 [N,P] (projected pooled output), on the CPU."""
        out = []
        for i in range(0, len(frames), batch_size):
            pooled = self._vision(pixel_values=self.preprocess(frames[i : i + batch_size])).pooler_output
            out.append(_unit(self._vproj(pooled).float()).cpu())
        return torch.cat(out)

    @torch.inference_mode()
    def embed_texts(self, prompts: list[str]) -> torch.Tensor:
        """Prompts -> unit-norm float32 [N,P] (projected EOS embedding), on the CPU."""
        if not self.has_text:
            raise ValueError(f"{self.folder}: this CLIP has no text encoder")
        batch = self.tokenizer(
            list(prompts),
            padding="max_length",
            max_length=self.max_length,
            truncation=True,
            return_tensors="pt",
        )
        pooled = self._text(input_ids=batch["input_ids"].to(self.device)).pooler_output
        return _unit(self._tproj(pooled).float()).cpu()


def clipsim(image_embeds: torch.Tensor, text_embed: torch.Tensor) -> float:
    """Mean over frames of cos(frame embedding, prompt embedding); inputs unit-norm [T,P] and [P]."""
    return float((image_embeds @ text_embed.reshape(-1)).mean())


def clip_temp(image_embeds: torch.Tensor) -> float | None:
    """Mean cos of consecutive frames' embeddings (None for a single frame); input unit-norm [T,P]."""
    if len(image_embeds) < 2:
        return None
    return float((image_embeds[1:] * image_embeds[:-1]).sum(-1).mean())
