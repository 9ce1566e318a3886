"""VideoUNet: shapes (T=16 and T=1, T2V and I2V), gradients per group, parameter partition, options, configs."""

from __future__ import annotations

import pytest
import torch

from trainer.model import (
    TEMPORAL_MODULE_TYPES,
    UNET_CONFIGS,
    UNetConfig,
    build_unet,
    spatial_temporal_parameters,
)
from trainer.model.temporal import TemporalSelfAttention, TemporalTransformer

IMG_DIM = 48  # tiny CLIP image-token width for tests


def _inputs(b=2, t=16, hw=8, seed=0, image=False):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, 4, t, hw, hw, generator=g)
    ts = torch.randint(0, 1000, (b,), generator=g)
    ctx = torch.randn(b, 77, 32, generator=g)
    fps = torch.full((b,), 8.0)
    img = torch.randn(b, 257, IMG_DIM, generator=g) if image else None
    return x, ts, ctx, fps, img


def _perturb_zero_inits(model):
    """Give zero-initialised outputs (temporal proj_out, conv4, fps, image gate) values, as after training."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if torch.count_nonzero(p) == 0:
                p.copy_(0.05 * torch.randn(p.shape, generator=g))


@pytest.mark.parametrize("image", [False, True], ids=["t2v", "i2v"])
@pytest.mark.parametrize("frames", [16, 1])
def test_shapes(frames, image):
    torch.manual_seed(0)
    model = build_unet("tiny", image_cross_attention=image, image_token_dim=IMG_DIM).eval()
    x, ts, ctx, fps, img = _inputs(t=frames, image=image)
    with torch.no_grad():
        y = model(x, ts, ctx, fps, image_context=img)
    assert y.shape == x.shape
    assert torch.isfinite(y).all()


def test_parameter_groups_partition_by_type():
    model = build_unet("tiny", image_cross_attention=True, image_token_dim=IMG_DIM)
    spatial, temporal = spatial_temporal_parameters(model)
    ids_s, ids_t = {id(p) for p in spatial}, {id(p) for p in temporal}
    assert len(ids_s) == len(spatial) and len(ids_t) == len(temporal)
    assert not ids_s & ids_t
    assert ids_s | ids_t == {id(p) for p in model.parameters()}
    assert spatial and temporal
    # the rule is the module type: every temporal parameter sits in a temporal module, no spatial one does
    in_temporal = {
        id(p) for m in model.modules() if isinstance(m, TEMPORAL_MODULE_TYPES) for p in m.parameters()
    }
    assert ids_t == in_temporal
    # SD-named layers and the I2V projection are spatial
    named = dict(model.named_parameters())
    assert id(named["conv_in.weight"]) in ids_s
    assert id(named["image_proj.latents"]) in ids_s
    assert id(named["fps_embedding.embedding.linear_2.weight"]) in ids_t


def _grads(model, frames, image):
    model.zero_grad(set_to_none=True)
    x, ts, ctx, fps, img = _inputs(t=frames, image=image)
    model(x, ts, ctx, fps, image_context=img).square().mean().backward()
    spatial, temporal = spatial_temporal_parameters(model)

    def nonzero(ps):
        return sum(p.grad is not None and bool(torch.count_nonzero(p.grad)) for p in ps)

    return nonzero(spatial), nonzero(temporal), len(spatial), len(temporal)


@pytest.mark.parametrize("image", [False, True], ids=["t2v", "i2v"])
def test_gradients_video_reach_both_groups_image_only_spatial(image):
    torch.manual_seed(0)
    model = build_unet("tiny", image_cross_attention=image, image_token_dim=IMG_DIM)
    _perturb_zero_inits(model)  # so that gradients pass every zero-initialised output
    s, t, n_s, n_t = _grads(model, frames=4, image=image)
    assert t == n_t, "every temporal parameter gets a gradient from a video batch"
    assert s > 0.9 * n_s
    s, t, _, _ = _grads(model, frames=1, image=image)
    assert t == 0, "image batches (T=1) skip the temporal modules by design"
    assert s > 0.9 * n_s


def test_fresh_model_temporal_gradient_reaches_zero_init_outputs():
    torch.manual_seed(0)
    model = build_unet("tiny")
    model(*_inputs(t=4)[:4]).square().mean().backward()
    for m in model.modules():
        if isinstance(m, TemporalTransformer):
            assert torch.count_nonzero(m.proj_out.weight.grad) > 0


def test_fresh_model_is_framewise_identical_video_vs_images():
    """Temporal modules start as identity: a video equals its frames run as images (fps too is zero-init)."""
    torch.manual_seed(0)
    model = build_unet("tiny").eval()
    x, ts, ctx, fps, _ = _inputs(b=1, t=3)
    with torch.no_grad():
        video = model(x, ts, ctx, fps)
        frames = [model(x[:, :, i : i + 1], ts, ctx, fps) for i in range(3)]
    torch.testing.assert_close(video, torch.cat(frames, dim=2), atol=1e-5, rtol=1e-4)
    _perturb_zero_inits(model)
    with torch.no_grad():
        assert not torch.allclose(model(x, ts, ctx, fps), video, atol=1e-3)


def test_gradient_checkpointing_same_gradients():
    torch.manual_seed(0)
    model = build_unet("tiny")
    _perturb_zero_inits(model)
    x, ts, ctx, fps, _ = _inputs(b=1, t=4)
    model(x, ts, ctx, fps).square().mean().backward()
    ref = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    model.enable_gradient_checkpointing()
    model(x, ts, ctx, fps).square().mean().backward()
    for a, p in zip(ref, model.parameters()):
        torch.testing.assert_close(p.grad, a, atol=1e-5, rtol=1e-4)


def test_causal_temporal_attention_ignores_future_frames():
    torch.manual_seed(0)
    attn = TemporalSelfAttention(16, 2, 8, causal=True, relative_position=True, max_frames=8)
    with torch.no_grad():
        attn.rel_bias.normal_()
        x = torch.randn(3, 6, 16)
        y = attn(x)
        x2 = x.clone()
        x2[:, 4:] = torch.randn(3, 2, 16)
        y2 = attn(x2)
    torch.testing.assert_close(y[:, :4], y2[:, :4])
    assert not torch.allclose(y[:, 4:], y2[:, 4:])


def test_relative_position_changes_output_and_options_build():
    cfg = UNET_CONFIGS["tiny"].with_(
        use_relative_position=True, use_causal_attention=True, temporal_conv=False
    )
    model = build_unet(cfg).eval()
    assert not any(type(m).__name__ == "TemporalConv" for m in model.modules())
    x, ts, ctx, fps, _ = _inputs(b=1, t=4)
    with torch.no_grad():
        assert model(x, ts, ctx, fps).shape == x.shape


def test_vc512_sizes_on_meta_device():
    cfg = UNET_CONFIGS["vc-512"]
    assert (cfg.model_channels, cfg.channel_mult, cfg.num_res_blocks) == (320, (1, 2, 4, 4), 2)
    assert (cfg.attention_resolutions, cfg.num_head_channels, cfg.context_dim, cfg.temporal_length) == (
        (4, 2, 1),
        64,
        1024,
        16,
    )
    with torch.device("meta"):
        model = build_unet("vc-512")
    spatial, temporal = spatial_temporal_parameters(model)
    n_s, n_t = sum(p.numel() for p in spatial), sum(p.numel() for p in temporal)
    assert n_s == 865_910_724  # exactly SD 2.1's UNet2DConditionModel
    assert 4e8 < n_t < 7e8  # VideoCrafter2's U-Net is ~1.4B in all


def test_config_validation_names_the_option():
    with pytest.raises(ValueError, match="num_head_channels"):
        UNetConfig(model_channels=40, num_head_channels=64, norm_num_groups=8)
    with pytest.raises(ValueError, match="attention_resolutions"):
        UNetConfig(attention_resolutions=(3,))
    with pytest.raises(ValueError, match="unknown UNet config"):
        build_unet("huge")


def test_bad_latent_size_and_missing_fps_are_clear_errors():
    model = build_unet("tiny")
    x, ts, ctx, fps, _ = _inputs(b=1, t=2, hw=6)
    with pytest.raises(ValueError, match="divisible by 4"):
        model(x, ts, ctx, fps)
    x, ts, ctx, fps, _ = _inputs(b=1, t=2)
    with pytest.raises(ValueError, match="fps is required"):
        model(x, ts, ctx, None)
