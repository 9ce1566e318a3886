"""The `latentcrafter generate` command line: arguments -> GenerateConfig -> generate()."""

from __future__ import annotations

import argparse
import sys

from trainer.generate.config import GenerateConfig, read_prompt_file


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="latentcrafter generate",
        description="Sample videos (T2V, or I2V with --image) from latentcrafter/VideoCrafter weights. Writes one "
        "mp4 per prompt (+ GIF), generate.json (settings, seeds, timings, peak memory) and index.html. --frames "
        "beyond the model's trained length runs FIFO-Diffusion (diagonal denoising).",
    )
    a = p.add_argument
    a(
        "--weights",
        required=True,
        help="convert output, trainer export (.safetensors) or VideoCrafter model.ckpt",
    )
    a(
        "--model-dir",
        required=True,
        help="frozen encoders: SD 2.1 layout (vae/, text_encoder/, tokenizer/) or tiny",
    )
    a("--out", required=True, help="output folder")
    a("--prompt", action="append", default=[], help="a prompt (repeatable)")
    a("--prompts", help="file with one prompt per line; blank lines are errors")
    a("--image", help="I2V: conditioning image for every prompt")
    a("--frames", type=int, default=16, help="frames per video (default 16)")
    a("--size", default="512x320", help="WIDTHxHEIGHT (default 512x320)")
    a("--steps", type=int, help="DDIM steps (default 50; FIFO: the model's frame count)")
    a("--cfg", type=float, default=12.0, help="guidance scale (default 12)")
    a("--eta", type=float, default=1.0, help="DDIM eta (default 1.0, as VideoCrafter's scripts)")
    a("--fps", type=float, help="fps condition and video rate (default: the model preset's)")
    a("--seed", type=int, default=123, help="base seed; prompt i is seeded from (seed, i)")
    a("--first-index", type=int, default=0, help="index of the first prompt (reproduce one prompt of a list)")
    a("--batch-size", type=int, default=1, help="prompts per batch")
    a("--dtype", default="fp32", help="fp32 | bf16 | fp16 (the last two on a GPU)")
    a("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    a("--gif", action="store_true", help="also write GIFs")
    a("--decode-chunk", type=int, default=4, help="frames per VAE decode forward (default 4)")
    a("--quiet", action="store_true", help="no progress bars")
    a("--lora", help="LoRA adapter file (a trainer export's PHASE-lora.safetensors), merged into the weights")
    a("--lora-scale", type=float, default=1.0, help="multiplier of the adapter (default 1.0)")
    return p


def config_from_args(args: argparse.Namespace) -> GenerateConfig:
    prompts = list(args.prompt)
    if args.prompts:
        prompts += read_prompt_file(args.prompts)
    return GenerateConfig(
        weights=args.weights,
        model_dir=args.model_dir,
        out=args.out,
        prompts=prompts,
        image=args.image,
        frames=args.frames,
        size=args.size,
        steps=args.steps,
        cfg=args.cfg,
        eta=args.eta,
        fps=args.fps,
        seed=args.seed,
        first_index=args.first_index,
        batch_size=args.batch_size,
        dtype=args.dtype,
        device=args.device,
        gif=args.gif,
        decode_chunk=args.decode_chunk,
        progress=not args.quiet,
        lora=args.lora,
        lora_scale=args.lora_scale,
    )


def main(argv: list[str] | None = None) -> int:
    from trainer.generate.run import generate

    args = parser().parse_args(argv)
    try:
        result = generate(config_from_args(args))
    except (ValueError, OSError) as e:
        print(f"latentcrafter generate: error: {e}", file=sys.stderr)
        return 2
    r = result.report
    mem = r["peak_memory"]
    cuda = (
        f", CUDA peak {mem['cuda_max_allocated_mb']} MiB" if mem["cuda_max_allocated_mb"] is not None else ""
    )
    print(
        f"wrote {len(r['samples'])} videos, generate.json and index.html to {args.out} in "
        f"{r['timings']['total_s']:.1f} s (sampling {r['timings']['sample_s']:.1f} s); "
        f"peak memory: RSS {mem['cpu_max_rss_mb']} MiB{cuda}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
