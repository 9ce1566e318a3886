"""Trainer entry: `deepspeed trainer/main.py --config configs/train/X.yaml [--resume]` runs every phase of a run in order."""

from __future__ import annotations

import os
import sys

# `deepspeed trainer/main.py` puts trainer/ first on sys.path, where trainer/logging.py would shadow the
# standard library's logging (and config.py any `config` module). Use the repository root instead.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _HERE]
if os.path.dirname(_HERE) not in sys.path:
    sys.path.insert(0, os.path.dirname(_HERE))

import argparse  # noqa: E402
import json  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def parse_args(argv):
    parser = argparse.ArgumentParser(
        prog="deepspeed trainer/main.py",
        description="Train the video U-Net on latent shards through every phase of a run config "
        "(DeepSpeed ZeRO; several ranks via the deepspeed launcher).",
    )
    parser.add_argument("--config", required=True, help="run YAML (configs/train/*.yaml)")
    parser.add_argument("--resume", action="store_true", help="continue from out_dir/ckpt/latest if present")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value, e.g. --set phases.0.steps=10 (repeatable)",
    )
    parser.add_argument(
        "--local_rank", type=int, default=None, help=argparse.SUPPRESS
    )  # passed by the launcher
    return parser.parse_args(argv)


def train(config, *, resume: bool) -> dict:
    """Run (or continue) every phase; returns a summary on rank 0."""
    import deepspeed.comm as dist
    import torch

    from shards.loader import ShardLoader
    from trainer import checkpoint as ckpt
    from trainer import engine as eng
    from trainer.ema import EMA
    from trainer.logging import TrainLogger
    from trainer.phases import (
        PhaseRunner,
        RunState,
        apply_trainable,
        build_module,
        checkpoint_weights,
        export_lora,
        export_metadata,
        export_phase,
        initial_weights,
        lora_base,
        lora_peft_base,
        lora_setup,
    )
    from trainer.preview import PreviewWriter, TextConditions

    rank, world, _ = eng.init_distributed()
    torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads()))))
    device = eng.device()
    out_dir = config.out_dir
    ckpt_root = os.path.join(out_dir, "ckpt")
    phase_list = [[p.name, p.steps] for p in config.phases]

    state, resume_dir, saved = RunState(phases=phase_list), None, {}
    if resume and (tag := ckpt.latest_tag(ckpt_root)) is not None:
        resume_dir = os.path.join(ckpt_root, tag)
        saved = ckpt.read_trainer_state(resume_dir)
        if [list(p) for p in saved["phases"]] != phase_list:
            raise ValueError(
                f"{resume_dir}: saved with phases {saved['phases']}, the config has {phase_list}"
            )
        if saved.get("world_size", world) != world:
            raise ValueError(
                f"{resume_dir}: saved with {saved['world_size']} ranks; resume with the same number"
            )
        state = RunState(saved["phase_index"], saved["phase_step"], saved["global_step"], phase_list)
    if rank == 0:
        os.makedirs(out_dir, exist_ok=True)
        with open(os.path.join(out_dir, "config.json"), "w") as f:
            from trainer.config import to_dict

            json.dump(to_dict(config), f, indent=1)

    text = TextConditions(config, keep_vae=rank == 0)
    from trainer.model import context_dim

    if context_dim(config.model.unet) != text.dim:
        raise ValueError(
            f"model.unet {config.model.unet!r} has context_dim {context_dim(config.model.unet)} "
            f"but {config.model.model_dir}'s text encoder is {text.dim}-wide; pick a matching pair"
        )
    ema = EMA(config.ema.decay) if config.ema.enabled else None
    if resume_dir is not None:
        ckpt.load_ema(resume_dir, ema)
        if ema is not None and "lora" in saved and state.phase_step >= config.phases[state.phase_index].steps:
            # resumed at a LoRA phase's end: its EMA file holds the adapters; merge them into the base as the
            # uninterrupted run did
            from trainer.lora import merge_state_dict

            base = lora_peft_base(lora_base(ckpt_root, saved["lora"], config), saved["lora"])
            ema.shadow = merge_state_dict({**base, **ema.shadow}, saved["lora"]["scale"])
    logger = TrainLogger(
        out_dir,
        config.logging,
        rank=rank,
        total_steps=sum(p.steps for p in config.phases),
        start_step=state.global_step,
    )
    preview = (
        PreviewWriter(config, text, lambda: build_module(config), os.path.join(out_dir, "previews"))
        if rank == 0
        else None
    )
    scaling = config.model.signal_scale()
    logger.message(
        f"model {config.model.unet}: {config.model.prediction}-prediction, signal scaling "
        + (
            f"scale_arr {scaling['scale_a']} -> {scaling['scale_b']} over {scaling['mid_step']} steps"
            f"{' (fix_scale_bug)' if scaling['fix_scale_bug'] else ''}"
            if scaling["use_scale"]
            else "off"
        )
        + ("" if config.model.fps is None else f", fps condition {config.model.fps}")
    )
    if resume_dir:
        logger.message(f"resuming from {resume_dir}: phase {state.phase_index} step {state.phase_step}")

    encoders = None  # the frozen encoders the shards' storage profiles need (trainer.conditioning)
    weights_from = resume_dir  # a checkpoint whose consolidated weights start the next phase
    # (phase-end checkpoint, its base) of the LoRA phase just run: spares the next phase a rebuild of the base
    lora_end = None
    exports: list[str] = []
    for index in range(state.phase_index, len(config.phases)):
        phase = config.phases[index]
        mid_phase = index == state.phase_index and 0 < state.phase_step < phase.steps
        if index == state.phase_index and state.phase_step >= phase.steps:
            continue  # resumed from this phase's end checkpoint
        if index != state.phase_index:
            state.phase_index, state.phase_step = index, 0
        module = build_module(config)
        if config.model.gradient_checkpointing:
            module.enable_gradient_checkpointing()
        lora_phase, lora = phase.trainable == "lora", None
        if mid_phase and lora_phase:
            # a LoRA checkpoint holds the adapters only: rebuild the phase's base, then load the adapters
            lora = saved["lora"]
            module.load_state_dict(lora_base(ckpt_root, lora, config), strict=True)
            source = f"the resumed checkpoint (adapters) on base {lora['base']}"
        elif mid_phase:
            source = "the resumed checkpoint"  # weights come with engine.load_checkpoint below
        elif weights_from is None:
            source = initial_weights(module, config)
        else:
            base = lora_end[1] if lora_end and lora_end[0] == weights_from else None
            module.load_state_dict(checkpoint_weights(weights_from, config, base=base), strict=True)
            source = os.path.basename(weights_from)
        lora_end = None
        base = {k: v.detach().float().clone() for k, v in module.state_dict().items()} if lora_phase else None
        # before initialize: see engine.initialize
        counts = apply_trainable(module, phase.trainable, phase.lora, seed=phase.seed(config.seed))
        if lora_phase:
            from_ = os.path.basename(weights_from) if weights_from and not mid_phase else "initial"
            lora = lora_setup(base, lora, phase=phase, module=module, base_from=from_)
            frozen = {}  # nothing frozen is saved: the base is rebuilt from `lora["base"]`
        else:
            # fp32 copies of the frozen params, saved with each checkpoint: exact through bf16 and ZeRO-1
            frozen = (
                ckpt.read_frozen(resume_dir)
                if mid_phase
                else {
                    n: p.detach().float().clone() for n, p in module.named_parameters() if not p.requires_grad
                }
            )
        engine, _, ds_json = eng.initialize(module, phase, config.deepspeed, world)
        if mid_phase:
            ckpt.load_engine(engine, resume_dir, trainable_only=lora_phase)
        loader = ShardLoader(
            phase.data.loader_config(stage=phase.stage, seed=phase.seed(config.seed)),
            rank=rank,
            world_size=world,
        )
        if mid_phase:
            loader.load_state_dict(ckpt.read_loader_state(resume_dir, rank))
        encoders = on_the_fly(config, loader, encoders, device, logger)
        if ema is not None:
            ema.start_phase(engine.module, config.deepspeed.zero_stage, lora["frozen"] if lora else frozen)
        logger.message(
            f"phase {phase.name} ({index + 1}/{len(config.phases)}): {phase.stage}, {phase.steps} steps, "
            f"trainable={phase.trainable} {counts}, ZeRO-{config.deepspeed.zero_stage}, "
            f"bf16={ds_json['bf16']['enabled']}, grad_accum={ds_json['gradient_accumulation_steps']}, "
            f"world={world}, weights from {source}"
        )
        runner = PhaseRunner(
            config=config,
            phase=phase,
            engine=engine,
            loader=loader,
            state=state,
            rank=rank,
            world=world,
            text=text,
            ema=ema,
            logger=logger,
            preview=preview,
            device=device,
            ckpt_root=ckpt_root,
            frozen=frozen,
            lora=lora["record"] if lora else None,
            encoders=encoders,
        )
        weights_from = runner.run()
        ema_adapters = None
        if lora_phase:
            lora_end = (weights_from, base)
            if ema is not None:  # from here on the EMA is plain weights: base + its adapters, merged
                from trainer.lora import adapter_state_dict, merge_state_dict

                ema_adapters = adapter_state_dict(ema.shadow)
                ema.shadow = merge_state_dict(ema.shadow, lora["record"]["scale"])
        if config.checkpoint.export_safetensors:
            weights = checkpoint_weights(weights_from, config, base=base) if rank == 0 else {}
            exports += export_phase(
                weights_from, weights, ema, out_dir, phase.name, rank, export_metadata(config, module)
            )
            if lora_phase:
                exports += export_lora(
                    weights_from, ema_adapters, out_dir, phase, lora["record"], rank, config
                )
        eng.destroy(engine)
        del runner, engine, module
        dist.barrier()
    logger.close()
    return {"global_step": state.global_step, "exports": exports}


def on_the_fly(config, loader, have, device, logger):
    """The OnTheFlyEncoders a phase's shards need (text=caption: the text encoder; image=frame: the image
    encoder), reusing the previous phase's when it has them; None when the shards store tokens."""
    need = loader.needs_encoders()
    # a text-to-video model has no use for the frames: no image encoder for it
    need["image"] = need["image"] and config.model.image_cross_attention
    if not any(need.values()):
        return have
    if (
        have is None
        or (need["text"] and have.encoders.text_encoder is None)
        or (need["image"] and have.encoders.image_encoder is None)
    ):
        from trainer.conditioning import OnTheFlyEncoders

        if have is not None:  # keep what the earlier phase loaded
            need = {
                "text": need["text"] or have.encoders.text_encoder is not None,
                "image": need["image"] or have.encoders.image_encoder is not None,
            }
        have = OnTheFlyEncoders(config.model, text=need["text"], image=need["image"], device=device)
        logger.message(
            "storage profiles "
            + ", ".join(sorted({p.name for ps in loader.profiles.values() for p in ps}))
            + ": the trainer runs the frozen "
            + " and ".join(k + " encoder" for k, v in need.items() if v)
            + f" on {device}"
        )
    have.check_shards([i for infos in loader.shards.values() for i in infos])
    return have


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    from trainer.config import load_config

    config = load_config(args.config, args.overrides)
    summary = train(config, resume=args.resume)
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps({"done": True, **summary}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
