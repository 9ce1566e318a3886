"""Run configs, batch-size checks, LR schedule, freezing, EMA and checkpoint bookkeeping (no launcher needed)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from trainer import checkpoint as ckpt
from trainer.config import PhaseConfig, load_config
from trainer.ema import EMA
from trainer.engine import deepspeed_json, lr_lambda
from trainer.phases import apply_trainable, step_seed

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "train"


def test_every_shipped_config_loads_with_the_recipe_sizes():
    got = {}
    for name in ("vc1-256", "vc1-512", "vc1-1024", "vc2-spatial"):
        (phase,) = load_config(str(CONFIGS / f"{name}.yaml")).phases
        got[name] = (phase.stage, phase.global_batch_size, phase.steps, phase.trainable)
    assert got["vc1-256"] == ("256x256", 256, 80000, "all")
    assert got["vc1-512"] == ("512x320", 128, 136000, "all")
    assert got["vc1-1024"] == ("1024x576", 64, 45000, "all")
    assert got["vc2-spatial"][0] == "512x320" and got["vc2-spatial"][3] == "spatial"
    assert [s.name for s in load_config(str(CONFIGS / "vc2-spatial.yaml")).phases[0].data.sources] == ["jdb"]
    demo = load_config(str(CONFIGS / "demo.yaml"))
    assert [p.name for p in demo.phases] == ["vc1-256", "vc1-512", "vc1-1024", "vc2-spatial"]
    assert demo.model.unet == "tiny" and demo.out_dir == "demo_out/train"


def test_global_batch_is_micro_times_accum_times_world():
    phase = load_config(str(CONFIGS / "vc1-256.yaml")).phases[0]  # 256 = 4 x accum x world
    assert phase.resolve_grad_accum(64) == 1
    assert phase.resolve_grad_accum(8) == 8
    with pytest.raises(ValueError, match="global_batch_size 256 != video_batch_size 4 x grad_accum"):
        phase.resolve_grad_accum(3)
    phase.grad_accum = 2
    with pytest.raises(ValueError, match="grad_accum 2 x world_size 8"):
        phase.resolve_grad_accum(8)
    ds = deepspeed_json(
        load_config(str(CONFIGS / "vc1-512.yaml")).phases[0],
        load_config(str(CONFIGS / "vc1-512.yaml")).deepspeed,
        16,
    )
    assert ds["train_batch_size"] == 128 and ds["train_micro_batch_size_per_gpu"] == 2
    assert ds["gradient_accumulation_steps"] == 4 and ds["zero_optimization"]["stage"] == 2
    assert ds["gradient_clipping"] == 1.0


def test_bad_options_name_themselves(tmp_path):
    path = tmp_path / "x.yaml"
    path.write_text((CONFIGS / "demo.yaml").read_text().replace("zero_stage: 2", "zero_stage: 4"))
    with pytest.raises(ValueError, match="deepspeed.zero_stage"):
        load_config(str(path))
    path.write_text((CONFIGS / "demo.yaml").read_text().replace("  bf16: false", "  bf16: false\n  zero: 2"))
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['zero'\]"):
        load_config(str(path))
    with pytest.raises(ValueError, match="trainable"):
        load_config(str(CONFIGS / "demo.yaml"), ["phases.2.trainable=motion"])
    cfg = load_config(str(CONFIGS / "demo.yaml"), ["phases.0.steps=7", "deepspeed.zero_stage=3"])
    assert cfg.phases[0].steps == 7 and cfg.deepspeed.zero_stage == 3


def test_lr_warmup_then_schedule():
    phase = PhaseConfig(
        name="p",
        stage="256x256",
        steps=110,
        global_batch_size=1,
        data={"sources": [{"name": "a", "urls": ["x.tar"]}]},
        optim={"lr": 1.0, "warmup_steps": 10, "schedule": "cosine", "min_lr_ratio": 0.1},
    )
    f = lr_lambda(phase)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(10) == pytest.approx(1.0) and f(60) == pytest.approx(
        0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 2))
    )
    assert f(110) == pytest.approx(0.1)
    phase.optim.schedule = "constant"
    assert lr_lambda(phase)(50) == 1.0


def test_spatial_phase_freezes_exactly_the_temporal_group():
    from trainer.model import build_unet, spatial_temporal_parameters

    model = build_unet("tiny")
    spatial, temporal = spatial_temporal_parameters(model)
    counts = apply_trainable(model, "spatial")
    assert all(p.requires_grad for p in spatial) and not any(p.requires_grad for p in temporal)
    assert counts == {"spatial_trainable": sum(p.numel() for p in spatial), "temporal_trainable": 0}
    apply_trainable(model, "all")
    assert all(p.requires_grad for p in model.parameters())


def test_ema_tracks_trainable_and_resets_frozen():
    lin = torch.nn.Linear(2, 2)
    ema = EMA(0.5)
    ema.start_phase(lin, zero_stage=2)
    before = ema.shadow["weight"].clone()
    with torch.no_grad():
        lin.weight.add_(1.0)
    ema.update(lin, zero_stage=2)  # warmup decay min(0.5, 1/10) = 0.1
    assert torch.allclose(ema.shadow["weight"], before + 0.9)
    lin.bias.requires_grad_(False)
    with torch.no_grad():
        lin.bias.add_(5.0)
    ema.start_phase(lin, zero_stage=2)
    assert torch.equal(ema.shadow["bias"], lin.bias.detach())


def test_checkpoint_pointer_and_pruning(tmp_path):
    root = tmp_path / "ckpt"
    root.mkdir()
    for tag in ("step00000002", "step00000004", "step00000005-end-a", "step00000006"):
        (root / tag).mkdir()
    assert ckpt.latest_tag(str(root)) is None
    ckpt.write_atomic(str(root / "latest"), "step00000006")
    assert ckpt.latest_tag(str(root)) == "step00000006"
    assert ckpt.prune(str(root), 2, keep="step00000006") == ["step00000002"]
    assert sorted(p.name for p in root.iterdir()) == [
        "latest",
        "step00000004",
        "step00000005-end-a",
        "step00000006",
    ]
    ckpt.write_atomic(str(root / "latest"), "step00000099")
    with pytest.raises(FileNotFoundError, match="not a checkpoint folder"):
        ckpt.latest_tag(str(root))
    assert ckpt.tag_for(12, "vc2-spatial") == "step00000012-end-vc2-spatial"
    assert step_seed(0, "a", 1, 0, 0) == step_seed(0, "a", 1, 0, 0) != step_seed(0, "a", 1, 0, 1)


def test_cli_help(capsys):
    from trainer.main import main

    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    assert "--resume" in capsys.readouterr().out


def test_signal_scaling_options_reach_the_diffusion():
    from trainer.config import ModelConfig
    from trainer.diffusion import Diffusion

    model = ModelConfig(model_dir="m", use_scale=True, scale_b=0.3, fix_scale_bug=True)
    diffusion = Diffusion(prediction=model.prediction, **model.signal_scale())
    assert diffusion.scale_arr is not None and len(diffusion.scale_arr) == 1000
    assert diffusion.scale_arr[-1].item() == pytest.approx(0.3)
    assert Diffusion(**ModelConfig(model_dir="m").signal_scale()).scale_arr is None
    with pytest.raises(ValueError, match="model.*mid_step"):
        ModelConfig(model_dir="m", use_scale=True, mid_step=0)


def test_every_shipped_run_config_loads():
    from pathlib import Path

    from trainer.config import load_config

    configs = sorted((Path(__file__).resolve().parents[2] / "configs" / "train").glob("*.yaml"))
    assert any(p.name == "vc2-finetune.yaml" for p in configs)
    for path in configs:
        config = load_config(str(path), [])
        assert config.phases, path
    vc2 = load_config(str(Path(configs[0]).parent / "vc2-finetune.yaml"), ["model.fps=28"])
    assert vc2.model.videocrafter_preset.name == "vc2-t2v-512" and vc2.model.fps == 28
    assert vc2.model.signal_scale() == {
        "use_scale": True,
        "scale_a": 1,
        "scale_b": 0.7,
        "mid_step": 400,
        "fix_scale_bug": False,
    }
    assert [p.trainable for p in vc2.phases] == ["all", "spatial"]


def test_videocrafter_presets_set_their_own_options():
    from trainer.config import ModelConfig

    i2v = ModelConfig(unet="vc1-i2v-512", model_dir="m")
    assert i2v.image_cross_attention and i2v.signal_scale()["scale_b"] == 0.7
    hd = ModelConfig(unet="vc1-t2v-1024", model_dir="m")
    assert hd.signal_scale() == {
        "use_scale": True,
        "scale_a": 1,
        "scale_b": 0.3,
        "mid_step": 400,
        "fix_scale_bug": True,
    }
    assert not ModelConfig(unet="vc1-t2v-512", model_dir="m").signal_scale()["use_scale"]
    assert ModelConfig(unet="vc2-t2v-512", model_dir="m", scale_b=0.5).signal_scale()["scale_b"] == 0.5
    assert not ModelConfig(unet="tiny", model_dir="m").signal_scale()["use_scale"]
    for bad, needle in (
        ({"unet": "vc2-t2v-512", "image_cross_attention": True}, "text-to-video"),
        ({"unet": "vc9"}, "vc2-t2v-512"),
        ({"unet": "vc2-t2v-512", "prediction": "v"}, "predicts 'eps'"),
        ({"unet": "tiny", "fps": 0}, "model.fps"),
    ):
        with pytest.raises(ValueError, match=needle):
            ModelConfig(model_dir="m", **bad)


def test_every_shipped_study_config_loads():
    from pathlib import Path

    from trainer.perturb.config import load_study_config

    configs = sorted((Path(__file__).resolve().parents[2] / "configs" / "study").glob("*.yaml"))
    assert {p.name for p in configs} >= {"demo.yaml", "vc2-perturbation.yaml"}
    for path in configs:
        study = load_study_config(str(path), [])
        assert study.variants and study.eval_steps[-1] == study.steps, path
