"""The dedup step on real Ray and files: planted pairs, brute-force equality, done parts, determinism, kill -9, CLI."""

from __future__ import annotations

import glob
import os
import queue
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines.dedup import DedupError, SearchConfig, exact_duplicates, find_duplicates, run_dedup
from pipelines.dedup.cli import main
from pipelines.dedup.core import unit_rows
from pipelines.dedup.synthetic import key_of, near, write_part, write_planted
from shards.format import DEDUP_SCHEMA, dedup_path

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
STAGE = "512x320"


@pytest.fixture(scope="module", autouse=True)
def ray_cluster():
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def result(out, source, stage=STAGE) -> dict[str, tuple[str, float]]:
    table = pq.read_table(dedup_path(str(out), source, stage))
    assert table.schema.equals(DEDUP_SCHEMA)
    keys = table.column("key").to_pylist()
    assert keys == sorted(keys)
    return {
        k: (d, c)
        for k, d, c in zip(keys, table.column("duplicate_of").to_pylist(), table.column("cosine").to_pylist())
    }


def stored(out, source, stage=STAGE, shards=None) -> np.ndarray:
    """The float16 rows of the parts (all, or the given shard numbers), in global order."""
    folder = f"{out}/embeddings/{source}-{stage}/img_emb"
    n = sorted(int(f.rsplit("_", 1)[1][:-4]) for f in os.listdir(folder) if f.endswith(".npy"))
    return np.concatenate(
        [np.load(f"{folder}/img_emb_{i}.npy", allow_pickle=False) for i in n if shards is None or i in shards]
    )


def as_dict(pairs) -> dict[str, tuple[str, float]]:
    j, i, c = pairs
    return {key_of(a): (key_of(b), float(x)) for a, b, x in zip(j.tolist(), i.tolist(), c.tolist())}


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """3000 random 64-d vectors in 8 done parts of 400 with 150 planted near-duplicates and 90 hard
    negatives; part 8 (exact copies of part 0's first rows) is not done; temp files lie around."""
    out = tmp_path_factory.mktemp("planted")
    info = write_planted(
        str(out), "jdb", STAGE, n=3000, dim=64, part_rows=400, dup_frac=0.05, hard_frac=0.03, seed=1
    )
    copies = stored(out, "jdb")[:20].astype(np.float32)
    write_part(str(out), "jdb", STAGE, 8, copies, [f"late_{i}" for i in range(20)], done=False)
    folder = f"{out}/embeddings/jdb-{STAGE}"
    for name in ("img_emb/img_emb_9.npy.tmp-1a2b3c4d", "metadata/metadata_9.parquet.tmp-1a2b3c4d"):
        with open(f"{folder}/{name}", "wb") as f:
            f.write(b"half-written")
    return out, info


def test_planted_duplicates_found_within_and_across_parts(planted):
    out, info = planted
    summary = run_dedup(
        str(out), threshold=0.95, config=SearchConfig(num_clusters=12, nprobe=3, single_task_max=0)
    )
    got = result(out, "jdb")
    base, copy = info.duplicates[:, 0], info.duplicates[:, 1]
    same_part = (base // 400) == (copy // 400)
    assert same_part.sum() >= 5 and (~same_part).sum() >= 100  # both kinds are planted
    assert set(got) == {key_of(c) for c in copy.tolist()}  # every copy, nothing else (hard negatives stay)
    for b, c, cos in zip(base.tolist(), copy.tolist(), info.duplicate_cos.tolist()):
        assert got[key_of(c)][0] == key_of(b)
        assert got[key_of(c)][1] == pytest.approx(cos, abs=1e-6) and cos >= 0.97
    assert 0.90 <= info.hard_cos.min() and info.hard_cos.max() <= 0.94
    assert not {key_of(h) for h in info.hard[:, 1].tolist()} & set(got)
    # part 8 is not done: never read (its rows copy part 0 and would be removed); temp files ignored
    assert summary[f"jdb-{STAGE}"]["samples"] == 3000 and summary[f"jdb-{STAGE}"]["clusters"] == 12
    assert not any(k.startswith("late_") for k in got)


def mixture(seed: int, n: int = 2400, d: int = 32) -> np.ndarray:
    """Clustered unit vectors (8 centers, within-cluster cosine ~0.5) with planted near-duplicates,
    exact copies and chains (a ~ b ~ c, so c's earliest duplicate is decided by the threshold)."""
    rng = np.random.default_rng(seed)
    centers = unit_rows(rng.standard_normal((8, d)))
    x = unit_rows(centers[rng.integers(0, 8, n)] + rng.standard_normal((n, d)) / np.sqrt(d))
    pairs = np.sort(rng.choice(n, size=(120, 2), replace=False), axis=1)
    x[pairs[:80, 1]] = near(x[pairs[:80, 0]], rng.uniform(0.965, 0.995, 80), rng)
    x[pairs[80:100, 1]] = x[pairs[80:100, 0]]  # exact copies
    for a, b in pairs[100:]:  # chains: a, b ~ a, and the row after b ~ b
        x[b] = near(x[a : a + 1], np.array([0.975]), rng)[0]
        if b + 1 < n:
            x[b + 1] = near(x[b : b + 1], np.array([0.975]), rng)[0]
    return x


@pytest.fixture(scope="module")
def clustered(tmp_path_factory):
    out = tmp_path_factory.mktemp("clustered")
    x = mixture(seed=2)
    for shard, start in enumerate(range(0, len(x), 800)):
        write_part(
            str(out),
            "mix",
            STAGE,
            shard,
            x[start : start + 800],
            [key_of(i) for i in range(start, start + 800)],
        )
    return out, as_dict(exact_duplicates(stored(out, "mix"), 0.95))


@pytest.mark.parametrize(
    "cfg",
    [
        SearchConfig(num_clusters=1, single_task_max=0),
        SearchConfig(num_clusters=5, nprobe=5, single_task_max=0),
        SearchConfig(num_clusters=16, nprobe=3, single_task_max=0),
        SearchConfig(
            num_clusters=40, nprobe=6, block_rows=64, block_cols=32, gather_mib=1, single_task_max=0
        ),
        SearchConfig(num_clusters=40, nprobe=6, exact_assign_max_clusters=8, single_task_max=0),  # HNSW
        SearchConfig(num_clusters=16, nprobe=3),  # a small folder: searched whole in one task
    ],
    ids=["k1", "k5-exhaustive", "k16", "k40-small-blocks", "k40-hnsw", "k16-one-task"],
)
def test_equals_brute_force(clustered, cfg):
    out, exact = clustered
    assert len(exact) > 100
    run_dedup(str(out), threshold=0.95, config=cfg)
    assert result(out, "mix") == exact
    assert as_dict(find_duplicates(stored(out, "mix"), 0.95, cfg)) == exact  # the in-memory core agrees


def test_deterministic_byte_identical_across_runs_and_cpus(clustered):
    out, _ = clustered
    path = dedup_path(str(out), "mix", STAGE)
    cfg = SearchConfig(num_clusters=16, nprobe=3, single_task_max=0)
    runs = []
    for cpus in (2, 2, 1):
        run_dedup(str(out), config=cfg, num_cpus=cpus)
        with open(path, "rb") as f:
            runs.append(f.read())
    assert runs[0] == runs[1] == runs[2]
    assert not glob.glob(f"{out}/dedup/*.tmp-*")


def test_not_done_parts_are_ignored_until_done(tmp_path):
    rng = np.random.default_rng(3)
    x = unit_rows(rng.standard_normal((300, 16)))
    write_part(str(tmp_path), "jdb", STAGE, 0, x[:150], [key_of(i) for i in range(150)])
    write_part(str(tmp_path), "jdb", STAGE, 1, x[150:], [key_of(i) for i in range(150, 300)], done=False)
    write_part(str(tmp_path), "jdb", STAGE, 2, x[:5], [f"copy_{i}" for i in range(5)])
    assert run_dedup(str(tmp_path))[f"jdb-{STAGE}"]["samples"] == 155
    assert set(result(tmp_path, "jdb")) == {f"copy_{i}" for i in range(5)}
    # part 1 becomes done, and it holds copies too: row order is (shard, row), so copy_i now
    # duplicates key_of(i) and part 1's rows are checked against both other parts
    write_part(str(tmp_path), "jdb", STAGE, 1, x[:3], [f"mid_{i}" for i in range(3)])
    run_dedup(str(tmp_path))
    assert {k: d for k, (d, _) in result(tmp_path, "jdb").items()} == {
        **{f"mid_{i}": key_of(i) for i in range(3)},
        **{f"copy_{i}": key_of(i) for i in range(5)},
    }


def _read_lines(stream, lines: queue.Queue) -> None:
    for line in stream:
        lines.put(line)


def test_kill_9_mid_run_then_rerun_gives_the_identical_file(tmp_path):
    out = str(tmp_path)
    write_planted(out, "aaa", "256x256", n=2000, dim=64, part_rows=500, dup_frac=0.05, hard_frac=0.0, seed=4)
    write_planted(
        out, "zzz", "256x256", n=150_000, dim=128, part_rows=10_000, dup_frac=0.02, hard_frac=0.0, seed=5
    )
    paths = [dedup_path(out, s, "256x256") for s in ("aaa", "zzz")]
    run_dedup(out)
    reference = [open(p, "rb").read() for p in paths]
    for p in paths:
        os.remove(p)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # its own embedded Ray
    proc = subprocess.Popen(
        [sys.executable, "-m", "pipelines.dedup", out, "--num-cpus", "1"],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=_read_lines, args=(proc.stderr, lines), daemon=True).start()
    deadline, seen = time.monotonic() + 120, []
    try:
        while not any(line.startswith("dedup aaa-256x256") for line in seen):
            assert time.monotonic() < deadline and proc.poll() is None, "".join(seen)
            try:
                seen.append(lines.get(timeout=1))
            except queue.Empty:
                pass
        os.kill(proc.pid, signal.SIGKILL)  # mid-run: the first folder is written, the second in progress
        proc.wait(timeout=30)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # the embedded Ray's processes, if any outlived it
        except ProcessLookupError:
            pass
    assert open(paths[0], "rb").read() == reference[0]
    assert not os.path.exists(paths[1]) or open(paths[1], "rb").read() == reference[1]
    with open(paths[1] + ".tmp-deadbeef", "wb") as f:  # as if killed during the final write
        f.write(b"partial")
    run_dedup(out)
    assert [open(p, "rb").read() for p in paths] == reference
    assert sorted(os.listdir(f"{out}/dedup")) == ["aaa-256x256.parquet", "zzz-256x256.parquet"]


def test_cli_errors_and_text_embeddings(tmp_path, capsys):
    assert main([str(tmp_path)]) == 2
    assert "no SOURCE-WxH folders" in capsys.readouterr().err
    x = unit_rows(np.random.default_rng(6).standard_normal((50, 8)))
    x[40] = x[3]
    write_part(str(tmp_path), "laion", "256x256", 0, x, [key_of(i) for i in range(50)], image=False)
    assert main([str(tmp_path), "--embedding", "image"]) == 2
    err = capsys.readouterr().err
    assert "img_emb_0.npy is missing" in err and "--embedding text" in err and "image tokens" in err
    assert main([str(tmp_path), "--threshold", "1.5"]) == 2
    assert "--threshold" in capsys.readouterr().err
    assert main([str(tmp_path), "--embedding", "text"]) == 0
    assert '"removed": 1' in capsys.readouterr().out
    assert result(tmp_path, "laion", "256x256") == {key_of(40): (key_of(3), 1.0)}
    assert main([str(tmp_path), "--embedding", "text", "--threshold", "1"]) == 0  # exact copies only
    assert result(tmp_path, "laion", "256x256") == {key_of(40): (key_of(3), 1.0)}
    with pytest.raises(DedupError, match="no folder"):
        run_dedup(str(tmp_path), sources=[("jdb", "256x256")])


def test_result_schema_and_empty_result(tmp_path):
    x = unit_rows(np.random.default_rng(7).standard_normal((30, 8)))
    write_part(str(tmp_path), "jdb", STAGE, 0, x, [key_of(i) for i in range(30)])
    write_part(str(tmp_path), "jdb", STAGE, 1, x[:0], [])  # an empty part (every row rejected)
    summary = run_dedup(str(tmp_path), sources=[("jdb", STAGE)])
    assert summary[f"jdb-{STAGE}"]["removed"] == 0 and summary[f"jdb-{STAGE}"]["samples"] == 30
    table = pq.read_table(dedup_path(str(tmp_path), "jdb", STAGE))
    assert table.num_rows == 0 and table.schema.field("cosine").type == pa.float32()
