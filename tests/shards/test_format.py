"""The shard format: names, safe members, npy without pickles, and the ShardWriter's files and order."""

from __future__ import annotations

import tarfile

import numpy as np
import pyarrow.parquet as pq
import pytest

from schemas import ERROR_SCHEMA, SHARD_INDEX_SCHEMA, error_row
from shards.format import (
    ShardPaths,
    ShardWriter,
    check_key,
    check_member_name,
    decode_npy,
    encode_npy,
    parse_resolution,
    parse_shard_stem,
    shard_is_done,
    shard_stem,
)


def _members(rng, t=2):
    return {
        "latent.npy": rng.standard_normal((4, t, 8, 8)).astype(np.float16),
        "latent_std.npy": np.full((4, t, 8, 8), 0.1, np.float16),
        "txt": "a red fox",
        "text_tokens.npy": rng.standard_normal((77, 32)).astype(np.float16),
        "text_pooled.npy": rng.standard_normal(32).astype(np.float16),
        "json": {"key": "x", "source": "webvid", "kind": "video"},
    }


def test_names_round_trip():
    stem = shard_stem("laion_coco", "512x320", 7)
    assert stem == "laion_coco-512x320-000007"
    assert parse_shard_stem(stem + ".index.parquet") == {
        "source": "laion_coco",
        "stage": "512x320",
        "shard": 7,
    }
    assert parse_resolution("1024x576") == (1024, 576)
    with pytest.raises(ValueError, match="WIDTHxHEIGHT"):
        parse_resolution("1024")
    with pytest.raises(ValueError, match="shard name"):
        parse_shard_stem("webvid-256.tar")


@pytest.mark.parametrize("name", ["../etc.txt", "/abs.txt", "a/b.txt", "nodot", "k..npy", "k.lat\\ent"])
def test_unsafe_member_names_are_refused(name):
    with pytest.raises(ValueError, match="member name"):
        check_member_name(name)


def test_member_name_split_and_key_rules():
    assert check_member_name("webvid_12.latent.npy") == ("webvid_12", "latent.npy")
    with pytest.raises(ValueError, match="sample key"):
        check_key("has.dot")


def test_npy_refuses_pickles():
    arr = np.arange(6, dtype=np.float16).reshape(2, 3)
    assert np.array_equal(decode_npy(encode_npy(arr)), arr)
    import io

    buf = io.BytesIO()
    np.save(buf, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError):
        decode_npy(buf.getvalue())


def test_writer_writes_tar_errors_then_index(tmp_path):
    rng = np.random.default_rng(0)
    stem = shard_stem("webvid", "256x256", 0)
    writer = ShardWriter(str(tmp_path), stem)
    for i in range(3):
        writer.write(
            f"webvid_{i}",
            _members(rng),
            {"source": "webvid", "origin_key": str(i), "kind": "video", "stage": "256x256"},
        )
    writer.add_errors([error_row(key="webvid_9", source="webvid", stage="fetch", reason="not_found")])
    assert not shard_is_done(str(tmp_path), stem)
    (streaming,) = tmp_path.glob("*.tmp-*")  # samples go to disk as they come, not into memory
    assert streaming.stat().st_size > 16384 and not (tmp_path / f"{stem}.tar").exists()
    summary = writer.close()
    assert summary["samples"] == 3 and summary["errors"] == 1
    assert shard_is_done(str(tmp_path), stem)

    paths = ShardPaths.of(str(tmp_path), stem)
    index = pq.read_table(paths.index)
    assert index.schema.equals(SHARD_INDEX_SCHEMA)
    assert index.column("key").to_pylist() == ["webvid_0", "webvid_1", "webvid_2"]
    assert pq.read_table(paths.errors).schema.equals(ERROR_SCHEMA)
    with tarfile.open(paths.tar) as tar:
        names = tar.getnames()
        offsets = {m.name: m.offset for m in tar.getmembers()}
    assert len(names) == 3 * 6
    # the index's offset points at each sample's first member header; sizes add up to the tar body
    for row in index.to_pylist():
        first = min(n for n in names if n.startswith(row["key"] + "."))
        assert offsets[first] == row["offset"]
        assert row["bytes_latent"] > 0 and row["bytes_text_tokens"] > 0 and row["bytes_image_tokens"] == 0
    assert not list(tmp_path.glob("*.tmp-*"))


def test_writer_refuses_duplicates_and_missing_members(tmp_path):
    rng = np.random.default_rng(1)
    writer = ShardWriter(str(tmp_path), shard_stem("jdb", "512x320", 1))
    writer.write(
        "jdb_a", _members(rng, t=1), {"source": "jdb", "origin_key": "a", "kind": "image", "stage": "512x320"}
    )
    with pytest.raises(ValueError, match="duplicate key"):
        writer.write("jdb_a", _members(rng, t=1), {})
    broken = _members(rng, t=1)
    del broken["text_pooled.npy"]
    with pytest.raises(ValueError, match="missing members"):
        writer.write("jdb_b", broken, {})


def test_an_aborted_writer_leaves_nothing(tmp_path):
    writer = ShardWriter(str(tmp_path), shard_stem("jdb", "512x320", 2))
    writer.write(
        "jdb_a",
        _members(np.random.default_rng(2), t=1),
        {"source": "jdb", "origin_key": "a", "kind": "image", "stage": "512x320"},
    )
    writer.abort()
    assert not list(tmp_path.iterdir())
