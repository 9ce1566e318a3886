"""The encode stage: decoded frames + captions -> VAE latents, text and image embeddings (Ray actor or local)."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable

import numpy as np

from encoders.models import FrozenEncoders, ModelsConfig
from pipelines.config import FilterConfig
from pipelines.stages.decode import frames_of
from pipelines.stages.filters import clip_score_reason, decoded_reason
from pipelines.stages.rows import fail, failed, rows_of, table_of
from shards.format import encode_npy
from shards.profiles import StorageProfile, encode_cond_frame, quantize_logstd

# The stage needs exactly the frozen encoders' settings, so its config is ModelsConfig itself.
EncodeConfig = ModelsConfig

ARRAY_COLUMNS = ("latent", "latent_std", "text_tokens", "text_pooled", "image_tokens", "image_pooled")


def _objects(n: int) -> np.ndarray:
    """An object column of n None entries (ragged arrays go in one by one, never stacked)."""
    return np.full(n, None, dtype=object)


class EncodeStage:
    """`__init__(config)` loads the frozen encoders; `__call__(batch) -> batch` encodes one batch.

    Runs unchanged as a Ray Data actor (`map_batches(EncodeStage, fn_constructor_kwargs={"config": cfg},
    batch_format="numpy", compute=ActorPoolStrategy(...), num_gpus=...)`) or locally. The frames of every
    item in a batch go through the VAE together, frame_batch_size at a time, so the encoder stays busy.
    An item that fails (bad frames, an exception, non-finite output) gets `error` = "encode_failed: ..."
    and None arrays; the rest of the batch is unaffected. With `cond_frames`, the batch also gets
    "cond_frame": each item's first frame as the image encoder sees it (uint8 [S,S,3], before normalising).
    """

    def __init__(self, config: ModelsConfig | dict, *, cond_frames: bool = False):
        self.config = config if isinstance(config, ModelsConfig) else ModelsConfig(**config)
        self.encoders = FrozenEncoders(self.config)
        self.cond_frames = cond_frames and self.encoders.image_encoder is not None

    def __call__(self, batch: dict) -> dict:
        n = len(batch["key"])
        enc = self.encoders
        errors = [""] * n
        cols = {name: _objects(n) for name in ARRAY_COLUMNS + ("cond_frame",)}
        frames = [self._checked_frames(i, f, errors) for i, f in enumerate(batch["frames"])]
        captions = [c if isinstance(c, str) else "" for c in batch.get("caption", [""] * n)]
        caption_tokens = np.zeros(n, dtype=np.int32)

        # VAE: every frame of every item of one frame size in one stream of frame_batch_size chunks.
        groups = defaultdict(list)
        for i, f in enumerate(frames):
            if f is not None:
                groups[f.shape[1:]].append(i)
        for idx in groups.values():
            self._isolated(idx, errors, "vae", lambda ids: self._encode_latents(ids, frames, cols))

        def text(ids):
            out = enc.encode_text([captions[i] for i in ids])
            for j, i in enumerate(ids):
                cols["text_tokens"][i], cols["text_pooled"][i] = out["tokens"][j], out["pooled"][j]
                caption_tokens[i] = out["num_tokens"][j]

        self._isolated([i for i in range(n) if not errors[i]], errors, "text", text)

        if enc.image_encoder is not None:  # images, and each video's first frame (Image2Video condition)

            def image(ids):
                out = enc.encode_images(np.stack([frames[i][0] for i in ids]))
                for j, i in enumerate(ids):
                    cols["image_tokens"][i], cols["image_pooled"][i] = out["tokens"][j], out["pooled"][j]
                if self.cond_frames:
                    pixels = enc.condition_frames(np.stack([frames[i][0] for i in ids]))
                    for j, i in enumerate(ids):
                        cols["cond_frame"][i] = pixels[j]

            for idx in groups.values():
                self._isolated([i for i in idx if not errors[i]], errors, "image", image)

        for i in range(n):  # non-finite output (e.g. fp16 overflow) is an item failure, not a batch failure
            bad = [k for k in ARRAY_COLUMNS if cols[k][i] is not None and not np.isfinite(cols[k][i]).all()]
            if bad and not errors[i]:
                errors[i] = f"encode_failed: non-finite {', '.join(bad)}"

        clip = np.full(n, np.nan, dtype=np.float32)
        if enc.has_clip_score:
            ok = [i for i in range(n) if not errors[i]]
            if ok:
                clip[ok] = enc.clip_score(
                    np.stack([cols["text_pooled"][i] for i in ok]),
                    np.stack([cols["image_pooled"][i] for i in ok]),
                )
        for i in range(n):
            if errors[i]:
                for name in cols:
                    cols[name][i] = None
                caption_tokens[i] = 0

        out = {k: v for k, v in batch.items() if k != "frames"}  # frames are big: never passed on
        out.update(cols if self.cond_frames else {k: v for k, v in cols.items() if k != "cond_frame"})
        out["caption_tokens"] = caption_tokens
        out["clip_score"] = clip
        out["scale_factor"] = np.full(n, enc.scale_factor, dtype=np.float32)
        for name, value in enc.ids.items():
            out[name] = np.array([value] * n, dtype=object)
        out["error"] = np.array(errors, dtype=object)
        return out

    # ---- helpers ------------------------------------------------------------------------------------
    @staticmethod
    def _checked_frames(i: int, frames, errors: list[str]) -> np.ndarray | None:
        """uint8 [T,H,W,3] with T >= 1, else record the item's error and return None."""
        try:
            arr = np.asarray(frames)
        except Exception as exc:  # ragged nested lists and the like
            errors[i] = f"encode_failed: unreadable frames ({exc})"
            return None
        if arr.ndim == 3 and arr.shape[-1] == 3:
            arr = arr[None]  # a single image given as [H,W,3]
        if arr.ndim != 4 or arr.shape[-1] != 3 or arr.shape[0] < 1 or arr.dtype != np.uint8:
            errors[i] = f"encode_failed: frames must be uint8 [T>=1,H,W,3], got {arr.dtype} {list(arr.shape)}"
            return None
        return arr

    def _encode_latents(self, ids: list[int], frames: list, cols: dict) -> None:
        """VAE-encode the frames of items `ids` in one stream; store [C,T,h,w] per item."""
        mean, std = self.encoders.encode_frames(np.concatenate([frames[i] for i in ids]))
        start = 0
        for i in ids:
            t = frames[i].shape[0]
            cols["latent"][i] = np.ascontiguousarray(mean[start : start + t].transpose(1, 0, 2, 3))
            cols["latent_std"][i] = np.ascontiguousarray(std[start : start + t].transpose(1, 0, 2, 3))
            start += t

    @staticmethod
    def _isolated(ids: list[int], errors: list[str], what: str, fn: Callable[[list[int]], None]) -> None:
        """fn(ids) for the whole group; if it raises, retry item by item so one bad item fails alone."""
        if not ids:
            return
        try:
            fn(ids)
            return
        except Exception as exc:
            if len(ids) == 1:
                errors[ids[0]] = errors[ids[0]] or f"encode_failed: {what}: {type(exc).__name__}: {exc}"
                return
        for i in ids:
            try:
                fn([i])
            except Exception as exc:
                errors[i] = errors[i] or f"encode_failed: {what}: {type(exc).__name__}: {exc}"


class EncodeRowsStage:
    """`__init__(models, filters, storage)` loads EncodeStage; `__call__(batch)` encodes the good rows of a job batch.

    Failed rows pass through; encoded arrays leave as the members the storage profile keeps (.npy or JPEG
    bytes, what the tar holds), frames are dropped; the decoded-media filters (duration, resolution) run
    first, the CLIP-score filter after encoding.
    """

    def __init__(self, models: dict, filters: dict | None = None, storage=None):
        self.storage = StorageProfile.parse(storage)
        self.stage = EncodeStage(models, cond_frames=self.storage.image == "frame")
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

    def _apply_storage(self, row: dict, out: dict, j: int) -> None:
        """Keep the members the storage profile stores: the std in 8 bits or none, the conditioning frame
        instead of image tokens, no text tokens; the profile and the log-std scale go to the index row."""
        p = self.storage
        row["storage_profile"] = str(p)
        row["logstd_offset"] = row["logstd_step"] = row["latent_logstd8_npy"] = row["cond_frame_jpg"] = None
        if p.latent != "mean+std":
            if p.latent == "mean+logstd8":
                q, row["logstd_offset"], row["logstd_step"] = quantize_logstd(out["latent_std"][j])
                row["latent_logstd8_npy"] = encode_npy(q)
            row["latent_std_npy"] = None
        if p.text == "caption":
            row["text_tokens_npy"] = None
        if p.image == "frame" and out["image_tokens"][j] is not None:
            row["cond_frame_jpg"] = encode_cond_frame(out["cond_frame"][j])
            row["image_tokens_npy"] = None

    def _fill(self, row: dict, out: dict, j: int) -> None:
        if out["error"][j]:
            fail(row, "encode", "encode_failed", out["error"][j])
            return
        for name in ("latent", "latent_std", "text_tokens", "text_pooled", "image_tokens", "image_pooled"):
            value = out[name][j]
            row[f"{name}_npy"] = None if value is None else encode_npy(np.asarray(value, dtype=np.float16))
        self._apply_storage(row, out, j)
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
