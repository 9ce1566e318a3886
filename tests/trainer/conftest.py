"""Trainer fixtures: small latent shards (ShardWriter + random arrays), a run config over them, and the deepspeed launcher."""

from __future__ import annotations

import contextlib
import glob
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from shards.format import parse_resolution
from tests.shards.conftest import write_shard

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
TEXT_DIM = 32  # the tiny text encoder's width (= tiny U-Net context_dim)
DOWN = 16  # vae_downsample of the test shards: 256x256 -> 16x16 latents, 512x320 -> 32x20 (fast on CPU)
FRAMES = 4


def write_shards(out_dir, source, *, kind, stage, num_shards=2, per_shard=6, seed=0):
    """Finished shards of random samples in the real format (latent + std, tokens, json, index parquet)."""
    width, height = parse_resolution(stage)
    for shard in range(num_shards):
        write_shard(
            out_dir,
            source,
            shard,
            per_shard,
            kind=kind,
            stage=stage,
            frames=FRAMES,
            image_tokens=False,
            latent_hw=(height // DOWN, width // DOWN),
            text_dim=TEXT_DIM,
            std=(0.05, 0.1),
            key_prefix=f"{source}_{stage.replace('x', '_')}",
            rng=np.random.default_rng([seed, shard, len(source), width]),
            sample_fps=8.0,
            scale_factor=0.18215,
            vae_id="tiny-vae",
            text_encoder_id="tiny-text",
        )


@pytest.fixture(scope="session")
def trainer_shards(tmp_path_factory):
    """webvid + laion_coco at 256x256 and 512x320, jdb at 512x320 (the demo's layout, smaller latents)."""
    out = tmp_path_factory.mktemp("trainer_shards")
    for stage in ("256x256", "512x320"):
        write_shards(out, "webvid", kind="video", stage=stage)
        write_shards(out, "laion_coco", kind="image", stage=stage)
    write_shards(out, "jdb", kind="image", stage="512x320")
    return out


def run_config(shards, models, out_dir, *, real=None, every_ckpt=2, steps=(3, 2, 2)) -> dict:
    """Three phases like demo.yaml (joint 256, joint 512, VC2 spatial-only on JDB), ZeRO-2, fp32, torch AdamW.

    `real`: a folder of encode-job shards at 256x256 (webvid, laion_coco, jdb); when given, the first
    and last phases read them (the last then at 256x256) and only the 512x320 phase reads `shards`.
    """

    def data(*sources, folder=shards, down=DOWN):
        return {
            "sources": [
                {"name": n, "urls": [f"{folder}/{n}-{{stage}}-*.tar"], "weight": 1.0} for n in sources
            ],
            "video_batch_size": 1,
            "image_batch_size": 2,
            "shuffle_buffer": 4,
            "num_workers": 0,
            "vae_downsample": down,
            "on_bad_sample": "raise",
        }

    real_kw = {"folder": real, "down": 8} if real else {}

    optim = {"lr": 1.0e-3, "warmup_steps": 1}
    return {
        "name": "test",
        "out_dir": str(out_dir),
        "seed": 0,
        "model": {"unet": "tiny", "model_dir": str(models), "init_from_sd": True},
        "deepspeed": {"zero_stage": 2, "bf16": False, "optimizer": "torch_adamw"},
        "phases": [
            {
                "name": "vc1-256",
                "stage": "256x256",
                "steps": steps[0],
                "global_batch_size": 2,
                "data": data("webvid", "laion_coco", **real_kw),
                "optim": optim,
            },
            {
                "name": "vc1-512",
                "stage": "512x320",
                "steps": steps[1],
                "global_batch_size": 2,
                "data": data("webvid", "laion_coco"),
                "optim": optim,
            },
            {
                "name": "vc2-spatial",
                "stage": "256x256" if real else "512x320",
                "steps": steps[2],
                "global_batch_size": 2,
                "trainable": "spatial",
                "data": data("jdb", **real_kw),
                "optim": optim,
            },
        ],
        "checkpoint": {"every_steps": every_ckpt, "keep_last": 2},
        "ema": {"enabled": True, "decay": 0.99},
        "logging": {"every_steps": 1, "progress": False},
        "preview": {
            "every_steps": 0,
            "at_phase_end": True,
            "prompts": ["a dog runs along the beach"],
            "num_frames": 4,
            "fps": 4.0,
            "ddim_steps": 2,
            "guidance_scale": 2.0,
            "resolution": "256x256",
        },
    }


def write_config(path, config: dict) -> str:
    Path(path).write_text(yaml.safe_dump(config, sort_keys=False))
    return str(path)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(config_path, *, ranks=2, resume=False, env_extra=None, timeout=300) -> subprocess.CompletedProcess:
    """The real deepspeed launcher over `ranks` CPU ranks (gloo), OMP_NUM_THREADS=1."""
    env = dict(
        os.environ,
        OMP_NUM_THREADS="1",
        TOKENIZERS_PARALLELISM="false",
        HF_HUB_OFFLINE="1",
        PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        **(env_extra or {}),
    )
    port = free_port()
    cmd = [
        str(BIN / "deepspeed"),
        "--num_gpus",
        str(ranks),
        "--master_port",
        str(port),
        "trainer/main.py",
        "--config",
        str(config_path),
    ]
    if resume:
        cmd.append("--resume")
    try:
        return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    finally:  # a SIGKILLed rank cannot release its DeepSpeed /dev/shm buffer: do it for every launch
        for path in glob.glob(f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_*_{port}_*"):
            with contextlib.suppress(OSError):
                os.unlink(path)


def read_metrics(out_dir) -> list[dict]:
    path = Path(out_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def tail(proc) -> str:
    return (proc.stdout[-4000:] + "\n--- stderr\n" + proc.stderr[-8000:]) if proc else ""
