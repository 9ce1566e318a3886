"""The encode job's read stage (input shard -> rows) and its encode stage around EncodeStage (rows -> npy members)."""

from __future__ import annotations

import json

import numpy as np

from pipelines.config import FilterConfig
from pipelines.decode import frames_of
from pipelines.filters import clip_score_reason, decoded_reason
from pipelines.rows import fail, failed, new_row, rows_of, table_of
from shards.format import encode_npy

_READERS: dict[tuple, object] = {}


def open_reader(source: str, manifest: str, media_root: str | None, url_rewrite: dict | None):
    """The dataset reader, cached per process (a manifest is opened once per worker, not per shard)."""
    from pipelines.sources import make_reader

    cache_key = (source, manifest, media_root, tuple(sorted((url_rewrite or {}).items())))
    if cache_key not in _READERS:
        _READERS[cache_key] = make_reader(source, manifest, media_root=media_root, url_rewrite=url_rewrite)
    return _READERS[cache_key]


def read_task(task: dict) -> list[dict]:
    """The rows of one read unit (task: source, manifest, media_root, url_rewrite, stage, shard, shard_rows,
    start, stop), tagged with their input shard."""
    from pipelines.sources import is_error

    rewrite = json.loads(task["url_rewrite"] or "{}")
    reader = open_reader(task["source"], task["manifest"], task["media_root"], rewrite)
    rows = range(task["start"], task["stop"])
    tag = dict(stage=task["stage"], shard=task["shard"], shard_rows=task["shard_rows"])
    out = []
    for item in reader.read(rows):
        if is_error(item):
            row = new_row(**tag, key=item["key"], source=item["source"], uri=item.get("uri"))
            row.update(manifest=item.get("manifest"), row=item.get("row"))
            out.append(fail(row, "read", item["reason"], item.get("detail") or ""))
        else:
            out.append(new_row(**tag, **item))
    return out


def read_batch(batch):
    """Ray Data UDF: a batch of input-shard tasks -> the rows of those shards."""
    rows = []
    for task in batch.to_pylist():
        rows.extend(read_task(task))
    return table_of(rows)


class EncodeRowsStage:
    """`__init__(models, filters)` loads EncodeStage; `__call__(batch)` encodes the good rows of a job batch.

    Failed rows pass through; encoded arrays leave as .npy bytes (what the tar holds), frames are dropped;
    the decoded-media filters (duration, resolution) run first, the CLIP-score filter after encoding.
    """

    def __init__(self, models: dict, filters: dict | None = None):
        from pipelines.encode import EncodeStage

        self.stage = EncodeStage(models)
        self.filters = FilterConfig(**(filters or {}))

    def __call__(self, batch):
        rows = rows_of(batch)
        for row in rows:  # duration / resolution checks before spending the encoder on the row
            found = None if failed(row) else decoded_reason(row, self.filters)
            if found:
                fail(row, "filter", *found)
        ok = [i for i, r in enumerate(rows) if not failed(r)]
        if ok:
            sub = {
                "key": np.array([rows[i]["key"] for i in ok], dtype=object),
                "kind": np.array([rows[i]["kind"] for i in ok], dtype=object),
                "caption": np.array([rows[i]["caption"] or "" for i in ok], dtype=object),
                "frames": np.empty(len(ok), dtype=object),
            }
            for j, i in enumerate(ok):
                sub["frames"][j] = frames_of(rows[i])
            out = self.stage(sub)
            for j, i in enumerate(ok):
                self._fill(rows[i], out, j)
        for row in rows:
            row["frames"] = None
            row["data"] = None
        return table_of(rows)

    def _fill(self, row: dict, out: dict, j: int) -> None:
        if out["error"][j]:
            fail(row, "encode", "encode_failed", out["error"][j])
            return
        for name in ("latent", "latent_std", "text_tokens", "text_pooled", "image_tokens", "image_pooled"):
            value = out[name][j]
            row[f"{name}_npy"] = None if value is None else encode_npy(np.asarray(value, dtype=np.float16))
        row["latent_shape"] = list(np.shape(out["latent"][j]))
        row["text_tokens_shape"] = list(np.shape(out["text_tokens"][j]))
        image = out["image_tokens"][j]
        row["image_tokens_shape"] = None if image is None else list(np.shape(image))
        score = float(out["clip_score"][j])
        row.update(
            caption_tokens=int(out["caption_tokens"][j]),
            clip_score=None if np.isnan(score) else score,
            scale_factor=float(out["scale_factor"][j]),
            vae_id=str(out["vae_id"][j]),
            text_encoder_id=str(out["text_encoder_id"][j]),
            image_encoder_id=str(out["image_encoder_id"][j] or "") or None,
        )
        found = clip_score_reason(row, self.filters)
        if found:
            fail(row, "filter", *found)
