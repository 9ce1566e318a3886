"""LoRA phases (`trainable: lora`): adapter injection through peft, state-dict merges, adapter files.

Which layers get an adapter: the module NAMES of `lora.modules` (aliases below, or name suffixes such as
`to_k_ip`), restricted by `lora.targets` with the one spatial/temporal rule of the parameter groups
(trainer.model.groups / trainer.model.temporal.TEMPORAL_MODULE_TYPES: a layer is temporal iff it sits inside
a temporal module). The selected names go to peft as an explicit `target_modules` list; peft wraps each
layer (`<name>.base_layer` holds the frozen weight, `<name>.lora_A.default` / `<name>.lora_B.default` the
adapter), so a LoRA module's state dict uses peft's names. The helpers here turn such a state dict back into
the plain U-Net's names with the adapters merged (W + alpha / rank * B @ A), write the adapter alone, and load
an adapter file into a plain model for inference (`latentcrafter generate --lora FILE --lora-scale S`).
"""

from __future__ import annotations

import json
import os

import torch
from torch import nn

from trainer.config import LORA_TARGETS as TARGETS

ADAPTER = "default"  # peft's adapter name inside the wrapped layers
BASE = ".base_layer."
PEFT_PREFIX = "base_model.model."  # key prefix of peft's adapter_model.safetensors
# modules aliases: attention projections in both model families (ours: diffusers Attention `to_out.0` and the
# temporal attention's plain `to_out`; VideoCrafter's CrossAttention `to_out.0`); the feed-forwards (GEGLU
# input projection and output linear); the transformers' proj_in / proj_out; every convolution.
ALIASES = {
    "attention": ("to_q", "to_k", "to_v", "to_out", "to_out.0"),
    "feedforward": ("ff.net.0.proj", "ff.net.2"),
    "proj": ("proj_in", "proj_out"),
}
CONV = "conv"  # alias: every Conv1d / Conv2d / Conv3d
LAYER_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def temporal_module_names(model: nn.Module) -> set[str]:
    """Names of every module inside (or equal to) a temporal module: the rule of spatial_temporal_parameters."""
    from trainer.model.temporal import TEMPORAL_MODULE_TYPES

    roots = [n for n, m in model.named_modules() if isinstance(m, TEMPORAL_MODULE_TYPES)]
    return {
        name for name, _ in model.named_modules() if any(name == r or name.startswith(r + ".") for r in roots)
    }


def _matches(name: str, module: nn.Module, patterns: list[str]) -> bool:
    for p in patterns:
        if p == CONV:
            if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
                return True
            continue
        for suffix in ALIASES.get(p, (p,)):
            if name == suffix or name.endswith("." + suffix):
                return True
    return False


def select_modules(model: nn.Module, targets: str, modules: list[str]) -> list[str]:
    """The names of the layers (Linear / Conv) that get an adapter, in model order."""
    if targets not in TARGETS:
        raise ValueError(f"lora.targets {targets!r} must be one of {TARGETS}")
    temporal = temporal_module_names(model)
    names = []
    for name, module in model.named_modules():
        if not isinstance(module, LAYER_TYPES) or not _matches(name, module, modules):
            continue
        if (targets == "spatial" and name in temporal) or (targets == "temporal" and name not in temporal):
            continue
        names.append(name)
    if not names:
        raise ValueError(
            f"lora: no Linear/Conv layer of the model matches modules={modules} targets={targets}"
        )
    return names


def scaling(rank: int, alpha: float) -> float:
    return float(alpha) / float(rank)  # peft's LoRA scaling (use_rslora off)


def inject(model: nn.Module, cfg, *, seed: int = 0) -> list[str]:
    """Wrap the selected layers of `model` in peft LoRA layers (in place); only adapter params stay trainable.

    `cfg`: trainer.config.LoraConfig. lora_A's random init comes from `seed` (identical on every rank).
    Returns the wrapped layer names."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import inject_adapter_in_model

    names = select_modules(model, cfg.targets, cfg.modules)
    peft_cfg = PeftLoraConfig(
        r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=names, bias="none"
    )
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        inject_adapter_in_model(peft_cfg, model, adapter_name=ADAPTER)
    finally:
        torch.random.set_rng_state(state)
    wrapped = [n for n, m in model.named_modules() if hasattr(m, "lora_A") and ADAPTER in m.lora_A]
    if wrapped != names:  # peft matches names by suffix: make sure it wrapped exactly our list
        raise RuntimeError(f"peft wrapped {len(wrapped)} layers, expected the {len(names)} selected")
    for n, p in model.named_parameters():
        p.requires_grad_(".lora_A." in n or ".lora_B." in n)
    return names


def is_adapter_key(key: str) -> bool:
    return ".lora_A." in key or ".lora_B." in key


def plain_key(key: str) -> str:
    """`x.to_q.base_layer.weight` -> `x.to_q.weight` (other keys unchanged)."""
    return key.replace(BASE, ".")


def peft_key(key: str, adapted: set[str]) -> str:
    """The inverse for the layers in `adapted`: `x.to_q.weight` -> `x.to_q.base_layer.weight`."""
    layer, _, leaf = key.rpartition(".")
    return f"{layer}{BASE}{leaf}" if layer in adapted else key


def delta(a: torch.Tensor, b: torch.Tensor, shape) -> torch.Tensor:
    """B @ A in the layer's weight shape (Linear, or Conv with a kxk A and a 1x1 B as peft builds them)."""
    return (b.float().flatten(1) @ a.float().flatten(1)).reshape(shape)


def merge_state_dict(state: dict[str, torch.Tensor], scale: float) -> dict[str, torch.Tensor]:
    """A peft-named state dict (base_layer + lora_A/B) -> the plain names with W + scale * B @ A merged.

    Plain keys also present (e.g. an EMA shadow's entries from an earlier full phase) are overwritten by the
    merged value; adapter keys are dropped. Values are fp32."""
    out = {k: v.float() for k, v in state.items() if BASE not in k and not is_adapter_key(k)}
    for key, value in state.items():
        if BASE not in key:
            continue
        layer, leaf = key.split(BASE)
        merged = value.float().clone()
        a = state.get(f"{layer}.lora_A.{ADAPTER}.{leaf}")
        if leaf == "weight" and a is not None:
            b = state[f"{layer}.lora_B.{ADAPTER}.{leaf}"]
            merged += scale * delta(a, b, merged.shape)
        out[f"{layer}.{leaf}"] = merged
    return out


def adapter_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The adapters of a peft-named state dict under peft's file names (`base_model.model.<layer>.lora_A.weight`)."""
    return {
        PEFT_PREFIX + k.replace(f".{ADAPTER}.", "."): v.float().contiguous()
        for k, v in state.items()
        if is_adapter_key(k)
    }


def adapter_metadata(cfg, target_modules: list[str], **extra) -> dict[str, str]:
    return {
        "format": "latentcrafter-lora",
        "rank": str(cfg.rank),
        "alpha": str(cfg.alpha),
        "dropout": str(cfg.dropout),
        "targets": cfg.targets,
        "modules": json.dumps(list(cfg.modules)),
        "target_modules": json.dumps(list(target_modules)),
        **{k: str(v) for k, v in extra.items()},
    }


def read_adapter(path: str) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, str]]:
    """An adapter file -> ({layer: {"A": .., "B": ..}}, metadata). Reads our files and peft's key layout."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(path, "pt") as f:
        meta = dict(f.metadata() or {})
    layers: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in load_file(path).items():
        key = key.removeprefix(PEFT_PREFIX)
        for part in ("A", "B"):
            for tail in (f".lora_{part}.weight", f".lora_{part}.{ADAPTER}.weight"):
                if key.endswith(tail):
                    layers.setdefault(key[: -len(tail)], {})[part] = value
    if not layers or any(set(v) != {"A", "B"} for v in layers.values()):
        raise ValueError(f"{path}: not a LoRA adapter file (lora_A / lora_B weight pairs)")
    return layers, meta


def adapter_scale(meta: dict, layers: dict, scale: float) -> float:
    rank = int(meta.get("rank") or next(iter(layers.values()))["A"].shape[0])
    alpha = float(meta.get("alpha", rank))
    return scale * scaling(rank, alpha)


def merge(
    state: dict[str, torch.Tensor], adapter: str, scale: float = 1.0, *, strict: bool = True
) -> dict[str, torch.Tensor]:
    """Plain weights + scale * alpha / rank * B @ A of the adapter file `adapter` (a new dict, fp32 for the
    adapted layers). strict: every adapted layer must exist in `state`."""
    layers, meta = read_adapter(adapter)
    s = adapter_scale(meta, layers, scale)
    out = dict(state)
    for layer, ab in layers.items():
        key = f"{layer}.weight"
        if key not in out:
            if strict:
                raise KeyError(f"{adapter}: layer {layer} is not in the model")
            continue
        w = out[key]
        out[key] = (w.float() + s * delta(ab["A"], ab["B"], w.shape)).to(w.dtype)
    return out


@torch.no_grad()
def load_adapter(model: nn.Module, path: str, scale: float = 1.0) -> int:
    """Merge the adapter file into a plain (un-injected) model's weights in place; returns the layers changed.

    What `latentcrafter generate --lora FILE --lora-scale S` does: the model then runs at its usual speed."""
    layers, meta = read_adapter(path)
    s = adapter_scale(meta, layers, scale)
    modules = dict(model.named_modules())
    for layer, ab in layers.items():
        m = modules.get(layer)
        if m is None or not isinstance(getattr(m, "weight", None), torch.Tensor):
            raise KeyError(f"{path}: layer {layer} is not a weighted layer of the model")
        m.weight.add_(
            (s * delta(ab["A"], ab["B"], m.weight.shape)).to(device=m.weight.device, dtype=m.weight.dtype)
        )
    return len(layers)


def write_adapter(path: str, state: dict[str, torch.Tensor], metadata: dict[str, str]) -> str:
    """Write the adapters of a peft-named state dict as safetensors (atomically)."""
    from trainer.checkpoint import export_safetensors

    adapters = adapter_state_dict(state)
    if not adapters:
        raise ValueError(f"{path}: no adapter tensors to write")
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    return export_safetensors(adapters, path, metadata)


def fingerprint(state: dict[str, torch.Tensor]) -> str:
    """A cheap identity of a set of base weights (names, shapes, float64 sums): checked on a LoRA resume."""
    import hashlib

    h = hashlib.sha256()
    for k in sorted(state):
        v = state[k]
        h.update(
            f"{k}:{tuple(v.shape)}:{float(v.double().sum()):.17g}:{float(v.double().abs().sum()):.17g};".encode()
        )
    return h.hexdigest()[:16]
