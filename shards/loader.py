"""ShardLoader: the trainer's iterator over latent shards (rank/worker split, mixing, interleave, resume).

Pipeline per reader slot (rank r, worker w; slot = r * num_workers + w of world_size * num_workers):
expand URLs (webdataset brace syntax, fsspec globs) -> parquet indexes (counts, offsets, encoder
ids; the keys in <folder>/dedup/{source}-{stage}.parquet, written by `latentcrafter dedup`, are dropped
from the index rows, so they are never read and positions/resume count only the remaining samples) ->
per source: seeded shard order, the slot's shards (or every n-th sample when a source has
fewer shards than slots), buffer shuffle, index-guided tar reads (webdataset's tar iterator when an
index has no offsets), decode + checks + latent sampling (shards.reader, shards.decode,
shards.resume) -> weighted source mix per kind -> image/video batch schedule -> collate
(shards.mixing).

Determinism and resume (granularity: the batch). The stream of a rank is a pure function of
(seed, config, rank, world_size, num_workers). Batch b of a rank comes from logical worker
b % num_workers; with a torch DataLoader the workers' outputs arrive round-robin, so the order is
fixed. Every batch carries its worker's state after producing it (per-source epoch and shuffle step,
mixer draws, bad-sample counts: a few integers); the loader keeps the state of the last batch it
handed out per worker. `state_dict()` is that plus the number of batches handed out. After
`load_state_dict()` each worker seeks its sources (see shards.resume: whole shards are skipped via
the index, the shuffle buffer is refilled by random access) and the DataLoader worker ids are
rotated so that the next batch again comes from worker (batches % num_workers). Restoring needs the
same seed, sources, batch sizes, world_size and num_workers; each rank saves and loads its own state.

Aspect buckets (`LoaderConfig.bucketing`, shards.buckets): each worker's BatchBuilder keeps one open batch
per (kind, bucket) and emits the first to fill, of the kind the schedule names; the open batches are in
the worker state as (source, epoch, step) per waiting sample and are read again on restore. Off, the
builder, the state and the batches are exactly those of the unbucketed loader.
"""

from __future__ import annotations

import copy
import logging
import time
from collections import Counter

from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from shards.config import LoaderConfig, SourceSpec
from shards.decode import BadSampleHandler, RunExpectations
from shards.mixing import KINDS, BatchBuilder, KindSchedule, SourceMixer
from shards.profiles import PROFILES
from shards.reader import (
    ShardInfo,
    ShardMismatchError,
    count_samples,
    expand_shard_urls,
    read_shard_infos,
)
from shards.resume import SourceStream

__all__ = ["LoaderConfig", "ShardLoader", "SourceSpec", "ShardMismatchError", "count_samples"]

log = logging.getLogger(__name__)
STATE_VERSION = 1


def _identity(x):
    return x


def _index_sources(config: LoaderConfig) -> dict[str, list[ShardInfo]]:
    """Read the index of every shard of every source; refuse foreign stages and mixed kinds."""
    shards = {}
    for spec in config.sources:
        if spec.weight <= 0:
            continue
        infos = []
        urls = expand_shard_urls(spec.urls, stage=config.stage, storage_options=config.storage_options)
        found = read_shard_infos(urls, config.storage_options, dedup=config.skip_duplicates)
        removed = sum(len(i.removed) for i in found if i is not None)
        if removed:
            log.info("source %s: %d samples removed by the dedup step are skipped", spec.name, removed)
        for url, info in zip(urls, found):
            if info is None:
                log.warning("source %s: %s has no index parquet (shard not done); skipped", spec.name, url)
                continue
            if info.num_samples == 0:
                continue  # every input row of this shard was rejected or removed: nothing to read
            if info.stage != config.stage:
                raise ShardMismatchError(
                    f"{url}: stage {info.stage} but LoaderConfig.stage is {config.stage}; "
                    f"give source {spec.name!r} the {config.stage} shard set"
                )
            infos.append(info)
        if not infos:
            raise FileNotFoundError(f"source {spec.name!r}: no finished shard (tar + index) in {spec.urls}")
        kinds = {i.kind for i in infos}
        if len(kinds) > 1:
            raise ShardMismatchError(
                f"source {spec.name!r} mixes kinds {sorted(kinds)}; split it into two sources"
            )
        shards[spec.name] = infos
    _check_profiles(config, shards)
    return shards


def _check_profiles(config: LoaderConfig, shards: dict[str, list[ShardInfo]]) -> None:
    """One storage profile for the whole run unless LoaderConfig.mixed_profiles; else a ShardMismatchError
    naming the profiles, a few shards of each and the options."""
    found: dict[str, list[str]] = {}
    for infos in shards.values():
        for info in infos:
            found.setdefault(info.profile.name, []).append(info.url)
    if len(found) <= 1 or config.mixed_profiles:
        if len(found) > 1:
            log.info("storage profiles %s: each shard is read by its own", sorted(found))
        return
    listing = "; ".join(
        f"{name}: {len(urls)} shard(s), e.g. {', '.join(urls[:2])}" for name, urls in sorted(found.items())
    )
    raise ShardMismatchError(
        f"the shards mix storage profiles ({listing}). Re-encode them with one `storage` profile (the encode "
        "job's option), or set LoaderConfig.mixed_profiles (data.mixed_profiles in a training config) to "
        "read each shard by its own profile"
    )


def _expectations(config: LoaderConfig, shards: dict[str, list[ShardInfo]]) -> RunExpectations:
    """The run's encoder ids and scale factor: the configured ones, else the first shard's; all shards checked."""
    first = next(iter(shards.values()))[0]

    def pick(want, got):
        return want if want is not None else got

    expect = RunExpectations(
        stage=config.stage,
        vae_id=pick(config.expect_vae_id, first.vae_id),
        text_encoder_id=pick(config.expect_text_encoder_id, first.text_encoder_id),
        scale_factor=pick(config.expect_scale_factor, first.scale_factor),
        vae_downsample=config.vae_downsample,
        buckets=tuple(config.bucket_tags()) if config.bucketing else None,
    )
    for infos in shards.values():
        for info in infos:
            expect.check_shard(info)
    return expect


class _RankStream(IterableDataset):
    """The batches of one rank; under a DataLoader each worker process builds its own slice."""

    def __init__(self, loader: ShardLoader, worker_states: dict, rotation: int):
        self.config, self.shards, self.expect = loader.config, loader.shards, loader.expect
        self.rank, self.world_size = loader.rank, loader.world_size
        self.num_workers = max(1, loader.config.num_workers)
        self.worker_states, self.rotation = worker_states, rotation

    def build(self, worker: int) -> BatchBuilder:
        cfg = self.config
        handler = BadSampleHandler(cfg.on_bad_sample, cfg.max_bad_samples_logged_per_minute)
        slot = self.rank * self.num_workers + worker
        mixers = {}
        for kind in KINDS:
            specs = [s for s in cfg.sources if s.name in self.shards and self.shards[s.name][0].kind == kind]
            if not specs:
                continue
            streams = [
                SourceStream(
                    s.name,
                    self.shards[s.name],
                    slot=slot,
                    num_slots=self.world_size * self.num_workers,
                    seed=cfg.seed,
                    shuffle_buffer=cfg.shuffle_buffer,
                    shard_shuffle=cfg.shard_shuffle,
                    resampled=cfg.resampled,
                    sample_latents=cfg.sample_latents,
                    return_latent_std=cfg.return_latent_std,
                    expect=self.expect,
                    handler=handler,
                    storage_options=cfg.storage_options,
                )
                for s in specs
            ]
            mixers[kind] = SourceMixer(kind, streams, [s.weight for s in specs], cfg.seed, slot)
        schedule = KindSchedule(cfg.schedule, cfg.image_per_video, cfg.seed, set(mixers))
        builder = BatchBuilder(
            mixers, schedule, cfg, worker=worker, num_workers=self.num_workers, handler=handler
        )
        if worker in self.worker_states:
            builder.load_state_dict(self.worker_states[worker])
        return builder

    def __iter__(self):
        info = get_worker_info()
        worker = ((info.id if info else 0) + self.rotation) % self.num_workers
        builder = self.build(worker)
        while True:
            try:
                batch = builder.next_batch()
            except StopIteration:
                return
            batch["_worker"] = worker
            batch["_state"] = builder.state_dict()
            yield batch


class ShardLoader:
    """Iterate trainer batches from latent shards; `state_dict()`/`load_state_dict()` resume exactly.

    `stats` holds {"batches", "samples", "bad_samples", "bad_samples_by_reason", "data_wait_s"} for training
    logs (bad_samples_by_reason: skipped samples per shards.reader.BAD_REASONS key; "bad_reasons" is an alias);
    `num_samples` the samples per source and `kinds` the kind of each source, from the indexes.
    """

    def __init__(self, config: LoaderConfig, *, rank: int = 0, world_size: int = 1):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        self.config, self.rank, self.world_size = config, rank, world_size
        self.shards = _index_sources(config)
        self.expect = _expectations(config, self.shards)
        self.num_samples = {name: sum(i.num_samples for i in infos) for name, infos in self.shards.items()}
        self.kinds = {name: infos[0].kind for name, infos in self.shards.items()}
        slots = world_size * max(1, config.num_workers)
        for name, infos in self.shards.items():
            if len(infos) < slots:
                log.info(
                    "source %s: %d shards < %d readers: split by sample, not by shard",
                    name,
                    len(infos),
                    slots,
                )
        self._batches = 0
        self._worker_states: dict[int, dict] = {}
        self._data_wait = 0.0

    # ------------------------------------------------------------ iteration

    def __iter__(self):
        cfg = self.config
        workers = max(1, cfg.num_workers)
        dataset = _RankStream(self, copy.deepcopy(self._worker_states), self._batches % workers)
        if cfg.num_workers == 0:
            source = iter(dataset)
        else:
            source = iter(
                DataLoader(
                    dataset,
                    batch_size=None,
                    num_workers=cfg.num_workers,
                    collate_fn=_identity,
                    prefetch_factor=cfg.prefetch_factor,
                )
            )
        while True:
            start = time.perf_counter()
            try:
                batch = next(source)
            except StopIteration:
                return
            self._data_wait += time.perf_counter() - start
            self._worker_states[batch.pop("_worker")] = batch.pop("_state")
            self._batches += 1
            yield batch

    # ------------------------------------------------------------ stats and state

    @property
    def stats(self) -> dict:
        bad = Counter()
        for state in self._worker_states.values():
            bad.update(state.get("bad", {}))
        return {
            "batches": self._batches,
            "samples": sum(s["samples"] for s in self._worker_states.values()),
            "bad_samples": sum(bad.values()),
            "bad_samples_by_reason": dict(bad),
            "bad_reasons": dict(bad),  # the same counts, under their older name
            "data_wait_s": self._data_wait,
        }

    def _fingerprint(self) -> dict:
        cfg = self.config
        profiles = {p for ps in self.profiles.values() for p in ps}  # full only: as saved before profiles
        return {
            "seed": cfg.seed,
            "stage": cfg.stage,
            "rank": self.rank,
            "world_size": self.world_size,
            "num_workers": cfg.num_workers,
            "sources": {n: [len(i), self.num_samples[n]] for n, i in self.shards.items()},
            "batch_sizes": [cfg.video_batch_size, cfg.image_batch_size],
            "schedule": [cfg.schedule, cfg.image_per_video],
            "shuffle": [cfg.shuffle_buffer, cfg.shard_shuffle, cfg.resampled],
            "latents": [cfg.sample_latents, cfg.return_latent_std],
            **({"profiles": sorted(p.name for p in profiles)} if profiles != {PROFILES["full"]} else {}),
            **({"buckets": self.bucket_batch_sizes()} if cfg.bucketing else {}),
        }

    @property
    def profiles(self) -> dict[str, list]:
        """{source: [StorageProfile, ...]} of the shards this loader reads."""
        return {n: sorted({i.profile for i in infos}, key=str) for n, infos in self.shards.items()}

    def needs_encoders(self) -> dict[str, bool]:
        """Which frozen encoders the trainer must run for these shards: {"text": any text=caption,
        "image": any image=frame}."""
        profiles = [p for ps in self.profiles.values() for p in ps]
        return {
            "text": any(p.text == "caption" for p in profiles),
            "image": any(p.image == "frame" for p in profiles),
        }

    def bucket_batch_sizes(self) -> dict[str, dict[str, int]]:
        """{"WxH": {kind: batch size}} of the buckets this loader accepts (bucketing on), per kind it serves."""
        kinds = [k for k in KINDS if k in self.kinds.values()]
        return {t: {k: self.config.bucket_batch_size(k, t) for k in kinds} for t in self.config.bucket_tags()}

    def state_dict(self) -> dict:
        """Position after the last batch handed out: plain ints/dicts (JSON- and torch.save-able)."""
        return {
            "version": STATE_VERSION,
            "batches": self._batches,
            "workers": copy.deepcopy(self._worker_states),
            "data_wait_s": self._data_wait,
            "config": self._fingerprint(),
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue exactly where `state` was saved; the next iteration yields the batches that followed."""
        if not isinstance(state, dict):
            raise ValueError(
                f"loader state must be the dict of ShardLoader.state_dict(), got {type(state).__name__}"
            )
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"loader state version {state.get('version')} != {STATE_VERSION}")
        mine = self._fingerprint()
        diff = {k: (state["config"].get(k), v) for k, v in mine.items() if state["config"].get(k) != v}
        if diff:
            raise ValueError(
                "loader state was saved with another configuration; resume needs the same "
                + ", ".join(f"{k} (saved {a}, now {b})" for k, (a, b) in diff.items())
            )
        self._batches = int(state["batches"])
        self._worker_states = {int(k): v for k, v in state["workers"].items()}
        self._data_wait = float(state.get("data_wait_s", 0.0))
