"""DINO's views, made on the device from each batch: random resized crops, flips, iBOT token masks.

One ``grid_sample`` per set of crops: every crop is an affine map (scale, shift, mirror) of its
source image, so any channel count and any crop size cost the same single batched op, and the
crops of a batch need no loop over images. Validation passes a seeded ``generator`` so its crops
and masks are the same every time and ``val/loss`` moves only because the model does.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F


def _uniform(n: int, lo: float, hi: float, device, generator) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(n, device=device, generator=generator)


def random_resized_crops(
    images: torch.Tensor,
    size: int,
    scale: tuple[float, float],
    generator: Optional[torch.Generator] = None,
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    flip: bool = True,
) -> torch.Tensor:
    """``B×C×H×W`` → ``B×C×size×size``: per image a crop of a random fraction ``scale`` of the area and
    aspect ratio in ``ratio`` (log-uniform, as torchvision), resized bilinearly, mirrored left-right and
    up-down with probability 1/2 each (cells have no up or left)."""
    b, device = images.shape[0], images.device
    area = _uniform(b, scale[0], scale[1], device, generator)
    log_r = _uniform(b, math.log(ratio[0]), math.log(ratio[1]), device, generator)
    w = torch.sqrt(area * log_r.exp()).clamp(max=1.0)  # crop width / image width
    h = torch.sqrt(area / log_r.exp()).clamp(max=1.0)
    cx = (torch.rand(b, device=device, generator=generator) * 2 - 1) * (1 - w)  # centre in [-1, 1] coordinates
    cy = (torch.rand(b, device=device, generator=generator) * 2 - 1) * (1 - h)
    sx, sy = w, h
    if flip:
        sx = sx * torch.where(torch.rand(b, device=device, generator=generator) < 0.5, -1.0, 1.0)
        sy = sy * torch.where(torch.rand(b, device=device, generator=generator) < 0.5, -1.0, 1.0)
    theta = torch.zeros(b, 2, 3, device=device, dtype=torch.float32)
    theta[:, 0, 0], theta[:, 0, 2], theta[:, 1, 1], theta[:, 1, 2] = sx, cx, sy, cy
    grid = F.affine_grid(theta, [b, images.shape[1], size, size], align_corners=False)
    out = F.grid_sample(images.float(), grid, mode="bilinear", padding_mode="border", align_corners=False)
    return out.to(images.dtype)


def token_masks(
    n: int,
    tokens: int,
    probability: float,
    ratio: tuple[float, float],
    device,
    generator: Optional[torch.Generator] = None,
) -> torch.Tensor:
    """``n × tokens`` boolean iBOT masks: an image is masked with ``probability``, then a random
    ``ratio``-range fraction of its tokens (at least one); the others see everything."""
    masked = torch.rand(n, device=device, generator=generator) < probability
    frac = _uniform(n, ratio[0], ratio[1], device, generator)
    count = torch.where(masked, (frac * tokens).round().clamp(min=1), torch.zeros_like(frac)).long()
    order = torch.rand(n, tokens, device=device, generator=generator).argsort(dim=1).argsort(dim=1)
    return order < count[:, None]  # the count[i] tokens of lowest random rank
