"""The decode stage: each item decoded in a guarded subprocess (timeout, memory cap, crash isolation)."""

from __future__ import annotations

import fcntl
import os
import pickle
import selectors
import struct
import subprocess
import sys
import time
from collections import deque

import numpy as np

from pipelines.config import DecodeConfig
from pipelines.stages.decode_worker import SharedFrames, write_msg
from pipelines.stages.rows import fail, failed, rows_of, table_of

F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)  # Linux
PIPE_BYTES = 1 << 20  # /proc/sys/fs/pipe-max-size's usual default


def default_buckets(stage: str) -> list[tuple[int, int]]:
    """Aspect buckets of about the stage's pixel count: the stage, its transpose, and a square (multiples of 64)."""
    w, h = (int(v) for v in stage.split("x"))
    side = max(64, round((w * h) ** 0.5 / 64) * 64)
    return list(dict.fromkeys([(w, h), (h, w), (side, side)]))


class DecoderDied(Exception):
    """The decoder process closed its output or its input pipe (crash, abort, address-space limit)."""


class GuardedDecoder:
    """A decoder subprocess (`python -m pipelines.stages.decode_worker`) behind a guard, fed `depth` requests ahead.

    With two requests in flight the child decodes clip i+1 while it resizes and hands back clip i. A result
    that takes longer than `timeout_s` (counted from when it is next due) kills the process and fails that
    item (reason decode_timeout). A process that dies is restarted and the items it held are retried one at
    a time, so only the item that kills a lone decoder fails (undecodable). Either way the caller carries on.
    """

    def __init__(self, timeout_s: float = 60.0, memory_limit_mb: int = 8192, depth: int = 2):
        self.timeout_s, self.memory_limit_mb, self.depth = timeout_s, memory_limit_mb, max(1, depth)
        self.proc: subprocess.Popen | None = None
        self.slots: list[SharedFrames] = []  # frame buffers shared with the child, one per request in flight
        self.restarts = 0

    def _start(self) -> None:
        env = dict(os.environ, OMP_NUM_THREADS="1")
        debug = os.environ.get("LATENTCRAFTER_DECODE_DEBUG")
        argv = [sys.executable, "-m", "pipelines.stages.decode_worker", str(self.memory_limit_mb)]
        if hasattr(os, "memfd_create"):  # Linux: frames come back through shared buffers, not the pipe
            self.slots = [SharedFrames(os.memfd_create("latentcrafter-decode")) for _ in range(self.depth)]
            argv.append(",".join(str(slot.fd) for slot in self.slots))
        self.proc = subprocess.Popen(
            argv,
            pass_fds=[slot.fd for slot in self.slots],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=None if debug else subprocess.DEVNULL,
            env=env,
            bufsize=0,
        )
        for stream in (self.proc.stdin, self.proc.stdout):  # bigger pipes: fewer wake-ups per message
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
        for slot in self.slots:
            slot.close()
            os.close(slot.fd)
        self.slots = []

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass

    def _read(self, n: int, deadline: float) -> bytearray | None:
        """n bytes from the child's stdout before the deadline; None on timeout; DecoderDied if it closed."""
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
                    raise DecoderDied("decoder process closed its output")
                got += size
        return buf

    def _send(self, request: dict, slot: int) -> None:
        if self.proc is None or self.proc.poll() is not None:
            self.close()
            self._start()
        try:
            write_msg(self.proc.stdin, dict(request, slot=slot))
        except OSError as exc:  # BrokenPipeError: it died since the last result
            raise DecoderDied(f"decoder process closed its input: {exc}") from exc

    def _receive(self, slot: int, deadline: float) -> dict | None:
        """The next result (its frames copied out of `slot`), or None if it is not there by the deadline."""
        header = self._read(16, deadline)  # see decode_worker.write_result
        if header is None:
            return None
        meta_len, inline_len = struct.unpack("<QQ", header)
        body = self._read(meta_len, deadline)
        frames = self._read(inline_len, deadline) if body is not None and inline_len else None
        if body is None or (inline_len and frames is None):
            return None
        result = pickle.loads(body)  # a private pipe from our own child process, never from the network
        if frames is not None:
            result["frames"] = frames
        elif result.get("shared_bytes"):
            with self.slots[slot].view(result.pop("shared_bytes")) as view:
                result["frames"] = bytes(view)  # the slot is reused by a later request
        return result

    def _restart(self) -> None:
        self.close()
        self.restarts += 1

    def map(self, requests: list[dict]) -> list[dict]:
        """Results for `requests`, in order: {"ok": True, "frames", ...} or {"ok": False, "reason", "detail"}."""
        results: list[dict | None] = [None] * len(requests)
        todo = deque(range(len(requests)))
        inflight: deque[tuple[int, int]] = deque()  # (request index, slot), oldest first
        suspects: set[int] = set()  # in flight when the decoder died: retried alone
        idle_deaths = 0  # deaths with nothing in flight: the decoder cannot start at all
        while todo or inflight:
            try:
                while todo and len(inflight) < self.depth:
                    if inflight and (todo[0] in suspects or inflight[-1][0] in suspects):
                        break
                    busy = {slot for _, slot in inflight}
                    slot = min(set(range(self.depth)) - busy)
                    self._send(requests[todo[0]], slot)
                    inflight.append((todo.popleft(), slot))
                index, slot = inflight[0]
                result = self._receive(slot, time.monotonic() + self.timeout_s)
            except DecoderDied as exc:
                code = self.proc.wait() if self.proc else None
                self._restart()
                idle_deaths = 0 if inflight else idle_deaths + 1
                if idle_deaths > 3:
                    raise RuntimeError(
                        f"the decoder process exits at start (exit {code}); run `python -m "
                        "pipelines.stages.decode_worker` with LATENTCRAFTER_DECODE_DEBUG=1 to see why"
                    ) from exc
                if len(inflight) == 1 and inflight[0][0] in suspects:  # it died holding this item alone
                    results[inflight.popleft()[0]] = {
                        "ok": False,
                        "reason": "undecodable",
                        "detail": f"decoder process died (exit {code}): {exc}",
                    }
                suspects.update(index for index, _ in inflight)
                todo.extendleft(reversed([index for index, _ in inflight]))
                inflight.clear()
                continue
            if result is None:  # the oldest item is overdue: it is the one the child is stuck on
                self._restart()
                results[inflight.popleft()[0]] = {
                    "ok": False,
                    "reason": "decode_timeout",
                    "detail": f"over decode.timeout_s={self.timeout_s}",
                }
                todo.extendleft(reversed([index for index, _ in inflight]))
                inflight.clear()
                continue
            results[index] = result
            inflight.popleft()
        return results

    def __call__(self, request: dict) -> dict:
        return self.map([request])[0]


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
            "backend": cfg.backend,
            "decode_resize": cfg.decode_resize,
            "known_width": row.get("width"),
            "known_height": row.get("height"),
            "fps": row.get("fps"),
            "threads": cfg.decoder_threads,
            "max_pixels": cfg.max_pixels,
            "max_video_pixels": cfg.max_video_pixels,
            "max_video_side": cfg.max_video_side,
            "max_duration_s": cfg.max_duration_s,
            "max_frames": cfg.max_frames,
        }

    def decode_rows(self, rows: list[dict]) -> list[dict]:
        todo = [row for row in rows if not failed(row)]
        for row, result in zip(todo, self.decoder.map([self.request(row) for row in todo])):
            self._apply(row, result)
        return rows

    @staticmethod
    def _apply(row: dict, result: dict) -> dict:
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
        return table_of(self.decode_rows(rows_of(batch)), zero_copy=("frames",))


def frames_of(row: dict) -> np.ndarray:
    """The uint8 [T,H,W,3] clip a decoded row carries."""
    return np.frombuffer(row["frames"], dtype=np.uint8).reshape(row["frames_shape"])
