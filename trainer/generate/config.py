"""GenerateConfig: every setting of `latentcrafter generate`, validated; prompt files; per-prompt seeds."""

from __future__ import annotations

import re
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path

DTYPES = ("fp32", "bf16", "fp16")


def prompt_seed(seed: int, index: int) -> int:
    """The seed of prompt `index`: a pure function of (seed, index), so a prompt generated alone (with the
    same --seed and its index given by --first-index) equals the same prompt inside a batch."""
    return (seed * 1_000_003 + zlib.crc32(f"generate:{index}".encode())) % (2**62)


def read_prompt_file(path: str | Path) -> list[str]:
    """One prompt per line (VideoCrafter's prompts/test_prompts.txt). A blank line is an error naming it: a
    silently skipped line would shift every later prompt's index, and with it its seed and file name. The
    file's final newline does not make a blank line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--prompts {path}: no such file (one prompt per line)")
    lines = path.read_text(encoding="utf-8").splitlines()
    for i, line in enumerate(lines, 1):
        if not line.strip():
            raise ValueError(
                f"--prompts {path}: line {i} is blank; remove it (blank lines are errors, not skipped, so "
                "that a prompt's line number stays its index and seed)"
            )
    if not lines:
        raise ValueError(f"--prompts {path}: the file is empty; write one prompt per line")
    return [line.strip() for line in lines]


def parse_size(text: str) -> tuple[int, int]:
    """'512x320' -> (512, 320)."""
    m = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", str(text))
    if not m or int(m.group(1)) < 1 or int(m.group(2)) < 1:
        raise ValueError(f"--size {text!r}: use WIDTHxHEIGHT, e.g. 512x320")
    return int(m.group(1)), int(m.group(2))


@dataclass(kw_only=True)
class GenerateConfig:
    """What `latentcrafter generate` samples and where it writes."""

    weights: str  # our safetensors (convert output or trainer export) or a VideoCrafter model.ckpt
    model_dir: (
        str  # frozen encoders: SD 2.1 layout (vae/, text_encoder/, tokenizer/, image_encoder/) or tiny set
    )
    out: str  # output folder: videos, generate.json, index.html
    prompts: list[str] = field(default_factory=list)  # the prompts, in order (their index seeds them)
    image: str | None = None  # I2V: the conditioning image for every prompt (needs an Image2Video model)
    frames: int = 16  # frames per video; more than the model's trained length runs FIFO-Diffusion
    size: str = "512x320"  # WIDTHxHEIGHT in pixels; both multiples of the VAE and U-Net downsampling
    steps: int | None = None  # DDIM steps (default 50; FIFO-Diffusion uses one step per queue frame)
    cfg: float = 12.0  # classifier-free guidance scale (1 = no guidance, half the U-Net work)
    eta: float = 1.0  # DDIM eta (VideoCrafter's scripts: 1.0); 0 = deterministic given the start noise
    fps: float | None = None  # fps condition and video rate; None = the weights' preset fps (else 8)
    seed: int = 123  # base seed; prompt i uses prompt_seed(seed, first_index + i)
    first_index: int = 0  # index of the first prompt (generate prompt 3 of a list alone: --first-index 3)
    batch_size: int = 1  # prompts per U-Net batch (CFG doubles it)
    dtype: str = "fp32"  # fp32 | bf16 | fp16 for the U-Net and encoders (bf16/fp16 need a GPU)
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    gif: bool = False  # also write a looping GIF per sample
    decode_chunk: int = 4  # frames per VAE decode forward (memory)
    progress: bool = True  # progress bars over prompts and steps
    lora: str | None = None  # LoRA adapter file merged into the weights (trainer.lora.load_adapter)
    lora_scale: float = 1.0  # its multiplier

    def __post_init__(self) -> None:
        if not self.weights:
            raise ValueError(
                "--weights is required: a converted/exported .safetensors or a VideoCrafter model.ckpt"
            )
        if not self.model_dir:
            raise ValueError(
                "--model-dir is required: the frozen encoders' folder (SD 2.1 layout or tiny set)"
            )
        if not self.prompts:
            raise ValueError("no prompts: pass --prompt TEXT (repeatable) or --prompts FILE")
        for i, p in enumerate(self.prompts):
            if not isinstance(p, str) or not p.strip():
                raise ValueError(f"--prompt #{i + 1} is empty; give a caption")
        if self.frames < 1:
            raise ValueError(f"--frames {self.frames}: must be >= 1")
        parse_size(self.size)
        if self.steps is not None and self.steps < 1:
            raise ValueError(f"--steps {self.steps}: must be >= 1")
        if self.cfg < 1.0:
            raise ValueError(f"--cfg {self.cfg}: must be >= 1 (1 disables guidance)")
        if self.eta < 0:
            raise ValueError(f"--eta {self.eta}: must be >= 0")
        if self.fps is not None and not self.fps > 0:
            raise ValueError(f"--fps {self.fps}: must be > 0")
        if self.batch_size < 1:
            raise ValueError(f"--batch-size {self.batch_size}: must be >= 1")
        if self.first_index < 0:
            raise ValueError(f"--first-index {self.first_index}: must be >= 0")
        if self.dtype not in DTYPES:
            raise ValueError(f"--dtype {self.dtype!r}: use one of {', '.join(DTYPES)}")
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", self.device):
            raise ValueError(f"--device {self.device!r}: use auto, cpu, cuda or cuda:N")
        if self.decode_chunk < 1:
            raise ValueError(f"--decode-chunk {self.decode_chunk}: must be >= 1")
        if self.image is not None and not Path(self.image).is_file():
            raise FileNotFoundError(f"--image {self.image}: no such file")
        if not Path(self.weights).is_file():
            raise FileNotFoundError(
                f"--weights {self.weights}: no such file; pass a `latentcrafter convert` output, a trainer "
                "export (<out_dir>/export/<phase>.safetensors) or a VideoCrafter model.ckpt"
            )

    @property
    def width_height(self) -> tuple[int, int]:
        return parse_size(self.size)

    def as_dict(self) -> dict:
        return asdict(self)


__all__ = ["DTYPES", "GenerateConfig", "parse_size", "prompt_seed", "read_prompt_file"]
