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
    TEXT_PREFIX,
    VAE_PREFIX,
    VISION_PREFIX,
    antialias_kernel,
    extract_encoders,
    kornia_resize,
    videocrafter_preprocess,
)
from encoders.videocrafter_layout import (
    EMBEDDER_TEXT_LEFTOVERS,
    ldm_vae_state,
    openclip_text_state,
    openclip_visual_state,
    videocrafter_frozen_parts,
    videocrafter_frozen_state,
)

HEADS = 2  # the tiny towers' heads (not visible in the weights)


# ---- VideoCrafter-layout state dicts of the tiny models (encoders.videocrafter_layout) --------------------
def _ldm_vae(vae) -> dict[str, torch.Tensor]:
    sd = {k: v.clone() for k, v in vae.state_dict().items()}
    return {VAE_PREFIX + k: v for k, v in ldm_vae_state(sd, len(vae.config.block_out_channels)).items()}


def _openclip_text(model, extra_block_seed: int = 7) -> dict[str, torch.Tensor]:
    """cond_stage_model.model.* with ONE EXTRA last resblock, random here (the library writes zeros), so the
    tests see that extraction drops it whatever it holds."""
    text, _ = openclip_text_state(model)
    n = model.config.num_hidden_layers
    g = torch.Generator().manual_seed(extra_block_seed)
    for key in [k for k in text if k.startswith(f"transformer.resblocks.{n}.")]:
        text[key] = torch.randn(text[key].shape, generator=g)
    text["logit_scale"] = torch.tensor(4.6052)
    return {TEXT_PREFIX + k: v.clone() for k, v in text.items()}


def _openclip_visual(model) -> dict[str, torch.Tensor]:
    return {VISION_PREFIX + k: v.clone() for k, v in openclip_visual_state(model).items()}


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
    state = _ldm_vae(vae)
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


# ---- a model folder -> VideoCrafter's frozen tensors (the inverse of extraction) ------------------------------
def test_frozen_state_round_trips_through_extraction(tiny, originals, tmp_path):
    from diffusers import AutoencoderKL
    from transformers import CLIPTextModel, CLIPVisionModelWithProjection

    state, zeros = videocrafter_frozen_parts(tiny, image=True)
    assert state.keys() == videocrafter_frozen_state(tiny, image=True).keys()
    vae, text, vision = originals
    n = text.config.num_hidden_layers
    last = f"{TEXT_PREFIX}transformer.resblocks.{n}."
    assert {k for k in zeros if k.startswith(last)} == {k for k in state if k.startswith(last)}
    assert len([k for k in state if k.startswith(last)]) == 12
    assert all(not state[k].any() for k in zeros)
    assert set(zeros) - {k for k in zeros if k.startswith(last)} == {
        TEXT_PREFIX + "logit_scale",
        "embedder.model.logit_scale",
    }  # the tiny text encoder has a projection: it is copied, not zeros
    torch.testing.assert_close(state[TEXT_PREFIX + "text_projection"], text.text_projection.weight.T)
    for k in ("token_embedding.weight", "positional_embedding", "ln_final.bias", "text_projection"):
        assert torch.equal(state["embedder.model." + k], state[TEXT_PREFIX + k])
    assert state[TEXT_PREFIX + "logit_scale"].shape == ()

    summary = extract_encoders(
        state,
        tmp_path,
        tokenizer_dir=str(tiny / "tokenizer"),
        text_heads=HEADS,
        vision_heads=HEADS,
        vae_norm_groups=8,
    )
    assert summary["other_keys"] == len(EMBEDDER_TEXT_LEFTOVERS)  # embedder.model's text leftovers
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(4)) * 2 - 1
    ids = torch.randint(0, text.config.vocab_size, (2, 77), generator=torch.Generator().manual_seed(5))
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(6))
    back_vae = AutoencoderKL.from_pretrained(str(tmp_path / "vae")).eval()
    back_text = CLIPTextModel.from_pretrained(str(tmp_path / "text_encoder")).eval()
    back_vision = CLIPVisionModelWithProjection.from_pretrained(str(tmp_path / "image_encoder")).eval()
    with torch.no_grad():
        z = vae.encode(x).latent_dist.mean
        assert torch.equal(back_vae.encode(x).latent_dist.mean, z)
        assert torch.equal(back_vae.decode(z).sample, vae.decode(z).sample)
        got = back_text(input_ids=ids).last_hidden_state
        assert torch.equal(got, text(input_ids=ids).last_hidden_state)
        torch.testing.assert_close(got, _openclip_text_penultimate(state, ids, HEADS), atol=1e-5, rtol=1e-5)
        a, b = back_vision(pixel_values=pixels), vision(pixel_values=pixels)
        assert torch.equal(a.last_hidden_state, b.last_hidden_state) and torch.equal(
            a.image_embeds, b.image_embeds
        )


def test_frozen_state_from_an_sd21_like_text_encoder(tiny, originals, tmp_path):
    """SD 2.1's text_encoder is a CLIPTextModel (no projection): text_projection [width, width] is zeros."""
    import shutil

    from transformers import CLIPTextModel

    folder = tmp_path / "sd21"
    shutil.copytree(tiny / "vae", folder / "vae")
    plain = CLIPTextModel(originals[1].config)
    plain.load_state_dict(
        {k: v for k, v in originals[1].state_dict().items() if k != "text_projection.weight"}, strict=False
    )
    plain.config.architectures = ["CLIPTextModel"]
    plain.save_pretrained(str(folder / "text_encoder"))
    state, zeros = videocrafter_frozen_parts(folder, image=False)
    assert not any(k.startswith(("embedder.", VISION_PREFIX)) for k in state)
    proj = state[TEXT_PREFIX + "text_projection"]
    assert proj.shape == (32, 32) and not proj.any() and TEXT_PREFIX + "text_projection" in zeros
    # the folder's last block as VideoCrafter's unused one: no zero block, one layer fewer extracted
    full, zeros = videocrafter_frozen_parts(folder, image=False, text_layers=2)
    assert (
        not any("resblocks" in k for k in zeros)
        and f"{TEXT_PREFIX}transformer.resblocks.2.ln_1.weight" not in full
    )
    with pytest.raises(ValueError, match="text_layers=5"):
        videocrafter_frozen_state(folder, image=False, text_layers=5)
    with pytest.raises(FileNotFoundError, match="image_encoder"):
        videocrafter_frozen_state(folder, image=True)
