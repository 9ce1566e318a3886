"""A model folder (SD 2.1 layout) -> VideoCrafter's frozen tensors: the inverse of `encoders.videocrafter`.

`videocrafter_frozen_state` lays the folder's diffusers VAE and transformers CLIP towers out as VideoCrafter's
``model.ckpt`` holds them (LDM AutoencoderKL, OpenCLIP text/visual), so a checkpoint written from it loads
with ``strict=True``; `extract_encoders` maps the result back to the same models.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path

import torch

from encoders.videocrafter import TEXT_PREFIX, VAE_PREFIX, VISION_MAP, VISION_PREFIX

EMBEDDER_PREFIX = "embedder.model."  # FrozenOpenCLIPImageEmbedderV2 keeps OpenCLIP's CLIP minus .transformer
EMBEDDER_TEXT_LEFTOVERS = (
    "token_embedding.weight",
    "positional_embedding",
    "ln_final.weight",
    "ln_final.bias",
    "text_projection",
    "logit_scale",
)

# ---- VAE: diffusers AutoencoderKL -> LDM AutoencoderKL ------------------------------------------------
_VAE_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def ldm_vae_state(sd: Mapping[str, torch.Tensor], num_blocks: int) -> dict[str, torch.Tensor]:
    """A diffusers AutoencoderKL state dict -> LDM's key layout (no prefix). `num_blocks`: len(block_out_channels).

    diffusers numbers the decoder's up_blocks from the lowest resolution, LDM's ``decoder.up.N`` from the
    highest, so up_blocks.i is up.(num_blocks - 1 - i). LDM's mid-block attention projections are 1x1
    convolutions: the Linear weights get two trailing unit dimensions.
    """
    out: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        k = key.replace("conv_norm_out.", "norm_out.").replace("conv_shortcut.", "nin_shortcut.")
        k = re.sub(r"down_blocks\.(\d+)\.resnets\.", r"down.\1.block.", k)
        k = re.sub(r"down_blocks\.(\d+)\.downsamplers\.0\.", r"down.\1.downsample.", k)
        k = re.sub(r"up_blocks\.(\d+)\.resnets\.", lambda m: f"up.{num_blocks - 1 - int(m[1])}.block.", k)
        k = re.sub(
            r"up_blocks\.(\d+)\.upsamplers\.0\.", lambda m: f"up.{num_blocks - 1 - int(m[1])}.upsample.", k
        )
        k = re.sub(r"mid_block\.resnets\.(\d+)\.", lambda m: f"mid.block_{int(m[1]) + 1}.", k)
        if ".mid_block.attentions.0." in k:
            head, _, tail = k.partition(".mid_block.attentions.0.")
            name, _, part = tail.rpartition(".")
            if name not in _VAE_ATTN:
                raise ValueError(f"VAE: no LDM name for {key!r}")
            k = f"{head}.mid.attn_1.{_VAE_ATTN[name]}.{part}"
            if value.ndim == 2:
                value = value[:, :, None, None]
        if re.search(r"_blocks\.|mid_block\.|resnets\.|attentions\.", k):
            raise ValueError(f"VAE: no LDM name for {key!r}")
        out[k] = value
    return out


# ---- CLIP (transformers) -> OpenCLIP --------------------------------------------------------------------
_BLOCK = {  # OpenCLIP ResidualAttentionBlock <- CLIPEncoderLayer (in_proj = cat(q, k, v) handled apart)
    "attn.out_proj": "self_attn.out_proj",
    "ln_1": "layer_norm1",
    "ln_2": "layer_norm2",
    "mlp.c_fc": "mlp.fc1",
    "mlp.c_proj": "mlp.fc2",
}


def openclip_blocks(sd: Mapping[str, torch.Tensor], src: str, n: int) -> dict[str, torch.Tensor]:
    """CLIPEncoderLayer src0..src{n-1} -> transformer.resblocks.0..n-1 (q/k/v concatenated into in_proj)."""
    out: dict[str, torch.Tensor] = {}
    for i in range(n):
        a, b = f"{src}{i}.", f"transformer.resblocks.{i}."
        for part in ("weight", "bias"):
            out[b + f"attn.in_proj_{part}"] = torch.cat([sd[a + f"self_attn.{p}_proj.{part}"] for p in "qkv"])
            for dst, s in _BLOCK.items():
                out[b + f"{dst}.{part}"] = sd[a + f"{s}.{part}"]
    return out


def _check_consumed(tower: str, sd: Mapping[str, torch.Tensor], used: set[str]) -> None:
    left = sorted(k for k in set(sd) - used if not k.endswith("position_ids"))
    if left:
        raise ValueError(f"{tower}: {len(left)} weight(s) with no OpenCLIP place: {left[:20]}")


def _gelu_clip(tower: str, config) -> None:
    if config.hidden_act != "gelu" or abs(config.layer_norm_eps - 1e-5) > 1e-12:
        raise ValueError(
            f"{tower}: hidden_act={config.hidden_act!r}, layer_norm_eps={config.layer_norm_eps}; OpenCLIP "
            "(VideoCrafter's ViT-H-14) uses exact GELU and eps 1e-5"
        )


def openclip_text_state(
    model, *, layers: int | None = None
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """A CLIPTextModel(WithProjection) -> OpenCLIP text keys (no prefix) with `layers` resblocks, and
    {key: why it is zeros} for the tensors the folder does not hold.

    layers=None: the folder's layers + 1 (SD 2.1 keeps 23 of OpenCLIP-H's 24 blocks: SD and VideoCrafter both
    read the penultimate block, so the 24th is never run; it is filled with zeros). layers = the folder's
    count: the folder is a full OpenCLIP tower whose last block becomes the unused one.
    """
    sd = {k.removeprefix("text_model."): v for k, v in model.state_dict().items()}
    cfg = model.config
    _gelu_clip("text_encoder", cfg)
    n = cfg.num_hidden_layers
    layers = n + 1 if layers is None else layers
    if layers not in (n, n + 1):
        raise ValueError(
            f"text_layers={layers} with a {n}-layer text_encoder: use {n + 1} (the folder is the penultimate-"
            f"layer encoder SD 2.1 ships: one zero block is added) or {n} (the folder is the full tower)"
        )
    out = openclip_blocks(sd, "encoder.layers.", n)
    out["token_embedding.weight"] = sd["embeddings.token_embedding.weight"]
    out["positional_embedding"] = sd["embeddings.position_embedding.weight"]
    out["ln_final.weight"], out["ln_final.bias"] = sd["final_layer_norm.weight"], sd["final_layer_norm.bias"]
    used = {k for k in sd if k.startswith(("embeddings.", "encoder.layers.", "final_layer_norm."))}
    zeros: dict[str, str] = {}
    if layers == n + 1:
        last = f"transformer.resblocks.{n - 1}."
        for key in [k for k in out if k.startswith(last)]:
            new = key.replace(last, f"transformer.resblocks.{n}.")
            out[new] = torch.zeros_like(out[key])
            zeros[new] = (
                f"OpenCLIP's last text block, which the folder does not have (it keeps the {n} blocks up to "
                "the penultimate layer); VideoCrafter's layer='penultimate' output stops before it"
            )
    if "text_projection.weight" in sd:
        out["text_projection"] = sd["text_projection.weight"].T.contiguous()  # x @ proj; Linear stores W^T
        used.add("text_projection.weight")
    else:
        width = int(cfg.hidden_size)
        out["text_projection"] = torch.zeros(width, width, dtype=out["ln_final.weight"].dtype)
        zeros["text_projection"] = (
            "the folder's text encoder has no projection; only the pooled output uses it"
        )
    out["logit_scale"] = torch.zeros((), dtype=out["ln_final.weight"].dtype)
    zeros["logit_scale"] = "the contrastive temperature: no transformers model holds it, no forward reads it"
    _check_consumed("text_encoder", sd, used)
    return out, zeros


# OpenCLIP VisionTransformer <- CLIPVisionModelWithProjection outside the resblocks: VISION_MAP read backwards,
# less `proj` (transposed separately below)
_VISION = {src: dst for src, dst in VISION_MAP.items() if src != "proj"}


def openclip_visual_state(model) -> dict[str, torch.Tensor]:
    """A CLIPVisionModelWithProjection -> OpenCLIP VisionTransformer keys (no prefix)."""
    sd = dict(model.state_dict())
    _gelu_clip("image_encoder", model.config)
    if "visual_projection.weight" not in sd:
        raise ValueError(
            "image_encoder: no visual_projection (OpenCLIP's visual.proj); save it as "
            "CLIPVisionModelWithProjection"
        )
    out = openclip_blocks(sd, "vision_model.encoder.layers.", model.config.num_hidden_layers)
    out.update({dst: sd[src] for dst, src in _VISION.items()})
    out["proj"] = sd["visual_projection.weight"].T.contiguous()
    used = {k for k in sd if k.startswith("vision_model.encoder.layers.")} | set(_VISION.values())
    _check_consumed("image_encoder", sd, used | {"visual_projection.weight"})
    return out


# ---- entry point ----------------------------------------------------------------------------------------
def videocrafter_frozen_parts(
    model_dir,
    *,
    image_encoder_dir=None,
    image: bool,
    text_layers: int | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """`videocrafter_frozen_state` and {key: why it is zeros} for every tensor filled with zeros."""
    from encoders.models import load_image_encoder, load_text_encoder, load_vae

    root = Path(model_dir)
    for sub in ("vae", "text_encoder"):
        if not (root / sub / "config.json").is_file():
            raise FileNotFoundError(f"{root / sub}: no config.json (expected an SD 2.1-style model folder)")
    vae = load_vae(root / "vae").eval()
    cfg = vae.config
    if (
        not cfg.get("mid_block_add_attention", True)
        or not cfg.get("use_quant_conv", True)
        or not cfg.get("use_post_quant_conv", True)
    ):
        raise ValueError(
            f"{root / 'vae'}: LDM's AutoencoderKL always has mid attention and (post_)quant_conv"
        )
    state = {
        VAE_PREFIX + k: v for k, v in ldm_vae_state(vae.state_dict(), len(cfg.block_out_channels)).items()
    }

    text, zeros = openclip_text_state(load_text_encoder(root / "text_encoder").eval(), layers=text_layers)
    state.update({TEXT_PREFIX + k: v for k, v in text.items()})
    notes = {TEXT_PREFIX + k: why for k, why in zeros.items()}
    if image:
        vision_dir = Path(image_encoder_dir) if image_encoder_dir else root / "image_encoder"
        if not (vision_dir / "config.json").is_file():
            raise FileNotFoundError(
                f"{vision_dir}: no config.json; an Image2Video checkpoint needs the OpenCLIP ViT-H-14 image "
                "tower as a CLIPVisionModelWithProjection folder"
            )
        vision = load_image_encoder(vision_dir).eval()
        state.update({VISION_PREFIX + k: v for k, v in openclip_visual_state(vision).items()})
        for k in EMBEDDER_TEXT_LEFTOVERS:  # the V2 embedder deletes only model.transformer
            state[EMBEDDER_PREFIX + k] = text[k]
            if k in zeros:
                notes[EMBEDDER_PREFIX + k] = zeros[k]
    return {k: v.contiguous() for k, v in state.items()}, notes


def videocrafter_frozen_state(
    model_dir,
    *,
    image_encoder_dir=None,
    image: bool,
    text_layers: int | None = None,
) -> dict[str, torch.Tensor]:
    """VideoCrafter's frozen tensors from a model folder (SD 2.1 layout), float32, under VideoCrafter's prefixes.

    - ``first_stage_model.*``: ``vae/`` (diffusers AutoencoderKL) in LDM's AutoencoderKL layout.
    - ``cond_stage_model.model.*``: ``text_encoder/`` (CLIPTextModel or ...WithProjection) as OpenCLIP's text
      tower (FrozenOpenCLIPEmbedder deletes ``visual``). SD 2.1's encoder has 23 of OpenCLIP-H's 24 blocks
      (SD uses the penultimate layer), so VideoCrafter's state dict has one block more than the folder:
      ``transformer.resblocks.{23}.*`` is added filled with ZEROS. It never affects VideoCrafter's output,
      which (layer="penultimate") stops before it. ``text_projection`` [width, width] is zeros when the folder's
      model has no projection (SD 2.1's has none; it only feeds the pooled output, which VideoCrafter does not
      use), and ``logit_scale`` (0-d, the contrastive temperature no forward reads) is always zeros.
      text_layers: the resblock count to write; None = the folder's + 1 (above); = the folder's count when the
      folder is a full OpenCLIP tower (then nothing is zeros but the missing projection / logit_scale).
    - image=True (Image2Video): ``embedder.model.visual.*`` from ``image_encoder/`` (or `image_encoder_dir`),
      a CLIPVisionModelWithProjection, plus the text-side tensors FrozenOpenCLIPImageEmbedderV2 keeps next to
      ``visual`` (token_embedding, positional_embedding, ln_final, text_projection, logit_scale), taken
      from the text encoder (VideoCrafter loads the same OpenCLIP-H weights for both).
    Non-persistent buffers (OpenCLIP's ``attn_mask``) are not part of a state dict and not written.
    `videocrafter_frozen_parts` also returns which tensors are zeros and why.
    """
    return videocrafter_frozen_parts(
        model_dir, image_encoder_dir=image_encoder_dir, image=image, text_layers=text_layers
    )[0]


__all__ = [
    "EMBEDDER_PREFIX",
    "EMBEDDER_TEXT_LEFTOVERS",
    "ldm_vae_state",
    "openclip_blocks",
    "openclip_text_state",
    "openclip_visual_state",
    "videocrafter_frozen_parts",
    "videocrafter_frozen_state",
]
