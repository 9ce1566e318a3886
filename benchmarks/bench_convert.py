"""`latentcrafter convert` on a full-size synthetic VideoCrafter2 checkpoint: wall time and peak RSS vs its size.

    .venv/bin/python benchmarks/bench_convert.py [--with-save-file] [--workdir DIR] [--keep]

Builds (in its own process) a VC2 T2V `model.ckpt` with the real U-Net's keys and shapes
(tests/fixtures/videocrafter/full_size_keys/vc2_t2v_unet_keys.txt: ~1.4B values, seeded random fp16) and a
VideoCrafter YAML with the real U-Net params, then runs each direction, VideoCrafter -> latentcrafter ->
VideoCrafter, as `python -m trainer.convert` in a fresh subprocess. Peak RSS is that child's own
`ru_maxrss` (os.wait4), which counts resident pages of memory-mapped files as well as anonymous memory;
the table also shows the peaks of RssAnon and RssFile sampled from /proc every 50 ms. Target: peak RSS
<= 1.5x the checkpoint's size. The round trip is checked tensor by tensor (both files memory-mapped).
The converter writes with `trainer.safetensors_io.save_safetensors` (streaming, deterministic);
--with-save-file runs the latentcrafter direction again with `safetensors.torch.save_file` in its place, and
checks that both files hold the same header and data.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests" / "fixtures" / "videocrafter"
KEYS = FIXTURES / "full_size_keys" / "vc2_t2v_unet_keys.txt"
TINY_YAML = FIXTURES / "vc2_t2v_tiny" / "config.yaml"
GB = 1e9
PATCHED = """
import sys, trainer.convert as c
from safetensors.torch import save_file
calls = []
def save_safetensors(tensors, path, metadata=None):
    calls.append(1)
    return save_file(tensors, str(path), metadata=metadata)
c.save_safetensors = save_safetensors
rc = c.main(sys.argv[1:])
sys.exit(rc or (0 if calls else "trainer.convert no longer calls save_safetensors: the patch had no effect"))
"""


def read_keys(path: Path) -> list[tuple[str, tuple[int, ...]]]:
    out = []
    for line in path.read_text().splitlines():
        if line.strip():
            key, shape = line.split("\t")
            out.append((key, tuple(int(v) for v in re.findall(r"\d+", shape))))
    return out


def write_yaml(path: Path) -> None:
    """The tiny fixture's YAML with the real VC2 unet_config.params from its header comment."""
    import yaml

    text = TINY_YAML.read_text()
    real = json.loads(re.search(r"^# Real unet_config\.params: (\{.*\})$", text, re.M).group(1))
    cfg = yaml.safe_load(text)
    cfg["model"]["params"]["unet_config"]["params"] = real
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))


def build(ckpt: Path, seed: int) -> None:
    """The synthetic checkpoint: random fp16 tensor by tensor, one torch.save (run in its own process)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    sd = {k: torch.randn(shape, generator=g).half() for k, shape in read_keys(KEYS)}
    torch.save({"state_dict": sd}, ckpt)


class ProcPeaks:
    """Peak RssAnon / RssFile of one process, sampled from /proc/PID/status."""

    def __init__(self, pid: int, every: float = 0.05):
        self.pid, self.every, self.anon, self.file = pid, every, 0, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                with open(f"/proc/{self.pid}/status") as f:
                    status = f.read()
            except OSError:
                return
            kb = {k: int(v) for k, v in re.findall(r"^(RssAnon|RssFile):\s+(\d+) kB", status, re.M)}
            self.anon = max(self.anon, kb.get("RssAnon", 0) * 1024)
            self.file = max(self.file, kb.get("RssFile", 0) * 1024)
            self._stop.wait(self.every)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def run(cmd: list[str]) -> dict:
    """Wall seconds, ru_maxrss (bytes) and sampled peaks of one fresh child process."""
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    peaks = ProcPeaks(proc.pid)
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    peaks.stop()
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{out}")
    return {"wall": wall, "rss": usage.ru_maxrss * 1024, "anon": peaks.anon, "file": peaks.file, "out": out}


def same_ckpt(a: Path, b: Path) -> tuple[int, list[str]]:
    """(tensors compared, names that differ) between two torch.save'd state dicts, both memory-mapped."""
    import torch

    sa = torch.load(a, map_location="cpu", weights_only=True, mmap=True)["state_dict"]
    sb = torch.load(b, map_location="cpu", weights_only=True, mmap=True)["state_dict"]
    bad = sorted(set(sa) ^ set(sb))
    bad += [k for k in sa if k in sb and not (sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]))]
    return len(sa), bad


def same_safetensors(a: Path, b: Path, chunk: int = 1 << 26) -> bool:
    """Same parsed header (metadata key order may differ) and byte-identical data section."""
    with open(a, "rb") as fa, open(b, "rb") as fb:
        na, nb = (struct.unpack("<Q", f.read(8))[0] for f in (fa, fb))
        if json.loads(fa.read(na)) != json.loads(fb.read(nb)):
            return False
        while True:
            ca, cb = fa.read(chunk), fb.read(chunk)
            if ca != cb:
                return False
            if not ca:
                return True


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--workdir", default=None, help="where the files go (default: a temp dir under /tmp)")
    parser.add_argument("--keep", action="store_true", help="keep the workdir's files")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--with-save-file", action="store_true", help="also run with safetensors save_file")
    parser.add_argument("--build-only", metavar="CKPT", help=argparse.SUPPRESS)  # the child that builds
    args = parser.parse_args(argv)
    if args.build_only:
        build(Path(args.build_only), args.seed)
        return 0

    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench_convert_", dir="/tmp"))
    work.mkdir(parents=True, exist_ok=True)
    ckpt, cfg = work / "model.ckpt", work / "vc2_t2v.yaml"
    ours, ours_stream, back = work / "vc2.safetensors", work / "vc2_stream.safetensors", work / "back.ckpt"
    py = sys.executable
    try:
        write_yaml(cfg)
        if not ckpt.exists():
            b = run([py, __file__, "--build-only", str(ckpt), "--seed", str(args.seed)])
            print(
                f"built {ckpt} ({ckpt.stat().st_size / GB:.2f} GB) in {b['wall']:.1f} s, "
                f"peak RSS {b['rss'] / GB:.2f} GB",
                flush=True,
            )
        jobs = [
            (
                "-> latentcrafter",
                ckpt,
                ours,
                [
                    py,
                    "-m",
                    "trainer.convert",
                    str(ckpt),
                    "--out",
                    str(ours),
                    "--videocrafter-config",
                    str(cfg),
                ],
            )
        ]
        if args.with_save_file:
            jobs.append(
                (
                    "-> latentcrafter (safetensors save_file)",
                    ckpt,
                    ours_stream,
                    [
                        py,
                        "-c",
                        PATCHED,
                        str(ckpt),
                        "--out",
                        str(ours_stream),
                        "--videocrafter-config",
                        str(cfg),
                    ],
                )
            )
        jobs.append(
            (
                "-> videocrafter",
                ours,
                back,
                [py, "-m", "trainer.convert", str(ours), "--out", str(back), "--to", "videocrafter"],
            )
        )
        rows = []
        for name, src, _dst, cmd in jobs:
            r = run(cmd)
            size = src.stat().st_size
            ratio = r["rss"] / size
            rows.append(
                (
                    name,
                    size / GB,
                    r["wall"],
                    r["rss"] / GB,
                    ratio,
                    "PASS" if ratio <= 1.5 else "FAIL",
                    r["anon"] / GB,
                    r["file"] / GB,
                )
            )
            print(f"{name}: {r['out'].strip()}", flush=True)
        n, bad = same_ckpt(ckpt, back)
        print(
            f"round trip: {n} tensors compared, {len(bad)} differ{': ' + ', '.join(bad[:5]) if bad else ''}"
        )
        if args.with_save_file:
            ok = same_safetensors(ours, ours_stream)
            print(f"save_file vs save_safetensors: same header and data: {ok}")
        print()
        head = (
            "direction",
            "size (GB)",
            "wall (s)",
            "peak RSS (GB)",
            "RSS / size",
            "target <= 1.5x",
            "peak RssAnon (GB)",
            "peak RssFile (GB)",
        )
        print("| " + " | ".join(head) + " |")
        print("|" + "---|" * len(head))
        for row in rows:
            name, size, wall, rss, ratio, verdict, anon, file = row
            print(
                f"| {name} | {size:.2f} | {wall:.1f} | {rss:.2f} | {ratio:.2f}x | {verdict} | {anon:.2f} | {file:.2f} |"
            )
        return 0 if not bad else 1
    finally:
        if not args.keep:
            if args.workdir:
                for p in (ckpt, cfg, ours, ours_stream, back):
                    p.unlink(missing_ok=True)
            else:
                shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
