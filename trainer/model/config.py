"""UNetConfig: the sizes of the 3D U-Net, and the named presets `tiny` and `vc-512`."""

from __future__ import annotations

from dataclasses import dataclass, replace


@dataclass(kw_only=True, frozen=True)
class UNetConfig:
    """Shape of the video U-Net. Field names follow VideoCrafter's inference YAML (lvdm openaimodel3d)."""

    in_channels: int = 4  # latent channels in (SD VAE: 4)
    out_channels: int = 4  # predicted channels (eps or v; same as the latent)
    model_channels: int = 320  # channels of the first level; level i has model_channels * channel_mult[i]
    channel_mult: tuple[int, ...] = (1, 2, 4, 4)  # one entry per resolution level
    num_res_blocks: int = 2  # ResBlocks per down level (up levels have one more, as in SD)
    attention_resolutions: tuple[int, ...] = (
        4,
        2,
        1,
    )  # downsampling factors (1, 2, 4, ...) that get transformers
    num_head_channels: int = 64  # size of one attention head (heads = channels // num_head_channels)
    context_dim: int = 1024  # text token width (SD 2.1 OpenCLIP-H: 1024)
    transformer_depth: int = 1  # BasicTransformerBlocks per spatial transformer
    norm_num_groups: int = 32  # GroupNorm groups everywhere (SD: 32)
    temporal_length: int = 16  # frames the model is trained on; bounds the relative-position table
    temporal_conv: bool = True  # VideoCrafter2's temporal 3x1x1 conv block after each ResBlock
    temporal_depth: int = 1  # blocks per temporal transformer
    use_relative_position: bool = False  # learned relative-position bias in temporal self-attention
    use_causal_attention: bool = False  # frame t attends only to frames <= t
    input_temporal_attention: bool = (
        True  # VideoCrafter's `addition_attention`: a temporal transformer after conv_in
    )
    fps_cond: bool = True  # add an FPS embedding to the timestep embedding (VideoCrafter2)
    # Image2Video (used only when build_unet(..., image_cross_attention=True))
    image_num_queries: int = 16  # Resampler output tokens (VideoCrafter i2v: 16)
    resampler_depth: int = 4  # Resampler blocks (VideoCrafter i2v: 4)
    resampler_heads: int = 12  # Resampler attention heads (VideoCrafter i2v: 12)
    resampler_head_dim: int = 64  # Resampler head size (VideoCrafter i2v: 64)
    image_attention_scale: float = 1.0  # weight of the decoupled image cross-attention (times a learned gate)

    def __post_init__(self):
        if self.in_channels < 1 or self.out_channels < 1:
            raise ValueError("UNetConfig.in_channels/out_channels must be >= 1")
        if self.model_channels < 1 or not self.channel_mult:
            raise ValueError("UNetConfig.model_channels must be >= 1 and channel_mult non-empty")
        if self.num_res_blocks < 1:
            raise ValueError("UNetConfig.num_res_blocks must be >= 1")
        for c in self.block_out_channels:
            if c % self.norm_num_groups:
                raise ValueError(
                    f"UNetConfig.norm_num_groups={self.norm_num_groups} must divide every level's channels {c}"
                )
            if c % self.num_head_channels:
                raise ValueError(
                    f"UNetConfig.num_head_channels={self.num_head_channels} must divide every level's channels {c}"
                )
        valid = {2**i for i in range(len(self.channel_mult))}
        bad = [r for r in self.attention_resolutions if r not in valid]
        if bad:
            raise ValueError(
                f"UNetConfig.attention_resolutions {bad} not in the levels' factors {sorted(valid)}"
            )
        if self.temporal_length < 1 or self.context_dim < 1:
            raise ValueError("UNetConfig.temporal_length and context_dim must be >= 1")
        if self.image_num_queries < 1 or self.resampler_depth < 1:
            raise ValueError("UNetConfig.image_num_queries and resampler_depth must be >= 1")

    @property
    def block_out_channels(self) -> tuple[int, ...]:
        """Channels of each level (diffusers' name)."""
        return tuple(self.model_channels * m for m in self.channel_mult)

    def has_attention(self, level: int) -> bool:
        """Whether level `level` (downsampling factor 2**level) has spatial and temporal transformers."""
        return 2**level in self.attention_resolutions

    def heads(self, channels: int) -> int:
        return channels // self.num_head_channels

    def with_(self, **changes) -> UNetConfig:
        """A copy with some fields changed (validated again)."""
        return replace(self, **changes)


UNET_CONFIGS: dict[str, UNetConfig] = {
    # VideoCrafter2 (and VideoCrafter1 t2v/i2v 512) sizes, initialised from SD 2.1.
    "vc-512": UNetConfig(),
    # Same classes, CPU-test sized: 3 levels (attention at the first two, none at the last, as vc-512's
    # last level), one ResBlock per level, 8-channel heads, 32-wide text tokens.
    "tiny": UNetConfig(
        model_channels=32,
        channel_mult=(1, 2, 2),
        num_res_blocks=1,
        attention_resolutions=(1, 2),
        num_head_channels=8,
        context_dim=32,
        norm_num_groups=8,
        resampler_depth=1,
        resampler_heads=2,
        resampler_head_dim=16,
    ),
}


def get_config(config: UNetConfig | str) -> UNetConfig:
    """Resolve a preset name or pass a UNetConfig through."""
    if isinstance(config, UNetConfig):
        return config
    if config not in UNET_CONFIGS:
        raise ValueError(f"unknown UNet config {config!r}; choose one of {sorted(UNET_CONFIGS)}")
    return UNET_CONFIGS[config]
