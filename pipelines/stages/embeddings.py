"""Pooled embeddings in clip-retrieval's folder layout (img_emb/, text_emb/, metadata/), one part per output shard."""

from __future__ import annotations

import io

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from shards.format import _atomic_write

# clip-retrieval (`clip-retrieval index --embeddings_folder F`) reads F/img_emb/img_emb_N.npy,
# F/text_emb/text_emb_N.npy and F/metadata/metadata_N.parquet: row i of each part is the same sample.
# We write one part per output shard (N = the shard number) into out_dir/embeddings/<source>-<stage>/.
METADATA_SCHEMA = pa.schema(
    [
        pa.field("key", pa.string()),
        pa.field("image_path", pa.string()),  # clip-retrieval's column for the media location
        pa.field("caption", pa.string()),
        pa.field("url", pa.string()),
        pa.field("source", pa.string()),
        pa.field("shard", pa.string()),  # the tar holding the sample
        pa.field("kind", pa.string()),
    ]
)


def embeddings_folder(out_dir: str, source: str, stage: str) -> str:
    return f"{out_dir.rstrip('/')}/embeddings/{source}-{stage}"


def normalised_f16(vectors: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length, stored as float16 (what clip-retrieval writes)."""
    vectors = np.asarray(vectors, dtype=np.float32)
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return (vectors / np.maximum(norms, 1e-12)).astype(np.float16)


def _npy(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


def write_part(folder: str, n: int, img: list, text: list, metadata: list[dict]) -> None:
    """Write part n (each file atomically). `img` may be empty when no image embeddings were computed."""
    fs, root = fsspec.core.url_to_fs(folder)
    for sub in ("img_emb", "text_emb", "metadata"):
        fs.makedirs(f"{root}/{sub}", exist_ok=True)
    if text:
        _atomic_write(f"{folder}/text_emb/text_emb_{n}.npy", _npy(normalised_f16(np.stack(text))))
    if img and len(img) == len(metadata):
        _atomic_write(f"{folder}/img_emb/img_emb_{n}.npy", _npy(normalised_f16(np.stack(img))))
    table = pa.Table.from_pylist(metadata, schema=METADATA_SCHEMA)
    buf = io.BytesIO()
    pq.write_table(table, buf)
    _atomic_write(f"{folder}/metadata/metadata_{n}.parquet", buf.getvalue())


def read_part(folder: str, n: int, which: str = "img") -> tuple[list[str], np.ndarray] | None:
    """(keys, float32 vectors) of part n, or None when it is absent."""
    fs, root = fsspec.core.url_to_fs(folder)
    emb = f"{root}/{which}_emb/{which}_emb_{n}.npy"
    meta = f"{root}/metadata/metadata_{n}.parquet"
    if not fs.exists(meta):
        return None
    with fs.open(meta, "rb") as f:
        keys = pq.read_table(f, columns=["key"]).column("key").to_pylist()
    if not keys:
        return keys, np.zeros((0, 0), dtype=np.float32)
    if not fs.exists(emb):
        return None
    with fs.open(emb, "rb") as f:
        vectors = np.load(io.BytesIO(f.read()), allow_pickle=False).astype(np.float32)
    return keys, vectors
