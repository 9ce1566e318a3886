"""The `latentcrafter` console script: one subcommand per tool, each module owning its own arguments."""

from __future__ import annotations

import importlib
import sys

# subcommand -> (module with main(argv) -> int, one-line help)
COMMANDS = {
    "sample-data": (
        "pipelines.tools.sample_data",
        "write the three datasets, miniature, in their real formats",
    ),
    "serve-sample": ("pipelines.tools.serve", "serve a sample-data folder over HTTP on 127.0.0.1"),
    "tiny-models": (
        "encoders.models",
        "write tiny random models laid out like SD 2.1 + CLIP ViT-H-14 folders",
    ),
    "encode": ("pipelines.encode_latents", "run the Ray encode job (sources -> latent shards)"),
    "dedup": (
        "pipelines.dedup.cli",
        "mark near-duplicate samples of encoded shards (faiss k-means + exact search on Ray)",
    ),
    "stats": ("shards.stats", "dataset statistics from shard indexes (--deep opens every tar)"),
    "train": ("trainer.main", "train (use `deepspeed trainer/main.py` for several ranks)"),
    "eval": ("evaluation.cli", "video metrics (CLIPSIM, CLIP-Temp, motion, aesthetic, FVD) + HTML report"),
    "convert": (
        "trainer.convert",
        "convert VideoCrafter checkpoints to and from latentcrafter's safetensors",
    ),
    "generate": (
        "trainer.generate.cli",
        "sample T2V/I2V videos (mp4, GIF, HTML gallery) from weights; FIFO-Diffusion for long videos",
    ),
    "perturb": (
        "trainer.perturb.cli",
        "VideoCrafter2's parameter-perturbation study (Table 3) + HTML report",
    ),
}


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: latentcrafter COMMAND [ARGS...]", "", "commands:"]
    lines += [f"  {name:<{width}}  {help_}" for name, (_, help_) in COMMANDS.items()]
    lines += ["", "`latentcrafter COMMAND --help` shows a command's options."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"latentcrafter: unknown command {name!r}\n\n{usage()}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
