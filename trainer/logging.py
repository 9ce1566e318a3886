"""Training logs on rank 0: rich progress + console lines, tensorboard scalars, and metrics.jsonl (one line per step)."""

from __future__ import annotations

import json
import os
import time
import uuid

from trainer.config import LoggingConfig


class StepStats:
    """What one optimizer step measured on this rank: per-kind loss sums, samples, data wait, compute time."""

    def __init__(self):
        self.loss_sum = {"video": 0.0, "image": 0.0}
        self.count = {"video": 0, "image": 0}
        self.samples = 0
        self.data_wait = 0.0
        self.keys: list[str] = []
        self.sources: list[str] = []
        self.kinds: list[str] = []
        self.start = time.perf_counter()

    def add(self, kind: str, loss: float, batch: dict, wait: float) -> None:
        batch_size = len(batch["keys"])
        self.loss_sum[kind] += loss
        self.count[kind] += 1
        self.samples += batch_size
        self.data_wait += wait
        self.keys += batch["keys"]
        self.sources += batch["sources"]
        self.kinds.append(kind)

    def reduced(self) -> dict:
        """Mean over ranks of the per-kind losses; samples summed; data wait and step time of the slowest rank."""
        import deepspeed.comm as dist
        import torch

        elapsed = time.perf_counter() - self.start
        sums = torch.tensor(
            [
                self.loss_sum["video"],
                self.count["video"],
                self.loss_sum["image"],
                self.count["image"],
                self.samples,
            ],
            dtype=torch.float64,
        )
        slow = torch.tensor([self.data_wait, elapsed], dtype=torch.float64)
        dist.all_reduce(sums)
        dist.all_reduce(slow, op=dist.ReduceOp.MAX)
        out = {"samples": int(sums[4]), "data_wait_s": float(slow[0]), "step_s": float(slow[1])}
        total_loss, total_n = 0.0, 0
        for i, kind in enumerate(("video", "image")):
            n = float(sums[2 * i + 1])
            if n:
                out[f"loss_{kind}"] = float(sums[2 * i]) / n
                total_loss, total_n = total_loss + float(sums[2 * i]), total_n + n
        out["loss"] = total_loss / max(total_n, 1)
        return out


class TrainLogger:
    """Rank 0 writes; other ranks' calls do nothing."""

    def __init__(self, out_dir: str, config: LoggingConfig, *, rank: int, total_steps: int, start_step: int):
        self.rank, self.config = rank, config
        self.launch = uuid.uuid4().hex[:8]  # marks the lines of this launch in metrics.jsonl (resumes append)
        self.tb = None
        self.progress = None
        if rank != 0:
            return
        os.makedirs(out_dir, exist_ok=True)
        self.metrics = open(os.path.join(out_dir, "metrics.jsonl"), "a")
        if config.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(os.path.join(out_dir, "tb"))
        from rich.console import Console

        self.console = Console(stderr=True, soft_wrap=True)  # log lines stay whole (greppable) in files
        if config.progress:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.progress = Progress(
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[info]}"),
                TimeRemainingColumn(),
                console=self.console,
                transient=False,
            )
            self.progress.start()
            self.task = self.progress.add_task("train", total=total_steps, completed=start_step, info="")

    def log_step(self, record: dict) -> None:
        if self.rank != 0:
            return
        record = {"launch": self.launch, **record}
        self.metrics.write(json.dumps(record) + "\n")
        self.metrics.flush()
        step = record["global_step"]
        info = f"{record['phase']} loss {record['loss']:.4f} lr {record['lr']:.2e}"
        if self.progress is not None:
            self.progress.update(
                self.task, completed=step, description=f"train [{record['phase']}]", info=info
            )
        if step % max(1, self.config.every_steps) == 0:
            if self.tb is not None:
                for key in (
                    "loss",
                    "loss_video",
                    "loss_image",
                    "lr",
                    "grad_norm",
                    "samples_per_s",
                    "data_wait_frac",
                    "data_wait_s",
                    "step_s",
                    "bad_samples",
                ):
                    if record.get(key) is not None:
                        name = key.replace("loss_", "loss/") if key.startswith("loss_") else key
                        self.tb.add_scalar(name, record[key], step)
                self.tb.flush()
            if self.progress is None:
                self.console.print(f"step {step} {info} {record['samples_per_s']:.1f} samples/s")

    def message(self, text: str) -> None:
        if self.rank == 0:
            self.console.print(text)

    def add_scalar(self, tag: str, value: float, step: int) -> None:
        """One scalar into tensorboard (e.g. the preview metrics); rank 0 with tensorboard on only."""
        if self.rank != 0 or self.tb is None:
            return
        self.tb.add_scalar(tag, float(value), step)
        self.tb.flush()

    def add_video(self, tag: str, frames, step: int, fps: float) -> None:
        """Preview frames uint8 [T,H,W,3] into tensorboard as an image strip (first frame .. last frame)."""
        if self.rank != 0 or self.tb is None:
            return
        import numpy as np

        strip = np.concatenate(list(frames), axis=1)
        self.tb.add_image(tag, strip, step, dataformats="HWC")
        self.tb.flush()

    def close(self) -> None:
        if self.rank != 0:
            return
        if self.progress is not None:
            self.progress.stop()
        if self.tb is not None:
            self.tb.close()
        self.metrics.close()
