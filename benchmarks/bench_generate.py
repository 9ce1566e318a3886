"""`latentcrafter generate` at VideoCrafter's evaluation setting: seconds and peak memory.

    .venv/bin/python benchmarks/bench_generate.py [--prompts 4] [--size 512x320] [--frames 16] [--steps 50]
        [--cfg 12] [--batch-size 1] [--weights FILE --model-dir DIR] [--device auto] [--dtype fp32]

Defaults are VideoCrafter's evaluation setting (4 prompts of prompts/test_prompts.txt, 512x320, 16 frames,
50 DDIM steps, cfg 12, eta 1). Without --weights it writes the tiny encoder set and a seeded random
`vc2-t2v-tiny` export into a temp folder and times those (CPU-sized); with --weights (e.g. a `latentcrafter
convert` output of VideoCrafter2's model.ckpt, preset vc2-t2v-512) and --model-dir it times the real model.
Prints the load, encode, sampling and decode seconds, seconds per video and per DDIM step, and peak memory
(process max RSS; on CUDA the allocator's peak).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

PROMPTS = [  # the first four of VideoCrafter's prompts/test_prompts.txt
    "A tiger walks in the forest, photorealistic, 4k, high definition",
    "an elephant is walking under the sea, 4K, high definition",
    "an astronaut riding a horse in outer space",
    "a monkey is playing a piano",
]


def tiny_weights(root: Path) -> tuple[str, str]:
    import torch
    from safetensors.torch import save_file

    from encoders.models import write_tiny_models
    from trainer.model import VideoCrafterModel, get_preset
    from trainer.model.pretrained import model_metadata

    write_tiny_models(str(root / "models"), seed=0)
    p = get_preset("vc2-t2v-tiny")
    torch.manual_seed(0)
    model = VideoCrafterModel(p.unet, None, preset=p.name)
    path = root / "vc2-t2v-tiny.safetensors"
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(path), metadata=model_metadata(model, p.diffusion, source="bench"))
    return str(path), str(root / "models")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--prompts", type=int, default=4, help="number of prompts (cycled from VideoCrafter's list)"
    )
    ap.add_argument("--size", default="512x320")
    ap.add_argument("--frames", type=int, default=16)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--cfg", type=float, default=12.0)
    ap.add_argument("--batch-size", type=int, default=1)
    ap.add_argument("--weights", help="weights to time (default: a random vc2-t2v-tiny)")
    ap.add_argument("--model-dir", help="encoders for --weights")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="fp32")
    args = ap.parse_args(argv)
    if bool(args.weights) != bool(args.model_dir):
        ap.error("--weights and --model-dir go together")

    from trainer.generate import GenerateConfig, generate

    with tempfile.TemporaryDirectory(prefix="bench_generate_") as tmp:
        root = Path(tmp)
        weights, model_dir = (args.weights, args.model_dir) if args.weights else tiny_weights(root)
        config = GenerateConfig(
            weights=weights,
            model_dir=model_dir,
            out=str(root / "out"),
            prompts=[PROMPTS[i % len(PROMPTS)] for i in range(args.prompts)],
            frames=args.frames,
            size=args.size,
            steps=args.steps,
            cfg=args.cfg,
            batch_size=args.batch_size,
            device=args.device,
            dtype=args.dtype,
            progress=False,
        )
        r = generate(config).report
    t, mem, m = r["timings"], r["peak_memory"], r["model"]
    n, steps = len(r["samples"]), r["settings"]["resolved"]["steps"]
    print(
        f"{m['preset']} ({m['kind']}), {n} prompts, {args.size}, {args.frames} frames, {steps} DDIM steps, "
        f"cfg {args.cfg}, batch {args.batch_size}, {args.dtype} on {r['settings']['resolved']['device']}"
    )
    print(
        f"load {t['load_s']:.2f} s  encode {t['encode_s']:.2f} s  sample {t['sample_s']:.2f} s  "
        f"decode {t['decode_s']:.2f} s  total {t['total_s']:.2f} s"
    )
    print(
        f"per video {t['sample_s'] / n + t['decode_s'] / n:.2f} s, per DDIM step "
        f"{t['sample_s'] / (n * steps) * 1000:.1f} ms/prompt"
    )
    cuda = mem["cuda_max_allocated_mb"]
    print(
        f"peak memory: max RSS {mem['cpu_max_rss_mb']:.0f} MiB" + (f", CUDA {cuda:.0f} MiB" if cuda else "")
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
