"""Typed training configuration: a run is a list of phases (data, steps, trainable group) plus model/DeepSpeed/logging."""

from __future__ import annotations

import dataclasses
import os
import typing
import zlib
from dataclasses import dataclass, field

import yaml

from shards.config import LoaderConfig, SourceSpec
from shards.format import RESOLUTIONS
from trainer.diffusion.schedule import SignalScale

TRAINABLE = ("all", "spatial", "temporal", "lora")
LORA_TARGETS = ("spatial", "temporal", "all")


@dataclass(kw_only=True)
class DataConfig:
    """Where one phase's batches come from (becomes a shards LoaderConfig)."""

    # Sources: [{name, urls, weight}]; "{stage}" in urls is replaced by the phase's stage.
    sources: list[SourceSpec]
    # Samples per video batch (the micro batch) and per image batch (images are cheaper).
    video_batch_size: int = 1
    image_batch_size: int = 4
    # "ratio" (deterministic V I V I ...) or "probability"; image batches per video batch.
    schedule: str = "ratio"
    image_per_video: float = 1.0
    shuffle_buffer: int = 64
    # DataLoader worker processes per rank (0: read in the training process).
    num_workers: int = 2
    prefetch_factor: int = 2
    # fps conditioning given to image batches.
    image_fps: float = 8.0
    # Pixels per latent cell (8 for SD's VAE); used to check latent shapes.
    vae_downsample: int = 8
    # "skip" bad samples (count and log) or "raise".
    on_bad_sample: str = "skip"
    # Aspect buckets (shards encoded with decode.bucketing): batches grouped by (kind, bucket), one latent
    # shape each; buckets: {"WxH": n} or {"WxH": {video: n, image: m}} (default: the stage's buckets with
    # the pixel budget batch_size * stage pixels / bucket pixels). See shards.buckets.
    bucketing: bool = False
    buckets: dict = field(default_factory=dict)
    # Shards of different storage profiles in one phase: refused unless true (then each is read by its own
    # profile; the trainer encodes captions/frames where a sample has no tokens). See shards.profiles.
    mixed_profiles: bool = False
    # Train on latents drawn from the VAE posterior (mean + std * eps, VideoCrafter's encode_first_stage);
    # False: on the posterior mean, what shards of storage latent=mean always give (deterministic).
    sample_latents: bool = True

    def __post_init__(self):
        self.sources = [s if isinstance(s, SourceSpec) else SourceSpec(**s) for s in self.sources]
        if not self.sources:
            raise ValueError("phases[].data.sources is empty; give at least one {name, urls, weight}")

    def loader_config(self, *, stage: str, seed: int) -> LoaderConfig:
        return LoaderConfig(
            sources=self.sources,
            stage=stage,
            video_batch_size=self.video_batch_size,
            image_batch_size=self.image_batch_size,
            schedule=self.schedule,
            image_per_video=self.image_per_video,
            shuffle_buffer=self.shuffle_buffer,
            num_workers=self.num_workers,
            prefetch_factor=self.prefetch_factor,
            resampled=True,
            seed=seed,
            image_fps=self.image_fps,
            vae_downsample=self.vae_downsample,
            on_bad_sample=self.on_bad_sample,
            bucketing=self.bucketing,
            buckets=dict(self.buckets),
            mixed_profiles=self.mixed_profiles,
            # the loader hands over the VAE mean and std; the trainer draws the latent on its device
            # (trainer.phases.sample_latent): cheaper than a CPU draw per sample in the loader
            sample_latents=False,
            return_latent_std=self.sample_latents,
        )


@dataclass(kw_only=True)
class OptimConfig:
    """AdamW and the learning-rate schedule of one phase."""

    lr: float = 6.0e-5  # peak learning rate (VideoCrafter: 6e-5 .. 1e-4)
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1.0e-8
    warmup_steps: int = 0  # linear warmup from 0 over this many optimizer steps
    schedule: str = "constant"  # after warmup: constant | cosine | linear (to min_lr_ratio * lr)
    min_lr_ratio: float = 0.0
    grad_clip: float = 1.0  # global gradient-norm clip (0: off)

    def __post_init__(self):
        self.betas = tuple(float(b) for b in self.betas)
        if not self.lr > 0:
            raise ValueError(f"optim.lr must be > 0, got {self.lr}")
        if self.schedule not in ("constant", "cosine", "linear"):
            raise ValueError(f"optim.schedule must be constant, cosine or linear, got {self.schedule!r}")
        if self.warmup_steps < 0 or self.grad_clip < 0 or not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(
                "optim.warmup_steps and optim.grad_clip must be >= 0, optim.min_lr_ratio in [0, 1]"
            )


@dataclass(kw_only=True)
class LoraConfig:
    """Low-rank adapters of a `trainable: lora` phase (trainer.lora; peft's LoRA layers)."""

    rank: int = 8
    alpha: float = 8.0  # the adapter's output is scaled by alpha / rank
    dropout: float = 0.0  # on the adapter's input (> 0 draws from the global RNG: resumes are then not exact)
    # which layers: spatial (outside the temporal modules) | temporal (inside them) | all
    targets: str = "spatial"
    # layer names: aliases attention (to_q, to_k, to_v, to_out(.0)), feedforward (ff.net.0.proj, ff.net.2),
    # proj (proj_in, proj_out), conv (every Conv1d/2d/3d), or a module-name suffix (e.g. to_k_ip)
    modules: list[str] = field(default_factory=lambda: ["attention"])

    def __post_init__(self):
        self.modules = [str(m) for m in self.modules]
        if self.rank < 1 or not self.alpha > 0 or not 0 <= self.dropout < 1:
            raise ValueError("lora.rank must be >= 1, lora.alpha > 0, lora.dropout in [0, 1)")
        if self.targets not in LORA_TARGETS:
            raise ValueError(f"lora.targets {self.targets!r} must be one of {LORA_TARGETS}")
        if not self.modules:
            raise ValueError("lora.modules is empty")


@dataclass(kw_only=True)
class PhaseConfig:
    """One training phase: a resolution stage, its data, length, global batch and trainable parameters."""

    name: str  # unique, [a-z0-9_-]; also seeds the phase's data order
    stage: str  # resolution tag: 256x256 | 512x320 | 1024x576
    steps: int  # optimizer steps
    data: DataConfig
    # Video samples per optimizer step over all ranks = video_batch_size x grad_accum x world_size (checked).
    global_batch_size: int
    # Micro batches per optimizer step; null: derived from global_batch_size.
    grad_accum: int | None = None
    # all | spatial (VideoCrafter2: temporal frozen) | temporal | lora (adapters of `lora`, the rest frozen)
    trainable: str = "all"
    lora: LoraConfig = field(default_factory=LoraConfig)  # used by trainable: lora
    optim: OptimConfig = field(default_factory=OptimConfig)
    cfg_dropout: float = 0.1  # text dropped to the empty caption with this probability (for CFG)

    def __post_init__(self):
        if isinstance(self.data, dict):
            self.data = DataConfig(**self.data)
        if isinstance(self.optim, dict):
            self.optim = OptimConfig(**self.optim)
        if isinstance(self.lora, dict):
            self.lora = LoraConfig(**self.lora)
        if not self.name or not all(c.isalnum() or c in "-_" for c in self.name):
            raise ValueError(f"phases[].name {self.name!r} must be letters, digits, '-' or '_'")
        if self.stage not in RESOLUTIONS:
            raise ValueError(f"phases[{self.name}].stage {self.stage!r} is not one of {sorted(RESOLUTIONS)}")
        if self.steps < 1 or self.global_batch_size < 1:
            raise ValueError(f"phases[{self.name}].steps and global_batch_size must be >= 1")
        if self.trainable not in TRAINABLE:
            raise ValueError(f"phases[{self.name}].trainable {self.trainable!r} must be one of {TRAINABLE}")
        if self.grad_accum is not None and self.grad_accum < 1:
            raise ValueError(f"phases[{self.name}].grad_accum must be >= 1 or null")

    def resolve_grad_accum(self, world_size: int) -> int:
        """Micro batches per step so that video_batch_size x grad_accum x world_size == global_batch_size."""
        micro = self.data.video_batch_size * world_size
        accum = self.grad_accum if self.grad_accum is not None else max(1, self.global_batch_size // micro)
        if micro * accum != self.global_batch_size:
            raise ValueError(
                f"phases[{self.name}]: global_batch_size {self.global_batch_size} != video_batch_size "
                f"{self.data.video_batch_size} x grad_accum {accum} x world_size {world_size}; fix "
                f"global_batch_size, data.video_batch_size or grad_accum"
            )
        return accum

    def seed(self, run_seed: int) -> int:
        """The phase's data seed, derived from its name."""
        return (run_seed * 1_000_003 + zlib.crc32(self.name.encode())) % (2**31)


@dataclass(kw_only=True)
class ModelConfig:
    """The trained U-Net and the frozen encoders it pairs with."""

    # The U-Net: a latentcrafter preset (tiny | vc-512: our layout, initialised by SD 2.1 inflation) or a
    # released VideoCrafter model (vc2-t2v-512 | vc1-t2v-512 | vc1-t2v-1024 | vc1-i2v-512, and the
    # -tiny test sizes of each), whose forward and checkpoints are VideoCrafter's own (docs/design.md).
    unet: str = "tiny"
    # SD 2.1 diffusers folder (vae/, text_encoder/, tokenizer/, unet/): the empty caption and preview
    # prompts are encoded with its text encoder, previews decoded with its VAE. For a VideoCrafter
    # model.ckpt, `latentcrafter convert --extract-encoders DIR` writes one.
    model_dir: str
    init_from_sd: bool = True  # inflate model_dir/unet into the spatial layers (latentcrafter presets only)
    # Or start from weights (overrides init_from_sd): a trainer export, a `latentcrafter convert` file, or
    # (VideoCrafter presets) a VideoCrafter model.ckpt / VideoCrafter-layout .safetensors.
    init_checkpoint: str | None = None
    # I2V: image tokens through a Resampler into cross-attention (VideoCrafter presets: set by the preset)
    image_cross_attention: bool = False
    prediction: str = "eps"  # eps | v
    gradient_checkpointing: bool = False
    # The fps condition: null = each video's sample_fps from the shards (images: the loader's image_fps),
    # rounded to an integer for VideoCrafter presets (VideoCrafter passes integers); a number = that fps for
    # every sample (VideoCrafter's scripts use 28 for VC2, 8 for VC1 I2V; its default is 16).
    fps: float | None = None
    # VideoCrafter's signal scaling: q_sample scales x0 by scale_arr[t], DDIM un-/re-scales pred_x0
    # (trainer.diffusion). null = the preset's value: a VideoCrafter preset's YAML (VC2 T2V and VC1 I2V:
    # use_scale with scale_b 0.7; the 1024 model: 0.3 and fix_scale_bug), off for latentcrafter presets.
    use_scale: bool | None = None
    scale_a: float | None = None  # scale at t = 0
    scale_b: float | None = None  # scale from t = mid_step - 1 on
    mid_step: int | None = None  # length of the linear ramp from scale_a to scale_b
    fix_scale_bug: bool | None = (
        None  # VideoCrafter's fix_scale_bug (the 1024 model's scale_arr of length 1000)
    )

    def __post_init__(self):
        from trainer.model.config import UNET_CONFIGS
        from trainer.model.presets import VC_PRESETS

        if self.unet not in UNET_CONFIGS and self.unet not in VC_PRESETS:
            raise ValueError(
                f"model.unet={self.unet!r}: choose a latentcrafter preset ({', '.join(sorted(UNET_CONFIGS))}) "
                f"or a VideoCrafter one ({', '.join(VC_PRESETS)})"
            )
        if self.prediction not in ("eps", "v"):
            raise ValueError(f"model.prediction must be eps or v, got {self.prediction!r}")
        if self.fps is not None and not float(self.fps) > 0:
            raise ValueError(f"model.fps={self.fps}: must be > 0, or null for the shards' sample_fps")
        preset = self.videocrafter_preset
        if preset is not None:
            if self.image_cross_attention and not preset.image_to_video:
                raise ValueError(
                    f"model.image_cross_attention: {self.unet} is a text-to-video model; use vc1-i2v-512 for I2V"
                )
            self.image_cross_attention = preset.image_to_video
            if self.prediction != preset.diffusion["parameterization"]:
                raise ValueError(
                    f"model.prediction={self.prediction!r} but {self.unet} predicts "
                    f"{preset.diffusion['parameterization']!r}"
                )
        try:
            SignalScale(**self.signal_scale())
        except ValueError as exc:
            raise ValueError(f"model.{exc}") from None

    @property
    def videocrafter_preset(self):
        """The VCPreset when `unet` names a VideoCrafter model, else None."""
        from trainer.model.presets import VC_PRESETS

        return VC_PRESETS.get(self.unet)

    def signal_scale(self) -> dict:
        """The signal-scaling options as trainer.diffusion.Diffusion keyword arguments (nulls resolved)."""
        preset = self.videocrafter_preset
        defaults = dict(preset.diffusion) if preset is not None else dataclasses.asdict(SignalScale())
        names = ("use_scale", "scale_a", "scale_b", "mid_step", "fix_scale_bug")
        out = {n: defaults[n] if getattr(self, n) is None else getattr(self, n) for n in names}
        out["use_scale"] = bool(out["use_scale"])
        return out


@dataclass(kw_only=True)
class DeepSpeedConfig:
    """How DeepSpeed shards and steps."""

    zero_stage: int = 2  # 1, 2 or 3
    bf16: str = "auto"  # auto (on where the accelerator supports it, off on CPU) | true | false
    # torch_adamw: torch.optim.AdamW as the client optimizer (no compile); deepspeed_adam: DeepSpeed's fused AdamW.
    optimizer: str = "torch_adamw"
    extra: dict = field(default_factory=dict)  # merged into the generated DeepSpeed JSON config

    def __post_init__(self):
        self.bf16 = str(self.bf16).lower()
        if self.zero_stage not in (1, 2, 3):
            raise ValueError(f"deepspeed.zero_stage must be 1, 2 or 3, got {self.zero_stage}")
        if self.bf16 not in ("auto", "true", "false"):
            raise ValueError(f"deepspeed.bf16 must be auto, true or false, got {self.bf16!r}")
        if self.optimizer not in ("torch_adamw", "deepspeed_adam"):
            raise ValueError(
                f"deepspeed.optimizer must be torch_adamw or deepspeed_adam, got {self.optimizer!r}"
            )


@dataclass(kw_only=True)
class CheckpointConfig:
    every_steps: int = 1000  # also saved at the end of every phase
    keep_last: int = 3  # older step checkpoints are deleted (phase-end ones are kept)
    export_safetensors: bool = True  # consolidated fp32 + EMA safetensors at every phase end


@dataclass(kw_only=True)
class EmaConfig:
    enabled: bool = True
    decay: float = 0.9999

    def __post_init__(self):
        if not 0 < self.decay < 1:
            raise ValueError(f"ema.decay must be in (0, 1), got {self.decay}")


@dataclass(kw_only=True)
class LoggingConfig:
    every_steps: int = 10  # tensorboard + console line
    tensorboard: bool = True
    progress: bool = True  # rich progress bar on rank 0


@dataclass(kw_only=True)
class PreviewConfig:
    every_steps: int = 2000  # 0: only at phase ends
    at_phase_end: bool = True
    prompts: list[str] = field(default_factory=lambda: ["a dog runs along the beach at sunset"])
    num_frames: int = 16
    fps: float = 8.0
    ddim_steps: int = 50
    guidance_scale: float = 7.5
    formats: list[str] = field(default_factory=lambda: ["mp4", "gif"])
    use_ema: bool = False  # sample with the EMA weights instead of the live ones
    resolution: str | None = None  # "WxH" of the samples; null: the phase's stage
    seed: int = 0

    def __post_init__(self):
        bad = [f for f in self.formats if f not in ("mp4", "gif")]
        if bad or not self.prompts:
            raise ValueError(f"preview.formats must be mp4/gif (got {bad}) and preview.prompts non-empty")
        if self.resolution is not None and self.resolution not in RESOLUTIONS:
            raise ValueError(
                f"preview.resolution {self.resolution!r} is not one of {sorted(RESOLUTIONS)} (or null)"
            )


@dataclass(kw_only=True)
class TrainConfig:
    """A whole run: phases executed in order; the trainer moves from one to the next by itself."""

    name: str = "run"
    out_dir: str  # checkpoints (ckpt/), tensorboard (tb/), previews (previews/), exports (export/)
    seed: int = 0
    model: ModelConfig
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    phases: list[PhaseConfig]
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    ema: EmaConfig = field(default_factory=EmaConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    preview: PreviewConfig = field(default_factory=PreviewConfig)

    def __post_init__(self):
        if not self.phases:
            raise ValueError("phases is empty; give at least one phase")
        names = [p.name for p in self.phases]
        if len(set(names)) != len(names):
            raise ValueError(f"phases have duplicate names {names}")


def _build(cls, data):
    """Recursively build dataclass `cls` from a dict, rejecting unknown keys by name."""
    if not isinstance(data, dict):
        raise ValueError(f"{cls.__name__}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ValueError(f"{cls.__name__}: unknown option(s) {unknown}; known: {sorted(names)}")
    kwargs = {}
    for key, value in data.items():
        hint = hints[key]
        if dataclasses.is_dataclass(hint) and isinstance(value, dict):
            value = _build(hint, value)
        elif typing.get_origin(hint) is list and value is not None:
            (arg,) = typing.get_args(hint)
            if dataclasses.is_dataclass(arg):
                value = [_build(arg, v) if isinstance(v, dict) else v for v in value]
        kwargs[key] = value
    return cls(**kwargs)


def config_from_dict(data: dict) -> TrainConfig:
    return _build(TrainConfig, data)


def apply_override(data: dict, item: str) -> None:
    """Apply one "a.b.c=value" override (value parsed as YAML; numeric parts index lists) to a config dict."""
    key, sep, raw = item.partition("=")
    if not sep:
        raise ValueError(f"override {item!r} must look like key.sub=value")
    node = data
    parts = key.split(".")
    for part in parts[:-1]:
        node = node[int(part)] if isinstance(node, list) else node.setdefault(part, {})
    value = yaml.safe_load(raw)
    if isinstance(node, list):
        node[int(parts[-1])] = value
    else:
        node[parts[-1]] = value


def load_config(path: str, overrides: list[str] | None = None) -> TrainConfig:
    """Read a YAML run config; `overrides` are "a.b.c=value" strings (value parsed as YAML)."""
    with open(path) as f:
        data = yaml.safe_load(f)
    for item in overrides or []:
        apply_override(data, item)
    return config_from_dict(data)


def to_dict(config) -> dict:
    return dataclasses.asdict(config)


def resolve_path(path: str, base: str | None = None) -> str:
    return path if base is None or os.path.isabs(path) else os.path.join(base, path)
