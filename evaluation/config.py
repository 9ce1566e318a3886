"""`latentcrafter eval`'s options as a typed config (each field is one command-line option)."""

from __future__ import annotations

import re
from dataclasses import dataclass

METRICS = ("clipsim", "clip_temp", "motion", "static_ratio", "warp_error", "aesthetic")


@dataclass(kw_only=True)
class EvalConfig:
    """What to evaluate, with which local models, and under which protocol."""

    videos: str  # folder of videos (mp4/gif); prompts: its generate.json, --prompts or sidecar .txt
    out: str = ""  # output folder (eval.json, videos/*.json, report.html); default: <videos>/eval
    prompts: str | None = None  # text file, one prompt per line, matched to the videos in sorted name order
    clip: str | None = None  # CLIP folder for CLIPSIM/CLIP-Temp (CLIPModel, or text_encoder/+image_encoder/)
    aesthetic: str | None = None  # LAION linear aesthetic head (safetensors/torch: weight, bias)
    aesthetic_clip: str | None = None  # CLIP ViT-L/14 folder whose image embeddings the aesthetic head reads
    real: str | None = None  # folder of real videos: FVD of --videos against it
    i3d: str | None = None  # StyleGAN-V's i3d_torchscript.pt (TorchScript I3D) for FVD
    fvd_frames: int = 16  # FVD clip length in frames
    fvd_stride: int = 1  # FVD frame stride within a clip
    fvd_size: int = 224  # FVD frames: shortest side resized to this, center crop (I3D resizes to 224 itself)
    fvd_max_samples: int = 0  # at most this many clips per set for FVD (0: all)
    static_threshold: float = 0.2  # a frame pair is static when its mean flow magnitude is below this (px)
    motion_size: int = 0  # resize frames (shortest side) before optical flow; 0 keeps the native size
    max_frames: int = 0  # decode at most this many frames per video (0: all)
    batch_size: int = 16  # frames (CLIP) or clips (I3D) per forward
    device: str = "auto"  # auto (cuda if available), cpu, cuda or cuda:N
    against: str | None = None  # another eval folder or eval.json: side-by-side table with deltas
    progress: bool = True  # progress bar over the videos

    def __post_init__(self):
        if not self.videos:
            raise ValueError("videos is empty: pass the folder of videos to evaluate")
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", self.device):
            raise ValueError(f"--device={self.device!r}: use auto, cpu, cuda or cuda:N")
        if self.static_threshold < 0:
            raise ValueError(f"--static-threshold={self.static_threshold}: must be >= 0 (pixels)")
        for name in ("motion_size", "max_frames"):
            if getattr(self, name) < 0:
                raise ValueError(f"--{name.replace('_', '-')}={getattr(self, name)}: must be >= 0 (0: off)")
        if self.batch_size < 1:
            raise ValueError(f"--batch-size={self.batch_size}: must be >= 1")

    def resolved_device(self) -> str:
        import torch

        if self.device == "auto":
            return "cuda" if torch.cuda.is_available() else "cpu"
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError(f"--device={self.device}: no CUDA device is visible; use --device cpu")
        return self.device
