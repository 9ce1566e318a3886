"""Configuration of the shard loader: the sources to read and how to shuffle, mix, batch and check them."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from shards.buckets import default_buckets, parse_bucket_sizes, pixel_budget_batch_size
from shards.format import RESOLUTIONS, parse_resolution, resolution_tag


@dataclass(kw_only=True)
class SourceSpec:
    """One data source: a set of shards of one dataset (e.g. WebVid) and its mixing weight."""

    # Source name (the shard prefix, e.g. "webvid"); also seeds the source's generators.
    name: str
    # Tar URLs: local paths, globs ("*.tar"), brace patterns ("x-{000000..000009}.tar"), fsspec URLs.
    # "{stage}" is replaced by the loader's stage. Index parquets are found beside the tars.
    urls: list[str]
    # Relative weight among the sources of the same kind (video or image). 0 disables the source.
    weight: float = 1.0

    def __post_init__(self):
        if not re.fullmatch(r"[a-z0-9_]+", str(self.name)):
            raise ValueError(f"SourceSpec.name {self.name!r} must match [a-z0-9_]+ (the shard prefix)")
        if isinstance(self.urls, str):
            self.urls = [self.urls]
        if not self.urls:
            raise ValueError(f"SourceSpec.urls of source {self.name!r} is empty; give tar paths or patterns")
        if not self.weight >= 0:
            raise ValueError(f"SourceSpec.weight of source {self.name!r} must be >= 0, got {self.weight}")


@dataclass(kw_only=True)
class LoaderConfig:
    """Everything ShardLoader needs. Sizes are small-able so tests can shrink them."""

    # The sources; which are video and which image comes from the index `kind` column.
    sources: list[SourceSpec]
    # Resolution stage tag "WxH" ("256x256", "512x320", "1024x576"); shards of other stages are refused.
    stage: str
    # Samples per video batch ([B,C,T,h,w]) and per image batch (T=1; images are cheaper, so larger).
    video_batch_size: int
    image_batch_size: int
    # "ratio": deterministic pattern with image_per_video image batches per video batch (1.0 -> V I V I);
    # "probability": each batch is an image batch with probability image_per_video / (1 + image_per_video).
    schedule: str = "ratio"
    image_per_video: float = 1.0
    # Sample shuffle buffer size (per source, per worker); 1 disables sample shuffling.
    shuffle_buffer: int = 64
    # Shuffle the shard order each epoch (seeded by seed, source name, epoch).
    shard_shuffle: bool = True
    # torch DataLoader worker processes per rank (0: read in the training process).
    num_workers: int = 0
    # Batches each DataLoader worker prepares ahead.
    prefetch_factor: int = 2
    # True: endless stream, epoch after epoch (training). False: one bounded pass (evaluation).
    resampled: bool = True
    # Root seed of every generator (shard order, shuffle, mixing, schedule, latent noise).
    seed: int = 0
    # fps given to image batches (the fps conditioning of a still image).
    image_fps: float = 8.0
    # The run's encoders; a shard whose value differs raises naming the shard. None: take the first
    # shard's value and require every other shard to match it.
    expect_vae_id: str | None = None
    expect_text_encoder_id: str | None = None
    expect_scale_factor: float | None = None
    # True: latent = scale * (mean + std * eps) with a seeded eps; False: scale * mean (evaluation).
    sample_latents: bool = True
    # True: batches also carry "latent_std" (= scale * std) and latent is scale * mean, so the trainer
    # draws eps on its device (CPU noise is the loader's main cost). Needs sample_latents=False.
    return_latent_std: bool = False
    # Pixels per latent cell of the VAE (8 for SD); used to check latent shapes against the stage.
    vae_downsample: int = 8
    # Bad samples (truncated tar, bad member, undecodable array): "skip" counts and logs them,
    # "raise" re-raises (for debugging). Encoder/stage mismatches always raise.
    on_bad_sample: str = "skip"
    # Cap on bad-sample log lines per minute (per process); the count in `stats` is always exact.
    max_bad_samples_logged_per_minute: int = 10
    # Skip the samples the dedup step removed (keys in <folder of the tars>/dedup/{source}-{stage}.parquet,
    # written by `latentcrafter dedup`). Adding or changing that file changes the sample counts, so a saved
    # loader state from before it no longer loads (the configuration check names the sources).
    skip_duplicates: bool = True
    # Extra keyword arguments for fsspec when opening URLs (e.g. {"anon": True}).
    storage_options: dict = field(default_factory=dict)
    # Shards of different storage profiles (shards.profiles) in one run: False refuses them, naming the
    # shards; True reads each shard by its own profile (e.g. mean-only images beside sampled videos).
    mixed_profiles: bool = False
    # Aspect buckets (shards encoded with decode.bucketing): group samples by (kind, latent size) so every
    # batch has one shape. False: every latent must have the stage's size (and batches are as before).
    bucketing: bool = False
    # The allowed buckets and their batch sizes: {"WxH": n} (both kinds) or {"WxH": {"video": n, "image": m}};
    # a kind left out gets the pixel budget. Empty: the stage's default buckets (the encode job's
    # default_buckets) with the pixel budget floor(batch_size(kind) * stage pixels / bucket pixels), >= 1.
    buckets: dict = field(default_factory=dict)

    def __post_init__(self):
        if not self.sources:
            raise ValueError("LoaderConfig.sources is empty; give at least one SourceSpec")
        self.sources = [s if isinstance(s, SourceSpec) else SourceSpec(**s) for s in self.sources]
        names = [s.name for s in self.sources]
        if len(set(names)) != len(names):
            raise ValueError(f"LoaderConfig.sources has duplicate names {names}")
        if not any(s.weight > 0 for s in self.sources):
            raise ValueError("LoaderConfig.sources: every weight is 0; give one source a positive weight")
        parse_resolution(self.stage)
        if self.stage not in RESOLUTIONS:
            raise ValueError(f"LoaderConfig.stage {self.stage!r} is not one of {sorted(RESOLUTIONS)}")
        for name in ("video_batch_size", "image_batch_size", "shuffle_buffer", "prefetch_factor"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"LoaderConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.schedule not in ("ratio", "probability"):
            raise ValueError(f"LoaderConfig.schedule must be 'ratio' or 'probability', got {self.schedule!r}")
        if not self.image_per_video >= 0:
            raise ValueError(f"LoaderConfig.image_per_video must be >= 0, got {self.image_per_video}")
        if self.num_workers < 0:
            raise ValueError(f"LoaderConfig.num_workers must be >= 0, got {self.num_workers}")
        if self.on_bad_sample not in ("skip", "raise"):
            raise ValueError(
                f"LoaderConfig.on_bad_sample must be 'skip' or 'raise', got {self.on_bad_sample!r}"
            )
        if self.return_latent_std and self.sample_latents:
            raise ValueError(
                "LoaderConfig.return_latent_std needs sample_latents=False (the trainer draws eps)"
            )
        if self.vae_downsample < 1:
            raise ValueError(f"LoaderConfig.vae_downsample must be >= 1, got {self.vae_downsample}")
        if not self.image_fps > 0:
            raise ValueError(f"LoaderConfig.image_fps must be > 0, got {self.image_fps}")
        self._bucket_sizes = parse_bucket_sizes(self.buckets)
        if self._bucket_sizes and not self.bucketing:
            raise ValueError("LoaderConfig.buckets is set but bucketing is False; set bucketing: true")
        if self.bucketing:
            for tag in self.bucket_tags():
                w, h = parse_resolution(tag)
                if w % self.vae_downsample or h % self.vae_downsample:
                    raise ValueError(
                        f"LoaderConfig bucket {tag} is not a multiple of vae_downsample {self.vae_downsample}"
                    )

    def batch_size(self, kind: str) -> int:
        """Batch size of a batch kind ("video" or "image")."""
        return self.video_batch_size if kind == "video" else self.image_batch_size

    def bucket_tags(self) -> list[str]:
        """The "WxH" buckets latents may have with bucketing on (the configured ones, else the stage's defaults)."""
        if self._bucket_sizes:
            return list(self._bucket_sizes)
        return [resolution_tag(w, h) for w, h in default_buckets(self.stage)]

    def bucket_batch_size(self, kind: str, bucket: str) -> int:
        """Batch size of a (kind, bucket): the configured one, else the pixel budget of batch_size(kind)."""
        size = self._bucket_sizes.get(bucket, {}).get(kind)
        return (
            int(size)
            if size is not None
            else pixel_budget_batch_size(self.batch_size(kind), self.stage, bucket)
        )
