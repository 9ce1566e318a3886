"""The shard format: file naming, member encoding, safe member names, the atomic ShardWriter, dedup results."""

from __future__ import annotations

import io
import json
import math
import os
import posixpath
import re
import tarfile
import uuid
from dataclasses import dataclass

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from schemas import ERROR_SCHEMA, REQUIRED_MEMBERS, SAMPLE_MEMBERS, SHARD_INDEX_SCHEMA, conform
from shards.profiles import StorageProfile

# The VideoCrafter resolution stages, tagged "WxH".
RESOLUTIONS = {"256x256": (256, 256), "512x320": (512, 320), "1024x576": (1024, 576)}

TAR_SUFFIX = ".tar"
INDEX_SUFFIX = ".index.parquet"
ERRORS_SUFFIX = ".errors.parquet"
SHARD_STEM_RE = re.compile(r"^(?P<source>[a-z0-9_]+)-(?P<stage>\d+x\d+)-(?P<shard>\d{6})$")
DEDUP_DIR = "dedup"
# The dedup step's result (`latentcrafter dedup`), one file per (source, stage) at
# {folder of the tars}/dedup/{source}-{stage}.parquet; readers skip every `key` in it.
DEDUP_SCHEMA = pa.schema(
    [
        pa.field("key", pa.string()),  # the removed sample
        pa.field("duplicate_of", pa.string()),  # the earliest sample (global order) it is a near-duplicate of
        pa.field("cosine", pa.float32()),  # cosine similarity of the two pooled CLIP embeddings
    ]
)
_KEY_RE = re.compile(r"^[A-Za-z0-9_\-]+$")
_MEMBER_RE = re.compile(r"^[A-Za-z0-9_\-]+\.[A-Za-z0-9_.\-]+$")
KNOWN_MEMBERS = frozenset(f.name for f in SAMPLE_MEMBERS if f.name != "__key__")


def resolution_tag(width: int, height: int) -> str:
    """The stage tag of a pixel size: resolution_tag(512, 320) == "512x320"."""
    return f"{int(width)}x{int(height)}"


def parse_resolution(tag: str) -> tuple[int, int]:
    """(width, height) of a "WxH" tag; ValueError naming the tag otherwise."""
    m = re.fullmatch(r"(\d+)x(\d+)", str(tag))
    if not m:
        raise ValueError(f"resolution {tag!r} is not of the form WIDTHxHEIGHT (e.g. 512x320)")
    return int(m.group(1)), int(m.group(2))


def shard_stem(source: str, stage: str, shard: int) -> str:
    """File stem of one output shard: "{source}-{stage}-{shard:06d}"."""
    return f"{source}-{stage}-{int(shard):06d}"


def parse_shard_stem(name: str) -> dict:
    """{'source', 'stage', 'shard'} from a tar/index/errors file name or stem; ValueError otherwise."""
    base = os.path.basename(name)
    for suffix in (INDEX_SUFFIX, ERRORS_SUFFIX, TAR_SUFFIX):
        if base.endswith(suffix):
            base = base[: -len(suffix)]
            break
    m = SHARD_STEM_RE.match(base)
    if not m:
        raise ValueError(f"{name!r} is not a shard name of the form SOURCE-WxH-NNNNNN.tar")
    return {"source": m.group("source"), "stage": m.group("stage"), "shard": int(m.group("shard"))}


def check_key(key: str) -> str:
    """A sample key must be tar- and webdataset-safe: letters, digits, '_' and '-' only (no dots, no slashes)."""
    if not isinstance(key, str) or not _KEY_RE.match(key) or len(key) > 200:
        raise ValueError(f"sample key {key!r} must match [A-Za-z0-9_-]{{1,200}}")
    return key


def check_member_name(name: str) -> tuple[str, str]:
    """Split a tar member name "<key>.<member>" after rejecting unsafe names (paths, '..', links)."""
    if name.startswith("/") or "/" in name or "\\" in name or ".." in name or not _MEMBER_RE.match(name):
        raise ValueError(f"unsafe or malformed tar member name {name!r}")
    key, _, member = name.partition(".")
    return key, member


def encode_npy(array: np.ndarray) -> bytes:
    """An array as .npy bytes (no pickling)."""
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
    return buf.getvalue()


def check_npy(data) -> tuple[np.dtype, tuple]:
    """(dtype, shape) of .npy bytes after checking them as untrusted input: magic, version, a header parsed
    by numpy's literal parser, a plain numeric dtype (object dtypes would need pickle: refused) and a body
    exactly as long as the shape says (so a header claiming a huge shape allocates nothing). ValueError."""
    head = bytes(data[:16])
    if head[:6] != b"\x93NUMPY":
        raise ValueError("not an .npy file (bad magic)")
    major = head[6]
    if major not in (1, 2, 3):
        raise ValueError(f"unsupported .npy version {major}.{head[7]}")
    width = 2 if major == 1 else 4
    header_len = int.from_bytes(head[8 : 8 + width], "little")
    if header_len > 10000:
        raise ValueError(f".npy header of {header_len} bytes is too long")
    if major == 3:
        raise ValueError(".npy version 3 (utf-8 header) is not used by shards")
    start = 8 + width + header_len
    read_header = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
    shape, _fortran, dtype = read_header(io.BytesIO(bytes(data[8:start])))  # ast.literal_eval, no eval
    if dtype.hasobject or dtype.kind not in "biufc":
        raise ValueError(f".npy dtype {dtype} refused (object or non-numeric; would need pickle)")
    if any(not isinstance(n, int) or n < 0 for n in shape):
        raise ValueError(f".npy shape {shape} is invalid")
    want = dtype.itemsize * math.prod(shape)
    if len(data) - start != want:
        raise ValueError(
            f".npy body is {len(data) - start} bytes, its header ({dtype}, {list(shape)}) says {want}"
        )
    return dtype, shape


def decode_npy(data: bytes) -> np.ndarray:
    """.npy bytes to an array after check_npy; object arrays are refused (allow_pickle=False)."""
    check_npy(data)
    return np.load(io.BytesIO(data), allow_pickle=False)


@dataclass
class ShardPaths:
    """The three files of one shard, as fsspec URLs or local paths."""

    tar: str
    index: str
    errors: str

    @classmethod
    def of(cls, out_dir: str, stem: str) -> ShardPaths:
        base = out_dir.rstrip("/") + "/" + stem
        return cls(base + TAR_SUFFIX, base + INDEX_SUFFIX, base + ERRORS_SUFFIX)


def shard_is_done(out_dir: str, stem: str) -> bool:
    """A shard is complete when its index exists (the index is written last)."""
    fs, path = fsspec.core.url_to_fs(ShardPaths.of(out_dir, stem).index)
    return fs.exists(path)


def dedup_path(out_dir: str, source: str, stage: str) -> str:
    """The dedup result of one (source, stage): "{out_dir}/dedup/{source}-{stage}.parquet"."""
    return f"{out_dir.rstrip('/')}/{DEDUP_DIR}/{source}-{stage}.parquet"


def shard_folder(url: str) -> str:
    """The folder of a shard file URL (tar, index or errors parquet); any other URL is taken as a folder."""
    url = url.rstrip("/")
    if url.endswith((TAR_SUFFIX, INDEX_SUFFIX, ERRORS_SUFFIX)):
        return posixpath.dirname(url)
    return url


def dedup_result(where: str, source: str, stage: str, storage_options: dict | None = None) -> set[str] | None:
    """Keys the dedup step removed from (source, stage), or None when it has no result file. `where` is
    the shard folder or one of its shard files (the result lies in <folder>/dedup/)."""
    fs, path = fsspec.core.url_to_fs(
        dedup_path(shard_folder(where), source, stage), **(storage_options or {})
    )
    try:
        with fs.open(path, "rb") as f:
            table = pq.read_table(f, columns=["key"])
    except FileNotFoundError:
        return None
    return set(table.column("key").to_pylist())


def removed_keys(where: str, source: str, stage: str, storage_options: dict | None = None) -> set[str]:
    """Keys the dedup step removed from (source, stage) (see dedup_result); an absent file gives set()."""
    return dedup_result(where, source, stage, storage_options) or set()


def _atomic_write(url: str, data: bytes) -> None:
    fs, path = fsspec.core.url_to_fs(url)
    fs.makedirs(fs._parent(path), exist_ok=True)
    tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
    with fs.open(tmp, "wb") as f:
        f.write(data)
    fs.mv(tmp, path)


def write_parquet_atomic(url: str, rows: list[dict], schema: pa.Schema) -> None:
    """Write rows as one parquet file under a temporary name, then rename it into place."""
    table = conform(pa.Table.from_pylist(rows, schema=schema), schema) if rows else schema.empty_table()
    buf = io.BytesIO()
    pq.write_table(table, buf)
    _atomic_write(url, buf.getvalue())


class ShardWriter:
    """Writes one shard: samples into a tar, then the errors parquet, then the index parquet (done-marker).

    The tar streams to `NAME.tmp-XXXXXXXX` beside its final name (memory stays at one sample) and is renamed
    into place by `close`, so a crash leaves a temp file or a tar without an index: `shard_is_done` is
    false for it, a rerun removes the temp files and redoes the shard. `abort` drops an unfinished shard.
    """

    def __init__(self, out_dir: str, stem: str):
        self.paths = ShardPaths.of(out_dir, stem)
        self.name = os.path.basename(self.paths.tar)
        self._fs, self._path = fsspec.core.url_to_fs(self.paths.tar)
        self._fs.makedirs(self._fs._parent(self._path), exist_ok=True)
        self._tmp = f"{self._path}.tmp-{uuid.uuid4().hex[:8]}"
        self._file = self._fs.open(self._tmp, "wb")
        self._offset = 0  # bytes of the tar written so far
        self._index: list[dict] = []
        self._errors: list[dict] = []
        self._keys: set[str] = set()

    def write(self, key: str, members: dict[str, bytes | str | np.ndarray], index_row: dict) -> None:
        """Add one sample. `members` maps member names ("latent.npy", "txt", "json", ...) to content."""
        check_key(key)
        if key in self._keys:
            raise ValueError(f"duplicate key {key!r} in shard {self.name}")
        missing = [m for m in REQUIRED_MEMBERS if m not in members]
        unknown = [m for m in members if m not in KNOWN_MEMBERS]
        if missing or unknown:
            raise ValueError(f"sample {key!r}: missing members {missing}, unknown members {unknown}")
        if index_row.get("storage_profile"):  # the members must be the ones the profile promises
            profile = StorageProfile.parse(index_row["storage_profile"])
            want = set(REQUIRED_MEMBERS) | set(profile.members(image="image_pooled.npy" in members))
            if set(members) != want:
                raise ValueError(
                    f"sample {key!r}: storage profile {profile.name} stores {sorted(want)}, got {sorted(members)}"
                )
        offset = self._offset
        sizes = {}
        for member in sorted(members):
            data = members[member]
            if isinstance(data, np.ndarray):
                data = encode_npy(data)
            elif isinstance(data, dict):
                data = json.dumps(data, sort_keys=True).encode()
            elif isinstance(data, str):
                data = data.encode("utf-8")
            self._add_member(f"{key}.{member}", data)
            sizes[member] = len(data)
        self._keys.add(key)
        row = dict(index_row, key=key, shard=self.name, offset=offset)
        row["bytes_latent"] = sum(
            sizes.get(m, 0) for m in ("latent.npy", "latent_std.npy", "latent_logstd8.npy")
        )
        row["bytes_text_tokens"] = sizes.get("text_tokens.npy", 0) + sizes.get("text_pooled.npy", 0)
        row["bytes_image_tokens"] = sizes.get("image_tokens.npy", 0) + sizes.get("image_pooled.npy", 0)
        row["bytes_image_frame"] = sizes.get("cond_frame.jpg", 0)
        row["bytes_total"] = self._offset - offset
        self._index.append(row)

    def _add_member(self, name: str, data: bytes | memoryview) -> None:
        """One tar member, header and data written straight to the file (what tarfile.addfile writes, without
        its 16 KiB copy loop): a USTAR header block, the data, NUL padding to the next 512-byte block."""
        info = tarfile.TarInfo(name)
        info.size, info.mtime, info.mode = len(data), 0, 0o644
        header = info.tobuf(tarfile.USTAR_FORMAT, "utf-8", "surrogateescape")
        padding = -len(data) % tarfile.BLOCKSIZE
        self._file.write(header)
        self._file.write(data)
        if padding:
            self._file.write(tarfile.NUL * padding)
        self._offset += len(header) + len(data) + padding

    def add_errors(self, rows: list[dict]) -> None:
        """Record input rows that did not become samples (ERROR_SCHEMA dicts)."""
        self._errors.extend(rows)

    @property
    def num_samples(self) -> int:
        return len(self._index)

    def close(self) -> dict:
        """Finish the shard: tar, then errors, then index. Returns {'samples', 'errors', 'bytes'}."""
        end = self._offset + 2 * tarfile.BLOCKSIZE  # two zero blocks end the archive, padded to a record
        self._file.write(tarfile.NUL * (2 * tarfile.BLOCKSIZE + (-end % tarfile.RECORDSIZE)))
        self._file.close()
        self._fs.mv(self._tmp, self._path)
        write_parquet_atomic(self.paths.errors, self._errors, ERROR_SCHEMA)
        write_parquet_atomic(self.paths.index, self._index, SHARD_INDEX_SCHEMA)
        return {"samples": len(self._index), "errors": len(self._errors), "bytes": self._fs.size(self._path)}

    def abort(self) -> None:
        """Drop an unfinished shard: close and remove its temp file (nothing else was written)."""
        self._file.close()
        if self._fs.exists(self._tmp):
            self._fs.rm(self._tmp)
