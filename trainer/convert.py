"""`latentcrafter convert`: VideoCrafter checkpoints to and from latentcrafter's safetensors, and `load_pretrained`."""

from __future__ import annotations

import argparse
import json
import pickle
import sys
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from trainer.model.videocrafter import VCResampler, VCUNet, VCUNetConfig

FORMAT = "latentcrafter-videocrafter"
UNET, IPM = "model.diffusion_model.", "image_proj_model."  # VideoCrafter's prefixes
OUR_UNET, OUR_IPM = "unet.", "image_proj."  # ours
# VideoCrafter's own defaults (lvdm/models/ddpm3d.py: DDPM.__init__ and LatentDiffusion.__init__)
DIFFUSION_DEFAULTS: dict[str, Any] = {
    "timesteps": 1000,
    "linear_start": 1e-4,
    "linear_end": 2e-2,
    "parameterization": "eps",
    "use_scale": False,
    "scale_a": 1,
    "scale_b": 0.3,
    "mid_step": 400,
    "fix_scale_bug": False,
}


def read_videocrafter(src: str | Path) -> dict[str, torch.Tensor]:
    """The state dict of a VideoCrafter ``model.ckpt`` (Lightning, ``state_dict`` inside) or ``.safetensors``.

    Pickles are only ever opened with ``weights_only=True`` (memory-mapped where the file allows it); one that
    needs anything else is refused with an error, never loaded unsafely.
    """
    src = Path(src)
    if not src.is_file():
        raise FileNotFoundError(f"{src}: no such checkpoint file")
    if src.suffix == ".safetensors":
        if _metadata(src).get("format") == FORMAT:
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


def diffusion_params(model_params: Mapping[str, Any]) -> dict[str, Any]:
    """The diffusion settings of a VideoCrafter YAML's ``model.params``, VideoCrafter's defaults where absent."""
    return {k: model_params.get(k, d) for k, d in DIFFUSION_DEFAULTS.items()}


def _check(got: Mapping[str, torch.Tensor], module: torch.nn.Module, prefix: str, what: str) -> None:
    want = module.state_dict()
    missing = [prefix + k for k in want if k not in got]
    unexpected = [prefix + k for k in got if k not in want]
    shapes = [
        f"{prefix}{k}: {tuple(v.shape)} in the checkpoint, {tuple(want[k].shape)} for the config"
        for k, v in got.items()
        if k in want and v.shape != want[k].shape
    ]
    problems = [
        f"{name} ({len(keys)}): {', '.join(keys[:5])}{' ...' if len(keys) > 5 else ''}"
        for name, keys in (("missing keys", missing), ("unexpected keys", unexpected), ("mis-shaped", shapes))
        if keys
    ]
    if problems:
        raise ValueError(
            f"the checkpoint's {what} does not match the config; "
            + "; ".join(problems)
            + ". Check that --videocrafter-config is the YAML this checkpoint was trained with."
        )


def to_latentcrafter(
    state: Mapping[str, torch.Tensor],
    unet_params: Mapping[str, Any],
    *,
    image_proj_params: Mapping[str, Any] | None,
    diffusion: Mapping[str, Any],
    source: str = "",
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Our tensors and safetensors metadata from a VideoCrafter state dict.

    ``model.diffusion_model.*`` becomes ``unet.*`` and ``image_proj_model.*`` becomes ``image_proj.*``; both are
    checked key by key and shape by shape against the modules the params describe (built on the meta device).
    Everything else (``first_stage_model.*``, ``cond_stage_model.*``, ``embedder.*``, schedule buffers such as
    ``betas``, ``alphas_cumprod``, ``scale_arr``) is frozen or derived and is NOT part of our file; converting
    back keeps those only when the source checkpoint is given (``to_videocrafter(frozen=...)``).
    Tensors are passed through as they are (same dtype, no copies).
    """
    unet_sd = {k.removeprefix(UNET): v for k, v in state.items() if k.startswith(UNET)}
    ipm_sd = {k.removeprefix(IPM): v for k, v in state.items() if k.startswith(IPM)}
    if not unet_sd:
        raise ValueError(f"no {UNET}* keys: not a VideoCrafter checkpoint")
    with torch.device("meta"):
        _check(unet_sd, VCUNet(VCUNetConfig.from_videocrafter(unet_params)), UNET, "U-Net")
        if image_proj_params is None and ipm_sd:
            raise ValueError(
                f"unexpected keys {IPM}* (an I2V checkpoint) but no image_proj_params were given; "
                "use the I2V YAML or pass image_proj_params={} for VideoCrafter's Resampler sizes"
            )
        if image_proj_params is not None:
            _check(ipm_sd, VCResampler(**image_proj_params), IPM, "image_proj_model")
    tensors = {OUR_UNET + k: v for k, v in unet_sd.items()}
    tensors.update({OUR_IPM + k: v for k, v in ipm_sd.items()})
    metadata = {
        "format": FORMAT,
        "unet_params": json.dumps(dict(unet_params), sort_keys=True),
        "diffusion": json.dumps(diffusion_params(diffusion), sort_keys=True),
        "source": source,
    }
    if image_proj_params is not None:
        metadata["image_proj_params"] = json.dumps(dict(image_proj_params), sort_keys=True)
    return tensors, metadata


def _metadata(path: Path) -> dict[str, str]:
    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except SafetensorError as e:
        raise ValueError(f"{path}: not a safetensors file ({e})") from e


def _check_format(metadata: Mapping[str, str] | None, where: str) -> None:
    if (metadata or {}).get("format") != FORMAT:
        raise ValueError(
            f"{where}: not a latentcrafter file (metadata format != {FORMAT!r}); convert it first"
        )


def to_videocrafter(
    tensors: Mapping[str, torch.Tensor],
    metadata: Mapping[str, str],
    *,
    frozen: Mapping[str, torch.Tensor] | None,
) -> dict[str, torch.Tensor]:
    """The inverse of `to_latentcrafter`: VideoCrafter's prefixes back, plus ``frozen``'s other tensors as they are.

    With ``frozen`` (the source checkpoint), its key order is kept and its U-Net / image_proj tensors are replaced
    by ours, so VideoCrafter -> ours -> VideoCrafter gives the same keys and bit-identical tensors.
    """
    _check_format(metadata, "to_videocrafter")
    ours: dict[str, torch.Tensor] = {}
    for k, v in tensors.items():
        if k.startswith(OUR_UNET):
            ours[UNET + k.removeprefix(OUR_UNET)] = v
        elif k.startswith(OUR_IPM):
            ours[IPM + k.removeprefix(OUR_IPM)] = v
        else:
            raise ValueError(
                f"unexpected key {k!r} in a latentcrafter file (only {OUR_UNET}* and {OUR_IPM}*)"
            )
    out: dict[str, torch.Tensor] = {}
    for k, v in (frozen or {}).items():
        if k.startswith((UNET, IPM)):
            if k not in ours:
                raise ValueError(f"{k} is in the frozen checkpoint but not in the latentcrafter file")
            out[k] = ours[k]
        else:
            out[k] = v
    for k, v in ours.items():
        out.setdefault(k, v)
    return out


def load_pretrained(
    path: str | Path, *, dtype: torch.dtype | None = None
) -> tuple[VCUNet, VCResampler | None, dict[str, Any]]:
    """(U-Net, Resampler or None, metadata with JSON fields decoded) from one of our files, loaded strictly.

    Modules are built on the meta device and take the file's tensors (cast to ``dtype`` if given) without a
    second copy.
    """
    path = Path(path)
    raw = _metadata(path)
    _check_format(raw, str(path))
    meta: dict[str, Any] = dict(raw)
    for k in ("unet_params", "image_proj_params", "diffusion"):
        if k in meta:
            meta[k] = json.loads(meta[k])
    tensors = load_file(str(path))
    if dtype is not None:
        tensors = {k: v.to(dtype) for k, v in tensors.items()}
    with torch.device("meta"):
        unet = VCUNet(VCUNetConfig.from_videocrafter(meta["unet_params"]))
        proj = VCResampler(**meta["image_proj_params"]) if "image_proj_params" in meta else None
    unet.load_state_dict(
        {k.removeprefix(OUR_UNET): v for k, v in tensors.items() if k.startswith(OUR_UNET)},
        strict=True,
        assign=True,
    )
    ipm = {k.removeprefix(OUR_IPM): v for k, v in tensors.items() if k.startswith(OUR_IPM)}
    if proj is not None:
        proj.load_state_dict(ipm, strict=True, assign=True)
    elif ipm:
        raise ValueError(f"{path}: has {OUR_IPM}* tensors but no image_proj_params metadata")
    return unet.eval(), None if proj is None else proj.eval(), meta


def _read_yaml(path: Path) -> tuple[dict[str, Any], dict[str, Any] | None, dict[str, Any]]:
    cfg = yaml.safe_load(path.read_text())
    try:
        model_params = cfg["model"]["params"]
        unet_params = model_params["unet_config"]["params"]
    except (KeyError, TypeError) as e:
        raise ValueError(f"{path}: no model.params.unet_config.params (is it a VideoCrafter YAML?)") from e
    ipm = cfg.get("image_proj_model")
    ipm_params = None if ipm is None else dict((ipm or {}).get("params") or {})
    return dict(unet_params), ipm_params, diffusion_params(model_params)


def _summary(tensors: Mapping[str, torch.Tensor]) -> str:
    n = sum(v.numel() for v in tensors.values())
    size = sum(v.numel() * v.element_size() for v in tensors.values())
    return f"{len(tensors)} tensors, {n / 1e6:.1f}M values, {size / 2**20:.1f} MiB"


def _write_atomic(dst: Path, write: Any) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(dst.name + ".tmp")
    try:
        write(tmp)
        tmp.replace(dst)
    finally:
        tmp.unlink(missing_ok=True)


def convert(args: argparse.Namespace) -> str:
    """Run one conversion; returns the summary line."""
    src, dst = Path(args.src), Path(args.out)
    if not src.is_file():
        raise FileNotFoundError(f"{src}: no such checkpoint file")
    if args.to == "latentcrafter":
        if args.frozen_from:
            raise ValueError("--frozen-from only applies to --to videocrafter")
        if not args.videocrafter_config:
            raise ValueError(
                "--videocrafter-config YAML is required: attention heads, resolutions and temporal_length cannot "
                "be read off the weights; pass the VideoCrafter YAML the checkpoint was trained with "
                "(e.g. configs/inference_t2v_512_v2.0.yaml)"
            )
        unet_params, ipm_params, diffusion = _read_yaml(Path(args.videocrafter_config))
        state = read_videocrafter(src)
        if ipm_params is None and any(k.startswith(IPM) for k in state):
            ipm_params = {}  # VideoCrafter hard-codes the I2V Resampler; VCResampler's defaults are its sizes
        tensors, metadata = to_latentcrafter(
            state, unet_params, image_proj_params=ipm_params, diffusion=diffusion, source=src.name
        )
        skipped = len(state) - len(tensors)
        del state
        _write_atomic(dst, lambda p: save_file(tensors, str(p), metadata=metadata))
        return f"{src} -> {dst}: {_summary(tensors)} (U-Net + image_proj); {skipped} frozen/buffer tensors left out"
    if args.videocrafter_config:
        raise ValueError(
            "--videocrafter-config only applies to --to latentcrafter (our file carries its config)"
        )
    metadata = _metadata(src)
    _check_format(metadata, str(src))
    frozen = read_videocrafter(args.frozen_from) if args.frozen_from else None
    out = to_videocrafter(load_file(str(src)), metadata, frozen=frozen)
    _write_atomic(dst, lambda p: torch.save({"state_dict": out}, p))
    note = (
        ""
        if frozen is not None
        else " (U-Net/image_proj only: pass --frozen-from for the VAE, encoders, buffers)"
    )
    return f"{src} -> {dst}: {_summary(out)}{note}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="latentcrafter convert",
        description="Convert a VideoCrafter model.ckpt / .safetensors to latentcrafter's safetensors, or back.",
    )
    p.add_argument("src", help="source checkpoint")
    p.add_argument("--out", required=True, help="destination file")
    p.add_argument("--videocrafter-config", help="VideoCrafter YAML (required for --to latentcrafter)")
    p.add_argument("--to", choices=("latentcrafter", "videocrafter"), default="latentcrafter")
    p.add_argument(
        "--frozen-from", help="VideoCrafter checkpoint whose other tensors (VAE, encoders) to keep"
    )
    args = p.parse_args(argv)
    try:
        print(convert(args))
    except (ValueError, OSError, NotImplementedError) as e:
        print(f"latentcrafter convert: error: {e}", file=sys.stderr)
        return 2
    return 0


__all__ = ["load_pretrained", "main", "read_videocrafter", "to_latentcrafter", "to_videocrafter"]

if __name__ == "__main__":
    sys.exit(main())
