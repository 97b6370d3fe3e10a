"""Optimizer and LR schedule shared by every task.

LR = base_lr × global_batch / 256 (linear scaling); linear warmup then cosine
decay to ``min_lr_ratio``·peak; no weight decay on parameters with ndim < 2
(biases, norms, tokens, position embeddings).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

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


def build_optimizer(module: nn.Module, name: str, lr: float, weight_decay: float,
                    betas: tuple[float, float]) -> torch.optim.Optimizer:
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
        raise CellrepError(f"unknown optimizer '{name}'", fix="use adamw, sgd, lion or another timm optimizer name") from None


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
