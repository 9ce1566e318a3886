"""The shard assembler: closing a shard when its rows are in, dedup with faiss, and dedup seeded on resume."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq

from pipelines.rows import fail, new_row
from pipelines.writer import ShardAssembler
from shards.format import encode_npy


def _sample(key: str, vector, shard: int = 0, rows: int = 3) -> dict:
    rng = np.random.default_rng(len(key))
    f16 = lambda *s: rng.standard_normal(s).astype(np.float16)  # noqa: E731
    return new_row(
        key=key, source="jdb", origin_key=key, uri=f"/x/{key}.jpg", caption="a cat", kind="image",
        stage="256x256", shard=shard, shard_rows=rows, out_width=256, out_height=256,
        latent_npy=encode_npy(f16(4, 1, 32, 32)), latent_std_npy=encode_npy(f16(4, 1, 32, 32)),
        text_tokens_npy=encode_npy(f16(77, 32)), text_pooled_npy=encode_npy(f16(32)),
        image_tokens_npy=encode_npy(f16(5, 16)), image_pooled_npy=encode_npy(np.asarray(vector, np.float16)),
        latent_shape=[4, 1, 32, 32], text_tokens_shape=[77, 32], image_tokens_shape=[5, 16],
    )  # fmt: skip


def test_shard_closes_when_all_rows_are_accounted_and_duplicates_are_dropped(tmp_path):
    a, b = np.eye(8)[0], np.eye(8)[1]
    assembler = ShardAssembler(str(tmp_path), embeddings=True, dedup_threshold=0.99)
    assert assembler.add(_sample("jdb_a", a)) is None
    assert assembler.add(fail(_sample("jdb_bad", b), "decode", "undecodable", "x")) is None
    closed = assembler.add(_sample("jdb_a2", a * 3 + 0.001))  # same direction: a near-duplicate
    assert closed["samples"] == 1 and closed["errors"] == 2 and assembler.open == {}
    errors = pq.read_table(tmp_path / "jdb-256x256-000000.errors.parquet").to_pylist()
    assert {(e["key"], e["stage"], e["reason"]) for e in errors} == {
        ("jdb_bad", "decode", "undecodable"),
        ("jdb_a2", "dedup", "duplicate_of:jdb_a"),
    }
    assert pq.read_table(tmp_path / "jdb-256x256-000000.index.parquet").column("key").to_pylist() == ["jdb_a"]
    emb = np.load(tmp_path / "embeddings" / "jdb-256x256" / "img_emb" / "img_emb_0.npy")
    assert emb.shape == (1, 8) and emb.dtype == np.float16

    # a later run (resume) knows the samples of done shards: a duplicate of jdb_a in shard 1 is dropped
    again = ShardAssembler(str(tmp_path), embeddings=True, dedup_threshold=0.99)
    assert again.seed_dedup("jdb", "256x256", [0]) == 1
    again.add(_sample("jdb_c", b, shard=1, rows=2))
    closed = again.add(_sample("jdb_a3", a, shard=1, rows=2))
    assert closed["samples"] == 1 and closed["errors"] == 1
    errors = pq.read_table(tmp_path / "jdb-256x256-000001.errors.parquet").to_pylist()
    assert errors[0]["reason"] == "duplicate_of:jdb_a"
