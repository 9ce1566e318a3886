"""`latentcrafter stats --deep`: planted corrupt/truncated tars and member mismatches are found, exit status 1."""

from __future__ import annotations

import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from schemas import SHARD_INDEX_SCHEMA
from shards.format import ShardWriter, shard_stem
from shards.stats import main
from shards.stats_deep import check_shard
from shards.stats_files import discover
from tests.shards.stats_fixtures import _arrays, _row, build_dataset


def _deep(root, tmp_path, *extra) -> tuple[int, dict]:
    out = tmp_path / "deep.json"
    rc = main([str(root), "--deep", "--json", str(out), "--quiet", *extra])
    return rc, json.loads(out.read_text())


def _problems(rep) -> set[tuple[str, str | None, str]]:
    return {(p["shard"].rsplit("/", 1)[-1], p["key"], p["kind"]) for p in rep["problems"]}


def test_clean_dataset_passes(tmp_path):
    root = tmp_path / "clean"
    build_dataset(str(root), extras=False)
    rc, rep = _deep(root, tmp_path, "--workers", "2")  # worker processes
    assert rep["mode"] == "deep" and rep["problems"] == [] and rep["problem_counts"] == {}
    assert rc == 0


def _offsets(index_path) -> dict[str, int]:
    t = pq.read_table(index_path, columns=["key", "offset"])
    return dict(zip(t.column("key").to_pylist(), t.column("offset").to_pylist()))


def test_planted_damage_is_found_with_file_and_key(tmp_path):
    root = tmp_path / "bad"
    build_dataset(str(root), extras=True)
    # 1. a corrupt header in the middle of a tar: tarfile would stop there quietly
    stem = root / shard_stem("webvid", "256x256", 0)
    offset = _offsets(f"{stem}.index.parquet")["webvid_0_1"]
    with open(f"{stem}.tar", "r+b") as f:
        f.seek(offset)
        f.write(b"\xff" * 512)
    # 2. a tar cut in the middle of a member
    laion = root / (shard_stem("laion_coco", "256x256", 0) + ".tar")
    os.truncate(laion, _offsets(str(laion).replace(".tar", ".index.parquet"))["laion_coco_0_2"] + 700)
    # 3. an index row whose latent_shape does not match the tar
    jdb = root / (shard_stem("jdb", "256x256", 0) + ".index.parquet")
    rows = pq.read_table(jdb).to_pylist()
    rows[1]["latent_shape"] = [4, 1, 8, 8]
    pq.write_table(pa.Table.from_pylist(rows, schema=SHARD_INDEX_SCHEMA), jdb)
    # 4. wrong dtype, and image tokens promised by the index but not in the tar
    writer = ShardWriter(str(root), shard_stem("jdb", "512x320", 0))
    rng = np.random.default_rng(3)
    arrays = _arrays(rng, "image", "512x320")
    row, caption = _row("jdb", "512x320", "image", 0, None, arrays)
    arrays["latent.npy"] = arrays["latent.npy"].astype(np.float32)
    writer.write("jdb_9_0", dict(arrays, txt=caption, json={"key": "jdb_9_0"}), row)
    arrays = _arrays(rng, "image", "512x320")
    del arrays["image_tokens.npy"]
    row, caption = _row("jdb", "512x320", "image", 1, None, arrays)
    writer.write("jdb_9_1", dict(arrays, txt=caption, json={"key": "jdb_9_1"}), row)
    writer.close()

    rc, rep = _deep(root, tmp_path, "--workers", "1")
    assert rc == 1
    got = _problems(rep)
    want = {
        ("webvid-256x256-000000.tar", None, "corrupt_tar"),
        ("webvid-256x256-000000.tar", "webvid_0_1", "missing_from_tar"),
        ("webvid-256x256-000000.tar", "webvid_0_2", "missing_from_tar"),
        ("laion_coco-256x256-000000.tar", None, "truncated_tar"),
        ("laion_coco-256x256-000000.tar", "laion_coco_0_2", "missing_from_tar"),
        ("jdb-256x256-000000.tar", "jdb_0_1", "shape_mismatch"),
        ("jdb-512x320-000000.tar", "jdb_9_0", "dtype_mismatch"),
        ("jdb-512x320-000000.tar", "jdb_9_1", "missing_member"),
        ("webvid-256x256-000002.tar", None, "missing_index"),
        ("jdb-256x256-000001.index.parquet", None, "missing_tar"),
    }
    assert want <= got, f"not found: {want - got}"
    # nothing is reported about samples that are intact
    assert not {p for p in got if p[1] in ("webvid_0_0", "laion_coco_0_0", "laion_coco_0_1", "jdb_0_0")}
    corrupt = next(p for p in rep["problems"] if p["kind"] == "corrupt_tar")
    assert f"byte {offset}" in corrupt["detail"]
    shape = next(p for p in rep["problems"] if p["kind"] == "shape_mismatch")
    assert "latent.npy" in shape["detail"] and "[4, 1, 8, 8]" in shape["detail"]
    assert (
        rep["problem_counts"]["missing_from_tar"] == 4
    )  # webvid_0_1, webvid_0_2, laion_coco_0_2, laion_coco_0_3


def test_terminal_lists_problems(tmp_path, capsys):
    root = tmp_path / "bad"
    build_dataset(str(root), extras=False)
    tar = root / (shard_stem("webvid", "512x320", 0) + ".tar")
    os.truncate(tar, os.path.getsize(tar) - 3000)  # loses the end-of-archive blocks and some data
    assert main([str(root), "--deep"]) == 1
    out = capsys.readouterr().out
    assert "Deep check: " in out and "webvid-512x320-000000.tar" in out and "truncated_tar" in out
    assert max(map(len, out.splitlines())) <= 100


def test_extra_sample_and_offsets(tmp_path):
    root = tmp_path / "extra"
    build_dataset(str(root), extras=False)
    index = root / (shard_stem("webvid", "256x256", 1) + ".index.parquet")
    table = pq.read_table(index)
    pq.write_table(table.slice(1), index)  # the index lost its first row
    shard = next(s for s in discover([str(index)]).shards)
    got = {(p["key"], p["kind"]) for p in check_shard(shard)}
    assert got == {("webvid_1_0", "not_in_index")}


def test_unreadable_index(tmp_path):
    root = tmp_path / "garbled"
    build_dataset(str(root), extras=False)
    (root / (shard_stem("jdb", "256x256", 0) + ".index.parquet")).write_bytes(b"not parquet at all")
    out = tmp_path / "fast.json"
    assert main([str(root), "--json", str(out), "--quiet"]) == 0  # fast mode reports, does not gate
    (bad,) = json.loads(out.read_text())["missing"]["unreadable"]
    assert bad["kind"] == "bad_index" and bad["shard"] == "jdb-256x256-000000.tar"
    rc, rep = _deep(root, tmp_path, "--workers", "1")
    assert rc == 1 and _problems(rep) == {("jdb-256x256-000000.tar", None, "bad_index")}
