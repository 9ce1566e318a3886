"""Video decode backends (decode.backend: decord | pyav), run inside the guarded decoder process.

Both open a video, say how many frames it has (`num_frames`, decord's count: one per packet of the video
stream) and its average fps, and read the frames at given indices as uint8 RGB [T,H,W,3]. A frame's index
is decord's: its rank in presentation order (the packets' pts, sorted). The pyav backend indexes the same
way (it demuxes every packet once, as decord does when it opens a file), then seeks to the keyframe at or
before the first wanted frame, decodes forward and keeps the frames whose pts are the wanted ones; colour
conversion and decode-time scaling go through the same swscale path decord uses (an FFmpeg filter graph
`scale=W:H:flags=bilinear` to rgb24; without scaling, sws yuv->rgb24), so the pixels are identical
(tests/pipelines/stages/test_decode_backends.py).
"""

from __future__ import annotations

import bisect
from collections.abc import Callable

import numpy as np

from pipelines.stages.media_caps import DecodeFailure, _source, mp4_size, probe_container, probe_video

BACKENDS = ("decord", "pyav")

# scale(size) -> (width, height) to scale to while decoding, or None: decided by the caller (decode_worker)
Scale = Callable[[tuple[int, int]], "tuple[int, int] | None"]


def _undecodable(exc: BaseException) -> DecodeFailure:
    return DecodeFailure("undecodable", f"{type(exc).__name__}: {str(exc)[:300]}")


class DecordClip:
    """decord.VideoReader: indexes every packet on open; `get_batch` seeks to keyframes and decodes forward."""

    def __init__(self, req: dict, scale: Scale):
        import decord

        probe_video(req)  # headers only: caps and stream checks before decord opens the file
        self.size = None
        if req.get("decode_resize"):  # decord scales while decoding when the source size is known
            self.size = (
                (req["known_width"], req["known_height"])
                if req.get("known_width")
                else mp4_size(_source(req))
            )
        scaled = scale(self.size) if self.size else None
        kwargs = {"width": scaled[0], "height": scaled[1]} if scaled else {}
        try:
            self.vr = decord.VideoReader(
                _source(req), ctx=decord.cpu(0), num_threads=int(req.get("threads", 1)), **kwargs
            )
            self.num_frames, self.fps = len(self.vr), float(self.vr.get_avg_fps())
        except Exception as exc:  # decord raises RuntimeError or DECORDError (a plain Exception subclass)
            raise _undecodable(exc) from exc

    def read(self, indices: list[int]):
        """torch uint8 [T,H,W,3] over decord's own memory (dlpack: no copy of the clip)."""
        from torch.utils.dlpack import from_dlpack

        try:
            return from_dlpack(self.vr.get_batch(indices).to_dlpack())
        except Exception as exc:  # broken files often fail only here, on a later batch
            raise _undecodable(exc) from exc

    def close(self) -> None:
        self.vr = None  # closing costs ~0.4 ms: done by `finish`, off the decoding thread


class PyAVClip:
    """PyAV on the container the probe opened: one demux pass for the index, then a seek and a forward decode."""

    def __init__(self, req: dict, scale: Scale):
        import av

        try:
            self.container = av.open(_source(req), metadata_errors="ignore")
        except DecodeFailure:
            raise
        except Exception as exc:  # av.FFmpegError (not a container FFmpeg knows), OSError, ...
            raise _undecodable(exc) from exc
        try:
            self.size = probe_container(req, self.container)  # caps on headers, before any demuxing
            self.stream = stream = self.container.streams.video[0]
            threads = int(req.get("threads", 1))
            stream.thread_count = threads
            if threads != 1:
                stream.thread_type = "AUTO"
            # The index, as decord builds it: every packet of the stream in decode order (pts, keyframe).
            self.pts: list[int] = []
            keys: list[int] = []
            for packet in self.container.demux(stream):
                if packet.size == 0 and packet.pts is None:  # the end-of-stream flush packet
                    continue
                if packet.is_keyframe:
                    keys.append(len(self.pts))
                self.pts.append(packet.pts if packet.pts is not None else packet.dts)
            self.keys = keys
            self.num_frames = len(self.pts)
            rate = stream.average_rate or stream.guessed_rate
            self.fps = float(rate) if rate else 0.0
        except DecodeFailure:
            self.close()
            raise
        except Exception as exc:
            self.close()
            raise _undecodable(exc) from exc
        self.scaled = scale(self.size) if req.get("decode_resize") else None

    def _graph(self):
        """The filter graph decord uses to scale: scale=W:H (bilinear), rgb24 out."""
        import av

        graph = av.filter.Graph()
        chain = [
            graph.add_buffer(template=self.stream),
            graph.add("scale", f"{self.scaled[0]}:{self.scaled[1]}:flags=bilinear"),
            graph.add("format", "rgb24"),
            graph.add("buffersink"),
        ]
        for a, b in zip(chain, chain[1:]):
            a.link_to(b)
        graph.configure()
        return graph

    def read(self, indices: list[int]) -> np.ndarray:
        try:
            return self._read(indices)
        except DecodeFailure:
            raise
        except Exception as exc:  # av.FFmpegError on broken data, MemoryError, ...
            raise _undecodable(exc) from exc
        finally:
            self.close()

    def _read(self, indices: list[int]) -> np.ndarray:
        if any(p is None for p in self.pts):
            raise DecodeFailure("undecodable", "packets without timestamps")
        order = sorted(self.pts)  # presentation order: index n is the n-th smallest pts (decord's rule)
        want: dict[int, list[int]] = {}
        for pos, index in enumerate(indices):
            want.setdefault(order[index], []).append(pos)
        # A pts shared by several packets (broken muxing) is taken at its first occurrence for all of them.
        first = min(indices)
        # decode-order position of the first wanted frame's packet; the last keyframe at or before it
        start_packet = self.pts.index(order[first])
        k = bisect.bisect_right(self.keys, start_packet) - 1
        key_pts = self.pts[self.keys[k]] if k >= 0 else None
        stream, container = self.stream, self.container
        if key_pts is not None and self.keys[k] > 0:
            container.seek(key_pts, stream=stream, backward=True, any_frame=False)
        else:
            container.seek(0, stream=stream, backward=True, any_frame=False)
        graph = self._graph() if self.scaled else None
        out: np.ndarray | None = None
        left = len(want)
        for frame in container.decode(stream):  # demux + decode in PyAV's own loop
            positions = want.pop(frame.pts, None)
            if positions is None:
                continue
            if graph is not None:
                graph.push(frame)
                frame = graph.pull()
                array = frame.to_ndarray()
            else:
                array = frame.to_ndarray(format="rgb24")
            if out is None:
                out = np.empty((len(indices), *array.shape), dtype=np.uint8)
            for pos in positions:
                out[pos] = array
            left -= 1
            if not left:
                break
        if left:
            raise DecodeFailure("undecodable", f"{left} wanted frames were not decoded (truncated stream?)")
        return out

    def close(self) -> None:
        container = getattr(self, "container", None)
        if container is not None:
            self.container = None
            container.close()


def open_video(req: dict, scale: Scale):
    """The request's backend (decode.backend) opened on its source, caps checked: a DecordClip or PyAVClip."""
    backend = req.get("backend") or "pyav"
    if backend == "pyav":
        return PyAVClip(req, scale)
    if backend == "decord":
        return DecordClip(req, scale)
    raise DecodeFailure("undecodable", f"unknown decode.backend {backend!r}")
