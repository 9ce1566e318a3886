"""DDIM sampler with classifier-free guidance (text, and image for I2V): conditioning -> latents."""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from trainer.diffusion.schedule import Diffusion


class DDIMSampler:
    """Deterministic (eta=0) or stochastic DDIM over `steps` of the diffusion's timesteps.

    Spacing: LDM/VideoCrafter "uniform" (0, k, 2k, ... shifted by +1) for the standard schedule,
    "trailing" (ending at T-1) with zero-terminal-SNR, where the last step must start from pure noise.
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
    ) -> torch.Tensor:
        """Latents `shape` = [B,C,T,h,w] from noise. cond: {"context", "fps", "image_context"?};
        uncond: {"context": empty-caption encoding, "image_context"?: defaults to zeros}."""
        d = self.diffusion
        device = cond["context"].device
        x = torch.randn(shape, generator=generator, device=generator.device, dtype=torch.float32).to(device)
        ab = d.alphas_cumprod
        ts = self.timesteps.tolist()
        for i, t in enumerate(tqdm(ts, desc="ddim", disable=not progress)):
            out = self._model_out(model, x, t, cond, uncond, guidance_scale)
            tt = torch.full((shape[0],), t, dtype=torch.long)
            eps, x0 = d.predict_eps_x0(out, x, tt)
            a = float(ab[t])
            a_prev = float(ab[ts[i + 1]]) if i + 1 < len(ts) else float(ab[0])
            sigma = self.eta * ((1 - a_prev) / (1 - a) * (1 - a / a_prev)) ** 0.5
            x = a_prev**0.5 * x0 + max(1 - a_prev - sigma**2, 0.0) ** 0.5 * eps
            if sigma > 0:
                noise = torch.randn(shape, generator=generator, device=generator.device).to(device)
                x = x + sigma * noise
        return x
