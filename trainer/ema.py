"""EMA of the trainable weights: an fp32 copy per parameter name, updated after every optimizer step on every rank."""

from __future__ import annotations

import contextlib

import torch
from torch import nn


def gathered(params: list[nn.Parameter], zero_stage: int):
    """Context in which ZeRO-3 partitioned params hold their full data (all ranks must enter); no-op otherwise."""
    if zero_stage == 3:
        import deepspeed

        return deepspeed.zero.GatheredParameters(params, modifier_rank=None)
    return contextlib.nullcontext()


def full_param_data(module: nn.Module, zero_stage: int) -> dict[str, torch.Tensor]:
    """Every parameter of `module` as a full fp32 CPU tensor (collective under ZeRO-3)."""
    out = {}
    for name, p in module.named_parameters():
        with gathered([p], zero_stage):
            out[name] = p.detach().float().cpu().clone()
    return out


class EMA:
    """shadow = decay * shadow + (1 - decay) * param for the trainable params; frozen ones track the live value.

    Every rank holds the same full shadow (ZeRO-1/2 ranks have the full module; under ZeRO-3 each
    update gathers the parameters). Warmup as in LDM: decay is min(decay, (1 + n) / (10 + n)).
    """

    def __init__(self, decay: float):
        self.decay = decay
        self.updates = 0
        self.shadow: dict[str, torch.Tensor] = {}

    def start_phase(self, module: nn.Module, zero_stage: int, frozen: dict | None = None) -> None:
        """At a phase start: add missing names and reset frozen params to their (fp32) value: they do not train."""
        frozen = frozen or {}
        for name, p in module.named_parameters():
            if name in frozen:
                self.shadow[name] = frozen[name].float().clone()
            elif name not in self.shadow or not p.requires_grad:
                with gathered([p], zero_stage):
                    self.shadow[name] = p.detach().float().cpu().clone()

    @torch.no_grad()
    def update(self, module: nn.Module, zero_stage: int) -> None:
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        for name, p in module.named_parameters():
            if not p.requires_grad:
                continue
            with gathered([p], zero_stage):
                self.shadow[name].lerp_(p.detach().float().cpu(), 1.0 - decay)
        self.updates += 1

    def state_dict(self) -> dict:
        return {"decay": self.decay, "updates": self.updates, "shadow": self.shadow}

    def load_state_dict(self, state: dict) -> None:
        self.updates = int(state["updates"])
        self.shadow = {k: v.float().clone() for k, v in state["shadow"].items()}
