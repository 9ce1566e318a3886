"""Decode stage (guarded subprocess + resize/crop) with each backend (decode.backend: decord | pyav) vs each
bare library, on the same clips and frame indices, in one run.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_decode.py [--sizes 596x336,1280x720]
        [--fps 30,59.94] [--seconds 10] [--clips 6] [--repeats 3] [--stride 3] [--backend decord|pyav|decord,pyav]

Clips are H.264 mp4s written here (libx264 --preset veryfast: B-frames, CABAC, default GOP, crf 23, moving
content with per-frame grain so every frame carries residuals), one set per size x fps. Per set it prints
ms/clip and CPU ms/clip (stage: parent + decoder process, all threads) for
  bare decord : decord.VideoReader(num_threads=1).get_batch(indices).asnumpy()  (full size)
  bare pyav   : av.open, thread_count=1, decode in order, to_ndarray(rgb24) for the wanted frames (full size)
  stage/decord, stage/pyav : DecodeStage(backend=...) to 256x256 (decode-time resize where the source is
                >= 2x the needed size), frames back in shared memory
and the ratio of each stage to the faster bare library (target >= 1.0x). 16 frames at stride 3, start random.
"""

from __future__ import annotations

import argparse
import fractions
import os
import tempfile
import time
from pathlib import Path

import av
import decord
import numpy as np

from pipelines.stages.decode import DecodeStage
from pipelines.stages.decode_worker import plan_clip
from pipelines.stages.rows import new_row, table_of
from pipelines.tools.sample_media import rng_for, video_frames


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of another process so far (/proc/PID/stat)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def write_clip(path: str, w: int, h: int, fps: fractions.Fraction, frames: int, rng) -> None:
    grain = [rng.integers(-8, 9, (h, w, 1), dtype=np.int16) for _ in range(7)]
    with av.open(path, "w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        stream.options = {"preset": "veryfast", "crf": "23"}
        stream.codec_context.thread_count = 2
        for i, array in enumerate(video_frames(w, h, frames, float(fps), rng)):
            noisy = np.clip(array.astype(np.int16) + grain[i % 7], 0, 255).astype(np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(noisy, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def bench_set(w, h, fps, args, tmp) -> dict:
    rng = rng_for("bench_decode", w * 1000 + int(fps))
    paths = []
    for i in range(args.clips):
        path = str(Path(tmp) / f"{w}x{h}_{float(fps):.2f}_{i}.mp4")
        write_clip(path, w, h, fps, round(float(fps) * args.seconds), rng)
        paths.append(path)
    kbps = sum(os.path.getsize(p) for p in paths) * 8 / 1000 / args.seconds / len(paths)
    rows = [
        new_row(
            key=f"k{i}",
            source="webvid",
            uri=p,
            local_path=p,
            kind="video",
            stage=args.stage,
            shard=0,
            shard_rows=1,
        )
        for i, p in enumerate(paths)
    ]
    cfg = {"num_frames": 16, "frame_stride": args.stride, "start": "random", "decoder_threads": 1}
    stages = {b: DecodeStage(dict(cfg, backend=b)) for b in args.backends}
    reqs = [next(iter(stages.values())).request(r) for r in rows]

    def bare_decord():
        for p, req in zip(paths, reqs):
            vr = decord.VideoReader(p, ctx=decord.cpu(0), num_threads=1)
            indices, _ = plan_clip(len(vr), vr.get_avg_fps(), req)
            vr.get_batch(indices).asnumpy()

    def bare_pyav():
        for p, req in zip(paths, reqs):
            with av.open(p) as container:
                stream = container.streams.video[0]
                stream.thread_count = 1
                indices, _ = plan_clip(stream.frames, float(stream.average_rate), req)
                wanted, last, out = set(indices), indices[-1], []
                for n, frame in enumerate(container.decode(stream)):
                    if n in wanted:
                        out.append(frame.to_ndarray(format="rgb24"))
                    if n == last:
                        break
                np.stack(out)

    def staged(backend):
        def run():
            out = stages[backend](table_of([dict(r) for r in rows]))
            errors = [e for e in out.column("err_detail").to_pylist() if e]
            assert not errors, errors

        return run

    fns = {
        "bare decord": bare_decord,
        "bare pyav": bare_pyav,
        **{f"stage {b}": staged(b) for b in args.backends},
    }
    for backend in stages:
        staged(backend)()  # start the decoder processes, warm caches
    children = {f"stage {b}": s.decoder.proc.pid for b, s in stages.items()}
    best = dict.fromkeys(fns, float("inf"))
    cpu = dict.fromkeys(fns, float("inf"))
    for _ in range(args.repeats):
        for name, fn in fns.items():
            child = children.get(name)
            start, cpu0 = time.perf_counter(), time.process_time()
            child0 = cpu_seconds(child) if child else 0.0
            fn()
            best[name] = min(best[name], time.perf_counter() - start)
            used = time.process_time() - cpu0 + (cpu_seconds(child) - child0 if child else 0.0)
            cpu[name] = min(cpu[name], used)
    for s in stages.values():
        s.decoder.close()
    n = len(paths)
    return {
        "set": f"{w}x{h} @{float(fps):.2f}",
        "kbps": kbps,
        "ms": {k: v / n * 1000 for k, v in best.items()},
        "cpu": {k: v / n * 1000 for k, v in cpu.items()},
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", default="596x336,1280x720", help="WebVid's usual 596x336, and 720p")
    parser.add_argument(
        "--fps", default="30,59.94", help="59.94 and 29.97 are taken as 60000/1001, 30000/1001"
    )
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--clips", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--stride", type=int, default=3)
    parser.add_argument("--stage", default="256x256")
    parser.add_argument(
        "--backend", default="decord,pyav", help="decode.backend(s) of the stage: decord, pyav or both"
    )
    args = parser.parse_args(argv)
    args.backends = [b for b in args.backend.split(",") if b]
    if not args.backends or set(args.backends) - {"decord", "pyav"}:
        parser.error(f"--backend {args.backend!r}: use decord, pyav or decord,pyav")
    rates = {"59.94": fractions.Fraction(60000, 1001), "29.97": fractions.Fraction(30000, 1001)}
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for size in args.sizes.split(","):
            w, h = (int(v) for v in size.split("x"))
            for fps in args.fps.split(","):
                rate = rates.get(fps) or fractions.Fraction(fps)
                results.append(bench_set(w, h, rate, args, tmp))
    print(
        f"{args.clips} clips per set, {args.seconds} s, H.264 veryfast crf 23; 16 frames at stride "
        f"{args.stride}, start random; one thread each; stage output {args.stage}; best of {args.repeats}"
    )
    names = list(results[0]["ms"])
    ratios = " | ".join(f"stage {b} / best bare" for b in args.backends)
    print(f"| set | kbit/s | {' | '.join(f'{n} ms (cpu)' for n in names)} | {ratios} |")
    print("|" + "---|" * (len(names) + 2 + len(args.backends)))
    for r in results:
        ms, cpu = r["ms"], r["cpu"]
        bare = min(ms["bare decord"], ms["bare pyav"])
        cells = " | ".join(f"{ms[n]:.1f} ({cpu[n]:.1f})" for n in names)
        stage = " | ".join(f"{bare / ms[f'stage {b}']:.2f}x" for b in args.backends)
        print(f"| {r['set']} | {r['kbps']:.0f} | {cells} | {stage} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
