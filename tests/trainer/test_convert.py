"""`latentcrafter convert` / `load_pretrained` on the tiny VideoCrafter fixtures: round trip, validation, safety."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import load_file

from pipelines.cli import COMMANDS
from trainer.convert import DIFFUSION_DEFAULTS, load_pretrained, main, read_videocrafter
from trainer.model.videocrafter import VCResampler, VCUNet, VCUNetConfig

FIX = Path(__file__).resolve().parents[1] / "fixtures" / "videocrafter"
UNET, IPM = "model.diffusion_model.", "image_proj_model."
NAMES = ["vc2_t2v_tiny", "vc1_t2v_tiny", "vc1_i2v_tiny"]
FROZEN = {
    "first_stage_model.decoder.conv_in.weight": torch.arange(24.0).reshape(2, 3, 2, 2),
    "cond_stage_model.model.positional_embedding": torch.ones(5, 3, dtype=torch.float16),
    "scale_arr": torch.linspace(1.0, 0.7, 10),
    "betas": torch.linspace(0.00085, 0.012, 10, dtype=torch.float64),
}


class Evil:  # any class: weights_only unpickling must refuse it
    pass


@pytest.fixture(scope="module")
def weights() -> dict[str, torch.Tensor]:
    return load_file(str(FIX / "weights.safetensors"))


def _state(name: str, weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    keys = (FIX / name / "keys.txt").read_text().split()
    return {**{k: weights[k].float() for k in keys}, **FROZEN}


def _ckpt(tmp_path: Path, state: dict[str, torch.Tensor], name: str = "model.ckpt") -> Path:
    path = tmp_path / name
    torch.save({"state_dict": state, "epoch": 3}, path)
    return path


def _to_ours(src: Path, name: str, out: Path) -> int:
    return main([str(src), "--out", str(out), "--videocrafter-config", str(FIX / name / "config.yaml")])


def test_cli_is_registered() -> None:
    assert COMMANDS["convert"][0] == "trainer.convert"


@pytest.mark.parametrize("name", NAMES)
def test_round_trip_and_load_pretrained(name: str, weights: dict[str, torch.Tensor], tmp_path: Path) -> None:
    state = _state(name, weights)
    src = _ckpt(tmp_path, state)
    ours = tmp_path / "ours.safetensors"
    assert _to_ours(src, name, ours) == 0

    with safe_open(str(ours), framework="pt") as f:
        keys = list(f.keys())
    assert not any(k.startswith(("first_stage", "cond_stage", "scale_arr", "betas")) for k in keys)
    assert all(k.startswith(("unet.", "image_proj.")) for k in keys)

    cfg = yaml.safe_load((FIX / name / "config.yaml").read_text())
    model = load_pretrained(ours)
    unet, proj, meta = model.unet, model.image_proj, model.metadata
    assert meta["format"] == "latentcrafter-videocrafter" and meta["source"] == "model.ckpt"
    assert meta["unet_params"] == cfg["model"]["params"]["unet_config"]["params"]
    want_diffusion = {k: cfg["model"]["params"].get(k, d) for k, d in DIFFUSION_DEFAULTS.items()}
    assert meta["diffusion"] == want_diffusion
    assert meta["diffusion"]["scale_b"] == (0.7 if name != "vc1_t2v_tiny" else 0.3)

    direct = VCUNet(VCUNetConfig.from_videocrafter(meta["unet_params"])).eval()
    direct.load_state_dict({k.removeprefix(UNET): v for k, v in state.items() if k.startswith(UNET)})
    for k, v in direct.state_dict().items():
        assert torch.equal(unet.state_dict()[k], v), k
    io = load_file(str(FIX / name / "io.safetensors"))
    x, t, ctx = io["x"].float(), io["t"], io.get("context_full", io["context"]).float()
    fps = io.get("fps")
    with torch.no_grad():
        assert torch.equal(unet(x, t, ctx, fps=fps), direct(x, t, ctx, fps=fps))

    with torch.no_grad():  # the module's own forward: raw image tokens in, VideoCrafter's output out
        image = io["img_tokens"].float() if "img_tokens" in io else None
        out = model(x, t, io["context"].float(), fps=fps, image_context=image)
    torch.testing.assert_close(out, io["out"], atol=1e-4, rtol=1e-4)

    if name == "vc1_i2v_tiny":
        assert proj is not None and meta["image_proj_params"] == cfg["image_proj_model"]["params"]
        ref = VCResampler(**cfg["image_proj_model"]["params"]).eval()
        ref.load_state_dict({k.removeprefix(IPM): v for k, v in state.items() if k.startswith(IPM)})
        with torch.no_grad():
            assert torch.equal(proj(io["img_tokens"].float()), ref(io["img_tokens"].float()))
    else:
        assert proj is None and "image_proj_params" not in meta

    back = tmp_path / "back.ckpt"
    args = [str(ours), "--out", str(back), "--to", "videocrafter", "--frozen-from", str(src)]
    assert main(args) == 0
    got = read_videocrafter(back)
    assert list(got) == list(state)
    for k, v in state.items():
        assert got[k].dtype == v.dtype and torch.equal(got[k], v), k

    # without --frozen-from: only the U-Net (+ image_proj) comes back
    assert main([str(ours), "--out", str(tmp_path / "bare.ckpt"), "--to", "videocrafter"]) == 0
    bare = read_videocrafter(tmp_path / "bare.ckpt")
    assert set(bare) == {k for k in state if k.startswith((UNET, IPM))}


def _mutations(state: dict[str, torch.Tensor]) -> list[tuple[dict[str, torch.Tensor], str]]:
    missing_key = UNET + "out.2.weight"
    shaped_key = UNET + "input_blocks.0.0.weight"
    extra_key = UNET + "input_blocks.99.0.weight"
    missing = {k: v for k, v in state.items() if k != missing_key}
    extra = {**state, extra_key: torch.zeros(3)}
    shaped = {**state, shaped_key: torch.zeros(1, 2, 3, 3)}
    return [(missing, missing_key), (extra, extra_key), (shaped, shaped_key)]


@pytest.mark.parametrize("case", range(3), ids=["missing", "unexpected", "mis-shaped"])
def test_bad_checkpoint_names_the_key(
    case: int, weights: dict[str, torch.Tensor], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad, key = _mutations(_state("vc2_t2v_tiny", weights))[case]
    out = tmp_path / "ours.safetensors"
    assert _to_ours(_ckpt(tmp_path, bad), "vc2_t2v_tiny", out) == 2
    err = capsys.readouterr().err
    assert key in err and ["missing", "unexpected", "mis-shaped"][case] in err
    assert not out.exists()


def test_i2v_checkpoint_with_t2v_config_is_refused(
    weights: dict[str, torch.Tensor], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src = _ckpt(tmp_path, _state("vc1_i2v_tiny", weights))
    assert _to_ours(src, "vc2_t2v_tiny", tmp_path / "o.safetensors") == 2
    assert "to_k_ip" in capsys.readouterr().err  # the image cross-attention keys the T2V config lacks


def test_unsafe_pickle_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "evil": Evil()}, src)
    with pytest.raises(ValueError, match="will not be loaded unsafely") as e:
        read_videocrafter(src)
    assert str(src) in str(e.value)
    assert _to_ours(src, "vc2_t2v_tiny", tmp_path / "o.safetensors") == 2
    assert "will not be loaded unsafely" in capsys.readouterr().err


def test_usage_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = _ckpt(tmp_path, dict(FROZEN))
    assert main([str(src), "--out", str(tmp_path / "o.safetensors")]) == 2
    assert "no model.diffusion_model.* keys" in capsys.readouterr().err
    assert main([str(tmp_path / "nope.ckpt"), "--out", "x", "--videocrafter-config", "y"]) == 2
    assert "nope.ckpt" in capsys.readouterr().err
    assert main([str(src), "--out", str(tmp_path / "b.ckpt"), "--to", "videocrafter"]) == 2
    assert "not a safetensors file" in capsys.readouterr().err


def test_metadata_is_json(weights: dict[str, torch.Tensor], tmp_path: Path) -> None:
    ours = tmp_path / "ours.safetensors"
    assert _to_ours(_ckpt(tmp_path, _state("vc1_i2v_tiny", weights)), "vc1_i2v_tiny", ours) == 0
    with safe_open(str(ours), framework="pt") as f:
        meta = f.metadata()
    assert set(meta) == {"format", "preset", "unet_params", "image_proj_params", "diffusion", "source"}
    assert meta["preset"] == ""  # the fixture's Resampler reads 40-wide tokens: no preset has those sizes
    assert (
        json.loads(meta["diffusion"])["mid_step"] == 400
        and json.loads(meta["image_proj_params"])["dim"] == 32
    )


def test_safetensors_source_and_wrong_direction(
    weights: dict[str, torch.Tensor], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from safetensors.torch import save_file

    state = _state("vc1_t2v_tiny", weights)
    src = tmp_path / "vc.safetensors"
    save_file(state, str(src))
    ours = tmp_path / "ours.safetensors"
    assert _to_ours(src, "vc1_t2v_tiny", ours) == 0
    assert _to_ours(ours, "vc1_t2v_tiny", tmp_path / "again.safetensors") == 2
    assert "already a latentcrafter file" in capsys.readouterr().err
    assert main([str(src), "--out", str(tmp_path / "b.ckpt"), "--to", "videocrafter"]) == 2
    assert "not a latentcrafter file" in capsys.readouterr().err


@pytest.mark.parametrize("name,preset", [("vc2_t2v_tiny", "vc2-t2v-tiny"), ("vc1_t2v_tiny", "vc1-t2v-tiny")])
def test_without_yaml_the_preset_comes_from_the_shapes(
    name: str,
    preset: str,
    weights: dict[str, torch.Tensor],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    src, ours = _ckpt(tmp_path, _state(name, weights)), tmp_path / "ours.safetensors"
    assert main([str(src), "--out", str(ours)]) == 0
    assert f"preset {preset}" in capsys.readouterr().out
    with_yaml = tmp_path / "yaml.safetensors"
    assert _to_ours(src, name, with_yaml) == 0
    model, ref = load_pretrained(ours), load_pretrained(with_yaml)
    assert model.metadata["preset"] == ref.metadata["preset"] == preset
    assert model.metadata["diffusion"] == ref.metadata["diffusion"]
    assert model.unet_params == ref.unet_params


def test_without_yaml_an_unknown_architecture_names_the_closest_preset(
    weights: dict[str, torch.Tensor], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src = _ckpt(tmp_path, _state("vc1_i2v_tiny", weights))  # its Resampler takes 40-wide tokens; presets 48
    assert main([str(src), "--out", str(tmp_path / "o.safetensors")]) == 2
    err = capsys.readouterr().err
    assert (
        "closest is vc1-i2v-tiny" in err
        and "image_proj.proj_in.weight" in err
        and "--videocrafter-config" in err
    )
