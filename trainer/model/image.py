"""Image2Video conditioning: CLIP image tokens -> Resampler (16 queries) -> decoupled cross-attention beside text.

Reuses diffusers' IP-Adapter pieces: `IPAdapterPlusImageProjection` is the same Perceiver Resampler
as VideoCrafter i2v's `lvdm.modules.encoders.ip_resampler.Resampler` (latent queries attend to
[image tokens; queries], then FF). The attention processor is ours, because diffusers'
`IPAdapterAttnProcessor2_0` expects its image tokens through UNet2DConditionModel's
`added_cond_kwargs` plumbing; ours splits the last `num_image_tokens` context tokens off, exactly as
VideoCrafter's CrossAttention splits `context[:, :77]` / `context[:, 77:]`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention
from diffusers.models.embeddings import IPAdapterPlusImageProjection
from torch import nn


class ImageProjection(IPAdapterPlusImageProjection):
    """Resampler: `[B, L, Dv]` CLIP tokens (L=257, Dv=1280 for ViT-H-14) -> `[B, num_queries, context_dim]`."""

    def __init__(
        self,
        *,
        image_token_dim: int,
        context_dim: int,
        num_queries: int,
        depth: int,
        heads: int,
        head_dim: int,
    ):
        super().__init__(
            embed_dims=image_token_dim,
            output_dims=context_dim,
            hidden_dims=context_dim,  # VideoCrafter i2v: Resampler(dim=1024) for context_dim 1024
            depth=depth,
            dim_head=head_dim,
            heads=heads,
            num_queries=num_queries,
            ffn_ratio=4,
        )


class DecoupledCrossAttnProcessor(nn.Module):
    """Cross-attention with separate key/value for image tokens, added to the text attention with a scale.

    out = Attn(q, K_text, V_text) + scale * tanh(gate) * Attn(q, K_img, V_img). The gate starts at 0
    (DynamiCrafter's learnable image_cross_attention_scale idea), so adding I2V to a T2V/SD model
    changes nothing until training opens it; to_k_ip/to_v_ip are copied from the text to_k/to_v at
    inflation, as IP-Adapter initialises them.
    """

    def __init__(self, hidden_size: int, cross_attention_dim: int, num_image_tokens: int, scale: float = 1.0):
        super().__init__()
        self.num_image_tokens, self.scale = num_image_tokens, scale
        self.to_k_ip = nn.Linear(cross_attention_dim, hidden_size, bias=False)
        self.to_v_ip = nn.Linear(cross_attention_dim, hidden_size, bias=False)
        self.gate = nn.Parameter(torch.zeros(()))

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
    ) -> torch.Tensor:
        if encoder_hidden_states is None or encoder_hidden_states.shape[1] <= self.num_image_tokens:
            raise ValueError(
                f"decoupled cross-attention needs [text tokens; {self.num_image_tokens} image tokens] as context"
            )
        text = encoder_hidden_states[:, : -self.num_image_tokens]
        image = encoder_hidden_states[:, -self.num_image_tokens :]
        b = hidden_states.shape[0]

        def heads(y: torch.Tensor) -> torch.Tensor:
            return y.view(b, -1, attn.heads, y.shape[-1] // attn.heads).transpose(1, 2)

        q = heads(attn.to_q(hidden_states))
        out = F.scaled_dot_product_attention(q, heads(attn.to_k(text)), heads(attn.to_v(text)))
        ip = F.scaled_dot_product_attention(q, heads(self.to_k_ip(image)), heads(self.to_v_ip(image)))
        out = out + (self.scale * torch.tanh(self.gate)).to(out.dtype) * ip
        out = out.transpose(1, 2).reshape(b, -1, out.shape[1] * out.shape[3])
        return attn.to_out[1](attn.to_out[0](out))


def add_image_cross_attention(model: nn.Module, num_image_tokens: int, scale: float) -> int:
    """Give every spatial transformer's cross-attention (attn2) a DecoupledCrossAttnProcessor; returns the count."""
    count = 0
    for name, module in model.named_modules():
        if isinstance(module, Attention) and name.endswith("attn2") and module.is_cross_attention:
            hidden = module.to_k.out_features
            module.set_processor(
                DecoupledCrossAttnProcessor(hidden, module.to_k.in_features, num_image_tokens, scale)
            )
            count += 1
    return count


@torch.no_grad()
def init_image_kv_from_text(model: nn.Module) -> int:
    """Copy each cross-attention's text to_k/to_v into its image to_k_ip/to_v_ip (IP-Adapter init)."""
    count = 0
    for module in model.modules():
        if isinstance(module, Attention) and isinstance(module.processor, DecoupledCrossAttnProcessor):
            module.processor.to_k_ip.weight.copy_(module.to_k.weight)
            module.processor.to_v_ip.weight.copy_(module.to_v.weight)
            count += 1
    return count
