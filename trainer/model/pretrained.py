"""Weights files of VideoCrafter models: reading model.ckpt safely, our safetensors layout, presets from shapes, load_pretrained."""

from __future__ import annotations

import json
import pickle
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

from trainer.model.presets import VC_PRESETS, diffusion_params, preset_for
from trainer.model.videocrafter import VideoCrafterModel

FORMAT = "latentcrafter-videocrafter"  # safetensors metadata["format"] of our files
UNET, IPM = "model.diffusion_model.", "image_proj_model."  # VideoCrafter's prefixes
OUR_UNET, OUR_IPM = "unet.", "image_proj."  # ours (VideoCrafterModel's attribute names)


def read_videocrafter(src: str | Path) -> dict[str, torch.Tensor]:
    """The state dict of a VideoCrafter ``model.ckpt`` (Lightning, ``state_dict`` inside) or ``.safetensors``.

    Pickles are only ever opened with ``weights_only=True`` (memory-mapped where the file allows it); one that
    needs anything else is refused with an error, never loaded unsafely.
    """
    src = Path(src)
    if not src.is_file():
        raise FileNotFoundError(f"{src}: no such checkpoint file")
    if src.suffix == ".safetensors":
        if file_metadata(src).get("format") == FORMAT:
            raise ValueError(f"{src} is already a latentcrafter file; convert it back with --to videocrafter")
        return load_file(str(src))
    try:
        obj = torch.load(src, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(src))
    except pickle.UnpicklingError as e:
        raise ValueError(
            f"{src}: the pickle holds objects other than tensors and plain containers, and it will not be loaded "
            f"unsafely (weights_only=False can run arbitrary code). Re-save just its state_dict from a trusted "
            f"environment, or convert it to .safetensors. ({str(e).splitlines()[0]})"
        ) from e
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(
            f"{src}: not a VideoCrafter checkpoint (expected a dict with a 'state_dict' of tensors)"
        )
    return dict(obj)


def file_metadata(path: str | Path) -> dict[str, str]:
    """A safetensors file's metadata (empty dict when it has none)."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except SafetensorError as e:
        raise ValueError(f"{path}: not a safetensors file ({e})") from e


def split_videocrafter(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """VideoCrafter's U-Net and Resampler tensors under our names (``unet.*``, ``image_proj.*``), no copies."""
    out = {OUR_UNET + k.removeprefix(UNET): v for k, v in state.items() if k.startswith(UNET)}
    out.update({OUR_IPM + k.removeprefix(IPM): v for k, v in state.items() if k.startswith(IPM)})
    if not any(k.startswith(OUR_UNET) for k in out):
        raise ValueError(f"no {UNET}* keys: not a VideoCrafter checkpoint")
    return out


def check_state(got: Mapping[str, torch.Tensor], want: Mapping[str, torch.Tensor], *, hint: str) -> None:
    """Every key of ``want`` (a state dict) present in ``got`` with its shape, nothing else; errors name them."""
    missing = [k for k in want if k not in got]
    unexpected = [k for k in got if k not in want]
    shapes = [
        f"{k}: {tuple(v.shape)} in the checkpoint, {tuple(want[k].shape)} for the config"
        for k, v in got.items()
        if k in want and v.shape != want[k].shape
    ]
    problems = [
        f"{name} ({len(keys)}): {', '.join(keys[:5])}{' ...' if len(keys) > 5 else ''}"
        for name, keys in (("missing keys", missing), ("unexpected keys", unexpected), ("mis-shaped", shapes))
        if keys
    ]
    if problems:
        raise ValueError("the weights do not match the model; " + "; ".join(problems) + f". {hint}")


def meta_model(
    unet_params: Mapping[str, Any], image_proj_params: Mapping[str, Any] | None, preset: str | None = None
) -> VideoCrafterModel:
    """The model built on the meta device: keys and shapes without memory."""
    with torch.device("meta"):
        return VideoCrafterModel(unet_params, image_proj_params, preset=preset)


def infer_preset(tensors: Mapping[str, torch.Tensor]) -> str:
    """The preset whose keys and shapes equal these (our names); an error naming the closest one otherwise."""
    got = {k: tuple(v.shape) for k, v in tensors.items()}
    best: tuple[int, str, list[str]] = (-1, "", [])
    for name, p in VC_PRESETS.items():
        want = {k: tuple(v.shape) for k, v in meta_model(p.unet, p.image_proj).state_dict().items()}
        if want == got:
            return name
        diff = sorted(k for k in want.keys() | got.keys() if want.get(k) != got.get(k))
        same = len(want.keys() & got.keys()) - len(diff)
        if same > best[0]:
            best = (same, name, diff)
    _, name, diff = best
    raise ValueError(
        f"the checkpoint matches no preset ({', '.join(sorted(VC_PRESETS))}); closest is {name}, which differs in "
        f"{len(diff)} keys or shapes ({', '.join(diff[:5])}{' ...' if len(diff) > 5 else ''}). Pass "
        "--videocrafter-config with the VideoCrafter YAML the checkpoint was trained with."
    )


def model_metadata(
    model: VideoCrafterModel, diffusion: Mapping[str, Any], *, source: str = "", **extra: str
) -> dict[str, str]:
    """Safetensors metadata that makes one of our files self-describing (``load_pretrained`` reads it)."""
    meta = {
        "format": FORMAT,
        "preset": model.preset or preset_for(model.unet_params, model.image_proj_params) or "",
        "unet_params": json.dumps(model.unet_params, sort_keys=True),
        "diffusion": json.dumps(diffusion_params(diffusion), sort_keys=True),
        "source": source,
        **extra,
    }
    if model.image_proj_params is not None:
        meta["image_proj_params"] = json.dumps(model.image_proj_params, sort_keys=True)
    return meta


def decode_metadata(raw: Mapping[str, str], where: str) -> dict[str, Any]:
    """Our metadata with its JSON fields decoded; an error when the file is not one of ours."""
    if raw.get("format") != FORMAT:
        raise ValueError(
            f"{where}: not a latentcrafter file (metadata format != {FORMAT!r}); convert it first"
        )
    meta: dict[str, Any] = dict(raw)
    for k in ("unet_params", "image_proj_params", "diffusion"):
        if k in meta:
            meta[k] = json.loads(meta[k])
    return meta


def load_pretrained(path: str | Path, *, dtype: torch.dtype | None = None) -> VideoCrafterModel:
    """The model built from one of our files' metadata, weights loaded strictly, in eval mode.

    ``model.metadata`` holds the decoded metadata (``diffusion``: schedule and signal scaling; ``preset``).
    The module is built on the meta device and takes the file's tensors without a second copy.
    """
    path = Path(path)
    meta = decode_metadata(file_metadata(path), str(path))
    tensors = load_file(str(path))
    if dtype is not None:
        tensors = {k: v.to(dtype) for k, v in tensors.items()}
    if "image_proj_params" not in meta and any(k.startswith(OUR_IPM) for k in tensors):
        raise ValueError(f"{path}: has {OUR_IPM}* tensors but no image_proj_params metadata")
    model = meta_model(meta["unet_params"], meta.get("image_proj_params"), meta.get("preset") or None)
    check_state(tensors, model.state_dict(), hint=f"{path} is damaged or was not written by latentcrafter")
    model.load_state_dict(tensors, strict=True, assign=True)
    model.metadata = meta
    return model.eval()


def read_weights(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Any weights file the trainer can start from, as (tensors under our names, what the file says about itself).

    Our files (metadata format) give their metadata; a VideoCrafter ``model.ckpt`` or VideoCrafter-layout
    ``.safetensors`` gives ``{"videocrafter": True}`` plus its schedule buffers (``alphas_cumprod``,
    ``scale_arr``) when present; a trainer export without metadata gives ``{}``.
    """
    path = Path(path)
    if path.suffix == ".safetensors":
        raw = file_metadata(path)
        if raw.get("format") == FORMAT:
            return load_file(str(path)), decode_metadata(raw, str(path))
        tensors = load_file(str(path))
        if not any(k.startswith(UNET) for k in tensors):
            return tensors, {}
        state = tensors
    else:
        state = read_videocrafter(path)
    info: dict[str, Any] = {"videocrafter": True}
    for k in ("alphas_cumprod", "scale_arr"):
        if k in state:
            info[k] = state[k]
    return split_videocrafter(state), info


def load_videocrafter_weights(model: VideoCrafterModel, path: str | Path, diffusion: Any) -> str:
    """Load any weights file the trainer can start from into ``model`` (strict), checking that the file's
    schedule and signal scaling are the ones ``diffusion`` (the run's trainer.diffusion.Diffusion) trains with.

    Returns what the file was: "VideoCrafter checkpoint", "converted checkpoint" or "checkpoint".
    """
    tensors, info = read_weights(path)
    check_state(
        tensors,
        model.state_dict(),
        hint=f"model.init_checkpoint {path} is not a {model.preset} model; set model.unet to its preset",
    )
    model.load_state_dict(tensors, strict=True)
    where = f"model.init_checkpoint {path}"
    if "diffusion" in info:  # our metadata
        saved = info["diffusion"]
        ours = {
            "use_scale": diffusion.scale_arr is not None,
            "timesteps": diffusion.num_timesteps,
            "parameterization": diffusion.prediction,
        }
        if diffusion.scale_arr is not None:
            s = diffusion.signal_scale
            ours.update(
                scale_a=s.scale_a, scale_b=s.scale_b, mid_step=s.mid_step, fix_scale_bug=s.fix_scale_bug
            )
        bad = {k: (saved.get(k), v) for k, v in ours.items() if k in saved and saved[k] != v}
        if bad:
            raise ValueError(
                f"{where} was trained with {', '.join(f'{k}={a}' for k, (a, _) in bad.items())} but the run has "
                f"{', '.join(f'{k}={b}' for k, (_, b) in bad.items())}; set model.<name> to the file's values"
            )
    if "alphas_cumprod" in info:  # a VideoCrafter checkpoint's own buffers
        if not torch.allclose(
            info["alphas_cumprod"].double(), diffusion.alphas_cumprod, rtol=1e-5, atol=1e-7
        ):
            raise ValueError(f"{where}: its alphas_cumprod is not the run's linear 0.00085..0.012 schedule")
    if "scale_arr" in info or ("videocrafter" in info and "alphas_cumprod" in info):
        theirs, ours_arr = info.get("scale_arr"), diffusion.scale_arr
        if (theirs is None) != (ours_arr is None) or (
            theirs is not None and not torch.allclose(theirs.float(), ours_arr, atol=1e-6)
        ):
            raise ValueError(
                f"{where}: its scale_arr buffer ({'absent' if theirs is None else f'{theirs.numel()} steps'}) "
                f"differs from the run's signal scaling ({diffusion.signal_scale}); set model.use_scale, "
                "scale_b, fix_scale_bug to the checkpoint's YAML values"
            )
    if "diffusion" in info:
        return "converted checkpoint"
    return "VideoCrafter checkpoint" if "videocrafter" in info else "checkpoint"


__all__ = [
    "load_videocrafter_weights",
    "FORMAT",
    "check_state",
    "decode_metadata",
    "file_metadata",
    "infer_preset",
    "load_pretrained",
    "meta_model",
    "model_metadata",
    "read_videocrafter",
    "read_weights",
    "split_videocrafter",
]
