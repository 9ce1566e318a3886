"""Aspect-ratio buckets on the loader side: which latent sizes a stage may hold and each bucket's batch size.

The encode job (``decode.bucketing: true``) resizes each clip or image to the nearest bucket of its stage
(pipelines.stages.decode.default_buckets, or ``decode.buckets``), so one stage's shards hold several latent
sizes. The loader (``LoaderConfig.bucketing``) groups samples by (kind, bucket) so that every batch has one
latent shape; see shards.mixing.BatchBuilder for how that keeps mixing and resume exact.
"""

from __future__ import annotations

from shards.format import parse_resolution, resolution_tag


def default_buckets(stage: str) -> list[tuple[int, int]]:
    """The encode job's default buckets of a stage (same rule as pipelines.stages.decode.default_buckets):
    the stage, its transpose, and a square of about the same pixel count (multiples of 64)."""
    w, h = parse_resolution(stage)
    side = max(64, round((w * h) ** 0.5 / 64) * 64)
    return list(dict.fromkeys([(w, h), (h, w), (side, side)]))


def pixel_budget_batch_size(base: int, stage: str, bucket: str) -> int:
    """floor(base * stage pixels / bucket pixels), at least 1: about the same tokens per batch in every bucket."""
    sw, sh = parse_resolution(stage)
    bw, bh = parse_resolution(bucket)
    return max(1, (int(base) * sw * sh) // (bw * bh))


def latent_bucket(latent_shape, vae_downsample: int) -> str:
    """The "WxH" pixel bucket of a latent [..., h, w]."""
    h, w = (int(v) for v in latent_shape[-2:])
    return resolution_tag(w * vae_downsample, h * vae_downsample)


def parse_bucket_sizes(buckets: dict) -> dict[str, dict[str, int]]:
    """Config ``buckets: {"WxH": n}`` (both kinds) or ``{"WxH": {"video": n, "image": m}}`` -> {tag: {kind: n}}."""
    out = {}
    for tag, size in (buckets or {}).items():
        w, h = parse_resolution(str(tag))  # ValueError naming the tag
        sizes = dict(size) if isinstance(size, dict) else {"video": size, "image": size}
        unknown = set(sizes) - {"video", "image"}
        if unknown:
            raise ValueError(f"buckets[{tag!r}]: keys must be 'video' and/or 'image', got {sorted(unknown)}")
        for kind, n in sizes.items():
            if isinstance(n, bool) or not isinstance(n, int) or n < 1:
                raise ValueError(f"buckets[{tag!r}] {kind} batch size must be an int >= 1, got {n!r}")
        out[resolution_tag(w, h)] = sizes
    return out
