"""Atomic checkpoints: DeepSpeed state + trainer state + per-rank loader state + EMA in ckpt/tmp-<tag>, renamed, then `latest`.

Layout of `out_dir/ckpt/`:
    latest                      the tag of the newest complete checkpoint (written last, atomically)
    <tag>/state/...             DeepSpeed save_checkpoint (model, ZeRO optimizer partitions, scheduler)
    <tag>/trainer_state.json    phase index, steps, config fingerprint
    <tag>/loader/rank<R>.json   each rank's ShardLoader.state_dict()
    <tag>/ema.safetensors       the EMA shadow (rank 0)
    <tag>/frozen.safetensors    fp32 values of the params frozen in this phase (rank 0)
A LoRA phase's checkpoints (`trainable_only`) hold only what trains: DeepSpeed's state without the frozen
params (exclude_frozen_parameters), the EMA of the adapters, no frozen.safetensors; trainer_state.json's
"lora" names the base (the phase's start checkpoint or the run's initial weights) that trainer.main rebuilds.
A crash during a save leaves `tmp-<tag>` behind and `latest` pointing at the previous checkpoint;
the next save or resume removes stale tmp dirs. (The ckpt folder must be shared by all nodes.)
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal

import torch

DS_TAG = "state"
TAG_RE = re.compile(r"^step(\d{8})(-end-[A-Za-z0-9_-]+)?$")
FROZEN_FILE = (
    "frozen.safetensors"  # the fp32 values of the phase's frozen params (exact under bf16 and ZeRO-1)
)
KILL_ENV = "LATENTCRAFTER_TEST_KILL_IN_SAVE"  # tests: SIGKILL rank 0 in the middle of the save at this step
# tests: "STEP:BYTES": rank 0's files may grow to BYTES during the save at STEP (RLIMIT_FSIZE: the kernel
# refuses the write, as a full disk would), so the save fails part way
FSIZE_ENV = "LATENTCRAFTER_TEST_FSIZE_IN_SAVE"


class CheckpointWriteError(RuntimeError):
    """A save that could not write its files; `latest` still names the last complete checkpoint."""


@contextlib.contextmanager
def _test_file_size_limit(rank: int, step: int):
    spec = os.environ.get(FSIZE_ENV, "")
    if rank != 0 or not spec or spec.split(":")[0] != str(step):
        yield
        return
    import resource

    old = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (int(spec.split(":")[1]), old[1]))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, old)


def _barrier():
    import deepspeed.comm as dist

    dist.barrier()


def write_atomic(path: str, text: str) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def tag_for(global_step: int, phase_end: str | None = None) -> str:
    return f"step{global_step:08d}" + (f"-end-{phase_end}" if phase_end else "")


def latest_tag(ckpt_root: str) -> str | None:
    path = os.path.join(ckpt_root, "latest")
    if not os.path.exists(path):
        return None
    tag = open(path).read().strip()
    if not TAG_RE.match(tag) or not os.path.isdir(os.path.join(ckpt_root, tag)):
        raise FileNotFoundError(f"{path} names {tag!r}, which is not a checkpoint folder in {ckpt_root}")
    return tag


def save(
    engine,
    ckpt_root: str,
    tag: str,
    *,
    rank: int,
    trainer_state: dict,
    loader_state: dict,
    ema=None,
    frozen: dict[str, torch.Tensor] | None = None,
    keep_last: int = 3,
    trainable_only: bool = False,
) -> str:
    """Collective: every rank calls it. Returns the final checkpoint folder.

    A write that fails (disk full, quota, I/O error) raises CheckpointWriteError naming the file system error
    and the checkpoint `latest` still names; the launcher then stops the other ranks, and `--resume` after
    freeing space continues from that checkpoint.
    """
    try:
        with _test_file_size_limit(rank, trainer_state["global_step"]):
            return _save(
                engine,
                ckpt_root,
                tag,
                rank,
                trainer_state,
                loader_state,
                ema,
                frozen,
                keep_last,
                trainable_only,
            )
    except (OSError, RuntimeError) as exc:  # torch.save reports a refused write as RuntimeError (iostream)
        if isinstance(exc, CheckpointWriteError):
            raise
        last = latest_tag(ckpt_root) if os.path.exists(os.path.join(ckpt_root, "latest")) else None
        raise CheckpointWriteError(
            f"rank {rank}: saving checkpoint {tag} into {ckpt_root} failed ({exc}); "
            + (f"'latest' still names {last}" if last else "no earlier checkpoint exists")
            + ". If the disk is full or the file system refused the write, free space, then rerun with --resume."
        ) from exc


def _save(
    engine, ckpt_root, tag, rank, trainer_state, loader_state, ema, frozen, keep_last, trainable_only=False
) -> str:
    tmp = os.path.join(ckpt_root, f"tmp-{tag}")
    final = os.path.join(ckpt_root, tag)
    if rank == 0:
        os.makedirs(ckpt_root, exist_ok=True)
        for name in os.listdir(ckpt_root):
            if name.startswith("tmp-"):
                shutil.rmtree(os.path.join(ckpt_root, name), ignore_errors=True)
    _barrier()
    engine.save_checkpoint(tmp, tag=DS_TAG, save_latest=False, exclude_frozen_parameters=trainable_only)
    os.makedirs(os.path.join(tmp, "loader"), exist_ok=True)
    write_atomic(os.path.join(tmp, "loader", f"rank{rank}.json"), json.dumps(loader_state))
    if rank == 0:
        if os.environ.get(KILL_ENV) == str(trainer_state["global_step"]):
            os.kill(
                os.getpid(), signal.SIGKILL
            )  # a crash after DeepSpeed wrote, before the checkpoint is complete
        if ema is not None:
            from safetensors.torch import save_file

            shadow = ema.shadow
            if trainable_only:
                live = {n for n, p in engine.module.named_parameters() if p.requires_grad}
                shadow = {k: v for k, v in shadow.items() if k in live}
            save_file(shadow, os.path.join(tmp, "ema.safetensors"), metadata={"updates": str(ema.updates)})
        if frozen:
            from safetensors.torch import save_file

            save_file(frozen, os.path.join(tmp, FROZEN_FILE))
        write_atomic(os.path.join(tmp, "trainer_state.json"), json.dumps(trainer_state, indent=1))
    _barrier()
    if rank == 0:
        if os.path.exists(final):
            shutil.rmtree(final)
        os.replace(tmp, final)
        write_atomic(os.path.join(ckpt_root, "latest"), tag)
        prune(ckpt_root, keep_last, keep=tag)
    _barrier()
    return final


def prune(ckpt_root: str, keep_last: int, *, keep: str) -> list[str]:
    """Delete all but the newest `keep_last` periodic checkpoints; phase-end ones and `keep` stay."""
    periodic = sorted(n for n in os.listdir(ckpt_root) if TAG_RE.match(n) and "-end-" not in n and n != keep)
    doomed = periodic[: max(0, len(periodic) - max(0, keep_last - 1))]
    for name in doomed:
        shutil.rmtree(os.path.join(ckpt_root, name), ignore_errors=True)
    return doomed


def read_trainer_state(ckpt_dir: str) -> dict:
    with open(os.path.join(ckpt_dir, "trainer_state.json")) as f:
        return json.load(f)


def read_loader_state(ckpt_dir: str, rank: int) -> dict | None:
    path = os.path.join(ckpt_dir, "loader", f"rank{rank}.json")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def load_ema(ckpt_dir: str, ema) -> bool:
    path = os.path.join(ckpt_dir, "ema.safetensors")
    if ema is None or not os.path.exists(path):
        return False
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(path, "pt") as f:
        updates = int((f.metadata() or {}).get("updates", 0))
    ema.load_state_dict({"updates": updates, "shadow": load_file(path)})
    return True


def load_engine(engine, ckpt_dir: str, *, trainable_only: bool = False) -> None:
    """Model, optimizer and scheduler into an engine built like the one that saved (same trainable set).

    trainable_only: a checkpoint without the frozen params (a LoRA phase's): the module keeps its own
    frozen values (the rebuilt base) and takes every trainable one from the checkpoint."""
    path, _ = engine.load_checkpoint(
        ckpt_dir,
        tag=DS_TAG,
        load_module_strict=not trainable_only,
        load_optimizer_states=True,
        load_lr_scheduler_states=True,
    )
    if path is None:
        raise FileNotFoundError(f"{ckpt_dir}/{DS_TAG}: DeepSpeed found no checkpoint to load")


def fp32_state_dict(ckpt_dir: str) -> dict[str, torch.Tensor]:
    """Consolidated fp32 weights of a ZeRO checkpoint (any stage), frozen params included, on CPU."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    state = get_fp32_state_dict_from_zero_checkpoint(ckpt_dir, tag=DS_TAG)
    state = {k: v.detach().float().contiguous() for k, v in state.items()}
    state.update(read_frozen(ckpt_dir))  # ZeRO-1 omits frozen params; under bf16 DeepSpeed keeps them in bf16
    return state


def read_frozen(ckpt_dir: str) -> dict[str, torch.Tensor]:
    path = os.path.join(ckpt_dir, FROZEN_FILE)
    if not os.path.exists(path):
        return {}
    from safetensors.torch import load_file

    return load_file(path)


def export_safetensors(state: dict[str, torch.Tensor], path: str, metadata: dict | None = None) -> str:
    """Write an inference export atomically (temp + rename), streaming tensor by tensor."""
    from trainer.safetensors_io import save_safetensors

    os.makedirs(os.path.dirname(path), exist_ok=True)
    save_safetensors(state, path, {k: str(v) for k, v in (metadata or {}).items()})
    return path
