"""The trainer when a checkpoint cannot be written (the kernel refuses rank 0's writes, as with a full disk):
the run stops with a message that says so, `latest` still names the last good checkpoint, `--resume` completes."""

from __future__ import annotations

from tests.trainer.conftest import launch, read_metrics, run_config, tail, write_config


def test_a_save_that_cannot_write_keeps_latest_and_resume_completes(tmp_path, trainer_shards, tiny_models):
    out = tmp_path / "out"
    config = run_config(trainer_shards, tiny_models, out, steps=(2, 2, 2), every_ckpt=1)
    config["phases"] = config["phases"][:2]  # phase ends at steps 2 and 4; a checkpoint every step
    config["preview"]["at_phase_end"] = False
    path = write_config(tmp_path / "run.yaml", config)

    # rank 0's files may not grow past 64 KiB during the save at step 3 (the model states are larger)
    failed = launch(path, env_extra={"LATENTCRAFTER_TEST_FSIZE_IN_SAVE": "3:65536"}, timeout=300)
    assert failed.returncode != 0
    logs = failed.stdout + failed.stderr
    assert "CheckpointWriteError: rank 0: saving checkpoint step00000003" in logs, tail(failed)
    assert "'latest' still names step00000002-end-vc1-256" in logs and "rerun with --resume" in logs
    assert (out / "ckpt" / "latest").read_text() == "step00000002-end-vc1-256"
    assert [m["global_step"] for m in read_metrics(out) if "loss" in m] == [1, 2, 3]

    resumed = launch(path, resume=True, timeout=300)
    assert resumed.returncode == 0, tail(resumed)
    assert (out / "ckpt" / "latest").read_text() == "step00000004-end-vc1-512"
    steps = [m["global_step"] for m in read_metrics(out) if "loss" in m]
    assert steps == [1, 2, 3, 3, 4]  # step 3 again after the resume (its save never completed)
    assert not [p for p in (out / "ckpt").iterdir() if p.name.startswith("tmp-")]
