"""What every run reports about its speed and size: parameter counts at start,
images/s (all ranks together) and peak GPU memory while training.

Logged as ``perf/images_per_s`` and ``perf/gpu_mem_gb`` (CUDA only) every
``log_every_n_steps`` steps; parameter counts go to the loggers as
``params/total`` and ``params/trainable`` and to the console.
"""

from __future__ import annotations

import time
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info


def parameter_counts(module: torch.nn.Module) -> dict[str, int]:
    params = list(module.parameters())
    return {
        "params/total": sum(p.numel() for p in params),
        "params/trainable": sum(p.numel() for p in params if p.requires_grad),
    }


def _batch_size(batch: Any) -> int:
    if isinstance(batch, dict) and "image" in batch:
        return int(batch["image"].shape[0])
    if isinstance(batch, (list, tuple)) and batch and hasattr(batch[0], "shape"):
        return int(batch[0].shape[0])
    return 0


class Throughput(L.Callback):
    def __init__(self, log_every_n_steps: int = 10):
        self.every = max(int(log_every_n_steps), 1)
        self.summary: dict[str, float] = {}
        self._images, self._t0, self._step_t0 = 0, None, None

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        counts = parameter_counts(pl_module)
        self.summary.update({k: float(v) for k, v in counts.items()})
        rank_zero_info(f"parameters: {counts['params/total']:,} ({counts['params/trainable']:,} trainable)")
        for logger in trainer.loggers:
            logger.log_metrics({k: float(v) for k, v in counts.items()}, step=0)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self._t0 is None:
            self._t0 = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._images += _batch_size(batch) * trainer.world_size
        if (batch_idx + 1) % self.every:
            return
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)
        elapsed = time.perf_counter() - self._t0
        stats = {"perf/images_per_s": self._images / max(elapsed, 1e-9)}
        if pl_module.device.type == "cuda":
            stats["perf/gpu_mem_gb"] = torch.cuda.max_memory_allocated(pl_module.device) / 2**30
        self.summary.update(stats)
        pl_module.log_dict(stats, on_step=True, on_epoch=False, rank_zero_only=True)
        self._images, self._t0 = 0, time.perf_counter()

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.summary.get("perf/images_per_s") is None and self._t0 is not None and self._images:
            self.summary["perf/images_per_s"] = self._images / max(time.perf_counter() - self._t0, 1e-9)
        if self.summary.get("perf/images_per_s") is not None:
            rank_zero_info(
                "throughput: " + ", ".join(f"{k} {v:.4g}" for k, v in self.summary.items() if k.startswith("perf/"))
            )
