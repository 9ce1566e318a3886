"""Sampling loops of `generate`: guided DDIM with per-sample seeds, and FIFO-Diffusion for videos longer than the model.

FIFO-Diffusion (Kim et al. 2024, arXiv:2405.11473), diagonal denoising without latent partitioning or lookahead:
the queue holds f = the model's trained frame count latents, queue frame j at the j-th smallest of f DDIM
timesteps (tau_0 < ... < tau_{f-1}). Each iteration runs the U-Net once on the whole queue with those per-frame
timesteps (`t` of shape [B, f]), takes one DDIM step per frame (frame j to tau_{j-1}; the head to 0, clean),
dequeues the head as the next output frame and enqueues fresh Gaussian noise at tau_{f-1} at the tail, so the
queue keeps its diagonal. The queue is initialised as the paper's code does: a normal f-frame video is sampled
with the same f-step DDIM schedule, and its frame j is forward-diffused (q_sample) to tau_j.
"""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from trainer.diffusion.ddim import DDIMSampler


def per_sample_noise(shape: tuple[int, ...], generators: list[torch.Generator]) -> torch.Tensor:
    """Gaussian noise `[len(generators), *shape[1:]]`, sample i drawn from generators[i] alone (batch-invariant)."""
    one = (1, *shape[1:])
    return torch.cat([torch.randn(one, generator=g, dtype=torch.float32) for g in generators])


def guided_out(
    model, x: torch.Tensor, t: torch.Tensor, cond: dict, uncond: dict, scale: float
) -> torch.Tensor:
    """The classifier-free guided network output; `t` `[B]` or per frame `[B, T]`. cond/uncond: {"context",
    "fps", "image_context"?}; the conditional and unconditional halves run as one batch."""
    fps, img = cond.get("fps"), cond.get("image_context")
    if scale == 1.0:
        return model(x, t, cond["context"], fps, image_context=img).float()
    uimg = uncond.get("image_context")
    if img is not None and uimg is None:
        uimg = torch.zeros_like(img)
    ctx = torch.cat([cond["context"], uncond["context"].to(cond["context"]).expand_as(cond["context"])])
    img2 = None if img is None else torch.cat([img, uimg.to(img).expand_as(img)])
    fps2 = None if fps is None else torch.cat([fps, fps])
    out = model(torch.cat([x, x]), torch.cat([t, t]), ctx, fps2, image_context=img2).float()
    out_c, out_u = out.chunk(2)
    return out_u + scale * (out_c - out_u)


@torch.no_grad()
def ddim_sample(
    model,
    sampler: DDIMSampler,
    x_T: torch.Tensor,
    cond: dict,
    uncond: dict,
    scale: float,
    generators: list[torch.Generator],
    *,
    progress: bool = False,
) -> torch.Tensor:
    """All frames at one timestep (the usual sampler), starting from `x_T`; the eta noise per sample."""
    x = x_T.float()
    b = x.shape[0]
    prev = sampler.prev_timesteps.tolist()
    for i, t in enumerate(tqdm(sampler.timesteps.tolist(), desc="ddim", leave=False, disable=not progress)):
        tt = torch.full((b,), t, dtype=torch.long, device=x.device)
        out = guided_out(model, x, tt, cond, uncond, scale)
        noise = per_sample_noise(x.shape, generators).to(x.device) if sampler.eta > 0 else None
        x, _ = sampler.step_frames(out, x, torch.tensor(t), torch.tensor(prev[i]), noise=noise)
    return x


@torch.no_grad()
def fifo_sample(
    model,
    sampler: DDIMSampler,
    base: torch.Tensor,
    num_frames: int,
    cond: dict,
    uncond: dict,
    scale: float,
    generators: list[torch.Generator],
    *,
    record: list[list[int]] | None = None,
    progress: bool = False,
) -> torch.Tensor:
    """`num_frames` latent frames `[B,C,num_frames,h,w]` by diagonal denoising, the queue initialised from `base`
    (a clean f-frame video sampled with `sampler`, whose step count must be f). `record` gets, per iteration,
    the timesteps of the queue's frames head to tail (the diagonal)."""
    b, c, f, h, w = base.shape
    if sampler.steps != f:
        raise ValueError(
            f"FIFO-Diffusion needs one DDIM step per queue frame: steps={sampler.steps}, queue={f}"
        )
    d = sampler.diffusion
    ts = sampler.timesteps.flip(0)  # ascending: queue frame j sits at ts[j]
    prev = sampler.prev_timesteps.flip(0)  # where one step takes it (ts[j - 1]; 0 for the head)
    frames = []
    for j in range(f):
        noise = per_sample_noise((b, c, 1, h, w), generators).to(base.device)
        tj = torch.full((b,), int(ts[j]), dtype=torch.long)
        frames.append(d.q_sample(base[:, :, j : j + 1].float(), tj, noise))
    queue = torch.cat(frames, dim=2)
    tq = ts.to(base.device).expand(b, f)
    out_frames = []
    for _ in tqdm(range(num_frames), desc="fifo", leave=False, disable=not progress):
        if record is not None:
            record.append(ts.tolist())
        out = guided_out(model, queue, tq, cond, uncond, scale)
        noise = per_sample_noise(queue.shape, generators).to(queue.device) if sampler.eta > 0 else None
        queue, _ = sampler.step_frames(out, queue, ts, prev, noise=noise)
        out_frames.append(queue[:, :, :1])
        tail = per_sample_noise((b, c, 1, h, w), generators).to(queue.device)
        queue = torch.cat([queue[:, :, 1:], tail], dim=2)
    return torch.cat(out_frames, dim=2)


__all__ = ["ddim_sample", "fifo_sample", "guided_out", "per_sample_noise"]
