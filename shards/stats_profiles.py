"""Stats per storage profile: bytes per member kind, and per-sample bytes projected to 512x320x16 real sizes.

Fast mode (shards.stats_fast.scan_index) calls scan_profiles() on every index batch; the report's
`bytes.profiles` (profiles_section) and the terminal table (render_profiles) come from the sums.

The measured projection to a 512x320x16 video sample at the real encoder sizes (shards.profiles.REAL_SHAPES)
is made from the video rows of the index only (image rows and rows without a latent_shape are skipped),
member kind by member kind, keeping each .npy member's 128-byte header and scaling its payload:
  latent        by prod(REAL latent) / prod(row latent_shape) (mean, std and log-std share the shape);
  text_tokens   the tokens' float16 payload (2 * prod(row text_tokens_shape), when the row stores text
                tokens) by prod(REAL text_tokens) / prod(row text_tokens_shape), the rest (text_pooled.npy)
                by REAL text_pooled / the row's text width (last dim of text_tokens_shape);
  image_tokens  likewise with image_tokens_shape and REAL image_tokens / image_pooled (0 stays 0);
  image_frame   cond_frame.jpg by the pixel ratio 224² / S², S taken as the real encoder's patch (14) times
                the row's patch grid sqrt(N - 1) (N = image_tokens_shape[0]), i.e. by 256 / (N - 1);
                rows without an image_tokens_shape keep their frame bytes as stored (`frame`: "as stored");
  other         (tar headers, json, caption) as stored.
An approximation (JPEG bytes do not grow exactly with pixels, pooled widths may differ from token widths):
`from_shapes` (shards.profiles.bytes_from_shapes, an upper bound) is the primary figure.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from shards.profiles import NPY_HEADER, PROFILES, REAL_SHAPES, StorageProfile, bytes_from_shapes

PROFILE_COLUMN = "storage_profile"  # absent or null in indexes written before storage profiles: full
SHAPE_COLUMNS = ("latent_shape", "text_tokens_shape", "image_tokens_shape")
PROFILE_COLUMNS = (PROFILE_COLUMN, *SHAPE_COLUMNS)
# member kind -> index byte column
KIND_COLUMNS = {
    "latent": "bytes_latent",
    "text_tokens": "bytes_text_tokens",
    "image_tokens": "bytes_image_tokens",
    "image_frame": "bytes_image_frame",
}
KINDS = (*KIND_COLUMNS, "other", "total")
REAL_SIZE = "512x320x16"
_REAL_PATCHES = REAL_SHAPES["image_tokens"][0] - 1  # 256: a 16 x 16 grid of 14 px patches at 224 px


def _zeros() -> dict:
    return dict.fromkeys(KINDS, 0.0)


@dataclass
class ProfileBytes:
    """Samples and byte sums of one storage profile, plus the projection of its video rows to real sizes."""

    samples: int = 0
    bytes: dict = field(default_factory=_zeros)  # member kind -> bytes as stored (all rows)
    projected_rows: int = 0  # video rows with a latent_shape (the ones projected)
    projected: dict = field(default_factory=_zeros)  # member kind -> bytes scaled to real sizes
    frame_as_stored: int = 0  # projected rows whose cond_frame.jpg bytes could not be scaled

    def merge(self, other: ProfileBytes) -> ProfileBytes:
        self.samples += other.samples
        self.projected_rows += other.projected_rows
        self.frame_as_stored += other.frame_as_stored
        for k in KINDS:
            self.bytes[k] += other.bytes[k]
            self.projected[k] += other.projected[k]
        return self


def profile_key(value: str | None) -> str:
    """The canonical text form of an index's storage_profile value (null: full); unparsable text as is."""
    try:
        return str(StorageProfile.parse(value))
    except ValueError:
        return str(value)


def _parse(key: str) -> StorageProfile | None:
    try:
        return StorageProfile.parse(key)
    except ValueError:
        return None


def _bytes(batch: pa.RecordBatch, name: str) -> np.ndarray:
    """A byte column as float64 (nulls and a missing column: 0)."""
    if name not in batch.schema.names:
        return np.zeros(batch.num_rows)
    col = pc.fill_null(pc.cast(batch.column(name), pa.float64()), 0.0)
    return col.to_numpy(zero_copy_only=False)


def _shape_stats(batch: pa.RecordBatch, name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(product, first dim, last dim) of a list<int> shape column per row; NaN where null, empty or absent."""
    n = batch.num_rows
    prod, first, last = np.full(n, np.nan), np.full(n, np.nan), np.full(n, np.nan)
    if name not in batch.schema.names:
        return prod, first, last
    col = batch.column(name)
    if col.null_count == 0:  # the offsets give the lengths (much faster than list_value_length)
        lengths = np.diff(col.offsets.to_numpy(zero_copy_only=False).astype(np.int64))
    else:
        lengths = pc.fill_null(pc.list_value_length(col), 0).to_numpy(zero_copy_only=False).astype(np.int64)
    values = col.flatten().to_numpy(zero_copy_only=False).astype(np.float64)
    k = int(lengths[0])
    if k and len(values) == n * k and (lengths == k).all():  # the usual case: every row one shape rank
        rows = values.reshape(n, k)
        return rows.prod(axis=1), rows[:, 0].copy(), rows[:, -1].copy()
    has = lengths > 0
    if not has.any():
        return prod, first, last
    starts = (np.cumsum(lengths) - lengths)[has]
    prod[has] = np.multiply.reduceat(values, starts)
    first[has] = values[starts]
    last[has] = values[starts + lengths[has] - 1]
    return prod, first, last


def _scaled(stored, n_npy, parts) -> np.ndarray:
    """Stored .npy bytes with their n_npy headers kept and the payload scaled: `parts` is [(payload bytes or
    None for the rest, ratio)]; rows where a ratio is not finite keep their bytes as stored."""
    head = NPY_HEADER * n_npy
    rest = np.maximum(stored - head, 0).astype(np.float64)
    out = np.full(len(stored), float(head))
    for payload, ratio in parts:
        take = rest if payload is None else np.minimum(payload, rest)
        out += take * ratio
        rest = rest - take
    return np.where(np.isfinite(out) & (stored > 0), out, stored)


def scan_profiles(batch: pa.RecordBatch, profiles: dict, video: np.ndarray) -> None:
    """Add one index batch to `profiles` {profile text: ProfileBytes} (`video`: the rows of kind video)."""
    n = batch.num_rows
    if n == 0:
        return
    stored = {k: _bytes(batch, c) for k, c in KIND_COLUMNS.items()}
    stored["total"] = _bytes(batch, "bytes_total")
    stored["other"] = np.maximum(stored["total"] - sum(stored[k] for k in KIND_COLUMNS), 0)
    latent, text, image = (_shape_stats(batch, c) for c in SHAPE_COLUMNS)
    if PROFILE_COLUMN in batch.schema.names:
        col = batch.column(PROFILE_COLUMN)
        values = pc.unique(col).to_pylist()
        masks = [
            (
                v,
                (pc.is_null(col) if v is None else pc.fill_null(pc.equal(col, v), False)).to_numpy(
                    zero_copy_only=False
                ),
            )
            for v in values
        ]
    else:
        masks = [(None, np.ones(n, bool))]
    for value, mask in masks:
        key = profile_key(value)
        acc = profiles.setdefault(key, ProfileBytes())
        acc.samples += int(mask.sum())
        for k in KINDS:
            acc.bytes[k] += float(stored[k][mask].sum())
        rows = mask & video & np.isfinite(latent[0]) & (latent[0] > 0)
        if rows.any():
            _project(acc, _parse(key) or PROFILES["full"], rows, stored, latent, text, image)


def _project(acc: ProfileBytes, p: StorageProfile, rows, stored, latent, text, image) -> None:
    """Add the real-size projection of `rows` (see the module docstring) to `acc`."""
    real = {k: math.prod(v) for k, v in REAL_SHAPES.items()}
    with np.errstate(divide="ignore", invalid="ignore"):
        n_latent = 1 + (p.latent != "mean")
        out = {
            "latent": _scaled(stored["latent"][rows], n_latent, [(None, real["latent"] / latent[0][rows])])
        }
        for kind, (prod, _, width), tokens in (
            ("text_tokens", text, p.text == "tokens"),
            ("image_tokens", image, p.image == "tokens"),
        ):
            pooled = (None, real[kind.replace("tokens", "pooled")] / width[rows])
            parts = [(2 * prod[rows], real[kind] / prod[rows]), pooled] if tokens else [pooled]
            out[kind] = _scaled(stored[kind][rows], 1 + tokens, parts)
        frame_ratio = _REAL_PATCHES / (image[1][rows] - 1)
        frame = stored["image_frame"][rows]
        scalable = np.isfinite(frame_ratio) & (frame_ratio > 0)
        out["image_frame"] = np.where(scalable, frame * frame_ratio, frame)
    acc.frame_as_stored += int(((frame > 0) & ~scalable).sum())
    out["other"] = stored["other"][rows]
    out["total"] = sum(out[k] for k in KINDS if k != "total")
    acc.projected_rows += int(rows.sum())
    for k in KINDS:
        acc.projected[k] += float(out[k].sum())


# ---------------------------------------------------------------- report


def _order(key: str) -> tuple:
    names = list(PROFILES)
    p = _parse(key)
    return (names.index(p.name), key) if p is not None and p.name in names else (len(names), key)


def profiles_section(profiles: dict) -> list[dict]:
    """The report's `bytes.profiles` rows (full, compact, lean first; then other profiles by text)."""
    out = []
    for key in sorted(profiles, key=_order):
        acc = profiles[key]
        p = _parse(key)
        n = acc.samples
        per = {k: (acc.bytes[k] / n if n else None) for k in KINDS}
        m = acc.projected_rows
        measured = {k: acc.projected[k] / m for k in KINDS} if m else None
        shapes = bytes_from_shapes(p) if p is not None else None
        out.append(
            {
                "profile": p.name if p is not None else key,
                "text": key,
                "samples": n,
                "per_sample": per,
                f"projected_{REAL_SIZE}": {
                    "measured": measured["total"] if measured else None,
                    "from_shapes": shapes["total"] if shapes else None,
                    "video_samples": m,
                    "measured_members": measured,
                    "frame": None if not m else "as stored" if acc.frame_as_stored else "scaled",
                },
            }
        )
    return out


def render_profiles(report: dict, console, human_bytes, count) -> None:
    """The terminal table "Bytes per sample by storage profile" (fits 100 columns)."""
    from rich import box
    from rich.table import Table

    rows = report["bytes"].get("profiles") or []
    if not rows:
        return
    t = Table(
        title=f"Bytes per sample by storage profile (real: one {REAL_SIZE} video, real encoder sizes)",
        box=box.SIMPLE_HEAD,
        title_justify="left",
        title_style="bold",
        pad_edge=False,
        collapse_padding=True,
    )
    heads = ("profile", "samples", "latent", "text", "image", "frame", "other", "total", "real bound")
    for i, h in enumerate((*heads, "real meas.")):
        t.add_column(h, justify="right" if i else "left", no_wrap=bool(i), overflow="fold")
    for r in rows:
        per = r["per_sample"]
        proj = r[f"projected_{REAL_SIZE}"]
        measured = human_bytes(proj["measured"])
        if proj["frame"] == "as stored":
            measured += "*"
        t.add_row(
            r["profile"],
            count(r["samples"]),
            *(human_bytes(per[k]) for k in ("latent", "text_tokens", "image_tokens", "image_frame")),
            human_bytes(per["other"]),
            human_bytes(per["total"]),
            human_bytes(proj["from_shapes"]),
            measured,
        )
    console.print(t)
    console.print(
        "  real bound: from shapes (an upper bound); real meas.: the video rows scaled to real sizes"
    )
    if any(r[f"projected_{REAL_SIZE}"]["frame"] == "as stored" for r in rows):
        console.print("  * some cond_frame.jpg bytes as stored (no image_tokens_shape to scale them by)")
