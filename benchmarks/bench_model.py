"""Benchmark the VideoUNet training step: forward+backward time, peak memory, samples/s and MFU (CPU or CUDA)."""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

PEAK_TFLOPS = {"bf16": 989.0, "fp32": 67.0}  # H100 SXM dense peaks (fp32 without TF32: 67)


def _inputs(cfg, batch, frames, latent, device, dtype, image_dim):
    x = torch.randn(batch, cfg.in_channels, frames, latent, latent, device=device, dtype=dtype)
    ts = torch.randint(0, 1000, (batch,), device=device)
    ctx = torch.randn(batch, 77, cfg.context_dim, device=device, dtype=dtype)
    fps = torch.full((batch,), 8.0, device=device)
    img = torch.randn(batch, 257, image_dim, device=device, dtype=dtype) if image_dim else None
    return x, ts, ctx, fps, img


def _step(model, inputs):
    x, ts, ctx, fps, img = inputs
    out = model(x, ts, ctx, fps, image_context=img)
    out.float().square().mean().backward()


def count_flops(args, dtype) -> int:
    """FLOPs of one forward+backward, counted on the meta device (no memory, no compute)."""
    from trainer.model import build_unet, get_config

    cfg = get_config(args.config)
    with torch.device("meta"):
        model = build_unet(cfg, image_cross_attention=args.i2v).to(dtype)
        inputs = _inputs(cfg, args.batch, args.frames, args.size // 8, "meta", dtype, 1280 if args.i2v else 0)
    counter = FlopCounterMode(display=False)
    with counter:
        _step(model, inputs)
    return counter.get_total_flops()


def run_one(args) -> dict:
    from trainer.model import build_unet, get_config

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    device = torch.device(args.device)
    flops = count_flops(args, dtype)
    cfg = get_config(args.config)
    torch.manual_seed(0)
    model = build_unet(cfg, image_cross_attention=args.i2v).to(device=device, dtype=dtype).train()
    if args.grad_checkpointing:
        model.enable_gradient_checkpointing()
    n_params = sum(p.numel() for p in model.parameters())
    inputs = _inputs(cfg, args.batch, args.frames, args.size // 8, device, dtype, 1280 if args.i2v else 0)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(args.warmup):
        _step(model, inputs)
        model.zero_grad(set_to_none=True)
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        _step(model, inputs)
        sync()
        times.append(time.perf_counter() - t0)
        model.zero_grad(set_to_none=True)
    step = sorted(times)[len(times) // 2]
    result = {
        "config": args.config,
        "mode": "i2v" if args.i2v else "t2v",
        "device": args.device,
        "dtype": args.dtype,
        "params_M": round(n_params / 1e6, 1),
        "shape": f"B{args.batch} x {args.frames}f x {args.size}px (latent {args.size // 8})",
        "grad_ckpt": args.grad_checkpointing,
        "step_s": round(step, 4),
        "samples_per_s": round(args.batch / step, 3),
        "tflop_per_step": round(flops / 1e12, 3),
        "achieved_tflops": round(flops / step / 1e12, 3),
        "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
    }
    if device.type == "cuda":
        result["peak_gpu_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        result["mfu_pct"] = round(100 * flops / step / (args.peak_tflops * 1e12), 2)
    return result


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument(
        "--config",
        nargs="+",
        default=["tiny", "vc-512"],
        help="UNet presets to run (each in its own process)",
    )
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--frames", type=int, default=16)
    p.add_argument("--size", type=int, default=256, help="pixel size (latent = size / 8)")
    p.add_argument("--steps", type=int, default=3, help="timed steps (median reported)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument(
        "--i2v", action="store_true", help="with the image projection and decoupled cross-attention"
    )
    p.add_argument("--grad-checkpointing", action="store_true")
    p.add_argument(
        "--peak-tflops", type=float, default=None, help="device peak for MFU (default: H100 dense, by dtype)"
    )
    args = p.parse_args(argv)
    if args.peak_tflops is None:
        args.peak_tflops = PEAK_TFLOPS[args.dtype]
    if len(args.config) > 1:  # one process per config so peak RSS is that config's own
        for name in args.config:
            cmd = [sys.executable, os.path.abspath(__file__), *sys.argv[1:]]
            i = cmd.index("--config") if "--config" in cmd else None
            if i is not None:
                j = i + 1
                while j < len(cmd) and not cmd[j].startswith("--"):
                    j += 1
                del cmd[i:j]
            subprocess.run([*cmd, "--config", name], check=False)
        return
    args.config = args.config[0]
    print(json.dumps(run_one(args)), flush=True)


if __name__ == "__main__":
    main()
