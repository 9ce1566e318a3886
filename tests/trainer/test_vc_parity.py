"""Forward parity of VCUNet/VCResampler with VideoCrafter's own UNetModel/Resampler (fixtures from commit 11bcd76)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from trainer.model.videocrafter import VCResampler, VCUNet, VCUNetConfig

FIX = Path(__file__).resolve().parents[1] / "fixtures" / "videocrafter"
UNET = "model.diffusion_model."
IPM = "image_proj_model."
TOL = {"atol": 1e-4, "rtol": 1e-4}  # the fixture README's bound for forward outputs
FRAMES = [("x", "out"), ("x_1frame", "out_1frame"), ("x_18frame", "out_18frame")]


@pytest.fixture(scope="module")
def weights() -> dict[str, torch.Tensor]:
    return load_file(str(FIX / "weights.safetensors"))  # float16; .float() is exact


def _load(name: str, weights: dict[str, torch.Tensor]) -> tuple[dict, dict[str, torch.Tensor], VCUNet]:
    cfg = yaml.safe_load((FIX / name / "config.yaml").read_text())
    keys = (FIX / name / "keys.txt").read_text().split()
    unet = VCUNet(VCUNetConfig.from_videocrafter(cfg["model"]["params"]["unet_config"]["params"])).eval()
    unet_keys = [k.removeprefix(UNET) for k in keys if k.startswith(UNET)]
    assert list(unet.state_dict()) == unet_keys  # same names, same order as VideoCrafter's state_dict
    unet.load_state_dict(
        {k.removeprefix(UNET): weights[k].float() for k in keys if k.startswith(UNET)}, strict=True
    )
    return cfg, {k: weights[k].float() for k in keys if k.startswith(IPM)}, unet


def _io(name: str) -> dict[str, torch.Tensor]:
    return {
        k: (v.float() if v.dtype == torch.float16 else v)
        for k, v in load_file(str(FIX / name / "io.safetensors")).items()
    }


def _check_frames(
    unet: VCUNet, io: dict[str, torch.Tensor], context: torch.Tensor, **kw: torch.Tensor
) -> int:
    fps = io.get("fps")
    torch.testing.assert_close(unet.embed(io["t"], fps), io["dbg.emb"], **TOL)
    n = 0
    with torch.no_grad():
        for xk, ok in FRAMES:
            if xk in io:
                out = unet(io[xk], io["t"], context, fps=fps, **kw)
                torch.testing.assert_close(out, io[ok], **TOL, msg=lambda m, ok=ok: f"{ok}: {m}")
                n += 1
    return n


@pytest.mark.parametrize("name", ["vc2_t2v_tiny", "vc1_t2v_tiny"])
def test_t2v_forward_parity(name: str, weights: dict[str, torch.Tensor]) -> None:
    _, _, unet = _load(name, weights)
    io = _io(name)
    expected_frames = 3 if name == "vc1_t2v_tiny" else 2
    assert _check_frames(unet, io, io["context"]) == expected_frames


def test_i2v_resampler_and_forward_parity(weights: dict[str, torch.Tensor]) -> None:
    cfg, ipm_sd, unet = _load("vc1_i2v_tiny", weights)
    io = _io("vc1_i2v_tiny")
    proj = VCResampler(**cfg["image_proj_model"]["params"]).eval()
    proj.load_state_dict({k.removeprefix(IPM): v for k, v in ipm_sd.items()}, strict=True)
    with torch.no_grad():
        img_emb = proj(io["img_tokens"])
    torch.testing.assert_close(img_emb, io["img_emb"], **TOL)
    torch.testing.assert_close(torch.cat([io["context"], img_emb], dim=1), io["context_full"], **TOL)
    # the image tokens passed separately (appended after the 77 text tokens) ...
    assert _check_frames(unet, io, io["context"], image_context=img_emb) == 2
    # ... equal VideoCrafter's pre-concatenated context
    with torch.no_grad():
        out = unet(io["x_1frame"], io["t"], io["context_full"], fps=io["fps"])
    torch.testing.assert_close(out, io["out_1frame"], **TOL)


def test_fps_default_is_16(weights: dict[str, torch.Tensor]) -> None:
    _, _, unet = _load("vc2_t2v_tiny", weights)
    t = torch.tensor([10, 900])
    assert torch.equal(unet.embed(t), unet.embed(t, torch.full_like(t, 16)))
    assert torch.equal(unet.embed(t, 16), unet.embed(t, torch.full_like(t, 16)))


@pytest.mark.parametrize(
    "name,keys_file",
    [
        ("vc2_t2v_tiny", "vc2_t2v_unet_keys.txt"),
        ("vc1_t2v_tiny", "vc1_t2v_unet_keys.txt"),
        ("vc1_i2v_tiny", "vc1_i2v_keys.txt"),
    ],
)
def test_full_size_models_have_videocrafters_keys_and_shapes(name, keys_file):
    """The real-size U-Nets (and the I2V Resampler), built on the meta device from the real unet_config.params
    recorded in each fixture's header, have exactly the keys and shapes of VideoCrafter's released models."""
    import json

    header = (FIX / name / "config.yaml").read_text().split("# Real unet_config.params: ", 1)[1]
    params = json.loads(header.split("\n", 1)[0])
    want = {}
    for line in (FIX / "full_size_keys" / keys_file).read_text().splitlines():
        key, shape = line.split("\t")
        want[key] = tuple(int(v) for v in shape.strip("()").split(",") if v.strip())
    with torch.device("meta"):
        got = {
            UNET + k: tuple(v.shape)
            for k, v in VCUNet(VCUNetConfig.from_videocrafter(params)).state_dict().items()
        }
        if any(k.startswith(IPM) for k in want):
            got.update({IPM + k: tuple(v.shape) for k, v in VCResampler().state_dict().items()})
    assert sorted(set(want) - set(got)) == [] and sorted(set(got) - set(want)) == []
    assert {k: got[k] for k in want if got[k] != want[k]} == {}
    assert sum(torch.Size(s).numel() for s in want.values()) > 1_000_000_000  # real size: >1B parameters
