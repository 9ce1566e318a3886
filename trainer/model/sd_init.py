"""Stable Diffusion 2.1 initialisation: the matching 2D U-Net config, tiny 2D U-Net writer, inflation loader."""

from __future__ import annotations

import os

import torch

from encoders.tiny import write_tiny_unet2d  # noqa: F401  (re-exported: the tiny SD folder's unet/)
from trainer.model.config import UNET_CONFIGS, UNetConfig, get_config


def unet2d_config_for(config: UNetConfig | str) -> dict:
    """The diffusers UNet2DConditionModel config whose weights are the spatial half of `config`.

    SD 2.x conventions: linear projections in the transformers, and diffusers' 2D `attention_head_dim`
    is (historically) a head *count* per level, so it is channels // num_head_channels here.
    """
    cfg = get_config(config)
    chans = cfg.block_out_channels
    n = len(chans)
    down = tuple("CrossAttnDownBlock2D" if cfg.has_attention(i) else "DownBlock2D" for i in range(n))
    up = tuple("CrossAttnUpBlock2D" if cfg.has_attention(i) else "UpBlock2D" for i in reversed(range(n)))
    return {
        "sample_size": 32,
        "in_channels": cfg.in_channels,
        "out_channels": cfg.out_channels,
        "down_block_types": down,
        "up_block_types": up,
        "mid_block_type": "UNetMidBlock2DCrossAttn",
        "block_out_channels": chans,
        "layers_per_block": cfg.num_res_blocks,
        "attention_head_dim": tuple(cfg.heads(c) for c in chans),
        "cross_attention_dim": cfg.context_dim,
        "transformer_layers_per_block": cfg.transformer_depth,
        "use_linear_projection": True,
        "norm_num_groups": cfg.norm_num_groups,
        "flip_sin_to_cos": True,
        "freq_shift": 0,
        "act_fn": "silu",
        "norm_eps": 1e-5,
    }


def tiny_unet2d_config(context_dim: int) -> dict:
    """A tiny SD 2.1-like UNet2DConditionModel config matching the `tiny` 3D config's spatial layers."""
    return unet2d_config_for(UNET_CONFIGS["tiny"].with_(context_dim=context_dim))


_CHECKED_KEYS = (
    "in_channels",
    "out_channels",
    "block_out_channels",
    "layers_per_block",
    "cross_attention_dim",
    "attention_head_dim",
    "down_block_types",
    "up_block_types",
    "use_linear_projection",
    "norm_num_groups",
)


def _read_unet2d_state_dict(folder: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    for name in ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors"):
        path = os.path.join(folder, name)
        if os.path.exists(path):
            return load_file(path)
    path = os.path.join(folder, "diffusion_pytorch_model.bin")
    if os.path.exists(path):
        return torch.load(path, map_location="cpu", weights_only=True)
    raise FileNotFoundError(
        f"{folder}: no diffusion_pytorch_model.safetensors (or .fp16.safetensors/.bin); "
        "point at an SD 2.1 diffusers checkout's unet/ folder"
    )


def load_sd_unet_into(model, unet2d_dir: str) -> dict:
    """Inflate: load a diffusers UNet2DConditionModel folder (SD 2.1 `unet/`) into the spatial layers of `model`.

    Every 2D key must exist in the 3D model with the same shape, and every 3D key the 2D model lacks
    must be temporal (TemporalTransformer/TemporalConv/FpsEmbedding) or I2V (image projection,
    decoupled image key/values); otherwise a ValueError names the folder and the keys. Temporal
    outputs are zero-initialised, so the loaded model reproduces the 2D model per frame. The image
    key/values are then copied from the text ones (gate stays 0). Returns counts.
    """
    import json

    from trainer.model.image import init_image_kv_from_text
    from trainer.model.temporal import TEMPORAL_MODULE_TYPES

    cfg_path = os.path.join(unet2d_dir, "config.json")
    if not os.path.exists(cfg_path):
        raise FileNotFoundError(
            f"{unet2d_dir}: no config.json; expected a diffusers UNet2DConditionModel folder"
        )
    with open(cfg_path) as f:
        found = json.load(f)
    want = unet2d_config_for(model.config)
    bad = []
    for key in _CHECKED_KEYS:
        a, b = found.get(key), want[key]
        a = list(a) if isinstance(a, list | tuple) else a
        b = list(b) if isinstance(b, list | tuple) else b
        if key == "attention_head_dim" and isinstance(a, int):
            a = [a] * len(want["block_out_channels"])
        if a != b:
            bad.append(f"{key}: folder has {a}, model needs {b}")
    if bad:
        raise ValueError(f"{unet2d_dir}: UNet2D config does not match the 3D config: " + "; ".join(bad))

    state = _read_unet2d_state_dict(unet2d_dir)
    own = model.state_dict()
    unexpected = [k for k in state if k not in own]
    wrong = [
        f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}"
        for k in state
        if k in own and state[k].shape != own[k].shape
    ]
    if unexpected or wrong:
        raise ValueError(
            f"{unet2d_dir}: weights do not fit the 3D U-Net: unexpected {unexpected[:5]}, shape {wrong[:5]}"
        )

    temporal_names, image_names = set(), set()
    for name, module in model.named_modules():
        if isinstance(module, TEMPORAL_MODULE_TYPES):
            temporal_names.update(f"{name}.{k}" for k in module.state_dict())
    for key in own:
        if key.startswith("image_proj.") or ".processor." in key:
            image_names.add(key)
    missing = [k for k in own if k not in state]
    other = [k for k in missing if k not in temporal_names and k not in image_names]
    if other:
        raise ValueError(
            f"{unet2d_dir}: spatial weights missing from the folder: {other[:5]} ({len(other)} in all)"
        )

    dtype = model.dtype
    model.load_state_dict({k: v.to(dtype) for k, v in state.items()}, strict=False)
    copied = init_image_kv_from_text(model)
    return {
        "loaded": len(state),
        "missing_temporal": sum(k in temporal_names for k in missing),
        "missing_image": sum(k in image_names for k in missing),
        "image_kv_copied": copied,
        "folder": unet2d_dir,
    }
