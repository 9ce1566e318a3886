"""The encode stage: batch columns, cross-item VAE batching, per-item failures, and a real Ray actor pool."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from encoders.models import ModelsConfig, write_tiny_models
from pipelines.stages.encode import EncodeStage

INPUT_COLUMNS = ("key", "kind", "caption")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return Path(write_tiny_models(str(tmp_path_factory.mktemp("tiny_stage")), seed=0))


@pytest.fixture(scope="module")
def stage(tiny_dir) -> EncodeStage:
    return EncodeStage(ModelsConfig(model_dir=str(tiny_dir), frame_batch_size=4))


def _batch(lengths: list[int], h: int = 32, w: int = 48, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    frames = np.empty(len(lengths), dtype=object)
    for i, t in enumerate(lengths):
        frames[i] = rng.integers(0, 256, (t, h, w, 3), dtype=np.uint8)
    return {
        "key": np.array([f"s-{i:03d}" for i in range(len(lengths))], dtype=object),
        "kind": np.array(["image" if t == 1 else "video" for t in lengths], dtype=object),
        "caption": np.array([f"a dog on the beach {i}" for i in range(len(lengths))], dtype=object),
        "frames": frames,
    }


def test_stage_output_columns_shapes_and_dtypes(stage):
    batch = _batch([3, 1, 2, 1])
    out = stage(batch)
    assert "frames" not in out
    for col in INPUT_COLUMNS:
        assert list(out[col]) == list(batch[col])
    assert list(out["error"]) == [""] * 4
    for i, t in enumerate([3, 1, 2, 1]):
        assert out["latent"][i].shape == out["latent_std"][i].shape == (4, t, 4, 6)
        assert out["latent"][i].dtype == np.float16 and (out["latent_std"][i] > 0).all()
        assert out["text_tokens"][i].shape == (77, 32) and out["text_tokens"][i].dtype == np.float16
        assert out["text_pooled"][i].shape == (32,)
        assert out["image_tokens"][i].shape == (17, 48) and out["image_pooled"][i].shape == (32,)
    assert out["caption_tokens"].dtype == np.int32 and out["caption_tokens"].tolist() == [8] * 4
    assert out["clip_score"].dtype == np.float32 and np.isfinite(out["clip_score"]).all()
    assert out["scale_factor"].dtype == np.float32 and np.allclose(out["scale_factor"], 0.18215)
    for name, value in stage.encoders.ids.items():
        assert list(out[name]) == [value] * 4 and value


def test_frames_of_all_items_share_vae_forwards(stage):
    batch = _batch([3, 1, 2, 1, 1], seed=1)  # 8 frames: 2 forwards of 4, not one forward per item
    before = dict(stage.encoders.stats)
    out = stage(batch)
    assert stage.encoders.stats["vae_forwards"] - before["vae_forwards"] == 2
    assert stage.encoders.stats["vae_frames"] - before["vae_frames"] == 8
    mean, std = stage.encoders.encode_frames(batch["frames"][0])  # the first video on its own
    np.testing.assert_allclose(out["latent"][0], mean.transpose(1, 0, 2, 3), atol=2e-3)
    np.testing.assert_allclose(out["latent_std"][0], std.transpose(1, 0, 2, 3), atol=2e-3)


def test_video_first_frame_is_the_image_condition(stage):
    batch = _batch([3, 2], seed=2)
    out = stage(batch)
    first = stage.encoders.encode_images(batch["frames"][1][:1])
    np.testing.assert_allclose(out["image_tokens"][1], first["tokens"][0], atol=2e-3)
    np.testing.assert_allclose(out["image_pooled"][1], first["pooled"][0], atol=2e-3)
    last = stage.encoders.encode_images(batch["frames"][1][1:])
    assert not np.allclose(out["image_pooled"][1], last["pooled"][0], atol=2e-3)


def test_bad_items_fail_alone(stage):
    batch = _batch([2, 1, 1, 2])
    batch["frames"][1] = np.zeros((0, 32, 48, 3), dtype=np.uint8)  # no frames
    batch["frames"][2] = batch["frames"][2].astype(np.float32)  # not uint8
    batch["frames"][3] = np.zeros((2, 36, 48, 3), dtype=np.uint8)  # 36 is no multiple of 8: the VAE refuses
    batch["caption"][0] = None  # a missing caption encodes as ""
    out = stage(batch)
    assert out["error"][0] == "" and out["latent"][0].shape == (4, 2, 4, 6)
    assert out["caption_tokens"][0] == 2
    assert out["error"][1].startswith("encode_failed: frames must be uint8 [T>=1,H,W,3]")
    assert out["error"][2].startswith("encode_failed: frames must be uint8") and "float32" in out["error"][2]
    assert out["error"][3].startswith("encode_failed: vae: ValueError: frame size 48x36")
    for i in (1, 2, 3):
        assert all(out[c][i] is None for c in ("latent", "latent_std", "text_tokens", "image_tokens"))
        assert out["caption_tokens"][i] == 0 and np.isnan(out["clip_score"][i])


def test_group_failure_is_retried_item_by_item():
    errors = ["", "", ""]
    done = []

    def fn(ids):
        if 1 in ids:
            raise RuntimeError("boom")
        done.extend(ids)

    EncodeStage._isolated([0, 1, 2], errors, "vae", fn)
    assert done == [0, 2] and errors == ["", "encode_failed: vae: RuntimeError: boom", ""]


def test_non_finite_output_is_an_item_error_not_a_crash(tiny_dir):
    stage = EncodeStage({"model_dir": str(tiny_dir), "frame_batch_size": 4})  # a dict config works too
    with torch.no_grad():
        stage.encoders.vae.encoder.conv_in.weight[0, 0, 0, 0] = float("nan")
    out = stage(_batch([2, 1]))
    assert [e.startswith("encode_failed: non-finite latent") for e in out["error"]] == [True, True]
    assert out["latent"][0] is None and out["text_tokens"][1] is None


def test_uniform_frames_tensor_and_no_image_tokens(tiny_dir):
    stage = EncodeStage(ModelsConfig(model_dir=str(tiny_dir), image_tokens=False, frame_batch_size=16))
    batch = _batch([2, 2, 2])
    batch["frames"] = np.stack(list(batch["frames"]))  # Ray hands equal shapes over as one [N,T,H,W,3] array
    out = stage(batch)
    assert list(out["error"]) == ["", "", ""] and out["latent"][2].shape == (4, 2, 4, 6)
    assert all(x is None for x in out["image_tokens"]) and all(x is None for x in out["image_pooled"])
    assert np.isnan(out["clip_score"]).all() and list(out["image_encoder_id"]) == [""] * 3


def test_stage_runs_as_a_ray_actor_pool(tiny_dir):
    import ray

    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        rng = np.random.default_rng(3)
        items = [
            {"key": f"r-{i}", "kind": "video" if t > 1 else "image", "caption": f"a cat {i}",
             "frames": rng.integers(0, 256, (t, 32, 32, 3), dtype=np.uint8)}
            for i, t in enumerate([3, 1, 2, 0, 1])
        ]  # fmt: skip
        config = ModelsConfig(model_dir=str(tiny_dir), frame_batch_size=4)
        rows = (
            ray.data.from_items(items)
            .map_batches(
                EncodeStage,
                fn_constructor_kwargs={"config": config},
                batch_size=3,
                batch_format="numpy",
                compute=ray.data.ActorPoolStrategy(size=1),
            )
            .take_all()
        )
    finally:
        if started:
            ray.shutdown()
    by_key = {r["key"]: r for r in rows}
    assert sorted(by_key) == [f"r-{i}" for i in range(5)]
    assert "frames" not in rows[0]
    assert np.asarray(by_key["r-0"]["latent"]).shape == (4, 3, 4, 4)
    assert np.asarray(by_key["r-2"]["image_tokens"]).shape == (17, 48)
    assert by_key["r-3"]["error"].startswith("encode_failed:") and by_key["r-3"]["latent"] is None
    assert by_key["r-4"]["error"] == "" and float(by_key["r-4"]["scale_factor"]) == pytest.approx(0.18215)
