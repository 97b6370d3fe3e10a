"""Per-block linear probes while training: which block holds the biology, epoch by epoch.

A self-supervised loss (MAE's ``val/loss``) says nothing about which block is worth embedding
with, nor whether that block keeps improving. Every ``every_n_epochs`` epochs this callback does
what ``cellrep-probe`` does (docs/benchmarks.md, "Per-block linear probing"), on a fixed subset:

- **subset**, fixed at fit start from the datamodule's index (its ``split`` column): at most
  ``max_sites`` sites of each part (train, val, test), drawn with ``seed``, so the cost does not grow
  with the screen. The probes fit on the training part, the learning rate per block and the best
  block are chosen on the validation part (as ``cellrep-probe``; the training part when the split has
  no validation sites), and the held-out (test) part scores them;
- **one backbone pass** (:func:`cellrep.eval.features.extract_block_features`: centre crops,
  every block pooled) in eval mode without gradients; each module's train/eval mode and the RNG
  state (CPU and the training device) are restored afterwards, so training continues exactly as it
  would have without the probes;
- **probes** with :func:`cellrep.eval.probe.train_probes` on the cached features, with a shorter
  schedule than ``cellrep-probe``'s (see :class:`BlockProbes`).

Logged to every logger at the epoch's last step: ``probe/<block>/acc`` (held-out top-1 at the
learning rate chosen on validation), ``probe/best_block_index``, ``probe/best_acc`` (held-out
top-1 of the best block), ``probe/chance`` and ``probe/seconds`` (the callback's own wall time, a
measure of its overhead that contention on the machine does not distort as much as total run
times). TensorBoard and W&B also get ``probe/blocks``, an image of accuracy against block with one
line per evaluated epoch; without such a logger it is written to ``dirpath`` (default ``<run
dir>/block_probes.png``). The last evaluation goes into ``metrics.json`` (``summary``).

**Which module is probed.** The task's ``probe_backbone()`` method returns it: a timm-style module
with ``forward_intermediates`` and ``feature_info`` (``SupervisedTask``: ``backbone``; ``MAETask``:
``mae.encoder``). A new task (DINO: its student or teacher encoder) adds the method to be probed. An
encoder trained with a cell-type context is probed with it (:func:`probe_context`), as evaluation embeds it. A task
without it, a module without per-block features (CA-ViT today), a datamodule without a split or a
split without training or test sites turn the callback off with a warning at fit start: the probes
are a view of the training, and a run must not fail for them. The curve is kept in the callback's checkpoint state,
so a resumed run continues it.

**Distributed.** Every rank runs the same pass over the whole subset (so FSDP's per-unit gathers
line up across ranks), rank 0 alone trains the probes and logs, and all ranks meet at a barrier,
so no rank runs ahead into the next epoch's collectives. Under ``trainer=fsdp`` the probed module
must be one of the task's top-level children (FSDP gathers its parameters for
``forward_intermediates`` only then, :func:`cellrep.training.strategy.shard_blocks`); otherwise the
callback warns and stays off.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Optional, Sequence

import lightning as L
import numpy as np
import pandas as pd
import torch
import torch.nn as nn
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger, WandbLogger
from lightning.pytorch.strategies import ModelParallelStrategy
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from cellrep.data.loading.streams import EvalLoader, EvalStream
from cellrep.errors import CellrepError
from cellrep.eval.features import SiteContext, block_names, extract_block_features
from cellrep.eval.probe import ProbeSettings, train_probes
from cellrep.io import atomic_open
from cellrep.models.context import encoder_context

log = logging.getLogger(__name__)
PARTS = ("train", "val", "test")
OFF_FIX = "or set task.probe_every_n_epochs=0 (callbacks.block_probes.every_n_epochs=0) to train without them"


def probe_backbone(pl_module: L.LightningModule) -> nn.Module:
    """The module a task wants probed (its ``probe_backbone()``), checked to expose per-block features."""
    method = getattr(pl_module, "probe_backbone", None)
    if not callable(method):
        raise CellrepError(
            f"{type(pl_module).__name__} has no probe_backbone() method naming the module to probe",
            fix=f"add probe_backbone() returning its timm encoder (see cellrep.training.tasks.mae), {OFF_FIX}",
        )
    backbone = method()
    try:
        block_names(backbone)
    except CellrepError as exc:
        raise CellrepError(exc.problem, fix=f"{exc.fix}, {OFF_FIX}") from None
    return backbone


def probe_context(pl_module: L.LightningModule) -> SiteContext | None:
    """The cell-type context the probed encoder is trained with (docs/FEWSHOT.md), so its blocks are probed
    as it embeds (:func:`cellrep.models.context.encoder_context`: DINO's is its teacher's), each site's
    cell type from the task's ``group_of_index``."""
    context = encoder_context(pl_module)
    if context is None:
        return None
    return SiteContext(context, pl_module.group_of_index)


def block_curves(history: pd.DataFrame) -> np.ndarray:
    """``history`` (columns epoch, block, block_index, test_acc, chance) → uint8 H×W×3: held-out top-1
    against block, one line per evaluated epoch (darker = earlier), chance dashed, the latest best block
    marked (the style of ``probe.png``, :func:`cellrep.eval.plots.probe_curve`)."""
    epochs = sorted(history["epoch"].unique())
    first = history[history["epoch"] == epochs[0]].sort_values("block_index")
    fig = Figure(figsize=(max(4.0, 0.45 * len(first) + 2), 3.2), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    colours = colormaps["viridis"](np.linspace(0.1, 0.9, len(epochs)))
    for colour, epoch in zip(colours, epochs):
        rows = history[history["epoch"] == epoch].sort_values("block_index")
        ax.plot(rows["block_index"], rows["test_acc"], "o-", ms=3, color=colour, label=f"epoch {epoch}")
    last = history[history["epoch"] == epochs[-1]]
    ax.axhline(float(last["chance"].iloc[0]), color="grey", ls="--", lw=1, label="chance")
    best = last[last["best"]]
    if len(best):
        ax.axvline(int(best["block_index"].iloc[0]), color="tab:red", lw=1, alpha=0.5, label="best (latest)")
    ax.set_xticks(first["block_index"], first["block"], rotation=45, ha="right", fontsize=8)
    ax.set_xlabel("block")
    ax.set_ylabel("held-out top-1")
    ax.set_title("probe accuracy per block")
    handles, labels = ax.get_legend_handles_labels()
    if len(epochs) > 6:  # first, last and the reference lines; the colour order says the rest
        keep = [0, len(epochs) - 1, *range(len(epochs), len(handles))]
        handles, labels = [handles[i] for i in keep], [labels[i] for i in keep]
    ax.legend(handles, labels, fontsize=7)
    fig.tight_layout()
    fig.canvas.draw()
    return np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()


class _SubsetLoader:
    """The datamodule's evaluation loader over fixed rows, unpartitioned (every rank sees every row),
    whose ``finish_batch`` also applies the trainer's precision (``bf16-true`` casts the images)."""

    def __init__(self, dm, rows: np.ndarray, convert):
        self.loader = EvalLoader(EvalStream(dm, rows, 0, 1), dm.num_workers, dm.pin_memory, dm.finish_batch)
        self.convert = convert

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        return iter(self.loader)

    def finish_batch(self, batch: dict) -> dict:
        return self.convert(self.loader.finish_batch(batch))


class BlockProbes(L.Callback):
    """Per-block linear probes of ``probe_backbone()`` every ``every_n_epochs`` epochs (module docstring).

    ``max_sites``: at most this many sites per part (train, val, test), drawn with ``seed``. The probe
    schedule (``lrs``, ``epochs``, ``batch_size``, ``weight_decay``) is shorter than ``cellrep-probe``'s
    (4 lrs × 30 epochs): a live curve has to be cheap and only has to rank blocks and epochs, not give
    the final number; on a few hundred training sites 10 epochs at 3 lrs already converge close to it,
    and ``cellrep-probe`` on the finished checkpoint reports the real value. ``every_n_epochs=0``: off.
    """

    def __init__(
        self,
        every_n_epochs: int = 0,
        max_sites: int = 512,
        lrs: Sequence[float] = (1e-3, 1e-2, 1e-1),
        epochs: int = 10,
        batch_size: int = 256,
        weight_decay: float = 1e-4,
        seed: int = 0,
        dirpath: Optional[str] = None,
    ):
        if every_n_epochs < 0 or max_sites < 2:
            raise CellrepError(
                f"block probes: every_n_epochs={every_n_epochs}, max_sites={max_sites}",
                fix="use every_n_epochs >= 0 (0 = off) and max_sites >= 2",
            )
        self.every_n_epochs, self.max_sites, self.seed, self.dirpath = (
            int(every_n_epochs),
            int(max_sites),
            seed,
            dirpath,
        )
        # ProbeTrainingConfig checks the schedule; knn off: a second classifier per block is not needed live
        self.settings = ProbeSettings(
            lrs=[float(x) for x in lrs],
            epochs=int(epochs),
            batch_size=int(batch_size),
            weight_decay=float(weight_decay),
            knn=False,
            seed=int(seed),
        )
        self.rows: Optional[np.ndarray] = None
        self.history = pd.DataFrame()  # one row per evaluated epoch × block
        self.summary: dict = {}  # the last evaluation, for metrics.json (cellrep-train reads callbacks' summary)
        self.written: list[Path] = []
        self._loader = None

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._loader = None
        if not self.every_n_epochs or trainer.fast_dev_run:
            return
        try:
            backbone = probe_backbone(pl_module)
        except CellrepError as exc:  # e.g. CA-ViT (no feature_info): the probes are a view, not the run's purpose
            log.warning("block probes off: %s (fix: %s)", exc.problem, exc.fix)
            return
        if isinstance(trainer.strategy, ModelParallelStrategy) and not any(backbone is c for c in pl_module.children()):
            log.warning(
                "block probes off: under trainer=fsdp the probed module must be a top-level child of the task "
                "(%s's is not), or its sharded parameters would not be gathered",
                type(pl_module).__name__,
            )
            return
        dm = trainer.datamodule
        index = getattr(dm, "index", None)
        if index is None or "split" not in index.columns or not hasattr(dm, "num_classes"):
            log.warning("block probes off: they need a CellDataModule (an index with a split column, labels)")
            return
        rng = np.random.default_rng(self.seed)
        parts = []
        for part in PARTS:
            rows = np.flatnonzero((index["split"] == part).to_numpy())
            if len(rows) > self.max_sites:
                rows = rng.choice(rows, self.max_sites, replace=False)
            parts.append(np.sort(rows))
        counts = dict(zip(PARTS, map(len, parts)))
        if counts["train"] < 2 or counts["test"] == 0:
            log.warning("block probes off: they need training and held-out sites; the split has %s", counts)
            return
        self.rows = np.sort(np.concatenate(parts))
        convert = trainer.strategy.precision_plugin.convert_input
        self._loader = _SubsetLoader(dm, self.rows, convert)
        log.info("block probes every %d epoch(s) on %s sites", self.every_n_epochs, counts)

    def state_dict(self) -> dict:
        # the curve survives a resume (plain lists: checkpoints are read with weights_only=True)
        return {"history": self.history.to_dict("list"), "summary": self.summary}

    def load_state_dict(self, state_dict: dict) -> None:
        self.history = pd.DataFrame(state_dict.get("history", {}))
        self.summary = dict(state_dict.get("summary", {}))

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        epoch = trainer.current_epoch
        if self._loader is None or trainer.sanity_checking or trainer.fast_dev_run or (epoch + 1) % self.every_n_epochs:
            return
        start = time.perf_counter()
        table, best = self._probe(trainer, pl_module)
        if trainer.is_global_zero:
            self._record(trainer, table, best, epoch, time.perf_counter() - start)
        trainer.strategy.barrier("block_probes")  # the other ranks wait for rank 0's probes

    def _probe(self, trainer: L.Trainer, pl_module: L.LightningModule):
        backbone = probe_backbone(pl_module)
        modes = {m: m.training for m in backbone.modules()}
        device = pl_module.device
        # the pass and train_probes (torch.manual_seed) must leave the training RNG where it was
        rng_devices = [device.index or 0] if device.type == "cuda" else []
        try:
            with torch.random.fork_rng(devices=rng_devices):
                with trainer.strategy.precision_plugin.forward_context():
                    feats = extract_block_features(
                        backbone, self._loader, None, device, progress=False, context=probe_context(pl_module)
                    )
                if not trainer.is_global_zero:
                    return None, None
                sites = trainer.datamodule.index.iloc[feats.rows]
                result = train_probes(
                    feats.features,
                    sites["label"].to_numpy(),
                    sites["split"].to_numpy(),
                    trainer.datamodule.num_classes,
                    self.settings,
                    progress=False,
                )
        finally:
            for module, training in modes.items():
                module.train(training)
        return result.table, result.best_block

    def _record(self, trainer: L.Trainer, table: pd.DataFrame, best: str, epoch: int, seconds: float) -> None:
        row = table.loc[table["block"] == best].iloc[0]
        metrics = {f"probe/{b}/acc": float(a) for b, a in zip(table["block"], table["test_acc"])}
        metrics.update(
            {
                "probe/best_block_index": float(row["block_index"]),
                "probe/best_acc": float(row["test_acc"]),
                "probe/chance": float(row["chance"]),
                "probe/seconds": seconds,
            }
        )
        step = trainer.global_step
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)
        frame = table[["block", "block_index", "test_acc", "val_acc", "chance"]].assign(
            epoch=epoch, best=table["block"] == best
        )
        self.history = pd.concat([self.history, frame], ignore_index=True)
        self.summary = {**metrics, "probe/best_block": best, "probe/epoch": epoch}
        log.info(
            "block probes, epoch %d: best %s, held-out top-1 %.3f (chance %.3f), %.1f s",
            epoch,
            best,
            row["test_acc"],
            row["chance"],
            seconds,
        )
        self._publish(trainer, block_curves(self.history), step)

    def _publish(self, trainer: L.Trainer, image: np.ndarray, step: int) -> None:
        needs_file = True
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                logger.experiment.add_image("probe/blocks", image, step, dataformats="HWC")
                needs_file = False
            elif isinstance(logger, WandbLogger):
                logger.log_image(key="probe/blocks", images=[image], step=step, caption=["held-out top-1 per block"])
                needs_file = False
        if needs_file:
            self._write_png(trainer, image)

    def _write_png(self, trainer: L.Trainer, image: np.ndarray) -> None:
        from PIL import Image

        root = self.dirpath
        if root is None:
            csv = next((lg for lg in trainer.loggers if isinstance(lg, CSVLogger)), None)
            root = csv.save_dir if csv else trainer.default_root_dir
        path = Path(root) / "block_probes.png"
        with atomic_open(path) as f:  # the latest curve; never a half-written PNG
            Image.fromarray(image).save(f, format="PNG")
        if path not in self.written:
            self.written.append(path)
