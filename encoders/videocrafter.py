"""VideoCrafter model.ckpt -> a model folder FrozenEncoders loads, and VideoCrafter's CLIP image preprocessing."""

from __future__ import annotations

import json
import math
import re
import shutil
from collections.abc import Mapping
from pathlib import Path

import torch

from encoders.tiny import write_preprocessor_config

VAE_PREFIX = "first_stage_model."  # LDM AutoencoderKL (SD 2.1's VAE)
TEXT_PREFIX = "cond_stage_model.model."  # FrozenOpenCLIPEmbedder(layer="penultimate"): OpenCLIP ViT-H-14 text
VISION_PREFIX = "embedder.model.visual."  # FrozenOpenCLIPImageEmbedderV2 (Image2Video only)

# Text-tower keys that are read by nothing FrozenOpenCLIPEmbedder returns, so they are not carried over.
TEXT_UNUSED = {
    "logit_scale": "contrastive temperature, training-only",
    "text_projection": "projects the pooled EOS token; penultimate-layer tokens never pass through it",
    "attn_mask": "the causal mask buffer; CLIPTextModel builds the same mask itself",
}
# Heads are not visible in the weights. OpenCLIP's visual towers whose head width is not 64: ViT-H-14
# (width 1280, head_width 80: 16 heads) and ViT-bigG-14 (1664, 104: 16). Other widths: width // 64.
KNOWN_VISION_HEADS = {1280: 16, 1664: 16}
LDM_VAE_NORM_GROUPS = 32  # ldm.modules.diffusionmodules.model.Normalize hard-codes GroupNorm(32, C)
VAE_SCALING_FACTOR = 0.18215


# ---- helpers ----------------------------------------------------------------------------------------
def _sub(state: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}


def _traced(convert, sub: Mapping[str, torch.Tensor]) -> dict[str, str]:
    """{output key: source key} of a diffusers converter `convert(state)`, found by running it on index probes.

    Each probe is a zero-stride int64 tensor of the source's shape filled with the source's index, so
    renames, slices and transposes keep the provenance and nothing the size of the weights is allocated.
    """
    names = list(sub)
    probes = {k: torch.tensor(i).expand(sub[k].shape) for i, k in enumerate(names)}
    out = convert(probes)
    return {key: names[int(v[(0,) * v.ndim])] for key, v in out.items()}


def _dtype(tensors) -> torch.dtype:
    """The checkpoint's floating dtype for a tower (the widest, if a tower mixes them)."""
    dtype = None
    for t in tensors:
        if t.is_floating_point():
            dtype = t.dtype if dtype is None else torch.promote_types(dtype, t.dtype)
    return dtype or torch.float32


def _indices(keys, pattern: str) -> list[int]:
    return sorted({int(m.group(1)) for k in keys if (m := re.match(pattern, k))})


def _write(
    tower: str,
    prefix: str,
    sub,
    consumed: set[str],
    allowed: set[str],
    model_cls,
    config,
    state: dict[str, torch.Tensor],
    folder: Path,
) -> int:
    """Check that every source key under `prefix` was consumed (or is allowed) and every parameter is
    provided, then build on the meta device, assign the tensors (checkpoint dtype) and save_pretrained."""
    unused = sorted(set(sub) - consumed - allowed)
    if unused:
        shown = ", ".join(prefix + k for k in unused[:20]) + (" ..." if len(unused) > 20 else "")
        raise ValueError(f"{tower}: {len(unused)} checkpoint key(s) the conversion does not use: {shown}")
    with torch.device("meta"):
        model = model_cls.from_config(config) if hasattr(model_cls, "load_config") else model_cls(config)
    expected = model.state_dict()
    state = {_fit_key(k, expected): v for k, v in state.items()}
    missing, extra = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or extra:
        raise ValueError(f"{tower}: no weights under {prefix!r} for {missing[:20]}; unplaced: {extra[:20]}")
    for key, value in state.items():
        if tuple(expected[key].shape) != tuple(value.shape):
            raise ValueError(f"{tower}: {key} is {list(value.shape)}, expected {list(expected[key].shape)}")
    dtype = _dtype(sub.values())
    model.load_state_dict({k: v.to(dtype).contiguous() for k, v in state.items()}, strict=True, assign=True)
    for name, buf in list(model.named_buffers()):  # non-persistent (position_ids): not saved, rebuilt on load
        if buf.is_meta:
            owner, _, attr = name.rpartition(".")
            model.get_submodule(owner).register_buffer(
                attr, torch.zeros(buf.shape, dtype=buf.dtype), persistent=False
            )
    model.save_pretrained(str(folder), safe_serialization=True)
    return len(state)


def _fit_key(key: str, expected) -> str:
    """diffusers names text weights "text_model.*"; transformers >= 5's CLIPTextModel has no such level."""
    if key not in expected and key.startswith("text_model.") and key[len("text_model.") :] in expected:
        return key[len("text_model.") :]
    return key


class _ConfigHolder:
    """What diffusers' convert_open_clip_checkpoint reads from its `text_model` argument (config.hidden_size
    splits in_proj when no text_projection key is present)."""

    def __init__(self, config):
        self.config = config


# ---- VAE ----------------------------------------------------------------------------------------------
def vae_config_from_ldm(sub: Mapping[str, torch.Tensor], norm_groups: int = LDM_VAE_NORM_GROUPS) -> dict:
    """diffusers AutoencoderKL config for an LDM-layout VAE (keys without the first_stage_model. prefix)."""
    from diffusers.loaders.single_file_utils import create_vae_diffusers_config_from_ldm

    levels = _indices(sub, r"encoder\.down\.(\d+)\.")
    if not levels or "encoder.conv_in.weight" not in sub:
        raise ValueError(f"no LDM VAE under {VAE_PREFIX!r} (expected encoder.down.N.block.M...)")
    ch = int(sub["encoder.conv_in.weight"].shape[0])
    widths = [int(sub[f"encoder.down.{i}.block.0.conv1.weight"].shape[0]) for i in levels]
    ddconfig = {
        "ch": ch,
        "ch_mult": [w // ch for w in widths],
        "in_channels": int(sub["encoder.conv_in.weight"].shape[1]),
        "out_ch": int(sub["decoder.conv_out.weight"].shape[0]),
        "z_channels": int(sub["decoder.conv_in.weight"].shape[1]),
        "num_res_blocks": len(_indices(sub, r"encoder\.down\.0\.block\.(\d+)\.")),
    }
    if [ch * m for m in ddconfig["ch_mult"]] != widths:
        raise ValueError(f"VAE block widths {widths} are not multiples of conv_in's {ch}")
    original = {
        "model": {
            "params": {
                "scale_factor": VAE_SCALING_FACTOR,
                "first_stage_config": {"params": {"ddconfig": ddconfig}},
            }
        }
    }
    # sample_size comes from diffusers' model-type guess (an SD 1.x/LDM-like VAE: 512); it only sets tile sizes.
    config = create_vae_diffusers_config_from_ldm(original, dict(sub))
    if any(w % norm_groups for w in [ch, *widths]):
        raise ValueError(
            f"VAE widths {[ch, *widths]} are not divisible by {norm_groups} GroupNorm groups "
            "(LDM's VAE always uses 32): pass vae_norm_groups= the VAE was built with"
        )
    config["norm_num_groups"] = norm_groups
    config["mid_block_add_attention"] = "encoder.mid.attn_1.q.weight" in sub
    config["use_quant_conv"] = "quant_conv.weight" in sub
    config["use_post_quant_conv"] = "post_quant_conv.weight" in sub
    return config


def extract_vae(state, folder: Path, *, norm_groups: int = LDM_VAE_NORM_GROUPS) -> int:
    from diffusers import AutoencoderKL
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    sub = _sub(state, VAE_PREFIX)
    config = vae_config_from_ldm(sub, norm_groups)
    origin = _traced(lambda sd: convert_ldm_vae_checkpoint(sd, config), sub)
    converted = convert_ldm_vae_checkpoint(dict(sub), config)
    return _write(
        "VAE", VAE_PREFIX, sub, set(origin.values()), set(), AutoencoderKL, config, converted, folder
    )


# ---- text ---------------------------------------------------------------------------------------------
def extract_text(state, folder: Path, tokenizer, *, heads: int | None = None) -> dict:
    """OpenCLIP text tower -> CLIPTextModel whose last_hidden_state is ln_final(penultimate block's output)."""
    from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint
    from transformers import CLIPTextConfig, CLIPTextModel

    sub = _sub(state, TEXT_PREFIX)
    blocks = _indices(sub, r"transformer\.resblocks\.(\d+)\.")
    if "token_embedding.weight" not in sub or len(blocks) < 2:
        raise ValueError(f"no OpenCLIP text tower with >= 2 resblocks under {TEXT_PREFIX!r}")
    vocab, width = sub["token_embedding.weight"].shape
    heads = heads or max(1, int(width) // 64)
    if width % heads:
        raise ValueError(f"text width {width} is not divisible by text_heads={heads}")
    config = CLIPTextConfig(
        vocab_size=int(vocab),
        hidden_size=int(width),
        intermediate_size=int(sub["transformer.resblocks.0.mlp.c_fc.weight"].shape[0]),
        num_hidden_layers=len(blocks) - 1,  # layer="penultimate": the last resblock never runs
        num_attention_heads=heads,
        max_position_embeddings=int(sub["positional_embedding"].shape[0]),
        projection_dim=int(sub["text_projection"].shape[1]) if "text_projection" in sub else int(width),
        hidden_act="gelu",
        layer_norm_eps=1e-5,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        architectures=["CLIPTextModel"],
    )

    holder = _ConfigHolder(config)
    origin = _traced(lambda sd: convert_open_clip_checkpoint(holder, sd, prefix=""), sub)
    converted = convert_open_clip_checkpoint(holder, dict(sub), prefix="")
    dropped = f"text_model.encoder.layers.{blocks[-1]}."  # the unused last block
    keep = {k: v for k, v in converted.items() if not k.startswith(dropped) and k != "text_projection.weight"}
    last = f"transformer.resblocks.{blocks[-1]}."
    allowed = set(TEXT_UNUSED) | {k for k in sub if k.startswith(last)}
    consumed = {origin[k] for k in keep}
    n = _write("text", TEXT_PREFIX, sub, consumed, allowed, CLIPTextModel, config, keep, folder)
    return {"tensors": n, "layers": len(blocks) - 1, "dropped_last_block": blocks[-1], "heads": heads}


# ---- vision -------------------------------------------------------------------------------------------
VISION_MAP = {  # OpenCLIP VisionTransformer -> CLIPVisionModelWithProjection (outside the resblocks)
    "conv1.weight": "vision_model.embeddings.patch_embedding.weight",
    "class_embedding": "vision_model.embeddings.class_embedding",
    "positional_embedding": "vision_model.embeddings.position_embedding.weight",
    "ln_pre.weight": "vision_model.pre_layrnorm.weight",
    "ln_pre.bias": "vision_model.pre_layrnorm.bias",
    "ln_post.weight": "vision_model.post_layernorm.weight",
    "ln_post.bias": "vision_model.post_layernorm.bias",
    "proj": "visual_projection.weight",  # OpenCLIP x @ proj; nn.Linear stores the transpose
}


def extract_vision(state, folder: Path, *, heads: int | None = None) -> dict:
    """OpenCLIP visual tower -> CLIPVisionModelWithProjection; last_hidden_state = VideoCrafter's 257 tokens."""
    from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    sub = _sub(state, VISION_PREFIX)
    blocks = _indices(sub, r"transformer\.resblocks\.(\d+)\.")
    if "conv1.weight" not in sub or not blocks:
        raise ValueError(
            f"no OpenCLIP visual tower under {VISION_PREFIX!r} (conv1.weight, transformer.resblocks.N)"
        )
    width, _, patch, _ = sub["conv1.weight"].shape
    rows = int(sub["positional_embedding"].shape[0])
    grid = math.isqrt(rows - 1)
    if grid * grid != rows - 1:
        raise ValueError(f"vision positional_embedding has {rows} rows: not 1 + a square patch grid")
    heads = heads or KNOWN_VISION_HEADS.get(int(width), max(1, int(width) // 64))
    if width % heads:
        raise ValueError(f"vision width {width} is not divisible by vision_heads={heads}")
    config = CLIPVisionConfig(
        hidden_size=int(width),
        intermediate_size=int(sub["transformer.resblocks.0.mlp.c_fc.weight"].shape[0]),
        num_hidden_layers=len(blocks),
        num_attention_heads=heads,
        image_size=int(patch) * grid,
        patch_size=int(patch),
        projection_dim=int(sub["proj"].shape[1]) if "proj" in sub else int(width),
        hidden_act="gelu",
        layer_norm_eps=1e-5,
        architectures=["CLIPVisionModelWithProjection"],
    )

    holder = _ConfigHolder(config)  # in_proj is split at config.hidden_size (no text_projection here)
    blocks_sub = {k: v for k, v in sub.items() if k.startswith("transformer.")}
    origin = _traced(lambda sd: convert_open_clip_checkpoint(holder, sd, prefix=""), blocks_sub)
    converted = convert_open_clip_checkpoint(holder, blocks_sub, prefix="")
    origin = {k.replace("text_model.", "vision_model.", 1): v for k, v in origin.items()}
    converted = {k.replace("text_model.", "vision_model.", 1): v for k, v in converted.items()}
    for src, dst in VISION_MAP.items():
        if src in sub:
            converted[dst] = sub[src].T if src == "proj" else sub[src]
            origin[dst] = src
    consumed = set(origin.values())
    n = _write(
        "vision",
        VISION_PREFIX,
        sub,
        consumed,
        set(),
        CLIPVisionModelWithProjection,
        config,
        converted,
        folder,
    )
    write_preprocessor_config(str(folder), image_size=config.image_size)
    return {"tensors": n, "layers": len(blocks), "heads": heads, "image_size": config.image_size}


# ---- entry point --------------------------------------------------------------------------------------
def extract_encoders(
    state: Mapping[str, torch.Tensor],
    out_dir,
    *,
    tokenizer_dir: str | None,
    image: bool | None = None,
    text_heads: int | None = None,
    vision_heads: int | None = None,
    vae_norm_groups: int = LDM_VAE_NORM_GROUPS,
) -> dict:
    """Write vae/, text_encoder/, tokenizer/ (and image_encoder/) from a VideoCrafter model.ckpt state_dict.

    image: None -> write image_encoder/ when embedder.model.visual.* keys exist; True requires them.
    text_heads / vision_heads: attention heads (not visible in the weights). Defaults: text width // 64
    (OpenCLIP-H text: 16); vision KNOWN_VISION_HEADS by width (ViT-H-14: 16 heads of 80), else width // 64.
    vae_norm_groups: GroupNorm groups of the VAE (LDM's VAE: 32; only a non-LDM VAE needs another value).
    tokenizer_dir: a CLIP tokenizer folder, copied to tokenizer/. Use SD 2.1's: it pads with "!" (id 0) as
    open_clip.tokenize does; padded positions feed the UNet's cross-attention, so the pad id matters
    (the summary's "tokenizer_pad_id" says which one was used).
    Tensors keep the checkpoint's dtype. Keys outside the three encoder prefixes (the UNet, image_proj_model,
    schedule buffers, embedder.model's leftover text parts) are counted in "other_keys" and not read.
    """
    if tokenizer_dir is None:
        raise ValueError(
            "model.ckpt holds no tokenizer: pass tokenizer_dir= a CLIP tokenizer folder "
            "(e.g. stabilityai/stable-diffusion-2-1's tokenizer/, vocab.json + merges.txt)"
        )
    from encoders.models import load_tokenizer

    tokenizer = load_tokenizer(tokenizer_dir)
    has_vision = any(k.startswith(VISION_PREFIX) for k in state)
    if image and not has_vision:
        raise ValueError(
            f"image=True but the checkpoint has no {VISION_PREFIX}* keys (not an Image2Video model)"
        )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    summary: dict = {"out_dir": str(out), "folders": [], "tokenizer_pad_id": tokenizer.pad_token_id}
    summary["vae"] = {"tensors": extract_vae(state, out / "vae", norm_groups=vae_norm_groups)}
    summary["text_encoder"] = extract_text(state, out / "text_encoder", tokenizer, heads=text_heads)
    shutil.copytree(tokenizer_dir, out / "tokenizer", dirs_exist_ok=True)
    summary["folders"] += ["vae", "text_encoder", "tokenizer"]
    if has_vision and image is not False:
        summary["image_encoder"] = extract_vision(state, out / "image_encoder", heads=vision_heads)
        summary["folders"].append("image_encoder")
    prefixes = (VAE_PREFIX, TEXT_PREFIX, VISION_PREFIX)
    summary["other_keys"] = sum(not k.startswith(prefixes) for k in state)
    (out / "videocrafter_extract.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


# ---- VideoCrafter's image preprocessing ---------------------------------------------------------------
def antialias_kernel(in_size: int, out_size: int) -> tuple[int, float]:
    """kornia.geometry.resize's Gaussian prefilter for one axis: (kernel size, sigma) (skimage's sigma rule)."""
    factor = in_size / out_size
    sigma = max((factor - 1.0) / 2.0, 0.001)
    ks = int(max(2.0 * 2 * sigma, 3))
    return (ks if ks % 2 else ks + 1), sigma


def _gaussian_1d(ks: int, sigma: float) -> torch.Tensor:
    x = torch.arange(ks, dtype=torch.float32) - ks // 2
    g = torch.exp(-x.pow(2.0) / (2 * torch.tensor(sigma, dtype=torch.float32) ** 2))
    return g / g.sum()


def _blur(x: torch.Tensor, kernel: torch.Tensor, axis: int) -> torch.Tensor:
    """kornia's filter2d for a 1D kernel along `axis` (-1 width, -2 height): reflect padding, depthwise."""
    c, r = x.shape[1], kernel.numel() // 2
    weight = kernel.to(x).view(1, 1, 1, -1) if axis == -1 else kernel.to(x).view(1, 1, -1, 1)
    pad = (r, r, 0, 0) if axis == -1 else (0, 0, r, r)
    x = torch.nn.functional.pad(x, pad, mode="reflect")
    return torch.nn.functional.conv2d(x, weight.expand(c, 1, *weight.shape[-2:]), groups=c)


def kornia_resize(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """kornia.geometry.resize(x, size, interpolation="bicubic", align_corners=True, antialias=True).

    A same-size input is returned unchanged (as kornia <= 0.7 does; newer kornia interpolates to the
    same size, which bicubic with align_corners=True also leaves unchanged). Downscaling first blurs each
    axis with a Gaussian (sigma = (factor - 1) / 2, kernel = 4 sigma rounded down to odd, >= 3), the
    width pass then the height pass, with reflect padding; upscaling is not blurred.
    """
    h, w = x.shape[-2:]
    if (h, w) == tuple(size):
        return x
    if max(h / size[0], w / size[1]) > 1:
        dtype = x.dtype
        x = x.float()
        (ky, sy), (kx, sx) = antialias_kernel(h, size[0]), antialias_kernel(w, size[1])
        x = _blur(x, _gaussian_1d(1 if w == 1 else kx, sx), -1)
        x = _blur(x, _gaussian_1d(1 if h == 1 else ky, sy), -2).to(dtype)
    return torch.nn.functional.interpolate(x, size=tuple(size), mode="bicubic", align_corners=True)


def videocrafter_preprocess(x: torch.Tensor, size: int, mean, std) -> torch.Tensor:
    """FrozenOpenCLIPImageEmbedderV2.preprocess: x [N,3,H,W] in [-1,1] -> kornia resize to size x size
    (bicubic, align_corners, Gaussian antialias; no crop, aspect not kept), (x + 1) / 2, (x - mean) / std."""
    x = kornia_resize(x, (size, size))
    x = (x + 1.0) / 2.0
    mean = torch.as_tensor(mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    std = torch.as_tensor(std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
    return (x - mean) / std
