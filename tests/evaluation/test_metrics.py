"""Metric values against closed forms and direct computations: Frechet distance, CLIPSIM, CLIP-Temp, motion, FVD."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from tests.evaluation.conftest import moving_square


def test_frechet_distance_diagonal_closed_form():
    from evaluation.fvd import frechet_distance

    rng = np.random.default_rng(0)
    mu1, mu2 = rng.normal(size=6), rng.normal(size=6)
    s1, s2 = rng.uniform(0.1, 3, 6), rng.uniform(0.1, 3, 6)
    expected = ((mu1 - mu2) ** 2).sum() + (s1 + s2 - 2 * np.sqrt(s1 * s2)).sum()
    assert frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2)) == pytest.approx(expected, rel=1e-10)


def test_frechet_distance_full_covariances():
    """Covariances sharing eigenvectors (full matrices): the same closed form in the rotated basis;
    general pairs: symmetric and zero for identical Gaussians."""
    from evaluation.fvd import frechet_distance

    rng = np.random.default_rng(1)
    q, _ = np.linalg.qr(rng.normal(size=(5, 5)))
    d1, d2 = rng.uniform(0.1, 2, 5), rng.uniform(0.1, 2, 5)
    mu1, mu2 = rng.normal(size=5), rng.normal(size=5)
    expected = ((mu1 - mu2) ** 2).sum() + (d1 + d2 - 2 * np.sqrt(d1 * d2)).sum()
    got = frechet_distance(mu1, q @ np.diag(d1) @ q.T, mu2, q @ np.diag(d2) @ q.T)
    assert got == pytest.approx(expected, rel=1e-9)
    a, b = rng.normal(size=(5, 5)), rng.normal(size=(5, 5))
    s1, s2 = a @ a.T, b @ b.T
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(frechet_distance(mu2, s2, mu1, s1), rel=1e-9)
    assert abs(frechet_distance(mu1, s1, mu1, s1)) < 1e-8
    rank1 = np.outer(a[0], a[0])  # rank-deficient (few samples): still finite and >= 0
    assert frechet_distance(mu1, rank1, mu2, s2) >= 0


def test_clipsim_and_clip_temp_equal_a_direct_computation(tiny_clip):
    """Our CLIP path against FrozenEncoders (image_preprocess: clip) + a hand-written cosine."""
    from encoders.models import FrozenEncoders, ModelsConfig
    from evaluation.clip import ClipEmbedder, clip_temp, clipsim

    frames = moving_square(num_frames=5, size=64, square=24)
    prompt = "a dog runs along the beach at sunset"
    ours = ClipEmbedder(tiny_clip)
    images = ours.embed_images(frames)
    text = ours.embed_texts([prompt])[0]
    enc = FrozenEncoders(ModelsConfig(model_dir=str(tiny_clip), image_preprocess="clip", device="cpu"))
    img = enc.encode_images(frames)["pooled"].astype(np.float64)
    txt = enc.encode_text([prompt])["pooled"][0].astype(np.float64)
    img /= np.linalg.norm(img, axis=-1, keepdims=True)
    txt /= np.linalg.norm(txt)
    assert clipsim(images, text) == pytest.approx(float((img @ txt).mean()), abs=2e-3)  # fp16 reference
    assert clip_temp(images) == pytest.approx(float((img[1:] * img[:-1]).sum(-1).mean()), abs=2e-3)
    assert clip_temp(images[:1]) is None


def test_motion_of_a_moving_square():
    from evaluation.motion import FlowEstimator, magnitude, motion_metrics

    frames = moving_square(num_frames=5, speed=3)
    flows = FlowEstimator().forward_flows(frames)
    for t, flow in enumerate(flows):
        mag = magnitude(flow)
        x = 16 + 3 * t
        inside = mag[40 + 12 : 40 + 36, x + 12 : x + 36]
        assert inside.mean() == pytest.approx(3.0, abs=0.3)
        assert np.median(flow[40 + 12 : 40 + 36, x + 12 : x + 36, 0]) == pytest.approx(3.0, abs=0.3)
        assert mag[:30].mean() < 0.05 and mag[100:].mean() < 0.05  # the static background
    result = motion_metrics(frames)
    assert result["static_ratio"] == 0.0 and 0 < result["motion"] < 3
    assert result["warp_error"] < 0.02


def test_static_clip_and_flicker():
    from evaluation.motion import motion_metrics

    frames = moving_square(num_frames=4)
    static = np.repeat(frames[:1], 5, axis=0)
    result = motion_metrics(static)
    assert result["static_ratio"] == 1.0 and result["motion"] == pytest.approx(0.0, abs=1e-3)
    assert result["warp_error"] == pytest.approx(0.0, abs=1e-6)
    flicker = static.astype(np.int16)
    flicker[1::2] = np.clip(flicker[1::2] + 40, 0, 255)
    flickery = motion_metrics(flicker.astype(np.uint8), static_threshold=1.0)
    assert flickery["warp_error"] > 0.05 > motion_metrics(frames)["warp_error"]
    assert motion_metrics(static[:1])["motion"] is None


def test_fvd_against_itself_is_zero_and_grows_with_noise(tiny_i3d):
    from evaluation.fvd import FVDProtocol, fvd_from_clips, load_i3d

    rng = np.random.default_rng(0)
    model = load_i3d(tiny_i3d)
    protocol = FVDProtocol(num_frames=8, size=32)
    clips = [moving_square(num_frames=8, size=64, square=24, seed=s, speed=1 + s % 3) for s in range(12)]
    assert fvd_from_clips(model, clips, clips, protocol)["fvd"] == pytest.approx(0.0, abs=1e-6)
    values = []
    for sigma in (5, 20, 60):
        noisy = [np.clip(c + rng.normal(0, sigma, c.shape), 0, 255).astype(np.uint8) for c in clips]
        values.append(fvd_from_clips(model, clips, noisy, protocol)["fvd"])
    assert 0 < values[0] < values[1] < values[2]
    result = fvd_from_clips(model, clips, clips, FVDProtocol(num_frames=4, stride=2, size=32, max_samples=6))
    assert result["num_real"] == result["num_gen"] == 6
    assert result["protocol"] == {
        "num_frames": 4,
        "stride": 2,
        "size": 32,
        "max_samples": 6,
        "detector": "i3d",
    }


def test_fvd_protocol_validation_and_short_videos():
    from evaluation.fvd import FVDProtocol, take_clip

    with pytest.raises(ValueError, match="--fvd-frames"):
        FVDProtocol(num_frames=1)
    frames = np.zeros((10, 8, 8, 3), np.uint8)
    assert take_clip(frames, FVDProtocol(num_frames=4, stride=3)).shape[0] == 4
    assert take_clip(frames, FVDProtocol(num_frames=4, stride=4)) is None


def test_aesthetic_linear_head(tiny_clip, tmp_path):
    from safetensors.torch import save_file

    from evaluation.aesthetic import AestheticScorer, load_linear_head
    from evaluation.clip import ClipEmbedder

    weight, bias = torch.randn(1, 32), torch.randn(1)
    save_file({"weight": weight, "bias": bias}, str(tmp_path / "head.safetensors"))
    torch.save({"weight": weight, "bias": bias}, tmp_path / "head.pth")
    frames = moving_square(num_frames=3, size=64, square=24)
    emb = ClipEmbedder(tiny_clip / "image_encoder", image_only=True).embed_images(frames)
    expected = float((emb @ weight[0] + bias).mean())
    for head in ("head.safetensors", "head.pth"):
        assert AestheticScorer(tmp_path / head, tiny_clip / "image_encoder").score(frames) == pytest.approx(
            expected, abs=1e-5
        )
    torch.save(
        {"layers.0.weight": weight, "layers.0.bias": bias, "layers.2.weight": weight}, tmp_path / "mlp.pth"
    )
    with pytest.raises(ValueError, match="only the linear LAION head"):
        load_linear_head(tmp_path / "mlp.pth")
    with pytest.raises(FileNotFoundError, match="--aesthetic"):
        load_linear_head(tmp_path / "missing.pth")


def test_clip_model_folder_matches_clipmodel_forward(tiny_clip, tmp_path):
    """A CLIPModel folder (the ViT-B/32 layout): our embeddings equal CLIPModel's own text/image embeds."""
    import shutil

    from transformers import CLIPConfig, CLIPModel

    from evaluation.clip import ClipEmbedder

    text = json.loads((tiny_clip / "text_encoder/config.json").read_text())
    vision = json.loads((tiny_clip / "image_encoder/config.json").read_text())
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=32)).eval()
    model.save_pretrained(str(tmp_path / "clip"))
    for name in (tiny_clip / "tokenizer").iterdir():
        shutil.copy(name, tmp_path / "clip" / name.name)
    shutil.copy(tiny_clip / "image_encoder/preprocessor_config.json", tmp_path / "clip")
    ours = ClipEmbedder(tmp_path / "clip")
    frames = moving_square(num_frames=2, size=64, square=24)
    ids = ours.tokenizer(["a cat"], padding="max_length", max_length=77, truncation=True, return_tensors="pt")
    with torch.no_grad():
        out = model(input_ids=ids["input_ids"], pixel_values=ours.preprocess(frames))
    torch.testing.assert_close(ours.embed_images(frames), out.image_embeds, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(ours.embed_texts(["a cat"]), out.text_embeds, atol=1e-5, rtol=1e-4)
