"""`latentcrafter perturb --config configs/study/vc2-perturbation.yaml [--out DIR] [--set k=v]`."""

from __future__ import annotations

import argparse
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def parse_args(argv):
    parser = argparse.ArgumentParser(
        prog="latentcrafter perturb",
        description="VideoCrafter2's parameter-perturbation study: fine-tune F / P per variant (spatial / temporal, "
        "LoRA / direct) on an image set, evaluate at fixed steps; study.json + report.html. Finished variants "
        "(their result.json) are skipped on a rerun.",
    )
    parser.add_argument("--config", required=True, help="study YAML (configs/study/*.yaml)")
    parser.add_argument("--out", default=None, help="output folder (default: the config's out_dir)")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override a study config value, e.g. --set steps=10 or --set 'variants=[F-Spa-LoRA]'",
    )  # fmt: skip
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    from trainer.perturb.config import load_study_config
    from trainer.perturb.run import run_study

    overrides = list(args.overrides) + ([f"out_dir={args.out}"] if args.out else [])
    study = load_study_config(args.config, overrides)
    run_study(study)
    return 0


if __name__ == "__main__":
    sys.exit(main())
