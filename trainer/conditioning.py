"""Frozen encoders run by the trainer for shards that store captions or conditioning frames (storage profiles)."""

from __future__ import annotations

import time

import numpy as np
import torch


class OnTheFlyEncoders:
    """The text and/or image encoder the run's storage profiles need, on the trainer's device, inference mode.

    text=caption shards: the captions of a batch go through the frozen text encoder in one call; image=frame
    shards: the conditioning frames (already at the image encoder's input size) through the image encoder.
    Samples that carry tokens keep them (a mixed batch, LoaderConfig.mixed_profiles). Nothing is cached:
    a caption costs one text-encoder row each time it is drawn. `seconds` is the time spent here.
    """

    def __init__(self, model, *, text: bool, image: bool, device: torch.device):
        from encoders.models import FrozenEncoders, ModelsConfig

        dev = torch.device(device)
        self.config = ModelsConfig(
            model_dir=model.model_dir,
            device=str(dev) if dev.type == "cuda" else "cpu",
            dtype="fp16" if dev.type == "cuda" else "fp32",  # the precision the shards' tokens are stored in
            vae=False,
            text_encoder=text,
            image_tokens=image,
        )
        self.encoders = FrozenEncoders(self.config)
        self.device = dev
        self.seconds = 0.0

    @property
    def ids(self) -> dict:
        return self.encoders.ids

    def check_shards(self, infos) -> None:
        """The shards' text encoder must be this one when the trainer encodes their captions."""
        if self.encoders.text_encoder is None:
            return
        mine = self.encoders.ids["text_encoder_id"]
        for info in infos:
            if info.profile.text == "caption" and info.text_encoder_id not in (None, mine):
                raise ValueError(
                    f"{info.url}: encoded with text encoder {info.text_encoder_id!r}, but the trainer would "
                    f"encode its captions with {mine!r} (model.model_dir); point model.model_dir at the "
                    "encoders the shards were written with"
                )

    def text_tokens(self, batch: dict) -> torch.Tensor:
        """[B, 77, D] float32 on the device: stored tokens where a sample has them, else its caption's."""
        if "text_tokens" in batch:
            return batch["text_tokens"].to(self.device)
        rows = batch["text_tokens_list"]
        todo = [i for i, t in enumerate(rows) if t is None]
        if todo and self.encoders.text_encoder is None:
            raise RuntimeError("a batch has captions without tokens but the text encoder was not loaded")
        start = time.perf_counter()
        computed = self.encoders.encode_text([batch["captions"][i] for i in todo])["tokens"] if todo else []
        self.seconds += time.perf_counter() - start
        out = list(rows)
        for j, i in enumerate(todo):
            out[i] = torch.from_numpy(np.asarray(computed[j])).float()
        return torch.stack(out).to(self.device)

    def image_tokens(self, batch: dict) -> torch.Tensor | None:
        """[B, L, Dv] float32 on the device (stored tokens, or the conditioning frames' tokens); None when the
        batch has no image condition."""
        if "image_tokens" in batch:
            return batch["image_tokens"].to(self.device)
        rows = batch.get("image_cond_list")
        if rows is None:
            return None
        frames = [i for i, r in enumerate(rows) if r is not None and r.dtype == torch.uint8]
        if any(r is None for r in rows):
            raise ValueError(
                f"samples {[batch['keys'][i] for i, r in enumerate(rows) if r is None]} have no image condition"
            )
        if frames and self.encoders.image_encoder is None:
            raise RuntimeError("a batch has conditioning frames but the image encoder was not loaded")
        start = time.perf_counter()
        tokens = (
            self.encoders.encode_images(np.stack([rows[i].numpy() for i in frames]))["tokens"]
            if frames
            else []
        )
        self.seconds += time.perf_counter() - start
        out = [r.float() if r.dtype != torch.uint8 else None for r in rows]
        for j, i in enumerate(frames):
            out[i] = torch.from_numpy(np.asarray(tokens[j])).float()
        return torch.stack(out).to(self.device)
