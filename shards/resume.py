"""Deterministic, resumable per-source sample streams: seeded shard order, buffer shuffle as a permutation, seek.

How resume works (granularity: the sample position of each source stream, hence the batch):

* A source's stream for one reader slot (rank, worker) is a pure function of (seed, source name,
  slot, number of slots, epoch): the epoch's shard order is a seeded permutation of the source's
  shards, the slot takes every n-th shard of it (or, when the source has fewer shards than slots,
  every n-th sample of all of them), and those samples (counted from the parquet indexes, never
  guessed) are positions 0..n-1 of the epoch.
* The sample shuffle buffer is simulated on positions only (`shuffle_order`): it gives the order pi
  in which positions leave a buffer of `shuffle_buffer` samples. Reading follows pi: the tars are
  read sequentially and samples wait in a dict until their turn, so memory is one buffer, as with a
  webdataset shuffle buffer.
* The state of a stream is (epoch, step): how many steps of pi were consumed, bad samples included.
  To restore, the reader recomputes pi, fetches the samples still "in the buffer" at that step by
  random access (byte offsets from the index) and resumes sequential reading at the first position
  not yet read, skipping whole shards (and the head of the current one) without reading them.
* Latent noise is drawn from a generator seeded by (seed, source, slot, epoch, step), so a restored
  run draws the same noise as an uninterrupted one.
"""

from __future__ import annotations

import zlib

import numpy as np

from shards.decode import BadSampleHandler, RunExpectations, decode_sample
from shards.reader import (
    BadSample,
    ShardInfo,
    read_row,
    read_rows,
)


def name_seed(name: str) -> int:
    """A stable 32-bit seed from a name (zlib.crc32), so generators do not depend on list order."""
    return zlib.crc32(name.encode("utf-8"))


def shuffle_order(n: int, buffer: int, seed) -> np.ndarray:
    """Order in which positions 0..n-1 leave a shuffle buffer of `buffer` items (pi[t] < t + buffer)."""
    if buffer <= 1 or n <= 1:
        return np.arange(n, dtype=np.int64)
    rng = np.random.default_rng(seed)
    k = min(buffer, n)
    buf = list(range(k))
    out = np.empty(n, dtype=np.int64)
    for i, j in enumerate(rng.integers(0, k, size=n - k).tolist()):
        out[i] = buf[j]
        buf[j] = k + i
    out[n - k :] = rng.permutation(np.asarray(buf, dtype=np.int64))
    return out


class CounterRandom:
    """Uniform floats u(i) addressable by index: u(i) for any i costs O(1) (chunks of seeded draws)."""

    CHUNK = 4096

    def __init__(self, *seed_parts: int):
        self.seed_parts = [int(p) for p in seed_parts]
        self._chunk, self._values = -1, None

    def __call__(self, i: int) -> float:
        chunk = i // self.CHUNK
        if chunk != self._chunk:
            self._values = np.random.default_rng([*self.seed_parts, chunk]).random(self.CHUNK)
            self._chunk = chunk
        return float(self._values[i % self.CHUNK])


class SourceStream:
    """The samples of one source for one reader slot, epoch after epoch (resampled) or one pass."""

    def __init__(
        self,
        name: str,
        shards: list[ShardInfo],
        *,
        slot: int,
        num_slots: int,
        seed: int,
        shuffle_buffer: int,
        shard_shuffle: bool,
        resampled: bool,
        sample_latents: bool,
        expect: RunExpectations,
        return_latent_std: bool = False,
        handler: BadSampleHandler,
        storage_options: dict | None = None,
    ):
        self.name, self.shards = name, sorted(shards, key=lambda s: s.url)
        self.slot, self.num_slots = slot, num_slots
        self.seed, self.name_seed = int(seed), name_seed(name)
        self.shuffle_buffer, self.shard_shuffle = shuffle_buffer, shard_shuffle
        self.resampled, self.sample_latents = resampled, sample_latents
        self.return_latent_std = return_latent_std
        self.expect, self.handler, self.storage_options = expect, handler, storage_options
        self.epoch, self.step = 0, 0
        self.exhausted = False
        self._plan_epoch = None  # epoch whose plan is cached below
        self._seq = None  # sequential reader: yields (position, raw) from the read frontier on
        self._good_from_start = None  # good samples this epoch when it was read from step 0, else None

    # ------------------------------------------------------------ the epoch plan (pure function)

    def _plan(self, epoch: int) -> None:
        if self._plan_epoch == epoch:
            return
        order = np.arange(len(self.shards))
        if self.shard_shuffle:
            order = np.random.default_rng([self.seed, self.name_seed, epoch]).permutation(len(self.shards))
        if len(self.shards) >= self.num_slots:  # shard split: the slot reads every n-th shard
            self._epoch_shards = [self.shards[i] for i in order[self.slot :: self.num_slots]]
            self._first, self._stride = 0, 1
        else:  # sample split (fewer shards than readers): every n-th sample of all shards
            self._epoch_shards = [self.shards[i] for i in order]
            self._first, self._stride = self.slot, self.num_slots
        counts = [s.num_samples for s in self._epoch_shards]
        self._starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        self._n = max(0, -(-(int(self._starts[-1]) - self._first) // self._stride))
        seed = [self.seed, self.name_seed, self.slot, self.num_slots, epoch]
        self._order = shuffle_order(self._n, self.shuffle_buffer, seed)
        self._plan_epoch = epoch

    def _locate(self, pos: int) -> tuple[ShardInfo, int]:
        """(shard, row) of the slot's epoch position `pos`."""
        g = self._first + pos * self._stride
        i = int(np.searchsorted(self._starts, g, side="right")) - 1
        return self._epoch_shards[i], g - int(self._starts[i])

    def _read_from(self, pos: int):
        """(position, raw) for every position >= pos of the epoch, reading the tars sequentially."""
        while pos < self._n:
            shard, row = self._locate(pos)
            for r, raw in read_rows(shard, row, self.storage_options, step=self._stride):
                if r is None:  # tar content that is no index row's (e.g. members the index lacks)
                    self.handler(raw)
                    continue
                yield pos + (r - row) // self._stride, raw
            pos += len(range(row, shard.num_samples, self._stride))

    # ------------------------------------------------------------ state

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "step": self.step}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.step = int(state["epoch"]), int(state["step"])
        self.exhausted = False
        self._seq = None  # rebuilt (with the buffer contents) on the next read

    def _start_reading(self) -> None:
        """Set up the buffer and sequential reader for (epoch, step), fetching buffered samples by offset."""
        self._plan(self.epoch)
        order, t = self._order, self.step
        self._good_from_start = 0 if t == 0 else None
        frontier = int(order[:t].max()) + 1 if t > 0 else 0
        waiting = order[t:][order[t:] < frontier]
        self._pending = {}
        for pos in waiting.tolist():
            shard, row = self._locate(pos)
            self._pending[pos] = read_row(shard, row, self.storage_options)
        self._seq = self._read_from(frontier)

    # ------------------------------------------------------------ iteration

    def next_sample(self) -> dict:
        """The next good sample; bad ones go to the handler. StopIteration at the end of a bounded pass."""
        while True:
            if self.exhausted:
                raise StopIteration
            if self._seq is None:
                self._start_reading()
            if self.step >= self._n:
                if not self.resampled or self._n == 0:
                    self.exhausted = True
                    raise StopIteration
                if self._good_from_start == 0:
                    raise RuntimeError(
                        f"source {self.name}: every sample of epoch {self.epoch} was bad; see stats"
                    )
                self.epoch, self.step, self._seq = self.epoch + 1, 0, None
                continue
            target = int(self._order[self.step])
            while target not in self._pending:
                pos, raw = next(self._seq, (None, None))
                if pos is None:
                    raise RuntimeError(
                        f"source {self.name}: position {target} of epoch {self.epoch} was never read"
                    )
                self._pending[pos] = raw
            raw = self._pending.pop(target)
            step = self.step
            self.step += 1
            try:
                sample = self._decode(raw, target, self.epoch, step)
            except BadSample as bad:
                self.handler(bad)
                continue
            if self._good_from_start is not None:
                self._good_from_start += 1
            return sample

    def _decode(self, raw, target: int, epoch: int, step: int) -> dict:
        """Decode the raw sample at position `target`, taken at (epoch, step); BadSample when unusable."""
        shard, row = self._locate(target)
        if isinstance(raw, BadSample):
            raise raw
        seed = [self.seed, self.name_seed, self.slot, epoch, step]
        sample = decode_sample(
            raw,
            shard=shard,
            row=row,
            expect=self.expect,
            noise_seed=seed,
            sample_latents=self.sample_latents,
            return_latent_std=self.return_latent_std,
        )
        sample["source"] = self.name  # the configured source name (weights, logs), not the file prefix
        sample["origin"] = (epoch, step)  # where the stream took it: sample_at(*origin) reads it again
        return sample

    _PLAN_FIELDS = ("_plan_epoch", "_epoch_shards", "_first", "_stride", "_starts", "_n", "_order")

    def sample_at(self, epoch: int, step: int) -> dict:
        """The sample this stream took at (epoch, step), read again by random access with the same latent noise
        (a batch builder's open, not yet emitted, samples are restored this way); the stream does not move."""
        saved = {f: getattr(self, f, None) for f in self._PLAN_FIELDS}
        try:
            self._plan(epoch)
            target = int(self._order[step])
            shard, row = self._locate(target)
            return self._decode(read_row(shard, row, self.storage_options), target, epoch, step)
        except BadSample as bad:
            raise RuntimeError(
                f"source {self.name}: restoring the sample of epoch {epoch} step {step}: {bad}"
            ) from None
        finally:
            for f, v in saved.items():
                setattr(self, f, v)
