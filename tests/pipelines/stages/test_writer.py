"""The write stage: one shard's rows into tar, errors and embeddings part, the index last; incomplete shards dropped."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest

from pipelines.stages.rows import fail, new_row
from pipelines.stages.write import ShardSink
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


def test_sink_writes_samples_and_failures_then_the_index_last(tmp_path):
    a, b = np.eye(8)[0], np.eye(8)[1]
    sink = ShardSink(str(tmp_path), "jdb", "256x256", 0, expected=4, embeddings=True)
    sink.add([_sample("jdb_a", a), fail(_sample("jdb_bad", b), "decode", "undecodable", "x")])
    assert not (tmp_path / "jdb-256x256-000000.index.parquet").exists()  # not done before close
    sink.add([_sample("jdb_a2", a * 3 + 0.001), _sample("jdb_a", b)])  # jdb_a twice: the second is an error
    summary = sink.close()
    assert (summary["samples"], summary["errors"], summary["rows"]) == (2, 2, 4)
    assert summary["reasons"] == {"decode/undecodable": 1, "write/duplicate_key": 1}
    assert summary["name"] == "jdb-256x256-000000.tar" and summary["bytes"] > 0
    errors = pq.read_table(summary["paths"]["errors"]).to_pylist()
    assert {(e["key"], e["stage"], e["reason"]) for e in errors} == {
        ("jdb_bad", "decode", "undecodable"),
        ("jdb_a", "write", "duplicate_key"),
    }
    assert pq.read_table(summary["paths"]["index"]).column("key").to_pylist() == ["jdb_a", "jdb_a2"]
    folder = tmp_path / "embeddings" / "jdb-256x256"
    emb = np.load(folder / "img_emb" / "img_emb_0.npy", allow_pickle=False)
    assert emb.shape == (2, 8) and emb.dtype == np.float16  # near-duplicates stay: dedup is its own step
    assert pq.read_table(folder / "metadata" / "metadata_0.parquet").column("key").to_pylist() == [
        "jdb_a",
        "jdb_a2",
    ]


def test_a_shard_missing_rows_is_dropped_not_written(tmp_path):
    sink = ShardSink(str(tmp_path), "jdb", "256x256", 3, expected=3, embeddings=False)
    sink.add([_sample("jdb_a", np.eye(8)[0], shard=3)])
    with pytest.raises(RuntimeError, match="1 rows arrived, 3 expected"):
        sink.close()
    assert list(tmp_path.iterdir()) == []  # no tar, no temp file, no index
