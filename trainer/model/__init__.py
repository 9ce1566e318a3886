"""The 3D U-Nets: latentcrafter's (SD 2.1 inflation) and VideoCrafter's released models, presets, weights files, groups."""

from trainer.model.config import UNET_CONFIGS, UNetConfig, get_config
from trainer.model.groups import spatial_temporal_parameters
from trainer.model.presets import VC_PRESETS, VCPreset, get_preset
from trainer.model.pretrained import load_pretrained
from trainer.model.sd_init import load_sd_unet_into, tiny_unet2d_config, unet2d_config_for, write_tiny_unet2d
from trainer.model.temporal import TEMPORAL_MODULE_TYPES
from trainer.model.unet import VideoUNet, build_unet
from trainer.model.videocrafter import VideoCrafterModel


def context_dim(name: str) -> int:
    """Text token width a preset's U-Net cross-attends to."""
    return int(VC_PRESETS[name].unet["context_dim"]) if name in VC_PRESETS else get_config(name).context_dim


__all__ = [
    "TEMPORAL_MODULE_TYPES",
    "UNET_CONFIGS",
    "UNetConfig",
    "VCPreset",
    "VC_PRESETS",
    "VideoCrafterModel",
    "context_dim",
    "get_preset",
    "load_pretrained",
    "VideoUNet",
    "build_unet",
    "get_config",
    "load_sd_unet_into",
    "spatial_temporal_parameters",
    "tiny_unet2d_config",
    "unet2d_config_for",
    "write_tiny_unet2d",
]
