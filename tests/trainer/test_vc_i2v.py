"""VideoCrafter Image2Video in the trainer: the mid-grey unconditional image in image dropout and in previews."""

from __future__ import annotations

import numpy as np
import torch

from tests.trainer.conftest import run_config, write_config


class Recorder(torch.nn.Module):
    """Stands in for the U-Net to see what the loss feeds it; returns zeros of the right shape."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: list[torch.Tensor] = []

    def forward(self, x, t, context, fps=None, image_context=None):
        self.seen.append(image_context)
        return torch.zeros_like(x)


def test_image_dropout_feeds_the_null_image_not_zeros() -> None:
    from trainer.diffusion import Diffusion

    d = Diffusion(use_scale=True)
    x0 = torch.randn(3, 4, 2, 4, 4)
    image, null = torch.randn(3, 17, 48), torch.randn(1, 17, 48)
    cond = {"context": torch.randn(3, 77, 32), "image_context": image, "uncond_image_context": null}
    for p, want in ((1.0, null.expand(3, -1, -1)), (0.0, image)):
        model = Recorder()
        d.training_loss(
            model, x0, cond, generator=torch.Generator().manual_seed(0), cfg_dropout=0, image_cfg_dropout=p
        )
        assert torch.equal(model.seen[0], want)
    model = Recorder()  # without a null image (latentcrafter's own I2V): zeros, as before
    cond.pop("uncond_image_context")
    d.training_loss(
        model, x0, cond, generator=torch.Generator().manual_seed(0), cfg_dropout=0, image_cfg_dropout=1.0
    )
    assert torch.equal(model.seen[0], torch.zeros_like(image))


def test_i2v_preset_previews_with_the_mid_grey_image(tmp_path, trainer_shards, tiny_models) -> None:
    from encoders.models import FrozenEncoders, ModelsConfig
    from trainer.config import load_config
    from trainer.model import VideoCrafterModel
    from trainer.phases import build_module
    from trainer.preview import PreviewWriter, TextConditions

    config = run_config(trainer_shards, tiny_models, tmp_path / "out", steps=(1, 1, 1))
    config["model"] = {"unet": "vc1-i2v-tiny", "model_dir": str(tiny_models), "init_from_sd": False}
    config = load_config(write_config(tmp_path / "run.yaml", config))
    assert config.model.image_cross_attention

    text = TextConditions(config, keep_vae=True)
    enc = FrozenEncoders(ModelsConfig(model_dir=str(tiny_models), device="cpu"))
    grey = np.full((1, 32, 32, 3), 128, dtype=np.uint8)
    assert text.null_image.shape == (1, 17, 48)
    assert torch.equal(text.null_image, torch.from_numpy(enc.null_image_tokens()).float())
    assert not torch.allclose(text.null_image, torch.zeros_like(text.null_image))
    # mid-grey: VideoCrafter's zeros in [-1, 1]; uint8 128 is one step off 127.5, so close, not equal
    torch.testing.assert_close(
        text.null_image, torch.from_numpy(enc.encode_images(grey)["tokens"]).float(), atol=0.1, rtol=0
    )

    module = build_module(config)
    assert isinstance(module, VideoCrafterModel) and module.image_proj is not None
    writer = PreviewWriter(config, text, lambda: build_module(config), str(tmp_path / "previews"))
    paths = writer.write(module.state_dict(), stage="256x256", tag="i2v")
    assert sorted(p.rsplit(".", 1)[1] for p in paths) == ["gif", "mp4"]
