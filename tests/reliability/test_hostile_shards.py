"""Hostile shards (issue #13): each is built from a good ShardWriter shard by tar/index surgery. The loader
(skip mode) yields every good sample and counts the bad one by reason; `latentcrafter stats --deep`
reports file and member and exits 1 without a traceback; nothing is unpickled or written outside tmp."""

from __future__ import annotations

import io
import json
import os
import tarfile

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from schemas import SHARD_INDEX_SCHEMA
from shards.loader import ShardLoader
from shards.stats import main as stats_main
from tests.shards.conftest import make_config, write_shard

N = 5
BAD = 2  # the sample each case damages
pytestmark = pytest.mark.timeout(30)


@pytest.fixture
def shard(tmp_path):
    root = tmp_path / "shards"
    keys = write_shard(root, "webvid", 0, N)
    return {
        "root": root,
        "keys": keys,
        "tar": root / "webvid-256x256-000000.tar",
        "index": root / "webvid-256x256-000000.index.parquet",
    }


def _members(tar_path) -> list[tuple[str, bytes, int]]:
    with tarfile.open(tar_path) as tar:
        return [(m.name, tar.extractfile(m).read(), m.offset) for m in tar.getmembers()]


def _header(name: str, size: int) -> bytes:
    info = tarfile.TarInfo("x")
    info.size, info.mtime, info.mode = size, 0, 0o644
    header = bytearray(info.tobuf(tarfile.USTAR_FORMAT, "utf-8", "surrogateescape"))
    raw = name.encode()  # raw bytes: tarfile would not write '../' or '/' names as such
    header[:100] = raw + b"\0" * (100 - len(raw))
    header[148:156] = b" " * 8
    header[148:156] = f"{sum(header):06o}\0 ".encode()
    return bytes(header)


def _write_tar(tar_path, members) -> dict[str, tuple[int, int]]:
    """Write (name, data) members as a USTAR tar; returns {key: (offset, bytes)} of each key's members."""
    out, spans = bytearray(), {}
    for name, data in members:
        key = name.partition(".")[0]
        start = len(out)
        out += _header(name, len(data)) + data + b"\0" * (-len(data) % 512)
        first, _ = spans.get(key, (start, 0))
        spans[key] = (first, len(out) - first)
    out += b"\0" * (1024 + (-(len(out) + 1024) % 10240))
    tar_path.write_bytes(bytes(out))
    return spans


def _edit_index(index_path, edit) -> None:
    rows = pq.read_table(index_path).to_pylist()
    rows = edit(rows) or rows
    pq.write_table(pa.Table.from_pylist(rows, schema=SHARD_INDEX_SCHEMA), index_path)


def _reindex(index_path, spans, keep_size_of=()) -> None:
    def edit(rows):
        for r in rows:
            if r["key"] in spans:
                r["offset"] = spans[r["key"]][0]
                if r["key"] not in keep_size_of:
                    r["bytes_total"] = spans[r["key"]][1]

    _edit_index(index_path, edit)


def _rename_member(shard, key, member, new_name) -> None:
    members = [(n, d) for n, d, _ in _members(shard["tar"])]
    members = [(new_name if n == f"{key}.{member}" else n, d) for n, d in members]
    _write_tar(shard["tar"], members)  # same sizes: the index stays right


def _loader_run(shard):
    cfg = make_config({"webvid": (str(shard["tar"]), 1.0)}, on_bad_sample="skip", resampled=False)
    loader = ShardLoader(cfg)
    got = [k for b in loader for k in b["keys"]]
    return got, loader.stats


def _check_loader(shard, reason, good=None, count=1):
    got, stats = _loader_run(shard)
    good = [k for i, k in enumerate(shard["keys"]) if i != BAD] if good is None else good
    assert sorted(got) == sorted(good)
    assert stats["bad_samples_by_reason"] == {reason: count}, stats
    assert stats["bad_samples"] == count


def _check_deep(shard, tmp_path, capsys, kind, key=None, detail=None):
    out = tmp_path / "deep.json"
    rc = stats_main([str(shard["root"]), "--deep", "--json", str(out), "--quiet", "--workers", "1"])
    assert rc == 1
    captured = capsys.readouterr()
    assert "Traceback" not in captured.out + captured.err
    problems = json.loads(out.read_text())["problems"]
    hits = [p for p in problems if p["kind"] == kind and (key is None or p["key"] == key)]
    assert hits, problems
    assert all(p["shard"].endswith("webvid-256x256-000000.tar") for p in hits)
    if detail is not None:
        assert any(detail in p["detail"] for p in hits), hits


@pytest.fixture(autouse=True)
def _nothing_outside_tmp(tmp_path, monkeypatch):
    """Run from tmp (so a relative '../evil.npy' would land under tmp_path's parent) and check no write."""
    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)
    watched = [tmp_path.parent / "evil.npy", work.parent / "evil.npy", "/tmp/x.npy", "/tmp/pwned-marker"]
    before = {str(p): os.path.exists(p) for p in watched}
    yield
    assert {str(p): os.path.exists(p) for p in watched} == before
    assert sorted(os.listdir(work)) == []


@pytest.mark.parametrize("name", ["../evil.npy", "/tmp/x.npy"])
def test_unsafe_member_name(shard, tmp_path, capsys, name):
    _rename_member(shard, shard["keys"][BAD], "text_pooled.npy", name)
    _check_loader(shard, "unsafe_member_name")
    _check_deep(shard, tmp_path, capsys, "unsafe_member", detail=name)


def test_member_larger_than_index_says(shard, tmp_path, capsys):
    key = shard["keys"][BAD]
    members = [(n, d + b"x" * 3000 if n == f"{key}.txt" else d) for n, d, _ in _members(shard["tar"])]
    spans = _write_tar(shard["tar"], members)
    _reindex(shard["index"], spans, keep_size_of={key})  # later offsets right, this sample's size stale
    _check_loader(shard, "member_size_mismatch")
    _check_deep(shard, tmp_path, capsys, "bytes_mismatch", key=key)


def test_huge_index_size_is_not_read(shard, tmp_path, capsys):
    key = shard["keys"][BAD]

    def edit(rows):
        rows[BAD]["bytes_total"] = 100 << 30  # 100 GB

    _edit_index(shard["index"], edit)
    _check_loader(shard, "member_too_large")
    _check_deep(shard, tmp_path, capsys, "bytes_mismatch", key=key)


def test_offset_past_end_of_file(shard, tmp_path, capsys):
    key = shard["keys"][BAD]
    size = shard["tar"].stat().st_size

    def edit(rows):
        rows[BAD]["offset"] = size + 512 * 100

    _edit_index(shard["index"], edit)
    _check_loader(shard, "offset_out_of_range")
    _check_deep(shard, tmp_path, capsys, "offset_mismatch", key=key)


def test_index_key_missing_from_tar(shard, tmp_path, capsys):
    key = shard["keys"][BAD]
    members = [(n, d) for n, d, _ in _members(shard["tar"]) if not n.startswith(key + ".")]
    spans = _write_tar(shard["tar"], members)
    _reindex(shard["index"], spans)  # the row of `key` keeps its old offset, now another sample's
    _check_loader(shard, "index_mismatch")
    _check_deep(shard, tmp_path, capsys, "missing_from_tar", key=key)


def test_tar_member_missing_from_index(shard, tmp_path, capsys):
    members = [(n, d) for n, d, _ in _members(shard["tar"])]
    at = next(i for i, (n, _) in enumerate(members) if n.startswith(shard["keys"][BAD] + "."))
    extra = [
        (f"intruder_0000.{n.partition('.')[2]}", d) for n, d in members if n.startswith(shard["keys"][0])
    ]
    spans = _write_tar(shard["tar"], members[:at] + extra + members[at:])
    _reindex(shard["index"], spans)
    _check_loader(shard, "index_mismatch", good=shard["keys"])
    _check_deep(shard, tmp_path, capsys, "not_in_index", key="intruder_0000")


class _Pwn:
    """Unpickling this writes a marker file: it must never happen."""

    def __reduce__(self):
        return (open, ("/tmp/pwned-marker", "w"))


def test_object_dtype_npy_is_never_unpickled(shard, tmp_path, capsys):
    key = shard["keys"][BAD]
    buf = io.BytesIO()
    np.save(buf, np.array([_Pwn(), 1], dtype=object), allow_pickle=True)
    evil = buf.getvalue()
    members = [(n, evil if n == f"{key}.text_pooled.npy" else d) for n, d, _ in _members(shard["tar"])]
    _reindex(shard["index"], _write_tar(shard["tar"], members))
    _check_loader(shard, "bad_npy")
    _check_deep(shard, tmp_path, capsys, "bad_npy", key=key, detail="text_pooled.npy")
    assert not os.path.exists("/tmp/pwned-marker")


def test_npy_shape_differs_from_index(shard, tmp_path, capsys):
    key = shard["keys"][BAD]
    members = _members(shard["tar"])
    name = f"{key}.latent.npy"
    old = next(d for n, d, _ in members if n == name)
    arr = np.load(io.BytesIO(old))
    buf = io.BytesIO()
    np.save(buf, arr.reshape(arr.shape[0], arr.shape[1], -1, arr.shape[3] * 2))
    members = [(n, buf.getvalue() if n == name else d) for n, d, _ in members]
    _reindex(shard["index"], _write_tar(shard["tar"], members))
    _check_loader(shard, "shape_mismatch")
    _check_deep(shard, tmp_path, capsys, "shape_mismatch", key=key, detail="latent.npy")


def test_tar_truncated_mid_member(shard, tmp_path, capsys):
    members = _members(shard["tar"])
    cut = next(off for n, _, off in members if n.startswith(shard["keys"][-1] + ".")) + 512 + 100
    os.truncate(shard["tar"], cut)
    _check_loader(shard, "truncated", good=shard["keys"][:-1])
    _check_deep(shard, tmp_path, capsys, "truncated_tar")
