"""Normalization and augmentation of C×H×W image tensors.

Microscopy has no canonical orientation, so training augments with random
crops, flips and 90° rotations (the dihedral group, no interpolation).
Normalization removes plate-to-plate intensity drift: ``plate_controls``
standardizes each channel by its plate's negative-control statistics (RxRx1
paper), ``self`` by the image's own statistics (OpenPhenom), ``global`` by the
whole dataset's. Randomness comes from an explicit ``torch.Generator`` so a
loader worker's stream is reproducible (exact resume).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch

from cellrep.errors import CellrepError

NORMALIZATIONS = ("plate_controls", "self", "global")


def check_normalization(mode: str) -> None:
    """Also run at start by ``cellrep.config.DataConfig``, so a typo fails before any sharding."""
    if mode not in NORMALIZATIONS:
        raise CellrepError(
            f"unknown normalization '{mode}'", fix=f"set data.normalization to one of {list(NORMALIZATIONS)}"
        )


def _as_stats(stats, c: int, mode: str) -> tuple[torch.Tensor, torch.Tensor]:
    if stats is None:
        raise CellrepError(
            f"normalization '{mode}' needs mean/std statistics",
            fix="pass the manifest's plate_stats[<experiment>/<plate>] or global_stats",
        )
    mean, std = (stats["mean"], stats["std"]) if isinstance(stats, Mapping) else stats
    mean = torch.as_tensor(mean, dtype=torch.float32)
    std = torch.as_tensor(std, dtype=torch.float32)
    if mean.shape[-1:] != (c,) or std.shape != mean.shape:
        raise CellrepError(
            f"normalization stats have shape {tuple(mean.shape)}, the images have {c} channels",
            fix="re-shard the dataset (the manifest does not match the images)",
        )
    # [C] for one image or the batch; [B, C] for one row of stats per image of a batch
    return mean.reshape(*mean.shape, 1, 1), std.reshape(*std.shape, 1, 1)


def normalize(
    image: torch.Tensor,
    mode: str,
    stats: Mapping | Sequence | None = None,
    eps: float = 1e-6,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-channel standardization of a C×H×W or B×C×H×W uint8 image to float32.

    ``stats`` is ``{"mean": [C], "std": [C]}`` (a manifest entry) or a
    ``(mean, std)`` pair of [C] or, for a batch, [B, C]; unused for ``self``.
    A std below ``eps`` (a constant channel) is clamped so the result stays finite.
    ``out`` (float32, ``image``'s shape) receives the result, e.g. a shared-memory
    tensor a loader worker hands over without another copy.
    """
    # One fresh float copy, then in place: ~2× faster than ``(x - mean) / std`` on a loader worker
    # (no two extra batch-sized temporaries to allocate and page-fault); same values bit for bit.
    x = image.to(torch.float32, copy=True) if out is None else out.copy_(image)
    if mode == "self":
        mean = x.mean(dim=(-2, -1), keepdim=True)
        std = x.std(dim=(-2, -1), keepdim=True, unbiased=False)
        return x.sub_(mean).div_(std.clamp_min(eps))
    check_normalization(mode)
    mean, std = _as_stats(stats, x.shape[-3], mode)
    return x.sub_(mean).div_(std.clamp_min(eps))


def _check_size(x: torch.Tensor, size: int) -> None:
    h, w = x.shape[-2:]
    if size > h or size > w or size < 1:
        raise CellrepError(
            f"crop size {size} does not fit images of {h}×{w}", fix=f"set data.crop_size to at most {min(h, w)}"
        )


def center_crop(x: torch.Tensor, size: int) -> torch.Tensor:
    """The central size×size window (evaluation)."""
    _check_size(x, size)
    h, w = x.shape[-2:]
    top, left = (h - size) // 2, (w - size) // 2
    return x[..., top : top + size, left : left + size]


def _draw(h: int, w: int, size: int, generator: torch.Generator | None) -> tuple[int, int, bool, bool, int]:
    """(top, left, flip W, flip H, quarter turns) of one random crop; the only draw from ``generator``."""
    r = torch.randint(0, 1 << 30, (5,), generator=generator).tolist()
    return r[0] % (h - size + 1), r[1] % (w - size + 1), bool(r[2] % 2), bool(r[3] % 2), r[4] % 4


def random_crop_flip_rot90(x: torch.Tensor, size: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Random size×size crop, random horizontal/vertical flip, random k·90° rotation."""
    _check_size(x, size)
    top, left, flip_w, flip_h, k = _draw(*x.shape[-2:], size, generator)
    x = x[..., top : top + size, left : left + size]
    if flip_w:
        x = x.flip(-1)
    if flip_h:
        x = x.flip(-2)
    return torch.rot90(x, k, dims=(-2, -1)) if k else x


def random_crop_view(x: np.ndarray, size: int, generator: torch.Generator | None = None) -> tuple[np.ndarray, tuple]:
    """The crop of :func:`random_crop_flip_rot90` of a numpy C×H×W array, as a *view* (no pixel is
    copied), and the rest of that draw: ``(flip W, flip H, quarter turns)`` for :func:`flip_rot90_batch`.

    Same draws from ``generator``, so crop + :func:`flip_rot90_batch` gives the same pixels. The loader
    copies the view once, straight into its batch; flips and rotations, strided copies that cost a
    worker ~10× a plain row copy, run on the whole batch on the device (docs/PERFORMANCE.md).
    """
    _check_size(x, size)
    top, left, flip_w, flip_h, k = _draw(*x.shape[-2:], size, generator)
    return x[..., top : top + size, left : left + size], (flip_w, flip_h, k)


def flip_rot90_view(x: np.ndarray, flip_rot: tuple) -> np.ndarray:
    """One crop's ``(flip W, flip H, quarter turns)`` (from :func:`random_crop_view`) as a strided numpy view."""
    flip_w, flip_h, k = flip_rot
    if flip_w:
        x = x[..., ::-1]
    if flip_h:
        x = x[..., ::-1, :]
    return np.rot90(x, k, axes=(-2, -1)) if k else x


def flip_rot90_batch(image: torch.Tensor, flip_rot: torch.Tensor) -> torch.Tensor:
    """Per sample of a B×C×S×S batch: flip W, flip H, then ``k`` quarter turns, as
    :func:`random_crop_flip_rot90` (``flip_rot``: B×3 rows of (flip W, flip H, k)).

    Whole-batch flips and turns, each sample picking its own with ``torch.where``: about ten passes over
    the batch, pure permutations (bit-exact), and no host sync, so a GPU step is never held up here.
    """
    if image.shape[-1] != image.shape[-2]:
        raise CellrepError(
            f"flips/rot90 need square crops, got {tuple(image.shape[-2:])}", fix="set data.crop_size (crops are square)"
        )
    fr = flip_rot.to(image.device, non_blocking=True).view(-1, 3, 1, 1, 1)
    flip_w, flip_h, k = fr[:, 0].bool(), fr[:, 1].bool(), fr[:, 2]
    x = torch.where(flip_w, image.flip(-1), image)
    x = torch.where(flip_h, x.flip(-2), x)
    out = torch.where(k == 1, torch.rot90(x, 1, dims=(-2, -1)), x)
    out = torch.where(k == 2, x.flip((-2, -1)), out)
    return torch.where(k == 3, torch.rot90(x, 3, dims=(-2, -1)), out)


def draw_channel_subset(num_channels: int, generator: torch.Generator) -> torch.Tensor:
    """Hierarchical channel sampling (ChannelViT, Bao et al. 2024): a subset size k uniform in 1..C, then
    k distinct channels uniformly; sorted int64 indices. Uniform k (not a fair coin per channel, whose
    sizes pile up near C/2) shows the model single channels and near-full sets equally often."""
    k = int(torch.randint(1, num_channels + 1, (1,), generator=generator))
    return torch.randperm(num_channels, generator=generator)[:k].sort().values


def batch_generator(seed: int, index: torch.Tensor) -> torch.Generator:
    """A generator seeded by ``seed`` and the batch's sample rows: the same batch draws the same subset
    however it is reached (a resumed run replays its batches, so it replays their subsets too), with
    no state to save."""
    rows = index.detach().cpu().to(torch.int64)
    # a polynomial hash of the rows, mod 2^61 - 1 (exact in int64 steps of 2^31 × 2^30)
    h = int(seed) % (2**61 - 1)
    for r in rows.tolist():
        h = (h * 1_000_003 + r + 1) % (2**61 - 1)
    return torch.Generator().manual_seed(h)


class BatchFinisher:
    """Finishes a loader batch: uint8 ``image`` → flipped/rotated (training batches carry ``flip_rot``,
    see :func:`flip_rot90_batch`) and float32 normalized, on whatever device it is on.

    The loader's workers hand out uint8 crops and each sample's row of statistics (``plate``, a row
    of ``mean``/``std``, [P, C]); one vectorized :func:`normalize` over the whole batch then runs
    after the batch reached the device (``CellDataModule.on_after_batch_transfer``), so workers never
    write or ship float pixels (4× the bytes). Values equal per-sample :func:`normalize` with that
    sample's statistics. A batch whose image is already floating point is returned as is, so
    finishing twice is harmless.

    Channels, after normalization (so every channel keeps its own statistics):

    * ``channel_sampling`` (training, channel-agnostic models): ONE random channel subset per batch
      (:func:`draw_channel_subset`, seeded by ``seed`` and the batch's rows): the image keeps only those
      channels and the batch gains ``channel_ids`` (int64 k, indices into the data's channels). One subset
      per batch, not per sample: samples of different channel counts cannot share a B×C×H×W tensor, and
      per-sample subsets would need padded tokens and an attention mask in every block.
    * ``keep`` (evaluation of a channel-agnostic model on a channel subset): only these channels remain.
    * ``zero`` (evaluation of a fixed-channel model): these channels are set to 0, the normalized mean.
    """

    def __init__(
        self,
        mode: str,
        mean: torch.Tensor,
        std: torch.Tensor,
        channel_sampling: bool = False,
        seed: int = 0,
        keep: Sequence[int] | None = None,
        zero: Sequence[int] | None = None,
    ):
        check_normalization(mode)
        self.mode, self.mean, self.std = mode, mean.float(), std.float()
        self.channel_sampling, self.seed = bool(channel_sampling), int(seed)
        self.keep = None if keep is None else [int(c) for c in keep]
        self.zero = [int(c) for c in zero or ()]
        self._on: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def with_channels(
        self, channel_sampling: bool = False, keep: Sequence[int] | None = None, zero: Sequence[int] | None = None
    ) -> "BatchFinisher":
        """The same normalization with other channel settings (statistics shared)."""
        out = BatchFinisher(self.mode, self.mean, self.std, channel_sampling, self.seed, keep, zero)
        out._on = self._on
        return out

    def _stats(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        if device not in self._on:  # a few hundred floats, copied once per device
            self._on[device] = (self.mean.to(device), self.std.to(device))
        return self._on[device]

    def __call__(self, batch: dict) -> dict:
        image = batch["image"]
        if image.is_floating_point():
            return batch
        if image.dtype != torch.uint8 or image.ndim != 4:
            raise CellrepError(
                f"batch image is {image.dtype} {tuple(image.shape)}; expected uint8 B×C×H×W",
                fix="pass batches of CellDataModule's loaders (they carry uint8 crops)",
            )
        stats = None
        if self.mode != "self":
            mean, std = self._stats(image.device)
            plate = batch["plate"].to(image.device, non_blocking=True)
            stats = (mean[plate], std[plate])
        if "flip_rot" in batch:
            image = flip_rot90_batch(image, batch["flip_rot"])
        done = {k: v for k, v in batch.items() if k != "flip_rot"}
        return self._channels({**done, "image": normalize(image, self.mode, stats)})

    def _channels(self, batch: dict) -> dict:
        image = batch["image"]
        if self.zero:
            image[:, self.zero] = 0.0
        if self.keep is not None:
            image = image[:, self.keep]
        if self.channel_sampling:
            ids = draw_channel_subset(image.shape[1], batch_generator(self.seed, batch["index"]))
            return {**batch, "image": image[:, ids.tolist()], "channel_ids": ids.to(image.device)}
        return {**batch, "image": image}
