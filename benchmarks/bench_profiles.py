"""Trainer step time per storage profile (full, compact, lean), split into data wait, on-the-fly encoding and model.

The same clips and images are encoded once per profile by the real encode and write stages (tiny models, as
benchmarks/bench_loader.py --profiles-only does). One process trains the vc1-i2v-tiny Image2Video U-Net (text
and image cross-attention) with a plain torch AdamW for --steps optimizer steps per profile, its batches from
a ShardLoader of that profile's shards as the trainer reads them (sample_latents off, return_latent_std on),
its conditioning built by trainer.phases.PhaseRunner.cond: stored tokens for full and compact; for lean the
frozen text and image encoders (trainer.conditioning.OnTheFlyEncoders, CPU) run on each batch's captions and
conditioning frames. Every profile starts from the same weights and sees the same batches (checked). Prints
the median step time per profile and batch kind, its data-wait / encode / model parts, and lean / full.

Then the real-size encoder cost that lean adds per sample, on CPU fp32: SD 2.1's text encoder (OpenCLIP-H
text tower as diffusers stores it: 23 of its 24 layers, width 1024, 16 heads) for --real-batch captions and
the CLIP ViT-H-14 vision tower (32 layers, width 1280, patch 14, 224 px) for --real-batch frames, random init
(transformers CLIPTextModel / CLIPVisionModelWithProjection built from config), with their FLOPs, set against
the training FLOPs of the real-size U-Net (--unet, default vc1-i2v-512) per 512x320x16 video or 512x320 image
sample, counted on meta tensors.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_profiles.py --steps 16
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

# The real encoders' shapes (SD 2.1's text_encoder/config.json; CLIP ViT-H-14's vision tower)
REAL_TEXT = dict(
    vocab_size=49408,
    hidden_size=1024,
    intermediate_size=4096,
    num_hidden_layers=23,
    num_attention_heads=16,
    max_position_embeddings=77,
    projection_dim=1024,
    hidden_act="gelu",
)
REAL_VISION = dict(
    hidden_size=1280,
    intermediate_size=5120,
    num_hidden_layers=32,
    num_attention_heads=16,
    image_size=224,
    patch_size=14,
    projection_dim=1024,
    hidden_act="gelu",
)


def train_config(model_dir: str, batch: int) -> dict:
    """One Image2Video phase of vc1-i2v-tiny (as tests/trainer/test_profiles.py), batch `batch` per kind."""
    return {
        "name": "bench-profiles",
        "out_dir": "unused",
        "seed": 0,
        "model": {"unet": "vc1-i2v-tiny", "model_dir": model_dir, "init_from_sd": False},
        "deepspeed": {"zero_stage": 2, "bf16": False, "optimizer": "torch_adamw"},
        "phases": [
            {
                "name": "joint",
                "stage": "256x256",
                "steps": 1,
                "global_batch_size": batch,
                "data": {
                    "sources": [{"name": "webvid", "urls": ["unused.tar"]}],
                    "video_batch_size": batch,
                    "image_batch_size": batch,
                },
                "optim": {"lr": 1.0e-4, "warmup_steps": 0},
            }
        ],
        "ema": {"enabled": False},
        "preview": {"every_steps": 0, "at_phase_end": False},
    }


class ProfileRun:
    """One profile's training loop: its own U-Net (the same seeded init for every profile), AdamW and loader."""

    def __init__(self, folder: str, config, text, encoders, batch: int):
        import torch
        from bench_loader_profiles import profile_loader

        from trainer.phases import PhaseRunner, RunState, build_module

        self.module = build_module(config)  # seeded from config.seed: the same weights for every profile
        self.module.train()
        self.opt = torch.optim.AdamW(self.module.parameters(), lr=1e-4)
        self.config, self.phase, self.encoders = config, config.phases[0], encoders
        self.runner = PhaseRunner(  # for its cond(): stored tokens, or the encoders' on captions/frames
            config=config,
            phase=self.phase,
            engine=self.module,
            loader=None,
            state=RunState(),
            rank=0,
            world=1,
            text=text,
            ema=None,
            logger=None,
            preview=None,
            device=torch.device("cpu"),
            ckpt_root="",
            encoders=encoders,
        )
        self.batches = iter(profile_loader(folder, batch, seed=0))

    def step(self, step: int) -> dict:
        """One optimizer step as PhaseRunner.train_step takes it (one micro batch, plain torch): its times."""
        import torch

        from trainer.phases import sample_latent, step_seed

        t0 = time.perf_counter()
        batch = next(self.batches)
        t1 = time.perf_counter()
        seed = step_seed(self.config.seed, self.phase.name, step, 0, 0)
        g = torch.Generator().manual_seed(seed)
        x0 = sample_latent(batch, self.runner.device, seed ^ 0x5A17)
        e0 = self.encoders.seconds
        cond = self.runner.cond(batch)
        encode = self.encoders.seconds - e0
        loss, _ = self.runner.diffusion.training_loss(
            self.module, x0, cond, generator=g, cfg_dropout=self.phase.cfg_dropout
        )
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.module.parameters(), 1.0)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        t2 = time.perf_counter()
        return dict(
            kind=batch["kind"],
            keys=list(batch["keys"]),
            step=t2 - t0,
            wait=t1 - t0,
            encode=encode,
            model=t2 - t1 - encode,
            loss=float(loss.detach()),
        )


def med(records, field: str, kind: str | None = None) -> float:
    vals = [r[field] for r in records if kind is None or r["kind"] == kind]
    return statistics.median(vals) if vals else float("nan")


def clip_flops(layers: int, width: int, ff: int, tokens: int) -> float:
    """Forward FLOPs of a CLIP transformer tower per sequence (matmuls only: QKV/out, MLP, attention)."""
    per_layer = 2 * tokens * (4 * width * width + 2 * width * ff) + 2 * 2 * tokens * tokens * width
    return layers * per_layer


def real_encoder_cost(batch: int, repeats: int) -> dict:
    """Seconds per call of the real-size text and vision towers on `batch` inputs (best of `repeats`)."""
    import torch
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPVisionConfig, CLIPVisionModelWithProjection

    out = {}
    torch.manual_seed(0)
    for name, build, make_input, flops in (
        (
            "text",
            lambda: CLIPTextModel(CLIPTextConfig(**REAL_TEXT)),
            lambda: {"input_ids": torch.randint(0, REAL_TEXT["vocab_size"], (batch, 77))},
            clip_flops(23, 1024, 4096, 77),
        ),
        (
            "vision",
            lambda: CLIPVisionModelWithProjection(CLIPVisionConfig(**REAL_VISION)),
            lambda: {"pixel_values": torch.randn(batch, 3, 224, 224)},
            clip_flops(32, 1280, 5120, 257) + 2 * 256 * 3 * 14 * 14 * 1280,
        ),
    ):
        start = time.perf_counter()
        model = build().eval()
        built = time.perf_counter() - start
        inputs = make_input()
        times = []
        with torch.inference_mode():
            for _ in range(repeats):
                t = time.perf_counter()
                model(**inputs)
                times.append(time.perf_counter() - t)
        params = sum(p.numel() for p in model.parameters())
        out[name] = dict(seconds=min(times), build_s=built, params=params, gflop=flops / 1e9)
        del model
    return out


def unet_flops(preset: str, frames: int, latent_hw=(40, 64)) -> float:
    """Training FLOPs (forward + backward) of one sample of a VideoCrafter preset at `frames` latent frames,
    counted by torch's FlopCounterMode on meta tensors (no memory, no compute): matmuls, convs, attention."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from trainer.model import VideoCrafterModel
    from trainer.model.presets import get_preset

    p = get_preset(preset)
    with torch.device("meta"):
        model = VideoCrafterModel(p.unet, p.image_proj, preset=p.name)
        x = torch.randn(1, 4, frames, *latent_hw)
        t, fps = torch.zeros(1, dtype=torch.long), torch.full((1,), 8.0)
        ctx = torch.randn(1, 77, REAL_TEXT["hidden_size"])
        img = torch.randn(1, 257, REAL_VISION["hidden_size"]) if p.image_proj is not None else None
        with FlopCounterMode(display=False) as counter:
            model(x, t, ctx, fps=fps, image_context=img).float().pow(2).mean().backward()
    return counter.get_total_flops()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--profile", default="full,compact,lean", help="storage profiles (comma list)")
    parser.add_argument("--steps", type=int, default=16, help="timed optimizer steps per profile")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--batch", type=int, default=1, help="video and image batch size")
    parser.add_argument("--videos", type=int, default=24)
    parser.add_argument("--images", type=int, default=24)
    parser.add_argument(
        "--frames", type=int, default=4, help="frames per clip (the tiny U-Net is slow on CPU)"
    )
    parser.add_argument(
        "--real-batch", type=int, default=4, help="captions / frames of the real-size encoders"
    )
    parser.add_argument("--real-repeats", type=int, default=2, help="timed calls of each real-size encoder")
    parser.add_argument(
        "--flush-denormal",
        action="store_true",
        help="torch.set_flush_denormal(True) (CPU subnormal slow paths)",
    )
    parser.add_argument(
        "--unet",
        default="vc1-i2v-512",
        help="real-size preset whose training FLOPs give context ('' to skip)",
    )
    parser.add_argument("--skip-real", action="store_true", help="skip the real-size encoder cost")
    args = parser.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")

    import torch

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    if args.flush_denormal:
        torch.set_flush_denormal(True)
    from bench_loader_profiles import encode_profiles, profile_names

    from encoders.models import write_tiny_models
    from trainer.conditioning import OnTheFlyEncoders
    from trainer.config import config_from_dict
    from trainer.preview import TextConditions

    names = profile_names(args.profile)
    print(f"torch threads {torch.get_num_threads()}, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}")
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = write_tiny_models(os.path.join(tmp, "models"), seed=0)
        start = time.perf_counter()
        folders = encode_profiles(
            os.path.join(tmp, "shards"),
            model_dir,
            names,
            videos=args.videos,
            images=args.images,
            frames=args.frames,
        )
        print(
            f"encoded {args.videos} videos x {args.frames} frames + {args.images} images (256x256, tiny models) "
            f"under {len(names)} profiles in {time.perf_counter() - start:.1f} s"
        )
        config = config_from_dict(train_config(model_dir, args.batch))
        text = TextConditions(config, keep_vae=False)
        encoders = OnTheFlyEncoders(config.model, text=True, image=True, device=torch.device("cpu"))
        runs = {n: ProfileRun(folders[n], config, text, encoders, args.batch) for n in names}
        results = {n: [] for n in names}
        for step in range(args.warmup + args.steps):  # the profiles take turns: machine noise hits all alike
            for n, run in runs.items():
                record = run.step(step)
                if step >= args.warmup:
                    results[n].append(record)
    same = len({tuple(tuple(r["keys"]) for r in recs) for recs in results.values()}) == 1
    print(
        f"\nvc1-i2v-tiny (text + image cross-attention), 256x256 shards, latents [4,{args.frames},32,32], video "
        f"and image batches of {args.batch} alternating, torch AdamW, CPU, {args.steps} timed steps per profile "
        f"after {args.warmup} warm-up (profiles take turns step by step); same batches in every profile: {'yes' if same else 'NO'}"
    )
    header = f"  {'profile':<8} {'kind':<6} {'step ms':>9} {'wait ms':>9} {'encode ms':>10} {'model ms':>9} {'encode %':>9}"
    print("  median per step, by batch kind (all: mean step time over both kinds)")
    print(header)
    for n in names:
        recs = results[n]
        for kind in ("video", "image", None):
            if kind is None:
                vals = {f: statistics.fmean(r[f] for r in recs) for f in ("step", "wait", "encode", "model")}
            else:
                vals = {f: med(recs, f, kind) for f in ("step", "wait", "encode", "model")}
            print(
                f"  {n:<8} {kind or 'all':<6} {1000 * vals['step']:9.1f} {1000 * vals['wait']:9.1f} "
                f"{1000 * vals['encode']:10.1f} {1000 * vals['model']:9.1f} "
                f"{100 * vals['encode'] / vals['step']:8.1f}%"
            )
    if "full" in results:
        for n in names:
            if n == "full":
                continue
            parts = []
            for kind in ("video", "image"):
                parts.append(
                    f"{kind} {med(results[n], 'step', kind) / med(results['full'], 'step', kind):.2f}x"
                )
            mean = statistics.fmean(r["step"] for r in results[n]) / statistics.fmean(
                r["step"] for r in results["full"]
            )
            print(f"  {n} / full step time: {', '.join(parts)}, all {mean:.2f}x")

    if args.skip_real:
        return 0
    cost = real_encoder_cost(args.real_batch, args.real_repeats)
    print(
        f"\nreal-size frozen encoders on CPU fp32, random init, torch threads {torch.get_num_threads()}, batch "
        f"{args.real_batch}, best of {args.real_repeats} (what lean adds per sample: one caption through the "
        "text tower, one 224x224 frame through the vision tower)"
    )
    for name, label in (
        ("text", "SD 2.1 text encoder (OpenCLIP-H text, 23 layers, 1024 wide), 77 tokens"),
        ("vision", "CLIP ViT-H-14 vision tower (32 layers, 1280 wide, patch 14), 224 px, 257 tokens"),
    ):
        c = cost[name]
        per = c["seconds"] / args.real_batch
        print(
            f"  {label}: {c['params'] / 1e6:.0f} M params, {c['gflop']:.1f} GFLOP per sample; "
            f"{c['seconds']:.2f} s per batch of {args.real_batch} = {1000 * per:.0f} ms per sample "
            f"({c['gflop'] / per:.0f} GFLOP/s); built in {c['build_s']:.1f} s"
        )
    total = sum(c["seconds"] for c in cost.values()) / args.real_batch
    gflop = sum(c["gflop"] for c in cost.values())
    print(
        f"  lean's on-the-fly conditioning at real size: {1000 * total:.0f} ms and {gflop:.0f} GFLOP per sample "
        "on this CPU"
    )
    if args.unet:
        video, image = unet_flops(args.unet, 16) / 1e9, unet_flops(args.unet, 1) / 1e9
        print(
            f"  FLOP context: {args.unet} U-Net training step (forward + backward, FlopCounterMode on meta tensors) "
            f"{video:,.0f} GFLOP per 512x320x16 video sample, {image:,.0f} GFLOP per 512x320 image sample; "
            f"lean's encoders add {gflop:.0f} GFLOP = {100 * gflop / video:.1f}% of a video sample's step FLOPs, "
            f"{100 * gflop / image:.1f}% of an image sample's (the encoders run inference only, no backward)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
