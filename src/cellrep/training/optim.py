"""Optimizer and LR schedule shared by every task.

LR = base_lr × global_batch / 256 (linear scaling); linear warmup then cosine
decay to ``min_lr_ratio``·peak; no weight decay on parameters with ndim < 2
(biases, norms, tokens, position embeddings).
"""

from __future__ import annotations

import math

import lightning as L
import torch
import torch.nn as nn
from lightning.pytorch.utilities import rank_zero_info

from cellrep.errors import CellrepError


def scaled_lr(base_lr: float, global_batch: int) -> float:
    return base_lr * global_batch / 256


def _declared_no_decay(module: nn.Module) -> set[str]:
    """Full names of parameters a submodule exempts via timm's ``no_weight_decay()``
    (class/mask tokens, position and channel embeddings have ndim >= 2)."""
    names: set[str] = set()
    for prefix, sub in module.named_modules():
        declared = getattr(sub, "no_weight_decay", None)
        if callable(declared):
            names |= {f"{prefix}.{n}" if prefix else n for n in declared()}
    return names


def param_groups(module: nn.Module, weight_decay: float) -> list[dict]:
    exempt = _declared_no_decay(module)
    decay, no_decay = [], []
    for name, param in module.named_parameters():
        if param.requires_grad:
            (no_decay if param.ndim < 2 or name in exempt else decay).append(param)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def build_optimizer(
    module: nn.Module, name: str, lr: float, weight_decay: float, betas: tuple[float, float]
) -> torch.optim.Optimizer:
    groups = param_groups(module, weight_decay)
    name = name.lower()
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=betas)
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=betas[0], nesterov=True)
    try:
        import timm.optim

        return timm.optim.create_optimizer_v2(groups, opt=name, lr=lr, betas=betas)
    except (ValueError, AssertionError, KeyError):
        raise CellrepError(
            f"unknown optimizer '{name}'", fix="use adamw, sgd, lion or another timm optimizer name"
        ) from None


def warmup_cosine(total_steps: int, warmup_fraction: float, min_lr_ratio: float):
    """LR multiplier per optimizer step: linear warmup, then cosine to min_lr_ratio."""
    warmup = max(1, int(round(total_steps * warmup_fraction))) if warmup_fraction > 0 else 0
    total = max(total_steps, warmup + 1)

    def multiplier(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return multiplier


def configure_optimizers(task: L.LightningModule, opt_cfg: dict, sched_cfg: dict) -> dict:
    """Every task's ``configure_optimizers``: scaled LR, decay groups, warmup + cosine per step.

    Prints the derived quantities (global batch, effective LR, step count) at start.
    """
    trainer = task.trainer
    per_device_batch = int(getattr(trainer.datamodule, "batch_size", 0) or 0)
    if per_device_batch <= 0:
        raise CellrepError(
            "cannot scale the learning rate: the datamodule has no batch_size",
            fix="train through cellrep's CellDataModule (data.batch_size)",
        )
    global_batch = per_device_batch * trainer.world_size * trainer.accumulate_grad_batches
    lr = scaled_lr(opt_cfg["base_lr"], global_batch)
    total_steps = trainer.estimated_stepping_batches
    if not math.isfinite(total_steps):
        raise CellrepError(
            "cannot tell how many optimizer steps the run has", fix="set trainer.max_steps or trainer.max_epochs"
        )
    rank_zero_info(
        f"batch: {per_device_batch}/device × {trainer.world_size} devices × {trainer.accumulate_grad_batches} "
        f"accumulation = {global_batch} global; lr = {opt_cfg['base_lr']:g} × {global_batch}/256 = {lr:.3g}; "
        f"{int(total_steps)} optimizer steps"
    )
    optimizer = build_optimizer(task, opt_cfg["name"], lr, opt_cfg["weight_decay"], tuple(opt_cfg["betas"]))
    schedule = warmup_cosine(int(total_steps), sched_cfg["warmup_fraction"], sched_cfg["min_lr_ratio"])
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}
