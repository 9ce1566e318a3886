"""Diffusion: the VideoCrafter/LDM linear noise schedule, signal scaling, q_sample, eps/v targets and the CFG-dropout loss."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F


def linear_betas(num_timesteps: int, beta_start: float, beta_end: float) -> torch.Tensor:
    """LDM/VideoCrafter "linear" schedule: linspace of sqrt(beta), squared (float64)."""
    return torch.linspace(beta_start**0.5, beta_end**0.5, num_timesteps, dtype=torch.float64) ** 2


def rescale_zero_terminal_snr(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """Lin et al. 2023 (used by DynamiCrafter): shift/scale sqrt(alpha_bar) so the last step has SNR exactly 0."""
    s = alphas_cumprod.sqrt()
    s0, st = s[0].clone(), s[-1].clone()
    s = (s - st) * s0 / (s0 - st)
    return s**2


@dataclass(frozen=True)
class SignalScale:
    """VideoCrafter's signal scaling (`use_scale` in the VC2 T2V / VC1 I2V YAMLs): x0 is multiplied by scale_arr[t]."""

    use_scale: bool = False  # on: q_sample uses scale_arr[t] * x0 and DDIM un-/re-scales pred_x0
    scale_a: float = 1.0  # scale at t = 0, start of the linear ramp
    scale_b: float = 0.7  # scale at t = mid_step - 1 and after (VC2 T2V / VC1 I2V: 0.7; the 1024 model: 0.3)
    mid_step: int = 400  # length of the linear ramp from scale_a to scale_b
    fix_scale_bug: bool = False  # False: VideoCrafter's length num_timesteps + mid_step; True: num_timesteps

    def __post_init__(self) -> None:
        if not self.scale_a > 0 or not self.scale_b > 0:
            raise ValueError(f"scale_a={self.scale_a} and scale_b={self.scale_b} must both be > 0")
        if self.mid_step < 1:
            raise ValueError(f"mid_step={self.mid_step} must be >= 1")

    def build(self, num_timesteps: int) -> torch.Tensor:
        """scale_arr exactly as VideoCrafter's ddpm3d.py: concat(linspace(a, b, mid_step), full(n, b)), float32."""
        if self.mid_step > num_timesteps:
            raise ValueError(f"mid_step={self.mid_step} must be <= num_timesteps={num_timesteps}")
        scale_step = num_timesteps - self.mid_step if self.fix_scale_bug else num_timesteps
        arr = np.concatenate(
            (np.linspace(self.scale_a, self.scale_b, self.mid_step), np.full(scale_step, self.scale_b))
        )
        return torch.tensor(arr, dtype=torch.float32)


def _expand(v: torch.Tensor, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """v[t] shaped `[B, 1, 1, ...]` to broadcast over `like`, in like's dtype/device."""
    out = v.to(like.device)[t.to(like.device).long()].to(torch.float32)
    return out.view(-1, *([1] * (like.dim() - 1)))


class Diffusion:
    """The forward process and training objective (eps prediction by default, v-prediction optional)."""

    def __init__(
        self,
        prediction: str = "eps",
        zero_snr: bool = False,
        num_timesteps: int = 1000,
        beta_start: float = 0.00085,
        beta_end: float = 0.012,
        use_scale: bool = False,
        scale_a: float = 1.0,
        scale_b: float = 0.7,
        mid_step: int = 400,
        fix_scale_bug: bool = False,
    ):
        if prediction not in ("eps", "v"):
            raise ValueError(f"Diffusion prediction={prediction!r}: use 'eps' or 'v'")
        if zero_snr and prediction != "v":
            raise ValueError("Diffusion zero_snr=True needs prediction='v' (eps is undefined at SNR 0)")
        if num_timesteps < 2 or not 0 < beta_start < beta_end < 1:
            raise ValueError("Diffusion needs num_timesteps >= 2 and 0 < beta_start < beta_end < 1")
        self.prediction, self.zero_snr, self.num_timesteps = prediction, zero_snr, num_timesteps
        alphas_cumprod = torch.cumprod(1.0 - linear_betas(num_timesteps, beta_start, beta_end), dim=0)
        if zero_snr:
            alphas_cumprod = rescale_zero_terminal_snr(alphas_cumprod)
        self.alphas_cumprod = alphas_cumprod  # float64 [T]
        self.sqrt_ab = alphas_cumprod.sqrt()
        self.sqrt_1mab = (1.0 - alphas_cumprod).sqrt()
        self.signal_scale = SignalScale(use_scale, scale_a, scale_b, mid_step, fix_scale_bug)
        # float32 [T + mid_step] (or [T] with fix_scale_bug) when use_scale, else None
        self.scale_arr: torch.Tensor | None = self.signal_scale.build(num_timesteps) if use_scale else None

    def scale_at(self, t: int) -> float:
        """scale_arr[t] as a Python float (1.0 without use_scale)."""
        return 1.0 if self.scale_arr is None else float(self.scale_arr[t])

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """x_t = sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t) noise; x0 is times scale_arr[t] with use_scale."""
        if (
            self.scale_arr is not None
        ):  # VideoCrafter's order: sqrt_ab[t] * x0 * scale_arr[t] + sqrt_1mab[t] * noise
            return (
                _expand(self.sqrt_ab, t, x0) * x0.float() * _expand(self.scale_arr, t, x0)
                + _expand(self.sqrt_1mab, t, x0) * noise.float()
            ).to(x0.dtype)
        return (
            _expand(self.sqrt_ab, t, x0) * x0.float() + _expand(self.sqrt_1mab, t, x0) * noise.float()
        ).to(x0.dtype)

    def target(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """What the network regresses: eps, or v = sqrt(ab) eps - sqrt(1-ab) x0.

        With use_scale, v uses the unscaled x0, as VideoCrafter/DynamiCrafter's p_losses (get_v(x_start, ...)) do.
        """
        if self.prediction == "eps":
            return noise.float()
        return _expand(self.sqrt_ab, t, x0) * noise.float() - _expand(self.sqrt_1mab, t, x0) * x0.float()

    def predict_eps_x0(
        self, out: torch.Tensor, xt: torch.Tensor, t: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(eps, x0) from the network output at x_t. With use_scale the x0 is still the *scaled* one
        (scale_arr[t] * x0); the DDIM step divides by scale_arr[t] as VideoCrafter does."""
        a, s = _expand(self.sqrt_ab, t, xt), _expand(self.sqrt_1mab, t, xt)
        out, xt = out.float(), xt.float()
        if self.prediction == "eps":
            return out, (xt - s * out) / a
        return s * xt + a * out, a * xt - s * out

    def training_loss(
        self,
        model,
        x0: torch.Tensor,
        cond: dict,
        *,
        generator: torch.Generator,
        cfg_dropout: float = 0.1,
        image_cfg_dropout: float = 0.05,
    ) -> tuple[torch.Tensor, dict]:
        """MSE between the network output and the eps/v target at a uniformly drawn t.

        Classifier-free guidance dropout, per sample and independently: the text context becomes
        cond["uncond_context"] (the empty caption's encoding) with probability `cfg_dropout`, and the
        image tokens become cond["uncond_image_context"] (zeros when absent) with probability `image_cfg_dropout`. All randomness comes from
        `generator` (t, noise, both dropout masks), so a step is reproducible from its seed.
        """
        b = x0.shape[0]
        gdev = generator.device
        t = torch.randint(0, self.num_timesteps, (b,), generator=generator, device=gdev).to(x0.device)
        noise = torch.randn(x0.shape, generator=generator, device=gdev, dtype=torch.float32).to(x0.device)
        drop_text = (torch.rand(b, generator=generator, device=gdev) < cfg_dropout).to(x0.device)
        drop_image = (torch.rand(b, generator=generator, device=gdev) < image_cfg_dropout).to(x0.device)

        context = cond["context"]
        uncond = cond.get("uncond_context")
        if uncond is None:
            if cfg_dropout > 0:
                raise ValueError(
                    "cond['uncond_context'] (the empty-caption encoding) is needed when cfg_dropout > 0"
                )
            uncond = context
        uncond = uncond.to(context).expand_as(context)
        context = torch.where(drop_text.view(b, 1, 1), uncond, context)
        image_context = cond.get("image_context")
        if image_context is not None:
            null = cond.get("uncond_image_context")  # VideoCrafter: the mid-grey image's tokens
            null = torch.zeros_like(image_context) if null is None else null.to(image_context)
            image_context = torch.where(
                drop_image.view(b, 1, 1), null.expand_as(image_context), image_context
            )

        xt = self.q_sample(x0, t, noise)
        out = model(xt, t, context, cond.get("fps"), image_context=image_context)
        loss = F.mse_loss(out.float(), self.target(x0, t, noise))
        stats = {
            "loss": float(loss.detach()),
            "t_mean": float(t.float().mean()),
            "text_dropped": float(drop_text.float().mean()),
            "image_dropped": float(drop_image.float().mean()) if image_context is not None else 0.0,
        }
        return loss, stats


# Buffers VideoCrafter's DDPM.register_schedule registers persistently (lvlb_weights is persistent=False).
VIDEOCRAFTER_SCHEDULE_BUFFERS = (
    "betas",
    "alphas_cumprod",
    "alphas_cumprod_prev",
    "sqrt_alphas_cumprod",
    "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod",
    "sqrt_recip_alphas_cumprod",
    "sqrt_recipm1_alphas_cumprod",
    "posterior_variance",
    "posterior_log_variance_clipped",
    "posterior_mean_coef1",
    "posterior_mean_coef2",
)


def schedule_buffers(diffusion: Mapping) -> dict[str, torch.Tensor]:
    """VideoCrafter's persistent schedule buffers for these diffusion settings (trainer.model.presets keys).

    Computed as lvdm/models/ddpm3d.py does: make_beta_schedule("linear") (float64 torch linspace of sqrt(beta),
    squared, as numpy), float64 numpy math in DDPM.register_schedule with v_posterior=0 (VideoCrafter's default;
    no released YAML sets it), each stored with torch.tensor(..., dtype=torch.float32); plus ``scale_arr``
    (LatentDiffusion.__init__) when use_scale. ``scale_factor`` is a buffer only with scale_by_std, which
    every released YAML turns off, so it is not returned; lvlb_weights and logvar are not persistent.
    """
    timesteps = int(diffusion["timesteps"])
    betas = linear_betas(timesteps, diffusion["linear_start"], diffusion["linear_end"]).numpy()
    v_posterior = 0.0
    alphas = 1.0 - betas
    alphas_cumprod = np.cumprod(alphas, axis=0)
    alphas_cumprod_prev = np.append(1.0, alphas_cumprod[:-1])
    posterior_variance = (1 - v_posterior) * betas * (1.0 - alphas_cumprod_prev) / (
        1.0 - alphas_cumprod
    ) + v_posterior * betas
    arrays = {
        "betas": betas,
        "alphas_cumprod": alphas_cumprod,
        "alphas_cumprod_prev": alphas_cumprod_prev,
        "sqrt_alphas_cumprod": np.sqrt(alphas_cumprod),
        "sqrt_one_minus_alphas_cumprod": np.sqrt(1.0 - alphas_cumprod),
        "log_one_minus_alphas_cumprod": np.log(1.0 - alphas_cumprod),
        "sqrt_recip_alphas_cumprod": np.sqrt(1.0 / alphas_cumprod),
        "sqrt_recipm1_alphas_cumprod": np.sqrt(1.0 / alphas_cumprod - 1),
        "posterior_variance": posterior_variance,
        "posterior_log_variance_clipped": np.log(np.maximum(posterior_variance, 1e-20)),
        "posterior_mean_coef1": betas * np.sqrt(alphas_cumprod_prev) / (1.0 - alphas_cumprod),
        "posterior_mean_coef2": (1.0 - alphas_cumprod_prev) * np.sqrt(alphas) / (1.0 - alphas_cumprod),
    }
    out = {k: torch.tensor(arrays[k], dtype=torch.float32) for k in VIDEOCRAFTER_SCHEDULE_BUFFERS}
    if diffusion.get("use_scale"):
        scale = SignalScale(
            True,
            diffusion.get("scale_a", 1),
            diffusion.get("scale_b", 0.3),
            diffusion.get("mid_step", 400),
            bool(diffusion.get("fix_scale_bug", False)),
        )
        out["scale_arr"] = scale.build(timesteps)
    return out
