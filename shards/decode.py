"""Sample decoding: .npy members to tensors, run checks (encoders, stage, shape), latent sampling, bad-sample handler."""

from __future__ import annotations

import hashlib
import json
import logging
import math
import re
import time
from collections import Counter
from dataclasses import dataclass

import numpy as np
import torch

from shards.format import REQUIRED_MEMBERS, decode_npy, parse_resolution
from shards.profiles import decode_cond_frame, dequantize_logstd
from shards.reader import BadSample, ShardInfo, ShardMismatchError

log = logging.getLogger(__name__)

# ---------------------------------------------------------------- decoding

_NPY_V1 = re.compile(
    rb"\{'descr': '([<>|=][fiu][1248])', 'fortran_order': False, 'shape': \(([0-9, ]*)\), \}"
)


def decode_array(data: bytes) -> np.ndarray:
    """.npy bytes to a writable array: a fast path for plain numeric C-order v1.0 files, else decode_npy.

    The fast path parses the header with a strict regex (numeric dtypes only, so nothing can unpickle)
    and copies the body once; anything else goes through shards.format.decode_npy (allow_pickle=False).
    """
    if data[:8] == b"\x93NUMPY\x01\x00":
        header_len = int.from_bytes(data[8:10], "little")
        m = _NPY_V1.match(data, 10)
        if m:
            shape = tuple(int(x) for x in m.group(2).split(b",") if x.strip())
            dtype = np.dtype(m.group(1).decode())
            body = memoryview(data)[10 + header_len :]
            if len(body) == dtype.itemsize * math.prod(shape):
                return np.frombuffer(bytearray(body), dtype=dtype).reshape(shape)
    return decode_npy(data)  # checks the header (dtype, size) first; never unpickles


@dataclass
class RunExpectations:
    """What every sample of the run must agree on (encoders, scale factor, resolution stage)."""

    stage: str
    vae_id: str | None
    text_encoder_id: str | None
    scale_factor: float | None
    vae_downsample: int = 8
    # With bucketing: the "WxH" buckets a latent may have (else only the stage's own size).
    buckets: tuple[str, ...] | None = None

    def check_shard(self, shard: ShardInfo) -> None:
        """Raise ShardMismatchError naming the shard when its index disagrees with the run."""
        self._check(shard.url, shard.stage, shard.vae_id, shard.text_encoder_id, shard.scale_factor)

    def _check(self, where: str, stage, vae_id, text_encoder_id, scale_factor) -> None:
        if stage != self.stage:
            raise ShardMismatchError(
                f"{where}: stage {stage} but the loader serves stage {self.stage}; "
                f"point the source URLs at the {self.stage} shards (LoaderConfig.stage)"
            )
        for name, got, want in (
            ("vae_id", vae_id, self.vae_id),
            ("text_encoder_id", text_encoder_id, self.text_encoder_id),
        ):
            if want is not None and got != want:
                raise ShardMismatchError(
                    f"{where}: {name} {got!r} differs from the run's {want!r} (expect_{name})"
                )
        if self.scale_factor is not None and (
            scale_factor is None or abs(scale_factor - self.scale_factor) > 1e-6
        ):
            raise ShardMismatchError(
                f"{where}: scale_factor {scale_factor} differs from the run's {self.scale_factor} (expect_scale_factor)"
            )

    def check_shape(self, where: str, kind: str, shape: tuple) -> None:
        """Latent [C,T,h,w] must match the stage (h = H / downsample), or one of its buckets when bucketing,
        and T must be 1 for images."""
        sizes = (
            [parse_resolution(b) for b in self.buckets] if self.buckets else [parse_resolution(self.stage)]
        )
        allowed = [(h // self.vae_downsample, w // self.vae_downsample) for w, h in sizes]
        want = allowed[0]
        if len(shape) != 4 or tuple(shape[2:]) not in allowed or (kind == "image" and shape[1] != 1):
            if self.buckets:
                raise ShardMismatchError(
                    f"{where}: latent shape {list(shape)} fits none of the buckets {list(self.buckets)} of stage "
                    f"{self.stage} (latent h x w {[list(a) for a in allowed]} with vae_downsample "
                    f"{self.vae_downsample}{', T 1 for images' if kind == 'image' else ''}); list its size in "
                    f"LoaderConfig.buckets"
                )
            raise ShardMismatchError(
                f"{where}: latent shape {list(shape)} does not fit stage {self.stage} "
                f"(want [C, {'1' if kind == 'image' else 'T'}, {want[0]}, {want[1]}] with vae_downsample "
                f"{self.vae_downsample}); this sample belongs to another resolution stage"
            )


def decode_sample(
    raw: dict,
    *,
    shard: ShardInfo,
    row: int,
    expect: RunExpectations,
    noise_seed,
    sample_latents: bool,
    return_latent_std: bool = False,
):
    """Raw members -> a typed sample dict; BadSample for unusable samples, ShardMismatchError for foreign ones."""
    key = shard.keys[row]
    where = f"{shard.url} sample {key!r}"
    profile = shard.profile
    missing = [m for m in REQUIRED_MEMBERS if m not in raw]
    # the profile's members (image conditioning only where the job computed it: image_pooled.npy says so)
    missing += [m for m in profile.members(image="image_pooled.npy" in raw) if m not in raw]
    if missing:
        raise BadSample("missing_member", f"{where}: missing {missing} (storage profile {profile.name})")
    arrays = {}
    for member in (
        "latent.npy",
        "text_pooled.npy",
        *(m for m in profile.members(image=True) if m.endswith(".npy") and m != "image_pooled.npy"),
    ):
        if member in raw:
            try:
                arrays[member] = decode_array(raw[member])
            except Exception as exn:
                raise BadSample("bad_npy", f"{where}: member {member}: {type(exn).__name__}: {exn}") from None
    for member, want in shard.index_shapes(row).items():
        if member in arrays and list(arrays[member].shape) != list(want):
            raise BadSample(
                "shape_mismatch",
                f"{where}: member {member} has shape {list(arrays[member].shape)}, the index says {list(want)}",
            )
    try:
        meta = json.loads(bytes(raw["json"]))
        if not isinstance(meta, dict):
            raise ValueError(f"json member is a {type(meta).__name__}, not an object")
        caption = bytes(raw["txt"]).decode("utf-8")
    except Exception as exn:
        raise BadSample("bad_member", f"{where}: {type(exn).__name__}: {exn}") from None
    mean, std = arrays["latent.npy"], _latent_std(arrays, shard, row, where)
    text_tokens, text_pooled = arrays.get("text_tokens.npy"), arrays["text_pooled.npy"]
    image_tokens, cond_frame = arrays.get("image_tokens.npy"), None
    if std is not None and std.shape != mean.shape:
        raise BadSample(
            "shape_mismatch", f"{where}: latent std shape {std.shape} != latent shape {mean.shape}"
        )
    if "cond_frame.jpg" in raw and profile.image == "frame":
        try:
            cond_frame = torch.from_numpy(decode_cond_frame(raw["cond_frame.jpg"]))
        except Exception as exn:
            raise BadSample(
                "bad_member", f"{where}: member cond_frame.jpg: {type(exn).__name__}: {exn}"
            ) from None
    expect._check(
        where, meta.get("stage"), meta.get("vae_id"), meta.get("text_encoder_id"), meta.get("scale_factor")
    )
    expect.check_shape(where, shard.kind, mean.shape)
    scale = float(meta.get("scale_factor") or 1.0)
    latent = torch.from_numpy(mean).float()
    if sample_latents and std is not None:
        digest = hashlib.blake2b(np.asarray(noise_seed, dtype=np.int64).tobytes(), digest_size=8).digest()
        generator = torch.Generator().manual_seed(int.from_bytes(digest, "little"))
        eps = torch.randn(latent.shape, generator=generator)
        latent.addcmul_(torch.from_numpy(std).float(), eps)
    latent.mul_(scale)
    latent_std = None
    if return_latent_std:
        latent_std = torch.from_numpy(std if std is not None else np.zeros_like(mean)).float().mul_(scale)
    return {
        "key": key,
        "source": shard.source,
        "kind": shard.kind,
        "latent": latent,
        "latent_std": latent_std,
        "text_tokens": None if text_tokens is None else torch.from_numpy(text_tokens).float(),
        "text_pooled": torch.from_numpy(text_pooled).float(),
        "image_tokens": None if image_tokens is None else torch.from_numpy(image_tokens).float(),
        "cond_frame": cond_frame,  # uint8 [S,S,3] (storage image=frame): the trainer computes its tokens
        "fps": float(meta.get("sample_fps") or meta.get("fps") or 0.0),
        "caption": caption,
        "meta": meta,
    }


def _latent_std(arrays: dict, shard: ShardInfo, row: int, where: str) -> np.ndarray | None:
    """The posterior std as stored by the shard's profile: float16 as is, logstd8 expanded with the index
    row's offset and step, None for latent=mean (the loader then serves the mean)."""
    if "latent_logstd8.npy" not in arrays:
        return arrays.get("latent_std.npy")
    q = arrays["latent_logstd8.npy"]
    scale = shard.logstd_scale(row)
    if q.dtype != np.uint8 or scale is None:
        raise BadSample(
            "bad_member",
            f"{where}: latent_logstd8.npy is {q.dtype} with index logstd_offset/logstd_step {scale}; "
            "want uint8 and both numbers",
        )
    try:
        return dequantize_logstd(q, *scale)
    except ValueError as exn:
        raise BadSample("bad_member", f"{where}: {exn}") from None


# ---------------------------------------------------------------- bad samples


class BadSampleHandler:
    """Counts bad samples by reason, logs them at a capped rate, and re-raises when asked to."""

    def __init__(self, mode: str = "skip", max_logged_per_minute: int = 10):
        self.mode = mode
        self.max_per_minute = max_logged_per_minute
        self.counts: Counter = Counter()
        self._window_start = 0.0
        self._logged = 0

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def __call__(self, bad: BadSample) -> None:
        if self.mode == "raise":
            raise bad
        self.counts[bad.reason] += 1
        now = time.monotonic()
        if now - self._window_start >= 60:
            self._window_start, self._logged = now, 0
        if self._logged < self.max_per_minute:
            self._logged += 1
            log.warning("skipping bad sample (%d so far): %s", self.total, bad)
