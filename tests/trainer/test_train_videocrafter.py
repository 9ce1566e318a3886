"""Fine-tuning a released-format VideoCrafter model: a model.ckpt in, DeepSpeed (2 CPU ranks), full then spatial-only.

The checkpoint is the tiny VideoCrafter2 fixture (weights made by VideoCrafter's own classes) saved as a
Lightning `model.ckpt` with VideoCrafter's own schedule buffers (`alphas_cumprod`, `scale_arr` from the DDIM
reference) and frozen parts in VideoCrafter's layouts (LDM VAE, OpenCLIP text tower with its unused last
block). As a user holding only that file and a CLIP tokenizer would, the test extracts the frozen encoders
with `latentcrafter convert --extract-encoders` and trains with them as `model.model_dir`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from tests.trainer.conftest import launch, read_metrics, run_config, tail, write_config

FIX = Path(__file__).resolve().parents[1] / "fixtures" / "videocrafter"
UNET = "model.diffusion_model."


def frozen_parts(models: Path) -> dict[str, torch.Tensor]:
    """The tiny set's VAE and text tower in VideoCrafter's layouts (first_stage_model.*, cond_stage_model.*)."""
    from encoders.videocrafter_layout import videocrafter_frozen_state

    return videocrafter_frozen_state(models, image=False)


def write_vc2_ckpt(path: Path, frozen: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    weights = load_file(str(FIX / "weights.safetensors"))
    ref = load_file(str(FIX / "vc2_t2v_tiny" / "ddim_ref.safetensors"))
    state = {k: weights[k] for k in (FIX / "vc2_t2v_tiny" / "keys.txt").read_text().split()}  # fp16
    state["alphas_cumprod"] = ref["buffers.alphas_cumprod"]
    state["scale_arr"] = ref["buffers.scale_arr"]
    state.update(frozen or {"first_stage_model.decoder.conv_in.weight": torch.zeros(2, 3, 3, 3)})
    torch.save({"state_dict": state, "global_step": 1}, path)
    return state


@pytest.fixture(scope="module")
def vc_run(tmp_path_factory, trainer_shards, tiny_models):
    root = tmp_path_factory.mktemp("vc_train")
    from trainer.convert import main

    ckpt = root / "model.ckpt"
    state = write_vc2_ckpt(ckpt, frozen_parts(Path(tiny_models)))
    models = root / "models"  # what `convert --extract-encoders` makes of the checkpoint's frozen parts
    sizes = ["--text-heads", "2", "--vae-norm-groups", "8"]  # the tiny towers' (not in the weights)
    args = [str(ckpt), "--out", str(root / "vc2.safetensors"), "--extract-encoders", str(models)]
    assert main([*args, "--tokenizer", str(Path(tiny_models) / "tokenizer"), *sizes]) == 0
    config = run_config(trainer_shards, models, root / "out", steps=(2, 2, 2), every_ckpt=0)
    config["model"] = {
        "unet": "vc2-t2v-tiny",
        "model_dir": str(models),
        "init_checkpoint": str(ckpt),
        "gradient_checkpointing": True,
    }
    full, spatial = config["phases"][0], config["phases"][2]
    spatial["stage"] = "512x320"
    config["phases"] = [{**full, "name": "vc2-full"}, {**spatial, "name": "vc2-spatial"}]
    config["ema"]["enabled"] = False
    proc = launch(write_config(root / "run.yaml", config))
    assert proc.returncode == 0, tail(proc)
    return {"root": root, "ckpt": ckpt, "state": state, "proc": proc, "out": root / "out", "models": models}


def test_the_extracted_encoders_are_the_checkpoints(vc_run, tiny_models) -> None:
    """The VAE is the checkpoint's; the text tower is its penultimate layer + ln_final (the tiny originals)."""
    from encoders.models import FrozenEncoders, ModelsConfig

    got = FrozenEncoders(ModelsConfig(model_dir=str(vc_run["models"]), image_tokens=False, device="cpu"))
    ref = FrozenEncoders(ModelsConfig(model_dir=str(tiny_models), image_tokens=False, device="cpu"))
    assert sorted(p.name for p in vc_run["models"].iterdir() if p.is_dir()) == [
        "text_encoder",
        "tokenizer",
        "vae",
    ]
    captions = ["a dog runs along the beach", ""]
    a, b = got.encode_text(captions)["tokens"], ref.encode_text(captions)["tokens"]
    np.testing.assert_allclose(a.astype(np.float32), b.astype(np.float32), atol=2e-3)
    frames = np.random.default_rng(0).integers(0, 255, (2, 32, 32, 3), dtype=np.uint8)
    np.testing.assert_allclose(got.encode_frames(frames)[0], ref.encode_frames(frames)[0], atol=1e-3)


def test_full_then_spatial_only_from_a_videocrafter_checkpoint(vc_run) -> None:
    from trainer.model import load_pretrained, spatial_temporal_parameters

    start = {
        "unet." + k.removeprefix(UNET): v.float() for k, v in vc_run["state"].items() if k.startswith(UNET)
    }
    export = vc_run["out"] / "export"
    full, spatial = (
        load_pretrained(export / "vc2-full.safetensors"),
        load_pretrained(export / "vc2-spatial.safetensors"),
    )
    names = {id(p): n for n, p in full.named_parameters()}
    s_params, t_params = spatial_temporal_parameters(full)
    s_names, t_names = [names[id(p)] for p in s_params], [names[id(p)] for p in t_params]
    a, b = full.state_dict(), spatial.state_dict()
    assert set(a) == set(start)
    # the full phase moved both groups away from the checkpoint
    assert sum(not torch.equal(a[n], start[n]) for n in s_names) > 0.9 * len(s_names)
    assert sum(not torch.equal(a[n], start[n]) for n in t_names) > 0.9 * len(t_names)
    # the spatial-only phase kept every temporal weight (temporal transformers, temporal convs, fps MLP)
    assert any(n.startswith("unet.fps_embedding") for n in t_names) and any(
        "temopral_conv" in n for n in t_names
    )
    assert all(torch.equal(a[n], b[n]) for n in t_names)
    assert sum(not torch.equal(a[n], b[n]) for n in s_names) > 0.9 * len(s_names)
    assert spatial.metadata["preset"] == "vc2-t2v-tiny" and spatial.metadata["diffusion"]["use_scale"] is True


def test_the_run_follows_the_checkpoints_schedule_and_logs(vc_run) -> None:
    out = vc_run["proc"].stdout + vc_run["proc"].stderr
    assert "model vc2-t2v-tiny: eps-prediction, signal scaling scale_arr 1 -> 0.7 over 400 steps" in out
    assert f"weights from VideoCrafter checkpoint {vc_run['ckpt']}" in out
    metrics = [m for m in read_metrics(vc_run["out"]) if "loss" in m]
    assert [m["phase"] for m in metrics] == ["vc2-full"] * 2 + ["vc2-spatial"] * 2
    assert all(torch.isfinite(torch.tensor(m["loss"])) for m in metrics)
    previews = sorted(p.name for p in (vc_run["out"] / "previews").glob("*.mp4"))
    assert len(previews) == 2 and previews[0].startswith("step00000002-vc2-full")


def test_export_converts_back_to_a_videocrafter_checkpoint(vc_run, tmp_path) -> None:
    from trainer.convert import main, read_videocrafter

    back = tmp_path / "model.ckpt"
    export = vc_run["out"] / "export" / "vc2-spatial.safetensors"
    assert (
        main([str(export), "--out", str(back), "--to", "videocrafter", "--frozen-from", str(vc_run["ckpt"])])
        == 0
    )
    got, theirs = read_videocrafter(back), vc_run["state"]
    assert list(got) == list(theirs)  # same keys, same order: VideoCrafter's strict load accepts it
    trained = load_file(str(export))
    for k, v in theirs.items():
        if k.startswith(UNET):
            assert torch.equal(got[k], trained["unet." + k.removeprefix(UNET)])
        else:
            assert torch.equal(got[k], v)


def test_a_checkpoint_with_another_schedule_is_refused(tmp_path, tiny_models) -> None:
    from trainer.config import ModelConfig
    from trainer.model import VideoCrafterModel
    from trainer.phases import initial_weights

    ckpt = tmp_path / "model.ckpt"
    write_vc2_ckpt(ckpt)

    class Run:
        seed = 0

    for wrong, needle in (({"use_scale": False}, "scale_arr"), ({"unet": "vc1-t2v-tiny"}, "missing keys")):
        Run.model = ModelConfig(
            **{"unet": "vc2-t2v-tiny", "model_dir": str(tiny_models), "init_checkpoint": str(ckpt), **wrong}
        )
        preset = Run.model.videocrafter_preset
        with pytest.raises(ValueError, match=needle):
            initial_weights(VideoCrafterModel(preset.unet, preset.image_proj, preset=preset.name), Run)
    with pytest.raises(ValueError, match="model.init_checkpoint to its model.ckpt"):
        Run.model = ModelConfig(unet="vc2-t2v-tiny", model_dir=str(tiny_models))
        initial_weights(VideoCrafterModel(preset.unet, None), Run)
