"""The embedding parts dedup reads: finding the folders and the parts of done shards, rows by global id, keys."""

from __future__ import annotations

import io
import posixpath
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import fsspec
import fsspec.implementations.local
import numpy as np
import pyarrow.parquet as pq

from pipelines.dedup.core import inverse_norms
from pipelines.stages.embeddings import embeddings_folder
from shards.format import INDEX_SUFFIX, shard_stem

EMBEDDINGS_DIR = "embeddings"
FOLDER_RE = re.compile(r"^(?P<source>[a-z0-9_]+)-(?P<stage>\d+x\d+)$")
# --embedding value -> clip-retrieval's file prefix (img_emb/img_emb_N.npy, text_emb/text_emb_N.npy)
PREFIXES = {"image": "img", "text": "text"}


class DedupError(ValueError):
    """An input problem of the dedup step; the message names the file or folder and the fix."""


@dataclass(frozen=True)
class Part:
    """One embeddings part (= one done output shard) and where its rows sit in the global order."""

    shard: int  # the shard number N of {source}-{stage}-NNNNNN.tar and of the part files
    emb: str  # URL of {img|text}_emb/{img|text}_emb_N.npy (float16 unit rows)
    metadata: str  # URL of metadata/metadata_N.parquet (column `key`, same rows)
    rows: int
    start: int  # global id of the part's row 0: global order = (shard number, row)


def list_folders(out_dir: str) -> list[tuple[str, str]]:
    """(source, stage) of every OUT_DIR/embeddings/{source}-{stage} folder, sorted."""
    fs, root = fsspec.core.url_to_fs(f"{out_dir.rstrip('/')}/{EMBEDDINGS_DIR}")
    try:
        entries = fs.ls(root, detail=True)
    except FileNotFoundError:
        return []
    out = []
    for e in entries:
        m = FOLDER_RE.match(posixpath.basename(e["name"].rstrip("/")))
        if m and e.get("type") == "directory":
            out.append((m.group("source"), m.group("stage")))
    return sorted(out)


def _numbered(fs, folder: str, prefix: str, suffix: str) -> dict[int, str]:
    """{N: path} of folder/{prefix}_N{suffix}; temp files (*.tmp-*) and other names are ignored."""
    pattern = re.compile(rf"^{re.escape(prefix)}_(\d+){re.escape(suffix)}$")
    try:
        names = fs.ls(folder, detail=False)
    except FileNotFoundError:
        return {}
    out = {}
    for path in names:
        m = pattern.match(posixpath.basename(path.rstrip("/")))
        if m:
            out[int(m.group(1))] = path
    return out


def _url(fs, path: str) -> str:
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    return path if protocol in ("file", "local") else fs.unstrip_protocol(path)


def _npy_shape(fs, path: str) -> tuple[tuple[int, ...], np.dtype]:
    with fs.open(path, "rb") as f:
        version = np.lib.format.read_magic(f)
        read = (
            np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        )
        shape, _, dtype = read(f)
    return shape, dtype


def done_parts(out_dir: str, source: str, stage: str, embedding: str) -> tuple[list[Part], dict]:
    """The parts of (source, stage) whose shard is done (its .index.parquet exists), in shard order,
    and {"not_done": parts skipped, "dim": vector dimension}. Raises DedupError naming a bad file."""
    folder = embeddings_folder(out_dir, source, stage)
    prefix = PREFIXES[embedding]
    fs, root = fsspec.core.url_to_fs(folder)
    metas = _numbered(fs, f"{root}/metadata", "metadata", ".parquet")
    embs = _numbered(fs, f"{root}/{prefix}_emb", f"{prefix}_emb", ".npy")
    ofs, out_root = fsspec.core.url_to_fs(out_dir.rstrip("/"))
    listed = {posixpath.basename(p) for p in ofs.ls(out_root, detail=False)}
    done = [n for n in sorted(metas) if shard_stem(source, stage, n) + INDEX_SUFFIX in listed]

    def inspect(n: int):
        with fs.open(metas[n], "rb") as f:
            rows = pq.ParquetFile(f).metadata.num_rows
        if rows == 0:
            return n, 0, None
        if n not in embs:
            raise DedupError(
                f"{folder}/{prefix}_emb/{prefix}_emb_{n}.npy is missing: the shard's metadata part has "
                f"{rows} rows but no {embedding} embeddings"
                + (
                    "; use --embedding text, or enable image tokens (image embeddings) in the encode job"
                    if embedding == "image"
                    else "; rerun the encode job for that shard"
                )
            )
        shape, dtype = _npy_shape(fs, embs[n])
        if len(shape) != 2 or shape[0] != rows or dtype.kind != "f":
            raise DedupError(
                f"{_url(fs, embs[n])}: shape {shape} dtype {dtype}, but {_url(fs, metas[n])} has {rows} rows; "
                "expected a float (rows, dim) array: rerun the encode job for that shard"
            )
        return n, rows, shape[1]

    with ThreadPoolExecutor(16) as pool:
        found = [r for r in pool.map(inspect, done) if r[1] > 0]
    dims = {dim for _, _, dim in found}
    if len(dims) > 1:
        raise DedupError(f"{folder}: parts of different dimensions {sorted(dims)}; rerun the encode job")
    parts, start = [], 0
    for n, rows, _ in found:
        parts.append(
            Part(shard=n, emb=_url(fs, embs[n]), metadata=_url(fs, metas[n]), rows=rows, start=start)
        )
        start += rows
    return parts, {"not_done": len(metas) - len(done), "dim": dims.pop() if dims else 0}


def _load(url: str) -> np.ndarray:
    """A part's array: memory-mapped when local, else read whole (np.load, never pickles)."""
    fs, path = fsspec.core.url_to_fs(url)
    if isinstance(fs, fsspec.implementations.local.LocalFileSystem):
        return np.load(path, mmap_mode="r", allow_pickle=False)
    with fs.open(path, "rb") as f:
        return np.load(io.BytesIO(f.read()), allow_pickle=False)


class PartRows:
    """Rows by global id (ascending) across parts, as unit float32 vectors; opens only the parts needed.

    `inverse`: every row's core.inverse_norms value in global order, when known (saves a pass). Local
    parts are memory-mapped per call (pages come from the page cache, shared by all tasks of a node);
    parts behind other URLs are read whole per call, so keep the embeddings on a local or network
    file system for large runs.
    """

    def __init__(self, parts: list[Part], dim: int, inverse: np.ndarray | None = None):
        self.parts, self.dim, self.inverse = parts, dim, inverse
        self.starts = np.array([p.start for p in parts] + [parts[-1].start + parts[-1].rows if parts else 0])

    def __call__(self, ids: np.ndarray) -> np.ndarray:
        ids = np.asarray(ids, dtype=np.int64)
        out = self.raw(ids)
        out *= (inverse_norms(out) if self.inverse is None else self.inverse[ids])[:, None]
        return out  # == core.unit_rows of the stored rows

    def raw(self, ids: np.ndarray) -> np.ndarray:
        """The stored rows of `ids` (ascending) as float32, not normalised."""
        ids = np.asarray(ids, dtype=np.int64)
        out = np.empty((len(ids), self.dim), dtype=np.float32)
        bounds = np.searchsorted(ids, self.starts)
        for p, part in enumerate(self.parts):
            a, b = bounds[p], bounds[p + 1]
            if a < b:
                arr = _load(part.emb)
                out[a:b] = arr[ids[a:b] - part.start]
                del arr  # unmaps it
        return out


def part_keys(part: Part) -> list[str]:
    fs, path = fsspec.core.url_to_fs(part.metadata)
    with fs.open(path, "rb") as f:
        keys = pq.read_table(f, columns=["key"]).column("key").to_pylist()
    if len(keys) != part.rows:
        raise DedupError(f"{part.metadata}: {len(keys)} rows, expected {part.rows} (changed while running)")
    return keys


def keys_of(parts: list[Part], ids: np.ndarray) -> dict[int, str]:
    """{global id: key} for the given ids, reading the key column of the parts that hold them."""
    ids = np.unique(np.asarray(ids, dtype=np.int64))
    starts = np.array([p.start for p in parts], dtype=np.int64)
    which = np.searchsorted(starts, ids, side="right") - 1
    out: dict[int, str] = {}
    for p in np.unique(which).tolist():
        keys = part_keys(parts[p])
        for g in ids[which == p].tolist():
            out[g] = keys[g - parts[p].start]
    return out
