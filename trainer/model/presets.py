"""The released VideoCrafter models as named presets: U-Net and Resampler sizes, diffusion settings, fps."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

# VideoCrafter's own defaults (lvdm/models/ddpm3d.py: DDPM.__init__ and LatentDiffusion.__init__); a YAML's
# `model.params` overrides them.
DIFFUSION_DEFAULTS: dict[str, Any] = {
    "timesteps": 1000,
    "linear_start": 1e-4,
    "linear_end": 2e-2,
    "parameterization": "eps",
    "use_scale": False,
    "scale_a": 1,
    "scale_b": 0.3,
    "mid_step": 400,
    "fix_scale_bug": False,
}
# The released Image2Video Resampler: hard-coded in LatentVisualDiffusion.init_projector, not in its YAML.
VC_RESAMPLER = {
    "dim": 1024,
    "depth": 4,
    "dim_head": 64,
    "heads": 12,
    "num_queries": 16,
    "embedding_dim": 1280,
    "output_dim": 1024,
    "ff_mult": 4,
}


def diffusion_params(model_params: Mapping[str, Any]) -> dict[str, Any]:
    """The diffusion settings of a VideoCrafter YAML's ``model.params``, VideoCrafter's defaults where absent."""
    return {k: model_params.get(k, d) for k, d in DIFFUSION_DEFAULTS.items()}


@dataclass(frozen=True, kw_only=True)
class VCPreset:
    """One released VideoCrafter model: what its inference YAML (and code) says, in VideoCrafter's names."""

    name: str  # the preset name (`model.unet` in a run config)
    yaml: str  # the VideoCrafter config it equals (configs/... at commit 11bcd76), or "tiny" for test sizes
    unet: Mapping[str, Any]  # model.params.unet_config.params
    diffusion: Mapping[str, Any]  # model.params keys of DIFFUSION_DEFAULTS (schedule, signal scaling)
    image_proj: Mapping[str, Any] | None = None  # Resampler sizes for Image2Video, None for text-to-video
    fps: int | None = None  # fps VideoCrafter's scripts condition on (None: the model has no fps input)
    resolution: str = "512x320"  # width x height it was trained at
    notes: str = field(default="", compare=False)

    @property
    def image_to_video(self) -> bool:
        return self.image_proj is not None


# Shared by all four released U-Nets (configs/inference_*.yaml, unet_config.params).
_REAL = {
    "in_channels": 4,
    "out_channels": 4,
    "model_channels": 320,
    "attention_resolutions": [4, 2, 1],
    "num_res_blocks": 2,
    "channel_mult": [1, 2, 4, 4],
    "num_head_channels": 64,
    "transformer_depth": 1,
    "context_dim": 1024,
    "use_linear": True,
    "use_checkpoint": True,
    "temporal_attention": True,
    "temporal_selfatt_only": True,
    "use_causal_attention": False,
    "temporal_length": 16,
    "addition_attention": True,
}
# The fixtures' scaled-down sizes (tests/fixtures/videocrafter): every flag as in the real YAMLs.
_TINY = {
    **_REAL,
    "model_channels": 64,
    "attention_resolutions": [1],
    "channel_mult": [1, 2],
    "num_head_channels": 16,
    "context_dim": 32,
    "use_checkpoint": False,
}
_SCHEDULE = {"timesteps": 1000, "linear_start": 0.00085, "linear_end": 0.012}
_VC2 = {"temporal_conv": True, "use_relative_position": False, "fps_cond": True}
_VC1 = {"temporal_conv": False, "use_relative_position": True}
_SCALED = {**_SCHEDULE, "use_scale": True, "scale_b": 0.7}
_TINY_RESAMPLER = {**VC_RESAMPLER, "dim": 32, "depth": 2, "dim_head": 16, "heads": 3, "output_dim": 32}


def _preset(name: str, yaml: str, unet: dict, diffusion: dict, **kw: Any) -> VCPreset:
    return VCPreset(name=name, yaml=yaml, unet=unet, diffusion=diffusion_params(diffusion), **kw)


VC_PRESETS: dict[str, VCPreset] = {
    p.name: p
    for p in (
        _preset("vc2-t2v-512", "configs/inference_t2v_512_v2.0.yaml", {**_REAL, **_VC2}, _SCALED, fps=28),
        _preset("vc1-t2v-512", "configs/inference_t2v_512_v1.0.yaml", {**_REAL, **_VC1}, _SCHEDULE),
        _preset(
            "vc1-t2v-1024",
            "configs/inference_t2v_1024_v1.0.yaml",
            {**_REAL, **_VC1, "fps_cond": True},
            {**_SCHEDULE, "use_scale": True, "fix_scale_bug": True},
            fps=24,
            resolution="1024x576",
        ),
        _preset(
            "vc1-i2v-512",
            "configs/inference_i2v_512_v1.0.yaml",
            {**_REAL, **_VC2, "use_image_attention": True},
            {**_SCALED},
            image_proj=VC_RESAMPLER,
            fps=8,
        ),
        # Test sizes of the same classes and flags; they pair with the tiny encoder set (encoders.tiny:
        # 32-wide text tokens, 48-wide CLIP image tokens).
        _preset("vc2-t2v-tiny", "tiny", {**_TINY, **_VC2}, _SCALED, fps=28),
        _preset("vc1-t2v-tiny", "tiny", {**_TINY, **_VC1}, _SCHEDULE),
        _preset(
            "vc1-i2v-tiny",
            "tiny",
            {**_TINY, **_VC2, "use_image_attention": True},
            _SCALED,
            image_proj={**_TINY_RESAMPLER, "embedding_dim": 48},
            fps=8,
        ),
    )
}


def get_preset(name: str) -> VCPreset:
    if name not in VC_PRESETS:
        raise ValueError(f"unknown VideoCrafter preset {name!r}; choose one of {sorted(VC_PRESETS)}")
    return VC_PRESETS[name]


def preset_for(unet_params: Mapping[str, Any], image_proj: Mapping[str, Any] | None) -> str | None:
    """The name of the preset with exactly these U-Net (and Resampler) params, else None."""

    def same(a: Mapping[str, Any], b: Mapping[str, Any]) -> bool:  # use_checkpoint changes no value
        return {k: v for k, v in a.items() if k != "use_checkpoint"} == {
            k: v for k, v in b.items() if k != "use_checkpoint"
        }

    for p in VC_PRESETS.values():
        if same(p.unet, unet_params) and (
            (p.image_proj is None and image_proj is None)
            or (p.image_proj is not None and image_proj is not None and same(p.image_proj, image_proj))
        ):
            return p.name
    return None


__all__ = [
    "DIFFUSION_DEFAULTS",
    "VCPreset",
    "VC_PRESETS",
    "VC_RESAMPLER",
    "diffusion_params",
    "get_preset",
    "preset_for",
]
