"""Show what an MAE paints: masked input | reconstruction | target, every N steps.

A loss curve cannot tell a model that reconstructs cells from one that paints
smooth blobs; a look at the images can. Each row is one site of the current
training batch; columns are the masked input, the reconstruction (visible
pixels kept, masked ones predicted) and the target, each an RGB composite of
all channels (RxRx1's false colours: blue, green, red, cyan, magenta, yellow,
repeating for more than six channels). All three columns share the target's
per-channel contrast (1st–99th percentile), so differences are the model's.

Images go to every active logger that takes them (TensorBoard, W&B); when a
logger cannot (CSV) or there is none, PNGs are written to ``dirpath``
(default ``<run dir>/reconstructions/step_<N>.png``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import lightning as L
import numpy as np
import torch
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger, WandbLogger
from lightning.pytorch.utilities import rank_zero_only

PALETTE = torch.tensor([[0, 0, 1], [0, 1, 0], [1, 0, 0], [0, 1, 1], [1, 0, 1], [1, 1, 0]], dtype=torch.float32)


def rgb_composite(
    images: torch.Tensor, low: torch.Tensor, high: torch.Tensor, hidden: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """``B×C×H×W`` → ``B×H×W×3`` in [0, 1]; channel c scaled to [low_c, high_c], hidden pixels black."""
    scaled = ((images - low) / (high - low).clamp_min(1e-6)).clamp(0, 1)
    if hidden is not None:
        scaled = scaled.masked_fill(hidden, 0.0)
    colours = PALETTE[torch.arange(images.shape[1]) % len(PALETTE)].to(images.device)  # C×3
    rgb = torch.einsum("bchw,ck->bhwk", scaled, colours)
    return (rgb / colours.sum(dim=0).clamp_min(1)).clamp(0, 1)  # overlapping channels must not saturate


def reconstruction_grid(target: torch.Tensor, reconstruction: torch.Tensor, mask: torch.Tensor) -> np.ndarray:
    """One uint8 ``H'×W'×3`` image: a row per site, columns masked input | reconstruction | target."""
    flat = target.float().flatten(2)
    low = flat.quantile(0.01, dim=2)[..., None, None]
    high = flat.quantile(0.99, dim=2)[..., None, None]
    cols = [
        rgb_composite(target, low, high, hidden=mask),
        rgb_composite(reconstruction, low, high),
        rgb_composite(target, low, high),
    ]
    rows = torch.cat([torch.cat(list(col.unbind(0)), dim=0) for col in cols], dim=1)  # stack sites, then columns
    return (rows.cpu().numpy() * 255).round().astype(np.uint8)


class ReconstructionImages(L.Callback):
    """Logs :func:`reconstruction_grid` of the current batch every ``every_n_steps`` optimizer steps.

    Does nothing for modules without a ``reconstruct(images, generator, index)`` method,
    so it is safe in a callback list shared by every task.
    """

    def __init__(self, every_n_steps: int = 500, num_images: int = 4, dirpath: Optional[str] = None):
        self.every_n_steps, self.num_images, self.dirpath = every_n_steps, num_images, dirpath
        self._last_step = -1
        self.written: list[Path] = []

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx):
        step = trainer.global_step
        if step % self.every_n_steps or step == self._last_step or not hasattr(pl_module, "reconstruct"):
            return
        self._last_step = step
        images = batch["image"][: self.num_images]
        # fixed masks across steps, so successive images differ only by what the model learned
        generator = torch.Generator(device=images.device).manual_seed(0)
        was_training = pl_module.training
        pl_module.eval()
        try:
            # the batch's rows pick each image's cell-type context token, so an MAE trained with one is drawn with it
            index = batch.get("index")
            out = pl_module.reconstruct(
                images, generator=generator, index=None if index is None else index[: self.num_images]
            )
        finally:
            pl_module.train(was_training)
        self._publish(trainer, reconstruction_grid(out["target"], out["reconstruction"], out["mask"]), step)

    @rank_zero_only
    def _publish(self, trainer: L.Trainer, grid: np.ndarray, step: int) -> None:
        needs_file = not trainer.loggers
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                logger.experiment.add_image("reconstructions", grid, step, dataformats="HWC")
            elif isinstance(logger, WandbLogger):
                logger.log_image(
                    key="reconstructions", images=[grid], step=step, caption=["masked input | reconstruction | target"]
                )
            else:  # CSV and any other logger without images
                needs_file = True
        if needs_file:
            self._write_png(trainer, grid, step)

    def _write_png(self, trainer: L.Trainer, grid: np.ndarray, step: int) -> None:
        from PIL import Image

        root = self.dirpath
        if root is None:
            csv = next((lg for lg in trainer.loggers if isinstance(lg, CSVLogger)), None)
            root = Path(csv.save_dir if csv else trainer.default_root_dir) / "reconstructions"
        path = Path(root) / f"step_{step:07d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp.png")
        Image.fromarray(grid).save(tmp)
        tmp.replace(path)  # never a half-written PNG
        self.written.append(path)
