"""Trainer overhead: steps/s of the tiny U-Net under DeepSpeed ZeRO-2 vs a plain PyTorch loop on the same batches.

Both loops take their batches from the same ShardLoader over the same shards (written here with random
arrays unless --shards is given), the same Diffusion loss, AdamW, gradient clipping and seeds. One
process, one rank (gloo), so the ratio measures DeepSpeed's engine overhead, not communication.
Prints steps/s of both, the ratio (target <= 1.2x) and the data-wait fraction of step time (target < 5%).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_trainer.py --steps 30

`--mode lora`: a LoRA phase (`trainable: lora`, peft adapters on the attention projections) against a full
fine-tune of the same U-Net, both under DeepSpeed with the same batches; each loop runs in its own process so
that its peak memory (RSS on CPU, max allocated on CUDA) is its own. Prints steps/s, peak memory and trainable
parameters of both.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_trainer.py --mode lora --steps 10 --unet tiny
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def make_shards(out: str, stage: str, frames: int, down: int) -> None:
    import tests.trainer.conftest as fixtures
    from tests.trainer.conftest import write_shards

    fixtures.FRAMES, fixtures.DOWN = frames, down
    write_shards(out, "webvid", kind="video", stage=stage, num_shards=2, per_shard=16)
    write_shards(out, "laion_coco", kind="image", stage=stage, num_shards=2, per_shard=16)


def loader_for(shards: str, stage: str, down: int, batch: int, workers: int):
    from shards.loader import LoaderConfig, ShardLoader, SourceSpec

    cfg = LoaderConfig(
        sources=[SourceSpec(name=n, urls=[f"{shards}/{n}-{stage}-*.tar"]) for n in ("webvid", "laion_coco")],
        stage=stage,
        video_batch_size=batch,
        image_batch_size=2 * batch,
        shuffle_buffer=8,
        num_workers=workers,
        vae_downsample=down,
        seed=0,
    )
    return ShardLoader(cfg)


def run(kind: str, args) -> dict:
    import torch

    from trainer import engine as eng
    from trainer.config import PhaseConfig
    from trainer.diffusion import Diffusion
    from trainer.model import build_unet

    torch.manual_seed(0)
    module = build_unet(args.unet)
    if kind == "lora":
        from trainer.config import LoraConfig
        from trainer.phases import apply_trainable

        apply_trainable(
            module, "lora", LoraConfig(rank=args.lora_rank, alpha=args.lora_rank, targets=args.lora_targets)
        )
    diffusion = Diffusion()
    from trainer.model import context_dim

    uncond = torch.zeros(1, 77, context_dim(args.unet))
    loader = loader_for(args.shards, args.stage, args.down, args.batch, args.workers)
    batches = iter(loader)
    if kind in ("deepspeed", "lora", "full"):
        from trainer.config import DeepSpeedConfig

        phase = PhaseConfig(
            name="bench",
            stage=args.stage,
            steps=args.steps,
            global_batch_size=args.batch,
            data={"sources": [{"name": "webvid", "urls": ["x.tar"]}], "video_batch_size": args.batch},
            optim={"lr": 1e-4, "grad_clip": 1.0},
            trainable="lora" if kind == "lora" else "all",
        )
        model, _, _ = eng.initialize(
            module,
            phase,
            DeepSpeedConfig(zero_stage=args.zero_stage, bf16="false", extra=json.loads(args.ds_extra)),
            1,
        )
    else:
        model = module
        opt = torch.optim.AdamW(module.parameters(), lr=1e-4)
    wait = compute = 0.0
    timed = 0
    for step in range(args.warmup + args.steps):
        t0 = time.perf_counter()
        batch = next(batches)
        t1 = time.perf_counter()
        g = torch.Generator().manual_seed(step)
        cond = {"context": batch["text_tokens"], "fps": batch["fps"], "uncond_context": uncond}
        loss, _ = diffusion.training_loss(model, batch["latent"], cond, generator=g)
        if kind != "torch":
            model.backward(loss)
            model.step()
        else:
            loss.backward()
            torch.nn.utils.clip_grad_norm_(module.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
        t2 = time.perf_counter()
        if step >= args.warmup:
            wait, compute, timed = wait + (t1 - t0), compute + (t2 - t1), timed + 1
    return {
        "steps_per_s": timed / (wait + compute),
        "data_wait_frac": wait / (wait + compute),
        "trainable_params": sum(p.numel() for p in module.parameters() if p.requires_grad),
        "params": sum(p.numel() for p in module.parameters()),
    }


def peak_memory_mb() -> float:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def child(kind: str, args) -> dict:
    """One loop in a fresh process (its own peak memory): bench_trainer.py --only KIND --shards DIR."""
    cmd = [sys.executable, __file__, "--only", kind, "--shards", args.shards]
    for flag in ("steps", "warmup", "stage", "down", "batch", "workers", "zero_stage", "ds_extra", "unet"):
        cmd += [f"--{flag.replace('_', '-')}", str(getattr(args, flag))]
    cmd += ["--lora-rank", str(args.lora_rank), "--lora-targets", args.lora_targets]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    if proc.returncode != 0:
        raise RuntimeError(f"{kind} loop failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main_lora(args) -> int:
    results = {"full": [], "lora": []}
    for _ in range(args.repeats):
        for kind in ("full", "lora"):
            results[kind].append(child(kind, args))
    best = {k: max(v, key=lambda r: r["steps_per_s"]) for k, v in results.items()}
    peak = {k: min(r["peak_mb"] for r in v) for k, v in results.items()}
    print(
        f"U-Net {args.unet}, {args.stage} shards, latents {args.frames} frames at 1/{args.down}, video batch "
        f"{args.batch}, DeepSpeed ZeRO-{args.zero_stage}, {args.steps} timed steps (best of {args.repeats}), "
        f"LoRA rank {args.lora_rank} on {args.lora_targets} attention"
    )
    for kind in ("full", "lora"):
        r = best[kind]
        print(
            f"  {kind:<5} {r['steps_per_s']:7.2f} steps/s  {1000 / r['steps_per_s']:8.1f} ms/step  "
            f"peak memory {peak[kind]:8.1f} MiB  trainable {r['trainable_params']:,} of {r['params']:,} params"
        )
    print(
        f"  LoRA / full: step time {best['full']['steps_per_s'] / best['lora']['steps_per_s']:.2f}x, "
        f"peak memory {peak['lora'] / peak['full']:.2f}x"
    )
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=30, help="timed steps per loop")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--stage", default="256x256")
    parser.add_argument("--frames", type=int, default=4)
    parser.add_argument("--down", type=int, default=16, help="pixels per latent cell of the generated shards")
    parser.add_argument("--batch", type=int, default=1, help="video batch size (image batches: 2x)")
    parser.add_argument("--workers", type=int, default=1, help="loader worker processes")
    parser.add_argument(
        "--shards", default=None, help="existing shard folder (else random shards in a temp dir)"
    )
    parser.add_argument("--zero-stage", type=int, default=2)
    parser.add_argument("--ds-extra", default="{}", help="JSON merged into the DeepSpeed config")
    parser.add_argument("--repeats", type=int, default=2, help="alternate the two loops this many times")
    parser.add_argument(
        "--mode",
        default="overhead",
        choices=("overhead", "lora"),
        help="overhead: DeepSpeed vs PyTorch; lora: a LoRA phase vs a full fine-tune (both DeepSpeed)",
    )
    parser.add_argument("--unet", default="tiny", help="U-Net preset (build_unet)")
    parser.add_argument("--lora-rank", type=int, default=8)
    parser.add_argument("--lora-targets", default="all", choices=("spatial", "temporal", "all"))
    parser.add_argument("--only", default=None, help=argparse.SUPPRESS)  # one loop, JSON out (--mode lora)
    args = parser.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    if args.mode == "lora" and args.only is None:
        tmp = tempfile.TemporaryDirectory()
        if args.shards is None:
            args.shards = tmp.name
            make_shards(tmp.name, args.stage, args.frames, args.down)
        try:
            return main_lora(args)
        finally:
            tmp.cleanup()

    import torch

    from trainer import engine as eng

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    tmp = tempfile.TemporaryDirectory()
    if args.shards is None:
        args.shards = tmp.name
        make_shards(tmp.name, args.stage, args.frames, args.down)
    eng.init_distributed()
    if args.only is not None:
        result = run(args.only, args)
        print(json.dumps({**result, "peak_mb": peak_memory_mb()}))
        return 0
    results = {"torch": [], "deepspeed": []}
    for _ in range(args.repeats):  # alternate, so machine noise hits both
        for kind in ("torch", "deepspeed"):
            results[kind].append(run(kind, args))
    best = {k: max(v, key=lambda r: r["steps_per_s"]) for k, v in results.items()}
    ratio = best["torch"]["steps_per_s"] / best["deepspeed"]["steps_per_s"]
    print(
        f"tiny U-Net, {args.stage} shards, latents {args.frames} frames at 1/{args.down}, video batch {args.batch}, "
        f"{args.steps} timed steps (best of {args.repeats})"
    )
    for kind in ("torch", "deepspeed"):
        r = best[kind]
        print(
            f"  {kind:<10} {r['steps_per_s']:7.2f} steps/s   data wait {100 * r['data_wait_frac']:5.1f}% of step time"
        )
    print(f"  DeepSpeed ZeRO-2 time per step / plain PyTorch: {ratio:.2f}x (target <= 1.2x)")
    print(
        f"  data-wait fraction under DeepSpeed: {100 * best['deepspeed']['data_wait_frac']:.1f}% (target < 5%)"
    )
    tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
