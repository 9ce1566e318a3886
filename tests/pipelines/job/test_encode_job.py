"""The encode job end to end on the three sample datasets: exact accounting, members, json, index, embeddings."""

from __future__ import annotations

import io
import json
from collections import Counter

import numpy as np
import pyarrow.parquet as pq

from schemas import SAMPLE_JSON_SCHEMA, SHARD_INDEX_SCHEMA
from tests.pipelines.job.helpers import SOURCES, STAGE, expected_outcome, read_output


def _npy(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data), allow_pickle=False)


def test_every_row_is_one_sample_or_the_planted_error(encoded_shards, sample_data):
    expected = expected_outcome(sample_data)
    out = read_output(encoded_shards.out_dir)
    for source in SOURCES:
        want, got = expected[source], out[source]
        errors = {e["key"]: (e["stage"], e["reason"]) for e in got["errors"]}
        assert len(errors) == len(got["errors"]), f"{source}: an error key twice"
        assert errors == want["errors"], source
        good = set(want["keys"]) - set(want["errors"])
        assert set(got["samples"]) == good, source
        assert len(got["samples"]) + len(got["errors"]) == want["rows"]
        assert not set(got["samples"]) & set(errors)
        index_keys = [r["key"] for r in got["index"]]
        assert sorted(index_keys) == got["samples"] and len(set(index_keys)) == len(index_keys)


def test_summary_counts_match_the_shards(encoded_shards, sample_data):
    expected = expected_outcome(sample_data)
    total = encoded_shards.summary["total"]
    assert total["rows"] == sum(e["rows"] for e in expected.values())
    for source in SOURCES:
        assert total["samples"][f"{source}/{STAGE}"] == expected[source]["rows"] - len(
            expected[source]["errors"]
        )
    reasons = Counter(f"{s}/{r}" for e in expected.values() for s, r in e["errors"].values())
    assert total["errors"] == dict(reasons)
    assert encoded_shards.summary["unfinished_shards"] == []
    shards = encoded_shards.summary["shards"]  # written by the shard tasks on Ray workers, not the driver
    assert len(shards) == len(list(encoded_shards.out_dir.glob("*.index.parquet")))
    assert all(s["writer_pid"] != encoded_shards.summary["driver_pid"] and s["writer_node"] for s in shards)


def test_members_shapes_and_dtypes(encoded_shards):
    out = read_output(encoded_shards.out_dir)
    for source in SOURCES:
        for key, members in out[source]["members"].items():
            assert {
                "latent.npy",
                "latent_std.npy",
                "txt",
                "text_tokens.npy",
                "text_pooled.npy",
                "json",
            } <= set(members)
            assert {"image_tokens.npy", "image_pooled.npy"} <= set(members)
            latent, std = _npy(members["latent.npy"]), _npy(members["latent_std.npy"])
            assert latent.dtype == np.float16 and std.shape == latent.shape and latent.ndim == 4
            frames = 8 if source == "webvid" else 1
            assert latent.shape[1] == frames and latent.shape[2:] == (256 // 8, 256 // 8), (key, latent.shape)
            tokens, pooled = _npy(members["text_tokens.npy"]), _npy(members["text_pooled.npy"])
            assert tokens.dtype == np.float16 and tokens.ndim == 2 and tokens.shape[0] == 77
            assert pooled.dtype == np.float16 and pooled.ndim == 1
            image = _npy(members["image_tokens.npy"])
            assert image.dtype == np.float16 and image.ndim == 2
            assert np.isfinite(latent).all() and np.isfinite(tokens).all()
            meta = json.loads(members["json"])
            assert set(SAMPLE_JSON_SCHEMA.names) <= set(meta), key
            assert meta["key"] == key and meta["source"] == source and meta["stage"] == STAGE
            assert (meta["width"], meta["height"]) == (256, 256)
            assert members["txt"].decode() == meta["caption"] and meta["caption"]
            assert meta["vae_id"] and meta["text_encoder_id"] and json.loads(meta["versions"])["torch"]


def test_video_json_records_the_clip(encoded_shards, sample_data):
    items = json.loads((sample_data / "expected.json").read_text())["webvid"]["items"]
    out = read_output(encoded_shards.out_dir)
    for key, members in out["webvid"]["members"].items():
        meta = json.loads(members["json"])
        item = items[key]
        assert meta["kind"] == "video" and abs(meta["fps"] - item["fps"]) < 0.5
        assert len(meta["frame_indices"]) == 8
        steps = set(np.diff(meta["frame_indices"]).tolist())
        assert steps == {meta["frame_stride"]} and meta["frame_stride"] == 2
        assert abs(meta["sample_fps"] - meta["fps"] / 2) < 1e-3
        assert max(meta["frame_indices"]) < item["frames"]
        assert (meta["orig_width"], meta["orig_height"]) == (item["width"], item["height"])
    for members in out["laion_coco"]["members"].values():
        meta = json.loads(members["json"])
        assert meta["kind"] == "image" and meta["punsafe"] <= 0.5 and meta["similarity"] is not None


def test_index_rows_follow_the_schema_and_point_into_the_tar(encoded_shards):
    for index in sorted(encoded_shards.out_dir.glob("*.index.parquet")):
        table = pq.read_table(index)
        assert table.schema.names == SHARD_INDEX_SCHEMA.names
        tar_bytes = index.with_name(index.name.replace(".index.parquet", ".tar")).read_bytes()
        for row in table.to_pylist():
            header = tar_bytes[row["offset"] : row["offset"] + 100].split(b"\0")[0].decode()
            assert header.startswith(row["key"] + "."), (index.name, row["key"], header)
            assert row["latent_dtype"] == "float16" and row["bytes_latent"] > 0 and row["stage"] == STAGE


def test_clip_retrieval_layout(encoded_shards):
    out = read_output(encoded_shards.out_dir)
    for source in SOURCES:
        folder = encoded_shards.out_dir / "embeddings" / f"{source}-{STAGE}"
        metas = sorted((folder / "metadata").glob("metadata_*.parquet"))
        keys = []
        for meta in metas:
            n = meta.stem.split("_")[-1]
            rows = pq.read_table(meta).to_pylist()
            img = np.load(folder / "img_emb" / f"img_emb_{n}.npy")
            text = np.load(folder / "text_emb" / f"text_emb_{n}.npy")
            assert img.dtype == np.float16 and img.shape[0] == len(rows) == text.shape[0]
            assert np.allclose(np.linalg.norm(img.astype(np.float32), axis=1), 1.0, atol=2e-3)
            keys += [r["key"] for r in rows]
        assert sorted(keys) == out[source]["samples"]
