"""DeepSpeed per phase: distributed set-up, the JSON config, the optimizer over trainable params, and the LR schedule."""

from __future__ import annotations

import atexit
import contextlib
import glob
import math
import os
import socket

import torch
from torch import nn

from trainer.config import DeepSpeedConfig, PhaseConfig


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def release_shm_buffers() -> None:
    """Unlink this rank's DeepSpeed CPU allreduce buffer (/dev/shm, ~66 MB), which DeepSpeed leaves behind.

    Every rank mapped the others' buffers when the process group started, so unlinking at exit is safe.
    """
    port, rank = os.environ.get("MASTER_PORT"), os.environ.get("RANK")
    if port is None or rank is None:
        return
    for path in glob.glob(f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_*_{port}_{rank}"):
        with contextlib.suppress(OSError):
            os.unlink(path)


def init_distributed() -> tuple[int, int, int]:
    """(rank, world_size, local_rank). Without a launcher (plain `python trainer/main.py`) a 1-rank group on 127.0.0.1."""
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    if "RANK" not in os.environ:
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_SIZE="1")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if get_accelerator().device_name() != "cpu":
        get_accelerator().set_device(local_rank)
    deepspeed.init_distributed()
    atexit.register(release_shm_buffers)
    import deepspeed.comm as dist

    return dist.get_rank(), dist.get_world_size(), local_rank


def device() -> torch.device:
    from deepspeed.accelerator import get_accelerator

    return torch.device(get_accelerator().current_device_name())


def bf16_enabled(cfg: DeepSpeedConfig) -> bool:
    """`auto`: bf16 on accelerators that support it, off on CPU (fp32 there is exact and faster)."""
    from deepspeed.accelerator import get_accelerator

    if cfg.bf16 == "auto":
        acc = get_accelerator()
        return acc.device_name() != "cpu" and acc.is_bf16_supported()
    return cfg.bf16 == "true"


def lr_lambda(phase: PhaseConfig):
    """Multiplier of the peak lr at optimizer step s: linear warmup, then constant / cosine / linear decay."""
    o = phase.optim
    total = phase.steps

    def f(step: int) -> float:
        if o.warmup_steps and step < o.warmup_steps:
            return (step + 1) / o.warmup_steps
        if o.schedule == "constant":
            return 1.0
        frac = min(1.0, (step - o.warmup_steps) / max(1, total - o.warmup_steps))
        decay = 0.5 * (1 + math.cos(math.pi * frac)) if o.schedule == "cosine" else 1.0 - frac
        return o.min_lr_ratio + (1 - o.min_lr_ratio) * decay

    return f


def deepspeed_json(phase: PhaseConfig, cfg: DeepSpeedConfig, world_size: int) -> dict:
    """The DeepSpeed config of a phase (batch sizes checked: global = micro x accum x world)."""
    accum = phase.resolve_grad_accum(world_size)
    o = phase.optim
    out = {
        "train_batch_size": phase.global_batch_size,
        "train_micro_batch_size_per_gpu": phase.data.video_batch_size,
        "gradient_accumulation_steps": accum,
        "gradient_clipping": o.grad_clip,
        "zero_optimization": {"stage": cfg.zero_stage},
        "bf16": {"enabled": bf16_enabled(cfg)},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if cfg.optimizer == "deepspeed_adam":
        out["optimizer"] = {
            "type": "AdamW",
            "params": {"lr": o.lr, "betas": list(o.betas), "eps": o.eps, "weight_decay": o.weight_decay},
        }
    for key, value in cfg.extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = {**out[key], **value}
        else:
            out[key] = value
    return out


def initialize(module: nn.Module, phase: PhaseConfig, cfg: DeepSpeedConfig, world_size: int):
    """deepspeed.initialize with an optimizer over the trainable (requires_grad) parameters only.

    Freezing must happen before this call: on a live ZeRO engine, flipping requires_grad does not
    stop the optimizer from moving the "frozen" weights.
    """
    import deepspeed

    trainable = [p for p in module.parameters() if p.requires_grad]
    if not trainable:
        raise ValueError(f"phase {phase.name}: no trainable parameters (trainable={phase.trainable})")
    ds_config = deepspeed_json(phase, cfg, world_size)
    o = phase.optim
    optimizer = None
    if cfg.optimizer == "torch_adamw":
        optimizer = torch.optim.AdamW(
            trainable, lr=o.lr, betas=o.betas, eps=o.eps, weight_decay=o.weight_decay
        )

    def scheduler(opt):
        return torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(phase))

    engine, _, _, sched = deepspeed.initialize(
        model=module,
        optimizer=optimizer,
        model_parameters=trainable,
        lr_scheduler=scheduler,
        config=ds_config,
    )
    return engine, sched, ds_config


def destroy(engine) -> None:
    """Release an engine between phases (hooks, buffers)."""
    if hasattr(engine, "destroy"):
        engine.destroy()
