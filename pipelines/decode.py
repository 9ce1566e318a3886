"""The decode stage: each item decoded in a guarded subprocess (timeout, memory cap, crash isolation)."""

from __future__ import annotations

import fcntl
import os
import selectors
import struct
import subprocess
import sys
import time

import numpy as np

from pipelines.config import DecodeConfig
from pipelines.decode_worker import write_msg
from pipelines.rows import fail, failed, rows_of, table_of

F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)  # Linux
PIPE_BYTES = 1 << 20  # /proc/sys/fs/pipe-max-size's usual default


def default_buckets(stage: str) -> list[tuple[int, int]]:
    """Aspect buckets of about the stage's pixel count: the stage, its transpose, and a square (multiples of 64)."""
    w, h = (int(v) for v in stage.split("x"))
    side = max(64, round((w * h) ** 0.5 / 64) * 64)
    return list(dict.fromkeys([(w, h), (h, w), (side, side)]))


class GuardedDecoder:
    """A decoder subprocess (`python -m pipelines.decode_worker`) answering one request at a time.

    A request that takes longer than `timeout_s` kills the process (reason decode_timeout); a process
    that dies (segfault, abort, address-space limit) is restarted and the item fails as undecodable.
    Either way the caller carries on with the next item.
    """

    def __init__(self, timeout_s: float = 60.0, memory_limit_mb: int = 8192):
        self.timeout_s, self.memory_limit_mb = timeout_s, memory_limit_mb
        self.proc: subprocess.Popen | None = None
        self.restarts = 0

    def _start(self) -> None:
        env = dict(os.environ, OMP_NUM_THREADS="1")
        debug = os.environ.get("LATENTCRAFTER_DECODE_DEBUG")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "pipelines.decode_worker", str(self.memory_limit_mb)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=None if debug else subprocess.DEVNULL,
            env=env,
            bufsize=0,
        )
        for stream in (self.proc.stdin, self.proc.stdout):  # bigger pipes: a clip crosses in a few writes
            try:
                fcntl.fcntl(stream.fileno(), F_SETPIPE_SZ, PIPE_BYTES)
            except OSError:
                pass

    def close(self) -> None:
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.kill()
            self.proc.wait()
            for stream in (self.proc.stdin, self.proc.stdout):
                try:
                    stream.close()
                except OSError:
                    pass
            self.proc = None

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    def _read(self, n: int, deadline: float) -> bytes | None:
        """n bytes from the child's stdout before the deadline; None on timeout; EOFError if it died."""
        fd = self.proc.stdout.fileno()
        buf, got = bytearray(n), 0
        view = memoryview(buf)
        with selectors.DefaultSelector() as sel:
            sel.register(fd, selectors.EVENT_READ)
            while got < n:
                left = deadline - time.monotonic()
                if left <= 0 or not sel.select(left):
                    return None
                size = os.readv(fd, [view[got:]])
                if not size:
                    raise EOFError("decoder process closed its output")
                got += size
        return bytes(buf) if n < 64 else buf

    def __call__(self, request: dict) -> dict:
        import pickle

        if self.proc is None or self.proc.poll() is not None:
            self.close()
            self._start()
        deadline = time.monotonic() + self.timeout_s
        try:
            write_msg(self.proc.stdin, request)
            header = self._read(16, deadline)
            body = frames = None
            if header is not None:  # see decode_worker.write_result: metadata, then the raw frames
                meta_len, frames_len = struct.unpack("<QQ", header)
                body = self._read(meta_len, deadline)
                if body is not None and frames_len:
                    frames = self._read(frames_len, deadline)
                    body = None if frames is None else body
        except (BrokenPipeError, EOFError, OSError) as exc:
            code = self.proc.wait() if self.proc else None
            self.close()
            self.restarts += 1
            return {
                "ok": False,
                "reason": "undecodable",
                "detail": f"decoder process died (exit {code}): {exc}",
            }
        if body is None:
            self.close()
            self.restarts += 1
            return {
                "ok": False,
                "reason": "decode_timeout",
                "detail": f"over decode.timeout_s={self.timeout_s}",
            }
        result = pickle.loads(body)  # a private pipe from our own child process, never from the network
        if frames is not None:
            result["frames"] = frames
        return result


class DecodeStage:
    """`__init__(config)`; `__call__(batch)` decodes each row's media into a clip (Ray actor or local)."""

    def __init__(self, config: DecodeConfig | dict, seed: int = 0):
        self.config = config if isinstance(config, DecodeConfig) else DecodeConfig(**config)
        self.seed = seed
        self.decoder = GuardedDecoder(self.config.timeout_s, self.config.memory_limit_mb)

    def request(self, row: dict) -> dict:
        cfg = self.config
        w, h = (int(v) for v in row["stage"].split("x"))
        buckets = None
        if cfg.bucketing:
            sizes = cfg.buckets.get(row["stage"])
            buckets = (
                [tuple(int(v) for v in s.split("x")) for s in sizes]
                if sizes
                else default_buckets(row["stage"])
            )
        return {
            "kind": row["kind"],
            "key": row["key"],
            "seed": self.seed,
            "path": row.get("local_path") or None,
            "data": row.get("data"),
            "width": w,
            "height": h,
            "buckets": buckets,
            "num_frames": cfg.num_frames,
            "frame_stride": cfg.frame_stride,
            "target_fps": cfg.target_fps,
            "adapt_stride": cfg.adapt_stride,
            "start": cfg.start,
            "decode_resize": cfg.decode_resize,
            "known_width": row.get("width"),
            "known_height": row.get("height"),
            "fps": row.get("fps"),
            "threads": cfg.decoder_threads,
        }

    def decode_row(self, row: dict) -> dict:
        if failed(row):
            return row
        result = self.decoder(self.request(row))
        row["data"] = None
        if not result.get("ok"):
            return fail(row, "decode", result["reason"], result.get("detail", ""))
        shape = result["frames_shape"]
        row.update(
            frames=result["frames"],
            frames_shape=shape,
            src_fps=result.get("src_fps"),
            sample_fps=result.get("sample_fps"),
            frame_stride=result.get("frame_stride"),
            frame_indices=result.get("frame_indices"),
            num_src_frames=result.get("num_src_frames"),
            src_duration=result.get("src_duration"),
            orig_width=result["orig_width"],
            orig_height=result["orig_height"],
            out_width=shape[2],
            out_height=shape[1],
        )
        return row

    def __call__(self, batch):
        return table_of([self.decode_row(r) for r in rows_of(batch)])


def frames_of(row: dict) -> np.ndarray:
    """The uint8 [T,H,W,3] clip a decoded row carries."""
    return np.frombuffer(row["frames"], dtype=np.uint8).reshape(row["frames_shape"])
