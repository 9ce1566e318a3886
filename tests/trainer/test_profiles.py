"""Storage profiles in training: the same inputs stored full, compact and lean train to the same loss curve."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest

from shards.profiles import PROFILES
from tests.shards.profile_fixtures import STAGE, encode_profile_shards
from tests.trainer.conftest import launch, read_metrics, tail, write_config

STEPS = 3


def _config(folder, models, out_dir, *, sample_latents: bool) -> dict:
    """One Image2Video phase (vc1-i2v-tiny: text and image cross-attention) over webvid + laion_coco."""
    return {
        "name": "profiles",
        "out_dir": str(out_dir),
        "seed": 0,
        "model": {"unet": "vc1-i2v-tiny", "model_dir": str(models), "init_from_sd": False},
        "deepspeed": {"zero_stage": 2, "bf16": False, "optimizer": "torch_adamw"},
        "phases": [
            {
                "name": "joint",
                "stage": STAGE,
                "steps": STEPS,
                "global_batch_size": 2,
                "data": {
                    "sources": [
                        {"name": n, "urls": [f"{folder}/{n}-{{stage}}-*.tar"]}
                        for n in ("webvid", "laion_coco")
                    ],
                    "video_batch_size": 1,
                    "image_batch_size": 1,
                    "shuffle_buffer": 1,
                    "num_workers": 0,
                    "on_bad_sample": "raise",
                    "sample_latents": sample_latents,
                },
                "optim": {"lr": 1.0e-3, "warmup_steps": 0},
            }
        ],
        "checkpoint": {"every_steps": 100, "keep_last": 1, "export_safetensors": False},
        "ema": {"enabled": False},
        "logging": {"every_steps": 1, "progress": False},
        "preview": {"every_steps": 0, "at_phase_end": False},
    }


@pytest.fixture(scope="module")
def curves(tmp_path_factory, tiny_models):
    """{run: (metrics, output)}: full with and without latent sampling, compact, lean. The four launches run
    at once (their start-up is most of their time); each compared pair has the same number of ranks."""
    root = tmp_path_factory.mktemp("profile_runs")
    runs = {  # run: (profile, sample_latents, ranks)
        "full": ("full", True, 1),
        "compact": ("compact", True, 1),
        "full-mean": ("full", False, 2),
        "lean": ("lean", True, 2),  # sample_latents on: lean has no std, so it trains on the mean anyway
    }
    folders = {
        name: encode_profile_shards(root / "shards" / name, tiny_models, name, videos=3, images=3)
        for name in PROFILES
    }

    def run(name):
        profile, sample, ranks = runs[name]
        config = _config(folders[profile], tiny_models, root / name, sample_latents=sample)
        proc = launch(write_config(root / f"{name}.yaml", config), ranks=ranks, timeout=600)
        assert proc.returncode == 0, tail(proc)
        return name, (read_metrics(root / name), proc.stdout + proc.stderr)

    with ThreadPoolExecutor(len(runs)) as pool:
        return dict(pool.map(run, runs))


def _losses(metrics) -> list[float]:
    return [r["loss"] for r in metrics if "loss" in r]


def test_profiles_train_to_the_same_loss_curve(curves):
    losses = {run: _losses(m) for run, (m, _) in curves.items()}
    assert all(len(v) == STEPS for v in losses.values()), losses
    # same batches and noise in each pair (seeded by name): the curves differ only by what the profile changed
    keys = {run: [r["keys"] for r in m if "keys" in r] for run, (m, _) in curves.items()}
    assert keys["compact"] == keys["full"] and keys["lean"] == keys["full-mean"]
    tolerances = {("compact", "full"): 3e-4, ("lean", "full-mean"): 2e-3}
    for (a, b), tol in tolerances.items():
        for x, y in zip(losses[a], losses[b]):
            assert abs(x - y) <= tol * abs(y), (a, b, losses[a], losses[b])
    # compact: the std within 1% (8-bit log-std); lean: tokens computed from captions (fp32, not the stored
    # fp16) and from the JPEG frames. Sampling the latent or not moves the curve far more (the tiny VAE's
    # std is ~0.4, SD's ~1e-4), so the comparisons above can fail.
    gap = max(abs(x - y) / abs(y) for x, y in zip(losses["full"], losses["full-mean"]))
    assert gap > 5 * max(tolerances.values()), (losses["full"], losses["full-mean"])


def test_the_trainer_loads_only_the_encoders_lean_needs(curves):
    _, log = curves["lean"]
    assert "the trainer runs the frozen text encoder and image encoder" in log
    assert "the trainer runs the frozen" not in curves["full"][1]
    lean = [r for r in curves["lean"][0] if "loss" in r]
    assert all(r["encode_s"] > 0 for r in lean) and all(
        r["encode_s"] == 0 for r in curves["full"][0] if "loss" in r
    )


def test_a_text_to_video_run_on_lean_shards_loads_the_text_encoder_only(tmp_path, tiny_models):
    from shards.loader import ShardLoader
    from trainer.config import load_config
    from trainer.main import on_the_fly

    folder = encode_profile_shards(tmp_path / "lean", tiny_models, "lean", videos=2, images=2)
    raw = _config(folder, tiny_models, tmp_path / "out", sample_latents=True)
    raw["model"]["unet"] = "vc2-t2v-tiny"  # no image cross-attention: the frames are of no use
    config = load_config(write_config(tmp_path / "t2v.yaml", raw))
    phase = config.phases[0]
    loader = ShardLoader(phase.data.loader_config(stage=phase.stage, seed=0))
    assert loader.needs_encoders() == {"text": True, "image": True}
    said = []
    enc = on_the_fly(
        config, loader, None, "cpu", type("Log", (), {"message": lambda self, m: said.append(m)})()
    )
    assert (
        enc.encoders.text_encoder is not None
        and enc.encoders.image_encoder is None
        and enc.encoders.vae is None
    )
    assert said == ["storage profiles lean: the trainer runs the frozen text encoder on cpu"]
    batch = next(iter(loader))
    assert enc.text_tokens(batch).shape == (len(batch["captions"]), 77, 32) and enc.seconds > 0
