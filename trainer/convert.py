"""`latentcrafter convert`: VideoCrafter checkpoints to and from latentcrafter's safetensors, and `load_pretrained`."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors.torch import load_file

from trainer.model.presets import DIFFUSION_DEFAULTS, diffusion_params, get_preset
from trainer.model.pretrained import (
    FORMAT,
    IPM,
    OUR_IPM,
    OUR_UNET,
    UNET,
    check_state,
    decode_metadata,
    file_metadata,
    infer_preset,
    load_pretrained,
    meta_model,
    model_metadata,
    read_videocrafter,
    split_videocrafter,
)
from trainer.safetensors_io import save_safetensors


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
    tensors = split_videocrafter(state)
    if image_proj_params is None and any(k.startswith(OUR_IPM) for k in tensors):
        raise ValueError(
            f"unexpected keys {IPM}* (an I2V checkpoint) but no image_proj_params were given; "
            "use the I2V YAML or pass image_proj_params={} for VideoCrafter's Resampler sizes"
        )
    model = meta_model(unet_params, image_proj_params)
    check_state(
        to_videocrafter_names(tensors),
        to_videocrafter_names(model.state_dict()),
        hint="Check that --videocrafter-config is the YAML this checkpoint was trained with.",
    )
    return tensors, model_metadata(model, diffusion, source=source)


def to_videocrafter_names(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our names back to VideoCrafter's (``unet.*`` -> ``model.diffusion_model.*``, ``image_proj.*`` ->
    ``image_proj_model.*``); any other key is an error."""
    out: dict[str, torch.Tensor] = {}
    for k, v in tensors.items():
        if k.startswith(OUR_UNET):
            out[UNET + k.removeprefix(OUR_UNET)] = v
        elif k.startswith(OUR_IPM):
            out[IPM + k.removeprefix(OUR_IPM)] = v
        else:
            raise ValueError(
                f"unexpected key {k!r} in a latentcrafter file (only {OUR_UNET}* and {OUR_IPM}*)"
            )
    return out


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
    decode_metadata(metadata, "to_videocrafter")
    ours = to_videocrafter_names(tensors)
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


def _params_for(state: Mapping[str, torch.Tensor], config: str | None, preset: str | None) -> tuple:
    """(unet params, Resampler params or None, diffusion settings, preset name or None) for the source."""
    if config:
        unet_params, ipm_params, diffusion = _read_yaml(Path(config))
        if ipm_params is None and any(k.startswith(IPM) for k in state):
            ipm_params = {}  # VideoCrafter hard-codes the I2V Resampler; VCResampler's defaults are its sizes
        return unet_params, ipm_params, diffusion, None
    # No YAML: heads, resolutions and temporal_length cannot be read off the weights, so the shapes pick
    # one of the released models' presets (or --preset names it).
    name = preset or infer_preset(split_videocrafter(state))
    p = get_preset(name)
    return dict(p.unet), None if p.image_proj is None else dict(p.image_proj), dict(p.diffusion), name


def convert(args: argparse.Namespace) -> str:
    """Run one conversion; returns the summary line(s)."""
    src, dst = Path(args.src), Path(args.out)
    if not src.is_file():
        raise FileNotFoundError(f"{src}: no such checkpoint file")
    if args.to == "latentcrafter":
        if args.frozen_from:
            raise ValueError("--frozen-from only applies to --to videocrafter")
        if args.videocrafter_config and args.preset:
            raise ValueError("give --videocrafter-config or --preset, not both")
        state = read_videocrafter(src)
        unet_params, ipm_params, diffusion, preset = _params_for(state, args.videocrafter_config, args.preset)
        tensors, metadata = to_latentcrafter(
            state, unet_params, image_proj_params=ipm_params, diffusion=diffusion, source=src.name
        )
        skipped = len(state) - len(tensors)
        how = (
            f"preset {preset} (from the weights' shapes)" if preset else f"config {args.videocrafter_config}"
        )
        lines = [
            f"{src} -> {dst}: {_summary(tensors)} (U-Net + image_proj), {how}; "
            f"{skipped} frozen/buffer tensors not in it"
        ]
        if args.extract_encoders:
            from encoders.videocrafter import extract_encoders

            sizes = {"text_heads": args.text_heads, "vision_heads": args.vision_heads}
            if args.vae_norm_groups:
                sizes["vae_norm_groups"] = args.vae_norm_groups
            info = extract_encoders(state, args.extract_encoders, tokenizer_dir=args.tokenizer, **sizes)
            folders = ", ".join(sorted(info.get("folders", info)))
            lines.append(
                f"frozen encoders -> {args.extract_encoders} ({folders}); details in videocrafter_extract.json"
            )
        del state
        dst.parent.mkdir(parents=True, exist_ok=True)
        save_safetensors(tensors, dst, metadata)  # streams tensor by tensor; atomic
        return "\n".join(lines)
    for flag in ("videocrafter_config", "preset", "extract_encoders", "tokenizer"):
        if getattr(args, flag):
            raise ValueError(f"--{flag.replace('_', '-')} only applies to --to latentcrafter")
    metadata = file_metadata(src)
    decode_metadata(metadata, str(src))
    tensors = load_file(str(src))
    zeros: dict[str, str] = {}
    if args.frozen_from and Path(args.frozen_from).is_dir():
        # A model folder (SD 2.1 layout): the encoders re-laid out as VideoCrafter's, the schedule recomputed.
        from encoders.videocrafter_layout import videocrafter_frozen_parts
        from trainer.diffusion.schedule import schedule_buffers

        meta = decode_metadata(metadata, str(src))
        image = "image_proj_params" in meta or any(k.startswith(OUR_IPM) for k in tensors)
        parts, zeros = videocrafter_frozen_parts(args.frozen_from, image=image)
        frozen = {**schedule_buffers(meta.get("diffusion") or DIFFUSION_DEFAULTS), **parts}
        how = f"frozen tensors from folder {args.frozen_from} + schedule buffers from the file's diffusion settings"
    else:
        frozen = read_videocrafter(args.frozen_from) if args.frozen_from else None
        how = "" if frozen is None else f"frozen tensors from {args.frozen_from}"
    out = to_videocrafter(tensors, metadata, frozen=frozen)
    _write_atomic(dst, lambda p: torch.save({"state_dict": out}, p))
    if frozen is None:
        return f"{src} -> {dst}: {_summary(out)} (U-Net/image_proj only: pass --frozen-from for the VAE, encoders, buffers)"
    lines = [f"{src} -> {dst}: {_summary(out)}; {how}"]
    if zeros:
        lines.append(
            f"{len(zeros)} tensors filled with ZEROS (not in the folder; VideoCrafter's outputs never read them):"
        )
        by_reason: dict[str, list[str]] = {}
        for key, why in zeros.items():
            by_reason.setdefault(why, []).append(key)
        for why, keys in by_reason.items():
            shown = ", ".join(keys) if len(keys) <= 3 else f"{keys[0]} ... {keys[-1]} ({len(keys)} tensors)"
            lines.append(f"  {shown}: {why}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="latentcrafter convert",
        description="Convert a VideoCrafter model.ckpt / .safetensors to latentcrafter's safetensors, or back.",
    )
    p.add_argument("src", help="source checkpoint")
    p.add_argument("--out", required=True, help="destination file")
    p.add_argument(
        "--videocrafter-config",
        help="VideoCrafter YAML the checkpoint was trained with; without it the preset is inferred from shapes",
    )
    p.add_argument("--preset", help="name the preset instead of inferring it (e.g. vc2-t2v-512)")
    p.add_argument("--to", choices=("latentcrafter", "videocrafter"), default="latentcrafter")
    p.add_argument(
        "--frozen-from",
        help="with --to videocrafter: a VideoCrafter checkpoint whose other tensors (VAE, encoders, schedule "
        "buffers) to keep, or a model FOLDER (SD 2.1 layout: vae/, text_encoder/, and image_encoder/ for an "
        "Image2Video file) laid out as VideoCrafter's; the schedule buffers then come from the file's diffusion "
        "settings, and tensors the folder lacks (OpenCLIP's last text block, SD 2.1's missing text_projection, "
        "logit_scale) are zeros that VideoCrafter's outputs never read (the summary lists them)",
    )
    p.add_argument(
        "--extract-encoders",
        metavar="DIR",
        help="also write the checkpoint's VAE, OpenCLIP text (and I2V image) towers as diffusers/transformers "
        "folders in DIR, a model_dir the encode job and trainer load",
    )
    p.add_argument(
        "--tokenizer", help="a CLIP tokenizer folder to copy into DIR/tokenizer (model.ckpt has none)"
    )
    # Sizes the weights do not show; the defaults are the released models' (OpenCLIP ViT-H-14, LDM VAE).
    p.add_argument("--text-heads", type=int, help="text tower attention heads (default: width // 64)")
    p.add_argument("--vision-heads", type=int, help="image tower attention heads (default: 16 for ViT-H)")
    p.add_argument("--vae-norm-groups", type=int, help="VAE GroupNorm groups (default: 32, as LDM)")
    args = p.parse_args(argv)
    try:
        print(convert(args))
    except (ValueError, OSError, NotImplementedError) as e:
        print(f"latentcrafter convert: error: {e}", file=sys.stderr)
        return 2
    return 0


__all__ = [
    "DIFFUSION_DEFAULTS",
    "FORMAT",
    "load_pretrained",
    "main",
    "read_videocrafter",
    "to_latentcrafter",
    "to_videocrafter",
]

if __name__ == "__main__":
    sys.exit(main())
