"""`trainer.safetensors_io.save_safetensors`: byte-identical to `safetensors.torch.save_file`, atomic."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from safetensors.torch import load_file, save_file

from trainer import safetensors_io
from trainer.safetensors_io import save_safetensors


def _mixed() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    base = torch.randn(6, 5, generator=g)
    return {
        "unet.b.weight": torch.randn(4, 3, generator=g),
        "unet.a.weight": torch.randn(4, 3, generator=g).half(),
        "unet.c.bf16": torch.randn(7, 2, generator=g).bfloat16(),
        "unet.d.bf16_0d": torch.tensor(1.5, dtype=torch.bfloat16),
        "scalar": torch.tensor(3.25),
        "count": torch.tensor([1, -2, 3], dtype=torch.int64),
        "mask": torch.tensor([True, False, True, True, False]),
        "empty": torch.zeros(0, 4, dtype=torch.float16),
        "empty_f32": torch.zeros(3, 0),
        "i8": torch.tensor([-1, 2], dtype=torch.int8),
        "transposed": base.t(),  # non-contiguous
        "strided": torch.arange(20, dtype=torch.int64)[::3],  # non-contiguous 1-d
        "ünïcode": torch.ones(2, dtype=torch.float16),
    }


def _contiguous(tensors):
    return {k: v.contiguous() for k, v in tensors.items()}


@pytest.mark.parametrize("metadata", [None, {}, {"format": 'latentcrafter "x"\n\u00e9'}])
def test_byte_identical_to_save_file(tmp_path, metadata):
    tensors = _mixed()
    save_file(_contiguous(tensors), str(tmp_path / "ref.safetensors"), metadata=metadata)
    save_safetensors(tensors, tmp_path / "ours.safetensors", metadata=metadata)
    ours = (tmp_path / "ours.safetensors").read_bytes()
    assert ours == (tmp_path / "ref.safetensors").read_bytes()
    assert struct.unpack("<Q", ours[:8])[0] % 8 == 0
    back = load_file(str(tmp_path / "ours.safetensors"))
    assert set(back) == set(tensors)
    for k, v in tensors.items():
        assert back[k].dtype == v.dtype and back[k].shape == v.shape
        assert torch.equal(back[k], v), k


def test_many_metadata_keys_same_header_and_data(tmp_path):
    """save_file orders __metadata__ by a per-process random HashMap; everything else is byte-identical."""
    tensors = _mixed()
    meta = {"format": "f", "unet_params": json.dumps({"a": 1}), "diffusion": "{}", "source": "model.ckpt"}
    save_file(_contiguous(tensors), str(tmp_path / "ref.safetensors"), metadata=meta)
    save_safetensors(tensors, tmp_path / "ours.safetensors", metadata=meta)
    ref, ours = (tmp_path / "ref.safetensors").read_bytes(), (tmp_path / "ours.safetensors").read_bytes()
    n = struct.unpack("<Q", ref[:8])[0]
    assert ours[:8] == ref[:8] and ours[8 + n :] == ref[8 + n :]
    assert json.loads(ours[8 : 8 + n]) == json.loads(ref[8 : 8 + n])
    assert list(json.loads(ours[8 : 8 + n])["__metadata__"]) == list(meta)  # ours: the caller's order


def test_empty_dict_and_float8(tmp_path):
    for tensors in (
        {},
        {"f8": torch.randn(5).to(torch.float8_e4m3fn), "u8": torch.arange(3, dtype=torch.uint8)},
    ):
        save_file(tensors, str(tmp_path / "ref"))
        save_safetensors(tensors, tmp_path / "ours")
        assert (tmp_path / "ours").read_bytes() == (tmp_path / "ref").read_bytes()


def test_shared_storage_like_save_file(tmp_path):
    x = torch.zeros(8)
    with pytest.raises(RuntimeError, match="share memory"):
        save_file({"a": x, "b": x}, str(tmp_path / "ref"))
    with pytest.raises(RuntimeError, match="share memory"):
        save_safetensors({"a": x, "b": x}, tmp_path / "ours")
    with pytest.raises(RuntimeError, match="share memory"):
        save_safetensors({"a": x[:5], "b": x[3:]}, tmp_path / "ours")
    assert not (tmp_path / "ours").exists()
    disjoint = {"a": x[:4], "b": x[4:]}  # same storage, no overlap: save_file accepts it, and so do we
    save_file(disjoint, str(tmp_path / "ref"))
    save_safetensors(disjoint, tmp_path / "ours")
    assert (tmp_path / "ours").read_bytes() == (tmp_path / "ref").read_bytes()


def test_failure_mid_write_leaves_no_partial_file(tmp_path, monkeypatch):
    path = tmp_path / "model.safetensors"
    calls = []
    real = safetensors_io._write_tensor

    def failing(f, t):
        calls.append(t)
        if len(calls) == 3:
            raise OSError("disk full")
        real(f, t)

    monkeypatch.setattr(safetensors_io, "_write_tensor", failing)
    with pytest.raises(OSError, match="disk full"):
        save_safetensors(_mixed(), path)
    assert not path.exists() and list(tmp_path.iterdir()) == []

    path.write_bytes(b"old")  # an existing file is kept as it was
    calls.clear()
    with pytest.raises(OSError, match="disk full"):
        save_safetensors(_mixed(), path)
    assert path.read_bytes() == b"old" and list(tmp_path.iterdir()) == [path]


def test_file_mode_matches_save_file(tmp_path):
    save_file({"a": torch.ones(1)}, str(tmp_path / "ref"))
    save_safetensors({"a": torch.ones(1)}, tmp_path / "ours")
    assert (tmp_path / "ours").stat().st_mode == (tmp_path / "ref").stat().st_mode
