"""Weighted multi-source mixing, the image/video batch schedule, collation, and one worker's batch builder."""

from __future__ import annotations

from collections import Counter
from fractions import Fraction

import numpy as np
import torch

from shards.buckets import latent_bucket
from shards.resume import CounterRandom, SourceStream, name_seed

KINDS = ("video", "image")


class KindSchedule:
    """Which kind the b-th batch of a rank is: a deterministic function of (seed, b).

    "ratio": with p = r / (1 + r) (r = image_per_video), batch b is an image batch when
    floor((b + 1) p) > floor(b p), so r=1 gives V I V I ..., r=2 gives V I I V I I ..., r=0.5 V V I.
    "probability": batch b is an image batch when u(b) < p, u a seeded counter-based uniform.
    With only one kind configured every batch is of that kind. The schedule does not depend on the
    rank, so at any step every rank trains on the same kind (one graph across data-parallel ranks).
    """

    def __init__(self, schedule: str, image_per_video: float, seed: int, kinds: set[str]):
        self.schedule, self.kinds = schedule, set(kinds)
        ratio = Fraction(image_per_video).limit_denominator(1000)
        self.p = ratio / (1 + ratio)
        self._random = CounterRandom(seed, name_seed("kind_schedule"))

    def __call__(self, b: int) -> str:
        if len(self.kinds) == 1:
            return next(iter(self.kinds))
        if self.schedule == "ratio":
            image = int((b + 1) * self.p) > int(b * self.p)
        else:
            image = self._random(b) < float(self.p)
        return "image" if image else "video"


class SourceMixer:
    """Draws samples from weighted source streams of one kind; the choice of draw m is u(m)-addressable."""

    def __init__(
        self, kind: str, streams: list[SourceStream], weights: list[float], seed: int, slot: int = 0
    ):
        self.kind, self.streams = kind, streams
        w = np.asarray(weights, dtype=np.float64)
        self.cum = np.cumsum(w / w.sum())
        self.draws = 0
        self._random = CounterRandom(seed, name_seed(f"mix_{kind}"), slot)

    @property
    def exhausted(self) -> bool:
        return all(s.exhausted for s in self.streams)

    def next_sample(self) -> dict:
        """One sample from the source chosen for this draw (bounded pass: falls through exhausted sources)."""
        i = min(int(np.searchsorted(self.cum, self._random(self.draws), side="right")), len(self.streams) - 1)
        self.draws += 1
        for j in range(len(self.streams)):
            stream = self.streams[(i + j) % len(self.streams)]
            if stream.exhausted:
                continue
            try:
                return stream.next_sample()
            except StopIteration:
                continue
        raise StopIteration

    def state_dict(self) -> dict:
        return {"draws": self.draws, "streams": {s.name: s.state_dict() for s in self.streams}}

    def load_state_dict(self, state: dict) -> None:
        self.draws = int(state["draws"])
        for s in self.streams:
            s.load_state_dict(state["streams"][s.name])


def collate(samples: list[dict], kind: str, image_fps: float) -> dict:
    """Samples of one kind -> the trainer batch (torch float32 tensors).

    text_tokens / image_tokens are stacked when every sample has them. Samples of storage profiles that
    keep the encoders' inputs instead (text=caption, image=frame) leave the work to the trainer: the batch
    then has "text_tokens_list" ([tokens or None] per sample; the captions are always there) and
    "image_cond_list" ([tokens, a uint8 [S,S,3] frame, or None] per sample).
    """

    def stack(name):
        return torch.stack([s[name] for s in samples])

    batch = {
        "kind": kind,
        "latent": stack("latent"),
        "text_pooled": stack("text_pooled"),
        "fps": torch.tensor(
            [s["fps"] if kind == "video" else image_fps for s in samples], dtype=torch.float32
        ),
        "keys": [s["key"] for s in samples],
        "sources": [s["source"] for s in samples],
        "captions": [s["caption"] for s in samples],
    }
    if samples[0].get("latent_std") is not None:
        batch["latent_std"] = stack("latent_std")
    if all(s["text_tokens"] is not None for s in samples):
        batch["text_tokens"] = stack("text_tokens")
    else:
        batch["text_tokens_list"] = [s["text_tokens"] for s in samples]
    if all(s["image_tokens"] is not None for s in samples):
        batch["image_tokens"] = stack("image_tokens")
    elif any(s.get("cond_frame") is not None for s in samples):
        batch["image_cond_list"] = [
            s["image_tokens"] if s["image_tokens"] is not None else s.get("cond_frame") for s in samples
        ]
    return batch


class BatchBuilder:
    """The batches of one logical worker: global batch indices b = worker + i * num_workers of its rank.

    With `config.bucketing` the kind of batch b still comes from the schedule, and the kind's mixer still
    draws the samples (so source weights and the image/video pattern are those of the unbucketed loader),
    but each drawn sample goes into the open batch of its (kind, bucket); batch b is the first open batch
    of its kind to reach its bucket's batch size. Open batches wait, across batches and epochs, until they
    fill, so every drawn sample is trained on once and no bucket starves; at the end of a bounded pass the
    open batches of a kind are emitted oldest first (partial). The open batches are part of the state as
    (source, epoch, step) of each waiting sample, which resume reads again (SourceStream.sample_at).
    """

    def __init__(
        self,
        mixers: dict[str, SourceMixer],
        schedule: KindSchedule,
        config,
        *,
        worker: int,
        num_workers: int,
        handler,
    ):
        self.mixers, self.schedule, self.config = mixers, schedule, config
        self.worker, self.num_workers = worker, num_workers
        self.handler = handler
        self.produced = 0  # batches this worker produced
        self.samples = 0
        self.bucketing = bool(getattr(config, "bucketing", False))
        # (kind, bucket) -> waiting samples, in the order their first sample arrived
        self.open: dict[tuple[str, str], list[dict]] = {}

    def next_batch(self) -> dict:
        """The next batch; StopIteration when a bounded pass has no sample left."""
        if self.bucketing:
            return self._next_bucketed()
        b = self.worker + self.produced * self.num_workers
        kind = self.schedule(b)
        if kind not in self.mixers or self.mixers[kind].exhausted:  # bounded pass: the other kind, if any
            kind = next((k for k in KINDS if k in self.mixers and not self.mixers[k].exhausted), None)
            if kind is None:
                raise StopIteration
        samples = []
        while len(samples) < self.config.batch_size(kind):
            try:
                samples.append(self.mixers[kind].next_sample())
            except StopIteration:
                break
        if not samples:
            return self.next_batch()
        self.produced += 1
        self.samples += len(samples)
        return collate(samples, kind, self.config.image_fps)

    # ------------------------------------------------------------ buckets

    def _has(self, kind: str) -> bool:
        return kind in self.mixers and (
            not self.mixers[kind].exhausted or any(k == kind for k, _ in self.open)
        )

    def _next_bucketed(self) -> dict:
        b = self.worker + self.produced * self.num_workers
        kind = self.schedule(b)
        if not self._has(kind):  # bounded pass: the other kind, if any
            kind = next((k for k in KINDS if self._has(k)), None)
            if kind is None:
                raise StopIteration
        mixer = self.mixers[kind]
        while not mixer.exhausted:
            try:
                sample = mixer.next_sample()
            except StopIteration:
                break
            key = (kind, latent_bucket(sample["latent"].shape, self.config.vae_downsample))
            group = self.open.setdefault(key, [])
            group.append(sample)
            if len(group) >= self.config.bucket_batch_size(*key):
                return self._emit(key)
        key = next((k for k in self.open if k[0] == kind), None)  # bounded pass: flush, oldest first
        if key is None:
            return self._next_bucketed()
        return self._emit(key)

    def _emit(self, key: tuple[str, str]) -> dict:
        samples = self.open.pop(key)
        self.produced += 1
        self.samples += len(samples)
        batch = collate(samples, key[0], self.config.image_fps)
        batch["bucket"] = key[1]
        return batch

    def _open_state(self) -> list:
        return [
            [kind, bucket, [[s["source"], *s["origin"]] for s in samples]]
            for (kind, bucket), samples in self.open.items()
        ]

    def _load_open(self, state: list) -> None:
        self.open = {}
        for kind, bucket, origins in state:
            streams = {s.name: s for s in self.mixers[kind].streams}
            self.open[(kind, bucket)] = [streams[src].sample_at(int(e), int(t)) for src, e, t in origins]

    # ------------------------------------------------------------ state

    def state_dict(self) -> dict:
        state = {
            "produced": self.produced,
            "samples": self.samples,
            "bad": dict(self.handler.counts),
            "mixers": {k: m.state_dict() for k, m in self.mixers.items()},
        }
        if self.bucketing:
            state["open"] = self._open_state()
        return state

    def load_state_dict(self, state: dict) -> None:
        self.produced, self.samples = int(state["produced"]), int(state["samples"])
        self.handler.counts = Counter(state.get("bad", {}))
        for k, m in self.mixers.items():
            m.load_state_dict(state["mixers"][k])
        if self.bucketing:
            self._load_open(state.get("open", []))
