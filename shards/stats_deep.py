"""Deep dataset checks: open every tar (process pool) and compare each sample's members with its index row."""

from __future__ import annotations

import json
import multiprocessing
import tarfile
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass

import fsspec
import pyarrow.parquet as pq

from schemas import ARRAY_MEMBERS, REQUIRED_MEMBERS, SAMPLE_MEMBERS
from shards.format import check_member_name, decode_npy
from shards.profiles import StorageProfile, decode_cond_frame
from shards.reader import MAX_SAMPLE_BYTES
from shards.stats_files import ShardFiles

# dtype each .npy member must have, from the schema's field metadata
MEMBER_DTYPES = {
    f.name: f.metadata[b"dtype"].decode() for f in SAMPLE_MEMBERS if f.metadata and b"dtype" in f.metadata
}
# index column holding the expected shape of a member
SHAPE_COLUMNS = {
    "latent.npy": "latent_shape",
    "latent_std.npy": "latent_shape",
    "latent_logstd8.npy": "latent_shape",
    "text_tokens.npy": "text_tokens_shape",
    "image_tokens.npy": "image_tokens_shape",
}
BYTE_GROUPS = {
    "bytes_latent": ("latent.npy", "latent_std.npy", "latent_logstd8.npy"),
    "bytes_text_tokens": ("text_tokens.npy", "text_pooled.npy"),
    "bytes_image_tokens": ("image_tokens.npy", "image_pooled.npy"),
    "bytes_image_frame": ("cond_frame.jpg",),
}
# optional members whose presence the storage profile decides (StorageProfile.members)
PROFILE_MEMBERS = (
    "latent_std.npy",
    "latent_logstd8.npy",
    "text_tokens.npy",
    "image_tokens.npy",
    "cond_frame.jpg",
)
DEEP_COLUMNS = [
    "key",
    "source",
    "stage",
    "shard",
    "offset",
    "latent_shape",
    "latent_dtype",
    "text_tokens_shape",
    "image_tokens_shape",
    "num_frames",
    *BYTE_GROUPS,
    "bytes_total",
    "storage_profile",
]


@dataclass
class Problem:
    """One thing wrong with a shard or sample; `key` is None for shard-level problems."""

    shard: str  # tar URL (or the stem's index URL when the tar is missing)
    key: str | None
    kind: str  # corrupt_tar, truncated_tar, missing_tar, missing_index, bad_index, missing_from_tar, ...
    detail: str

    def as_dict(self) -> dict:
        return asdict(self)


class _Sample:
    """Members of one sample as read from the tar: name -> bytes, and the first header's offset."""

    def __init__(self, key: str, offset: int):
        self.key, self.offset, self.members, self.end = key, offset, {}, offset


def _check_array(sample: _Sample, member: str, data: bytes, row: dict, out: list, shard: str) -> None:
    try:
        arr = decode_npy(data)
    except (ValueError, OSError, EOFError, MemoryError) as e:  # object dtypes are refused, never unpickled
        out.append(Problem(shard, sample.key, "bad_npy", f"{member}: {e}"))
        return
    want_dtype = MEMBER_DTYPES.get(member)
    if member == "latent.npy" and row.get("latent_dtype"):
        want_dtype = row["latent_dtype"]
    if want_dtype and str(arr.dtype) != want_dtype:
        out.append(
            Problem(shard, sample.key, "dtype_mismatch", f"{member}: {arr.dtype}, expected {want_dtype}")
        )
    column = SHAPE_COLUMNS.get(member)
    want = row.get(column) if column else None
    if want is not None and list(arr.shape) != list(want):
        out.append(
            Problem(
                shard, sample.key, "shape_mismatch", f"{member}: {list(arr.shape)}, index {column}={want}"
            )
        )


def _check_members(sample: _Sample, row: dict, shard: str, out: list) -> None:
    """Required members, and the optional ones the row's storage profile promises (none beyond them); rows
    without a storage_profile (written before profiles) need image_tokens.npy when image_tokens_shape is set."""
    have = set(sample.members)
    missing = [m for m in REQUIRED_MEMBERS if m not in have]
    image = row.get("image_tokens_shape") is not None
    extra: list[str] = []
    if row.get("storage_profile"):
        try:
            profile = StorageProfile.parse(row["storage_profile"])
        except ValueError as e:
            out.append(Problem(shard, sample.key, "bad_profile", str(e)))
            return
        want = set(profile.members(image=image))
        missing += [m for m in PROFILE_MEMBERS if m in want and m not in have]
        if image and "image_pooled.npy" not in have:
            missing.append("image_pooled.npy")
        extra = [m for m in PROFILE_MEMBERS if m in have and m not in want]
        if extra:
            detail = f"members {extra} present but storage profile {profile.name} does not store them"
            out.append(Problem(shard, sample.key, "profile_mismatch", detail))
    elif image and "image_tokens.npy" not in have:
        missing.append("image_tokens.npy")
    if missing:
        out.append(Problem(shard, sample.key, "missing_member", f"members {missing} absent from the tar"))
    if not image and "image_tokens.npy" in have and "image_tokens.npy" not in extra:
        out.append(
            Problem(shard, sample.key, "key_mismatch", "image_tokens.npy present but index shape is null")
        )


def check_sample(sample: _Sample, row: dict, shard: str) -> list[Problem]:
    """Members, shapes, dtypes, byte counts and offset of one sample against its index row."""
    out: list[Problem] = []
    have = set(sample.members)
    _check_members(sample, row, shard, out)
    if "cond_frame.jpg" in have:
        try:
            decode_cond_frame(sample.members["cond_frame.jpg"])
        except (ValueError, OSError) as e:  # PIL's UnidentifiedImageError is an OSError
            out.append(Problem(shard, sample.key, "bad_frame", f"cond_frame.jpg: {e}"))
    for member, data in sample.members.items():
        if member in ARRAY_MEMBERS:
            _check_array(sample, member, data, row, out, shard)
    if "json" in have:
        try:
            meta = json.loads(sample.members["json"])
            if isinstance(meta, dict) and meta.get("key") not in (None, sample.key):
                out.append(Problem(shard, sample.key, "key_mismatch", f"json key is {meta.get('key')!r}"))
        except ValueError as e:
            out.append(Problem(shard, sample.key, "bad_json", str(e)))
    latent_shape = row.get("latent_shape")
    if row.get("num_frames") is not None and latent_shape and len(latent_shape) == 4:
        if latent_shape[1] != row["num_frames"]:
            out.append(Problem(shard, sample.key, "shape_mismatch", f"num_frames={row['num_frames']} != T"))
    for column, members in BYTE_GROUPS.items():
        size = sum(len(sample.members.get(m, b"")) for m in members)
        if row.get(column) is not None and size != row[column]:
            out.append(
                Problem(shard, sample.key, "bytes_mismatch", f"{column}={row[column]}, tar has {size}")
            )
    if row.get("offset") is not None and row["offset"] != sample.offset:
        out.append(
            Problem(shard, sample.key, "offset_mismatch", f"index {row['offset']}, tar {sample.offset}")
        )
    if row.get("bytes_total") is not None and row["bytes_total"] != sample.end - sample.offset:
        out.append(
            Problem(
                shard,
                sample.key,
                "bytes_mismatch",
                f"bytes_total={row['bytes_total']}, tar has {sample.end - sample.offset}",
            )
        )
    return out


def _read_tar(f, shard: str, problems: list[Problem]):
    """Yield _Sample objects in tar order; tar damage becomes a Problem, then the scan stops."""
    sample = None
    try:
        with tarfile.open(fileobj=f, mode="r:") as tar:
            for info in tar:
                try:
                    key, member = check_member_name(info.name)
                except ValueError as e:  # '../x', '/tmp/x': reported, never extracted
                    problems.append(Problem(shard, None, "unsafe_member", str(e)))
                    continue
                if not info.isfile():
                    problems.append(
                        Problem(shard, key, "unsafe_member", f"{info.name} is not a regular file")
                    )
                    continue
                if sample is None or key != sample.key:
                    if sample is not None:
                        yield sample
                    sample = _Sample(key, info.offset)
                if info.size > MAX_SAMPLE_BYTES:  # never read a huge member into memory
                    problems.append(
                        Problem(
                            shard,
                            key,
                            "member_too_large",
                            f"member {info.name!r} is {info.size} bytes > {MAX_SAMPLE_BYTES}; not read",
                        )
                    )
                    sample.end = info.offset_data + ((info.size + 511) // 512) * 512
                    continue
                sample.members[member] = tar.extractfile(info).read()
                sample.end = info.offset_data + ((info.size + 511) // 512) * 512
            if sample is not None:
                yield sample
            _check_end(f, tar.offset, shard, problems)
    except (tarfile.ReadError, EOFError, OSError) as e:
        where = f" while reading sample {sample.key!r}" if sample is not None else ""
        kind = "truncated_tar" if "unexpected end" in str(e) or isinstance(e, EOFError) else "corrupt_tar"
        problems.append(Problem(shard, None, kind, f"{type(e).__name__}: {e}{where}"))


def _check_end(f, offset: int, shard: str, problems: list[Problem]) -> None:
    """After the last member tarfile stops quietly at zero blocks, at EOF, or at a bad header: tell them apart."""
    f.seek(offset)
    first = True
    while True:  # in bounded chunks: the rest of a damaged tar may be large
        chunk = f.read(1 << 20)
        if not chunk:
            if first:
                problems.append(
                    Problem(shard, None, "truncated_tar", f"no end-of-archive blocks at byte {offset}")
                )
            return
        first = False
        if chunk.count(0) != len(chunk):
            problems.append(Problem(shard, None, "corrupt_tar", f"unreadable tar header at byte {offset}"))
            return


def check_shard(shard: ShardFiles, storage_options: dict | None = None) -> list[dict]:
    """All problems of one shard, as dicts (this runs in a worker process)."""
    name = shard.tar or shard.index or shard.errors
    if shard.index is None:
        return [Problem(name, None, "missing_index", "no index parquet (shard not finished?)").as_dict()]
    if shard.tar is None:
        return [Problem(name, None, "missing_tar", "index parquet present but no tar").as_dict()]
    problems: list[Problem] = []
    try:
        fs, path = fsspec.core.url_to_fs(shard.index, **(storage_options or {}))
        with fs.open(path, "rb") as f:
            pf = pq.ParquetFile(f)
            cols = [c for c in DEEP_COLUMNS if c in pf.schema_arrow.names]
            rows = pf.read(columns=cols).to_pylist()
    except Exception as e:  # noqa: BLE001 - any unreadable index is reported, never raised
        return [Problem(name, None, "bad_index", f"{type(e).__name__}: {e}").as_dict()]
    by_key = {}
    for i, row in enumerate(rows):
        if row["key"] in by_key:
            problems.append(
                Problem(name, row["key"], "duplicate_key", f"index rows {by_key[row['key']][0]} and {i}")
            )
        by_key[row["key"]] = (i, row)
        for column, want in (("source", shard.source), ("stage", shard.stage), ("shard", shard.name)):
            if column in row and row[column] != want:
                problems.append(
                    Problem(
                        name,
                        row["key"],
                        "index_mismatch",
                        f"{column}={row[column]!r}, file name says {want!r}",
                    )
                )
    seen = set()
    try:
        _check_tar(shard, name, by_key, seen, problems, storage_options)
    except Exception as e:  # noqa: BLE001 - a hostile tar is reported, never a traceback
        problems.append(Problem(name, None, "corrupt_tar", f"{type(e).__name__}: {e}"))
    for key in by_key.keys() - seen:
        problems.append(Problem(name, key, "missing_from_tar", "index row has no sample in the tar"))
    return [p.as_dict() for p in problems]


def _check_tar(
    shard: ShardFiles, name: str, by_key: dict, seen: set, problems: list, storage_options
) -> None:
    fs, path = fsspec.core.url_to_fs(shard.tar, **(storage_options or {}))
    with fs.open(path, "rb") as f:
        for sample in _read_tar(f, name, problems):
            if sample.key in seen:
                problems.append(
                    Problem(name, sample.key, "duplicate_key", "members of this key are not contiguous")
                )
                continue
            seen.add(sample.key)
            if sample.key not in by_key:
                problems.append(
                    Problem(name, sample.key, "not_in_index", "sample in the tar has no index row")
                )
                continue
            problems.extend(check_sample(sample, by_key[sample.key][1], name))


def check_all(
    shards: list[ShardFiles], *, workers: int = 2, storage_options=None, progress=None
) -> list[dict]:
    """Problems of every shard, checked in parallel worker processes; sorted by shard, then key."""
    problems: list[dict] = []
    if workers <= 1 or len(shards) <= 1:
        for shard in shards:
            problems += check_shard(shard, storage_options)
            if progress is not None:
                progress()
    else:
        ctx = multiprocessing.get_context("spawn")  # no fork: the caller may have threads (progress bar)
        with ProcessPoolExecutor(max_workers=workers, mp_context=ctx) as pool:
            futures = [pool.submit(check_shard, s, storage_options) for s in shards]
            for future in as_completed(futures):
                problems += future.result()
                if progress is not None:
                    progress()
    return sorted(problems, key=lambda p: (p["shard"], p["key"] or "", p["kind"]))
