"""Diffusion: schedule, q_sample/targets, CFG dropout, single-batch overfit, DDIM sampling and mp4/GIF previews."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL

from encoders.tiny import TINY_VAE_CONFIG
from trainer.diffusion import DDIMSampler, Diffusion, decode_to_frames, write_gif, write_mp4
from trainer.model import build_unet


def _cond(b=2, seed=0, image=False):
    g = torch.Generator().manual_seed(seed)
    cond = {
        "context": torch.randn(b, 77, 32, generator=g),
        "fps": torch.full((b,), 8.0),
        "uncond_context": torch.zeros(77, 32),
    }
    if image:
        cond["image_context"] = torch.randn(b, 257, 48, generator=g)
    return cond


def test_linear_schedule_matches_videocrafter():
    d = Diffusion()
    betas = 1 - d.alphas_cumprod / torch.cat([torch.ones(1, dtype=torch.float64), d.alphas_cumprod[:-1]])
    assert betas[0].item() == pytest.approx(0.00085, rel=1e-6)
    assert betas[-1].item() == pytest.approx(0.012, rel=1e-6)
    # linspace of sqrt, squared (not linspace of beta): the midpoint is below the arithmetic mean
    mid = ((0.00085**0.5 + 0.012**0.5) / 2) ** 2
    assert betas[499:501].mean().item() == pytest.approx(mid, rel=1e-3)
    assert d.alphas_cumprod[-1].item() == pytest.approx(0.00466, abs=2e-5)


def test_zero_snr_and_validation():
    d = Diffusion(prediction="v", zero_snr=True)
    assert d.alphas_cumprod[-1].item() == 0.0
    assert d.alphas_cumprod[0].item() == pytest.approx(Diffusion().alphas_cumprod[0].item())
    with pytest.raises(ValueError, match="zero_snr"):
        Diffusion(prediction="eps", zero_snr=True)
    with pytest.raises(ValueError, match="prediction"):
        Diffusion(prediction="x0")


@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_q_sample_and_predictions_invert(prediction):
    d = Diffusion(prediction=prediction)
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(3, 4, 2, 8, 8, generator=g), torch.randn(3, 4, 2, 8, 8, generator=g)
    t = torch.tensor([0, 500, 999])
    xt = d.q_sample(x0, t, noise)
    ab = d.alphas_cumprod[t].float().view(3, 1, 1, 1, 1)
    torch.testing.assert_close(xt, ab.sqrt() * x0 + (1 - ab).sqrt() * noise)
    eps, x0_hat = d.predict_eps_x0(d.target(x0, t, noise), xt, t)
    torch.testing.assert_close(eps, noise, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(x0_hat, x0, atol=2e-3, rtol=1e-3)


class _Recorder(torch.nn.Module):
    """A stand-in denoiser that records what conditioning it was given (outputs zeros)."""

    def forward(self, x, t, context, fps, image_context=None):
        self.context, self.image_context = context, image_context
        return torch.zeros_like(x)


def test_cfg_dropout_replaces_text_and_image_reproducibly():
    d, model, cond = Diffusion(), _Recorder(), _cond(b=64, image=True)
    x0 = torch.randn(64, 4, 1, 8, 8)
    _, stats = d.training_loss(
        model, x0, cond, generator=torch.Generator().manual_seed(5), cfg_dropout=0.5, image_cfg_dropout=0.5
    )
    text_dropped = (model.context == 0).all(dim=(1, 2))
    image_dropped = (model.image_context == 0).all(dim=(1, 2))
    assert 10 < int(text_dropped.sum()) < 54 and 10 < int(image_dropped.sum()) < 54
    assert stats["text_dropped"] == pytest.approx(text_dropped.float().mean().item())
    kept = ~text_dropped
    torch.testing.assert_close(model.context[kept], cond["context"][kept])
    first = model.context.clone()
    d.training_loss(
        model, x0, cond, generator=torch.Generator().manual_seed(5), cfg_dropout=0.5, image_cfg_dropout=0.5
    )
    assert torch.equal(model.context, first)
    _, stats = d.training_loss(
        model, x0, cond, generator=torch.Generator().manual_seed(5), cfg_dropout=0.0, image_cfg_dropout=0.0
    )
    assert stats["text_dropped"] == 0.0 and torch.equal(model.context, cond["context"])


@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_tiny_model_overfits_one_batch(prediction):
    torch.manual_seed(0)
    model = build_unet("tiny")
    d = Diffusion(prediction=prediction, zero_snr=prediction == "v")
    x0 = torch.randn(2, 4, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    cond = _cond()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.0)
    losses = []
    for _ in range(60):
        loss, _ = d.training_loss(
            model, x0, cond, generator=torch.Generator().manual_seed(0), cfg_dropout=0.0
        )
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert min(losses[-5:]) < losses[0] / 10, losses[::10]


def _tiny_vae():
    torch.manual_seed(0)
    return AutoencoderKL(**TINY_VAE_CONFIG).eval()


@pytest.mark.parametrize("image", [False, True], ids=["t2v", "i2v"])
def test_ddim_sample_shape_finite_and_deterministic(image):
    torch.manual_seed(0)
    model = build_unet("tiny", image_cross_attention=image, image_token_dim=48).eval()
    cond = _cond(b=1, image=image)
    sampler = DDIMSampler(Diffusion(), steps=4)
    assert sampler.timesteps.tolist() == [751, 501, 251, 1]
    shape = (1, 4, 3, 8, 8)
    a = sampler.sample(
        model,
        shape,
        cond,
        {"context": cond["uncond_context"]},
        7.5,
        generator=torch.Generator().manual_seed(2),
    )
    b = sampler.sample(
        model,
        shape,
        cond,
        {"context": cond["uncond_context"]},
        7.5,
        generator=torch.Generator().manual_seed(2),
    )
    assert a.shape == shape and torch.isfinite(a).all()
    assert torch.equal(a, b)
    c = DDIMSampler(Diffusion(), steps=4, eta=1.0).sample(
        model,
        shape,
        cond,
        {"context": cond["uncond_context"]},
        1.0,
        generator=torch.Generator().manual_seed(2),
    )
    assert torch.isfinite(c).all() and not torch.equal(a, c)


def test_ddim_trailing_spacing_with_zero_snr():
    assert DDIMSampler(Diffusion(prediction="v", zero_snr=True), steps=4).timesteps.tolist() == [
        999,
        749,
        499,
        249,
    ]


def test_ddim_to_playable_mp4_and_gif(tmp_path):
    import decord
    from PIL import Image

    torch.manual_seed(0)
    model = build_unet("tiny").eval()
    cond = _cond(b=1)
    latents = DDIMSampler(Diffusion(), steps=3).sample(
        model,
        (1, 4, 5, 8, 8),
        cond,
        {"context": cond["uncond_context"]},
        7.5,
        generator=torch.Generator().manual_seed(0),
    )
    frames = decode_to_frames(_tiny_vae(), latents)
    assert frames.shape == (1, 5, 64, 64, 3) and frames.dtype == np.uint8
    write_mp4(frames[0], tmp_path / "preview.mp4", fps=8)
    write_gif(frames[0], tmp_path / "preview.gif", fps=8)
    reader = decord.VideoReader(str(tmp_path / "preview.mp4"))
    assert len(reader) == 5
    assert reader[0].shape == (64, 64, 3)
    assert reader.get_avg_fps() == pytest.approx(8.0)
    gif = Image.open(tmp_path / "preview.gif")
    assert gif.size == (64, 64) and gif.n_frames == 5
    with pytest.raises(ValueError, match="uint8"):
        write_mp4(frames[0].astype(np.float32), tmp_path / "bad.mp4", fps=8)


def test_mp4_odd_size_is_padded(tmp_path):
    import av

    frames = np.random.default_rng(0).integers(0, 255, (3, 33, 47, 3), dtype=np.uint8)
    write_mp4(frames, tmp_path / "odd.mp4", fps=12.5)
    # (decord 0.6 returns 4 channels for some widths, e.g. 48; PyAV reads the stream as written)
    with av.open(str(tmp_path / "odd.mp4")) as container:
        decoded = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
        rate = container.streams.video[0].average_rate
    assert len(decoded) == 3 and decoded[0].shape == (34, 48, 3)
    assert float(rate) == 12.5
