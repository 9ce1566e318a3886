"""Building blocks of VideoCrafter's 3D U-Net (commit 11bcd76), with VideoCrafter's parameter names."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

TEXT_CONTEXT_LEN = (
    77  # VideoCrafter's hard-coded split between text and image tokens in image cross-attention
)


def timestep_embedding(timesteps: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding ``[cos, sin]`` (cos first) with float32 frequencies, as VideoCrafter's."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32) / half).to(
        timesteps.device
    )
    args = timesteps[:, None].float() * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


class GroupNorm32(nn.GroupNorm):
    """GroupNorm computed in float32 (VideoCrafter's ``normalization``)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.float()).type(x.dtype)


def normalization(channels: int) -> GroupNorm32:
    return GroupNorm32(32, channels)


class RelativePosition(nn.Module):
    """Shaw et al. relative position table ``[2 * max_rel + 1, num_units]`` shared across heads."""

    def __init__(self, num_units: int, max_relative_position: int) -> None:
        super().__init__()
        self.max_relative_position = max_relative_position
        self.embeddings_table = nn.Parameter(torch.empty(max_relative_position * 2 + 1, num_units))
        nn.init.xavier_uniform_(self.embeddings_table)

    def forward(self, length_q: int, length_k: int) -> torch.Tensor:
        dev = self.embeddings_table.device
        dist = torch.arange(length_k, device=dev)[None, :] - torch.arange(length_q, device=dev)[:, None]
        m = self.max_relative_position
        return self.embeddings_table[dist.clamp(-m, m) + m]


class CrossAttention(nn.Module):
    """Multi-head attention with optional Shaw relative positions and decoupled image cross-attention."""

    def __init__(
        self,
        query_dim: int,
        context_dim: int | None = None,
        heads: int = 8,
        dim_head: int = 64,
        dropout: float = 0.0,
        relative_position: bool = False,
        temporal_length: int | None = None,
        img_cross_attention: bool = False,
    ) -> None:
        super().__init__()
        inner = dim_head * heads
        context_dim = query_dim if context_dim is None else context_dim
        self.scale = dim_head**-0.5
        self.heads = heads
        self.to_q = nn.Linear(query_dim, inner, bias=False)
        self.to_k = nn.Linear(context_dim, inner, bias=False)
        self.to_v = nn.Linear(context_dim, inner, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner, query_dim), nn.Dropout(dropout))
        self.image_cross_attention_scale = 1.0
        self.img_cross_attention = img_cross_attention
        if img_cross_attention:
            self.to_k_ip = nn.Linear(context_dim, inner, bias=False)
            self.to_v_ip = nn.Linear(context_dim, inner, bias=False)
        self.relative_position = relative_position
        if relative_position:
            assert temporal_length is not None
            self.relative_position_k = RelativePosition(dim_head, temporal_length)
            self.relative_position_v = RelativePosition(dim_head, temporal_length)

    def _split(self, t: torch.Tensor) -> torch.Tensor:
        b, n, _ = t.shape
        return t.view(b, n, self.heads, -1).transpose(1, 2)  # b h n d

    def _merge(self, t: torch.Tensor) -> torch.Tensor:
        b, h, n, d = t.shape
        return t.transpose(1, 2).reshape(b, n, h * d)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        context = x if context is None else context
        q = self._split(self.to_q(x))
        ctx_img = None
        if self.img_cross_attention:
            context, ctx_img = context[:, :TEXT_CONTEXT_LEN], context[:, TEXT_CONTEXT_LEN:]
        k, v = self._split(self.to_k(context)), self._split(self.to_v(context))
        if self.relative_position:
            lq, lk = q.shape[2], k.shape[2]
            ek = self.relative_position_k(lq, lk)  # i j d
            ev = self.relative_position_v(lq, lk)
            sim = (q @ k.transpose(-1, -2)) * self.scale + torch.einsum("bhid,ijd->bhij", q, ek) * self.scale
            attn = sim.softmax(dim=-1)
            out = attn @ v + torch.einsum("bhij,ijd->bhid", attn, ev)
        else:
            out = F.scaled_dot_product_attention(q, k, v, scale=self.scale)
        out = self._merge(out)
        if ctx_img is not None:
            k_ip, v_ip = self._split(self.to_k_ip(ctx_img)), self._split(self.to_v_ip(ctx_img))
            out_ip = self._merge(F.scaled_dot_product_attention(q, k_ip, v_ip, scale=self.scale))
            out = out + self.image_cross_attention_scale * out_ip
        return self.to_out(out)


class GEGLU(nn.Module):
    def __init__(self, dim_in: int, dim_out: int) -> None:
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        val, gate = self.proj(x).chunk(2, dim=-1)
        return val * F.gelu(gate)


class FeedForward(nn.Module):
    """GEGLU feed-forward: ``net.0.proj`` then ``net.2``."""

    def __init__(self, dim: int, mult: int = 4, dropout: float = 0.0) -> None:
        super().__init__()
        self.net = nn.Sequential(GEGLU(dim, dim * mult), nn.Dropout(dropout), nn.Linear(dim * mult, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class BasicTransformerBlock(nn.Module):
    """attn1 (self) -> attn2 (cross, or self when context_dim is None) -> GEGLU FF, pre-LayerNorm, residuals."""

    def __init__(
        self,
        dim: int,
        heads: int,
        dim_head: int,
        context_dim: int | None,
        dropout: float = 0.0,
        img_cross_attention: bool = False,
        relative_position: bool = False,
        temporal_length: int | None = None,
    ) -> None:
        super().__init__()
        rel = {"relative_position": relative_position, "temporal_length": temporal_length}
        self.attn1 = CrossAttention(dim, None, heads, dim_head, dropout, **rel)
        self.ff = FeedForward(dim, dropout=dropout)
        self.attn2 = CrossAttention(
            dim, context_dim, heads, dim_head, dropout, img_cross_attention=img_cross_attention, **rel
        )
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.norm3 = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        x = self.attn1(self.norm1(x)) + x
        x = self.attn2(self.norm2(x), context=context) + x
        return self.ff(self.norm3(x)) + x


class SpatialTransformer(nn.Module):
    """Per-frame transformer over ``h*w`` tokens; input ``[(b t), c, h, w]``."""

    def __init__(
        self,
        channels: int,
        heads: int,
        dim_head: int,
        depth: int,
        context_dim: int | None,
        use_linear: bool,
        img_cross_attention: bool = False,
    ) -> None:
        super().__init__()
        inner = heads * dim_head
        self.use_linear = use_linear
        self.norm = nn.GroupNorm(32, channels, eps=1e-6)
        self.proj_in = nn.Linear(channels, inner) if use_linear else nn.Conv2d(channels, inner, 1)
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(
                inner, heads, dim_head, context_dim, img_cross_attention=img_cross_attention
            )
            for _ in range(depth)
        )
        self.proj_out = nn.Linear(inner, channels) if use_linear else nn.Conv2d(inner, channels, 1)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None) -> torch.Tensor:
        b, _, h, w = x.shape
        y = self.norm(x)
        if not self.use_linear:
            y = self.proj_in(y)
        y = y.flatten(2).transpose(1, 2)
        if self.use_linear:
            y = self.proj_in(y)
        for blk in self.transformer_blocks:
            y = blk(y, context=context)
        if self.use_linear:
            y = self.proj_out(y)
        y = y.transpose(1, 2).reshape(b, -1, h, w)
        if not self.use_linear:
            y = self.proj_out(y)
        return y + x


class TemporalTransformer(nn.Module):
    """Self-attention over frames at each pixel; input ``[b, c, t, h, w]`` (temporal_selfatt_only)."""

    def __init__(
        self,
        channels: int,
        heads: int,
        dim_head: int,
        depth: int,
        use_linear: bool,
        relative_position: bool = False,
        temporal_length: int | None = None,
    ) -> None:
        super().__init__()
        inner = heads * dim_head
        self.use_linear = use_linear
        self.norm = nn.GroupNorm(32, channels, eps=1e-6)
        self.proj_in = nn.Linear(channels, inner) if use_linear else nn.Conv1d(channels, inner, 1)
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(
                inner,
                heads,
                dim_head,
                None,
                relative_position=relative_position,
                temporal_length=temporal_length,
            )
            for _ in range(depth)
        )
        self.proj_out = nn.Linear(inner, channels) if use_linear else nn.Conv1d(inner, channels, 1)

    def _proj(self, layer: nn.Module, y: torch.Tensor) -> torch.Tensor:
        if self.use_linear:
            return layer(y)
        return layer(y.transpose(1, 2)).transpose(1, 2)  # Conv1d on (n, c, t)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, t, h, w = x.shape
        y = self.norm(x).permute(0, 3, 4, 2, 1).reshape(b * h * w, t, c)
        y = self._proj(self.proj_in, y)
        for blk in self.transformer_blocks:
            y = blk(y)
        y = self._proj(self.proj_out, y)
        return y.reshape(b, h, w, t, c).permute(0, 4, 3, 1, 2) + x


class TemporalConvBlock(nn.Module):
    """Identity + four GN-SiLU-(Dropout)-Conv3d(3,1,1) layers over frames (ModelScope-style)."""

    def __init__(self, channels: int, dropout: float = 0.1, spatial_aware: bool = False) -> None:
        super().__init__()
        k, p = ((3, 3, 3), (1, 1, 1)) if spatial_aware else ((3, 1, 1), (1, 0, 0))
        self.conv1 = nn.Sequential(
            nn.GroupNorm(32, channels), nn.SiLU(), nn.Conv3d(channels, channels, k, padding=p)
        )

        def layer(kk: tuple[int, int, int], pp: tuple[int, int, int]) -> nn.Sequential:
            conv = nn.Conv3d(channels, channels, kk, padding=pp)
            return nn.Sequential(nn.GroupNorm(32, channels), nn.SiLU(), nn.Dropout(dropout), conv)

        self.conv2 = layer(k, p)
        self.conv3 = layer((3, 1, 1), (1, 0, 0))
        self.conv4 = layer((3, 1, 1), (1, 0, 0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv4(self.conv3(self.conv2(self.conv1(x)))) + x


class ResBlock(nn.Module):
    """GN-SiLU-conv, + emb, GN-SiLU-Dropout-conv, skip; then (optionally) the temporal conv block."""

    def __init__(
        self,
        channels: int,
        emb_channels: int,
        dropout: float,
        out_channels: int | None = None,
        use_scale_shift_norm: bool = False,
        use_temporal_conv: bool = False,
        tempspatial_aware: bool = False,
    ) -> None:
        super().__init__()
        out = out_channels or channels
        self.use_scale_shift_norm = use_scale_shift_norm
        self.in_layers = nn.Sequential(
            normalization(channels), nn.SiLU(), nn.Conv2d(channels, out, 3, padding=1)
        )
        self.emb_layers = nn.Sequential(
            nn.SiLU(), nn.Linear(emb_channels, 2 * out if use_scale_shift_norm else out)
        )
        self.out_layers = nn.Sequential(
            normalization(out), nn.SiLU(), nn.Dropout(dropout), nn.Conv2d(out, out, 3, padding=1)
        )
        self.skip_connection: nn.Module = nn.Identity() if out == channels else nn.Conv2d(channels, out, 1)
        self.use_temporal_conv = use_temporal_conv
        if use_temporal_conv:
            self.temopral_conv = TemporalConvBlock(out, dropout=0.1, spatial_aware=tempspatial_aware)

    def forward(self, x: torch.Tensor, emb: torch.Tensor, batch_size: int) -> torch.Tensor:
        h = self.in_layers(x)
        emb_out = self.emb_layers(emb).type(h.dtype)[..., None, None]
        if self.use_scale_shift_norm:
            scale, shift = emb_out.chunk(2, dim=1)
            h = self.out_layers[0](h) * (1 + scale) + shift
            h = self.out_layers[1:](h)
        else:
            h = self.out_layers(h + emb_out)
        h = self.skip_connection(x) + h
        if self.use_temporal_conv:
            bt, c, hh, ww = h.shape
            h5 = h.view(batch_size, bt // batch_size, c, hh, ww).transpose(1, 2)
            h = self.temopral_conv(h5).transpose(1, 2).reshape(bt, c, hh, ww)
        return h


class Downsample(nn.Module):
    def __init__(self, channels: int, out_channels: int) -> None:
        super().__init__()
        self.op = nn.Conv2d(channels, out_channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class Upsample(nn.Module):
    def __init__(self, channels: int, out_channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, out_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


class FpsEmbedding(nn.Sequential):
    """VideoCrafter's ``fps_embedding`` MLP (Linear-SiLU-Linear); its own type so the parameter groups see it."""

    def __init__(self, channels: int, emb_channels: int) -> None:
        super().__init__(nn.Linear(channels, emb_channels), nn.SiLU(), nn.Linear(emb_channels, emb_channels))


class VCSequential(nn.ModuleList):
    """VideoCrafter's TimestepEmbedSequential: routes ``emb``/``context``/``batch_size`` to the layers that take them."""

    def forward(
        self, x: torch.Tensor, emb: torch.Tensor, context: torch.Tensor | None, batch_size: int
    ) -> torch.Tensor:
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb, batch_size)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context)
            elif isinstance(layer, TemporalTransformer):
                bt, c, h, w = x.shape
                x5 = x.view(batch_size, bt // batch_size, c, h, w).transpose(1, 2)
                x = layer(x5).transpose(1, 2).reshape(bt, c, h, w)
            else:
                x = layer(x)
        return x
