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


# ---- --frozen-from a model FOLDER (SD 2.1 layout) -------------------------------------------------------------
def _expected_vae_keys(cfg: dict) -> set[str]:
    """LDM AutoencoderKL's parameter names for a diffusers AutoencoderKL config (written from LDM's model.py)."""
    widths, n = list(cfg["block_out_channels"]), cfg["layers_per_block"]
    res = ("norm1", "conv1", "norm2", "conv2")
    keys: set[str] = set()

    def add(prefix: str, names) -> None:
        keys.update(f"first_stage_model.{prefix}{m}.{p}" for m in names for p in ("weight", "bias"))

    for side in ("encoder", "decoder"):
        add(f"{side}.", ("conv_in", "norm_out", "conv_out"))
        add(f"{side}.mid.", [f"block_{b}.{r}" for b in (1, 2) for r in res])
        add(f"{side}.mid.attn_1.", ("norm", "q", "k", "v", "proj_out"))
    for i, w in enumerate(widths):
        c_in = widths[max(i - 1, 0)]
        for j in range(n):
            add(f"encoder.down.{i}.block.{j}.", res + (("nin_shortcut",) if j == 0 and c_in != w else ()))
        if i < len(widths) - 1:
            add(f"encoder.down.{i}.downsample.", ("conv",))
        c_in = widths[min(i + 1, len(widths) - 1)]  # decoder: up.i is fed by up.(i+1) (the top by mid)
        for j in range(n + 1):
            add(f"decoder.up.{i}.block.{j}.", res + (("nin_shortcut",) if j == 0 and c_in != w else ()))
        if i > 0:
            add(f"decoder.up.{i}.upsample.", ("conv",))
    add("", ("quant_conv", "post_quant_conv"))
    return keys


def _expected_openclip_keys(prefix: str, blocks: int, rest) -> set[str]:
    parts = ["attn.in_proj_weight", "attn.in_proj_bias"]
    parts += [
        f"{m}.{p}"
        for m in ("attn.out_proj", "ln_1", "ln_2", "mlp.c_fc", "mlp.c_proj")
        for p in ("weight", "bias")
    ]
    return {f"{prefix}transformer.resblocks.{i}.{p}" for i in range(blocks) for p in parts} | {
        prefix + k for k in rest
    }


TEXT_REST = ("token_embedding.weight", "positional_embedding", "ln_final.weight", "ln_final.bias")
TEXT_REST += ("text_projection", "logit_scale")
PERSISTENT_BUFFERS = {  # lvdm/models/ddpm3d.py DDPM.register_schedule (lvlb_weights is persistent=False)
    "betas",
    "alphas_cumprod",
    "alphas_cumprod_prev",
    "sqrt_alphas_cumprod",
    "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod",
    "sqrt_recip_alphas_cumprod",
    "sqrt_recipm1_alphas_cumprod",
    "posterior_variance",
    "posterior_log_variance_clipped",
    "posterior_mean_coef1",
    "posterior_mean_coef2",
}


def test_schedule_buffers_are_videocrafters() -> None:
    from trainer.diffusion.schedule import schedule_buffers
    from trainer.model.presets import get_preset

    ref = load_file(str(FIX / "vc2_t2v_tiny" / "ddim_ref.safetensors"))  # VideoCrafter's own buffers
    got = schedule_buffers(get_preset("vc2-t2v-tiny").diffusion)
    assert set(got) == PERSISTENT_BUFFERS | {"scale_arr"}
    assert all(v.dtype == torch.float32 and v.shape == (1000,) for k, v in got.items() if k != "scale_arr")
    assert torch.equal(got["alphas_cumprod"], ref["buffers.alphas_cumprod"])  # bit-exact
    assert torch.equal(got["scale_arr"], ref["buffers.scale_arr"])
    assert set(schedule_buffers(get_preset("vc1-t2v-tiny").diffusion)) == PERSISTENT_BUFFERS  # no use_scale
    assert schedule_buffers(get_preset("vc1-t2v-1024").diffusion)["scale_arr"].shape == (
        1000,
    )  # fix_scale_bug


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory) -> Path:
    from encoders.tiny import write_tiny_models

    return Path(write_tiny_models(str(tmp_path_factory.mktemp("tiny")), seed=0))


@pytest.mark.parametrize("name", ["vc2_t2v_tiny", "vc1_i2v_tiny"])
def test_frozen_from_a_model_folder(
    name: str,
    weights: dict[str, torch.Tensor],
    tiny_folder: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from diffusers import AutoencoderKL
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPVisionModelWithProjection

    from encoders.videocrafter import extract_encoders

    state = _state(name, weights)
    ours = tmp_path / "ours.safetensors"
    assert _to_ours(_ckpt(tmp_path, state), name, ours) == 0
    out = tmp_path / "vc.ckpt"
    args = [str(ours), "--out", str(out), "--to", "videocrafter", "--frozen-from", str(tiny_folder)]
    assert main(args) == 0
    printed = capsys.readouterr().out
    got = read_videocrafter(out)

    vae_cfg = json.loads((tiny_folder / "vae" / "config.json").read_text())
    text_cfg = json.loads((tiny_folder / "text_encoder" / "config.json").read_text())
    n = text_cfg["num_hidden_layers"]
    expected = {k for k in state if k.startswith((UNET, IPM))} | _expected_vae_keys(vae_cfg)
    expected |= _expected_openclip_keys("cond_stage_model.model.", n + 1, TEXT_REST)
    expected |= PERSISTENT_BUFFERS | {"scale_arr"}  # both fixtures' YAMLs set use_scale
    if name == "vc1_i2v_tiny":
        vis_cfg = json.loads((tiny_folder / "image_encoder" / "config.json").read_text())
        rest = ("conv1.weight", "class_embedding", "positional_embedding", "proj")
        rest += tuple(f"{m}.{p}" for m in ("ln_pre", "ln_post") for p in ("weight", "bias"))
        expected |= _expected_openclip_keys("embedder.model.visual.", vis_cfg["num_hidden_layers"], rest)
        expected |= {"embedder.model." + k for k in TEXT_REST}
    assert set(got) == expected
    for k in state:
        if k.startswith((UNET, IPM)):
            assert torch.equal(got[k], state[k]), k
    assert not got[f"cond_stage_model.model.transformer.resblocks.{n}.attn.in_proj_weight"].any()
    assert "ZEROS" in printed and f"transformer.resblocks.{n}." in printed and "logit_scale" in printed

    models = tmp_path / "models"
    extract_encoders(
        got,
        models,
        tokenizer_dir=str(tiny_folder / "tokenizer"),
        text_heads=2,
        vision_heads=2,
        vae_norm_groups=8,
    )
    x = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    ids = torch.randint(0, text_cfg["vocab_size"], (2, 77), generator=torch.Generator().manual_seed(1))
    vae, back_vae = (AutoencoderKL.from_pretrained(str(d / "vae")).eval() for d in (tiny_folder, models))
    text = CLIPTextModelWithProjection.from_pretrained(str(tiny_folder / "text_encoder")).eval()
    back_text = CLIPTextModel.from_pretrained(str(models / "text_encoder")).eval()
    with torch.no_grad():
        z = vae.encode(x).latent_dist.mean
        assert torch.equal(back_vae.encode(x).latent_dist.mean, z)
        assert torch.equal(back_vae.decode(z).sample, vae.decode(z).sample)
        assert torch.equal(back_text(input_ids=ids).last_hidden_state, text(input_ids=ids).last_hidden_state)
        if name == "vc1_i2v_tiny":
            pixels = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(2))
            vision = CLIPVisionModelWithProjection.from_pretrained(str(tiny_folder / "image_encoder")).eval()
            back = CLIPVisionModelWithProjection.from_pretrained(str(models / "image_encoder")).eval()
            assert torch.equal(
                back(pixel_values=pixels).image_embeds, vision(pixel_values=pixels).image_embeds
            )
