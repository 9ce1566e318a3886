"""A streaming ``.safetensors`` writer: the bytes of `safetensors.torch.save_file`, one tensor in memory at a time."""

from __future__ import annotations

import json
import os
import struct
import sys
import tempfile
from collections import defaultdict
from collections.abc import Mapping
from pathlib import Path

import torch

# (format code, rank): safetensors writes the data section sorted by descending rank (its Rust ``Dtype`` enum
# order, roughly alignment), then by name; checked against safetensors 0.8.0's output.
_DTYPES: dict[torch.dtype, tuple[str, int]] = {
    torch.bool: ("BOOL", 0),
    torch.uint8: ("U8", 2),
    torch.int8: ("I8", 3),
    torch.float8_e5m2: ("F8_E5M2", 4),
    torch.float8_e4m3fn: ("F8_E4M3", 5),
    torch.float8_e4m3fnuz: ("F8_E4M3FNUZ", 7),
    torch.float8_e5m2fnuz: ("F8_E5M2FNUZ", 8),
    torch.int16: ("I16", 9),
    torch.uint16: ("U16", 10),
    torch.float16: ("F16", 11),
    torch.bfloat16: ("BF16", 12),
    torch.int32: ("I32", 13),
    torch.uint32: ("U32", 14),
    torch.float32: ("F32", 15),
    torch.complex64: ("C64", 16),
    torch.float64: ("F64", 17),
    torch.int64: ("I64", 18),
    torch.uint64: ("U64", 19),
}
if hasattr(torch, "float8_e8m0fnu"):
    _DTYPES[torch.float8_e8m0fnu] = ("F8_E8M0", 6)
if hasattr(torch, "float4_e2m1fn_x2"):
    _DTYPES[torch.float4_e2m1fn_x2] = ("F4", 1)  # two values a byte; the header counts values
_ALIGN = 8  # the header is padded with spaces to a multiple of this


def _shared(tensors: Mapping[str, torch.Tensor]) -> list[set[str]]:
    """Groups of names whose bytes overlap, as `safetensors.torch._find_shared_tensors` finds them."""
    by_storage: dict[tuple, set[str]] = defaultdict(set)
    for k, v in tensors.items():
        if v.device.type == "meta":
            continue
        storage = v.untyped_storage()
        if storage.data_ptr() != 0 and storage.nbytes() != 0:
            by_storage[(v.device, storage.data_ptr(), storage.nbytes())].add(k)
    groups = []
    for names in by_storage.values():
        if len(names) < 2:
            continue
        areas = sorted(
            (
                (t := tensors[n]).data_ptr(),
                t.reshape(-1)[-1].data_ptr() + t.element_size() if t.numel() else t.data_ptr(),
                n,
            )
            for n in names
        )
        group, last_stop = {areas[0][2]}, areas[0][1]
        for start, stop, name in areas[1:]:
            if start >= last_stop:
                groups.append(group)
                group = {name}
            else:
                group.add(name)
            last_stop = stop
        groups.append(group)
    return [g for g in groups if len(g) > 1]


def _check(tensors: Mapping[str, torch.Tensor]) -> None:
    for k, v in tensors.items():
        if not isinstance(v, torch.Tensor):
            raise ValueError(f"Key `{k}` is invalid, expected torch.Tensor but received {type(v)}")
        if v.layout != torch.strided:
            raise ValueError(f"`{k}` is a sparse tensor; safetensors stores dense tensors only")
        if v.device.type == "meta":
            raise ValueError(f"`{k}` is on the meta device: it has no data to write")
        if v.dtype not in _DTYPES:
            raise ValueError(f"`{k}`: dtype {v.dtype} has no safetensors format code")
    failing = _shared(tensors)
    if failing:
        raise RuntimeError(
            f"Some tensors share memory, this will lead to duplicate memory on disk and potential differences "
            f"when loading them again: {failing}. Save each storage once (e.g. safetensors.torch.save_model)."
        )


def header(
    tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None
) -> tuple[bytes, list[str]]:
    """The file's first bytes (length, JSON, padding) and the names in the order their data follows."""
    order = sorted(tensors, key=lambda k: (-_DTYPES[tensors[k].dtype][1], k))
    entries: dict[str, object] = {}
    if metadata is not None:
        for k, v in metadata.items():
            if not isinstance(k, str) or not isinstance(v, str):
                raise ValueError(f"metadata must map str to str; got {k!r}: {type(v).__name__}")
        entries["__metadata__"] = dict(metadata)
    offset = 0
    for k in order:
        t = tensors[k]
        code = _DTYPES[t.dtype][0]
        shape = list(t.shape)
        if code == "F4" and shape:
            shape[-1] *= 2
        nbytes = t.numel() * t.element_size()
        entries[k] = {"dtype": code, "shape": shape, "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    text = json.dumps(entries, ensure_ascii=False, separators=(",", ":")).encode()
    text += b" " * (-len(text) % _ALIGN)
    return struct.pack("<Q", len(text)) + text, order


def _write_tensor(f, t: torch.Tensor) -> None:
    if t.numel() == 0:
        return
    t = t.detach()
    if t.device.type != "cpu":
        t = t.to("cpu")
    t = t.contiguous().reshape(-1)  # a copy only when non-contiguous (or moved): one tensor at a time
    raw = t.view(torch.uint8)  # same bytes, any dtype (bf16, bool, float8): no numpy dtype needed
    mv = memoryview(raw.numpy()).cast("B")
    step = 1 << 28  # 256 MiB writes keep each syscall bounded
    for i in range(0, len(mv), step):
        f.write(mv[i : i + step])


def save_safetensors(
    tensors: Mapping[str, torch.Tensor],
    path: str | os.PathLike[str],
    metadata: dict[str, str] | None = None,
) -> None:
    """Write ``tensors`` to ``path`` as `safetensors.torch.save_file` would, streaming tensor by tensor.

    The header and data layout match ``save_file`` byte for byte (tensors sorted by dtype rank, then name),
    except that ``__metadata__`` keeps ``metadata``'s own key order: safetensors 0.8.0 writes it in Rust
    ``HashMap`` order, which changes from process to process, so with two or more metadata keys ``save_file``
    itself is not byte-reproducible. Differences in what is accepted: non-contiguous tensors are written as
    their ``.contiguous()`` values (``save_file`` raises ``ValueError``); tensors whose bytes overlap are refused
    with ``RuntimeError`` like ``save_file``; non-CPU tensors are copied to the CPU one at a time.
    Extra memory: at most one tensor's bytes (only for a non-contiguous or non-CPU tensor). The file is written
    under a temporary name next to ``path`` (mode 0600, as ``save_file`` leaves its files) and renamed over it at
    the end, so ``path`` never holds a partial file.
    """
    if sys.byteorder != "little":
        raise NotImplementedError("save_safetensors writes native bytes; big-endian hosts are not supported")
    if not isinstance(tensors, Mapping):
        raise ValueError(f"Expected a dict of [str, torch.Tensor] but received {type(tensors)}")
    _check(tensors)
    head, order = header(tensors, metadata)
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(head)
            for k in order:
                _write_tensor(f, tensors[k])
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


__all__ = ["header", "save_safetensors"]
