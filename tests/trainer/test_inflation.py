"""SD 2.1 inflation: a tiny UNet2DConditionModel on disk loads into the spatial layers; per-frame output matches."""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import UNet2DConditionModel

from trainer.model import (
    build_unet,
    load_sd_unet_into,
    tiny_unet2d_config,
    unet2d_config_for,
    write_tiny_unet2d,
)


@pytest.fixture(scope="module")
def unet2d_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("sd") / "unet"
    write_tiny_unet2d(str(path), context_dim=32, seed=3)
    return path


def _per_frame_2d(unet2d, x, ts, ctx):
    b, c, t, h, w = x.shape
    frames = x.permute(0, 2, 1, 3, 4).reshape(b * t, c, h, w)
    out = unet2d(frames, ts.repeat_interleave(t), ctx.repeat_interleave(t, 0)).sample
    return out.view(b, t, c, h, w).permute(0, 2, 1, 3, 4)


@pytest.mark.parametrize("image", [False, True], ids=["t2v", "i2v"])
@pytest.mark.parametrize("frames", [4, 1])
def test_inflated_model_reproduces_2d_per_frame(unet2d_dir, frames, image):
    torch.manual_seed(0)
    model = build_unet("tiny", image_cross_attention=image, image_token_dim=48).eval()
    report = load_sd_unet_into(model, str(unet2d_dir))
    unet2d = UNet2DConditionModel.from_pretrained(str(unet2d_dir)).eval()
    n2d = len(unet2d.state_dict())
    assert report["loaded"] == n2d
    assert report["missing_temporal"] > 0
    assert (report["missing_image"] > 0) == image
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, frames, 8, 8, generator=g)
    ts = torch.tensor([20, 700])
    ctx = torch.randn(2, 77, 32, generator=g)
    img = torch.randn(2, 257, 48, generator=g) if image else None
    with torch.no_grad():
        video = model(x, ts, ctx, torch.tensor([8.0, 24.0]), image_context=img)
        ref = _per_frame_2d(unet2d, x, ts, ctx)
    assert ref.abs().max() > 0.1  # a real, non-trivial output
    torch.testing.assert_close(video, ref, atol=1e-4, rtol=1e-4)


def test_inflation_copies_spatial_weights_and_image_kv(unet2d_dir):
    model = build_unet("tiny", image_cross_attention=True, image_token_dim=48)
    before = model.state_dict()["down_blocks.0.resnets.0.conv1.weight"].clone()
    load_sd_unet_into(model, str(unet2d_dir))
    sd = UNet2DConditionModel.from_pretrained(str(unet2d_dir)).state_dict()
    after = model.state_dict()
    assert not torch.equal(before, after["down_blocks.0.resnets.0.conv1.weight"])
    for key, value in sd.items():
        assert torch.equal(after[key], value), key
    attn = model.down_blocks[0].attentions[0].transformer_blocks[0].attn2
    assert torch.equal(attn.processor.to_k_ip.weight, attn.to_k.weight)
    assert attn.processor.gate.item() == 0.0


def test_mismatched_folder_raises_naming_it(tmp_path, unet2d_dir):
    bad = tmp_path / "other_unet"
    write_tiny_unet2d(str(bad), context_dim=16, seed=0)  # text width differs from the tiny 3D config's 32
    model = build_unet("tiny")
    with pytest.raises(ValueError, match="other_unet.*cross_attention_dim"):
        load_sd_unet_into(model, str(bad))
    with pytest.raises(FileNotFoundError, match="empty_dir"):
        (tmp_path / "empty_dir").mkdir()
        load_sd_unet_into(model, str(tmp_path / "empty_dir"))
    # right config, wrong weights: a tensor of the wrong shape is named
    from safetensors.torch import load_file, save_file

    broken = tmp_path / "broken_unet"
    broken.mkdir()
    (broken / "config.json").write_text((unet2d_dir / "config.json").read_text())
    state = load_file(str(unet2d_dir / "diffusion_pytorch_model.safetensors"))
    state["conv_in.weight"] = torch.zeros(1)
    save_file(state, str(broken / "diffusion_pytorch_model.safetensors"))
    with pytest.raises(ValueError, match="broken_unet.*conv_in.weight"):
        load_sd_unet_into(model, str(broken))


def test_tiny_2d_config_is_sd21_like(unet2d_dir):
    cfg = json.loads((unet2d_dir / "config.json").read_text())
    assert cfg["use_linear_projection"] is True
    assert cfg["cross_attention_dim"] == 32 and cfg["in_channels"] == 4
    assert tiny_unet2d_config(32)["block_out_channels"] == (32, 64, 64)
    from encoders.tiny import tiny_unet2d_config as folder_config  # what `tiny-models` writes as unet/

    assert tiny_unet2d_config(32) == folder_config(32)


def test_vc512_matches_sd21_state_dict_on_meta():
    """The vc-512 spatial layers have exactly SD 2.1's keys and shapes (checked without any weights)."""
    sd21 = unet2d_config_for("vc-512")
    assert sd21["attention_head_dim"] == (5, 10, 20, 20)  # SD 2.1's config.json values
    assert sd21["down_block_types"] == ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
    with torch.device("meta"):
        unet2d = UNet2DConditionModel(**sd21)
        model = build_unet("vc-512")
    a, b = unet2d.state_dict(), model.state_dict()
    assert set(a) <= set(b)
    assert all(a[k].shape == b[k].shape for k in a)
