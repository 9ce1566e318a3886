"""`latentcrafter generate` on CPU with the tiny models: reproducibility, conditioning, batching, FIFO-Diffusion, errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

SIZE = "64x64"


def _perturb(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Seeded random weights everywhere (the zero-initialised output layers too, so every input matters)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return module.eval()


def _save(module, path, meta) -> str:
    save_file({k: v.contiguous() for k, v in module.state_dict().items()}, str(path), metadata=meta)
    return str(path)


def _vc_export(path, preset: str) -> str:
    from trainer.model import VideoCrafterModel, get_preset
    from trainer.model.pretrained import model_metadata

    p = get_preset(preset)
    torch.manual_seed(0)
    model = _perturb(VideoCrafterModel(p.unet, p.image_proj, preset=preset), 1)
    return _save(model, path, model_metadata(model, p.diffusion, source="test", phase="test"))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from encoders.models import write_tiny_models
    from trainer.model import build_unet
    from trainer.model.loading import unet_metadata
    from trainer.model.presets import DIFFUSION_DEFAULTS

    root = tmp_path_factory.mktemp("generate")
    write_tiny_models(str(root / "models"), seed=0)
    torch.manual_seed(0)
    unet = _perturb(build_unet("tiny"), 2)
    diffusion = {**DIFFUSION_DEFAULTS, "linear_start": 0.00085, "linear_end": 0.012}
    return {
        "root": root,
        "models": str(root / "models"),
        "vc2": _vc_export(root / "vc2.safetensors", "vc2-t2v-tiny"),
        "i2v": _vc_export(root / "i2v.safetensors", "vc1-i2v-tiny"),
        "tiny": _save(
            unet, root / "tiny.safetensors", unet_metadata(unet, preset="tiny", diffusion=diffusion)
        ),
    }


def _run(setup, out, **kw):
    from trainer.generate import GenerateConfig, generate

    args = {
        "weights": setup["vc2"],
        "model_dir": setup["models"],
        "out": str(setup["root"] / out),
        "prompts": ["a dog runs on the beach"],
        "frames": 4,
        "size": SIZE,
        "steps": 2,
        "cfg": 3.0,
        "device": "cpu",
        "progress": False,
        **kw,
    }
    return generate(GenerateConfig(**args))


def test_same_seed_same_video_and_outputs(setup) -> None:
    a = _run(setup, "a", gif=True)
    b = _run(setup, "b", gif=True)
    assert np.array_equal(a.frames[0], b.frames[0]) and a.frames[0].shape == (4, 64, 64, 3)
    c = _run(setup, "c", seed=7)
    assert not np.array_equal(a.frames[0], c.frames[0])
    out = setup["root"] / "a"
    report = json.loads((out / "generate.json").read_text())
    sample = report["samples"][0]
    assert (out / sample["mp4"]).is_file() and (out / sample["gif"]).is_file()
    assert report["model"]["preset"] == "vc2-t2v-tiny" and report["settings"]["cfg"] == 3.0
    assert report["peak_memory"]["cpu_max_rss_mb"] > 0 and report["timings"]["total_s"] > 0
    page = (out / "index.html").read_text()
    assert f'<video src="{sample["mp4"]}"' in page and str(setup["root"]) not in page.split("<h2>")[0]


def test_prompts_differ_and_batch_equals_alone(setup) -> None:
    prompts = ["a dog runs on the beach", "a red car in the snow"]
    both = _run(setup, "both", prompts=prompts, batch_size=2)
    assert not np.array_equal(both.frames[0], both.frames[1])
    alone = _run(setup, "alone", prompts=prompts[1:], first_index=1)
    assert both.report["samples"][1]["seed"] == alone.report["samples"][0]["seed"]
    diff = np.abs(both.frames[1].astype(int) - alone.frames[0].astype(int))
    assert diff.max() <= 1  # float reduction order of a batch of 2 vs 1 may move a pixel by one step


def test_latentcrafter_tiny_export_and_i2v(setup, tmp_path) -> None:
    from PIL import Image

    tiny = _run(setup, "tiny", weights=setup["tiny"])
    assert tiny.report["model"]["family"] == "latentcrafter" and tiny.frames[0].shape == (4, 64, 64, 3)
    rng = np.random.default_rng(0)
    for name in ("red", "noise"):
        arr = (
            np.zeros((48, 48, 3), np.uint8) if name == "red" else rng.integers(0, 255, (48, 48, 3), np.uint8)
        )
        arr[..., 0] = 255 if name == "red" else arr[..., 0]
        Image.fromarray(arr).save(tmp_path / f"{name}.png")
    red = _run(setup, "i2v-red", weights=setup["i2v"], image=str(tmp_path / "red.png"))
    noise = _run(setup, "i2v-noise", weights=setup["i2v"], image=str(tmp_path / "noise.png"))
    assert not np.array_equal(red.frames[0], noise.frames[0])


@pytest.mark.parametrize("family", ["vc2", "tiny"])
def test_per_frame_timesteps_equal_entries_match(setup, family) -> None:
    from trainer.model.loading import load_model

    model = load_model(setup[family]).module
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 3, 8, 8, generator=g)
    ctx = torch.randn(2, 77, 32, generator=g)
    t = torch.tensor([10, 700])
    fps = torch.tensor([8.0, 8.0])
    with torch.no_grad():
        ref = model(x, t, ctx, fps)
        again = model(x, t, ctx, fps)
        per = model(x, t[:, None].expand(2, 3), ctx, fps)
        mixed = model(x, torch.tensor([[10, 10, 500], [700, 700, 700]]), ctx, fps)
    assert torch.equal(ref, again)
    torch.testing.assert_close(per, ref, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(mixed[0], ref[0], atol=1e-4)
    torch.testing.assert_close(mixed[1], ref[1], rtol=1e-5, atol=1e-5)


def test_fifo_48_frames_on_a_16_frame_model(setup) -> None:
    from trainer.diffusion import DDIMSampler
    from trainer.generate.fifo import fifo_sample
    from trainer.model.loading import load_model

    res = _run(setup, "fifo", frames=48, size="32x32", steps=None, cfg=1.0)
    assert res.frames[0].shape == (48, 32, 32, 3)
    ts = DDIMSampler(load_model(setup["vc2"]).build_diffusion(), 16).timesteps.flip(0).tolist()
    assert res.report["fifo"]["timesteps"] == ts and len(res.fifo_timesteps) == 48
    assert all(
        row == ts for row in res.fifo_timesteps
    )  # frame j of the queue always at the j-th DDIM timestep

    seen = []  # what the U-Net is fed: [B, 16] per-frame timesteps, strictly increasing head to tail

    def model(x, t, ctx, fps=None, image_context=None):
        seen.append(t.clone())
        return torch.zeros_like(x)

    sampler = DDIMSampler(load_model(setup["vc2"]).build_diffusion(), 16, eta=0.0)
    gens = [torch.Generator().manual_seed(0)]
    out = fifo_sample(
        model, sampler, torch.zeros(1, 4, 16, 2, 2), 20, {"context": torch.zeros(1, 77, 32)}, {}, 1.0, gens
    )
    assert out.shape == (1, 4, 20, 2, 2) and len(seen) == 20
    assert all(s.shape == (1, 16) and s[0].tolist() == ts and bool((s[0].diff() > 0).all()) for s in seen)


def test_bad_input_errors(setup, tmp_path, capsys) -> None:
    from trainer.generate.cli import main

    base = ["--model-dir", setup["models"], "--out", str(tmp_path / "o"), "--size", SIZE, "--quiet"]
    assert main(["--weights", str(tmp_path / "missing.safetensors"), "--prompt", "x", *base]) == 2
    assert "missing.safetensors: no such file" in capsys.readouterr().err
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat\n\na dog\n")
    assert main(["--weights", setup["vc2"], "--prompts", str(prompts), *base]) == 2
    assert "line 2 is blank" in capsys.readouterr().err
    bad = tmp_path / "image.png"
    bad.write_text("not an image")
    assert main(["--weights", setup["i2v"], "--prompt", "x", "--image", str(bad), *base]) == 2
    assert "not an image" in capsys.readouterr().err
    assert main(["--weights", setup["vc2"], "--prompt", "x", "--frames", "0", *base]) == 2
    assert "--frames 0: must be >= 1" in capsys.readouterr().err
    assert main(["--weights", setup["vc2"], "--prompt", "x", "--size", "60x64", *base[:-3], "--quiet"]) == 2
    assert "multiples of" in capsys.readouterr().err


def test_videocrafter_ckpt_is_converted_in_memory(setup, tmp_path) -> None:
    from trainer.model.loading import load_model

    ours = load_model(setup["vc2"]).module.state_dict()
    state = {"model.diffusion_model." + k.removeprefix("unet."): v for k, v in ours.items()}
    torch.save({"state_dict": state}, tmp_path / "model.ckpt")
    loaded = load_model(tmp_path / "model.ckpt")
    assert (loaded.preset, loaded.kind, loaded.fps) == ("vc2-t2v-tiny", "VideoCrafter checkpoint", 28.0)
    assert all(torch.equal(v, loaded.module.state_dict()[k]) for k, v in ours.items())
