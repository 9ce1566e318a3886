"""The VideoCrafter-style 3D U-Net: configs, builder, SD 2.1 inflation and spatial/temporal parameter groups."""

from trainer.model.config import UNET_CONFIGS, UNetConfig, get_config
from trainer.model.groups import spatial_temporal_parameters
from trainer.model.sd_init import load_sd_unet_into, tiny_unet2d_config, unet2d_config_for, write_tiny_unet2d
from trainer.model.temporal import TEMPORAL_MODULE_TYPES
from trainer.model.unet import VideoUNet, build_unet

__all__ = [
    "TEMPORAL_MODULE_TYPES",
    "UNET_CONFIGS",
    "UNetConfig",
    "VideoUNet",
    "build_unet",
    "get_config",
    "load_sd_unet_into",
    "spatial_temporal_parameters",
    "tiny_unet2d_config",
    "unet2d_config_for",
    "write_tiny_unet2d",
]
