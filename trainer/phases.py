"""One phase of a run: build the U-Net, load its weights, freeze per `trainable`, initialise DeepSpeed, train, checkpoint."""

from __future__ import annotations

import os
import time
import zlib
from dataclasses import dataclass, field

import torch

from trainer import checkpoint as ckpt
from trainer.config import PhaseConfig, TrainConfig
from trainer.ema import full_param_data


def build_module(config: TrainConfig):
    """The run's U-Net (VideoUNet, or VideoCrafterModel for a VideoCrafter preset), randomly initialised from the
    run seed (identical on every rank)."""
    from trainer.model import VideoCrafterModel, build_unet

    torch.manual_seed(config.seed)
    preset = config.model.videocrafter_preset
    if preset is not None:
        return VideoCrafterModel(preset.unet, preset.image_proj, preset=preset.name)
    return build_unet(config.model.unet, image_cross_attention=config.model.image_cross_attention)


def initial_weights(module, config: TrainConfig) -> str:
    """Weights at the start of a run: a weights file, SD 2.1 inflation, or the seeded random init."""
    m = config.model
    if m.init_checkpoint and m.videocrafter_preset is not None:
        from trainer.diffusion import Diffusion
        from trainer.model.pretrained import load_videocrafter_weights

        diffusion = Diffusion(prediction=m.prediction, **m.signal_scale())
        kind = load_videocrafter_weights(module, m.init_checkpoint, diffusion)
        return f"{kind} {m.init_checkpoint}"
    if m.init_checkpoint:
        from safetensors.torch import load_file

        module.load_state_dict(load_file(m.init_checkpoint), strict=True)
        return f"checkpoint {m.init_checkpoint}"
    if m.videocrafter_preset is not None:
        if m.init_from_sd:
            raise ValueError(
                f"model.unet={m.unet} is a VideoCrafter model: set model.init_checkpoint to its model.ckpt (or a "
                "converted file), or model.init_from_sd: false to train it from a random init"
            )
        return "random init"
    if m.init_from_sd:
        from trainer.model import load_sd_unet_into

        info = load_sd_unet_into(module, os.path.join(m.model_dir, "unet"))
        return f"SD inflation from {info['folder']} ({info['loaded']} tensors)"
    return "random init"


def apply_trainable(module, trainable: str, lora=None, *, seed: int = 0) -> dict:
    """Freeze by group before deepspeed.initialize: spatial -> temporal frozen, temporal -> spatial frozen;
    lora -> peft LoRA adapters injected into the layers `lora` (trainer.config.LoraConfig) selects, everything
    else frozen (adapter init from `seed`)."""
    from trainer.model import spatial_temporal_parameters

    if trainable == "lora":
        from trainer import lora as lora_mod

        if lora is None:
            raise ValueError("trainable: lora needs the phase's lora config")
        names = lora_mod.inject(module, lora, seed=seed)
        adapters = sum(p.numel() for p in module.parameters() if p.requires_grad)
        return {"lora_layers": len(names), "lora_trainable": adapters, "lora_targets": lora.targets}
    spatial, temporal = spatial_temporal_parameters(module)
    module.requires_grad_(True)
    if trainable == "spatial":
        for p in temporal:
            p.requires_grad_(False)
    elif trainable == "temporal":
        for p in spatial:
            p.requires_grad_(False)
    n = lambda ps: sum(p.numel() for p in ps if p.requires_grad)  # noqa: E731
    return {"spatial_trainable": n(spatial), "temporal_trainable": n(temporal)}


def step_seed(run_seed: int, phase: str, step: int, micro: int, rank: int) -> int:
    """Seed of one micro step's noise, timesteps and CFG dropout (a pure function: resumes reproduce it)."""
    return (run_seed * 1_000_003 + zlib.crc32(f"{phase}:{step}:{micro}:{rank}".encode())) % (2**62)


def sample_latent(batch: dict, device, seed: int) -> torch.Tensor:
    """x0 = scale * (mean + std * eps) on `device`, eps from a generator seeded by `seed` (resumes redraw it)."""
    mean = batch["latent"].to(device)
    std = batch.get("latent_std")
    if std is None:  # a loader that sampled already (or shards without a std)
        return mean
    generator = torch.Generator(device=mean.device).manual_seed(seed)
    eps = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
    return mean.addcmul_(std.to(device), eps)


@dataclass
class RunState:
    """Where a run is; saved as trainer_state.json in every checkpoint."""

    phase_index: int = 0
    phase_step: int = 0  # optimizer steps done in the current phase
    global_step: int = 0  # optimizer steps done in the run
    phases: list = field(default_factory=list)  # [name, steps] of every phase (checked on resume)

    def as_dict(self, **extra) -> dict:
        return {
            "phase_index": self.phase_index,
            "phase_step": self.phase_step,
            "global_step": self.global_step,
            "phases": self.phases,
            **extra,
        }


class PhaseRunner:
    """Trains one phase on a live engine; the driver (trainer.main) builds the engine and loader."""

    def __init__(
        self,
        *,
        config,
        phase: PhaseConfig,
        engine,
        loader,
        state: RunState,
        rank: int,
        world: int,
        text,
        ema,
        logger,
        preview,
        device,
        ckpt_root: str,
        frozen: dict | None = None,
        lora: dict | None = None,
        encoders=None,
    ):
        from trainer.diffusion import Diffusion

        self.config, self.phase, self.engine, self.loader = config, phase, engine, loader
        self.state, self.rank, self.world = state, rank, world
        self.text, self.ema, self.logger, self.preview = text, ema, logger, preview
        self.device, self.ckpt_root = device, ckpt_root
        self.frozen = frozen or {}
        self.encoders = (
            encoders  # trainer.conditioning.OnTheFlyEncoders when the shards store captions/frames
        )
        self.lora = lora  # LoRA phase: trainer_state["lora"] (base checkpoint, fingerprint, scale, layers)
        self.diffusion = Diffusion(prediction=config.model.prediction, **config.model.signal_scale())
        self.accum = phase.resolve_grad_accum(world)
        self.zero = config.deepspeed.zero_stage
        self.uncond = text.uncond.to(device)

    def cond(self, batch: dict) -> dict:
        if "text_tokens" in batch or self.encoders is None:
            tokens = batch["text_tokens"]
        else:
            tokens = self.encoders.text_tokens(batch)
        if tokens.shape[-1] != self.text.dim:
            raise ValueError(
                f"shards' text tokens are {tokens.shape[-1]}-wide but model.model_dir's text encoder gives "
                f"{self.text.dim}; encode the shards with the same text encoder (sources {set(batch['sources'])})"
            )
        m = self.config.model
        fps = batch["fps"]
        if m.fps is not None:
            fps = torch.full_like(fps, float(m.fps))
        elif m.videocrafter_preset is not None:
            fps = fps.round()  # VideoCrafter conditions on integer fps
        cond = {"context": tokens.to(self.device), "fps": fps.to(self.device), "uncond_context": self.uncond}
        if m.image_cross_attention and "image_tokens" in batch:
            cond["image_context"] = batch["image_tokens"].to(self.device)
        elif m.image_cross_attention and "image_cond_list" in batch and self.encoders is not None:
            cond["image_context"] = self.encoders.image_tokens(batch)
        if self.text.null_image is not None:  # VideoCrafter I2V: image dropout feeds the mid-grey image
            cond["uncond_image_context"] = self.text.null_image.to(self.device)
        return cond

    def train_step(self, batches) -> dict:
        """gradient_accumulation_steps micro batches, one optimizer step; returns the step's log record."""
        from trainer.logging import StepStats

        stats = StepStats()
        encode_s = self.encoders.seconds if self.encoders is not None else 0.0
        for micro in range(self.accum):
            start = time.perf_counter()
            batch = next(batches)
            wait = time.perf_counter() - start
            seed = step_seed(self.config.seed, self.phase.name, self.state.phase_step, micro, self.rank)
            g = torch.Generator().manual_seed(seed)
            x0 = sample_latent(batch, self.device, seed ^ 0x5A17)
            loss, _ = self.diffusion.training_loss(
                self.engine, x0, self.cond(batch), generator=g, cfg_dropout=self.phase.cfg_dropout
            )
            if loss.grad_fn is None:
                raise ValueError(
                    f"phase {self.phase.name}: no trainable parameter takes part in a {batch['kind']} batch "
                    f"(trainable={self.phase.trainable}); image batches skip the temporal modules: give a phase "
                    "that trains only temporal weights video sources only"
                )
            self.engine.backward(loss)
            if self.engine.is_gradient_accumulation_boundary() != (micro == self.accum - 1):
                raise RuntimeError("micro steps and DeepSpeed's gradient accumulation boundary disagree")
            self.engine.step()
            stats.add(batch["kind"], float(loss.detach()), batch, wait)
        self.state.phase_step += 1
        self.state.global_step += 1
        if self.ema is not None:
            self.ema.update(self.engine.module, self.zero)
        red = stats.reduced()
        grad_norm = self.engine.get_global_grad_norm()
        return {
            "global_step": self.state.global_step,
            "phase": self.phase.name,
            "phase_step": self.state.phase_step,
            **red,
            "lr": float(self.engine.get_lr()[0]),
            "grad_norm": None if grad_norm is None else float(grad_norm),
            "samples_per_s": red["samples"] / max(red["step_s"], 1e-9),
            "data_wait_frac": red["data_wait_s"] / max(red["step_s"], 1e-9),
            # this rank's seconds in the frozen encoders (storage profiles text=caption / image=frame)
            "encode_s": (self.encoders.seconds - encode_s) if self.encoders is not None else 0.0,
            "bad_samples": self.loader.stats["bad_samples"],
            "kinds": stats.kinds,
            "keys": stats.keys,  # this rank's sample keys and sources (rank 0's in metrics.jsonl)
            "sources": stats.sources,
        }

    def write_preview(self) -> None:
        """Collective under ZeRO-3 (weights gathered); rank 0 samples and writes, the others wait."""
        import deepspeed.comm as dist

        use_ema = self.config.preview.use_ema and self.ema is not None
        weights = None
        if use_ema:
            weights = self.ema.shadow
        elif self.zero == 3 or self.rank == 0:
            weights = full_param_data(self.engine.module, self.zero)
        if weights is not None and self.lora is not None:
            from trainer.lora import merge_state_dict

            weights = merge_state_dict(weights, self.lora["scale"])
        if self.rank == 0:
            tag = f"step{self.state.global_step:08d}-{self.phase.name}"
            paths = self.preview.write(
                weights, stage=self.phase.stage, tag=tag, logger=self.logger, step=self.state.global_step
            )
            self.logger.message(f"preview: {', '.join(os.path.basename(p) for p in paths)}")
        dist.barrier()

    def save(self, *, phase_end: bool) -> str:
        tag = ckpt.tag_for(self.state.global_step, self.phase.name if phase_end else None)
        return ckpt.save(
            self.engine,
            self.ckpt_root,
            tag,
            rank=self.rank,
            trainer_state=self.state.as_dict(
                phase=self.phase.name,
                phase_end=phase_end,
                world_size=self.world,
                **({"lora": self.lora} if self.lora is not None else {}),
            ),
            loader_state=self.loader.state_dict(),
            ema=self.ema,
            frozen=self.frozen if self.rank == 0 else None,
            keep_last=self.config.checkpoint.keep_last,
            # LoRA: only the adapters (+ their optimizer state and EMA); the base is the phase's start
            trainable_only=self.lora is not None,
        )

    def run(self) -> str:
        """Train until the phase's last step; returns the phase-end checkpoint folder."""
        batches = iter(self.loader)
        every_ckpt = self.config.checkpoint.every_steps
        every_preview = self.config.preview.every_steps
        while self.state.phase_step < self.phase.steps:
            record = self.train_step(batches)
            self.logger.log_step(record)
            last = self.state.phase_step == self.phase.steps
            if (every_preview and self.state.global_step % every_preview == 0) or (
                last and self.config.preview.at_phase_end
            ):
                self.write_preview()
            if last:
                return self.save(phase_end=True)
            if every_ckpt and self.state.global_step % every_ckpt == 0:
                self.save(phase_end=False)
        raise AssertionError("unreachable: a phase ends with its last step")


def checkpoint_weights(ckpt_dir: str, config: TrainConfig, *, base: dict | None = None) -> dict:
    """The plain fp32 U-Net weights of any checkpoint: its consolidated ZeRO state (+ frozen params); for a LoRA
    phase's, its base (rebuilt: `lora_base`, or `base` when the caller has it) with the adapters merged."""
    weights = ckpt.fp32_state_dict(ckpt_dir)
    record = ckpt.read_trainer_state(ckpt_dir).get("lora")
    if record is None:
        return weights
    from trainer.lora import merge_state_dict

    if base is None:
        base = lora_base(os.path.dirname(ckpt_dir), record, config)
    return merge_state_dict({**lora_peft_base(base, record), **weights}, record["scale"])


def lora_base(ckpt_root: str, record: dict, config: TrainConfig) -> dict:
    """Rebuild the base weights of a LoRA phase (`record`: its checkpoints' trainer_state["lora"]): the run's
    initial weights, or the plain weights of the phase-start checkpoint it names; checked by fingerprint."""
    from trainer.lora import fingerprint

    if record["base"] == "initial":
        module = build_module(config)
        initial_weights(module, config)
        base = {k: v.detach().float().clone() for k, v in module.state_dict().items()}
        del module
    else:
        path = os.path.join(ckpt_root, record["base"])
        if not os.path.isdir(path):
            raise FileNotFoundError(
                f"{path}: the base checkpoint of a LoRA phase is gone; LoRA checkpoints hold the adapters only"
            )
        base = checkpoint_weights(path, config)
    if fingerprint(base) != record["fingerprint"]:
        raise ValueError(
            f"LoRA resume: the rebuilt base ({record['base']}) differs from the one the adapters trained on"
        )
    return base


def lora_peft_base(base: dict, record: dict) -> dict:
    """Plain base weights under the names of the LoRA-injected module (`<layer>.base_layer.weight`)."""
    from trainer.lora import peft_key

    adapted = set(record["target_modules"])
    return {peft_key(k, adapted): v for k, v in base.items()}


def lora_setup(base: dict, saved: dict | None, *, phase: PhaseConfig, module, base_from: str) -> dict:
    """A LoRA phase's record (saved in its checkpoints' trainer_state) and the fp32 frozen values for the EMA.

    `saved`: the record of the checkpoint a mid-phase resume continues (checked against this phase's)."""
    from trainer.lora import fingerprint, scaling

    cfg = phase.lora
    adapted = [n for n, m in module.named_modules() if hasattr(m, "lora_A") and "default" in m.lora_A]
    record = {
        "base": saved["base"] if saved else base_from,
        "fingerprint": saved["fingerprint"] if saved else fingerprint(base),
        "rank": cfg.rank,
        "alpha": cfg.alpha,
        "dropout": cfg.dropout,
        "targets": cfg.targets,
        "modules": list(cfg.modules),
        "scale": scaling(cfg.rank, cfg.alpha),
        "target_modules": adapted,
    }
    if saved is not None:
        changed = [k for k in record if k not in ("base", "fingerprint") and saved.get(k) != record[k]]
        if changed:
            raise ValueError(f"phase {phase.name}: the lora config changed since the checkpoint ({changed})")
    params = {n for n, _ in module.named_parameters()}
    frozen = {k: v for k, v in lora_peft_base(base, record).items() if k in params}
    return {"record": record, "frozen": frozen}


def export_lora(
    ckpt_dir: str,
    ema_adapters: dict | None,
    out_dir: str,
    phase: PhaseConfig,
    record: dict,
    rank: int,
    config,
) -> list[str]:
    """Rank 0: the adapters of a LoRA phase end alone (and the EMA's), in peft's key layout, with rank / alpha /
    targets / modules / target_modules in the metadata (`trainer.lora.load_adapter` / `merge` read them)."""
    if rank != 0:
        return []
    from trainer.lora import adapter_metadata, write_adapter

    meta = adapter_metadata(
        phase.lora,
        record["target_modules"],
        phase=phase.name,
        checkpoint=os.path.basename(ckpt_dir),
        base=record["base"],
        unet=config.model.unet,
    )
    folder = os.path.join(out_dir, "export")
    paths = [
        write_adapter(
            os.path.join(folder, f"{phase.name}-lora.safetensors"), ckpt.fp32_state_dict(ckpt_dir), meta
        )
    ]
    if ema_adapters:
        paths.append(
            ckpt.export_safetensors(
                ema_adapters, os.path.join(folder, f"{phase.name}-ema-lora.safetensors"), meta
            )
        )
    return paths


def export_metadata(config: TrainConfig, module) -> dict:
    """Metadata that makes every export self-describing: format, preset (= model.unet), image cross-attention,
    diffusion settings (schedule, signal scaling, prediction); ``trainer.model.loading.load_model`` reads it."""
    from trainer.model import VideoCrafterModel
    from trainer.model.loading import unet_metadata
    from trainer.model.presets import DIFFUSION_DEFAULTS
    from trainer.model.pretrained import model_metadata

    m = config.model
    source = f"latentcrafter run {config.name}"
    if not isinstance(module, VideoCrafterModel):
        diffusion = {
            **DIFFUSION_DEFAULTS,
            "linear_start": 0.00085,  # trainer.diffusion.Diffusion's schedule (SD / VideoCrafter)
            "linear_end": 0.012,
            **m.signal_scale(),
            "parameterization": m.prediction,
        }
        return unet_metadata(module, preset=m.unet, diffusion=diffusion, fps=m.fps, source=source)
    diffusion = {**m.videocrafter_preset.diffusion, **m.signal_scale(), "parameterization": m.prediction}
    meta = model_metadata(module, diffusion, source=source)
    meta["image_cross_attention"] = "true" if module.image_proj is not None else "false"
    return meta


def export_phase(
    ckpt_dir: str, weights: dict, ema, out_dir: str, phase: str, rank: int, model_meta: dict | None = None
) -> list[str]:
    """Rank 0: consolidated fp32 weights (and the EMA) of a phase end, as safetensors for inference.

    ``model_meta`` (``export_metadata``: preset, sizes, diffusion settings) makes the file one that
    ``latentcrafter generate`` (``trainer.model.loading.load_model``) reads; VideoCrafter presets' exports are also
    read by ``trainer.model.load_pretrained`` and ``latentcrafter convert --to videocrafter``."""
    if rank != 0:
        return []
    meta = {"phase": phase, "checkpoint": os.path.basename(ckpt_dir), **(model_meta or {})}
    paths = [ckpt.export_safetensors(weights, os.path.join(out_dir, "export", f"{phase}.safetensors"), meta)]
    if ema is not None:
        paths.append(
            ckpt.export_safetensors(
                ema.shadow, os.path.join(out_dir, "export", f"{phase}-ema.safetensors"), meta
            )
        )
    return paths
