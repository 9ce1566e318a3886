"""`latentcrafter perturb` end to end on CPU with the tiny models: bases F (joint, all) and P (temporal) trained
by the real deepspeed launcher, then a 3-variant study (F-Spa-LoRA, P-Temp-DIR, F-Spa&Temp-DIR), 2 steps each,
evaluated at steps 1 and 2; checks trained groups, reproducibility, report vs JSON, and skipping on rerun."""

from __future__ import annotations

import json
import re
import shutil

import pytest
import torch
import yaml

from tests.trainer.conftest import launch, run_config, tail, write_config

VARIANTS = ["F-Spa-LoRA", "P-Temp-DIR", "F-Spa&Temp-DIR"]


@pytest.fixture(scope="module")
def bases(tmp_path_factory, trainer_shards, tiny_models):
    """F: one `trainable: all` step; P: one `trainable: temporal` step after it (video batches only)."""
    out = tmp_path_factory.mktemp("perturb_bases") / "out"
    config = run_config(trainer_shards, tiny_models, out, every_ckpt=10, steps=(1, 1, 1))
    joint = {**config["phases"][0], "name": "joint"}
    video = {**joint["data"], "sources": [x for x in joint["data"]["sources"] if x["name"] == "webvid"]}
    temporal = {**joint, "name": "temporal", "trainable": "temporal", "data": video}
    config["phases"] = [joint, temporal]
    config["preview"]["at_phase_end"] = False
    config["ema"]["enabled"] = False
    path = write_config(out.parent / "base.yaml", config)
    proc = launch(path, ranks=1)
    assert proc.returncode == 0, tail(proc)
    return {
        "F": out / "export" / "joint.safetensors",
        "P": out / "export" / "temporal.safetensors",
        "config": path,
    }


def _study(tmp_path, bases, trainer_shards, out_name="study") -> str:
    cfg = yaml.safe_load(open(bases["config"]))
    data = dict(cfg["phases"][0]["data"])  # webvid + laion_coco at 256x256 (jdb is 512x320 only here)
    study = {
        "name": "test-perturb",
        "out_dir": str(tmp_path / out_name),
        "base_config": str(bases["config"]),
        "models": {"F": str(bases["F"]), "P": str(bases["P"])},
        "data": data,
        "temporal_data": cfg["phases"][1]["data"],  # video only: a temporal-only phase refuses image batches
        "stage": "256x256",
        "global_batch_size": 1,
        "optim": {"lr": 1.0e-2, "warmup_steps": 0},
        "lora": {"rank": 2, "alpha": 4.0, "modules": ["attention"]},
        "steps": 2,
        "eval_steps": [1, 2],
        "variants": VARIANTS,
        "seed": 0,
        "num_gpus": 1,
        "launcher": "deepspeed",
        "eval": {
            "prompts": ["a dog runs along the beach", "a red car"],
            "seed": 7,
            "frames": 4,
            "size": "64x64",
            "ddim_steps": 2,
            "cfg": 2.0,
            "device": "cpu",
        },
    }
    path = tmp_path / f"{out_name}.yaml"
    path.write_text(yaml.safe_dump(study, sort_keys=False))
    return str(path)


@pytest.fixture(scope="module")
def study(tmp_path_factory, bases, trainer_shards, monkeypatch_module):
    from pipelines.cli import main

    tmp = tmp_path_factory.mktemp("perturb")
    path = _study(tmp, bases, trainer_shards)
    assert main(["perturb", "--config", path]) == 0
    return {"path": path, "out": tmp / "study", "tmp": tmp}


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    mp.setenv("OMP_NUM_THREADS", "1")
    yield mp
    mp.undo()


def _load(path):
    from safetensors.torch import load_file

    return load_file(str(path))


def test_grid_runs_end_to_end(study):
    data = json.loads((study["out"] / "study.json").read_text())
    assert list(data["variants"]) == VARIANTS
    assert [r["row"] for r in data["table"]] == ["F", "P", *VARIANTS]
    for name in VARIANTS:
        steps = data["variants"][name]["steps"]
        assert sorted(steps) == ["1", "2"]
        for s in steps.values():
            assert {"motion", "static_ratio", "warp_error", "clip_temp", "clipsim"} <= set(s["metrics"])
    html = (study["out"] / "report.html").read_text()
    assert "data:image/png;base64," in html and "data:video/mp4;base64," in html


def test_each_variant_trains_exactly_its_group(study, bases):
    from trainer.model import build_unet, spatial_temporal_parameters

    model = build_unet("tiny")
    spatial, temporal = spatial_temporal_parameters(model)
    names = {id(p): n for n, p in model.named_parameters()}
    groups = {"spatial": {names[id(p)] for p in spatial}, "temporal": {names[id(p)] for p in temporal}}
    groups["all"] = groups["spatial"] | groups["temporal"]
    data = json.loads((study["out"] / "study.json").read_text())
    for name in VARIANTS:
        res = data["variants"][name]
        base = _load(bases[res["base"]])
        after = _load(study["out"] / res["weights"]["2"])
        assert set(after) == set(base)
        trained = groups[res["group"]]
        for key in base:
            if key not in trained:
                assert torch.equal(after[key], base[key]), (name, key)
        moved = {k for k in trained if k in base and not torch.equal(after[k], base[k])}
        assert moved, name
        if res["group"] != "all":
            other = "temporal" if res["group"] == "spatial" else "spatial"
            assert not moved & groups[other]
        if name == "F-Spa&Temp-DIR":
            assert moved & groups["spatial"] and moved & groups["temporal"]


def test_report_numbers_equal_the_json(study):
    from trainer.perturb.report import fmt

    data = json.loads((study["out"] / "study.json").read_text())
    html = (study["out"] / "report.html").read_text()
    cells = re.findall(r'<td data-row="([^"]+)" data-step="(\d+)" data-metric="(\w+)">([^<]*)</td>', html)
    assert cells
    rows = {r["row"].replace("&", "&amp;"): r for r in data["table"]}
    seen = 0
    for row, step, metric, text in cells:
        value = rows[row]["steps"].get(step, {}).get(metric)
        assert text == fmt(value), (row, step, metric)
        seen += value is not None
    assert seen == sum(len(m) for r in data["table"] for m in r["steps"].values())


def test_rerun_skips_finished_variants_and_same_config_gives_same_table(study, bases, trainer_shards):
    from pipelines.cli import main

    out = study["out"]
    stamps = {p: p.stat().st_mtime_ns for p in out.glob("variants/*/result.json")}
    assert len(stamps) == len(VARIANTS)
    before = json.loads((out / "study.json").read_text())
    # a crash after the first variant: only its result.json is left; the rerun redoes the others
    victim = out / "variants" / "p-temp-dir"
    shutil.rmtree(victim)
    assert main(["perturb", "--config", study["path"]]) == 0
    after = json.loads((out / "study.json").read_text())
    for p, t in stamps.items():
        if victim not in p.parents:
            assert p.stat().st_mtime_ns == t, p  # not redone
    assert (victim / "result.json").exists()
    assert after["table"] == before["table"]  # the retrained variant reproduces its numbers exactly
