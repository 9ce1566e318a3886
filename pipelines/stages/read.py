"""The read stage: one input shard's span of a manifest -> job rows (records, or read-stage failures)."""

from __future__ import annotations

from pipelines.stages.rows import fail, new_row

_READERS: dict[tuple, object] = {}


def open_reader(source: str, manifest: str, media_root: str | None, url_rewrite: dict | None):
    """The dataset reader, cached per worker process (a manifest's header is checked once per process)."""
    from pipelines.sources import make_reader

    cache_key = (source, manifest, media_root, tuple(sorted((url_rewrite or {}).items())))
    if cache_key not in _READERS:
        _READERS[cache_key] = make_reader(source, manifest, media_root=media_root, url_rewrite=url_rewrite)
    return _READERS[cache_key]


def read_shard(task: dict) -> list[dict]:
    """The job rows of one input shard, in manifest order.

    task: source, manifest, media_root, url_rewrite (dict), stage, shard, start, stop, and from the plan
    `offset` (byte offset of row `start`; None for parquet) and `duplicates` ({row: first row} within the span).
    """
    from pipelines.sources import is_error

    reader = open_reader(task["source"], task["manifest"], task["media_root"], task["url_rewrite"])
    rows = range(task["start"], task["stop"])
    tag = dict(stage=task["stage"], shard=task["shard"], shard_rows=len(rows))
    out = []
    plan = {k: task[k] for k in ("offset", "duplicates") if task.get(k) is not None}
    for item in reader.read(rows, **plan):
        if is_error(item):
            row = new_row(**tag, key=item["key"], source=item["source"], uri=item.get("uri"))
            row.update(manifest=item.get("manifest"), row=item.get("row"))
            out.append(fail(row, "read", item["reason"], item.get("detail") or ""))
        else:
            out.append(new_row(**tag, **item))
    return out
