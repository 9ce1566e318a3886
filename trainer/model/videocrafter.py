"""VideoCrafter's 3D U-Net (VC1/VC2, T2V/I2V) and I2V Resampler, numerically equal to commit 11bcd76."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from trainer.model.vc_blocks import (
    Downsample,
    FpsEmbedding,
    ResBlock,
    SpatialTransformer,
    TemporalTransformer,
    Upsample,
    VCSequential,
    normalization,
    timestep_embedding,
)

DEFAULT_FPS = 16  # VideoCrafter's UNetModel.forward default


@dataclass(kw_only=True)
class VCUNetConfig:
    """The ``unet_config.params`` of a VideoCrafter YAML (same names and defaults as ``UNetModel``)."""

    in_channels: int
    model_channels: int
    out_channels: int
    num_res_blocks: int
    attention_resolutions: tuple[int, ...]
    dropout: float = 0.0
    channel_mult: tuple[int, ...] = (1, 2, 4, 8)
    conv_resample: bool = True
    dims: int = 2
    context_dim: int | None = None
    use_scale_shift_norm: bool = False
    resblock_updown: bool = False
    num_heads: int = -1
    num_head_channels: int = -1
    transformer_depth: int = 1
    use_linear: bool = False
    use_checkpoint: bool = False
    temporal_conv: bool = False
    tempspatial_aware: bool = False
    temporal_attention: bool = True
    temporal_selfatt_only: bool = True
    use_relative_position: bool = True
    use_causal_attention: bool = False
    temporal_length: int | None = None
    use_fp16: bool = False
    addition_attention: bool = False
    use_image_attention: bool = False
    temporal_transformer_depth: int = 1
    fps_cond: bool = False

    @classmethod
    def from_videocrafter(cls, params: Mapping[str, Any]) -> VCUNetConfig:
        """Build from VideoCrafter's ``model.params.unet_config.params`` dict."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(params) - names
        if unknown:
            raise ValueError(f"unknown VideoCrafter UNet params: {sorted(unknown)}")
        kw = dict(params)
        for k in ("attention_resolutions", "channel_mult"):
            if k in kw:
                kw[k] = tuple(kw[k])
        return cls(**kw)

    def heads_for(self, ch: int) -> tuple[int, int]:
        """(heads, dim_head) at a width, as VideoCrafter derives them."""
        if self.num_head_channels == -1:
            return self.num_heads, ch // self.num_heads
        return ch // self.num_head_channels, self.num_head_channels


class VCUNet(nn.Module):
    """VideoCrafter ``UNetModel``; ``state_dict`` keys equal VideoCrafter's without ``model.diffusion_model.``."""

    def __init__(self, cfg: VCUNetConfig) -> None:
        super().__init__()
        if cfg.dims != 2 or cfg.resblock_updown or not cfg.conv_resample:
            raise NotImplementedError("only dims=2, conv_resample=True, resblock_updown=False are supported")
        if not cfg.temporal_selfatt_only or cfg.use_causal_attention:
            raise NotImplementedError(
                "temporal cross-attention and causal temporal attention are not supported"
            )
        self.cfg = cfg
        self.gradient_checkpointing = (
            False  # recompute each block in backward (VideoCrafter's use_checkpoint)
        )
        mc, ted = cfg.model_channels, cfg.model_channels * 4
        self.time_embed = nn.Sequential(nn.Linear(mc, ted), nn.SiLU(), nn.Linear(ted, ted))
        if cfg.fps_cond:
            self.fps_embedding = FpsEmbedding(mc, ted)
        self.input_blocks = nn.ModuleList([VCSequential([nn.Conv2d(cfg.in_channels, mc, 3, padding=1)])])
        if cfg.addition_attention:
            self.init_attn = VCSequential(
                [
                    TemporalTransformer(
                        mc,
                        8,
                        cfg.num_head_channels,
                        cfg.transformer_depth,
                        use_linear=False,
                        relative_position=cfg.use_relative_position,
                        temporal_length=cfg.temporal_length,
                    )
                ]
            )
        chans = [mc]
        ch, ds = mc, 1
        for level, mult in enumerate(cfg.channel_mult):
            for _ in range(cfg.num_res_blocks):
                layers = [self._res(ch, mult * mc)]
                ch = mult * mc
                if ds in cfg.attention_resolutions:
                    layers += self._attn(ch)
                self.input_blocks.append(VCSequential(layers))
                chans.append(ch)
            if level != len(cfg.channel_mult) - 1:
                self.input_blocks.append(VCSequential([Downsample(ch, ch)]))
                chans.append(ch)
                ds *= 2
        self.middle_block = VCSequential([self._res(ch, ch), *self._attn(ch), self._res(ch, ch)])
        self.output_blocks = nn.ModuleList()
        for level, mult in list(enumerate(cfg.channel_mult))[::-1]:
            for i in range(cfg.num_res_blocks + 1):
                layers = [self._res(ch + chans.pop(), mc * mult)]
                ch = mc * mult
                if ds in cfg.attention_resolutions:
                    layers += self._attn(ch)
                if level and i == cfg.num_res_blocks:
                    layers.append(Upsample(ch, ch))
                    ds //= 2
                self.output_blocks.append(VCSequential(layers))
        self.out = nn.Sequential(normalization(ch), nn.SiLU(), nn.Conv2d(mc, cfg.out_channels, 3, padding=1))

    def _res(self, cin: int, cout: int) -> ResBlock:
        c = self.cfg
        return ResBlock(
            cin,
            c.model_channels * 4,
            c.dropout,
            out_channels=cout,
            use_scale_shift_norm=c.use_scale_shift_norm,
            use_temporal_conv=c.temporal_conv,
            tempspatial_aware=c.tempspatial_aware,
        )

    def _attn(self, ch: int) -> list[nn.Module]:
        c = self.cfg
        heads, dh = c.heads_for(ch)
        mods: list[nn.Module] = [
            SpatialTransformer(
                ch,
                heads,
                dh,
                c.transformer_depth,
                c.context_dim,
                c.use_linear,
                img_cross_attention=c.use_image_attention,
            )
        ]
        if c.temporal_attention:
            mods.append(
                TemporalTransformer(
                    ch,
                    heads,
                    dh,
                    c.temporal_transformer_depth,
                    c.use_linear,
                    relative_position=c.use_relative_position,
                    temporal_length=c.temporal_length,
                )
            )
        return mods

    def _run(self, module: VCSequential, x: torch.Tensor, emb, ctx, b: int) -> torch.Tensor:
        if self.gradient_checkpointing and torch.is_grad_enabled():
            return checkpoint(module, x, emb, ctx, b, use_reentrant=False)
        return module(x, emb, ctx, b)

    def embed(self, timesteps: torch.Tensor, fps: torch.Tensor | int | None = None) -> torch.Tensor:
        """``time_embed(tsemb(t)) (+ fps_embedding(tsemb(fps)))``, one row per sample."""
        mc, dtype = self.cfg.model_channels, self.time_embed[0].weight.dtype
        emb = self.time_embed(timestep_embedding(timesteps, mc).to(dtype))
        if self.cfg.fps_cond:
            fps = DEFAULT_FPS if fps is None else fps
            if not isinstance(fps, torch.Tensor):
                fps = torch.full_like(timesteps, fps)
            fps = fps.to(timesteps.device).reshape(-1).expand_as(timesteps)
            emb = emb + self.fps_embedding(timestep_embedding(fps, mc).to(dtype))
        return emb

    def forward(
        self,
        x: torch.Tensor,
        timesteps: torch.Tensor,
        context: torch.Tensor,
        fps: torch.Tensor | int | None = None,
        image_context: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``x`` ``[B, C, T, H, W]``, ``timesteps`` ``[B]`` (or ``[B, T]``: one per frame) -> eps ``[B, C_out, T, H, W]``.

        ``image_context`` (I2V) holds the projected image tokens (``VCResampler`` output); it is appended after
        the text tokens, as VideoCrafter's inference does (``cat([text, image], 1)``).
        """
        b, _, t, h, w = x.shape
        if image_context is not None:
            context = torch.cat([context, image_context], dim=1)
        if timesteps.dim() == 2:  # per-frame timesteps [B, T] (FIFO-Diffusion): one embedding per frame
            if tuple(timesteps.shape) != (b, t):
                raise ValueError(f"per-frame timesteps {tuple(timesteps.shape)} must be [B, T] = [{b}, {t}]")
            if isinstance(fps, torch.Tensor) and fps.numel() > 1:
                fps = fps.reshape(-1).expand(b).repeat_interleave(t)
            emb = self.embed(timesteps.reshape(-1), fps)
        else:
            timesteps = timesteps.reshape(-1).expand(b) if timesteps.numel() == 1 else timesteps
            emb = self.embed(timesteps, fps).repeat_interleave(t, dim=0)
        ctx = context.repeat_interleave(t, dim=0)
        hcur = x.transpose(1, 2).reshape(b * t, -1, h, w)
        run = self._run
        hs = []
        for i, module in enumerate(self.input_blocks):
            hcur = run(module, hcur, emb, ctx, b)
            if i == 0 and self.cfg.addition_attention:
                hcur = run(self.init_attn, hcur, emb, ctx, b)
            hs.append(hcur)
        hcur = run(self.middle_block, hcur, emb, ctx, b)
        for module in self.output_blocks:
            hcur = run(module, torch.cat([hcur, hs.pop()], dim=1), emb, ctx, b)
        y = self.out(hcur)
        return y.reshape(b, t, *y.shape[1:]).transpose(1, 2)


class PerceiverAttention(nn.Module):
    """Resampler attention: q from latents, k/v from ``cat(x, latents)``, scaled by dim_head^-0.25 each."""

    def __init__(self, *, dim: int, dim_head: int, heads: int) -> None:
        super().__init__()
        inner = dim_head * heads
        self.dim_head, self.heads = dim_head, heads
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim, inner * 2, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)

    def forward(self, x: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        x, latents = self.norm1(x), self.norm2(latents)
        b, n, _ = latents.shape
        q = self.to_q(latents)
        k, v = self.to_kv(torch.cat([x, latents], dim=-2)).chunk(2, dim=-1)
        q, k, v = (z.view(b, z.shape[1], self.heads, -1).transpose(1, 2) for z in (q, k, v))
        s = 1 / math.sqrt(math.sqrt(self.dim_head))
        w = torch.softmax(((q * s) @ (k * s).transpose(-2, -1)).float(), dim=-1).type(q.dtype)
        return self.to_out((w @ v).transpose(1, 2).reshape(b, n, -1))


class VCResampler(nn.Module):
    """VideoCrafter I2V image projection (``image_proj_model``): CLIP image tokens -> ``num_queries`` tokens."""

    def __init__(
        self,
        *,
        dim: int = 1024,
        depth: int = 4,
        dim_head: int = 64,
        heads: int = 12,
        num_queries: int = 16,
        embedding_dim: int = 1280,
        output_dim: int = 1024,
        ff_mult: int = 4,
    ) -> None:
        super().__init__()
        self.latents = nn.Parameter(torch.randn(1, num_queries, dim) / dim**0.5)
        self.proj_in = nn.Linear(embedding_dim, dim)
        self.proj_out = nn.Linear(dim, output_dim)
        self.norm_out = nn.LayerNorm(output_dim)
        inner = dim * ff_mult
        self.layers = nn.ModuleList(
            nn.ModuleList(
                [
                    PerceiverAttention(dim=dim, dim_head=dim_head, heads=heads),
                    nn.Sequential(
                        nn.LayerNorm(dim),
                        nn.Linear(dim, inner, bias=False),
                        nn.GELU(),
                        nn.Linear(inner, dim, bias=False),
                    ),
                ]
            )
            for _ in range(depth)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        latents = self.latents.repeat(x.shape[0], 1, 1)
        x = self.proj_in(x)
        for attn, ff in self.layers:  # type: ignore[misc]
            latents = attn(x, latents) + latents
            latents = ff(latents) + latents
        return self.norm_out(self.proj_out(latents))


class VideoCrafterModel(nn.Module):
    """What a VideoCrafter checkpoint trains: the U-Net and, for Image2Video, the Resampler.

    ``state_dict`` keys are ``unet.*`` (VideoCrafter's ``model.diffusion_model.*``) and ``image_proj.*``
    (``image_proj_model.*``); the frozen VAE and OpenCLIP towers live in encoders/.
    """

    def __init__(
        self,
        unet_params: Mapping[str, Any],
        image_proj_params: Mapping[str, Any] | None = None,
        *,
        preset: str | None = None,
    ) -> None:
        super().__init__()
        self.unet_params = dict(unet_params)
        self.image_proj_params = None if image_proj_params is None else dict(image_proj_params)
        self.preset = preset
        self.unet = VCUNet(VCUNetConfig.from_videocrafter(unet_params))
        self.image_proj = None if image_proj_params is None else VCResampler(**image_proj_params)

    @property
    def dtype(self) -> torch.dtype:
        return self.unet.time_embed[0].weight.dtype

    def enable_gradient_checkpointing(self, enabled: bool = True) -> None:
        self.unet.gradient_checkpointing = enabled

    def forward(
        self,
        x: torch.Tensor,
        timesteps: torch.Tensor,
        context: torch.Tensor,
        fps: torch.Tensor | int | None = None,
        image_context: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``x`` ``[B,C,T,H,W]``, ``timesteps`` ``[B]`` or per frame ``[B,T]``; ``image_context`` the CLIP image
        tokens ``[B,257,D]`` (Image2Video only).

        Every module runs at every frame count, T=1 included, exactly as in VideoCrafter. The unconditional
        image (guidance, image dropout) is the mid-grey image's tokens, not zeros: see
        ``encoders.FrozenEncoders.null_image_tokens``.
        """
        dtype = self.dtype
        projected = None
        if self.image_proj is not None:
            if image_context is None:
                raise ValueError(
                    "this Image2Video model needs image_context (CLIP image tokens [B,257,D]); for the "
                    "unconditional branch pass the mid-grey image's tokens (FrozenEncoders.null_image_tokens)"
                )
            projected = self.image_proj(image_context.to(dtype))
        elif image_context is not None:
            raise ValueError("image_context given to a text-to-video model (no image_proj)")
        return self.unet(x.to(dtype), timesteps, context.to(dtype), fps, projected)


__all__ = ["DEFAULT_FPS", "VCResampler", "VCUNet", "VCUNetConfig", "VideoCrafterModel"]
