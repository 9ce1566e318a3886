"""`latentcrafter eval`: metrics over a folder of videos -> per-video JSON, eval.json and a self-contained HTML report."""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import re
import sys
import time
from pathlib import Path

import numpy as np

from evaluation.config import METRICS, EvalConfig


def parse_args(argv: list[str] | None) -> EvalConfig:
    parser = argparse.ArgumentParser(
        prog="latentcrafter eval",
        description="Video metrics over a folder of mp4/gif videos: CLIPSIM, CLIP-Temp (--clip), motion / static "
        "ratio / warp error (OpenCV DIS flow), LAION aesthetic (--aesthetic + --aesthetic-clip) and FVD (--real + "
        "--i3d). Every model is read from a local path; a metric without its weights is skipped with a message.",
    )
    parser.add_argument("videos", help="folder of videos to evaluate")
    # each option's help is its field's comment in evaluation/config.py
    comments = dict(re.findall(r"^\s+(\w+): [^#\n]*#\s*(.*)$", inspect.getsource(EvalConfig), re.M))
    for field in dataclasses.fields(EvalConfig):
        if field.name in ("videos", "progress"):
            continue
        flag = "--" + field.name.replace("_", "-")
        kind = {"int": int, "float": float}.get(str(field.type), str)
        parser.add_argument(
            flag,
            type=kind,
            default=field.default,
            help=f"{comments.get(field.name, '')} (default: {field.default})",
        )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = vars(parser.parse_args(argv))
    args["progress"] = not args.pop("no_progress")
    return EvalConfig(**args)


def _skip(skipped: dict, name: str, message: str) -> None:
    skipped[name] = message
    print(f"eval: {name} skipped: {message}", file=sys.stderr)


def load_models(cfg: EvalConfig, device: str, skipped: dict) -> dict:
    """The metric models that are available; the others are recorded in `skipped` with the option to set."""
    from evaluation.aesthetic import AestheticScorer
    from evaluation.clip import ClipEmbedder
    from evaluation.fvd import FVDProtocol, load_i3d

    models: dict = {}
    if not cfg.clip:
        _skip(skipped, "clipsim", "no CLIP model: set --clip DIR (a local transformers CLIP folder)")
    elif not Path(cfg.clip).exists():
        _skip(
            skipped, "clipsim", f"{cfg.clip} does not exist: set --clip to a local transformers CLIP folder"
        )
    else:
        models["clip"] = ClipEmbedder(cfg.clip, device=device)
    if "clipsim" in skipped:
        skipped["clip_temp"] = skipped["clipsim"]
    if not cfg.aesthetic or not cfg.aesthetic_clip:
        missing = "--aesthetic FILE" if not cfg.aesthetic else "--aesthetic-clip DIR"
        _skip(
            skipped, "aesthetic", f"no aesthetic predictor: set {missing} (LAION linear head + CLIP ViT-L/14)"
        )
    elif not Path(cfg.aesthetic).is_file() or not Path(cfg.aesthetic_clip).exists():
        bad = "--aesthetic" if not Path(cfg.aesthetic).is_file() else "--aesthetic-clip"
        _skip(skipped, "aesthetic", f"{bad} points at nothing on disk: set {bad} to the local weights")
    else:
        models["aesthetic"] = AestheticScorer(cfg.aesthetic, cfg.aesthetic_clip, device=device)
    protocol = FVDProtocol(
        num_frames=cfg.fvd_frames, stride=cfg.fvd_stride, size=cfg.fvd_size, max_samples=cfg.fvd_max_samples
    )
    if not cfg.real or not cfg.i3d:
        missing = " and ".join(o for o, v in (("--real DIR", cfg.real), ("--i3d FILE", cfg.i3d)) if not v)
        _skip(skipped, "fvd", f"set {missing} (real videos + StyleGAN-V's i3d_torchscript.pt)")
    elif not Path(cfg.i3d).is_file():
        _skip(skipped, "fvd", f"{cfg.i3d} does not exist: set --i3d to StyleGAN-V's i3d_torchscript.pt")
    else:
        protocol.detector = Path(cfg.i3d).name
        models["i3d"], models["fvd_protocol"] = load_i3d(cfg.i3d, device), protocol
    return models


def evaluate_video(path: Path, prompt: str | None, cfg: EvalConfig, models: dict, collector=None) -> dict:
    """All per-video metrics of one video (None where a metric does not apply)."""
    from evaluation.clip import clip_temp, clipsim
    from evaluation.motion import motion_metrics
    from evaluation.videos import read_video

    frames = read_video(path, cfg.max_frames)
    record = {"name": path.name, "path": str(path), "prompt": prompt, "num_frames": int(len(frames))}
    record["height"], record["width"] = int(frames.shape[1]), int(frames.shape[2])
    record.update(motion_metrics(frames, static_threshold=cfg.static_threshold, size=cfg.motion_size))
    if "clip" in models:
        images = models["clip"].embed_images(frames, cfg.batch_size)
        record["clip_temp"] = clip_temp(images)
        record["clipsim"] = clipsim(images, models["clip"].embed_texts([prompt])[0]) if prompt else None
    if "aesthetic" in models:
        record["aesthetic"] = models["aesthetic"].score(frames)
    if collector is not None:
        record["fvd_clip"] = collector.add(frames)
    return record


def _progress(items, enabled: bool, desc: str):
    from tqdm import tqdm

    return tqdm(items, desc=desc, unit="video", disable=not enabled)


def load_eval(path: str) -> dict:
    """An eval.json, given itself or its folder."""
    p = Path(path)
    p = p / "eval.json" if p.is_dir() else p
    if not p.is_file():
        raise FileNotFoundError(f"{p}: no eval.json; set --against to an eval output folder or its eval.json")
    return json.loads(p.read_text())


def compare(ours: dict, theirs: dict) -> dict:
    """Side by side: each set-level metric of both runs and the delta (ours - theirs); FVD protocol check."""
    rows = {}
    for key in (*METRICS, "fvd"):
        a, b = ours["metrics"].get(key), theirs["metrics"].get(key)
        rows[key] = {"ours": a, "theirs": b, "delta": (a - b) if a is not None and b is not None else None}
    a_proto, b_proto = (ours.get("fvd") or {}).get("protocol"), (theirs.get("fvd") or {}).get("protocol")
    note = None
    if a_proto and b_proto and a_proto != b_proto:
        note = f"FVD protocols differ ({a_proto} vs {b_proto}): the FVD values are not comparable"
    return {"videos": theirs.get("videos_dir"), "metrics": rows, "fvd_protocol_note": note}


def run(cfg: EvalConfig) -> dict:
    from evaluation.fvd import FeatureCollector, feature_stats, frechet_distance
    from evaluation.report import write_report
    from evaluation.videos import list_videos, match_prompts, read_video

    start = time.time()
    device = cfg.resolved_device()
    out = Path(cfg.out or Path(cfg.videos) / "eval")
    videos = list_videos(cfg.videos)
    prompts = match_prompts(cfg.videos, videos, cfg.prompts)
    skipped: dict[str, str] = {}
    models = load_models(cfg, device, skipped)
    if "clip" in models and not prompts:
        _skip(skipped, "clipsim", "no prompts: add generate.json, sidecar .txt files or --prompts FILE")
    collectors = {}
    if "i3d" in models:
        kw = dict(batch_size=cfg.batch_size, device=device)
        collectors = {
            k: FeatureCollector(models["i3d"], models["fvd_protocol"], **kw) for k in ("gen", "real")
        }
    (out / "videos").mkdir(parents=True, exist_ok=True)
    records = []
    for path in _progress(videos, cfg.progress, "eval"):
        record = evaluate_video(path, prompts.get(path.name), cfg, models, collectors.get("gen"))
        (out / "videos" / f"{path.name}.json").write_text(json.dumps(record, indent=2) + "\n")
        records.append(record)
    summary = {
        "videos_dir": str(Path(cfg.videos).resolve()),
        "num_videos": len(records),
        "config": dataclasses.asdict(cfg),
        "protocol": {
            "clip": "shortest side to the CLIP input size (bicubic, antialiased), center crop, CLIP mean/std "
            "(EvalCrafter feeds unnormalised 0-255 pixels; values differ from its CLIPSIM)",
            "motion": f"OpenCV DIS flow (preset MEDIUM) at {'native size' if not cfg.motion_size else cfg.motion_size}"
            f"; static below {cfg.static_threshold} px mean magnitude",
        },
        "metrics": {},
        "counts": {},
        "skipped": skipped,
    }
    for key in METRICS:
        values = [r[key] for r in records if r.get(key) is not None]
        summary["metrics"][key] = float(np.mean(values)) if values else None
        summary["counts"][key] = len(values)
    if collectors:
        for path in _progress(list_videos(cfg.real), cfg.progress, "fvd real"):
            if cfg.fvd_max_samples and collectors["real"].count >= cfg.fvd_max_samples:
                break
            collectors["real"].add(read_video(path, cfg.max_frames))
        real, gen = collectors["real"].result(), collectors["gen"].result()
        try:
            value = frechet_distance(*feature_stats(real), *feature_stats(gen))
            summary["fvd"] = {
                "fvd": value,
                "protocol": models["fvd_protocol"].as_dict(),
                "num_real": len(real),
                "num_gen": len(gen),
                "too_short": {"real": collectors["real"].too_short, "gen": collectors["gen"].too_short},
                "real_dir": str(Path(cfg.real).resolve()),
            }
            summary["metrics"]["fvd"] = value
        except ValueError as exc:
            _skip(skipped, "fvd", f"{exc} (videos shorter than the clip are skipped: lower --fvd-frames)")
    summary["metrics"].setdefault("fvd", None)
    if cfg.against:
        summary["against"] = compare(summary, load_eval(cfg.against))
    summary["seconds"] = round(time.time() - start, 2)
    (out / "eval.json").write_text(json.dumps(summary, indent=2) + "\n")
    write_report(out / "report.html", summary, records)
    return summary


def main(argv: list[str] | None = None) -> int:
    try:
        cfg = parse_args(argv)
        summary = run(cfg)
    except (FileNotFoundError, ValueError) as exc:
        print(f"latentcrafter eval: {exc}", file=sys.stderr)
        return 2
    out = Path(cfg.out or Path(cfg.videos) / "eval")
    shown = {k: round(v, 4) for k, v in summary["metrics"].items() if v is not None}
    print(f"eval: {summary['num_videos']} videos -> {out / 'eval.json'}, {out / 'report.html'}: {shown}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
