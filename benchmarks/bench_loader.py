"""Benchmark: ShardLoader throughput vs a bare tar read of the same shards, and vs on-the-fly decode + VAE encode.

Prints samples/s and MB/s for (a) a bare sequential tar read (the limit), (b) the ShardLoader
(shuffle, decode, latent sampling, collate), and (c) DynamiCrafter-style on-the-fly loading of the
same clips (decord decode of an mp4 + resize + diffusers.AutoencoderKL encode) with the tiny VAE and
with a real-size SD VAE (random init). Targets: loader >= 0.8x bare read; loader >= 50x on-the-fly.
Then (d) aspect buckets: the loader over 512x320 shards whose samples fall in the stage's three buckets
(512x320, 320x512, 384x384) with `bucketing: true`, vs the same number of one-size 512x320 samples
without bucketing (`--buckets-only` runs just this part).
Then (e) storage profiles: the same clips and images encoded by the real encode and write stages (tiny
models) once per profile (full, compact, lean): bytes per sample by member kind from the shards' index, the
bound at real size (shards.profiles.bytes_from_shapes, 512x320x16), ShardLoader samples/s as the trainer
reads (sample_latents off, return_latent_std on), and samples/s with the frozen encoders run on each batch
as the trainer does for lean (trainer.conditioning.OnTheFlyEncoders, CPU; `--profiles-only` runs just this).

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_loader.py --help
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_loader.py --profiles-only --profile full,compact,lean
"""

from __future__ import annotations

import argparse
import glob
import os
import sys
import tarfile
import tempfile
import time

import numpy as np
import torch
from bench_loader_profiles import profile_comparison  # noqa: E402  (part (e), its own file)
from rich.console import Console
from rich.progress import track
from rich.table import Table

from shards.config import LoaderConfig, SourceSpec
from shards.format import ShardWriter, shard_stem
from shards.loader import ShardLoader


def make_vae(kind: str):
    """diffusers.AutoencoderKL, random init: the tiny test config or the SD 2.1 size."""
    from diffusers import AutoencoderKL

    from encoders.tiny import SD21_VAE_CONFIG, TINY_VAE_CONFIG

    cfg = TINY_VAE_CONFIG if kind == "tiny" else SD21_VAE_CONFIG
    torch.manual_seed(0)
    return AutoencoderKL(**cfg).eval()


def write_mp4s(out_dir: str, n: int, frames: int, size=(320, 256), fps: int = 24) -> list[str]:
    """n real mp4s of >= `frames` frames: pipelines.tools.sample_data's WebVid-like clips, else H.264 written here."""
    try:
        from decord import VideoReader

        from pipelines.tools.sample_data import generate

        generate(os.path.join(out_dir, "sample_data"), seed=0)
        usable = []
        for path in sorted(glob.glob(os.path.join(out_dir, "sample_data", "**", "*.mp4"), recursive=True)):
            try:  # the sample data holds deliberately broken and too-short files: keep the good ones
                if len(VideoReader(path)) >= frames:
                    usable.append(path)
            except Exception:
                continue
        if len(usable) >= n:
            return usable[:n]
    except ImportError:
        pass
    import av

    os.makedirs(out_dir, exist_ok=True)

    paths = []
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w]
    for i in range(n):
        path = os.path.join(out_dir, f"clip{i:03d}.mp4")
        with av.open(path, "w") as container:
            stream = container.add_stream("libx264", rate=fps)
            stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
            for t in range(frames):
                img = np.stack(
                    [(xx + 4 * t + 30 * i) % 256, (yy + 2 * t) % 256, (xx + yy + i * 50) % 256], -1
                )
                for packet in stream.encode(av.VideoFrame.from_ndarray(img.astype(np.uint8), format="rgb24")):
                    container.mux(packet)
            for packet in stream.encode():
                container.mux(packet)
        paths.append(path)
    return paths


def on_the_fly(paths, vae, *, frames: int, stride: int, size: int, limit: int):
    """DynamiCrafter-style: decord decode (resized) -> [-1,1] tensor -> vae.encode per clip. Returns (clips/s, latents)."""
    from decord import VideoReader, cpu

    latents = []
    start = time.perf_counter()
    for path in paths[:limit]:
        vr = VideoReader(path, ctx=cpu(0), width=size, height=size)
        step = max(1, min(stride, len(vr) // frames))  # short clips: smaller stride, then wrap around
        idx = [(i * step) % len(vr) for i in range(frames)]
        x = torch.from_numpy(vr.get_batch(idx).asnumpy()).permute(0, 3, 1, 2).float() / 127.5 - 1.0
        with torch.no_grad():
            dist = vae.encode(x).latent_dist
        latents.append((dist.mean.permute(1, 0, 2, 3).numpy(), dist.std.permute(1, 0, 2, 3).numpy()))
    return limit / (time.perf_counter() - start), latents


def write_shards(out_dir: str, latents, *, samples: int, per_shard: int, text_dim: int) -> list[str]:
    """Shards holding the clips' latents (cycled to `samples` samples) with random text tokens."""
    rng = np.random.default_rng(0)
    urls = []
    for s in range(0, samples, per_shard):
        os.makedirs(out_dir, exist_ok=True)
        writer = ShardWriter(out_dir, shard_stem("bench", "256x256", s // per_shard))
        for i in range(s, min(samples, s + per_shard)):
            mean, std = latents[i % len(latents)]
            key = f"bench_{i:06d}"
            meta = dict(
                key=key,
                source="bench",
                origin_key=key,
                kind="video",
                sample_fps=8.0,
                stage="256x256",
                width=256,
                height=256,
                scale_factor=0.18215,
                vae_id="bench-vae",
                text_encoder_id="bench-clip",
            )
            members = {
                "latent.npy": mean.astype(np.float16),
                "latent_std.npy": std.astype(np.float16),
                "txt": f"clip {i}",
                "text_tokens.npy": rng.standard_normal((77, text_dim)).astype(np.float16),
                "text_pooled.npy": rng.standard_normal(text_dim).astype(np.float16),
                "json": meta,
            }
            row = dict(
                source="bench",
                origin_key=key,
                kind="video",
                stage="256x256",
                width=256,
                height=256,
                latent_shape=list(mean.shape),
                scale_factor=0.18215,
                vae_id="bench-vae",
                text_encoder_id="bench-clip",
            )
            writer.write(key, members, row)
        writer.close()
        urls.append(writer.paths.tar)
    return urls


def bare_read(urls) -> tuple[int, int, float]:
    """Read every member of every tar sequentially (1 MiB buffered reads): (samples, bytes, seconds)."""
    start, nbytes, keys = time.perf_counter(), 0, set()
    for url in urls:
        with open(url, "rb", buffering=1 << 20) as f, tarfile.open(fileobj=f, mode="r|") as tar:
            for m in tar:
                nbytes += len(tar.extractfile(m).read())
                keys.add(m.name.partition(".")[0])
    return len(keys), nbytes, time.perf_counter() - start


def loader_read(urls, workers: int, batch: int, sample: bool = True) -> tuple[int, int, float]:
    cfg = LoaderConfig(
        sources=[SourceSpec(name="bench", urls=urls)],
        stage="256x256",
        video_batch_size=batch,
        image_batch_size=batch,
        resampled=False,
        num_workers=workers,
        shuffle_buffer=64,
        sample_latents=sample,
        return_latent_std=not sample,
    )
    loader = ShardLoader(cfg)
    start, n = time.perf_counter(), 0
    for b in loader:
        n += len(b["keys"])
    elapsed = time.perf_counter() - start
    nbytes = sum(os.path.getsize(u) for u in urls)
    return n, nbytes, elapsed


def write_bucket_shards(out_dir: str, *, samples: int, per_shard: int, frames: int, text_dim: int, buckets):
    """512x320 shards of random latents (downsample 8); shard i holds bucket i % len(buckets)."""
    rng = np.random.default_rng(1)
    urls = []
    for s in range(0, samples, per_shard):
        w, h = buckets[(s // per_shard) % len(buckets)]
        shape = [4, frames, h // 8, w // 8]
        writer = ShardWriter(out_dir, shard_stem("bench", "512x320", s // per_shard))
        for i in range(s, min(samples, s + per_shard)):
            key = f"bench_{i:06d}"
            ids = dict(scale_factor=0.18215, vae_id="bench-vae", text_encoder_id="bench-clip")
            meta = dict(key=key, source="bench", origin_key=key, kind="video", sample_fps=8.0, **ids)
            meta.update(stage="512x320", width=w, height=h)
            members = {
                "latent.npy": rng.standard_normal(shape).astype(np.float16),
                "latent_std.npy": rng.random(shape).astype(np.float16),
                "txt": f"clip {i}",
                "text_tokens.npy": rng.standard_normal((77, text_dim)).astype(np.float16),
                "text_pooled.npy": rng.standard_normal(text_dim).astype(np.float16),
                "json": meta,
            }
            row = dict(source="bench", origin_key=key, kind="video", stage="512x320", width=w, height=h)
            writer.write(key, members, dict(row, latent_shape=shape, **ids))
        writer.close()
        urls.append(writer.paths.tar)
    return urls


def bucket_read(urls, workers: int, batch: int, bucketing: bool) -> tuple[int, int, float, set]:
    """One bounded pass: (samples, batches, seconds, latent shapes seen); each batch must have one shape."""
    cfg = LoaderConfig(
        sources=[SourceSpec(name="bench", urls=urls)],
        stage="512x320",
        video_batch_size=batch,
        image_batch_size=batch,
        resampled=False,
        num_workers=workers,
        shuffle_buffer=64,
        sample_latents=False,
        return_latent_std=True,
        bucketing=bucketing,
    )
    start, n, batches, shapes = time.perf_counter(), 0, 0, set()
    for b in ShardLoader(cfg):
        n, batches = n + len(b["keys"]), batches + 1
        shapes.add(tuple(b["latent"].shape[1:]))
    return n, batches, time.perf_counter() - start, shapes


def bucket_comparison(tmp: str, args, console: Console) -> None:
    """(d): loader throughput with aspect buckets vs one-size shards without, same sample count."""
    buckets = [(512, 320), (320, 512), (384, 384)]
    kw = dict(
        samples=args.samples, per_shard=args.per_shard, frames=args.bucket_frames, text_dim=args.text_dim
    )
    mixed = write_bucket_shards(os.path.join(tmp, "bucketed"), buckets=buckets, **kw)
    plain = write_bucket_shards(os.path.join(tmp, "plain"), buckets=buckets[:1], **kw)
    rows = []
    for label, urls, on in (
        ("one size, bucketing off", plain, False),
        ("3 buckets, bucketing on", mixed, True),
    ):
        bucket_read(urls, args.workers, args.batch, on)  # warm the page cache
        runs = [bucket_read(urls, args.workers, args.batch, on) for _ in track(range(args.repeats), label)]
        rows.append((label, min(runs, key=lambda r: r[2]), sum(os.path.getsize(u) for u in urls)))
    table = Table(
        title=f"aspect buckets: stage 512x320, {args.bucket_frames} frames, batch {args.batch} (pixel budget), "
        f"{args.samples} samples, workers={args.workers}"
    )
    for col in ("loader", "samples/s", "batches/s", "MB/s", "latent shapes", "ratio"):
        table.add_column(col)
    base = rows[0][1][0] / rows[0][1][2]
    for label, (n, batches, secs, shapes), nbytes in rows:
        table.add_row(
            label,
            f"{n / secs:.1f}",
            f"{batches / secs:.1f}",
            f"{nbytes / secs / 1e6:.1f}",
            str(len(shapes)),
            f"{n / secs / base:.2f}",
        )
    console.print(table)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--samples", type=int, default=256, help="samples in the shards")
    p.add_argument("--per-shard", type=int, default=64)
    p.add_argument("--clips", type=int, default=8, help="mp4 clips encoded on the fly (tiny VAE)")
    p.add_argument("--sd-clips", type=int, default=1, help="clips encoded with the SD-size VAE (slow on CPU)")
    p.add_argument("--frames", type=int, default=16)
    p.add_argument("--stride", type=int, default=2)
    p.add_argument("--text-dim", type=int, default=1024)
    p.add_argument("--workers", type=int, default=0, help="ShardLoader num_workers")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--repeats", type=int, default=3, help="timed passes; the best is reported")
    p.add_argument("--bucket-frames", type=int, default=8, help="frames of the aspect-bucket comparison")
    p.add_argument("--buckets-only", action="store_true", help="run only the aspect-bucket comparison")
    p.add_argument(
        "--profile",
        default="full,compact,lean",
        help="storage profiles of the profile comparison (comma list)",
    )
    p.add_argument("--profiles-only", action="store_true", help="run only the storage-profile comparison")
    p.add_argument("--profile-videos", type=int, default=24, help="clips encoded per profile")
    p.add_argument("--profile-images", type=int, default=24, help="images encoded per profile")
    p.add_argument("--profile-frames", type=int, default=16, help="frames per clip of the profile comparison")
    p.add_argument("--profile-batches", type=int, default=600, help="batches per timed profile pass")
    args = p.parse_args(argv)
    console = Console()
    console.print(
        f"torch threads {torch.get_num_threads()}, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}"
    )
    if args.buckets_only:
        with tempfile.TemporaryDirectory() as tmp:
            bucket_comparison(tmp, args, console)
        return 0
    if args.profiles_only:
        with tempfile.TemporaryDirectory() as tmp:
            profile_comparison(tmp, args, console)
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        mp4s = write_mp4s(os.path.join(tmp, "mp4"), args.clips, args.frames * args.stride + 8)
        tiny = make_vae("tiny")
        on_the_fly(mp4s, tiny, frames=args.frames, stride=args.stride, size=256, limit=1)  # warm-up
        tiny_rate, latents = on_the_fly(
            mp4s, tiny, frames=args.frames, stride=args.stride, size=256, limit=len(mp4s)
        )
        sd_rate = None
        if args.sd_clips > 0:
            sd = make_vae("sd")
            sd_rate, _ = on_the_fly(
                mp4s, sd, frames=args.frames, stride=args.stride, size=256, limit=args.sd_clips
            )
            del sd
        urls = write_shards(
            os.path.join(tmp, "shards"),
            latents,
            samples=args.samples,
            per_shard=args.per_shard,
            text_dim=args.text_dim,
        )
        bare_read(urls)  # warm the page cache for both sides
        bare = min(
            (bare_read(urls) for _ in track(range(args.repeats), description="bare tar read")),
            key=lambda r: r[2],
        )
        timed = {}
        for sample in (True, False):
            label = f"loader sample_latents={sample}"
            runs = [
                loader_read(urls, args.workers, args.batch, sample) for _ in track(range(args.repeats), label)
            ]
            timed[sample] = min(runs, key=lambda r: r[2])
        ours = timed[True]
    table = Table(
        title=f"latent {list(latents[0][0].shape)}, text [77,{args.text_dim}], {args.samples} samples"
    )
    for col in ("reader", "samples/s", "MB/s", "ratio"):
        table.add_column(col)
    b_rate, l_rate = bare[0] / bare[2], ours[0] / ours[2]
    table.add_row("bare tar read", f"{b_rate:.1f}", f"{bare[1] / bare[2] / 1e6:.1f}", "1.00 (limit)")
    table.add_row(
        f"ShardLoader (workers={args.workers})",
        f"{l_rate:.1f}",
        f"{ours[1] / ours[2] / 1e6:.1f}",
        f"{l_rate / b_rate:.2f} of bare (target >= 0.8)",
    )
    mean_only = timed[False]
    table.add_row(
        f"ShardLoader, mean only / return_latent_std (workers={args.workers})",
        f"{mean_only[0] / mean_only[2]:.1f}",
        f"{mean_only[1] / mean_only[2] / 1e6:.1f}",
        f"{mean_only[0] / mean_only[2] / b_rate:.2f} of bare",
    )
    table.add_row(
        "on the fly, tiny VAE", f"{tiny_rate:.2f}", "-", f"loader is {l_rate / tiny_rate:.0f}x (target >= 50)"
    )
    if sd_rate:
        table.add_row(
            "on the fly, SD-size VAE",
            f"{sd_rate:.3f}",
            "-",
            f"loader is {l_rate / sd_rate:.0f}x (target >= 50)",
        )
    console.print(table)
    with tempfile.TemporaryDirectory() as tmp:
        bucket_comparison(tmp, args, console)
    with tempfile.TemporaryDirectory() as tmp:
        profile_comparison(tmp, args, console)
    return 0


if __name__ == "__main__":
    sys.exit(main())
