"""Frozen encoders for the trainer (empty caption, fixed preview prompts) and DDIM preview samples written as mp4/GIF."""

from __future__ import annotations

import os
import zlib

import torch

from trainer.config import PreviewConfig, TrainConfig


class TextConditions:
    """The empty caption's tokens (CFG dropout target) and the preview prompts' tokens, from the frozen text encoder.

    The same text encoder the encode job used (model.model_dir/text_encoder), so the tokens match the shards'.
    Rank 0 also keeps the VAE for decoding previews; the other ranks drop the encoders after encoding.
    """

    def __init__(self, config: TrainConfig, *, keep_vae: bool):
        from encoders.models import FrozenEncoders, ModelsConfig

        preset = config.model.videocrafter_preset
        i2v = preset is not None and preset.image_to_video
        enc = FrozenEncoders(ModelsConfig(model_dir=config.model.model_dir, image_tokens=i2v, device="cpu"))
        self.ids = enc.ids
        self.scale_factor = enc.scale_factor
        self.uncond = torch.from_numpy(enc.encode_text([""])["tokens"]).float()  # [1,77,D]
        self.prompts = list(config.preview.prompts)
        self.prompt_tokens = torch.from_numpy(enc.encode_text(self.prompts)["tokens"]).float()
        self.downsample = enc.downsample
        self.latent_channels = enc.latent_channels
        self.vae = enc.vae if keep_vae else None
        # VideoCrafter I2V: the unconditional image is the mid-grey image's CLIP tokens (not zeros): the
        # target of image dropout and the previews' image condition
        self.null_image = torch.from_numpy(enc.null_image_tokens()).float() if i2v else None  # [1,L,Dv]

    @property
    def dim(self) -> int:
        return int(self.uncond.shape[-1])


class PreviewWriter:
    """Rank 0: copies the current (or EMA) weights into its own fp32 U-Net and samples the fixed prompts."""

    def __init__(self, config: TrainConfig, text: TextConditions, build_module, out_dir: str):
        self.config: PreviewConfig = config.preview
        self.text = text
        self.module = build_module().float().eval()
        self.out_dir = out_dir
        self.model_dir = config.model.model_dir
        self._clip = None  # evaluation's CLIP for the preview metrics, loaded on first use (False: none)
        from trainer.diffusion import DDIMSampler, Diffusion

        diffusion = Diffusion(prediction=config.model.prediction, **config.model.signal_scale())
        self.sampler = DDIMSampler(diffusion, self.config.ddim_steps)

    @torch.no_grad()
    def write(
        self, weights: dict[str, torch.Tensor], *, stage: str, tag: str, logger=None, step: int = 0
    ) -> list[str]:
        from shards.format import parse_resolution
        from trainer.diffusion import decode_to_frames, write_gif, write_mp4

        self.module.load_state_dict(weights, strict=True)
        cfg, text = self.config, self.text
        width, height = parse_resolution(cfg.resolution or stage)
        n = len(text.prompts)
        shape = (n, text.latent_channels, cfg.num_frames, height // text.downsample, width // text.downsample)
        fps = torch.full((n,), float(cfg.fps))
        g = torch.Generator().manual_seed(cfg.seed)
        cond, uncond = {"context": text.prompt_tokens, "fps": fps}, {"context": text.uncond}
        if text.null_image is not None:  # an I2V model's previews: text only, the image left unconditional
            cond["image_context"] = uncond["image_context"] = text.null_image.expand(n, -1, -1)
        latents = self.sampler.sample(
            self.module,
            shape,
            cond,
            uncond,
            cfg.guidance_scale,
            generator=g,
        )
        frames = decode_to_frames(text.vae, latents, text.scale_factor)  # [N,T,H,W,3] uint8
        os.makedirs(self.out_dir, exist_ok=True)
        paths = []
        for i, prompt in enumerate(text.prompts):
            slug = f"p{i}-{zlib.crc32(prompt.encode()) % 10000:04d}"
            for fmt in cfg.formats:
                path = os.path.join(self.out_dir, f"{tag}-{slug}.{fmt}")
                tmp = f"{path[: -len(fmt) - 1]}.tmp.{fmt}"
                (write_mp4 if fmt == "mp4" else write_gif)(frames[i], tmp, cfg.fps)
                os.replace(tmp, path)
                paths.append(path)
            if logger is not None:
                logger.add_video(f"preview/{slug}", frames[i], step, cfg.fps)
                self._log_metrics(logger, frames[i], prompt, slug, step)
        return paths

    def _log_metrics(self, logger, frames, prompt: str, slug: str, step: int) -> None:
        """evaluation.preview_metrics to tensorboard: motion always; CLIPSIM and CLIP-Temp when
        model.model_dir's text_encoder projects into its image_encoder's space (the tiny set; not SD 2.1)."""
        try:
            from evaluation import load_preview_clip, preview_metrics

            if self._clip is None:
                self._clip = False  # a failed load is not retried at every preview
                self._clip = load_preview_clip(self.model_dir) or False
            for key, value in preview_metrics(frames, prompt, self._clip or None).items():
                logger.add_scalar(f"preview_metrics/{key}/{slug}", value, step)
        except Exception as exc:  # a metric never breaks training
            logger.message(f"warning: preview metrics for {slug} failed ({type(exc).__name__}: {exc})")
