"""run_study(study): train every variant with the real trainer, evaluate it at the listed steps, write the report.

Per variant (folder <out_dir>/variants/<id>/):
1. train/run.yaml: ONE phase named `perturb` of `steps` (K) optimizer steps, init_checkpoint = the variant's
   base export, trainable = spatial | temporal | all | lora (lora.targets = spatial | temporal), EMA off; the
   phase name and run seed are the same for every variant, so every variant sees the same batches, noise and
   timesteps. Checkpoints every gcd(eval_steps) steps, none pruned, so the optimizer runs on uninterrupted
   through the evaluated steps (no per-segment phases, whose LoRA adapters and AdamW state would restart).
2. Run with the real trainer: `deepspeed --num_gpus N trainer/main.py --config run.yaml --resume` (or plain
   `python trainer/main.py` with `launcher: python`); `--resume` continues a variant killed mid-training.
3. For each evaluated step s: the plain fp32 weights of the step-s checkpoint (trainer.phases.checkpoint_weights:
   ZeRO state consolidated, LoRA adapters merged into the base) -> weights/step{s:08d}.safetensors (with the
   export metadata), then `trainer.generate` on the fixed prompts and seeds -> samples/step{s:08d}/, then the
   metrics of `evaluation` per video, averaged over the prompts.
4. result.json, written atomically: the variant is done; a later invocation skips it.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from trainer.perturb.config import VARIANTS, StudyConfig, trained_group, variant_id

REPO = Path(__file__).resolve().parents[2]
METRIC_KEYS = ("clipsim", "aesthetic", "motion", "static_ratio", "clip_temp", "warp_error")


def write_json_atomic(path: str | Path, data) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)


def read_json(path: str | Path):
    return json.loads(Path(path).read_text())


# ------------------------------------------------------------------------------------------------ training


def variant_train_config(study: StudyConfig, name: str, base) -> dict:
    """The run config (as a dict) of one variant; `base` is the study's base TrainConfig."""
    from trainer.config import to_dict

    model_key, trainable, targets = VARIANTS[name]
    last = base.phases[-1]
    phase = {
        "name": "perturb",
        "stage": study.stage or last.stage,
        "steps": study.steps,
        "global_batch_size": study.global_batch_size or last.global_batch_size,
        "trainable": trainable,
        "data": study.data if study.data is not None else to_dict(last.data),
        "optim": study.optim if study.optim is not None else to_dict(last.optim),
        "cfg_dropout": last.cfg_dropout,
    }
    if trained_group(name) == "temporal" and study.temporal_data is not None:
        phase["data"] = study.temporal_data
    if trainable == "lora":
        phase["lora"] = {**study.lora, "targets": targets}
    model = to_dict(base.model)
    model.update(init_checkpoint=os.path.abspath(study.models[model_key]), init_from_sd=False)
    every = study.checkpoint_every
    return {
        "name": f"{study.name}-{variant_id(name)}",
        "out_dir": os.path.join(variant_dir(study, name), "train"),
        "seed": study.seed,
        "model": model,
        "deepspeed": to_dict(base.deepspeed),
        "phases": [phase],
        "checkpoint": {
            "every_steps": every,
            "keep_last": study.steps // every + 1,
            "export_safetensors": True,
        },
        "ema": {"enabled": False},
        "logging": {"every_steps": 1, "tensorboard": False, "progress": False},
        "preview": {"every_steps": 0, "at_phase_end": False, "prompts": list(study.eval.prompts)},
    }


def variant_dir(study: StudyConfig, name: str) -> str:
    return os.path.join(study.out_dir, "variants", variant_id(name))


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_training(study: StudyConfig, config_path: str, log_path: str) -> None:
    """The real trainer as a subprocess (deepspeed launcher or plain python), `--resume` so a killed variant
    continues from its latest checkpoint; its output goes to `log_path`."""
    bin_dir = Path(sys.executable).parent
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1")
    env["PATH"] = f"{bin_dir}{os.pathsep}{env.get('PATH', '')}"
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)  # the child sets up its own process group
    port = study.master_port or _free_port()
    main = str(REPO / "trainer" / "main.py")
    if study.launcher == "deepspeed":
        launcher = shutil.which("deepspeed", path=env["PATH"]) or str(bin_dir / "deepspeed")
        cmd = [launcher, "--num_gpus", str(study.num_gpus), "--master_port", str(port), main]
    else:
        env["MASTER_PORT"] = str(port)
        cmd = [sys.executable, main]
    cmd += ["--config", config_path, "--resume"]
    with open(log_path, "a") as log:
        log.write(f"$ {' '.join(cmd)}\n")
        log.flush()
        try:
            proc = subprocess.run(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
        finally:  # a killed rank leaves DeepSpeed's shared-memory buffer behind
            for path in glob.glob(f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_*_{port}_*"):
                with contextlib.suppress(OSError):
                    os.unlink(path)
    if proc.returncode != 0:
        tail = Path(log_path).read_text()[-3000:]
        raise RuntimeError(f"training {config_path} failed (exit {proc.returncode}); log {log_path}:\n{tail}")


def checkpoint_dir(train_dir: str, step: int, steps: int) -> str:
    from trainer.checkpoint import tag_for

    return os.path.join(train_dir, "ckpt", tag_for(step, "perturb" if step == steps else None))


def step_weights(typed, train_dir: str, step: int, steps: int, path: str) -> str:
    """Plain fp32 weights of the step-`step` checkpoint (adapters merged) as an export generate can load."""
    from trainer.checkpoint import export_safetensors
    from trainer.phases import build_module, checkpoint_weights, export_metadata

    if os.path.exists(path):
        return path
    ckpt = checkpoint_dir(train_dir, step, steps)
    if not os.path.isdir(ckpt):
        raise FileNotFoundError(f"{ckpt}: the checkpoint of evaluated step {step} is missing")
    weights = checkpoint_weights(ckpt, typed)
    meta = {"phase": "perturb", "checkpoint": os.path.basename(ckpt), "step": str(step)}
    meta.update(export_metadata(typed, build_module(typed)))
    tmp = path + ".tmp.safetensors"
    export_safetensors(weights, tmp, meta)
    os.replace(tmp, path)
    return path


# ---------------------------------------------------------------------------------------------- evaluation


class Scorer:
    """The metric models, loaded once: CLIP (CLIPSIM, CLIP-Temp) and the aesthetic predictor when configured."""

    def __init__(self, study: StudyConfig, model_dir: str):
        from evaluation import load_preview_clip

        ev = study.eval
        device = "cpu" if ev.device == "auto" else ev.device
        if ev.device == "auto":
            import torch

            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.skipped = {}
        if ev.clip:
            from evaluation.clip import ClipEmbedder

            self.clip = ClipEmbedder(ev.clip, device=device)
        else:
            self.clip = load_preview_clip(model_dir, device=device)
            if self.clip is None:
                self.skipped["clipsim"] = self.skipped["clip_temp"] = "no CLIP: set eval.clip"
        self.aesthetic = None
        if ev.aesthetic and ev.aesthetic_clip:
            from evaluation.aesthetic import AestheticScorer

            self.aesthetic = AestheticScorer(ev.aesthetic, ev.aesthetic_clip, device=device)
        else:
            self.skipped["aesthetic"] = "set eval.aesthetic and eval.aesthetic_clip"
        self.threshold = ev.static_threshold

    def score(self, frames, prompt: str) -> dict:
        from evaluation import preview_metrics

        out = preview_metrics(frames, prompt, self.clip, static_threshold=self.threshold)
        if self.aesthetic is not None:
            out["aesthetic"] = self.aesthetic.score(frames)
        return out


def evaluate_weights(study: StudyConfig, weights: str, model_dir: str, out: str, scorer: Scorer) -> dict:
    """Generate the fixed prompts from `weights` into `out`, score each video; means over the prompts."""
    from trainer.generate.config import GenerateConfig
    from trainer.generate.run import generate

    ev = study.eval
    result = generate(
        GenerateConfig(
            weights=weights,
            model_dir=model_dir,
            out=out,
            prompts=list(ev.prompts),
            frames=ev.frames,
            size=ev.size,
            steps=ev.ddim_steps,
            cfg=ev.cfg,
            eta=ev.eta,
            fps=ev.fps,
            seed=ev.seed,
            device=ev.device,
            progress=False,
        )
    )
    samples = []
    for sample, frames in zip(result.report["samples"], result.frames, strict=True):
        metrics = scorer.score(frames, sample["prompt"])
        samples.append(
            {"prompt": sample["prompt"], "seed": sample["seed"], "video": sample["mp4"], **metrics}
        )
    means = {}
    for key in METRIC_KEYS:
        values = [s[key] for s in samples if s.get(key) is not None]
        if values:
            means[key] = round(float(sum(values) / len(values)), 6)
    return {"metrics": means, "samples": samples, "samples_dir": os.path.relpath(out, study.out_dir)}


# ------------------------------------------------------------------------------------------------- a study


def _log(message: str) -> None:
    print(f"perturb: {message}", flush=True)


def run_variant(study: StudyConfig, name: str, base, scorer: Scorer) -> dict:
    from trainer.config import config_from_dict

    folder = variant_dir(study, name)
    done = os.path.join(folder, "result.json")
    if os.path.exists(done):
        _log(f"{name}: done already ({done}), skipped")
        return read_json(done)
    os.makedirs(folder, exist_ok=True)
    config = variant_train_config(study, name, base)
    typed = config_from_dict(config)  # validated before a launch
    train_dir = config["out_dir"]
    config_path = os.path.join(folder, "run.yaml")
    import yaml

    Path(config_path).write_text(yaml.safe_dump(config, sort_keys=False))
    t0 = time.perf_counter()
    weights_dir = os.path.join(folder, "weights")
    os.makedirs(weights_dir, exist_ok=True)
    paths = {s: os.path.join(weights_dir, f"step{s:08d}.safetensors") for s in study.eval_steps}
    if not all(os.path.exists(p) for p in paths.values()):
        if not os.path.isdir(checkpoint_dir(train_dir, study.steps, study.steps)):
            _log(f"{name}: training {study.steps} steps ({typed.phases[0].trainable})")
            launch_training(study, config_path, os.path.join(folder, "train.log"))
        for step, path in paths.items():
            step_weights(typed, train_dir, step, study.steps, path)
    train_s = time.perf_counter() - t0
    steps = {}
    for step, path in paths.items():
        _log(f"{name}: evaluating step {step}")
        steps[str(step)] = evaluate_weights(
            study, path, typed.model.model_dir, os.path.join(folder, "samples", f"step{step:08d}"), scorer
        )
    model_key, trainable, targets = VARIANTS[name]
    result = {
        "variant": name,
        "id": variant_id(name),
        "base": model_key,
        "base_weights": os.path.abspath(study.models[model_key]),
        "trainable": trainable,
        "lora_targets": targets,
        "group": trained_group(name),
        "steps": steps,
        "weights": {str(s): os.path.relpath(p, study.out_dir) for s, p in paths.items()},
        "train_s": round(train_s, 1),
    }
    if not study.keep_checkpoints:
        shutil.rmtree(os.path.join(train_dir, "ckpt"), ignore_errors=True)
    write_json_atomic(done, result)
    return result


def run_base(study: StudyConfig, key: str, model_dir: str, scorer: Scorer) -> dict:
    folder = os.path.join(study.out_dir, "bases", key)
    done = os.path.join(folder, "result.json")
    if os.path.exists(done):
        return read_json(done)
    _log(f"evaluating base model {key}")
    ev = evaluate_weights(study, study.models[key], model_dir, os.path.join(folder, "samples"), scorer)
    result = {"base": key, "weights": os.path.abspath(study.models[key]), **ev}
    write_json_atomic(done, result)
    return result


def table(study: StudyConfig, variants: dict, bases: dict) -> list[dict]:
    """Table 3's shape: one row per variant (and base model), the metric means at each evaluated step."""
    rows = []
    for key, res in bases.items():
        rows.append({"row": key, "base": key, "group": None, "steps": {"0": res["metrics"]}})
    for name in study.variants:
        res = variants[name]
        rows.append(
            {
                "row": name,
                "base": res["base"],
                "group": res["group"],
                "steps": {s: v["metrics"] for s, v in res["steps"].items()},
            }
        )
    return rows


def run_study(study: StudyConfig) -> dict:
    from trainer.config import load_config
    from trainer.perturb.report import write_report

    base = load_config(study.base_config)
    os.makedirs(study.out_dir, exist_ok=True)
    write_json_atomic(os.path.join(study.out_dir, "study-config.json"), study.as_dict())
    scorer = Scorer(study, base.model.model_dir)
    bases = {}
    if study.eval.eval_base:
        for key in sorted({VARIANTS[v][0] for v in study.variants}):
            bases[key] = run_base(study, key, base.model.model_dir, scorer)
    variants = {name: run_variant(study, name, base, scorer) for name in study.variants}
    data = {
        "name": study.name,
        "config": study.as_dict(),
        "metrics": [k for k in METRIC_KEYS],
        "skipped_metrics": scorer.skipped,
        "eval_steps": study.eval_steps,
        "bases": bases,
        "variants": variants,
        "table": table(study, variants, bases),
    }
    write_json_atomic(os.path.join(study.out_dir, "study.json"), data)
    write_report(study.out_dir, data)
    _log(f"wrote {os.path.join(study.out_dir, 'study.json')} and report.html")
    return data


__all__ = ["run_study", "variant_train_config", "write_json_atomic"]
