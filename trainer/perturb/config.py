"""The study config (configs/study/vc2-perturbation.yaml): base models, data, steps, variants, evaluation."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

import yaml

from trainer.config import apply_override

# variant name (the paper's) -> (base model, trainable, lora targets or None)
VARIANTS = {
    "F-Spa-LoRA": ("F", "lora", "spatial"),
    "F-Temp-LoRA": ("F", "lora", "temporal"),
    "F-Spa-DIR": ("F", "spatial", None),
    "F-Temp-DIR": ("F", "temporal", None),
    "P-Spa-LoRA": ("P", "lora", "spatial"),
    "P-Temp-LoRA": ("P", "lora", "temporal"),
    "P-Spa-DIR": ("P", "spatial", None),
    "P-Temp-DIR": ("P", "temporal", None),
    "F-Spa&Temp-DIR": ("F", "all", None),
}


def variant_id(name: str) -> str:
    """Folder name of a variant: 'F-Spa&Temp-DIR' -> 'f-spatemp-dir'."""
    return "".join(c for c in name.lower() if c.isalnum() or c == "-")


def trained_group(name: str) -> str:
    """The parameter group a variant changes: spatial | temporal | all."""
    _, trainable, targets = VARIANTS[name]
    return targets if trainable == "lora" else trainable


@dataclass(kw_only=True)
class EvalSettings:
    """How every evaluated checkpoint is sampled and scored (identical for all variants)."""

    prompts: list[str]
    seed: int = 123  # prompt i uses trainer.generate's prompt_seed(seed, i)
    frames: int = 16
    size: str = "512x320"
    ddim_steps: int = 50
    cfg: float = 12.0
    eta: float = 1.0
    fps: float | None = None
    device: str = "auto"
    # CLIP folder for CLIPSIM / CLIP-Temp; null: the base run's model_dir when its text encoder projects into its
    # image encoder's space (evaluation.load_preview_clip: the tiny set), else the CLIP metrics are skipped
    clip: str | None = None
    aesthetic: str | None = None  # LAION linear head; with aesthetic_clip (CLIP ViT-L/14) adds `aesthetic`
    aesthetic_clip: str | None = None
    static_threshold: float = 0.2
    eval_base: bool = True  # also evaluate F and P themselves (step 0 of every variant)

    def __post_init__(self):
        if not self.prompts:
            raise ValueError("eval.prompts is empty")


@dataclass(kw_only=True)
class StudyConfig:
    name: str = "vc2-perturbation"
    out_dir: str
    base_config: str  # a train config: model, deepspeed and (unless `data` is given) data settings
    models: dict  # {F: export of a `trainable: all` phase, P: export of a `trainable: temporal` phase}
    # DataConfig of every variant (a dict, as in a phase); null: the base config's last phase's data
    data: dict | None = None
    # DataConfig of the temporal-only variants (*-Temp-DIR, *-Temp-LoRA): the trainer refuses image batches in a
    # phase whose trainable weights are all temporal (image batches skip the temporal modules), so give video
    # sources here; null: `data`
    temporal_data: dict | None = None
    stage: str | None = None  # null: the base config's last phase's stage
    global_batch_size: int | None = None  # null: the base config's last phase's
    optim: dict | None = None  # null: the base config's last phase's
    lora: dict = field(default_factory=lambda: {"rank": 8, "alpha": 8.0, "modules": ["attention"]})
    steps: int  # K: optimizer steps per variant
    eval_steps: list[int]  # evaluated steps (<= steps); checkpoints every gcd(eval_steps)
    variants: list[str] = field(default_factory=lambda: list(VARIANTS))
    seed: int = 0  # run seed of every variant: same noise, timesteps and data order
    num_gpus: int = 1  # ranks per variant
    launcher: str = "deepspeed"  # deepspeed (the launcher, --num_gpus) | python (1 rank, plain python)
    master_port: int | None = None  # null: a free port per launch
    keep_checkpoints: bool = False  # keep each finished variant's DeepSpeed checkpoints (else deleted)
    eval: EvalSettings

    def __post_init__(self):
        if isinstance(self.eval, dict):
            self.eval = EvalSettings(**self.eval)
        self.eval_steps = sorted({int(s) for s in self.eval_steps})
        unknown = [v for v in self.variants if v not in VARIANTS]
        if unknown or not self.variants:
            raise ValueError(f"variants {unknown or '[]'}: choose from {list(VARIANTS)}")
        if len(set(self.variants)) != len(self.variants):
            raise ValueError(f"variants has duplicates: {self.variants}")
        needed = {VARIANTS[v][0] for v in self.variants}
        missing = sorted(needed - {k for k, v in self.models.items() if v})
        if missing:
            raise ValueError(f"models: {missing} not given (paths to exports); the variants need them")
        if (
            self.steps < 1
            or not self.eval_steps
            or self.eval_steps[0] < 1
            or self.eval_steps[-1] > self.steps
        ):
            raise ValueError(f"eval_steps {self.eval_steps} must lie in [1, steps={self.steps}]")
        if self.launcher not in ("deepspeed", "python"):
            raise ValueError(f"launcher {self.launcher!r}: deepspeed or python")
        if self.launcher == "python" and self.num_gpus != 1:
            raise ValueError("launcher: python runs one rank; use launcher: deepspeed for num_gpus > 1")

    @property
    def checkpoint_every(self) -> int:
        return math.gcd(*self.eval_steps)

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def load_study_config(path: str, overrides: list[str] | None = None) -> StudyConfig:
    with open(path) as f:
        data = yaml.safe_load(f)
    for item in overrides or []:
        apply_override(data, item)
    names = {f.name for f in dataclasses.fields(StudyConfig)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ValueError(f"study config: unknown option(s) {unknown}; known: {sorted(names)}")
    return StudyConfig(**data)
