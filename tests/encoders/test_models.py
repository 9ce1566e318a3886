"""Frozen encoders: the tiny set, an SD 2.1-laid-out folder of real classes, full-size configs, validation."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from encoders.models import FrozenEncoders, ModelsConfig, main, write_tiny_models
from encoders.tiny import BOS, EOS, SD21_VAE_CONFIG, train_clip_bpe, write_clip_tokenizer

SD21_TEXT_CONFIG = dict(  # stabilityai/stable-diffusion-2-1 text_encoder/config.json
    hidden_size=1024,
    intermediate_size=4096,
    num_attention_heads=16,
    num_hidden_layers=23,
    max_position_embeddings=77,
    vocab_size=49408,
    hidden_act="gelu",
    projection_dim=512,
    bos_token_id=0,
    eos_token_id=2,  # legacy value in the real config: pooling then takes the highest id (<|endoftext|>)
    pad_token_id=1,
)


def _digest(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def _frames(n: int, h: int, w: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, h, w, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return Path(write_tiny_models(str(tmp_path_factory.mktemp("tiny")), seed=0))


@pytest.fixture(scope="module")
def encoders(tiny_dir) -> FrozenEncoders:
    return FrozenEncoders(ModelsConfig(model_dir=str(tiny_dir), frame_batch_size=3))


def _write_sd21_tokenizer(folder: Path) -> dict[str, int]:
    """Tokenizer files as SD 2.1 ships them (pads with "!", id 0), over a small learned vocabulary."""
    vocab, merges = train_clip_bpe(["a red car on a road", "a dog on the beach"] * 3)
    write_clip_tokenizer(str(folder), vocab, merges)
    cfg = json.loads((folder / "tokenizer_config.json").read_text())
    cfg["pad_token"] = "!"
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg))
    special = json.loads((folder / "special_tokens_map.json").read_text())
    (folder / "special_tokens_map.json").write_text(json.dumps({**special, "pad_token": "!"}))
    return vocab


def test_tiny_layout_matches_a_diffusers_checkout(tiny_dir):
    index = json.loads((tiny_dir / "model_index.json").read_text())
    assert index["vae"] == ["diffusers", "AutoencoderKL"]
    assert index["text_encoder"] == ["transformers", "CLIPTextModelWithProjection"]
    assert index["tokenizer"] == ["transformers", "CLIPTokenizer"]
    for sub in ("vae", "text_encoder", "image_encoder", "scheduler", "unet"):
        assert (tiny_dir / sub).is_dir(), sub
    vae = json.loads((tiny_dir / "vae/config.json").read_text())
    assert vae["block_out_channels"] == [8, 16, 32, 32] and vae["scaling_factor"] == 0.18215
    text = json.loads((tiny_dir / "text_encoder/config.json").read_text())
    assert (text["hidden_size"], text["num_hidden_layers"], text["projection_dim"]) == (32, 2, 32)
    assert {"vocab.json", "merges.txt", "tokenizer_config.json"} <= {
        p.name for p in (tiny_dir / "tokenizer").iterdir()
    }
    prep = json.loads((tiny_dir / "image_encoder/preprocessor_config.json").read_text())
    assert prep["crop_size"] == {"height": 32, "width": 32}


@pytest.mark.parametrize("cls_name", ["CLIPTokenizer", "CLIPTokenizerFast"])
def test_tiny_tokenizer_loads_like_the_real_one(tiny_dir, cls_name):
    import transformers

    tok = getattr(transformers, cls_name).from_pretrained(str(tiny_dir / "tokenizer"), local_files_only=True)
    vocab = json.loads((tiny_dir / "tokenizer/vocab.json").read_text())
    assert vocab[BOS] == len(vocab) - 2 and vocab[EOS] == len(vocab) - 1  # CLIP's layout: specials last
    assert "the</w>" in vocab and "beach</w>" in vocab  # merges were learned from the captions
    ids = tok(["a dog on the beach", "word " * 200], padding="max_length", max_length=77, truncation=True)
    short, long_ = ids["input_ids"]
    assert len(short) == len(long_) == 77 == tok.model_max_length
    assert short[0] == tok.bos_token_id == vocab[BOS]
    words = tok.convert_ids_to_tokens(short[1:6])
    assert words == ["a</w>", "dog</w>", "on</w>", "the</w>", "beach</w>"]
    assert short[6] == vocab[EOS] and set(short[7:]) == {vocab[EOS]}  # tiny pads with <|endoftext|>
    assert long_[0] == vocab[BOS] and long_[-1] == vocab[EOS]  # truncated, EOS kept
    assert tok.decode(short, skip_special_tokens=True) == "a dog on the beach"


def test_tiny_models_are_deterministic_for_a_seed(tiny_dir, tmp_path):
    again = Path(write_tiny_models(str(tmp_path / "again"), seed=0))
    assert _digest(again) == _digest(tiny_dir)
    other = _digest(Path(write_tiny_models(str(tmp_path / "other"), seed=1)))
    assert other["vae/config.json"] == _digest(tiny_dir)["vae/config.json"]
    assert (
        other["vae/diffusion_pytorch_model.safetensors"]
        != _digest(tiny_dir)["vae/diffusion_pytorch_model.safetensors"]
    )


def test_tiny_encoders_give_contract_shapes(encoders):
    frames = _frames(7, 32, 48)
    before = encoders.stats["vae_forwards"]
    mean, std = encoders.encode_frames(frames)
    assert mean.shape == std.shape == (7, 4, 4, 6) and mean.dtype == std.dtype == np.float16
    assert encoders.stats["vae_forwards"] - before == 3  # ceil(7 / frame_batch_size=3)
    assert (std > 0).all() and np.isfinite(mean).all()
    again, _ = encoders.encode_frames(frames[2:3])
    np.testing.assert_allclose(again[0], mean[2], atol=2e-3)  # batching does not mix frames

    text = encoders.encode_text(["a dog on the beach", "", "dog " * 100])
    assert text["tokens"].shape == (3, 77, 32) and text["tokens"].dtype == np.float16
    assert text["pooled"].shape == (3, 32)
    assert text["num_tokens"].tolist() == [7, 2, 102] and text["num_tokens"].dtype == np.int32

    images = encoders.encode_images(_frames(2, 40, 70))  # any size: resized and center-cropped
    assert images["tokens"].shape == (2, 17, 48) and images["pooled"].shape == (2, 32)
    small = encoders.encode_images(_frames(1, 12, 20))  # upscaled
    assert small["tokens"].shape == (1, 17, 48)

    score = encoders.clip_score(text["pooled"][:2], images["pooled"])
    assert score.shape == (2,) and score.dtype == np.float32 and (np.abs(score) <= 1.0001).all()
    decoded = encoders.decode_latents(torch.from_numpy(mean[:2]).float() * encoders.scale_factor)
    assert decoded.shape == (2, 32, 48, 3) and decoded.dtype == np.uint8


def test_clip_preprocessing_resizes_crops_and_normalizes(tiny_dir):
    encoders = FrozenEncoders(ModelsConfig(model_dir=str(tiny_dir), image_preprocess="clip"))
    image = np.zeros((1, 40, 80, 3), dtype=np.uint8)
    image[:, :, 20:60] = 200  # the center half of a wide image: all that survives the center crop
    x = encoders.preprocess_images(image)
    assert tuple(x.shape) == (1, 3, 32, 32)
    expected = (200 / 255 - torch.tensor([0.48145466, 0.4578275, 0.40821073])) / torch.tensor(
        [0.26862954, 0.26130258, 0.27577711]
    )
    center = x[0, :, :, 4:-4].mean(dim=(1, 2))
    torch.testing.assert_close(center, expected, atol=1e-3, rtol=0)


def test_ids_are_stable_and_name_the_folder(tiny_dir, encoders):
    same = FrozenEncoders(ModelsConfig(model_dir=str(tiny_dir), image_tokens=False))
    assert same.ids["vae_id"] == encoders.ids["vae_id"]
    assert same.ids["text_encoder_id"] == encoders.ids["text_encoder_id"]
    assert encoders.ids["vae_id"].startswith(f"{tiny_dir.name}/vae@")
    assert same.ids["image_encoder_id"] == "" and same.image_encoder is None and not same.has_clip_score
    digest = hashlib.sha256((tiny_dir / "vae/config.json").read_bytes()).hexdigest()[:12]
    assert encoders.ids["vae_id"].endswith(digest)
    assert (encoders.text_dim, encoders.image_token_dim, encoders.latent_channels) == (32, 48, 4)


def test_config_validation_names_the_option(tmp_path):
    with pytest.raises(ValueError, match="models.dtype"):
        ModelsConfig(model_dir="m", dtype="fp8")
    with pytest.raises(ValueError, match="models.dtype"):
        ModelsConfig(model_dir="m", dtype="fp16", device="cpu")
    with pytest.raises(ValueError, match="models.device"):
        ModelsConfig(model_dir="m", device="tpu")
    with pytest.raises(ValueError, match="models.frame_batch_size"):
        ModelsConfig(model_dir="m", frame_batch_size=0)
    auto_half = ModelsConfig(model_dir="m", dtype="bf16")
    if torch.cuda.is_available():
        assert auto_half.resolved_device() == "cuda"
    else:
        with pytest.raises(ValueError, match="models.dtype"):
            auto_half.resolved_device()
    with pytest.raises(FileNotFoundError, match="models.tiny"):
        FrozenEncoders(ModelsConfig(model_dir=str(tmp_path / "missing")))


def test_tiny_true_builds_a_missing_folder_and_cli_writes_one(tmp_path, capsys):
    enc = FrozenEncoders(ModelsConfig(model_dir=str(tmp_path / "auto"), tiny=True))
    assert (tmp_path / "auto/model_index.json").is_file() and enc.image_token_dim == 48
    assert not list(tmp_path.glob(".auto.tmp-*"))  # written aside, then renamed
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy/notes.txt").write_text("not a model")
    with pytest.raises(FileExistsError, match="models.model_dir"):
        FrozenEncoders(ModelsConfig(model_dir=str(tmp_path / "busy"), tiny=True))
    assert not list(tmp_path.glob(".busy.tmp-*"))
    assert main([str(tmp_path / "cli"), "--seed", "0"]) == 0
    assert _digest(tmp_path / "cli") == _digest(tmp_path / "auto")
    assert "tiny models written" in capsys.readouterr().out


def test_sd21_layout_with_real_classes_loads_through_the_same_path(tmp_path):
    """vae/ text_encoder/ (CLIPTextModel, no projection) tokenizer/ + a separate CLIP vision folder."""
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPVisionConfig, CLIPVisionModelWithProjection

    root = tmp_path / "stable-diffusion-2-1"
    vocab = _write_sd21_tokenizer(root / "tokenizer")
    torch.manual_seed(0)
    small_vae = {**SD21_VAE_CONFIG, "block_out_channels": (8, 8, 16, 16), "norm_num_groups": 4}
    AutoencoderKL(**small_vae).save_pretrained(str(root / "vae"))
    text_cfg = {**SD21_TEXT_CONFIG, "hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4}
    text_cfg.update(num_hidden_layers=3, vocab_size=len(vocab))
    CLIPTextModel(CLIPTextConfig(**text_cfg)).save_pretrained(str(root / "text_encoder"))
    vision = CLIPVisionConfig(
        image_size=28, patch_size=14, hidden_size=40, intermediate_size=80, num_hidden_layers=2,
        num_attention_heads=2, projection_dim=24,
    )  # fmt: skip
    CLIPVisionModelWithProjection(vision).save_pretrained(str(tmp_path / "CLIP-ViT-H-14"))

    enc = FrozenEncoders(ModelsConfig(model_dir=str(root), image_encoder_dir=str(tmp_path / "CLIP-ViT-H-14")))
    assert type(enc.text_encoder).__name__ == "CLIPTextModel" and not enc.text_has_projection
    assert enc.tokenizer.pad_token_id == vocab["!"] == 0  # SD 2.1 pads with "!"
    text = enc.encode_text(["a red car on a road"])
    assert text["tokens"].shape == (1, 77, 64) and text["pooled"].shape == (1, 64)
    eos = text["num_tokens"][0] - 1  # pooled = the EOS token's state (no projection in SD 2.1)
    np.testing.assert_allclose(text["pooled"][0], text["tokens"][0, eos], atol=1e-3)
    images = enc.encode_images(_frames(2, 30, 50))
    assert images["tokens"].shape == (2, 5, 40) and images["pooled"].shape == (2, 24)  # (28/14)^2 + 1
    assert enc.ids["image_encoder_id"].endswith("/CLIP-ViT-H-14@" + enc.ids["image_encoder_id"][-12:])
    assert enc.encode_frames(_frames(1, 16, 16))[0].shape == (1, 4, 2, 2)
    with pytest.raises(ValueError, match="models.model_dir"):
        enc.clip_score(text["pooled"], images["pooled"][:1])


@pytest.mark.slow
def test_full_size_sd21_text_encoder_and_vae(tmp_path):
    """The real SD 2.1 configs (random weights): text tokens [77, 1024]; a 64x64 frame -> latent [4, 8, 8]."""
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModel

    root = tmp_path / "sd21"
    _write_sd21_tokenizer(root / "tokenizer")
    torch.manual_seed(0)
    CLIPTextModel(CLIPTextConfig(**SD21_TEXT_CONFIG)).save_pretrained(str(root / "text_encoder"))
    AutoencoderKL(**SD21_VAE_CONFIG).save_pretrained(str(root / "vae"))

    enc = FrozenEncoders(ModelsConfig(model_dir=str(root), image_tokens=False))
    assert sum(p.numel() for p in enc.text_encoder.parameters()) > 300e6
    text = enc.encode_text(["a dog on the beach"])
    assert text["tokens"].shape == (1, 77, 1024) and text["pooled"].shape == (1, 1024)
    assert np.isfinite(text["tokens"]).all()
    mean, std = enc.encode_frames(_frames(1, 64, 64))
    assert mean.shape == std.shape == (1, 4, 8, 8) and np.isfinite(mean).all() and (std > 0).all()
    assert enc.scale_factor == pytest.approx(0.18215)
