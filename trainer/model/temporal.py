"""Temporal modules: self-attention along time (optional relative position, causal mask), temporal conv, FPS embedding.

Every module here starts as the identity (its last projection is zero-initialised), so a freshly
inflated video U-Net reproduces the image U-Net frame by frame. `TEMPORAL_MODULE_TYPES` is the one
rule the parameter groups use: a parameter is temporal iff it lives in one of these module types.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.models.attention import FeedForward
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from diffusers.models.resnet import TemporalConvLayer
from torch import nn

from trainer.model import vc_blocks


class TemporalSelfAttention(nn.Module):
    """Multi-head self-attention over the frame axis of `[N, T, C]` (N = batch * pixels)."""

    def __init__(
        self,
        dim: int,
        heads: int,
        head_dim: int,
        *,
        relative_position: bool = False,
        causal: bool = False,
        max_frames: int = 16,
    ):
        super().__init__()
        inner = heads * head_dim
        self.heads, self.head_dim, self.causal, self.max_frames = heads, head_dim, causal, max_frames
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_k = nn.Linear(dim, inner, bias=False)
        self.to_v = nn.Linear(dim, inner, bias=False)
        self.to_out = nn.Linear(inner, dim)
        # A learned bias per head and frame offset (T5-style relative position; VideoCrafter's
        # `use_relative_position` is the Shaw variant, same idea: attention depends on t_q - t_k).
        self.rel_bias = nn.Parameter(torch.zeros(2 * max_frames - 1, heads)) if relative_position else None

    def _bias(self, t: int, device, dtype) -> torch.Tensor | None:
        bias = None
        if self.rel_bias is not None:
            pos = torch.arange(t, device=device)
            offset = (pos[None, :] - pos[:, None]).clamp(-self.max_frames + 1, self.max_frames - 1)
            bias = self.rel_bias[offset + self.max_frames - 1].permute(2, 0, 1).to(dtype)  # [heads, T, T]
        if self.causal:
            mask = torch.full((t, t), float("-inf"), device=device, dtype=dtype).triu(1)
            bias = mask if bias is None else bias + mask
        return bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, t, _ = x.shape

        def split(y):
            return y.view(n, t, self.heads, self.head_dim).transpose(1, 2)

        q, k, v = split(self.to_q(x)), split(self.to_k(x)), split(self.to_v(x))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=self._bias(t, x.device, q.dtype))
        return self.to_out(out.transpose(1, 2).reshape(n, t, self.heads * self.head_dim))


class TemporalBlock(nn.Module):
    """VideoCrafter's temporal BasicTransformerBlock with `temporal_selfatt_only`: two self-attentions + FF."""

    def __init__(self, dim: int, heads: int, head_dim: int, **attn_kwargs):
        super().__init__()
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn1 = TemporalSelfAttention(dim, heads, head_dim, **attn_kwargs)
        self.attn2 = TemporalSelfAttention(dim, heads, head_dim, **attn_kwargs)
        self.ff = FeedForward(dim, activation_fn="geglu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.attn1(self.norm1(x)) + x
        x = self.attn2(self.norm2(x)) + x
        return self.ff(self.norm3(x)) + x


class TemporalTransformer(nn.Module):
    """Attention along time at every pixel of `[B*T, C, H, W]`; residual, zero-initialised output (identity at init)."""

    def __init__(
        self,
        channels: int,
        heads: int,
        head_dim: int,
        *,
        depth: int = 1,
        norm_num_groups: int = 32,
        relative_position: bool = False,
        causal: bool = False,
        max_frames: int = 16,
    ):
        super().__init__()
        inner = heads * head_dim
        self.norm = nn.GroupNorm(norm_num_groups, channels, eps=1e-6)
        self.proj_in = nn.Linear(
            channels, inner
        )  # linear projections, as SD 2.x / VideoCrafter2 `use_linear`
        self.blocks = nn.ModuleList(
            TemporalBlock(
                inner,
                heads,
                head_dim,
                relative_position=relative_position,
                causal=causal,
                max_frames=max_frames,
            )
            for _ in range(depth)
        )
        self.proj_out = nn.Linear(inner, channels)
        nn.init.zeros_(self.proj_out.weight)
        nn.init.zeros_(self.proj_out.bias)

    def forward(self, x: torch.Tensor, num_frames: int) -> torch.Tensor:
        bt, c, h, w = x.shape
        b = bt // num_frames
        y = self.norm(x)
        # [B*T, C, H, W] -> [B*H*W, T, C]
        y = y.view(b, num_frames, c, h, w).permute(0, 3, 4, 1, 2).reshape(b * h * w, num_frames, c)
        y = self.proj_in(y)
        for block in self.blocks:
            y = block(y)
        y = self.proj_out(y)
        y = y.view(b, h, w, num_frames, c).permute(0, 3, 4, 1, 2).reshape(bt, c, h, w)
        return x + y


class TemporalConv(TemporalConvLayer):
    """diffusers' ModelScope temporal conv block (4 x GroupNorm-SiLU-Conv3d(3,1,1), last conv zeroed, residual).

    It is VideoCrafter2's `TemporalConvBlock` under another name; subclassed only so the parameter
    groups can recognise it by type.
    """


class FpsEmbedding(nn.Module):
    """VideoCrafter2's FPS conditioning: sinusoidal(fps) -> MLP, added to the timestep embedding; zero-init output."""

    def __init__(self, model_channels: int, time_embed_dim: int):
        super().__init__()
        self.proj = Timesteps(model_channels, flip_sin_to_cos=True, downscale_freq_shift=0)
        self.embedding = TimestepEmbedding(model_channels, time_embed_dim)
        nn.init.zeros_(self.embedding.linear_2.weight)
        nn.init.zeros_(self.embedding.linear_2.bias)

    def forward(self, fps: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return self.embedding(self.proj(fps.float()).to(dtype))


TEMPORAL_MODULE_TYPES: tuple[type[nn.Module], ...] = (
    TemporalTransformer,
    TemporalConv,
    FpsEmbedding,
    # VideoCrafter's own (trainer.model.vc_blocks): temporal transformers (init_attn included), the
    # temporal conv blocks inside ResBlocks, the fps embedding MLP
    vc_blocks.TemporalTransformer,
    vc_blocks.TemporalConvBlock,
    vc_blocks.FpsEmbedding,
)
