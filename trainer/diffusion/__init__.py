"""Diffusion objective (schedule, q_sample, loss with CFG dropout), DDIM sampling and preview writers."""

from trainer.diffusion.ddim import DDIMSampler
from trainer.diffusion.preview import decode_to_frames, write_gif, write_mp4
from trainer.diffusion.schedule import Diffusion, SignalScale, linear_betas, rescale_zero_terminal_snr

__all__ = [
    "DDIMSampler",
    "Diffusion",
    "SignalScale",
    "decode_to_frames",
    "linear_betas",
    "rescale_zero_terminal_snr",
    "write_gif",
    "write_mp4",
]
