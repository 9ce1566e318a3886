"""The VideoCrafter presets: the released models' exact keys and shapes, inferred back from them, and their settings."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from trainer.model.presets import VC_PRESETS, get_preset, preset_for
from trainer.model.pretrained import infer_preset, meta_model

FIX = Path(__file__).resolve().parents[1] / "fixtures" / "videocrafter" / "full_size_keys"
PREFIXES = {"model.diffusion_model.": "unet.", "image_proj_model.": "image_proj."}


def _released(keys_file: str) -> dict[str, torch.Tensor]:
    """The released checkpoint's keys and shapes as meta tensors, under our names."""
    out = {}
    for line in (FIX / keys_file).read_text().splitlines():
        key, shape = line.split("\t")
        dims = tuple(int(v) for v in shape.strip("()").split(",") if v.strip())
        theirs = next(p for p in PREFIXES if key.startswith(p))
        out[PREFIXES[theirs] + key.removeprefix(theirs)] = torch.empty(dims, device="meta")
    return out


@pytest.mark.parametrize(
    "keys_file,preset",
    [
        ("vc2_t2v_unet_keys.txt", "vc2-t2v-512"),
        ("vc1_t2v_unet_keys.txt", "vc1-t2v-512"),
        ("vc1_i2v_keys.txt", "vc1-i2v-512"),
    ],
)
def test_presets_are_the_released_models(keys_file: str, preset: str) -> None:
    released = _released(keys_file)
    p = get_preset(preset)
    got = {k: tuple(v.shape) for k, v in meta_model(p.unet, p.image_proj).state_dict().items()}
    assert got == {k: tuple(v.shape) for k, v in released.items()}
    assert infer_preset(released) == preset


def test_the_1024_model_differs_from_the_512_one_by_its_fps_embedding() -> None:
    """VideoCrafter1 1024: the 512 model's U-Net plus fps conditioning, signal scaling with fix_scale_bug."""
    released = _released("vc1_t2v_unet_keys.txt")
    p = get_preset("vc1-t2v-1024")
    extra = {
        k: v for k, v in meta_model(p.unet, None).state_dict().items() if k.startswith("unet.fps_embedding")
    }
    assert sorted(extra) == [f"unet.fps_embedding.{i}.{w}" for i in (0, 2) for w in ("bias", "weight")]
    assert infer_preset({**released, **extra}) == "vc1-t2v-1024"
    assert p.diffusion["use_scale"] and p.diffusion["fix_scale_bug"] and p.diffusion["scale_b"] == 0.3
    assert p.resolution == "1024x576"


def test_settings_follow_videocrafters_yamls_and_scripts() -> None:
    vc2, vc1, i2v = (get_preset(n) for n in ("vc2-t2v-512", "vc1-t2v-512", "vc1-i2v-512"))
    assert vc2.diffusion["use_scale"] and vc2.diffusion["scale_b"] == 0.7 and vc2.fps == 28
    assert not vc1.diffusion["use_scale"] and vc1.fps is None and "fps_cond" not in vc1.unet
    assert i2v.image_to_video and i2v.fps == 8 and i2v.image_proj["embedding_dim"] == 1280
    for p in VC_PRESETS.values():
        assert p.diffusion["linear_start"] == 0.00085 and p.diffusion["linear_end"] == 0.012
        assert preset_for(p.unet, p.image_proj) == p.name
        assert preset_for({**p.unet, "use_checkpoint": not p.unet["use_checkpoint"]}, p.image_proj) == p.name
    with pytest.raises(ValueError, match="vc2-t2v-512"):
        get_preset("vc3")
