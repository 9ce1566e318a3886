"""The `tiny` model set: random small models of the real classes, laid out like an SD 2.1 diffusers checkout."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import zlib
from collections import Counter
from pathlib import Path

import torch

# CLIP's pre-tokenizer pattern (as in transformers' CLIPTokenizer and the OpenAI/OpenCLIP simple tokenizer).
CLIP_SPLIT_PATTERN = (
    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""
)
BOS, EOS = "<|startoftext|>", "<|endoftext|>"
MAX_LENGTH = 77
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
TINY_MERGES = 1200  # upper bound on learned merges; the captions decide how many are actually found

# A few captions in the style of the sample datasets, so common words become single tokens.
BUILTIN_CAPTIONS = [
    "a dog runs along the beach at sunset",
    "two cats sleeping on a red sofa",
    "time-lapse of clouds moving over snowy mountains",
    "a woman walking through a busy city street at night",
    "close-up of a hummingbird drinking from a flower",
    "aerial view of a river winding through a green forest",
    "waves crashing against the rocks on a stormy day",
    "a chef slicing vegetables in a small kitchen",
    "children playing football in a park",
    "a red car driving on a mountain road",
    "slow motion of water drops falling into a glass",
    "a cup of coffee on a wooden table in the morning light",
    "fireworks exploding over the harbour",
    "a man riding a bicycle down a country lane",
    "the camera pans across a field of yellow flowers",
    "a cat jumps onto the kitchen counter",
    "a timelapse of the night sky with stars and the milky way",
    "an old man reading a newspaper on a bench",
    "snow falling on a quiet village",
    "a horse galloping across an open field",
    "a bowl of fresh fruit, photo, high quality",
    "abstract colorful shapes rotating slowly",
    "a sailing boat on a calm blue sea",
    "people dancing at a festival with bright lights",
    "a rabbit eating grass in the garden",
    "portrait of a young woman smiling, studio lighting",
    "the sun rising behind a city skyline",
    "a train passing through the countryside",
    "rain drops on a window, blurry background",
    "a painting of a lighthouse at dusk",
]


# The tiny VAE: SD's AutoencoderKL class with 4 latent channels and 8x downsampling, a few thousand
# times cheaper. SD21_VAE_CONFIG is Stable Diffusion 2.1's vae/config.json (benchmarks and tests build
# it with random weights).
TINY_VAE_CONFIG = dict(
    in_channels=3,
    out_channels=3,
    block_out_channels=(8, 16, 32, 32),
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    latent_channels=4,
    layers_per_block=1,
    norm_num_groups=8,
    sample_size=64,
    scaling_factor=0.18215,
)
SD21_VAE_CONFIG = dict(
    block_out_channels=(128, 256, 512, 512),
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    latent_channels=4,
    layers_per_block=2,
    norm_num_groups=32,
    sample_size=768,
    scaling_factor=0.18215,
)


def _seed(seed: int, name: str) -> int:
    """A per-component seed derived from its name (not an index), so adding components changes nothing."""
    return (seed * 1_000_003 + zlib.crc32(name.encode())) % (2**31)


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte -> printable unicode map (the byte-level alphabet, in CLIP's order)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def train_clip_bpe(captions: list[str], *, num_merges: int = TINY_MERGES) -> tuple[dict[str, int], list[str]]:
    """Learn CLIP-style BPE merges over `captions`; returns (vocab, merges) in CLIP's layout.

    Normalization and byte-level pre-tokenization are CLIP's own, done with `tokenizers`; the merge
    loop is the classic one (most frequent pair, ties broken by the pair itself), so the result is
    deterministic (the `tokenizers` trainer breaks ties differently from run to run).
    Layout as the real CLIP vocabulary: the 256 byte symbols, the same 256 with "</w>" (end of word),
    then one token per merge in merge order, then <|startoftext|>, <|endoftext|> (the two highest ids).
    """
    from tokenizers import Regex, normalizers, pre_tokenizers

    normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
    )
    pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(CLIP_SPLIT_PATTERN), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )
    counts: Counter[tuple[str, ...]] = Counter()
    for caption in captions:
        for word, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(caption)):
            counts[(*word[:-1], word[-1] + "</w>")] += 1
    base = list(_bytes_to_unicode().values())
    tokens = base + [b + "</w>" for b in base]
    seen = set(tokens)
    merges: list[str] = []
    words = dict(counts)
    while len(merges) < num_merges:
        pairs: Counter[tuple[str, str]] = Counter()
        for word, n in words.items():
            for pair in zip(word, word[1:]):
                pairs[pair] += n
        if not pairs:
            break
        best = min(pairs, key=lambda p: (-pairs[p], p))
        merges.append(f"{best[0]} {best[1]}")
        if best[0] + best[1] not in seen:  # two merges can spell one token: keep ids contiguous
            tokens.append(best[0] + best[1])
            seen.add(best[0] + best[1])
        words = {_merge(word, best): n for word, n in words.items()}
    tokens += [BOS, EOS]
    return {t: i for i, t in enumerate(tokens)}, merges


def _merge(word: tuple[str, ...], pair: tuple[str, str]) -> tuple[str, ...]:
    out, i = [], 0
    while i < len(word):
        if i + 1 < len(word) and (word[i], word[i + 1]) == pair:
            out.append(word[i] + word[i + 1])
            i += 2
        else:
            out.append(word[i])
            i += 1
    return tuple(out)


def write_clip_tokenizer(out_dir: str, vocab: dict[str, int], merges: list[str]) -> None:
    """Write vocab.json, merges.txt and configs that `CLIPTokenizer.from_pretrained` reads.

    The tiny tokenizer pads with <|endoftext|> (SD 2.1's real one pads with "!", id 0).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False, indent=0) + "\n", encoding="utf-8")
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    special = {"bos_token": BOS, "eos_token": EOS, "pad_token": EOS, "unk_token": EOS}
    (out / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")
    config = {
        **special,
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": MAX_LENGTH,
        "do_lower_case": True,
        "add_prefix_space": False,
        "errors": "replace",
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")


def _save_seeded(build, seed: int, name: str, path: Path) -> torch.nn.Module:
    """Build a module under a seeded RNG (global state restored after) and save it with save_pretrained."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(_seed(seed, name))
        model = build()
    model.save_pretrained(str(path))
    return model


def write_tiny_models(out_dir: str, *, seed: int = 0, captions: list[str] | None = None) -> str:
    """Write random tiny models of the real classes into `out_dir`; deterministic for a seed. Returns out_dir.

    Layout: vae/ text_encoder/ tokenizer/ image_encoder/ unet/ scheduler/ model_index.json.
    """
    import diffusers
    from diffusers import AutoencoderKL, DDIMScheduler
    from transformers import (
        CLIPTextConfig,
        CLIPTextModelWithProjection,
        CLIPVisionConfig,
        CLIPVisionModelWithProjection,
    )

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    vocab, merges = train_clip_bpe(BUILTIN_CAPTIONS + [c for c in (captions or []) if c])
    write_clip_tokenizer(str(out / "tokenizer"), vocab, merges)

    _save_seeded(
        lambda: AutoencoderKL(**TINY_VAE_CONFIG),
        seed,
        "vae",
        out / "vae",
    )
    text_config = CLIPTextConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=MAX_LENGTH,
        projection_dim=32,
        hidden_act="gelu",
        bos_token_id=vocab[BOS],
        eos_token_id=vocab[EOS],
        pad_token_id=vocab[EOS],
    )
    _save_seeded(lambda: CLIPTextModelWithProjection(text_config), seed, "text_encoder", out / "text_encoder")
    vision_config = CLIPVisionConfig(
        image_size=32,
        patch_size=8,
        hidden_size=48,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=2,
        projection_dim=32,
        hidden_act="gelu",
    )
    _save_seeded(
        lambda: CLIPVisionModelWithProjection(vision_config), seed, "image_encoder", out / "image_encoder"
    )
    write_preprocessor_config(str(out / "image_encoder"), image_size=vision_config.image_size)

    DDIMScheduler(  # SD 2.1-base's schedule (epsilon prediction), for a complete checkout layout
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type="epsilon",
    ).save_pretrained(str(out / "scheduler"))

    index = {
        "_class_name": "StableDiffusionPipeline",
        "_diffusers_version": diffusers.__version__,
        "feature_extractor": [None, None],
        "image_encoder": ["transformers", "CLIPVisionModelWithProjection"],
        "requires_safety_checker": False,
        "safety_checker": [None, None],
        "scheduler": ["diffusers", "DDIMScheduler"],
        "text_encoder": ["transformers", "CLIPTextModelWithProjection"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    write_tiny_unet2d(str(out / "unet"), context_dim=text_config.hidden_size, seed=seed)
    index["unet"] = ["diffusers", "UNet2DConditionModel"]
    (out / "model_index.json").write_text(json.dumps(dict(sorted(index.items())), indent=2) + "\n")
    return str(out)


def tiny_unet2d_config(context_dim: int) -> dict:
    """The tiny set's SD 2.1-like UNet2DConditionModel config (the trainer's `tiny` 3D U-Net has these spatial
    layers: tests/trainer/test_inflation.py checks that `unet2d_config_for("tiny")` equals it)."""
    return {
        "sample_size": 32,
        "in_channels": 4,
        "out_channels": 4,
        "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        "mid_block_type": "UNetMidBlock2DCrossAttn",
        "block_out_channels": (32, 64, 64),
        "layers_per_block": 1,
        "attention_head_dim": (4, 8, 8),
        "cross_attention_dim": int(context_dim),
        "transformer_layers_per_block": 1,
        "use_linear_projection": True,
        "norm_num_groups": 8,
        "flip_sin_to_cos": True,
        "freq_shift": 0,
        "act_fn": "silu",
        "norm_eps": 1e-5,
    }


def write_tiny_unet2d(path: str, *, context_dim: int, seed: int = 0) -> None:
    """Random-init a tiny UNet2DConditionModel (seeded) and save_pretrained it to `path`."""
    from diffusers import UNet2DConditionModel

    with torch.random.fork_rng(devices=[]):  # seeded without disturbing the caller's global RNG
        torch.manual_seed(seed)
        model = UNet2DConditionModel(**tiny_unet2d_config(context_dim))
    os.makedirs(path, exist_ok=True)
    model.save_pretrained(path)


def write_preprocessor_config(folder: str, *, image_size: int) -> None:
    """CLIPImageProcessor-style settings (resize shortest side, bicubic, center crop, CLIP mean/std)."""
    config = {
        "image_processor_type": "CLIPImageProcessor",
        "do_resize": True,
        "size": {"shortest_edge": image_size},
        "resample": 3,
        "do_center_crop": True,
        "crop_size": {"height": image_size, "width": image_size},
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": CLIP_MEAN,
        "image_std": CLIP_STD,
        "do_convert_rgb": True,
    }
    Path(folder, "preprocessor_config.json").write_text(json.dumps(config, indent=2) + "\n")


def write_tiny_models_atomic(out_dir: str, *, seed: int = 0) -> str:
    """write_tiny_models into a temporary sibling, then rename: safe when several actors start at once."""
    out = Path(out_dir)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    out.parent.mkdir(parents=True, exist_ok=True)
    write_tiny_models(str(tmp), seed=seed)
    try:
        os.rename(tmp, out)  # replaces an empty folder; fails on a non-empty one
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if not (out / "vae" / "config.json").exists():  # not another actor winning the race
            raise FileExistsError(
                f"{out} exists and is not empty but has no vae/: empty it, or point models.model_dir "
                "elsewhere, for models.tiny to write the tiny set there"
            ) from exc
    return str(out)


def main(argv: list[str] | None = None) -> int:
    """`latentcrafter tiny-models OUT`: write the tiny random model set."""
    parser = argparse.ArgumentParser(
        prog="latentcrafter tiny-models",
        description="Write random tiny models laid out like an SD 2.1 diffusers checkout plus a CLIP "
        "vision folder (vae/ text_encoder/ tokenizer/ image_encoder/ unet/). Runs offline in seconds.",
    )
    parser.add_argument("out", help="output folder")
    parser.add_argument("--seed", type=int, default=0, help="seed for all random weights")
    parser.add_argument(
        "--captions", help="optional text file, one caption per line, added to the BPE training text"
    )
    args = parser.parse_args(argv)
    captions = None
    if args.captions:
        captions = [line.strip() for line in Path(args.captions).read_text().splitlines() if line.strip()]
    out = write_tiny_models(args.out, seed=args.seed, captions=captions)
    print(f"tiny models written to {out}: {', '.join(sorted(p.name for p in Path(out).iterdir()))}")
    return 0
