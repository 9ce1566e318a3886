"""load_model: either U-Net family (VideoUNet, VideoCrafterModel) from any weights file, with its diffusion settings."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from trainer.model.config import UNetConfig
from trainer.model.presets import VC_PRESETS, diffusion_params
from trainer.model.pretrained import (
    FORMAT,
    check_state,
    file_metadata,
    infer_preset,
    load_pretrained,
    meta_model,
    read_weights,
)

UNET_FORMAT = (
    "latentcrafter-unet"  # safetensors metadata["format"] of a latentcrafter-preset (VideoUNet) export
)


def unet_metadata(
    module, *, preset: str, diffusion: Mapping[str, Any], fps: float | None = None, source: str = ""
) -> dict[str, str]:
    """Metadata that makes a VideoUNet export self-describing (``load_model`` reads it)."""
    cfg = dataclasses.asdict(module.config)
    return {
        "format": UNET_FORMAT,
        "preset": preset,
        "unet_config": json.dumps(cfg, sort_keys=True),
        "image_cross_attention": json.dumps(bool(module.image_cross_attention)),
        "image_token_dim": str(getattr(module, "image_token_dim", 0)),
        "diffusion": json.dumps(diffusion_params(diffusion), sort_keys=True),
        "fps": "" if fps is None else str(float(fps)),
        "source": source,
    }


@dataclass(kw_only=True)
class LoadedModel:
    """A U-Net ready for sampling and what its weights file says about it."""

    module: torch.nn.Module  # VideoUNet or VideoCrafterModel, eval mode, on the CPU
    family: str  # "latentcrafter" (VideoUNet) or "videocrafter" (VideoCrafterModel)
    preset: str  # tiny | vc-512 | a VideoCrafter preset name ("" for a custom VideoCrafter config)
    kind: str  # what the file was: "VideoCrafter checkpoint", "converted checkpoint", "trainer export"
    diffusion: dict[str, Any]  # trainer.model.presets.DIFFUSION_DEFAULTS keys (schedule, scaling, prediction)
    fps: float | None  # the fps the model is conditioned on by default (None: no preference)
    temporal_length: int  # frames the model was trained on
    image_to_video: bool  # takes CLIP image tokens
    context_dim: int  # text token width

    def build_diffusion(self):
        """The trainer.diffusion.Diffusion of these settings."""
        from trainer.diffusion import Diffusion

        d = self.diffusion
        return Diffusion(
            prediction=d["parameterization"],
            num_timesteps=int(d["timesteps"]),
            beta_start=float(d["linear_start"]),
            beta_end=float(d["linear_end"]),
            use_scale=bool(d["use_scale"]),
            scale_a=float(d["scale_a"]),
            scale_b=float(d["scale_b"]),
            mid_step=int(d["mid_step"]),
            fix_scale_bug=bool(d["fix_scale_bug"]),
        )


def _videocrafter(module, meta: Mapping[str, Any], kind: str) -> LoadedModel:
    preset = meta.get("preset") or ""
    fps = VC_PRESETS[preset].fps if preset in VC_PRESETS else None
    return LoadedModel(
        module=module,
        family="videocrafter",
        preset=preset,
        kind=kind,
        diffusion=diffusion_params(meta["diffusion"]),
        fps=None if fps is None else float(fps),
        temporal_length=int(module.unet_params.get("temporal_length") or 16),
        image_to_video=module.image_proj is not None,
        context_dim=int(module.unet_params["context_dim"]),
    )


def _latentcrafter(path: Path, raw: Mapping[str, str], dtype: torch.dtype | None) -> LoadedModel:
    from trainer.model.unet import VideoUNet

    cfg = json.loads(raw["unet_config"])
    cfg = UNetConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in cfg.items()})
    i2v = bool(json.loads(raw.get("image_cross_attention", "false")))
    with torch.device("meta"):
        module = VideoUNet(
            cfg, image_cross_attention=i2v, image_token_dim=int(raw.get("image_token_dim") or 1280)
        )
    tensors = load_file(str(path))
    if dtype is not None:
        tensors = {k: v.to(dtype) for k, v in tensors.items()}
    check_state(tensors, module.state_dict(), hint=f"{path} is damaged or was not written by latentcrafter")
    module.load_state_dict(tensors, strict=True, assign=True)
    return LoadedModel(
        module=module.eval(),
        family="latentcrafter",
        preset=raw.get("preset", ""),
        kind="trainer export",
        diffusion=diffusion_params(json.loads(raw["diffusion"])),
        fps=float(raw["fps"]) if raw.get("fps") else None,
        temporal_length=cfg.temporal_length,
        image_to_video=i2v,
        context_dim=cfg.context_dim,
    )


def load_model(path: str | Path, *, dtype: torch.dtype | None = None) -> LoadedModel:
    """A `latentcrafter convert` output, a trainer export (either family) or a VideoCrafter model.ckpt /
    VideoCrafter-layout .safetensors (converted in memory, the preset inferred from its shapes)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"{path}: no such weights file; pass a `latentcrafter convert` output, a trainer export "
            "(<out_dir>/export/<phase>.safetensors) or a VideoCrafter model.ckpt"
        )
    if path.suffix == ".safetensors":
        raw = file_metadata(path)
        if raw.get("format") == UNET_FORMAT:
            return _latentcrafter(path, raw, dtype)
        if raw.get("format") == FORMAT:
            module = load_pretrained(path, dtype=dtype)
            kind = "trainer export" if "phase" in raw else "converted checkpoint"
            return _videocrafter(module, module.metadata, kind)
        if "phase" in raw:
            raise ValueError(
                f"{path}: a trainer export without model metadata (written before exports described "
                "themselves); export it again with this version (`latentcrafter train` writes the preset and "
                "diffusion settings into every export)"
            )
    tensors, info = read_weights(path)
    if "videocrafter" not in info:
        raise ValueError(
            f"{path}: not a latentcrafter or VideoCrafter weights file (no metadata, no U-Net keys)"
        )
    preset = infer_preset(tensors)
    p = VC_PRESETS[preset]
    module = meta_model(p.unet, p.image_proj, preset)
    if dtype is not None:
        tensors = {k: v.to(dtype) for k, v in tensors.items()}
    check_state(tensors, module.state_dict(), hint=f"{path} is not a {preset} checkpoint")
    module.load_state_dict(tensors, strict=True, assign=True)
    return _videocrafter(
        module.eval(), {"preset": preset, "diffusion": p.diffusion}, "VideoCrafter checkpoint"
    )


__all__ = ["UNET_FORMAT", "LoadedModel", "load_model", "unet_metadata"]
