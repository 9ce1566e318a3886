"""Part (e) of bench_loader.py: bytes per sample and ShardLoader samples/s per storage profile, same inputs.

OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_loader.py --profiles-only [--profile full,compact,lean]
"""

from __future__ import annotations

import glob
import os
import time

from rich.console import Console
from rich.progress import track
from rich.table import Table

from pipelines.tools.profile_shards import SOURCES as PROFILE_SOURCES
from pipelines.tools.profile_shards import STAGE as PROFILE_STAGE
from pipelines.tools.profile_shards import encode_profile_shards
from shards.config import LoaderConfig, SourceSpec
from shards.loader import ShardLoader


def profile_names(text: str) -> list[str]:
    """The comma list of --profile, checked against the named profiles (SystemExit naming the unknown)."""
    from shards.profiles import PROFILES

    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in PROFILES]
    if unknown:
        raise SystemExit(f"--profile: unknown {unknown}; choose from {', '.join(PROFILES)}")
    return names


def encode_profiles(out_root: str, model_dir: str, names, *, videos: int, images: int, frames: int) -> dict:
    """{profile: folder}: the same synthetic rows through the real encode stage (tiny models in `model_dir`,
    CPU, batches of 8 rows) and shard sink, once per profile (pipelines.tools.profile_shards)."""
    return {
        n: encode_profile_shards(
            os.path.join(out_root, n), model_dir, n, videos=videos, images=images, frames=frames, batch=8
        )
        for n in names
    }


def profile_loader(folder: str, batch: int, *, seed: int = 0):
    """The trainer's view of a profile's shards: endless, latent mean + std (sample_latents off), 1:1 video
    and image batches."""
    cfg = LoaderConfig(
        sources=[
            SourceSpec(name=s, urls=[f"{folder}/{s}-{PROFILE_STAGE}-*.tar"]) for s, _ in PROFILE_SOURCES
        ],
        stage=PROFILE_STAGE,
        video_batch_size=batch,
        image_batch_size=batch,
        resampled=True,
        num_workers=0,
        shuffle_buffer=16,
        sample_latents=False,
        return_latent_std=True,
        seed=seed,
    )
    return ShardLoader(cfg)


def profile_pass(folder: str, batch: int, batches: int, encoders=None) -> tuple[int, float, float]:
    """`batches` batches from a fresh loader (plus the encoders' text and image tokens of each when given):
    (samples, seconds, of which seconds in the encoders)."""
    loader = profile_loader(folder, batch)
    n, before = 0, encoders.seconds if encoders is not None else 0.0
    start = time.perf_counter()
    for _, b in zip(range(batches), loader):
        n += len(b["keys"])
        if encoders is not None:
            encoders.text_tokens(b)
            encoders.image_tokens(b)
    elapsed = time.perf_counter() - start
    return n, elapsed, (encoders.seconds - before) if encoders is not None else 0.0


def index_bytes(folder: str) -> dict[str, float]:
    """Mean bytes per sample by member kind (the index's bytes_* columns), over every shard in `folder`."""
    import pandas as pd

    df = pd.concat([pd.read_parquet(f) for f in sorted(glob.glob(os.path.join(folder, "*.index.parquet")))])
    cols = ("bytes_latent", "bytes_text_tokens", "bytes_image_tokens", "bytes_image_frame", "bytes_total")
    out = {c: float(df[c].mean()) for c in cols}
    for kind in ("video", "image"):
        out[f"total_{kind}"] = float(df.loc[df["kind"] == kind, "bytes_total"].mean())
    out["samples"] = len(df)
    out["tar_bytes"] = sum(os.path.getsize(t) for t in glob.glob(os.path.join(folder, "*.tar")))
    return out


def cond_frame_cost(side: int, repeats: int = 200) -> str:
    """The decode cost of one real-size cond_frame.jpg (a synthetic clip's first frame at the image encoder's
    input size; the tiny models' frames are 32x32)."""
    from pipelines.tools.sample_media import rng_for, video_frames
    from shards.profiles import decode_cond_frame, encode_cond_frame

    frame = next(iter(video_frames(side, side, 1, 8.0, rng_for("cond", 0)))).copy()
    data = encode_cond_frame(frame)
    decode_cond_frame(data)
    start = time.perf_counter()
    for _ in range(repeats):
        decode_cond_frame(data)
    per = (time.perf_counter() - start) / repeats
    return (
        f"cond_frame.jpg at real size ({side}x{side}, quality 95, 4:4:4): {len(data):,} bytes, decode "
        f"{1e6 * per:.0f} us per sample (= {1 / per:,.0f} samples/s on one core for the frame alone)"
    )


def profile_comparison(tmp: str, args, console: Console) -> None:
    """(e): bytes per sample and loader samples/s per storage profile, same inputs."""
    from types import SimpleNamespace

    from encoders.models import write_tiny_models
    from shards.profiles import PROFILES, REAL_SHAPES, bytes_from_shapes
    from trainer.conditioning import OnTheFlyEncoders

    names = profile_names(args.profile)
    model_dir = write_tiny_models(os.path.join(tmp, "models"), seed=0)
    start = time.perf_counter()
    folders = encode_profiles(
        os.path.join(tmp, "profiles"),
        model_dir,
        names,
        videos=args.profile_videos,
        images=args.profile_images,
        frames=args.profile_frames,
    )
    console.print(
        f"encoded {args.profile_videos} videos x {args.profile_frames} frames + {args.profile_images} images "
        f"(256x256, tiny models) under {len(names)} profiles in {time.perf_counter() - start:.1f} s"
    )
    sizes = {n: index_bytes(folders[n]) for n in names}
    table = Table(
        title=f"bytes per sample by profile: tiny models, {PROFILE_STAGE}, {args.profile_frames} frames "
        "(index bytes_*; text/image include the pooled embedding)"
    )
    for col in ("profile", "latent", "text tokens", "image tokens", "cond frame", "total", "video", "image"):
        table.add_column(col, justify="right" if col != "profile" else "left")
    for n in names:
        b = sizes[n]
        table.add_row(
            n,
            *(
                f"{b[c]:,.0f}"
                for c in (
                    "bytes_latent",
                    "bytes_text_tokens",
                    "bytes_image_tokens",
                    "bytes_image_frame",
                    "bytes_total",
                    "total_video",
                    "total_image",
                )
            ),
        )
    console.print(table)
    real = Table(
        title="bytes per video sample at real size (bytes_from_shapes: SD 2.1 VAE 512x320x16 latent "
        f"{list(REAL_SHAPES['latent'])}, OpenCLIP-H text [77,1024], CLIP ViT-H-14 image [257,1280] or a "
        "224x224 frame bounded by its raw pixels)"
    )
    for col in ("profile", "latent", "text", "image", "other", "total", "MB", "vs full"):
        real.add_column(col, justify="right" if col != "profile" else "left")
    full_total = bytes_from_shapes(PROFILES["full"])["total"]
    for n in names:
        r = bytes_from_shapes(PROFILES[n])
        real.add_row(
            n,
            *(f"{r[k]:,}" for k in ("latent", "text", "image", "other", "total")),
            f"{r['total'] / 1e6:.3f}",
            f"{r['total'] / full_total:.2f}",
        )
    console.print(real)

    if "lean" in names:
        console.print(cond_frame_cost(REAL_SHAPES["cond_frame"][0]))
    encoders = OnTheFlyEncoders(SimpleNamespace(model_dir=model_dir), text=True, image=True, device="cpu")
    rows = {}
    for n in names:
        profile_pass(folders[n], args.batch, 2)  # warm the page cache and imports
        plain = [
            profile_pass(folders[n], args.batch, args.profile_batches)
            for _ in track(range(args.repeats), f"{n}: loader")
        ]
        enc = [
            profile_pass(folders[n], args.batch, args.profile_batches, encoders)
            for _ in track(range(args.repeats), f"{n}: loader + encoders")
        ]
        rows[n] = (min(plain, key=lambda r: r[1]), min(enc, key=lambda r: r[1]))
    table = Table(
        title=f"ShardLoader by profile: batch {args.batch} (video and image batches alternate), "
        f"{args.profile_batches} batches, workers=0, sample_latents=False + return_latent_std, best of "
        f"{args.repeats}; '+ encoders': OnTheFlyEncoders text and image tokens of each batch (tiny models, CPU)"
    )
    for col in ("profile", "samples/s", "MB/s", "+ enc samples/s", "enc share", "vs first", "+ enc vs first"):
        table.add_column(col, justify="right" if col != "profile" else "left")
    base = rows[names[0]][0][0] / rows[names[0]][0][1]
    for n in names:
        (pn, ps, _), (en, es, ee) = rows[n]
        rate = pn / ps
        table.add_row(
            n,
            f"{rate:.1f}",
            f"{rate * sizes[n]['bytes_total'] / 1e6:.1f}",
            f"{en / es:.1f}",
            f"{100 * ee / es:.0f}%",
            f"{rate / base:.2f}",
            f"{(en / es) / base:.2f}",
        )
    console.print(table)
    console.print(
        f"MB/s: samples/s x the index's bytes_total. 'vs first': relative to {names[0]}'s loader-only rate. "
        "'+ enc': the encoders' share of the time; for full and compact they pass the stored tokens through, "
        "for lean they run on every batch (tiny encoders here: benchmarks/bench_profiles.py has the real-size "
        "encoder cost). Profiles: " + "; ".join(f"{n} = {PROFILES[n]}" for n in names)
    )
