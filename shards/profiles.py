"""Storage profiles: which members a sample stores (latent std, conditioning tokens or their inputs), and their codecs."""

from __future__ import annotations

import io
import math
from dataclasses import dataclass, fields

import numpy as np

LATENT_CHOICES = ("mean+std", "mean+logstd8", "mean")
IMAGE_CHOICES = ("tokens", "frame")
TEXT_CHOICES = ("tokens", "caption")
COND_FRAME_QUALITY = 95  # JPEG quality of cond_frame.jpg (4:4:4, no chroma subsampling)
MAX_COND_FRAME_SIDE = 1024  # a cond_frame.jpg larger than this is refused before decoding
_TINY_STD = 6e-8  # the smallest positive float16 (subnormal): a std stored as 0 is taken as this


@dataclass(frozen=True, kw_only=True)
class StorageProfile:
    """What one sample stores besides the latent mean, caption, pooled embeddings and json (always kept)."""

    # mean+std: the posterior std as float16 (latent_std.npy); mean+logstd8: its log as uint8
    # (latent_logstd8.npy, offset and step in the index row); mean: no std (training uses the mean)
    latent: str = "mean+std"
    # tokens: CLIP image tokens [257, Dv] float16 (image_tokens.npy); frame: the conditioning frame as a
    # quality-95 JPEG at the image encoder's input size (cond_frame.jpg), tokens computed by the trainer.
    # Applies only when the job computes image conditioning (models.image_tokens).
    image: str = "tokens"
    # tokens: text tokens [77, D] float16 (text_tokens.npy); caption: none stored, the trainer encodes the caption
    text: str = "tokens"

    def __post_init__(self):
        for name, choices in (("latent", LATENT_CHOICES), ("image", IMAGE_CHOICES), ("text", TEXT_CHOICES)):
            if getattr(self, name) not in choices:
                raise ValueError(
                    f"storage.{name}={getattr(self, name)!r}: use one of {', '.join(choices)} "
                    f"(or a named profile: {', '.join(PROFILES)})"
                )

    def __str__(self) -> str:
        return f"latent={self.latent},image={self.image},text={self.text}"

    @property
    def name(self) -> str:
        """The named profile this is (full, compact, lean), else its text form."""
        return next((n for n, p in PROFILES.items() if p == self), str(self))

    @property
    def sampled(self) -> bool:
        """True when the loader draws mean + std * eps; False: the latent is the mean (deterministic)."""
        return self.latent != "mean"

    def members(self, *, image: bool) -> tuple[str, ...]:
        """The optional members a sample of this profile holds (`image`: the job computed image conditioning)."""
        out = {"mean+std": ["latent_std.npy"], "mean+logstd8": ["latent_logstd8.npy"], "mean": []}[
            self.latent
        ]
        if self.text == "tokens":
            out.append("text_tokens.npy")
        if image:
            out += ["image_pooled.npy", "image_tokens.npy" if self.image == "tokens" else "cond_frame.jpg"]
        return tuple(out)

    @classmethod
    def parse(cls, value) -> StorageProfile:
        """A profile from a name ("lean"), its text form ("latent=mean,image=frame,text=caption"), a mapping of
        its fields, a StorageProfile or None (an index written before profiles existed: full)."""
        if value is None or isinstance(value, StorageProfile):
            return value or PROFILES["full"]
        if isinstance(value, dict):
            known = {f.name for f in fields(cls)}
            unknown = sorted(set(value) - known)
            if unknown:
                raise ValueError(f"storage: unknown option(s) {unknown}; known: {sorted(known)}")
            return cls(**value)
        text = str(value).strip()
        if text in PROFILES:
            return PROFILES[text]
        parts = dict(p.partition("=")[::2] for p in text.split(",") if p)
        if "=" not in text or any(not v for v in parts.values()):
            raise ValueError(
                f"storage {text!r}: name a profile ({', '.join(PROFILES)}) or give "
                "latent=...,image=...,text=... (e.g. latent=mean+logstd8,image=tokens,text=tokens)"
            )
        return cls.parse(parts)


PROFILES = {
    "full": StorageProfile(),  # everything the trainer reads, as float16 (the format before profiles)
    "compact": StorageProfile(latent="mean+logstd8"),  # the std in 8 bits: a quarter fewer latent bytes
    "lean": StorageProfile(latent="mean", image="frame", text="caption"),  # <= 0.5 MB per 512x320x16 sample
}


# ---------------------------------------------------------------- latent log-std in 8 bits


def quantize_logstd(std: np.ndarray) -> tuple[np.ndarray, float, float]:
    """std -> (q uint8, offset, step) with log std ~= offset + step * q: 256 levels spanning this sample's
    log-std range, so the std comes back within a relative error of exp(step / 2) - 1."""
    log = np.log(np.maximum(np.asarray(std, dtype=np.float32), _TINY_STD))
    lo, hi = (float(log.min()), float(log.max())) if log.size else (0.0, 0.0)
    step = (hi - lo) / 255.0 if hi > lo else 1.0
    q = np.rint((log - lo) / step)
    return np.clip(q, 0, 255).astype(np.uint8), lo, step


def dequantize_logstd(q: np.ndarray, offset: float, step: float) -> np.ndarray:
    """float32 std from quantize_logstd's (q, offset, step)."""
    if not (math.isfinite(offset) and math.isfinite(step) and step > 0):
        raise ValueError(f"logstd_offset={offset}, logstd_step={step}: need finite numbers and step > 0")
    return np.exp(np.float32(offset) + np.float32(step) * np.asarray(q, dtype=np.float32))


# ---------------------------------------------------------------- the conditioning frame


def encode_cond_frame(pixels: np.ndarray) -> bytes:
    """uint8 [S,S,3] -> JPEG bytes (quality 95, 4:4:4)."""
    from PIL import Image

    pixels = np.asarray(pixels)
    if (
        pixels.ndim != 3
        or pixels.shape[2] != 3
        or pixels.dtype != np.uint8
        or pixels.shape[0] != pixels.shape[1]
    ):
        raise ValueError(f"a conditioning frame is uint8 [S,S,3], got {pixels.dtype} {list(pixels.shape)}")
    buf = io.BytesIO()
    Image.fromarray(pixels, "RGB").save(buf, format="JPEG", quality=COND_FRAME_QUALITY, subsampling=0)
    return buf.getvalue()


def decode_cond_frame(data: bytes) -> np.ndarray:
    """cond_frame.jpg bytes (untrusted) -> uint8 [S,S,3]; ValueError unless a square RGB JPEG of side
    <= MAX_COND_FRAME_SIDE (checked from the header, before any pixel is decoded)."""
    from PIL import Image

    with Image.open(io.BytesIO(bytes(data)), formats=["JPEG"]) as im:
        w, h = im.size
        if w != h or not 0 < w <= MAX_COND_FRAME_SIDE or im.mode != "RGB":
            raise ValueError(
                f"cond_frame.jpg is {im.mode} {w}x{h}; a conditioning frame is a square RGB JPEG "
                f"of side <= {MAX_COND_FRAME_SIDE}"
            )
        return np.array(im, dtype=np.uint8)  # already RGB (checked): no convert() copy


# ---------------------------------------------------------------- bytes per sample, from shapes

# VideoCrafter's encoders at their real sizes, for a 512x320 video of 16 frames (SD 2.1 VAE, OpenCLIP-H text
# tower, CLIP ViT-H-14 vision tower at 224 px): the shapes each member has.
REAL_SHAPES = {
    "latent": (4, 16, 40, 64),
    "text_tokens": (77, 1024),
    "text_pooled": (1024,),
    "image_tokens": (257, 1280),
    "image_pooled": (1024,),
    "cond_frame": (224, 224, 3),
}
_TAR_BLOCK = 512
NPY_HEADER = 128  # numpy's .npy v1 header, padded to 64-byte alignment: 128 bytes for these shapes


def _member(nbytes: int) -> int:
    """Tar bytes of one member holding `nbytes`: a 512-byte header, the data, padding to 512."""
    return _TAR_BLOCK + nbytes + (-nbytes % _TAR_BLOCK)


def bytes_from_shapes(
    profile: StorageProfile, shapes: dict | None = None, *, json_bytes: int = 2048, caption_bytes: int = 256
) -> dict[str, int]:
    """Upper bounds of the tar bytes of one sample per member kind (latent, text, image, other, total), from
    member shapes (REAL_SHAPES by default). cond_frame.jpg is bounded by its raw pixel count (a JPEG of a
    natural image is 5-10x smaller); json and caption by the given sizes."""
    s = {**REAL_SHAPES, **(shapes or {})}

    def npy(shape, itemsize=2):
        return _member(NPY_HEADER + itemsize * math.prod(shape))

    latent = (
        npy(s["latent"])
        + {
            "mean+std": npy(s["latent"]),
            "mean+logstd8": npy(s["latent"], itemsize=1),
            "mean": 0,
        }[profile.latent]
    )
    text = npy(s["text_pooled"]) + (npy(s["text_tokens"]) if profile.text == "tokens" else 0)
    image = npy(s["image_pooled"]) + (
        npy(s["image_tokens"]) if profile.image == "tokens" else _member(math.prod(s["cond_frame"]))
    )
    other = _member(json_bytes) + _member(caption_bytes)
    return {
        "latent": latent,
        "text": text,
        "image": image,
        "other": other,
        "total": latent + text + image + other,
    }
