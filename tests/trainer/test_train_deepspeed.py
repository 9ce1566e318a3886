"""End to end with the real deepspeed launcher (2 CPU ranks, gloo, ZeRO-2, fp32, torch AdamW), two launches:

1. every phase (joint 256 -> joint 512 -> VC2 spatial-only) with rank 0 SIGKILLed in the middle of the
   save at the last step (LATENTCRAFTER_TEST_KILL_IN_SAVE), after checkpoints at steps 2, 4, 6 and the phase ends;
2. `--resume`: continues from `latest` (step 6, inside the frozen VC2 phase) to the end.
The tests then check the pieces on these two runs: kill safety, resume equality, freezing, previews, logs.
Data: the encode job's shards (session fixture `encoded_shards`, 256x256: webvid + laion_coco for the first
phase, jdb for the VC2 phase) and ShardWriter-made random 512x320 shards for the middle phase.
"""

from __future__ import annotations

import json
import os

import pytest
import torch

from tests.trainer.conftest import launch, read_metrics, run_config, tail, write_config

STEPS = (3, 2, 3)  # phase ends at global steps 3, 5, 8
KILL_AT = 8


@pytest.fixture(scope="module")
def runs(tmp_path_factory, trainer_shards, encoded_shards, tiny_models):
    out = tmp_path_factory.mktemp("train") / "out"
    config = run_config(trainer_shards, tiny_models, out, real=encoded_shards.out_dir, steps=STEPS)
    config = write_config(out.parent / "run.yaml", config)
    killed = launch(config, env_extra={"LATENTCRAFTER_TEST_KILL_IN_SAVE": str(KILL_AT)})
    ckpt_after_kill = sorted(os.listdir(out / "ckpt"))
    latest_after_kill = (out / "ckpt" / "latest").read_text()
    metrics_after_kill = read_metrics(out)
    resumed = launch(config, resume=True)
    assert resumed.returncode == 0, tail(resumed)
    return {
        "out": out,
        "killed": killed,
        "resumed": resumed,
        "ckpt_after_kill": ckpt_after_kill,
        "latest_after_kill": latest_after_kill,
        "metrics_after_kill": metrics_after_kill,
        "metrics": read_metrics(out),
    }


def test_sigkill_during_save_leaves_previous_checkpoint_loadable(runs):
    assert runs["killed"].returncode != 0, tail(runs["killed"])
    assert "tmp-step00000008-end-vc2-spatial" in runs["ckpt_after_kill"]  # the half-written save
    assert "step00000008-end-vc2-spatial" not in runs["ckpt_after_kill"]
    assert runs["latest_after_kill"] == "step00000006"
    # the resume loaded it (model, optimizer, scheduler, EMA, loader) and cleaned the tmp dir on its next save
    assert "resuming from" in runs["resumed"].stderr + runs["resumed"].stdout
    final = sorted(os.listdir(runs["out"] / "ckpt"))
    assert "step00000008-end-vc2-spatial" in final and not [n for n in final if n.startswith("tmp-")]
    assert (runs["out"] / "ckpt" / "latest").read_text() == "step00000008-end-vc2-spatial"
    assert "step00000002" not in final  # keep_last: 2 periodic checkpoints


def test_resume_reproduces_batches_and_losses(runs):
    first = {r["global_step"]: r for r in runs["metrics_after_kill"]}
    assert sorted(first) == list(range(1, KILL_AT + 1))  # step 8 was logged before the save was killed
    launches = {r["launch"] for r in runs["metrics_after_kill"]}
    again = [r for r in runs["metrics"] if r["launch"] not in launches]
    assert [r["global_step"] for r in again] == [7, 8]  # resumed after step 6
    for r in again:
        ref = first[r["global_step"]]
        assert r["phase"] == ref["phase"] == "vc2-spatial"
        assert r["keys"] == ref["keys"]  # the same next batches
        assert r["loss"] == ref["loss"] and r["grad_norm"] == ref["grad_norm"]  # CPU fp32: bit-identical
        assert r["lr"] == ref["lr"]


def test_phases_joint_batches_and_logging(runs):
    rows = {r["global_step"]: r for r in runs["metrics_after_kill"]}
    assert [rows[s]["phase"] for s in range(1, 9)] == ["vc1-256"] * 3 + ["vc1-512"] * 2 + ["vc2-spatial"] * 3
    joint = [rows[s] for s in range(1, 6)]
    assert any("loss_video" in r for r in joint) and any(
        "loss_image" in r for r in joint
    )  # each kind its own loss
    for r in joint:
        assert set(r["sources"]) == {"webvid" if r["kinds"] == ["video"] else "laion_coco"}, r
    assert all(rows[s]["sources"] == ["jdb", "jdb"] for s in (6, 7, 8))
    assert all(rows[s]["kinds"] == ["image"] for s in (6, 7, 8))
    for r in rows.values():
        assert r["lr"] > 0 and r["grad_norm"] > 0 and r["samples_per_s"] > 0 and 0 <= r["data_wait_frac"] < 1

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(runs["out"] / "tb"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"loss", "loss/video", "loss/image", "lr", "grad_norm", "samples_per_s", "data_wait_frac"} <= tags
    assert len(acc.Tags()["images"]) >= 1  # preview strips


def test_vc2_phase_updates_only_spatial_weights(runs):
    from safetensors.torch import load_file

    from trainer.model import build_unet, spatial_temporal_parameters

    model = build_unet("tiny")
    names = {id(p): n for n, p in model.named_parameters()}
    spatial, temporal = spatial_temporal_parameters(model)
    export = runs["out"] / "export"
    before = load_file(export / "vc1-512.safetensors")  # written by the killed launch
    after = load_file(export / "vc2-spatial.safetensors")  # written by the resumed launch
    assert set(before) == set(after) == set(names.values())
    assert all(torch.equal(before[names[id(p)]], after[names[id(p)]]) for p in temporal)
    moved = [not torch.equal(before[names[id(p)]], after[names[id(p)]]) for p in spatial]
    assert sum(moved) > 0.9 * len(moved)
    ema = load_file(export / "vc2-spatial-ema.safetensors")
    assert all(torch.equal(ema[names[id(p)]], after[names[id(p)]]) for p in temporal)
    model.load_state_dict(after, strict=True)  # the export is an inference checkpoint of the U-Net


def test_previews_written_for_every_phase(runs):
    import av

    previews = runs["out"] / "previews"
    for step, phase in ((3, "vc1-256"), (5, "vc1-512"), (8, "vc2-spatial")):
        mp4 = list(previews.glob(f"step{step:08d}-{phase}-*.mp4"))
        gif = list(previews.glob(f"step{step:08d}-{phase}-*.gif"))
        assert len(mp4) == 1 and len(gif) == 1, sorted(os.listdir(previews))
        with av.open(str(mp4[0])) as container:
            frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
        assert len(frames) == 4 and frames[0].shape == (256, 256, 3)
    (line,) = [x for x in runs["resumed"].stdout.splitlines() if x.startswith('{"done"')]
    summary = json.loads(line)
    assert summary["done"] and summary["global_step"] == 8


@pytest.mark.parametrize(("zero_stage", "bf16"), [(1, True), (3, False)])
def test_freeze_is_exact_under_other_zero_stages(tmp_path, trainer_shards, tiny_models, zero_stage, bf16):
    """ZeRO-1 checkpoints omit frozen params and bf16 keeps them in bf16; ZeRO-3 partitions every weight.
    In each case the phase switch keeps temporal weights bit-identical and moves the spatial ones."""
    from safetensors.torch import load_file

    from trainer.model import build_unet, spatial_temporal_parameters

    config = run_config(trainer_shards, tiny_models, tmp_path / "out", steps=(1, 1, 1))
    config["phases"] = [config["phases"][0], config["phases"][2]]
    config["deepspeed"].update(zero_stage=zero_stage, bf16=bf16)
    config["preview"]["at_phase_end"] = False
    proc = launch(write_config(tmp_path / "run.yaml", config))
    assert proc.returncode == 0, tail(proc)
    before = load_file(tmp_path / "out" / "export" / "vc1-256.safetensors")
    after = load_file(tmp_path / "out" / "export" / "vc2-spatial.safetensors")
    model = build_unet("tiny")
    names = {id(p): n for n, p in model.named_parameters()}
    spatial, temporal = spatial_temporal_parameters(model)
    assert set(after) == set(names.values())
    assert all(torch.equal(before[names[id(p)]], after[names[id(p)]]) for p in temporal)
    assert sum(not torch.equal(before[names[id(p)]], after[names[id(p)]]) for p in spatial) > 0.9 * len(
        spatial
    )
