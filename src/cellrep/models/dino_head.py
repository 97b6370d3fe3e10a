"""The DINO projection head: MLP → L2-normalized bottleneck → weight-normalized prototypes.

Used by ``task=dino`` (:mod:`cellrep.training.tasks.dino`) on the class token (DINO loss) and,
for iBOT, on masked patch tokens. The prototype layer's rows are unit vectors (weight
normalization with the magnitude fixed at 1, DINO's ``norm_last_layer``), so each logit is a
cosine similarity in [-1, 1] and the temperatures alone set how sharp the distributions are.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import trunc_normal_


class DINOHead(nn.Module):
    """``in_dim`` → ``nlayers`` linear layers (GELU between, last one to ``bottleneck_dim``) → L2 normalize
    → ``out_dim`` prototype logits. DINOv2: hidden 2048, bottleneck 256, 65536 prototypes, 3 layers."""

    def __init__(self, in_dim: int, out_dim: int, hidden_dim: int = 2048, bottleneck_dim: int = 256, nlayers: int = 3):
        super().__init__()
        dims = [in_dim] + [hidden_dim] * (max(1, nlayers) - 1) + [bottleneck_dim]
        layers: list[nn.Module] = []
        for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
            layers.append(nn.Linear(a, b))
            if i < len(dims) - 2:
                layers.append(nn.GELU())
        self.mlp = nn.Sequential(*layers)
        # the prototypes' directions; their length never matters (normalized in forward)
        self.prototypes = nn.Parameter(torch.empty(out_dim, bottleneck_dim))
        for m in self.mlp:
            if isinstance(m, nn.Linear):
                trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        trunc_normal_(self.prototypes, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = F.normalize(self.mlp(x), dim=-1, eps=1e-6)
        return z @ F.normalize(self.prototypes, dim=-1, eps=1e-6).t()
