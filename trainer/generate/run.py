"""generate(config): encode prompts (and image), release the encoders, sample, decode in chunks, write videos and reports."""

from __future__ import annotations

import gc
import json
import os
import re
import resource
import sys
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from tqdm.auto import tqdm

from trainer.generate.config import GenerateConfig, prompt_seed

TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DEFAULT_STEPS = 50
DEFAULT_FPS = 8.0  # when neither --fps nor the weights name one


@dataclass
class GenerateResult:
    """What a run produced (the files are in config.out)."""

    frames: list[np.ndarray]  # per sample uint8 [T,H,W,3]
    report: dict  # generate.json's content
    fifo_timesteps: list[list[int]] = field(default_factory=list)  # per FIFO iteration, per queue frame


def read_image(path: str) -> np.ndarray:
    """uint8 [H,W,3] of an image file; an error naming the file when PIL cannot read it."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            return np.array(im.convert("RGB"), dtype=np.uint8)
    except (UnidentifiedImageError, OSError) as e:
        raise ValueError(f"--image {path}: not an image PIL can read (png, jpg, webp, ...): {e}") from e


def slug(text: str, n: int = 40) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:n].strip("-") or "prompt"


def resolve_device(config: GenerateConfig) -> torch.device:
    device = config.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {config.device}: no CUDA device is visible; use --device cpu")
    if device == "cpu" and config.dtype != "fp32":
        raise ValueError(f"--dtype {config.dtype} needs a GPU; use --dtype fp32 on the CPU")
    return torch.device(device)


def peak_memory(device: torch.device) -> dict:
    """Peak resident memory of this process (getrusage maxrss) and, on CUDA, the allocator's peak."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    rss_mb = rss / 1024 / (1024 if sys.platform == "darwin" else 1)
    out = {"cpu_max_rss_mb": round(rss_mb, 1), "cuda_max_allocated_mb": None}
    if device.type == "cuda":
        out["cuda_max_allocated_mb"] = round(torch.cuda.max_memory_allocated(device) / 2**20, 1)
    return out


def _unet_factor(loaded) -> int:
    mult = (
        loaded.module.unet_params["channel_mult"]
        if loaded.family == "videocrafter"
        else loaded.module.config.channel_mult
    )
    return 2 ** (len(mult) - 1)


def generate(config: GenerateConfig) -> GenerateResult:
    """Run `latentcrafter generate`; see trainer/generate/__init__.py."""
    from encoders.models import FrozenEncoders, ModelsConfig
    from trainer.diffusion import DDIMSampler, decode_to_frames, write_gif, write_mp4
    from trainer.generate.fifo import ddim_sample, fifo_sample, per_sample_noise
    from trainer.generate.gallery import write_gallery
    from trainer.model.loading import load_model

    start = time.perf_counter()
    device = resolve_device(config)
    dtype = TORCH_DTYPES[config.dtype]
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    width, height = config.width_height
    image = read_image(config.image) if config.image else None
    loaded = load_model(config.weights)  # on the CPU until the encoders are gone
    if config.lora:
        from trainer.lora import load_adapter

        load_adapter(loaded.module, config.lora, config.lora_scale)
    if image is not None and not loaded.image_to_video:
        raise ValueError(f"--image given but {config.weights} ({loaded.preset}) is a text-to-video model")
    if image is None and loaded.image_to_video and loaded.family == "videocrafter":
        raise ValueError(f"{config.weights} ({loaded.preset}) is an Image2Video model: pass --image PATH")
    fifo = config.frames > loaded.temporal_length
    queue = loaded.temporal_length
    if fifo and config.steps is not None and config.steps != queue:
        raise ValueError(
            f"--frames {config.frames} is longer than the model's {queue} frames, so FIFO-Diffusion runs with one "
            f"DDIM step per queue frame ({queue}); drop --steps {config.steps} or set it to {queue}"
        )
    steps = queue if fifo else (config.steps or DEFAULT_STEPS)
    fps = float(config.fps or loaded.fps or DEFAULT_FPS)
    if loaded.family == "videocrafter":
        fps = float(round(fps))  # VideoCrafter conditions on integer fps

    enc = FrozenEncoders(
        ModelsConfig(
            model_dir=config.model_dir,
            device=str(device),
            dtype=config.dtype,
            image_tokens=loaded.image_to_video,
            frame_batch_size=config.decode_chunk,
        )
    )
    down = enc.downsample * _unet_factor(loaded)
    if width % down or height % down:
        raise ValueError(f"--size {config.size}: width and height must be multiples of {down} (VAE x U-Net)")
    if enc.text_dim != loaded.context_dim:
        raise ValueError(
            f"--model-dir {config.model_dir}: its text encoder gives {enc.text_dim}-wide tokens but "
            f"{config.weights} ({loaded.preset}) cross-attends to {loaded.context_dim}; use the model's encoders"
        )
    load_s = time.perf_counter() - start

    t0 = time.perf_counter()
    tokens = torch.from_numpy(enc.encode_text(config.prompts)["tokens"]).float()
    empty = torch.from_numpy(enc.encode_text([""])["tokens"]).float()
    image_tokens = null_image = None
    if image is not None:
        image_tokens = torch.from_numpy(enc.encode_images(image[None])["tokens"]).float()
        if loaded.family == "videocrafter":
            null_image = torch.from_numpy(enc.null_image_tokens()).float()  # VideoCrafter's mid-grey uncond
    enc.text_encoder = enc.image_encoder = None  # released: only the VAE is needed from here on
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    encode_s = time.perf_counter() - t0

    model = loaded.module.to(device=device, dtype=dtype)
    sampler = DDIMSampler(loaded.build_diffusion(), steps, config.eta)
    latent_hw = (height // enc.downsample, width // enc.downsample)
    os.makedirs(config.out, exist_ok=True)
    samples, all_frames, batches, record = [], [], [], []
    n = len(config.prompts)
    bar = tqdm(total=n, desc="prompts", disable=not config.progress)
    for lo in range(0, n, config.batch_size):
        idx = list(range(lo, min(lo + config.batch_size, n)))
        b = len(idx)
        seeds = [prompt_seed(config.seed, config.first_index + i) for i in idx]
        gens = [torch.Generator().manual_seed(s) for s in seeds]
        cond = {"context": tokens[idx].to(device), "fps": torch.full((b,), fps, device=device)}
        uncond = {"context": empty.to(device)}
        if image_tokens is not None:
            cond["image_context"] = image_tokens.expand(b, -1, -1).to(device)
            if null_image is not None:
                uncond["image_context"] = null_image.expand(b, -1, -1).to(device)
        t1 = time.perf_counter()
        length = queue if fifo else config.frames
        x_T = per_sample_noise((b, enc.latent_channels, length, *latent_hw), gens).to(device)
        latents = ddim_sample(model, sampler, x_T, cond, uncond, config.cfg, gens, progress=config.progress)
        if fifo:
            latents = fifo_sample(
                model, sampler, latents, config.frames, cond, uncond, config.cfg, gens,
                record=record if lo == 0 else None, progress=config.progress,
            )  # fmt: skip
        t2 = time.perf_counter()
        frames = decode_to_frames(enc.vae, latents, enc.scale_factor, chunk=config.decode_chunk)
        t3 = time.perf_counter()
        batches.append({"prompts": idx, "sample_s": round(t2 - t1, 3), "decode_s": round(t3 - t2, 3)})
        for k, i in enumerate(idx):
            index = config.first_index + i
            stem = f"{index:03d}-{slug(config.prompts[i])}"
            write_mp4(frames[k], os.path.join(config.out, stem + ".mp4"), fps)
            if config.gif:
                write_gif(frames[k], os.path.join(config.out, stem + ".gif"), fps)
            all_frames.append(frames[k])
            samples.append(
                {
                    "index": index,
                    "prompt": config.prompts[i],
                    "seed": seeds[k],
                    "mp4": stem + ".mp4",
                    "gif": stem + ".gif" if config.gif else None,
                    "frames": int(frames[k].shape[0]),
                }
            )
        bar.update(b)
    bar.close()

    memory = peak_memory(device)
    report = {
        "settings": {
            **config.as_dict(),
            "resolved": {"device": str(device), "steps": steps, "fps": fps, "width": width, "height": height},
        },
        "model": {
            "weights": os.path.abspath(config.weights),
            "family": loaded.family,
            "preset": loaded.preset,
            "kind": loaded.kind,
            "diffusion": loaded.diffusion,
            "temporal_length": loaded.temporal_length,
            "image_to_video": loaded.image_to_video,
        },
        "fifo": {"queue_length": queue, "timesteps": sampler.timesteps.flip(0).tolist()} if fifo else None,
        "samples": samples,
        "timings": {
            "load_s": round(load_s, 3),
            "encode_s": round(encode_s, 3),
            "sample_s": round(sum(x["sample_s"] for x in batches), 3),
            "decode_s": round(sum(x["decode_s"] for x in batches), 3),
            "total_s": round(time.perf_counter() - start, 3),
            "batches": batches,
        },
        "peak_memory": memory,
    }
    with open(os.path.join(config.out, "generate.json"), "w") as f:
        json.dump(report, f, indent=2)
    write_gallery(config.out, report)
    return GenerateResult(frames=all_frames, report=report, fifo_timesteps=record)


__all__ = ["GenerateResult", "generate", "peak_memory", "read_image"]
