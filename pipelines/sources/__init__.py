"""Dataset readers: one per dataset, each a generator of unified records (or error rows) from a manifest."""

from __future__ import annotations

from pipelines.sources.base import SourceReader, input_shards, slice_rows
from pipelines.sources.jdb import JourneyDBReader
from pipelines.sources.laion_coco import LaionCocoReader, laion_key
from pipelines.sources.plan import ManifestPlan, ShardSpan, plan_manifest, plan_reader
from pipelines.sources.webvid import WebVidReader, parse_iso_duration

READERS: dict[str, type[SourceReader]] = {
    "webvid": WebVidReader,
    "laion_coco": LaionCocoReader,
    "jdb": JourneyDBReader,
}


def make_reader(source: str, manifest: str, **options) -> SourceReader:
    """The reader of dataset `source` on `manifest` (options: media_root, url_rewrite, storage_options)."""
    if source not in READERS:
        raise ValueError(f"unknown source {source!r}; choose one of {sorted(READERS)}")
    return READERS[source](manifest, **options)


def is_error(item: dict) -> bool:
    """True for an ERROR_SCHEMA dict (it has a reason), False for a SOURCE_RECORD dict."""
    return "reason" in item


__all__ = [
    "READERS",
    "JourneyDBReader",
    "LaionCocoReader",
    "ManifestPlan",
    "ShardSpan",
    "SourceReader",
    "WebVidReader",
    "input_shards",
    "is_error",
    "laion_key",
    "make_reader",
    "parse_iso_duration",
    "plan_manifest",
    "plan_reader",
    "slice_rows",
]
