"""The frozen encoders (SD VAE, OpenCLIP-H text tower, CLIP ViT-H-14 vision), loaded from local folders only."""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # loading never touches the network (also local_files_only=True)

from encoders.tiny import (  # noqa: E402  (re-exported: `from encoders.models import write_tiny_models`)
    CLIP_MEAN,
    CLIP_STD,
    main,
    write_tiny_models,
    write_tiny_models_atomic,
)
from encoders.videocrafter import videocrafter_preprocess  # noqa: E402

__all__ = ["ModelsConfig", "FrozenEncoders", "write_tiny_models", "main"]

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
IMAGE_PREPROCESS = ("videocrafter", "clip")


@dataclass(kw_only=True)
class ModelsConfig:
    """Where the frozen encoders live and how they run."""

    model_dir: str  # SD 2.1 diffusers folder: vae/, text_encoder/, tokenizer/ (unet/ used by the trainer)
    image_encoder_dir: str | None = None  # CLIP ViT-H-14 vision folder; default: model_dir/image_encoder
    tiny: bool = False  # build the tiny random set into model_dir when it is missing (never download)
    device: str = "auto"  # auto -> cuda if available else cpu; or cpu, cuda, cuda:N
    dtype: str = "fp32"  # fp32 | fp16 | bf16 (fp16/bf16 only on cuda)
    image_tokens: bool = True  # compute image tokens for images and each video's first frame
    vae: bool = True  # load the VAE (False: its scale factor and id come from vae/config.json only)
    text_encoder: bool = True  # load the text encoder (False: its id only; encode_text then raises)
    frame_batch_size: int = 16  # frames per VAE forward
    # CLIP image preprocessing: "videocrafter" = FrozenOpenCLIPImageEmbedderV2's (kornia resize of the whole
    # image to SxS, bicubic + Gaussian antialias, no crop); "clip" = shortest side to S, center crop.
    image_preprocess: str = "videocrafter"

    def __post_init__(self):
        if not self.model_dir:
            raise ValueError(
                "models.model_dir is empty: set it to an SD 2.1 diffusers folder (or tiny: true)"
            )
        if self.dtype not in DTYPES:
            raise ValueError(f"models.dtype={self.dtype!r}: use one of {', '.join(DTYPES)}")
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", self.device):
            raise ValueError(f"models.device={self.device!r}: use auto, cpu, cuda or cuda:N")
        if self.dtype != "fp32" and self.device == "cpu":
            raise ValueError(f"models.dtype={self.dtype!r} needs a GPU; use dtype: fp32 with device: cpu")
        if self.image_preprocess not in IMAGE_PREPROCESS:
            raise ValueError(
                f"models.image_preprocess={self.image_preprocess!r}: use one of {', '.join(IMAGE_PREPROCESS)}"
            )
        if int(self.frame_batch_size) < 1:
            raise ValueError(f"models.frame_batch_size={self.frame_batch_size}: must be >= 1")

    def resolved_device(self) -> str:
        """The device string after `auto`; checks that fp16/bf16 land on a GPU."""
        device = self.device
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError(f"models.device={self.device!r} but no CUDA device is visible; use device: cpu")
        if device == "cpu" and self.dtype != "fp32":
            raise ValueError(f"models.dtype={self.dtype!r} needs a GPU and none is visible; use dtype: fp32")
        return device


def _require(folder: Path, what: str) -> Path:
    if not (folder / "config.json").is_file() and not (folder / "vocab.json").is_file():
        raise FileNotFoundError(
            f"{folder}: no {what} here (expected config.json or tokenizer files); set models.model_dir "
            "to an SD 2.1 diffusers checkout (vae/, text_encoder/, tokenizer/), models.image_encoder_dir "
            "to a CLIP vision folder, or use models.tiny: true for the random tiny set"
        )
    return folder


def folder_id(folder: Path) -> str:
    """A stable id for a model folder: "<parent>/<name>@<sha256(config.json)[:12]>"."""
    digest = hashlib.sha256((folder / "config.json").read_bytes()).hexdigest()[:12]
    return f"{folder.parent.name}/{folder.name}@{digest}"


def load_vae(folder: str | Path, dtype: torch.dtype = torch.float32):
    from diffusers import AutoencoderKL

    folder = _require(Path(folder), "VAE")
    return AutoencoderKL.from_pretrained(
        str(folder), local_files_only=True, torch_dtype=dtype, low_cpu_mem_usage=False
    )


def load_text_encoder(folder: str | Path, dtype: torch.dtype = torch.float32):
    """CLIPTextModel (SD 2.1: no projection) or CLIPTextModelWithProjection, as config.json names it."""
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    folder = _require(Path(folder), "text encoder")
    archs = json.loads((folder / "config.json").read_text()).get("architectures") or ["CLIPTextModel"]
    cls = CLIPTextModelWithProjection if "CLIPTextModelWithProjection" in archs else CLIPTextModel
    return cls.from_pretrained(str(folder), local_files_only=True, dtype=dtype)


def load_tokenizer(folder: str | Path):
    """CLIPTokenizer, else CLIPTokenizerFast (whichever loads from the folder with local_files_only)."""
    from transformers import CLIPTokenizer, CLIPTokenizerFast

    folder = _require(Path(folder), "tokenizer")
    problems = []
    for cls in (CLIPTokenizer, CLIPTokenizerFast):
        try:
            return cls.from_pretrained(str(folder), local_files_only=True)
        except Exception as exc:  # try the other implementation before giving up
            problems.append(f"{cls.__name__}: {exc}")
    raise RuntimeError(f"{folder}: no CLIP tokenizer loads from it ({'; '.join(problems)})")


def load_image_encoder(folder: str | Path, dtype: torch.dtype = torch.float32):
    from transformers import CLIPVisionModelWithProjection

    folder = _require(Path(folder), "CLIP vision encoder")
    return CLIPVisionModelWithProjection.from_pretrained(str(folder), local_files_only=True, dtype=dtype)


def image_preprocess_settings(folder: Path, image_size: int) -> dict:
    """Resize/crop size and mean/std from preprocessor_config.json (here or ../feature_extractor/), else CLIP's."""
    settings = {"size": image_size, "crop": image_size, "mean": CLIP_MEAN, "std": CLIP_STD}
    for path in (
        folder / "preprocessor_config.json",
        folder.parent / "feature_extractor/preprocessor_config.json",
    ):
        if path.is_file():
            cfg = json.loads(path.read_text())
            size, crop = cfg.get("size", image_size), cfg.get("crop_size", image_size)
            settings["size"] = size.get("shortest_edge", image_size) if isinstance(size, dict) else int(size)
            settings["crop"] = crop.get("height", image_size) if isinstance(crop, dict) else int(crop)
            settings["mean"], settings["std"] = (
                cfg.get("image_mean", CLIP_MEAN),
                cfg.get("image_std", CLIP_STD),
            )
            break
    return settings


def _frozen(module: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """eval(), no gradients, on the device (the loaders already gave it the dtype)."""
    module.eval().requires_grad_(False)
    return module.to(device)


def clip_preprocess(x: torch.Tensor, size: int, crop: int, mean, std) -> torch.Tensor:
    """float [N,3,H,W] in [0,1] -> CLIP's input: shortest side to `size` (bicubic, antialiased), center crop to
    `crop`, mean/std normalisation (the HF CLIPImageProcessor recipe, on tensors)."""
    h, w = x.shape[-2:]
    scale = size / min(h, w)
    nh, nw = max(crop, round(h * scale)), max(crop, round(w * scale))
    if (nh, nw) != (h, w):
        x = torch.nn.functional.interpolate(
            x, size=(nh, nw), mode="bicubic", antialias=True, align_corners=False
        )
    top, left = (nh - crop) // 2, (nw - crop) // 2
    x = x[:, :, top : top + crop, left : left + crop].clamp(0, 1)
    mean = torch.tensor(mean, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    std = torch.tensor(std, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    return (x - mean) / std


class FrozenEncoders:
    """VideoCrafter's frozen encoders: VAE posterior per frame, OpenCLIP-H text tokens, CLIP-H image tokens."""

    def __init__(self, config: ModelsConfig):
        self.config = config
        self.device = torch.device(config.resolved_device())
        self.dtype = DTYPES[config.dtype]
        model_dir = Path(config.model_dir)
        if config.tiny and not (model_dir / "vae" / "config.json").is_file():
            write_tiny_models_atomic(str(model_dir))
        self.vae = _frozen(load_vae(model_dir / "vae", self.dtype), self.device) if config.vae else None
        vae_config = json.loads((_require(model_dir / "vae", "VAE") / "config.json").read_text())
        self.scale_factor = float(vae_config.get("scaling_factor", 0.18215))
        self.latent_channels = int(vae_config.get("latent_channels", 4))
        self.downsample = 2 ** (len(vae_config["block_out_channels"]) - 1)
        self.text_encoder = self.tokenizer = None
        self.text_dim = self.text_has_projection = self.max_length = None
        if config.text_encoder:
            self.text_encoder = _frozen(
                load_text_encoder(model_dir / "text_encoder", self.dtype), self.device
            )
            self.tokenizer = load_tokenizer(model_dir / "tokenizer")
            self.text_dim = int(self.text_encoder.config.hidden_size)
            self.text_has_projection = hasattr(self.text_encoder, "text_projection")
            self.max_length = min(
                int(self.tokenizer.model_max_length), self.text_encoder.config.max_position_embeddings
            )
        self.ids = {
            "vae_id": folder_id(model_dir / "vae"),
            "text_encoder_id": folder_id(model_dir / "text_encoder"),
            "image_encoder_id": "",
        }

        image_dir = (
            Path(config.image_encoder_dir) if config.image_encoder_dir else model_dir / "image_encoder"
        )
        self.image_encoder = None
        self.image_token_dim: int | None = None
        if config.image_tokens:
            if config.image_encoder_dir is None and not (image_dir / "config.json").is_file():
                raise FileNotFoundError(
                    f"{image_dir}: no CLIP vision encoder; set models.image_encoder_dir to a "
                    "CLIPVisionModelWithProjection folder, or models.image_tokens: false"
                )
            self.image_encoder = _frozen(load_image_encoder(image_dir, self.dtype), self.device)
            vision = self.image_encoder.config
            self.image_token_dim = int(vision.hidden_size)
            self.image_prep = image_preprocess_settings(image_dir, int(vision.image_size))
            self.ids["image_encoder_id"] = folder_id(image_dir)
        self.stats = {"vae_forwards": 0, "vae_frames": 0}

    # ---- capabilities -------------------------------------------------------------------------------
    @property
    def has_clip_score(self) -> bool:
        """True when text and image embeddings share one projected space (tiny: yes; SD 2.1: no)."""
        return bool(
            self.text_has_projection
            and self.image_encoder is not None
            and self.text_encoder.config.projection_dim == self.image_encoder.config.projection_dim
        )

    # ---- VAE ----------------------------------------------------------------------------------------
    @torch.inference_mode()
    def encode_frames(self, frames: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """uint8 [N,H,W,3] -> posterior mean, std float16 [N,C,H/8,W/8] (unscaled), frame_batch_size per forward."""
        frames = np.asarray(frames)
        if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
            raise ValueError(f"frames must be uint8 [N,H,W,3], got {frames.dtype} {list(frames.shape)}")
        n, h, w, _ = frames.shape
        if h % self.downsample or w % self.downsample:
            raise ValueError(f"frame size {w}x{h} is not a multiple of the VAE's factor {self.downsample}")
        means, stds = [], []
        step = int(self.config.frame_batch_size)
        for i in range(0, n, step):
            x = torch.from_numpy(np.ascontiguousarray(frames[i : i + step])).to(
                self.device, non_blocking=True
            )
            x = x.permute(0, 3, 1, 2).to(self.dtype).div_(127.5).sub_(1.0)
            dist = self.vae.encode(x).latent_dist
            means.append(dist.mean.to(torch.float16))
            stds.append(dist.std.to(torch.float16))
            self.stats["vae_forwards"] += 1
            self.stats["vae_frames"] += x.shape[0]
        if not means:
            shape = (0, self.latent_channels, h // self.downsample, w // self.downsample)
            return np.zeros(shape, np.float16), np.zeros(shape, np.float16)
        return torch.cat(means).cpu().numpy(), torch.cat(stds).cpu().numpy()

    @torch.inference_mode()
    def decode_latents(self, latents: torch.Tensor) -> np.ndarray:
        """Scaled latents [N,C,h,w] -> uint8 frames [N,H,W,3] (for previews)."""
        out = []
        step = int(self.config.frame_batch_size)
        latents = torch.as_tensor(latents)
        for i in range(0, latents.shape[0], step):
            z = latents[i : i + step].to(self.device, self.dtype) / self.scale_factor
            x = self.vae.decode(z).sample.float().clamp_(-1, 1)
            out.append(((x + 1) * 127.5).round_().to(torch.uint8).permute(0, 2, 3, 1).cpu())
        return torch.cat(out).numpy()

    # ---- text ---------------------------------------------------------------------------------------
    @torch.inference_mode()
    def encode_text(self, captions: list[str]) -> dict:
        """Captions -> {"tokens": f16 [B,77,D], "pooled": f16 [B,P], "num_tokens": int32 [B]}.

        tokens is the text encoder's last_hidden_state: for SD 2.1's 23-layer CLIPTextModel that is
        OpenCLIP ViT-H-14's penultimate layer after the final layer norm (VideoCrafter's
        FrozenOpenCLIPEmbedder, layer="penultimate"). pooled is the projected text embedding when the
        encoder has a projection, else the EOS token's hidden state. num_tokens counts BOS/EOS and is
        taken before padding/truncation.
        """
        if self.text_encoder is None:
            raise RuntimeError("text encoder not loaded: set models.text_encoder: true")
        captions = [c if isinstance(c, str) else "" for c in captions]
        num_tokens = [
            len(ids) for ids in self.tokenizer(captions, truncation=False, verbose=False)["input_ids"]
        ]
        batch = self.tokenizer(
            captions, padding="max_length", max_length=self.max_length, truncation=True, return_tensors="pt"
        )
        out = self.text_encoder(input_ids=batch["input_ids"].to(self.device))
        pooled = out.text_embeds if self.text_has_projection else out.pooler_output
        return {
            "tokens": out.last_hidden_state.to(torch.float16).cpu().numpy(),
            "pooled": pooled.to(torch.float16).cpu().numpy(),
            "num_tokens": np.asarray(num_tokens, dtype=np.int32),
        }

    # ---- image --------------------------------------------------------------------------------------
    def preprocess_images(self, images: np.ndarray) -> torch.Tensor:
        """uint8 [N,H,W,3] -> normalized [N,3,S,S], as models.image_preprocess says."""
        x = torch.from_numpy(np.ascontiguousarray(images)).to(self.device).permute(0, 3, 1, 2).float() / 255
        return self._preprocess01(x)

    def _preprocess01(self, x: torch.Tensor, *, normalize: bool = True) -> torch.Tensor:
        """float [N,3,H,W] in [0,1] -> the image encoder's normalized input [N,3,S,S] in self.dtype
        (`normalize` False: the resized [0,1] pixels, float32).

        videocrafter: to [-1,1] as VideoCrafter's data ((x - 0.5) * 2), then videocrafter_preprocess.
        clip: shortest side to S (bicubic, antialiased), center crop, CLIP mean/std.
        """
        size, crop = self.image_prep["size"], self.image_prep["crop"]
        mean, std = (
            (self.image_prep["mean"], self.image_prep["std"]) if normalize else ((0.0,) * 3, (1.0,) * 3)
        )
        if self.config.image_preprocess == "videocrafter":
            x = videocrafter_preprocess((x - 0.5) * 2, crop, mean, std)
        else:
            x = clip_preprocess(x, size, crop, mean, std)
        return x.to(self.dtype) if normalize else x

    @torch.inference_mode()
    def condition_frames(self, images: np.ndarray) -> np.ndarray:
        """uint8 [N,H,W,3] -> uint8 [N,S,S,3]: the pixels the image encoder sees (models.image_preprocess's
        resize/crop, before normalising). encode_images of them gives encode_images(images) up to the 8-bit
        rounding (the resize from S to S is the identity): what storage image=frame keeps."""
        if self.image_encoder is None:
            raise RuntimeError("image encoder not loaded: set models.image_tokens: true")
        x = torch.from_numpy(np.ascontiguousarray(images)).to(self.device).permute(0, 3, 1, 2).float() / 255
        x = self._preprocess01(x, normalize=False).clamp_(0, 1).mul_(255).round_()
        return x.to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()

    @torch.inference_mode()
    def null_image_tokens(self) -> np.ndarray:
        """float16 [1,L,Dv]: tokens of VideoCrafter's unconditional image, torch.zeros(1,3,S,S) in [-1,1]
        (mid-grey; scripts/evaluation/funcs.py), through the same preprocessing as encode_images."""
        if self.image_encoder is None:
            raise RuntimeError("image encoder not loaded: set models.image_tokens: true")
        crop = self.image_prep["crop"]
        grey = torch.full((1, 3, crop, crop), 0.5, device=self.device)  # 0 in [-1,1]
        out = self.image_encoder(pixel_values=self._preprocess01(grey))
        return out.last_hidden_state.to(torch.float16).cpu().numpy()

    @torch.inference_mode()
    def encode_images(self, images: np.ndarray) -> dict:
        """uint8 [N,H,W,3] (any size) -> {"tokens": f16 [N,L,Dv] last layer, "pooled": f16 [N,P] projected}."""
        if self.image_encoder is None:
            raise RuntimeError(
                "image encoder not loaded: set models.image_tokens: true (and image_encoder_dir)"
            )
        images = np.asarray(images)
        if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
            raise ValueError(f"images must be uint8 [N,H,W,3], got {images.dtype} {list(images.shape)}")
        tokens, pooled = [], []
        step = int(self.config.frame_batch_size)
        for i in range(0, images.shape[0], step):
            out = self.image_encoder(pixel_values=self.preprocess_images(images[i : i + step]))
            tokens.append(out.last_hidden_state.to(torch.float16))
            pooled.append(out.image_embeds.to(torch.float16))
        return {"tokens": torch.cat(tokens).cpu().numpy(), "pooled": torch.cat(pooled).cpu().numpy()}

    def clip_score(self, text_pooled, image_pooled) -> np.ndarray:
        """Cosine similarity of paired text and image embeddings, float32 [N]."""
        if not self.has_clip_score:
            raise ValueError(
                "clip_score needs a text encoder projecting into the image embedding space "
                "(CLIPTextModelWithProjection with the image encoder's projection_dim); SD 2.1's "
                "text_encoder is a CLIPTextModel without one. Point models.model_dir at such a text "
                "encoder, or leave filters.min_clip_score unset."
            )
        t = np.asarray(text_pooled, dtype=np.float32)
        i = np.asarray(image_pooled, dtype=np.float32)
        t = t / np.maximum(np.linalg.norm(t, axis=-1, keepdims=True), 1e-12)
        i = i / np.maximum(np.linalg.norm(i, axis=-1, keepdims=True), 1e-12)
        return (t * i).sum(-1).astype(np.float32)
