"""DDIM sampler with classifier-free guidance (text, and image for I2V): conditioning -> latents."""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from trainer.diffusion.schedule import Diffusion


class DDIMSampler:
    """Deterministic (eta=0) or stochastic DDIM over `steps` of the diffusion's timesteps.

    Spacing: LDM/VideoCrafter "uniform" (`make_ddim_timesteps`: 0, k, 2k, ... shifted by +1, so [1, 201, ..., 801]
    for 5 of 1000) for the standard schedule, "trailing" (ending at T-1) with zero-terminal-SNR, where the last step
    must start from pure noise. The last step's "previous" alpha_bar and scale are those of index 0
    (alphas_cumprod[0], not 1), as VideoCrafter's `ddim_alphas_prev` / `ddim_scale_arr_prev`.
    """

    def __init__(self, diffusion: Diffusion, steps: int = 50, eta: float = 0.0):
        n = diffusion.num_timesteps
        if not 1 <= steps <= n:
            raise ValueError(f"DDIMSampler steps={steps} must be in [1, {n}]")
        if eta < 0:
            raise ValueError("DDIMSampler eta must be >= 0")
        self.diffusion, self.steps, self.eta = diffusion, steps, eta
        if diffusion.zero_snr:
            ts = torch.round(torch.arange(n, 0, -n / steps)).long() - 1
        else:
            ts = (torch.arange(0, n, n // steps)[:steps] + 1).clamp(max=n - 1).flip(0)
        self.timesteps = ts  # descending
        # previous timestep of each step in sampling order: the next one sampled, and index 0 after the last
        self.prev_timesteps = torch.cat([ts[1:], torch.zeros(1, dtype=torch.long)])

    def schedule_arrays(self) -> dict[str, torch.Tensor]:
        """VideoCrafter's DDIMSampler arrays (`ddim_alphas`, ..., `ddim_scale_arr_prev`), float64, in DDIM-index
        (ascending timestep) order; the scale arrays are all ones without use_scale."""
        d, ts, prev = self.diffusion, self.timesteps.flip(0), self.prev_timesteps.flip(0)
        ab = d.alphas_cumprod.float().double()  # the float32 checkpoint buffer
        a, a_prev = ab[ts], ab[prev]
        sigmas = self.eta * ((1 - a_prev) / (1 - a) * (1 - a / a_prev)).sqrt()
        scale = (
            torch.ones(d.num_timesteps, dtype=torch.float64) if d.scale_arr is None else d.scale_arr.double()
        )
        return {
            "ddim_timesteps": ts,
            "ddim_alphas": a,
            "ddim_alphas_prev": a_prev,
            "ddim_sigmas": sigmas,
            "ddim_sqrt_one_minus_alphas": (1 - a.float()).sqrt().double(),
            "ddim_scale_arr": scale[ts],
            "ddim_scale_arr_prev": scale[prev],
        }

    def step(
        self,
        out: torch.Tensor,
        x: torch.Tensor,
        i: int,
        *,
        generator: torch.Generator | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One DDIM update at the i-th timestep in sampling order, from the (guided) network output `out`.

        Returns (x_prev, pred_x0). With use_scale (VideoCrafter): pred_x0 is divided by scale_arr[t] and
        x_prev = sqrt(a_prev) * scale_arr[t_prev] * pred_x0 + sqrt(1 - a_prev - sigma^2) * eps + sigma * z.
        """
        d = self.diffusion
        t, t_prev = int(self.timesteps[i]), int(self.prev_timesteps[i])
        tt = torch.full((x.shape[0],), t, dtype=torch.long)
        eps, x0 = d.predict_eps_x0(out, x, tt)
        a, a_prev = float(d.alphas_cumprod[t]), float(d.alphas_cumprod[t_prev])
        sigma = self.eta * ((1 - a_prev) / (1 - a) * (1 - a / a_prev)) ** 0.5
        if d.scale_arr is None:
            x_prev = a_prev**0.5 * x0 + max(1 - a_prev - sigma**2, 0.0) ** 0.5 * eps
        else:
            x0 = x0 / d.scale_at(t)
            x_prev = a_prev**0.5 * d.scale_at(t_prev) * x0 + max(1 - a_prev - sigma**2, 0.0) ** 0.5 * eps
        if sigma > 0:
            if generator is None:
                raise ValueError(f"DDIMSampler eta={self.eta} > 0 needs a generator for the step noise")
            noise = torch.randn(x.shape, generator=generator, device=generator.device).to(x.device)
            x_prev = x_prev + sigma * noise
        return x_prev, x0

    def step_frames(
        self,
        out: torch.Tensor,
        x: torch.Tensor,
        t: torch.Tensor,
        t_prev: torch.Tensor,
        *,
        noise: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One DDIM update with a timestep per frame (FIFO-Diffusion's diagonal): `t`, `t_prev` long `[T]` or
        `[B, T]` for x `[B,C,T,h,w]`. alpha_bar, sigma and (use_scale) scale_arr are taken per frame; the same
        update as `step` where all entries are equal. `noise` (x's shape) is required when eta > 0."""
        d = self.diffusion
        b, f = x.shape[0], x.shape[2]
        t = torch.as_tensor(t, dtype=torch.long).cpu().expand(b, f)
        t_prev = torch.as_tensor(t_prev, dtype=torch.long).cpu().expand(b, f)

        def per(v: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:  # v[idx] as [B,1,T,1,1] float32
            return v[idx].to(torch.float32).view(b, 1, f, 1, 1).to(x.device)

        sa, s1 = per(d.sqrt_ab, t), per(d.sqrt_1mab, t)
        out, xt = out.float(), x.float()
        if d.prediction == "eps":
            eps, x0 = out, (xt - s1 * out) / sa
        else:
            eps, x0 = s1 * xt + sa * out, sa * xt - s1 * out
        a, a_prev = d.alphas_cumprod[t], d.alphas_cumprod[t_prev]  # float64 [B,T]
        sigma = self.eta * ((1 - a_prev) / (1 - a) * (1 - a / a_prev)).sqrt()
        direction = (1 - a_prev - sigma**2).clamp(min=0).sqrt()
        coef = a_prev.sqrt()
        if d.scale_arr is not None:
            x0 = x0 / per(d.scale_arr, t)
            coef = coef * d.scale_arr[t_prev].double()
        x_prev = per(coef, slice(None)) * x0 + per(direction, slice(None)) * eps
        if self.eta > 0:
            if noise is None:
                raise ValueError(f"DDIMSampler eta={self.eta} > 0 needs the step noise")
            x_prev = x_prev + per(sigma, slice(None)) * noise.to(x_prev)
        return x_prev, x0

    def _model_out(self, model, x, t, cond, uncond, guidance_scale):
        b = x.shape[0]
        tt = torch.full((b,), int(t), device=x.device, dtype=torch.long)
        fps = cond.get("fps")
        img = cond.get("image_context")
        if guidance_scale == 1.0:
            return model(x, tt, cond["context"], fps, image_context=img)
        uctx = uncond["context"].to(cond["context"]).expand_as(cond["context"])
        uimg = uncond.get("image_context", None if img is None else torch.zeros_like(img))
        ctx = torch.cat([cond["context"], uctx])
        img2 = None if img is None else torch.cat([img, uimg.to(img).expand_as(img)])
        fps2 = None if fps is None else torch.cat([fps, fps])
        out_c, out_u = model(torch.cat([x, x]), torch.cat([tt, tt]), ctx, fps2, image_context=img2).chunk(2)
        return out_u + guidance_scale * (out_c - out_u)

    @torch.no_grad()
    def sample(
        self,
        model,
        shape: tuple[int, ...],
        cond: dict,
        uncond: dict,
        guidance_scale: float = 7.5,
        *,
        generator: torch.Generator,
        progress: bool = False,
        x_T: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Latents `shape` = [B,C,T,h,w] from noise (or from `x_T`). cond: {"context", "fps", "image_context"?};
        uncond: {"context": empty-caption encoding, "image_context"?: defaults to zeros}."""
        device = cond["context"].device
        if x_T is None:
            x = torch.randn(shape, generator=generator, device=generator.device, dtype=torch.float32).to(
                device
            )
        else:
            if tuple(x_T.shape) != tuple(shape):
                raise ValueError(f"DDIMSampler.sample x_T shape {tuple(x_T.shape)} != shape {tuple(shape)}")
            x = x_T.to(device=device, dtype=torch.float32)
        ts = self.timesteps.tolist()
        for i, t in enumerate(tqdm(ts, desc="ddim", disable=not progress)):
            out = self._model_out(model, x, t, cond, uncond, guidance_scale)
            x, _ = self.step(out, x, i, generator=generator)
        return x
