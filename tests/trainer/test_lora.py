"""LoRA phases (`trainable: lora`, trainer.lora through peft) under the real deepspeed launcher (2 CPU ranks).

Unit checks first (no launcher): which layers get adapters (spatial / temporal by the one module-type rule, both
model families), the merge arithmetic, and `load_adapter` against peft's own forward. Then three launches:

1. ZeRO-2, fp32: a full phase (1 step) -> LoRA on spatial attention (2 steps) -> LoRA on temporal attention and
   convs (3 steps), rank 0 SIGKILLed in the save at the last step; checkpoints at the phase ends and step 4;
2. `--resume` from step 4 (inside the temporal LoRA phase, whose base is the spatial LoRA phase's merged end);
3. ZeRO-3: one LoRA phase straight from the initial weights (SD inflation), all targets, killed in the save at
   its last step, then resumed from step 1 (the base rebuilt from the initial weights).
"""

from __future__ import annotations

import json
import os

import pytest
import torch

from tests.trainer.conftest import launch, read_metrics, run_config, tail, write_config

STEPS = (1, 2, 3)  # phase ends at global steps 1, 3, 6
KILL_AT = 6
LORA_S = {"rank": 4, "alpha": 8.0, "targets": "spatial"}
LORA_T = {"rank": 2, "alpha": 2.0, "targets": "temporal", "modules": ["attention", "conv"]}


def _phases(config):
    full, second, third = config["phases"]
    second = {**second, "stage": "256x256", "data": full["data"], "trainable": "lora", "lora": LORA_S}
    # temporal adapters only: video batches (image batches skip the temporal modules)
    video = {**full["data"], "sources": [s for s in full["data"]["sources"] if s["name"] == "webvid"]}
    third = {**third, "stage": "256x256", "data": video, "trainable": "lora", "lora": LORA_T}
    second["name"], third["name"] = "lora-s", "lora-t"
    for p in (second, third):
        p["optim"] = {"lr": 1.0e-2, "warmup_steps": 0}
    return [full, second, third]


# ---------------------------------------------------------------------------------------------- unit checks


@pytest.mark.parametrize("unet", ["tiny", "vc2-t2v-tiny"])
def test_spatial_and_temporal_targets_follow_the_module_type_rule(unet):
    from trainer.lora import select_modules, temporal_module_names
    from trainer.model import VideoCrafterModel, build_unet, spatial_temporal_parameters
    from trainer.model.presets import get_preset

    if unet == "tiny":
        model = build_unet("tiny")
    else:
        p = get_preset(unet)
        model = VideoCrafterModel(p.unet, p.image_proj, preset=p.name)
    temporal = temporal_module_names(model)
    spatial_names = select_modules(model, "spatial", ["attention"])
    temporal_names = select_modules(model, "temporal", ["attention"])
    assert spatial_names and temporal_names and not set(spatial_names) & set(temporal_names)
    assert sorted(spatial_names + temporal_names) == sorted(select_modules(model, "all", ["attention"]))
    assert all(n.rsplit(".", 1)[-1] in ("to_q", "to_k", "to_v", "to_out", "0") for n in spatial_names)
    # the parameter groups agree: a spatial layer's weight is a spatial parameter, and the reverse
    _, temporal_params = spatial_temporal_parameters(model)
    tids = {id(p) for p in temporal_params}
    modules = dict(model.named_modules())
    assert all(id(modules[n].weight) not in tids for n in spatial_names)
    assert all(id(modules[n].weight) in tids and n in temporal for n in temporal_names)
    assert select_modules(model, "temporal", ["conv"])  # temporal convs as an option


def test_load_adapter_matches_peft_forward_and_merge(tmp_path):
    from trainer.config import LoraConfig
    from trainer.lora import adapter_metadata, inject, load_adapter, merge, merge_state_dict, write_adapter

    torch.manual_seed(0)

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.to_q = torch.nn.Linear(6, 6)
            self.conv = torch.nn.Conv2d(6, 3, 3, padding=1)

        def forward(self, x):
            return self.conv(self.to_q(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2))

    net = Net()
    base = {k: v.clone() for k, v in net.state_dict().items()}
    cfg = LoraConfig(rank=2, alpha=6.0, targets="all", modules=["to_q", "conv"])
    names = inject(net, cfg, seed=1)
    assert names == ["to_q", "conv"]
    assert {n for n, p in net.named_parameters() if p.requires_grad} == {
        f"{m}.lora_{ab}.default.weight" for m in names for ab in "AB"
    }
    for n, p in net.named_parameters():
        if ".lora_B." in n:
            torch.nn.init.normal_(p)
    x = torch.randn(2, 6, 4, 4)
    with torch.no_grad():
        want = net(x)
    state = net.state_dict()
    merged = merge_state_dict(state, 3.0)
    assert set(merged) == set(base)
    a, b = state["to_q.lora_A.default.weight"], state["to_q.lora_B.default.weight"]
    torch.testing.assert_close(merged["to_q.weight"], base["to_q.weight"] + 3.0 * b @ a)
    assert torch.equal(merged["to_q.bias"], base["to_q.bias"])
    path = write_adapter(str(tmp_path / "a.safetensors"), state, adapter_metadata(cfg, names))
    fresh = Net()
    fresh.load_state_dict(base)
    assert load_adapter(fresh, path, scale=1.0) == 2
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), want, rtol=1e-5, atol=1e-5)
    half = merge(base, path, scale=0.5)
    torch.testing.assert_close(half["to_q.weight"], base["to_q.weight"] + 1.5 * b @ a)


def test_lora_config_is_checked():
    from trainer.config import LoraConfig, PhaseConfig

    data = {"sources": [{"name": "x", "urls": ["x.tar"]}]}
    phase = PhaseConfig(
        name="p", stage="256x256", steps=1, global_batch_size=1, data=data, trainable="lora", lora={"rank": 2}
    )
    assert phase.lora == LoraConfig(rank=2) and phase.lora.modules == ["attention"]
    for bad in ({"rank": 0}, {"targets": "both"}, {"modules": []}, {"dropout": 1.0}):
        with pytest.raises(ValueError, match="lora"):
            LoraConfig(**bad)


# ------------------------------------------------------------------------------------------------ launches


@pytest.fixture(scope="module")
def runs(tmp_path_factory, trainer_shards, tiny_models):
    out = tmp_path_factory.mktemp("lora") / "out"
    config = run_config(trainer_shards, tiny_models, out, every_ckpt=4, steps=STEPS)
    config["phases"] = _phases(config)
    config["preview"]["at_phase_end"] = False  # the ZeRO-3 run writes a LoRA preview
    path = write_config(out.parent / "run.yaml", config)
    killed = launch(path, env_extra={"LATENTCRAFTER_TEST_KILL_IN_SAVE": str(KILL_AT)})
    metrics_after_kill = read_metrics(out)
    latest_after_kill = (out / "ckpt" / "latest").read_text()
    resumed = launch(path, resume=True)
    assert resumed.returncode == 0, tail(resumed)
    return {
        "out": out,
        "config": config,
        "killed": killed,
        "latest_after_kill": latest_after_kill,
        "metrics_after_kill": metrics_after_kill,
        "metrics": read_metrics(out),
    }


def _adapter(path):
    from trainer.lora import read_adapter

    return read_adapter(str(path))


def _check_merged(before, after, adapter_path, *, moved=None):
    """after == before + scale * B @ A on the adapted layers (computed here), bit-identical elsewhere; every
    adapted layer in `moved` (default: all) changed."""
    layers, meta = _adapter(adapter_path)
    scale = float(meta["alpha"]) / int(meta["rank"])
    assert set(after) == set(before)
    adapted = {f"{layer}.weight" for layer in layers}
    for key in before:
        if key in adapted:
            a, b = layers[key[: -len(".weight")]]["A"], layers[key[: -len(".weight")]]["B"]
            want = before[key] + scale * (b.flatten(1) @ a.flatten(1)).reshape(before[key].shape)
            torch.testing.assert_close(after[key], want, rtol=0, atol=1e-6)
            layer = key[: -len(".weight")]
            assert (moved is not None and layer not in moved) or not torch.equal(after[key], before[key]), key
        else:
            assert torch.equal(after[key], before[key]), key
    return layers, meta


def test_lora_phases_change_only_adapters_and_merge_exactly(runs):
    from safetensors.torch import load_file

    from trainer.lora import temporal_module_names
    from trainer.model import build_unet

    export = runs["out"] / "export"
    full = load_file(export / "vc1-256.safetensors")
    lora_s = load_file(export / "lora-s.safetensors")
    lora_t = load_file(export / "lora-t.safetensors")  # written by the resumed launch
    layers_s, meta_s = _check_merged(full, lora_s, export / "lora-s-lora.safetensors")
    layers_t, meta_t = _check_merged(lora_s, lora_t, export / "lora-t-lora.safetensors")
    temporal = temporal_module_names(build_unet("tiny"))
    assert layers_s and not set(layers_s) & temporal  # spatial targets never touch temporal modules
    assert layers_t and set(layers_t) <= temporal  # and the reverse
    assert any("conv" in n for n in layers_t)
    assert (meta_s["rank"], meta_s["alpha"], meta_s["targets"]) == ("4", "8.0", "spatial")
    assert json.loads(meta_t["modules"]) == ["attention", "conv"]
    assert sorted(json.loads(meta_s["target_modules"])) == sorted(layers_s)
    # the merged files load like any other export; the EMA export is plain weights too
    model = build_unet("tiny")
    model.load_state_dict(lora_t, strict=True)
    assert set(load_file(export / "lora-t-ema.safetensors")) == set(lora_t)
    assert os.path.exists(export / "lora-t-ema-lora.safetensors")
    assert all(k.startswith("base_model.model.") for k in load_file(export / "lora-s-lora.safetensors"))


def test_lora_checkpoints_hold_only_the_adapters(runs):
    ckpt = runs["out"] / "ckpt"
    end = ckpt / "step00000003-end-lora-s"
    state = json.loads((end / "trainer_state.json").read_text())
    assert state["lora"]["base"] == "step00000001-end-vc1-256"
    assert not (end / "frozen.safetensors").exists()
    (model_file,) = (end / "state").glob("*model_states.pt")
    module = torch.load(model_file, map_location="cpu", weights_only=False)["module"]
    assert module and all(".lora_A." in k or ".lora_B." in k for k in module), sorted(module)[:5]
    from safetensors.torch import load_file

    assert all(".lora_" in k for k in load_file(end / "ema.safetensors"))


def test_resume_mid_lora_phase_reproduces_losses(runs):
    assert runs["killed"].returncode != 0, tail(runs["killed"])
    assert runs["latest_after_kill"] == "step00000004"
    first = {r["global_step"]: r for r in runs["metrics_after_kill"]}
    assert sorted(first) == list(range(1, KILL_AT + 1))
    launches = {r["launch"] for r in runs["metrics_after_kill"]}
    again = [r for r in runs["metrics"] if r["launch"] not in launches]
    assert [r["global_step"] for r in again] == [5, 6]
    for r in again:
        ref = first[r["global_step"]]
        assert r["phase"] == ref["phase"] == "lora-t"
        assert r["keys"] == ref["keys"]
        assert r["loss"] == ref["loss"] and r["grad_norm"] == ref["grad_norm"]  # CPU fp32: bit-identical


def test_zero3_lora_phase_from_initial_weights(tmp_path, trainer_shards, tiny_models):
    from safetensors.torch import load_file

    from trainer.config import config_from_dict
    from trainer.lora import select_modules
    from trainer.model import build_unet
    from trainer.phases import build_module, initial_weights

    config = run_config(trainer_shards, tiny_models, tmp_path / "out", every_ckpt=1, steps=(2, 1, 1))
    config["phases"] = [
        {**_phases(config)[1], "steps": 2, "lora": {"rank": 2, "alpha": 4.0, "targets": "all"}}
    ]
    config["deepspeed"]["zero_stage"] = 3
    config["preview"]["at_phase_end"] = True  # write_preview merges the adapters into the base
    path = write_config(tmp_path / "run.yaml", config)
    killed = launch(path, env_extra={"LATENTCRAFTER_TEST_KILL_IN_SAVE": "2"})
    assert killed.returncode != 0 and (tmp_path / "out" / "ckpt" / "latest").read_text() == "step00000001"
    first = {r["global_step"]: r for r in read_metrics(tmp_path / "out")}
    proc = launch(path, resume=True)
    assert proc.returncode == 0, tail(proc)
    (again,) = [r for r in read_metrics(tmp_path / "out") if r["launch"] != first[1]["launch"]]
    assert again["global_step"] == 2 and again["keys"] == first[2]["keys"]
    assert again["loss"] == first[2]["loss"] and again["grad_norm"] == first[2]["grad_norm"]
    typed = config_from_dict(config)
    module = build_module(typed)
    initial_weights(module, typed)
    before = {k: v.float() for k, v in module.state_dict().items()}
    after = load_file(tmp_path / "out" / "export" / "lora-s.safetensors")
    # SD inflation zero-initialises the temporal transformers' proj_out (frozen here): their adapters get no
    # gradient, so only the spatial ones must move
    spatial = set(select_modules(build_unet("tiny"), "spatial", ["attention"]))
    adapter = tmp_path / "out" / "export" / "lora-s-lora.safetensors"
    layers, _ = _check_merged(before, after, adapter, moved=spatial)
    assert len(layers) == 120  # every attention projection, spatial and temporal
    state = json.loads(
        (tmp_path / "out" / "ckpt" / "step00000002-end-lora-s" / "trainer_state.json").read_text()
    )
    assert state["lora"]["base"] == "initial"
    assert len(list((tmp_path / "out" / "previews").glob("step00000002-lora-s-*.mp4"))) == 1
