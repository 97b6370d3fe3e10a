"""The microscopy MAE objective: masked-patch MSE plus a Fourier-magnitude term.

``loss = MSE(pred, target) + fourier_weight · L1(|FFT2(pred)|, |FFT2(target)|)``,
both averaged over the masked tokens only (visible tokens are trivially copied).

* Target normalization (``norm_pix``): each token's pixels are standardized
  by their own mean and std (He et al. 2022). Cell images are mostly
  background; without it the loss is dominated by patch brightness.
* Fourier term (Kraus et al. 2024): pixel MSE is minimized by blurry
  predictions; matching the magnitude spectrum penalizes the lost
  high-frequency texture. The 2-D FFT is taken per token and channel over its
  p×p pixels (so the mask applies to it as to the MSE), with ``norm="ortho"``
  so that the magnitudes are on the pixel scale (Parseval) whatever the patch
  size, which keeps ``fourier_weight`` meaningful across ViT-x/8 and x/16.
"""

from __future__ import annotations

import torch


def normalize_patches(patches: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    mean = patches.mean(dim=-1, keepdim=True)
    var = patches.var(dim=-1, keepdim=True, unbiased=False)
    return (patches - mean) / (var + eps).sqrt()


def patch_spectrum(tokens: torch.Tensor, patch_size: int) -> torch.Tensor:
    """``B×L×(p·p·c)`` → ``|FFT2|`` per token and channel, ``B×L×c×p×p``."""
    B, L, K = tokens.shape
    per_channel = tokens.reshape(B, L, patch_size, patch_size, K // (patch_size * patch_size)).movedim(-1, 2)
    return torch.fft.fft2(per_channel, norm="ortho").abs()


def masked_mean(per_token: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (per_token * mask).sum() / mask.sum().clamp_min(1)


def mae_loss(
    pred: torch.Tensor,
    patches: torch.Tensor,
    mask: torch.Tensor,
    patch_size: int,
    norm_pix: bool = True,
    fourier_weight: float = 0.01,
) -> dict[str, torch.Tensor]:
    """Returns ``loss`` (to optimize), ``mse`` and ``fourier`` (to log). Computed in float32."""
    pred, target, mask = pred.float(), patches.float(), mask.float()
    if norm_pix:
        target = normalize_patches(target)
    mse = masked_mean((pred - target).square().mean(dim=-1), mask)
    out = {"mse": mse}
    if fourier_weight > 0:
        diff = (patch_spectrum(pred, patch_size) - patch_spectrum(target, patch_size)).abs()
        out["fourier"] = masked_mean(diff.flatten(2).mean(dim=-1), mask)
        out["loss"] = mse + fourier_weight * out["fourier"]
    else:
        out["loss"] = mse
    return out
