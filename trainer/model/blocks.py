"""The U-Net's levels: down, mid and up blocks of ResBlock -> temporal conv -> spatial transformer -> temporal transformer.

Module names (`resnets`, `attentions`, `downsamplers`, `upsamplers`) and channel bookkeeping copy
diffusers' UNet2DConditionModel blocks, so an SD 2.1 `unet/` state dict loads by name; the temporal
modules live beside them (`temp_convs`, `temp_attentions`), as in diffusers' UNet3DConditionModel.
All work happens on frames flattened into the batch, `[B*T, C, H, W]`.

T=1 (image batches): the temporal modules are *skipped*, not run. A temporal transformer at T=1 is
not the identity once trained (softmax over one key still returns to_out(to_v(x))), nor is the
zero-padded temporal conv; skipping makes an image batch run exactly the spatial (SD) network, so
joint image/video training trains the spatial weights on images and the temporal weights on
videos only, as VideoCrafter2's joint training intends (images keep the spatial prior; motion comes
from videos).
"""

from __future__ import annotations

import torch
from diffusers.models.resnet import Downsample2D, ResnetBlock2D, Upsample2D
from diffusers.models.transformers.transformer_2d import Transformer2DModel
from torch import nn
from torch.utils.checkpoint import checkpoint

from trainer.model.config import UNetConfig
from trainer.model.temporal import TemporalConv, TemporalTransformer


def spatial_transformer(cfg: UNetConfig, channels: int) -> Transformer2DModel:
    """SD 2.x spatial transformer: self-attention + cross-attention to text, linear projections."""
    heads = cfg.heads(channels)
    return Transformer2DModel(
        heads,
        channels // heads,
        in_channels=channels,
        num_layers=cfg.transformer_depth,
        cross_attention_dim=cfg.context_dim,
        norm_num_groups=cfg.norm_num_groups,
        use_linear_projection=True,
    )


def temporal_transformer(cfg: UNetConfig, channels: int) -> TemporalTransformer:
    heads = cfg.heads(channels)
    return TemporalTransformer(
        channels,
        heads,
        channels // heads,
        depth=cfg.temporal_depth,
        norm_num_groups=cfg.norm_num_groups,
        relative_position=cfg.use_relative_position,
        causal=cfg.use_causal_attention,
        max_frames=cfg.temporal_length,
    )


def resnet(cfg: UNetConfig, cin: int, cout: int, temb: int) -> ResnetBlock2D:
    return ResnetBlock2D(
        in_channels=cin, out_channels=cout, temb_channels=temb, eps=1e-5, groups=cfg.norm_num_groups
    )


class Level(nn.Module):
    """Shared layer logic: layer i = resnets[i] (+ temp_convs[i]) (+ attentions[i] + temp_attentions[i])."""

    gradient_checkpointing: bool = False

    def _init_layers(self, cfg: UNetConfig, resnets: list[ResnetBlock2D], channels: int, n_attn: int):
        self.resnets = nn.ModuleList(resnets)
        g = cfg.norm_num_groups
        self.temp_convs = (
            nn.ModuleList(TemporalConv(channels, channels, norm_num_groups=g) for _ in resnets)
            if cfg.temporal_conv
            else None
        )
        self.attentions = (
            nn.ModuleList(spatial_transformer(cfg, channels) for _ in range(n_attn)) if n_attn else None
        )
        self.temp_attentions = (
            nn.ModuleList(temporal_transformer(cfg, channels) for _ in range(n_attn)) if n_attn else None
        )

    def _layer(
        self, i: int, h: torch.Tensor, emb: torch.Tensor, ctx: torch.Tensor, frames: int
    ) -> torch.Tensor:
        h = self.resnets[i](h, emb)
        if self.temp_convs is not None and frames > 1:
            h = self.temp_convs[i](h, num_frames=frames)
        if self.attentions is not None and i < len(self.attentions):
            h = self.attentions[i](h, encoder_hidden_states=ctx, return_dict=False)[0]
            if frames > 1:
                h = self.temp_attentions[i](h, frames)
        return h

    def layer(
        self, i: int, h: torch.Tensor, emb: torch.Tensor, ctx: torch.Tensor, frames: int
    ) -> torch.Tensor:
        if self.gradient_checkpointing and torch.is_grad_enabled():
            return checkpoint(self._layer, i, h, emb, ctx, frames, use_reentrant=False)
        return self._layer(i, h, emb, ctx, frames)


class DownLevel(Level):
    def __init__(self, cfg: UNetConfig, cin: int, cout: int, temb: int, *, attention: bool, downsample: bool):
        super().__init__()
        n = cfg.num_res_blocks
        self._init_layers(
            cfg,
            [resnet(cfg, cin if i == 0 else cout, cout, temb) for i in range(n)],
            cout,
            n if attention else 0,
        )
        self.downsamplers = (
            nn.ModuleList([Downsample2D(cout, use_conv=True, out_channels=cout, padding=1, name="op")])
            if downsample
            else None
        )

    def forward(self, h, emb, ctx, frames):
        skips = []
        for i in range(len(self.resnets)):
            h = self.layer(i, h, emb, ctx, frames)
            skips.append(h)
        if self.downsamplers is not None:
            h = self.downsamplers[0](h)
            skips.append(h)
        return h, skips


class MidLevel(Level):
    """ResBlock, spatial + temporal transformer, ResBlock (SD's UNetMidBlock2DCrossAttn plus temporal modules)."""

    def __init__(self, cfg: UNetConfig, channels: int, temb: int):
        super().__init__()
        self._init_layers(cfg, [resnet(cfg, channels, channels, temb) for _ in range(2)], channels, 1)

    def forward(self, h, emb, ctx, frames):
        h = self.layer(0, h, emb, ctx, frames)
        return self.layer(1, h, emb, ctx, frames)


class UpLevel(Level):
    def __init__(
        self, cfg: UNetConfig, cin: int, cout: int, prev: int, temb: int, *, attention: bool, upsample: bool
    ):
        super().__init__()
        n = cfg.num_res_blocks + 1
        resnets = []
        for i in range(n):
            skip = cin if i == n - 1 else cout
            resnets.append(resnet(cfg, (prev if i == 0 else cout) + skip, cout, temb))
        self._init_layers(cfg, resnets, cout, n if attention else 0)
        self.upsamplers = (
            nn.ModuleList([Upsample2D(cout, use_conv=True, out_channels=cout)]) if upsample else None
        )

    def forward(self, h, skips, emb, ctx, frames):
        for i in range(len(self.resnets)):
            h = torch.cat([h, skips.pop()], dim=1)
            h = self.layer(i, h, emb, ctx, frames)
        if self.upsamplers is not None:
            h = self.upsamplers[0](h)
        return h
