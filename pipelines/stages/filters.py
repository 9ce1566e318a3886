"""Config-driven filters; a row that fails one becomes an error row (stage filter, reason = the check)."""

from __future__ import annotations

import math

from pipelines.config import FilterConfig
from pipelines.stages.rows import fail, failed, rows_of, table_of


def _num(value) -> float | None:
    if value is None:
        return None
    value = float(value)
    return None if math.isnan(value) else value


def metadata_reason(row: dict, cfg: FilterConfig) -> tuple[str, str] | None:
    """Checks on manifest fields alone (run before fetching): LAION-COCO quality fields, stated duration."""
    checks = (
        ("punsafe", _num(row.get("punsafe")), cfg.max_punsafe, lambda v, t: v > t, "filters.max_punsafe"),
        (
            "pwatermark",
            _num(row.get("pwatermark")),
            cfg.max_pwatermark,
            lambda v, t: v > t,
            "filters.max_pwatermark",
        ),
        (
            "similarity",
            _num(row.get("similarity")),
            cfg.min_similarity,
            lambda v, t: v < t,
            "filters.min_similarity",
        ),
    )
    for reason, value, threshold, bad, option in checks:
        if threshold is not None and value is not None and bad(value, threshold):
            return reason, f"{reason}={value:.4f} vs {option}={threshold}"
    duration = _num(row.get("duration"))
    if row.get("kind") == "video" and cfg.min_duration is not None and duration is not None:
        if duration < cfg.min_duration:
            return "min_duration", f"duration {duration:.2f}s < filters.min_duration={cfg.min_duration}"
    return None


def decoded_reason(row: dict, cfg: FilterConfig) -> tuple[str, str] | None:
    """Checks on what decoding found: the real duration and the original pixel size."""
    duration = _num(row.get("src_duration"))
    if row.get("kind") == "video" and cfg.min_duration is not None and duration is not None:
        if duration < cfg.min_duration:
            return (
                "min_duration",
                f"decoded duration {duration:.2f}s < filters.min_duration={cfg.min_duration}",
            )
    w, h = row.get("orig_width"), row.get("orig_height")
    if w is not None and h is not None:
        if (cfg.min_width is not None and w < cfg.min_width) or (
            cfg.min_height is not None and h < cfg.min_height
        ):
            return (
                "min_resolution",
                f"{w}x{h} below filters.min_width/min_height={cfg.min_width}x{cfg.min_height}",
            )
    return None


def clip_score_reason(row: dict, cfg: FilterConfig) -> tuple[str, str] | None:
    """The CLIP text-image similarity the encoders computed."""
    score = _num(row.get("clip_score"))
    if cfg.min_clip_score is not None and score is not None and score < cfg.min_clip_score:
        return "clip_score", f"clip_score {score:.4f} < filters.min_clip_score={cfg.min_clip_score}"
    return None


class FilterStage:
    """`__init__(config, which)`; `__call__(batch)` applies the metadata or the decoded checks."""

    CHECKS = {"metadata": metadata_reason, "decoded": decoded_reason, "clip_score": clip_score_reason}

    def __init__(self, config: FilterConfig | dict, which: str = "metadata"):
        self.config = config if isinstance(config, FilterConfig) else FilterConfig(**config)
        if which not in self.CHECKS:
            raise ValueError(f"FilterStage which={which!r}: use one of {sorted(self.CHECKS)}")
        self.check = self.CHECKS[which]

    def filter_row(self, row: dict) -> dict:
        if not failed(row):
            found = self.check(row, self.config)
            if found:
                fail(row, "filter", *found)
        return row

    def __call__(self, batch):
        return table_of([self.filter_row(r) for r in rows_of(batch)])
