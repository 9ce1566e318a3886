"""VideoUNet: the VideoCrafter-style 3D U-Net (T2V, and I2V with decoupled image cross-attention), and build_unet.

Why composed from diffusers blocks instead of diffusers' own video U-Nets (measured on diffusers 0.42):
- `UNet3DConditionModel` (ModelScope) has the right layout and loads SD 2.x spatial weights, but its
  temporal conv is mandatory in every block (VideoCrafter1 has none), its temporal attention has no
  causal mask or relative position, it always runs its temporal layers (at T=1 they are not the
  identity once trained: perturbing a tiny one's temporal weights by 0.05 moved
  its T=1 output by 0.84 on a 0.91 scale, so image batches would train them), it has no FPS input (only a generic
  `timestep_cond`), and its forward has no way to route image tokens to a decoupled cross-attention.
- `UNetMotionModel` (AnimateDiff) wants context as `[B*T, L, D]`, has no FPS embedding and no
  per-block temporal transformer switches.
So we build on the same diffusers classes SD 2.1 itself uses (ResnetBlock2D, Transformer2DModel,
Down/Upsample2D, Timesteps/TimestepEmbedding, named exactly as in UNet2DConditionModel so the SD
state dict loads by key) and write what diffusers lacks: the temporal transformer, the FPS
embedding, T=1 skipping and the I2V processor (trainer/model/temporal.py, image.py).
"""

from __future__ import annotations

import torch
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from torch import nn

from trainer.model.blocks import DownLevel, Level, MidLevel, UpLevel, temporal_transformer
from trainer.model.config import UNetConfig, get_config
from trainer.model.image import ImageProjection, add_image_cross_attention
from trainer.model.temporal import FpsEmbedding

CLIP_IMAGE_TOKENS = 257  # CLIP ViT-H-14 at 224px: 16x16 patches + class token


class VideoUNet(nn.Module):
    """eps/v-predicting 3D U-Net on latents `[B, C, T, H, W]`; T=1 runs the pure spatial (image) path."""

    def __init__(
        self, config: UNetConfig, *, image_cross_attention: bool = False, image_token_dim: int = 1280
    ):
        super().__init__()
        cfg = self.config = config
        self.image_cross_attention = image_cross_attention
        chans = cfg.block_out_channels
        temb = 4 * cfg.model_channels
        self.conv_in = nn.Conv2d(cfg.in_channels, chans[0], 3, padding=1)
        self.time_proj = Timesteps(cfg.model_channels, flip_sin_to_cos=True, downscale_freq_shift=0)
        self.time_embedding = TimestepEmbedding(cfg.model_channels, temb)
        self.fps_embedding = FpsEmbedding(cfg.model_channels, temb) if cfg.fps_cond else None
        self.init_attn = temporal_transformer(cfg, chans[0]) if cfg.input_temporal_attention else None

        self.down_blocks = nn.ModuleList()
        cout = chans[0]
        for i, c in enumerate(chans):
            cin, cout = cout, c
            self.down_blocks.append(
                DownLevel(cfg, cin, cout, temb, attention=cfg.has_attention(i), downsample=i < len(chans) - 1)
            )
        self.mid_block = MidLevel(cfg, chans[-1], temb)
        self.up_blocks = nn.ModuleList()
        rev = list(reversed(chans))
        cout = rev[0]
        for i in range(len(rev)):
            prev, cout = cout, rev[i]
            cin = rev[min(i + 1, len(rev) - 1)]
            level = len(rev) - 1 - i
            self.up_blocks.append(
                UpLevel(
                    cfg, cin, cout, prev, temb, attention=cfg.has_attention(level), upsample=i < len(rev) - 1
                )
            )
        self.conv_norm_out = nn.GroupNorm(cfg.norm_num_groups, chans[0], eps=1e-5)
        self.conv_act = nn.SiLU()
        self.conv_out = nn.Conv2d(chans[0], cfg.out_channels, 3, padding=1)

        self.image_proj = None
        if image_cross_attention:
            self.image_token_dim = image_token_dim
            self.image_proj = ImageProjection(
                image_token_dim=image_token_dim,
                context_dim=cfg.context_dim,
                num_queries=cfg.image_num_queries,
                depth=cfg.resampler_depth,
                heads=cfg.resampler_heads,
                head_dim=cfg.resampler_head_dim,
            )
            add_image_cross_attention(self, cfg.image_num_queries, cfg.image_attention_scale)

    @property
    def dtype(self) -> torch.dtype:
        return self.conv_in.weight.dtype

    def enable_gradient_checkpointing(self, enabled: bool = True) -> None:
        """Recompute each layer (ResBlock + temporal conv + transformers) in backward instead of storing it."""
        for m in self.modules():
            if isinstance(m, Level):
                m.gradient_checkpointing = enabled

    def forward(
        self,
        x: torch.Tensor,
        timesteps: torch.Tensor,
        context: torch.Tensor,
        fps: torch.Tensor | None = None,
        image_context: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x `[B,C,T,H,W]`, timesteps `[B]` (or `[B,T]`: one per frame), context `[B,L,D]`, fps `[B]`, image_context `[B,Li,Dv]` -> `[B,C,T,H,W]`."""
        b, c, frames, h, w = x.shape
        factor = 2 ** (len(self.config.channel_mult) - 1)
        if h % factor or w % factor:
            raise ValueError(f"latent size {h}x{w} must be divisible by {factor} (the U-Net's downsampling)")
        if c != self.config.in_channels:
            raise ValueError(
                f"latent has {c} channels, the U-Net config expects in_channels={self.config.in_channels}"
            )
        dtype = self.dtype
        timesteps = torch.as_tensor(timesteps, device=x.device)
        per_frame = timesteps.dim() == 2  # [B, T]: one timestep per frame (FIFO-Diffusion)
        if per_frame and tuple(timesteps.shape) != (b, frames):
            raise ValueError(f"per-frame timesteps {tuple(timesteps.shape)} must be [B, T] = [{b}, {frames}]")
        timesteps = timesteps.reshape(-1) if per_frame else timesteps.reshape(-1).expand(b)
        emb = self.time_embedding(self.time_proj(timesteps).to(dtype))
        if (
            self.fps_embedding is not None and frames > 1
        ):  # fps means nothing for a single frame: skipped at T=1
            if fps is None:
                raise ValueError("fps is required for video input (T > 1) when the config has fps_cond=True")
            fps = torch.as_tensor(fps, device=x.device, dtype=torch.float32).reshape(-1).expand(b)
            if per_frame:
                fps = fps.repeat_interleave(frames)
            emb = emb + self.fps_embedding(fps, dtype)
        ctx = context.to(dtype)
        if self.image_proj is not None:
            if image_context is None:  # unconditional image: 257 zero tokens, what image CFG dropout feeds
                image_context = torch.zeros(
                    b, CLIP_IMAGE_TOKENS, self.image_token_dim, device=x.device, dtype=dtype
                )
            ctx = torch.cat([ctx, self.image_proj(image_context.to(dtype))], dim=1)
        if not per_frame:
            emb = emb.repeat_interleave(frames, 0)
        ctx = ctx.repeat_interleave(frames, 0)

        hs = self.conv_in(x.to(dtype).permute(0, 2, 1, 3, 4).reshape(b * frames, c, h, w))
        if self.init_attn is not None and frames > 1:
            hs = self.init_attn(hs, frames)
        skips = [hs]
        for block in self.down_blocks:
            hs, res = block(hs, emb, ctx, frames)
            skips.extend(res)
        hs = self.mid_block(hs, emb, ctx, frames)
        for block in self.up_blocks:
            # hand each block its own slice: ZeRO-3's forward hooks copy list arguments, so a block
            # popping from the shared list would pop from a copy
            n = len(block.resnets)
            mine = skips[-n:]
            del skips[-n:]
            hs = block(hs, mine, emb, ctx, frames)
        hs = self.conv_out(self.conv_act(self.conv_norm_out(hs)))
        return hs.view(b, frames, -1, h, w).permute(0, 2, 1, 3, 4)


def build_unet(
    config: UNetConfig | str, *, image_cross_attention: bool = False, image_token_dim: int = 1280
) -> VideoUNet:
    """A randomly initialised VideoUNet (temporal/FPS/image-gate outputs zeroed); see load_sd_unet_into."""
    return VideoUNet(
        get_config(config), image_cross_attention=image_cross_attention, image_token_dim=image_token_dim
    )
