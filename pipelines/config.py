"""The encode job's configuration: kw_only dataclasses with validation, loaded from YAML (configs/pipeline/)."""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field

import yaml

from encoders.models import ModelsConfig
from schemas import SOURCES
from shards.profiles import StorageProfile

_RES_RE = re.compile(r"^\d+x\d+$")


def _check_resolution(option: str, tag: str) -> str:
    if not isinstance(tag, str) or not _RES_RE.match(tag):
        raise ValueError(f"{option}={tag!r}: use WIDTHxHEIGHT, e.g. 256x256, 512x320 or 1024x576")
    w, h = (int(v) for v in tag.split("x"))
    if w % 8 or h % 8 or w < 8 or h < 8:
        raise ValueError(f"{option}={tag!r}: width and height must be positive multiples of 8 (VAE factor)")
    return tag


def _check_host(entry) -> str:
    """A fetch.allowed_hosts entry, normalized: "host" or "host:port" (IPv6 as "[::1]:80"), lowercase."""
    from urllib.parse import urlsplit

    text = str(entry).strip().lower() if isinstance(entry, (str, int)) else ""
    try:
        parts = urlsplit("//" + text)
        host, port = parts.hostname, parts.port
    except ValueError:
        host, port = None, None
    if not text or not host or any(c in text for c in "/?#@ ") or parts.netloc != text:
        raise ValueError(f"fetch.allowed_hosts: {entry!r} is not a host or host:port (e.g. 127.0.0.1:8765)")
    host = host.rstrip(".")
    shown = f"[{host}]" if ":" in host else host
    return shown if port is None else f"{shown}:{port}"


@dataclass(kw_only=True)
class SourceConfig:
    """One dataset to encode: its manifest, where its media lives, and the resolution stages to write."""

    name: str  # webvid | laion_coco | jdb
    manifest: str  # the dataset's own metadata file (CSV / parquet / JSONL), local or fsspec URL
    media_root: str | None = None  # folder holding the media (WebVid videos, JDB imgs/); None: use the URLs
    url_rewrite: dict[str, str] = field(default_factory=dict)  # URL prefix -> replacement prefix
    serve_root: str | None = None  # serve this folder on 127.0.0.1 while the job runs (demo/tests) ...
    serve_prefix: str | None = None  # ... and rewrite URLs starting with this prefix to that server
    resolutions: list[str] = field(default_factory=lambda: ["256x256"])  # output stages, "WxH" each
    rows_per_shard: int = 1000  # input rows per shard (= the target samples per output shard)
    shard_target_bytes: int | None = None  # if set, rows_per_shard is derived from it (estimate)
    max_rows: int | None = None  # only the first max_rows manifest rows (None: all)

    def __post_init__(self):
        if self.name not in SOURCES:
            raise ValueError(f"sources[].name={self.name!r}: use one of {', '.join(SOURCES)}")
        if not self.manifest:
            raise ValueError(f"sources[{self.name}].manifest is empty: give the dataset's metadata file")
        if not self.resolutions:
            raise ValueError(f"sources[{self.name}].resolutions is empty: list at least one WxH stage")
        for tag in self.resolutions:
            _check_resolution(f"sources[{self.name}].resolutions", tag)
        if int(self.rows_per_shard) < 1:
            raise ValueError(f"sources[{self.name}].rows_per_shard={self.rows_per_shard}: must be >= 1")
        if self.max_rows is not None and int(self.max_rows) < 0:
            raise ValueError(f"sources[{self.name}].max_rows={self.max_rows}: must be >= 0 or null")
        if (self.serve_root is None) != (self.serve_prefix is None):
            raise ValueError(f"sources[{self.name}]: set serve_root and serve_prefix together (or neither)")
        if not isinstance(self.url_rewrite, dict):
            raise ValueError(f"sources[{self.name}].url_rewrite must be a mapping of prefix -> prefix")


@dataclass(kw_only=True)
class FetchConfig:
    """How media bytes are fetched (fsspec: local, file://, http(s)://, s3://, gs://)."""

    connect_timeout_s: float = 10.0  # TCP connect timeout (http)
    read_timeout_s: float = 30.0  # max wait for the next bytes (http)
    total_timeout_s: float = 120.0  # max time for one file, all bytes (every scheme)
    retries: int = 3  # attempts after the first, for timeouts, 5xx and connection errors
    backoff_s: float = 0.5  # first retry wait; doubles each retry
    max_bytes: int = 512 * 1024 * 1024  # files larger than this are rejected as too_large
    threads: int = 16  # concurrent fetches per fetch worker
    # Manifest URLs are untrusted (web scrapes): what they may point at.
    allow_local: bool = False  # local paths / file:// anywhere (default: only under media_root or a local
    # url_rewrite target of the row's source, checked on the real path)
    allow_private_networks: bool = False  # http(s) to loopback/private/link-local/... addresses (default: no)
    allowed_hosts: list[str] = field(default_factory=list)  # "host" or "host:port" (names or IP literals)
    # fetched over http(s) whatever they resolve to, e.g. ["127.0.0.1:8765"]
    schemes: list[str] = field(default_factory=lambda: ["http", "https"])  # URL schemes manifests may
    # use, e.g. add "s3", "gs"; local paths follow allow_local/media_root (never listed here)
    max_redirects: int = 5  # http(s) redirects followed (each hop is checked again)

    def __post_init__(self):
        for name in ("connect_timeout_s", "read_timeout_s", "total_timeout_s", "max_bytes", "threads"):
            if getattr(self, name) <= 0:
                raise ValueError(f"fetch.{name}={getattr(self, name)}: must be > 0")
        if self.retries < 0 or self.backoff_s < 0:
            raise ValueError("fetch.retries and fetch.backoff_s must be >= 0")
        for name in ("allow_local", "allow_private_networks"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"fetch.{name}={getattr(self, name)!r}: must be true or false")
        if (
            not isinstance(self.max_redirects, int)
            or isinstance(self.max_redirects, bool)
            or self.max_redirects < 0
        ):
            raise ValueError(f"fetch.max_redirects={self.max_redirects!r}: must be an integer >= 0")
        if not isinstance(self.schemes, (list, tuple)) or not all(isinstance(s, str) for s in self.schemes):
            raise ValueError(
                f"fetch.schemes={self.schemes!r}: must be a list of URL schemes, e.g. [http, https]"
            )
        self.schemes = [s.strip().lower().removesuffix("://") for s in self.schemes]
        for scheme in self.schemes:
            if not re.fullmatch(r"[a-z][a-z0-9+.-]*", scheme):
                raise ValueError(f"fetch.schemes: {scheme!r} is not a URL scheme (e.g. http, https, s3, gs)")
            if scheme == "file":
                raise ValueError(
                    "fetch.schemes: 'file' is not listed here; local paths are allowed under a source's "
                    "media_root / local url_rewrite target, or anywhere with fetch.allow_local: true"
                )
        if not isinstance(self.allowed_hosts, (list, tuple)):
            raise ValueError(
                f"fetch.allowed_hosts={self.allowed_hosts!r}: must be a list of host or host:port"
            )
        self.allowed_hosts = [_check_host(h) for h in self.allowed_hosts]


@dataclass(kw_only=True)
class DecodeConfig:
    """Clip sampling, resizing and the guard around the decoder."""

    num_frames: int = 16  # frames per video clip (VideoCrafter: 16)
    frame_stride: int | None = 4  # take every n-th frame ...
    target_fps: float | None = None  # ... or choose the stride that gives about this fps (overrides stride)
    adapt_stride: bool = True  # lower the stride for videos too short for the full span
    start: str = "random"  # clip start: random (seeded by the key) | start | center
    # video decoder: pyav | decord; the same frames for the same indices. pyav is the default: its stage was
    # 1.00-1.06x the faster bare library on every set of benchmarks/bench_decode.py, decord's 0.87-0.95x
    backend: str = "pyav"
    decode_resize: bool = True  # let the backend scale while decoding when the video is >= 2x the needed size
    bucketing: bool = False  # resize to the nearest aspect bucket instead of the stage's own size
    buckets: dict[str, list[str]] = field(default_factory=dict)  # stage -> bucket sizes (default: derived)
    timeout_s: float = 60.0  # per item; a decoder that takes longer is killed (reason decode_timeout)
    memory_limit_mb: int = (
        8192  # address space the decoder may map beyond its loaded libraries (runaway memory)
    )
    decoder_threads: int = 1  # decoding threads (decord or FFmpeg via PyAV) inside the decoder process
    # Caps on untrusted media, checked on headers before any pixel is decoded (docs/design.md).
    # Images (too_many_pixels): 100 MP; decoded as RGBA that is ~0.4 GB, well within memory_limit_mb.
    max_pixels: int = 100_000_000
    # Videos (video_too_large): per frame 8K UHD; 16 frames at that size ~1.6 GB before the resize.
    max_video_pixels: int = 7680 * 4320
    max_video_side: int = 8192  # width or height (video_too_large): H.264/HEVC level 6.2's widest
    max_duration_s: float | None = 3600.0  # seconds (too_long); None: no cap
    max_frames: int | None = 1_000_000  # source frames (too_long): decord indexes every frame; None: no cap

    def __post_init__(self):
        if int(self.num_frames) < 1:
            raise ValueError(f"decode.num_frames={self.num_frames}: must be >= 1")
        if self.frame_stride is not None and int(self.frame_stride) < 1:
            raise ValueError(f"decode.frame_stride={self.frame_stride}: must be >= 1")
        if self.target_fps is not None and float(self.target_fps) <= 0:
            raise ValueError(f"decode.target_fps={self.target_fps}: must be > 0")
        if self.frame_stride is None and self.target_fps is None:
            raise ValueError("decode: set frame_stride or target_fps")
        if self.start not in ("random", "start", "center"):
            raise ValueError(f"decode.start={self.start!r}: use random, start or center")
        if self.backend not in ("decord", "pyav"):
            raise ValueError(f"decode.backend={self.backend!r}: use decord or pyav")
        if self.timeout_s <= 0 or self.memory_limit_mb < 256:
            raise ValueError("decode.timeout_s must be > 0 and decode.memory_limit_mb >= 256")
        for name in ("max_pixels", "max_video_pixels", "max_video_side", "max_duration_s", "max_frames"):
            if getattr(self, name) is not None and getattr(self, name) <= 0:
                raise ValueError(f"decode.{name}={getattr(self, name)}: must be > 0")
        for stage, sizes in self.buckets.items():
            _check_resolution("decode.buckets key", stage)
            for tag in sizes:
                _check_resolution(f"decode.buckets[{stage}]", tag)


@dataclass(kw_only=True)
class FilterConfig:
    """Quality thresholds; a row failing one becomes an error row (stage filter, reason = the option)."""

    min_duration: float | None = None  # seconds (videos)
    min_width: int | None = None  # original pixel size (min_resolution)
    min_height: int | None = None
    max_punsafe: float | None = None  # LAION-COCO fields; rows without the field pass
    max_pwatermark: float | None = None
    min_similarity: float | None = None
    min_clip_score: float | None = None  # CLIP text-image cosine from the encoders

    def __post_init__(self):
        for name in ("max_punsafe", "max_pwatermark", "min_similarity"):
            value = getattr(self, name)
            if value is not None and not 0.0 <= float(value) <= 1.0:
                raise ValueError(f"filters.{name}={value}: must be within [0, 1]")
        for name in ("min_duration", "min_width", "min_height"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ValueError(f"filters.{name}={value}: must be >= 0")


@dataclass(kw_only=True)
class DedupConfig:
    """Near-duplicate removal over the stored pooled CLIP embeddings (`latentcrafter dedup`, run after the job)."""

    enabled: bool = False  # run the dedup step at the end of the job (out_dir/dedup/{source}-{stage}.parquet)
    threshold: float = 0.95  # cosine similarity above which a later sample duplicates an earlier one
    embedding: str = "image"  # image (image_pooled) | text (text_pooled)

    def __post_init__(self):
        if not -1.0 <= float(self.threshold) <= 1.0:
            raise ValueError(f"dedup.threshold={self.threshold}: must be a cosine within [-1, 1]")
        if self.embedding not in ("image", "text"):
            raise ValueError(f"dedup.embedding={self.embedding!r}: use image or text")


@dataclass(kw_only=True)
class RayConfig:
    """Where the job runs and how much of the cluster each part gets.

    The job runs one Ray task per input shard, end to end on a worker (read its manifest span, fetch,
    decode, filter, write the output shard), calling a pool of encoder actors (a GPU each when there are
    GPUs) for the frozen encoders; the driver only plans, schedules and collects per-shard summaries.
    """

    address: str = (
        "auto"  # auto: join a running cluster if any, else embedded | local: always embedded | ADDR
    )
    num_cpus: int | None = None  # embedded Ray only (None: all cores)
    object_store_memory_mb: int | None = None  # embedded Ray only (None: Ray's default)
    dashboard: bool = False  # embedded Ray: start the dashboard (bound to 127.0.0.1)
    shard_tasks: int | None = None  # shard tasks running at once; None: the CPUs the encoders leave free
    cpus_per_shard_task: float = 1.0  # a shard task's decoder process is CPU-bound
    task_retries: int = 3  # a shard task whose worker dies is rerun from scratch this many times
    encode_actors: int | None = None  # encoder actors; None: one per GPU (GPU cluster), else 1
    encode_batch_size: int = 8  # rows per encoder call
    gpus_per_actor: float | None = None  # None: 1 when the cluster has GPUs, else 0 (CPU)
    cpus_per_encode_actor: float = 1.0
    rows_per_unit: int = 8  # rows a shard task decodes together (the next unit is fetched meanwhile)
    plan_tasks: int = 8  # manifest files planned at once (one Ray task per file)
    worker_logs: bool = False  # forward the workers' stdout/stderr to the driver's terminal
    progress: bool = True  # progress bar on the driver

    def __post_init__(self):
        for name in ("encode_batch_size", "rows_per_unit", "plan_tasks"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"ray.{name}={getattr(self, name)}: must be >= 1")
        for name in ("shard_tasks", "encode_actors"):
            value = getattr(self, name)
            if value is not None and int(value) < 1:
                raise ValueError(f"ray.{name}={value}: must be >= 1 or null (automatic)")
        if self.task_retries < 0 or self.cpus_per_shard_task <= 0 or self.cpus_per_encode_actor < 0:
            raise ValueError(
                "ray.task_retries must be >= 0, ray.cpus_per_shard_task > 0, cpus_per_encode_actor >= 0"
            )
        if self.object_store_memory_mb is not None and self.object_store_memory_mb < 75:
            raise ValueError(f"ray.object_store_memory_mb={self.object_store_memory_mb}: Ray needs >= 75")


@dataclass(kw_only=True)
class PipelineConfig:
    """The whole encode job: sources -> fetch -> decode -> filter -> encode -> dedup -> write."""

    out_dir: str  # where shards, errors, embeddings and summary.json go (local path or fsspec URL)
    sources: list[SourceConfig]
    models: ModelsConfig
    fetch: FetchConfig = field(default_factory=FetchConfig)
    decode: DecodeConfig = field(default_factory=DecodeConfig)
    filters: FilterConfig = field(default_factory=FilterConfig)
    dedup: DedupConfig = field(default_factory=DedupConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    clip_retrieval: bool = True  # write pooled embeddings in clip-retrieval's layout under out_dir/embeddings
    seed: int = 0  # clip start positions derive from (seed, key)
    # what each sample stores: a named profile (full, compact, lean) or {latent, image, text}; see
    # shards.profiles. full keeps everything as float16; lean stores <= 0.5 MB per 512x320x16 video
    storage: StorageProfile | str | dict = "full"

    def __post_init__(self):
        if not self.out_dir:
            raise ValueError("out_dir is empty: give the folder the shards go to")
        if not self.sources:
            raise ValueError("sources is empty: list at least one of webvid, laion_coco, jdb")
        self.storage = StorageProfile.parse(self.storage)
        if self.storage.image == "frame" and not self.models.image_tokens:
            raise ValueError(
                "storage.image=frame stores the Image2Video conditioning frame, which this job does not "
                "compute: set models.image_tokens: true, or storage.image: tokens"
            )
        names = [s.name for s in self.sources]
        if len(set(names)) != len(names):
            raise ValueError(f"sources: each dataset may appear once, got {names}")


_SECTIONS = {
    "fetch": FetchConfig,
    "decode": DecodeConfig,
    "filters": FilterConfig,
    "dedup": DedupConfig,
    "ray": RayConfig,
    "models": ModelsConfig,
}


def _build(cls, values, where: str):
    if isinstance(values, cls):
        return values
    if not isinstance(values, dict):
        raise ValueError(f"{where}: expected a mapping, got {type(values).__name__}")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"{where}: unknown option(s) {unknown}; known: {sorted(known)}")
    return cls(**values)


def config_from_dict(data: dict) -> PipelineConfig:
    """A PipelineConfig from a plain dict (the parsed YAML); unknown keys are errors naming the option."""
    if not isinstance(data, dict):
        raise ValueError("the pipeline config must be a mapping at the top level")
    data = dict(data)
    kwargs = {}
    for name, cls in _SECTIONS.items():
        if name in data:
            kwargs[name] = _build(cls, data.pop(name) or {}, name)
    if "models" not in kwargs:
        raise ValueError("models: missing; give models.model_dir (or models.tiny: true)")
    sources = data.pop("sources", None) or []
    kwargs["sources"] = [_build(SourceConfig, s, f"sources[{i}]") for i, s in enumerate(sources)]
    known = {f.name for f in dataclasses.fields(PipelineConfig)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"unknown top-level option(s) {unknown}; known: {sorted(known)}")
    kwargs.update(data)
    return PipelineConfig(**kwargs)


def load_config(path: str, overrides: list[str] | None = None) -> PipelineConfig:
    """Load a YAML config; `overrides` are "dotted.key=value" strings (value parsed as YAML)."""
    with open(path) as f:
        data = yaml.safe_load(f) or {}
    for item in overrides or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"override {item!r}: use dotted.key=value, e.g. ray.num_cpus=2")
        node = data
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = yaml.safe_load(value)
    return config_from_dict(data)


def to_dict(config: PipelineConfig) -> dict:
    """The config as plain data (for summary.json and Ray task arguments)."""
    return dataclasses.asdict(config)
