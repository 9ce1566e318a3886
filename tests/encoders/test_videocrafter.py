"""VideoCrafter model.ckpt extraction (LDM VAE, OpenCLIP text/visual towers) and its image preprocessing."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from encoders.models import FrozenEncoders, ModelsConfig, write_tiny_models
from encoders.tiny import CLIP_MEAN, CLIP_STD
from encoders.videocrafter import (
    antialias_kernel,
    extract_encoders,
    kornia_resize,
    videocrafter_preprocess,
)

HEADS = 2  # the tiny towers' heads (not visible in the weights)


# ---- inverse mappings: diffusers/transformers layout -> VideoCrafter's (LDM, OpenCLIP) -------------------
def _ldm_vae(sd: dict[str, torch.Tensor], num_up: int) -> dict[str, torch.Tensor]:
    """diffusers AutoencoderKL state dict -> LDM layout (written independently of diffusers' converter)."""
    out = {}
    for key, value in sd.items():
        k = key.replace("conv_norm_out", "norm_out").replace("conv_shortcut", "nin_shortcut")
        k = re.sub(r"down_blocks\.(\d+)\.resnets\.", r"down.\1.block.", k)
        k = re.sub(r"down_blocks\.(\d+)\.downsamplers\.0\.", r"down.\1.downsample.", k)
        k = re.sub(r"up_blocks\.(\d+)\.resnets\.", lambda m: f"up.{num_up - 1 - int(m[1])}.block.", k)
        k = re.sub(
            r"up_blocks\.(\d+)\.upsamplers\.0\.", lambda m: f"up.{num_up - 1 - int(m[1])}.upsample.", k
        )
        k = re.sub(r"mid_block\.resnets\.(\d+)\.", lambda m: f"mid.block_{int(m[1]) + 1}.", k)
        if "mid_block.attentions.0." in k:
            k = k.replace("mid_block.attentions.0.", "mid.attn_1.")
            for a, b in (
                ("group_norm", "norm"),
                ("to_q", "q"),
                ("to_k", "k"),
                ("to_v", "v"),
                ("to_out.0", "proj_out"),
            ):
                k = k.replace(f".{a}.", f".{b}.")
            if value.ndim == 2:  # LDM's attention projections are 1x1 convolutions
                value = value[:, :, None, None]
        out["first_stage_model." + k] = value.clone()
    return out


def _openclip_blocks(sd: dict[str, torch.Tensor], src: str, dst: str, n: int) -> dict[str, torch.Tensor]:
    """HF CLIP encoder layers -> OpenCLIP transformer.resblocks (q/k/v concatenated into in_proj)."""
    out = {}
    for i in range(n):
        a, b = f"{src}{i}.", f"{dst}transformer.resblocks.{i}."
        for part in ("weight", "bias"):
            out[b + f"attn.in_proj_{part}"] = torch.cat([sd[a + f"self_attn.{p}_proj.{part}"] for p in "qkv"])
            out[b + f"attn.out_proj.{part}"] = sd[a + f"self_attn.out_proj.{part}"]
            out[b + f"ln_1.{part}"] = sd[a + f"layer_norm1.{part}"]
            out[b + f"ln_2.{part}"] = sd[a + f"layer_norm2.{part}"]
            out[b + f"mlp.c_fc.{part}"] = sd[a + f"mlp.fc1.{part}"]
            out[b + f"mlp.c_proj.{part}"] = sd[a + f"mlp.fc2.{part}"]
    return out


def _strip(sd: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix) :] if k.startswith(prefix) else k: v for k, v in sd.items()}


def _openclip_text(model, extra_block_seed: int = 7) -> dict[str, torch.Tensor]:
    """CLIPTextModelWithProjection -> cond_stage_model.model.* with ONE EXTRA random last resblock."""
    sd = _strip({k: v.clone() for k, v in model.state_dict().items()}, "text_model.")
    n = model.config.num_hidden_layers
    p = "cond_stage_model.model."
    out = _openclip_blocks(sd, "encoder.layers.", p, n)
    g = torch.Generator().manual_seed(extra_block_seed)
    for key in [k for k in out if f"resblocks.{n - 1}." in k]:  # the penultimate rule drops this block
        out[key.replace(f"resblocks.{n - 1}.", f"resblocks.{n}.")] = torch.randn(out[key].shape, generator=g)
    out[p + "token_embedding.weight"] = sd["embeddings.token_embedding.weight"]
    out[p + "positional_embedding"] = sd["embeddings.position_embedding.weight"]
    out[p + "ln_final.weight"] = sd["final_layer_norm.weight"]
    out[p + "ln_final.bias"] = sd["final_layer_norm.bias"]
    out[p + "text_projection"] = sd["text_projection.weight"].T.contiguous()
    out[p + "logit_scale"] = torch.tensor(4.6052)
    return out


def _openclip_visual(model) -> dict[str, torch.Tensor]:
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    p, v = "embedder.model.visual.", "vision_model."
    out = _openclip_blocks(sd, v + "encoder.layers.", p, model.config.num_hidden_layers)
    out[p + "conv1.weight"] = sd[v + "embeddings.patch_embedding.weight"]
    out[p + "class_embedding"] = sd[v + "embeddings.class_embedding"]
    out[p + "positional_embedding"] = sd[v + "embeddings.position_embedding.weight"]
    for a, b in (("ln_pre", "pre_layrnorm"), ("ln_post", "post_layernorm")):
        out[p + f"{a}.weight"], out[p + f"{a}.bias"] = sd[v + f"{b}.weight"], sd[v + f"{b}.bias"]
    out[p + "proj"] = sd["visual_projection.weight"].T.contiguous()
    return out


# ---- plain-torch OpenCLIP forwards (the independent references) -------------------------------------------
def _resblocks(x: torch.Tensor, sd, prefix: str, n: int, heads: int, mask=None) -> torch.Tensor:
    """OpenCLIP ResidualAttentionBlock x n on x [N,L,D] (nn.MultiheadAttention, exact GELU)."""
    d = x.shape[-1]
    for i in range(n):
        b = f"{prefix}transformer.resblocks.{i}."
        attn = torch.nn.MultiheadAttention(d, heads, batch_first=True)
        attn.load_state_dict(
            {
                "in_proj_weight": sd[b + "attn.in_proj_weight"],
                "in_proj_bias": sd[b + "attn.in_proj_bias"],
                "out_proj.weight": sd[b + "attn.out_proj.weight"],
                "out_proj.bias": sd[b + "attn.out_proj.bias"],
            }
        )
        h = F.layer_norm(x, (d,), sd[b + "ln_1.weight"], sd[b + "ln_1.bias"], 1e-5)
        x = x + attn(h, h, h, need_weights=False, attn_mask=mask)[0]
        h = F.layer_norm(x, (d,), sd[b + "ln_2.weight"], sd[b + "ln_2.bias"], 1e-5)
        h = F.gelu(F.linear(h, sd[b + "mlp.c_fc.weight"], sd[b + "mlp.c_fc.bias"]))
        x = x + F.linear(h, sd[b + "mlp.c_proj.weight"], sd[b + "mlp.c_proj.bias"])
    return x


def _openclip_text_penultimate(sd, ids: torch.Tensor, heads: int) -> torch.Tensor:
    """FrozenOpenCLIPEmbedder(layer="penultimate").encode_with_transformer."""
    p = "cond_stage_model.model."
    n = 1 + max(
        int(m[1]) for k in sd if (m := re.match(re.escape(p) + r"transformer\.resblocks\.(\d+)\.", k))
    )
    x = F.embedding(ids, sd[p + "token_embedding.weight"]) + sd[p + "positional_embedding"]
    length = ids.shape[1]
    mask = torch.full((length, length), float("-inf")).triu_(1)  # open_clip's build_attention_mask
    x = _resblocks(x, sd, p, n - 1, heads, mask)  # all but the last block
    d = x.shape[-1]
    return F.layer_norm(x, (d,), sd[p + "ln_final.weight"], sd[p + "ln_final.bias"], 1e-5)


def _openclip_visual_tokens(sd, pixels: torch.Tensor, heads: int) -> torch.Tensor:
    """FrozenOpenCLIPImageEmbedderV2.encode_with_vision_transformer after preprocess (no ln_post/proj)."""
    p = "embedder.model.visual."
    n = 1 + max(
        int(m[1]) for k in sd if (m := re.match(re.escape(p) + r"transformer\.resblocks\.(\d+)\.", k))
    )
    w = sd[p + "conv1.weight"]
    x = F.conv2d(pixels, w, stride=w.shape[-1]).flatten(2).transpose(1, 2)
    cls = sd[p + "class_embedding"].expand(x.shape[0], 1, -1)
    x = torch.cat([cls, x], dim=1) + sd[p + "positional_embedding"]
    x = F.layer_norm(x, (x.shape[-1],), sd[p + "ln_pre.weight"], sd[p + "ln_pre.bias"], 1e-5)
    return _resblocks(x, sd, p, n, heads)


# ---- fixtures -----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return Path(write_tiny_models(str(tmp_path_factory.mktemp("tiny")), seed=0))


@pytest.fixture(scope="module")
def originals(tiny):
    from diffusers import AutoencoderKL
    from transformers import CLIPTextModelWithProjection, CLIPVisionModelWithProjection

    vae = AutoencoderKL.from_pretrained(str(tiny / "vae")).eval()
    text = CLIPTextModelWithProjection.from_pretrained(str(tiny / "text_encoder")).eval()
    vision = CLIPVisionModelWithProjection.from_pretrained(str(tiny / "image_encoder")).eval()
    return vae, text, vision


@pytest.fixture(scope="module")
def ckpt(originals) -> dict[str, torch.Tensor]:
    """A VideoCrafter Image2Video-like state dict built from the tiny models (+ UNet-ish keys to ignore)."""
    vae, text, vision = originals
    state = _ldm_vae(vae.state_dict(), len(vae.config.block_out_channels))
    state.update(_openclip_text(text))
    state.update(_openclip_visual(vision))
    state["model.diffusion_model.input_blocks.0.0.weight"] = torch.zeros(4, 4, 3, 3)
    state["embedder.model.ln_final.weight"] = torch.ones(32)  # V2 keeps the text parts next to .visual
    state["scale_factor"] = torch.tensor(0.18215)
    return state


@pytest.fixture(scope="module")
def extracted(ckpt, tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("vc") / "models"
    summary = extract_encoders(
        ckpt,
        out,
        tokenizer_dir=str(tiny / "tokenizer"),
        text_heads=HEADS,
        vision_heads=HEADS,
        vae_norm_groups=8,
    )
    return out, summary


# ---- extraction ----------------------------------------------------------------------------------------
def test_summary_and_layout(extracted, ckpt):
    out, summary = extracted
    assert summary["folders"] == ["vae", "text_encoder", "tokenizer", "image_encoder"]
    assert summary["text_encoder"]["layers"] == 2 and summary["text_encoder"]["dropped_last_block"] == 2
    assert summary["other_keys"] == 3
    assert summary["vae"]["tensors"] == sum(k.startswith("first_stage_model.") for k in ckpt)
    vae_cfg = json.loads((out / "vae/config.json").read_text())
    assert vae_cfg["block_out_channels"] == [8, 16, 32, 32] and vae_cfg["layers_per_block"] == 1
    assert (vae_cfg["latent_channels"], vae_cfg["scaling_factor"]) == (4, 0.18215)
    text_cfg = json.loads((out / "text_encoder/config.json").read_text())
    assert text_cfg["num_hidden_layers"] == 2 and text_cfg["architectures"] == ["CLIPTextModel"]
    vis_cfg = json.loads((out / "image_encoder/config.json").read_text())
    assert (vis_cfg["image_size"], vis_cfg["patch_size"], vis_cfg["hidden_size"]) == (32, 8, 48)
    assert (out / "image_encoder/preprocessor_config.json").is_file()
    assert (out / "tokenizer/vocab.json").is_file()


def test_vae_matches_the_original(extracted, originals):
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(str(extracted[0] / "vae")).eval()
    x = torch.rand(2, 3, 32, 48, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        ref, got = originals[0].encode(x).latent_dist, vae.encode(x).latent_dist
        torch.testing.assert_close(got.mean, ref.mean, atol=1e-6, rtol=0)
        torch.testing.assert_close(got.std, ref.std, atol=1e-6, rtol=0)
        z = ref.mean
        torch.testing.assert_close(vae.decode(z).sample, originals[0].decode(z).sample, atol=1e-6, rtol=0)


def test_text_is_openclip_penultimate_plus_ln_final(extracted, ckpt, originals):
    from transformers import CLIPTextModel

    text = CLIPTextModel.from_pretrained(str(extracted[0] / "text_encoder")).eval()
    ids = torch.randint(0, text.config.vocab_size, (2, 77), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got = text(input_ids=ids).last_hidden_state
        ref = _openclip_text_penultimate(ckpt, ids, HEADS)
        full = originals[1](input_ids=ids).last_hidden_state  # the tiny 2-layer model itself
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got, full, atol=1e-5, rtol=1e-5)


def test_vision_tokens_are_the_last_block_without_ln_post(extracted, ckpt, originals):
    from transformers import CLIPVisionModelWithProjection

    vision = CLIPVisionModelWithProjection.from_pretrained(str(extracted[0] / "image_encoder")).eval()
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        out = vision(pixel_values=pixels)
        ref = _openclip_visual_tokens(ckpt, pixels, HEADS)
        orig = originals[2](pixel_values=pixels)
    assert out.last_hidden_state.shape == (2, 17, 48)
    torch.testing.assert_close(out.last_hidden_state, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.image_embeds, orig.image_embeds, atol=1e-6, rtol=0)  # ln_post + proj


def test_fp16_checkpoint_stays_fp16(ckpt, tiny, tmp_path):
    from safetensors import safe_open

    half = {k: v.half() if v.is_floating_point() else v for k, v in ckpt.items()}
    extract_encoders(
        half,
        tmp_path,
        tokenizer_dir=str(tiny / "tokenizer"),
        image=False,
        text_heads=HEADS,
        vae_norm_groups=8,
    )
    for sub in ("vae", "text_encoder"):
        (file,) = (tmp_path / sub).glob("*.safetensors")
        with safe_open(str(file), "pt") as f:
            assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.float16}
    assert not (tmp_path / "image_encoder").exists()


@pytest.mark.parametrize(
    "extra",
    [
        "first_stage_model.encoder.mystery.weight",
        "cond_stage_model.model.visual.proj",
        "embedder.model.visual.ls_1.gamma",
    ],
)
def test_unconsumed_key_is_an_error_naming_it(ckpt, tiny, tmp_path, extra):
    bad = {**ckpt, extra: torch.zeros(3)}
    with pytest.raises(ValueError, match=re.escape(extra)):
        extract_encoders(
            bad, tmp_path, tokenizer_dir=str(tiny / "tokenizer"), text_heads=HEADS, vae_norm_groups=8
        )


def test_missing_tokenizer_dir_names_the_option(ckpt, tiny, tmp_path):
    with pytest.raises(ValueError, match="tokenizer_dir="):
        extract_encoders(ckpt, tmp_path, tokenizer_dir=None)
    with pytest.raises(
        ValueError, match="vae_norm_groups"
    ):  # 32 groups do not divide the tiny VAE's 8 channels
        extract_encoders(ckpt, tmp_path, tokenizer_dir=str(tiny / "tokenizer"))


def test_frozen_encoders_load_the_extracted_folder(extracted):
    enc = FrozenEncoders(ModelsConfig(model_dir=str(extracted[0]), device="cpu"))
    text = enc.encode_text(["a dog runs along the beach"])
    assert text["tokens"].shape == (1, 77, 32) and not enc.text_has_projection
    frames = np.random.default_rng(0).integers(0, 256, (2, 40, 64, 3), dtype=np.uint8)
    images = enc.encode_images(frames)
    assert images["tokens"].shape == (2, 17, 48) and images["pooled"].shape == (2, 32)
    mean, _ = enc.encode_frames(frames[:, :32])
    assert mean.shape == (2, 4, 4, 8)


# ---- VideoCrafter's preprocessing ----------------------------------------------------------------------
def test_kornia_resize_fixed_facts():
    assert antialias_kernel(596, 224) == (3, pytest.approx((596 / 224 - 1) / 2))  # sigma 0.8304, 4 sigma -> 3
    assert antialias_kernel(1080, 224)[0] == 7  # sigma 1.911: int(7.64) = 7, odd
    assert antialias_kernel(960, 224)[0] == 7  # sigma 1.643: int(6.57) = 6 -> 7
    x = torch.rand(2, 3, 224, 224) * 2 - 1
    assert torch.equal(kornia_resize(x, (224, 224)), x)  # same size: untouched
    # A hand-computed case: 1x1x1x3 -> 1x1. Width factor 3: sigma 1, 4 sigma = 4 -> kernel 5 (odd).
    assert antialias_kernel(3, 1) == (5, 1.0)
    row = torch.tensor([[[[0.0, 1.0, 0.0]]]])
    # reflect pad 2 -> [0, 1, 0, 1, 0, 1, 0]; one output with align_corners samples x=0, the blurred
    # first pixel: taps at offsets -1 and +1 hit the ones -> 2 exp(-1/2) / (1 + 2 exp(-1/2) + 2 exp(-2)).
    e1, e4 = np.exp(-0.5), np.exp(-2.0)
    assert kornia_resize(row, (1, 1)).item() == pytest.approx(2 * e1 / (1 + 2 * e1 + 2 * e4), abs=1e-7)
    up = kornia_resize(torch.tensor([[[[0.0, 1.0]]]]), (1, 3))  # upscaling: no blur, align_corners ends
    torch.testing.assert_close(up, torch.tensor([[[[0.0, 0.5, 1.0]]]]))


def test_videocrafter_preprocess_is_kornia_resize_then_clip_normalize():
    x = torch.rand(2, 3, 298, 400, generator=torch.Generator().manual_seed(3)) * 2 - 1
    got = videocrafter_preprocess(x, 224, CLIP_MEAN, CLIP_STD)
    assert got.shape == (2, 3, 224, 224)
    grey = videocrafter_preprocess(torch.zeros(1, 3, 224, 224), 224, CLIP_MEAN, CLIP_STD)
    expected = (0.5 - torch.tensor(CLIP_MEAN)) / torch.tensor(CLIP_STD)
    torch.testing.assert_close(grey[0, :, 0, 0], expected)
    kornia = pytest.importorskip("kornia")
    ref = kornia.geometry.resize(x, (224, 224), interpolation="bicubic", align_corners=True, antialias=True)
    ref = kornia.enhance.normalize((ref + 1.0) / 2.0, torch.tensor(CLIP_MEAN), torch.tensor(CLIP_STD))
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)
    for shape in [(1, 3, 596, 224), (1, 3, 100, 700), (1, 3, 50, 60)]:  # mixed down/up, both axes
        x = torch.rand(shape) * 2 - 1
        ref = kornia.geometry.resize(
            x, (224, 224), interpolation="bicubic", align_corners=True, antialias=True
        )
        torch.testing.assert_close(kornia_resize(x, (224, 224)), ref, atol=1e-5, rtol=0)


def test_null_image_tokens(tiny):
    enc = FrozenEncoders(ModelsConfig(model_dir=str(tiny), device="cpu"))
    null = enc.null_image_tokens()
    assert null.shape == (1, 17, 48) and null.dtype == np.float16
    np.testing.assert_array_equal(null, enc.null_image_tokens())
    x = videocrafter_preprocess(torch.zeros(1, 3, 32, 32), 32, CLIP_MEAN, CLIP_STD)
    with torch.no_grad():
        ref = enc.image_encoder(pixel_values=x).last_hidden_state.half().numpy()
    np.testing.assert_array_equal(null, ref)


def test_image_preprocess_option(tiny):
    with pytest.raises(ValueError, match="image_preprocess"):
        ModelsConfig(model_dir="m", image_preprocess="squash")
    image = np.zeros((1, 40, 80, 3), dtype=np.uint8)
    image[:, :, 20:60] = 200
    clip = FrozenEncoders(ModelsConfig(model_dir=str(tiny), device="cpu", image_preprocess="clip"))
    vc = FrozenEncoders(ModelsConfig(model_dir=str(tiny), device="cpu"))
    c, v = clip.preprocess_images(image), vc.preprocess_images(image)
    assert c.shape == v.shape == (1, 3, 32, 32)
    assert c[0, 0, :, 4:-4].std() < 1e-3  # the center crop keeps only the bright half
    # videocrafter squashes the whole 80-wide image: the dark sides survive at the left/right edges
    assert v[0, 0, :, :4].mean() < -1.5 and v[0, 0, :, 12:20].mean() > 0.5
    x = torch.from_numpy(image).permute(0, 3, 1, 2).float() / 255
    torch.testing.assert_close(v, videocrafter_preprocess((x - 0.5) * 2, 32, CLIP_MEAN, CLIP_STD))
