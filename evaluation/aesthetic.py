"""The LAION aesthetic predictor: a linear head (768 -> 1) on L2-normalised CLIP ViT-L/14 image embeddings."""

from __future__ import annotations

from pathlib import Path

import torch


def load_linear_head(path: str | Path) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight [1,D], bias [1]) from a safetensors file or a torch state dict (torch.load weights_only=True).

    Keys `weight` and `bias` (LAION's sa_0_4_vit_l_14_linear.pth), optionally under one prefix.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"{path}: no such file; set --aesthetic to the LAION linear head (.pth/.safetensors)"
        )
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path))
    else:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
        state = state.get("state_dict", state) if isinstance(state, dict) else state
    if not isinstance(state, dict):
        raise ValueError(f"{path}: not a state dict; --aesthetic needs a dict with `weight` and `bias`")
    weights = [k for k in state if k == "weight" or k.endswith(".weight")]
    biases = [k for k in state if k == "bias" or k.endswith(".bias")]
    if len(weights) != 1 or len(biases) != 1:
        raise ValueError(
            f"{path}: expected one linear layer (`weight` [1,768], `bias` [1]), found keys {sorted(state)[:8]}; "
            "only the linear LAION head is supported by --aesthetic (not the MLP variant)"
        )
    weight, bias = state[weights[0]].float(), state[biases[0]].float().reshape(-1)
    if weight.ndim == 1:
        weight = weight[None]
    if weight.ndim != 2 or weight.shape[0] != 1 or bias.numel() != 1:
        raise ValueError(
            f"{path}: weight {list(weight.shape)} / bias {list(bias.shape)} is not a D -> 1 linear head"
        )
    return weight, bias


class AestheticScorer:
    """Mean over frames of head(normalised CLIP image embedding)."""

    def __init__(self, head: str | Path, clip_dir: str | Path, *, device: str = "cpu"):
        from evaluation.clip import ClipEmbedder

        self.weight, self.bias = load_linear_head(head)
        self.clip = ClipEmbedder(clip_dir, device=device, image_only=True, option="--aesthetic-clip")
        probe = self.clip.embed_images(torch.zeros(1, 8, 8, 3, dtype=torch.uint8).numpy())
        if probe.shape[-1] != self.weight.shape[1]:
            raise ValueError(
                f"{head}: the head takes {self.weight.shape[1]}-d embeddings but {clip_dir} gives "
                f"{probe.shape[-1]}-d ones; set --aesthetic-clip to CLIP ViT-L/14 (768-d)"
            )

    def frame_scores(self, frames) -> torch.Tensor:
        emb = self.clip.embed_images(frames)  # unit-norm, as the LAION predictor was trained
        return emb @ self.weight.T.reshape(-1) + self.bias

    def score(self, frames) -> float:
        return float(self.frame_scores(frames).mean())
