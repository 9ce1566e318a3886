"""Decode stage (guarded subprocess + resize/crop) vs bare `decord.VideoReader.get_batch` on the same clips.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/bench_decode.py [--clips 12] [--repeats 3]

Prints clips/s of both and their ratio (target: stage >= 0.9x bare), and CPU time per clip. Same frame
indices, one decord thread each; the stage also resizes and center-crops to 256x256 (in a second thread
of its decoder process, overlapping the next clip's decode) and hands frames back in shared memory.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import decord

from pipelines.stages.decode import DecodeStage
from pipelines.stages.decode_worker import cover_size, plan_clip
from pipelines.stages.rows import new_row, table_of
from pipelines.tools.sample_media import rng_for, write_video


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of another process so far (/proc/PID/stat)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--clips", type=int, default=12)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--size", default="596x336", help="source video size (WebVid's usual 596x336)")
    parser.add_argument("--seconds", type=int, default=8)
    parser.add_argument("--stage", default="256x256")
    args = parser.parse_args(argv)
    w, h = (int(v) for v in args.size.split("x"))
    cfg = {"num_frames": 16, "frame_stride": 4, "start": "random", "decoder_threads": 1}
    with tempfile.TemporaryDirectory() as tmp:
        rng = rng_for("bench_decode", 0)
        paths = []
        for i in range(args.clips):
            path = Path(tmp) / f"{i}.mp4"
            write_video(str(path), w, h, 25, 25 * args.seconds, rng)
            paths.append(str(path))
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
        stage = DecodeStage(cfg)
        reqs = [stage.request(r) for r in rows]

        def bare():
            for p, req in zip(paths, reqs):
                vr = decord.VideoReader(p, ctx=decord.cpu(0), num_threads=1)
                indices, _ = plan_clip(len(vr), vr.get_avg_fps(), req)
                vr.get_batch(indices).asnumpy()

        def bare_resized():  # the same decode-time scaling the stage asks decord for
            for p, req in zip(paths, reqs):
                rw, rh = cover_size(w, h, req["width"], req["height"])
                vr = decord.VideoReader(p, ctx=decord.cpu(0), num_threads=1, width=rw, height=rh)
                indices, _ = plan_clip(len(vr), vr.get_avg_fps(), req)
                vr.get_batch(indices).asnumpy()

        def staged():
            out = stage(table_of([dict(r) for r in rows]))
            assert all(not e for e in out.column("err_stage").to_pylist())

        staged()  # start the decoder process, warm caches
        child = stage.decoder.proc.pid
        best = {"bare": float("inf"), "bare_resized": float("inf"), "stage": float("inf")}
        cpu = dict.fromkeys(best, float("inf"))
        for _ in range(args.repeats):
            for name, fn in (("bare", bare), ("bare_resized", bare_resized), ("stage", staged)):
                start, cpu0, child0 = time.perf_counter(), time.process_time(), cpu_seconds(child)
                fn()
                best[name] = min(best[name], time.perf_counter() - start)
                used = time.process_time() - cpu0 + (cpu_seconds(child) - child0 if name == "stage" else 0)
                cpu[name] = min(cpu[name], used)
        stage.decoder.close()
    n = args.clips
    print(
        f"clips: {n} x {args.size} @25fps, {args.seconds}s; 16 frames at stride 4; stage output {args.stage}"
    )
    print(f"bare decord get_batch : {n / best['bare']:7.2f} clips/s ({best['bare'] / n * 1000:.1f} ms/clip)")
    print(
        f"bare, decode-resized  : {n / best['bare_resized']:7.2f} clips/s ({best['bare_resized'] / n * 1000:.1f} ms/clip)"
    )
    print(
        f"decode stage          : {n / best['stage']:7.2f} clips/s ({best['stage'] / n * 1000:.1f} ms/clip)"
    )
    print(f"ratio stage/bare      : {best['bare'] / best['stage']:.3f}x (target >= 0.9x)")
    print(
        "cpu ms/clip           : "
        + ", ".join(f"{k} {v / n * 1000:.1f}" for k, v in cpu.items())
        + " (decord decodes in its own thread; the stage adds a resize thread and its parent process)"
    )
    print(f"cpu ratio stage/bare  : {cpu['bare'] / cpu['stage']:.3f}x")
    print(f"ratio stage/bare-resized: {best['bare_resized'] / best['stage']:.3f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
