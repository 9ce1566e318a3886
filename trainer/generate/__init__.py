"""`latentcrafter generate`: T2V/I2V sampling from trained or converted weights, FIFO-Diffusion for long videos."""

from trainer.generate.config import GenerateConfig, prompt_seed, read_prompt_file
from trainer.generate.run import GenerateResult, generate

__all__ = ["GenerateConfig", "GenerateResult", "generate", "prompt_seed", "read_prompt_file"]
