"""Signal scaling and DDIM parity with VideoCrafter's own DDIMSampler (tests/fixtures/videocrafter, commit 11bcd76)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from trainer.diffusion import DDIMSampler, Diffusion, SignalScale

FIX = Path(__file__).resolve().parents[1] / "fixtures" / "videocrafter" / "vc2_t2v_tiny"
RTOL = 1e-3  # the fixture README's bound: max|actual - expected| <= 1e-3 * max|expected|


@pytest.fixture(scope="module")
def ref() -> tuple[dict[str, torch.Tensor], dict]:
    return load_file(str(FIX / "ddim_ref.safetensors")), json.loads((FIX / "ddim_ref.json").read_text())


def _diffusion(meta: dict) -> Diffusion:
    return Diffusion(
        prediction=meta["parameterization"],
        num_timesteps=meta["timesteps"],
        beta_start=meta["linear_start"],
        beta_end=meta["linear_end"],
        use_scale=meta["use_scale"],
        scale_a=meta["scale_a"],
        scale_b=meta["scale_b"],
        mid_step=meta["mid_step"],
        fix_scale_bug=meta["fix_scale_bug"],
    )


def _rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual.double() - expected.double()).abs().max() / expected.double().abs().max())


def test_schedule_and_scale_arr_match(ref):
    t, meta = ref
    d = _diffusion(meta)
    torch.testing.assert_close(d.alphas_cumprod.float(), t["buffers.alphas_cumprod"], rtol=0, atol=0)
    assert d.scale_arr is not None and d.scale_arr.shape == (meta["scale_arr_len"],) == (1400,)
    torch.testing.assert_close(d.scale_arr, t["buffers.scale_arr"], rtol=0, atol=0)
    # the fixed variant (the 1024 model: scale_b 0.3) has length num_timesteps and the same values
    fixed = SignalScale(True, 1.0, 0.3, 400, fix_scale_bug=True).build(1000)
    assert fixed.shape == (1000,)
    torch.testing.assert_close(fixed, SignalScale(True, 1.0, 0.3, 400).build(1000)[:1000], rtol=0, atol=0)
    assert (
        fixed[0].item() == 1.0
        and fixed[399].item() == pytest.approx(0.3)
        and fixed[-1].item() == pytest.approx(0.3)
    )


def test_q_sample_with_scaling(ref):
    t, meta = ref
    d = _diffusion(meta)
    x0, noise, ts = t["q_sample.x0"].float(), t["q_sample.noise"].float(), t["q_sample.t"]
    assert ts.tolist() == meta["q_sample"]["t"]
    out = d.q_sample(x0, ts, noise)
    torch.testing.assert_close(out, t["q_sample.out"], atol=1e-4, rtol=1e-4)
    ab, s = d.alphas_cumprod[ts].view(-1, 1, 1, 1, 1), d.scale_arr[ts].double().view(-1, 1, 1, 1, 1)
    expected = x0.double() * s * ab.sqrt() + (1 - ab).sqrt() * noise.double()
    torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=1e-5)


def test_ddim_timesteps_and_arrays(ref):
    t, meta = ref
    sampler = DDIMSampler(_diffusion(meta), steps=meta["ddim_steps"], eta=meta["ddim_eta"])
    assert (
        sampler.timesteps.tolist()
        == meta["sampling_order_t"]
        == t["step.t"].tolist()
        == [801, 601, 401, 201, 1]
    )
    arrays = sampler.schedule_arrays()
    assert arrays["ddim_timesteps"].tolist() == meta["ddim_timesteps_ascending"]
    for name, rec in meta["sampler_arrays"].items():
        expected = torch.tensor(rec["values_ddim_index_order"], dtype=torch.float64)
        torch.testing.assert_close(arrays[name], expected, rtol=1e-7, atol=1e-8, msg=name)
    # step coefficients (sampling order): the last step's "prev" is index 0, alphas_cumprod[0] != 1, scale 1
    co = meta["step_coefficients_float32"]
    d = sampler.diffusion
    assert [float(d.alphas_cumprod[p]) for p in sampler.prev_timesteps] == pytest.approx(
        co["a_prev"], rel=1e-7
    )
    assert [d.scale_at(int(p)) for p in sampler.prev_timesteps] == pytest.approx(co["scale_t_prev"], rel=1e-7)
    assert [d.scale_at(int(s)) for s in sampler.timesteps] == pytest.approx(co["scale_t"], rel=1e-7)


def _replayed_eps(t: dict[str, torch.Tensor], run: str, meta: dict, i: int) -> torch.Tensor:
    """The (guided) eps VideoCrafter's U-Net gave at step i, from the recorded x_t and pred_x0 (pred_x0 is already
    divided by scale_t): eps = (x_t - sqrt(a_t) * scale_t * pred_x0) / sqrt(1 - a_t), in float64."""
    co = meta["step_coefficients_float32"]
    x_t = (t["x_T"] if i == 0 else t[f"{run}.x_steps"][i - 1]).double()
    a_t = torch.tensor(co["a_t"][i], dtype=torch.float32).double()
    scale_t = torch.tensor(co["scale_t"][i], dtype=torch.float32).double()
    sqrt_1ma = torch.tensor(co["sqrt_one_minus_at"][i], dtype=torch.float32).double()
    return ((x_t - a_t.sqrt() * scale_t * t[f"{run}.pred_x0_steps"][i].double()) / sqrt_1ma).float()


@pytest.mark.parametrize("run", ["cfg1", "cfg12"])
def test_replayed_ddim_matches_every_step(ref, run):
    """Free-running: our sampler's step() from x_T, fed at each step the eps VideoCrafter's U-Net produced (for cfg12
    the guided eps e_u + 12 (e_c - e_u): only it is recoverable from the record, and it is what the update uses)."""
    t, meta = ref
    sampler = DDIMSampler(_diffusion(meta), steps=meta["ddim_steps"], eta=meta["ddim_eta"])
    x = t["x_T"].float()
    errs = []
    for i in range(len(sampler.timesteps)):
        x, pred_x0 = sampler.step(_replayed_eps(t, run, meta, i), x, i)
        errs.append((_rel_err(x, t[f"{run}.x_steps"][i]), _rel_err(pred_x0, t[f"{run}.pred_x0_steps"][i])))
        assert errs[-1][0] <= RTOL and errs[-1][1] <= RTOL, (run, i, errs[-1])
    assert _rel_err(x, t[f"{run}.x_final"]) <= RTOL
    # the last step ends at alphas_cumprod[0] < 1, so x_final is not pred_x0 (VideoCrafter's convention)
    assert not torch.equal(t[f"{run}.x_final"], t[f"{run}.pred_x0_steps"][-1])
    print(run, "max rel err x / pred_x0:", max(e[0] for e in errs), max(e[1] for e in errs))


class _ReplayUNet:
    """Stands in for the U-Net inside DDIMSampler.sample: returns the recorded (guided) eps for the step of `t`,
    for both CFG halves, so that e_u + g (e_c - e_u) is exactly the recorded guided eps."""

    def __init__(self, t: dict[str, torch.Tensor], run: str, meta: dict):
        self.t, self.run, self.meta = t, run, meta
        self.order = meta["sampling_order_t"]

    def __call__(self, x, tt, context, fps, image_context=None):
        i = self.order.index(int(tt[0]))
        x_rec = self.t["x_T"] if i == 0 else self.t[f"{self.run}.x_steps"][i - 1]
        assert _rel_err(x[: x_rec.shape[0]], x_rec) <= RTOL  # the sampler reached the recorded x_t
        eps = _replayed_eps(self.t, self.run, self.meta, i)
        return eps.repeat(x.shape[0] // eps.shape[0], 1, 1, 1, 1)


@pytest.mark.parametrize("run", ["cfg1", "cfg12"])
def test_sample_api_with_replay_model(ref, run):
    t, meta = ref
    g = meta["runs"][run]["guidance"]
    sampler = DDIMSampler(_diffusion(meta), steps=meta["ddim_steps"], eta=meta["ddim_eta"])
    cond = {"context": t["context"].float(), "fps": t["fps"]}
    out = sampler.sample(
        _ReplayUNet(t, run, meta),
        tuple(t["x_T"].shape),
        cond,
        {"context": t["uc_context"].float()},
        guidance_scale=g,
        generator=torch.Generator().manual_seed(0),
        x_T=t["x_T"],
    )
    assert _rel_err(out, t[f"{run}.x_final"]) <= RTOL


def test_use_scale_off_keeps_old_behaviour():
    d, old = Diffusion(use_scale=False), Diffusion()
    assert d.scale_arr is None and d.scale_at(500) == 1.0
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(3, 4, 2, 4, 4, generator=g), torch.randn(3, 4, 2, 4, 4, generator=g)
    ts = torch.tensor([0, 400, 999])
    expected = (
        d.sqrt_ab[ts].float().view(-1, 1, 1, 1, 1) * x0 + d.sqrt_1mab[ts].float().view(-1, 1, 1, 1, 1) * noise
    )
    assert torch.equal(d.q_sample(x0, ts, noise), expected)
    assert torch.equal(old.q_sample(x0, ts, noise), expected)
    # with scaling on, the same call differs (scale < 1 at t > 0) but agrees at t = 0 (scale_arr[0] = scale_a = 1)
    scaled = Diffusion(use_scale=True).q_sample(x0, ts, noise)
    assert torch.equal(scaled[0], expected[0]) and not torch.allclose(scaled[1:], expected[1:])
    # DDIM step without scaling: the plain eta-0 update x_prev = sqrt(a_prev) x0 + sqrt(1 - a_prev) eps
    sampler = DDIMSampler(d, steps=5)
    x, eps = torch.randn(2, 4, 2, 4, 4, generator=g), torch.randn(2, 4, 2, 4, 4, generator=g)
    x_prev, x0_hat = sampler.step(eps, x, 0)
    a, a_prev = float(d.alphas_cumprod[801]), float(d.alphas_cumprod[601])
    torch.testing.assert_close(x0_hat, (x - (1 - a) ** 0.5 * eps) / a**0.5)
    torch.testing.assert_close(x_prev, a_prev**0.5 * x0_hat + (1 - a_prev) ** 0.5 * eps)
    assert sampler.schedule_arrays()["ddim_scale_arr"].tolist() == [1.0] * 5


@pytest.mark.parametrize(
    ("kwargs", "option"),
    [
        ({"scale_b": 0.0}, "scale_b"),
        ({"scale_a": -1.0}, "scale_a"),
        ({"mid_step": 0}, "mid_step"),
        ({"mid_step": 1001}, "mid_step"),
    ],
)
def test_scale_validation_names_the_option(kwargs, option):
    with pytest.raises(ValueError, match=option):
        Diffusion(use_scale=True, **kwargs)
