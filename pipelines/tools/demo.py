"""`make demo`: sample data -> local-Ray encode job -> stats -> DeepSpeed training through every phase -> preview
-> a miniature of VideoCrafter2's perturbation study."""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _step(title: str, cmd: list[str], env: dict) -> float:
    print(f"\n=== {title}\n$ {' '.join(cmd)}", flush=True)
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, env=env)
    took = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"demo step failed ({title}, exit {proc.returncode}): {' '.join(cmd)}")
    print(f"--- {title}: {took:.1f} s", flush=True)
    return took


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipelines.tools.demo", description=__doc__)
    parser.add_argument("--out", default="demo_out", help="folder for everything the demo writes")
    parser.add_argument("--ranks", type=int, default=2, help="DeepSpeed CPU ranks (gloo)")
    args = parser.parse_args(argv)

    out = Path(args.out)
    if out.resolve() != (REPO / "demo_out").resolve():
        raise SystemExit("the demo configs read and write demo_out/; run it with --out demo_out")
    bin_dir = Path(sys.executable).parent
    env = dict(os.environ)
    env["PATH"] = f"{bin_dir}{os.pathsep}{env.get('PATH', '')}"
    env.setdefault("OMP_NUM_THREADS", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    py, cli = str(bin_dir / "python"), str(bin_dir / "latentcrafter")

    times = {}
    times["sample data"] = _step("sample data", [cli, "sample-data", str(out / "data"), "--seed", "0"], env)
    times["tiny models"] = _step("tiny models", [cli, "tiny-models", str(out / "models")], env)
    times["encode (Ray)"] = _step(
        "encode job on a local Ray",
        [py, "pipelines/encode_latents.py", "--config", "configs/pipeline/demo.yaml"],
        env,
    )
    times["stats"] = _step(
        "dataset stats", [cli, "stats", str(out / "shards"), "--html", str(out / "stats.html")], env
    )
    shutil.rmtree(out / "train", ignore_errors=True)
    times["train"] = _step(
        "DeepSpeed training through every phase",
        [
            str(bin_dir / "deepspeed"),
            "--num_gpus",
            str(args.ranks),
            "trainer/main.py",
            "--config",
            "configs/train/demo.yaml",
        ],
        env,
    )
    shutil.rmtree(out / "train-temporal", ignore_errors=True)
    shutil.rmtree(out / "study", ignore_errors=True)
    deepspeed = [str(bin_dir / "deepspeed"), "--num_gpus", str(args.ranks), "trainer/main.py", "--config"]
    times["study base P"] = _step(
        "perturbation study: base P (temporal modules trained only)",
        [*deepspeed, "configs/train/demo-temporal.yaml"],
        env,
    )
    times["study"] = _step(
        "perturbation study (4 variants, 2 steps each)",
        [cli, "perturb", "--config", "configs/study/demo.yaml"],
        env,
    )
    previews = sorted((out / "train").rglob("*.mp4")) + sorted((out / "train").rglob("*.gif"))
    print("\n=== demo done")
    for name, took in times.items():
        print(f"  {name:<14} {took:7.1f} s")
    print(f"  shards:  {out / 'shards'}\n  stats:   {out / 'stats.html'}")
    print(f"  study:   {out / 'study' / 'report.html'}")
    print(f"  previews: {', '.join(str(p) for p in previews[-2:]) or 'none written'}")
    print(f"  tensorboard --logdir {out / 'train'} --host 127.0.0.1")
    return 0 if previews else 1


if __name__ == "__main__":
    sys.exit(main())
