"""The de novo cell-line protocol (docs/FEWSHOT.md), inside one ``cellrep-train`` run.

``split=cell_type split.holdout=<type> split.shots=<k> task.finetune_epochs=<n>``:

1. **train** on the training sites of the *other* cell types only (the k shots
   are held back); validation — and so ``best.ckpt`` — uses the other cell
   types' validation wells, never the held-out type;
2. **zero-shot** test of the best checkpoint on the held-out type's remaining
   sites (``zeroshot/acc``, ``zeroshot/acc_top5``, ``zeroshot/acc_top10``);
3. **fine-tune** that model for ``n`` epochs on the k shots per perturbation
   of the held-out type (same task, same losses — the graph loss too when it
   is on — a fresh warmup + cosine schedule at ``task.finetune_base_lr``),
   saved as ``checkpoints/finetuned.ckpt``;
4. **test** on the held-out type's remaining sites: ``test/acc``,
   ``test/acc_top5``, ``test/acc_top10`` in ``metrics.json``.

With ``task.finetune_epochs=0`` the split alone applies (one fit with the
shots mixed into the training set), as before.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
from omegaconf import DictConfig, OmegaConf

from cellrep.data.loading.datamodule import CellDataModule
from cellrep.errors import CellrepError
from cellrep.models.checkpoint import read_checkpoint

log = logging.getLogger(__name__)
TEST_KEYS = ("test/acc", "test/acc_top5", "test/acc_top10")


def finetune_epochs(cfg: DictConfig) -> int:
    return int(cfg.task.get("finetune_epochs", 0) or 0)


def check_protocol(cfg: DictConfig) -> None:
    """The fine-tuning phase needs a held-out cell type with shots and a supervised task."""
    if finetune_epochs(cfg) == 0:
        return
    split = str(cfg.split.name)
    if split != "cell_type" or int(cfg.split.get("shots", 0)) < 1:
        raise CellrepError(
            f"task.finetune_epochs={finetune_epochs(cfg)} fine-tunes on the shots of a held-out "
            f"cell type, but split={split} with shots={cfg.split.get('shots', 0)}",
            fix="use split=cell_type split.holdout=<type> split.shots=<k >= 1>, or task.finetune_epochs=0",
        )
    if cfg.task.name != "supervised":
        raise CellrepError(
            "the fine-tuning phase of the de novo protocol is a supervised fine-tune",
            fix="pretrain with task=mae, then run task=supervised task.init_from=<its checkpoint> with the protocol",
        )


def phase_rows(dm: CellDataModule, holdout: str) -> tuple[np.ndarray, np.ndarray]:
    """(training rows of the other cell types, the held-out type's shot rows)."""
    train = (dm.index["split"] == "train").to_numpy()
    held = (dm.index["cell_type"].astype(str) == str(holdout)).to_numpy()
    return np.flatnonzero(train & ~held), np.flatnonzero(train & held)


def _test(trainer: L.Trainer, model: L.LightningModule, dm: CellDataModule, prefix: str) -> dict[str, float]:
    trainer.test(model, datamodule=dm, ckpt_path=None, verbose=False)
    return {
        prefix + k.removeprefix("test/"): float(v) for k, v in trainer.callback_metrics.items() if k.startswith("test/")
    }


def finetune_and_test(
    cfg: DictConfig, model: L.LightningModule, dm: CellDataModule, trainer: L.Trainer, run_dir: Path, plugins: list
) -> dict[str, Any]:
    """Steps 2–4 of the protocol (the caller did step 1 on ``dm.with_train_rows``)."""
    best = next((cb.best_model_path for cb in trainer.checkpoint_callbacks if cb.best_model_path), None)
    if best:  # the whole task (graph loss, context included) as it was at its best validation
        model.load_state_dict(read_checkpoint(best, setting="the de novo protocol's best checkpoint").state_dict)
    metrics = {"pretrained_checkpoint": best}
    metrics.update(_test(trainer, model, dm, "zeroshot/"))
    _, shots = phase_rows(dm, cfg.split.holdout)
    epochs = finetune_epochs(cfg)
    if cfg.task.get("finetune_base_lr") is not None:
        model.hparams.optimizer["base_lr"] = float(cfg.task.finetune_base_lr)
    options = OmegaConf.to_container(cfg.trainer, resolve=True)
    options.update(
        max_epochs=epochs,
        max_steps=-1,
        min_epochs=None,
        max_time=None,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        val_check_interval=None,
        enable_checkpointing=False,
        default_root_dir=str(run_dir),
    )
    log.info("de novo protocol: fine-tuning %d epochs on %d shot sites of %s", epochs, len(shots), cfg.split.holdout)
    tuner = L.Trainer(**options, logger=False, callbacks=[], plugins=plugins)
    tuner.fit(model, datamodule=dm.with_train_rows(shots))
    tuner.save_checkpoint(run_dir / "checkpoints" / "finetuned.ckpt")
    metrics.update(_test(tuner, model, dm, "test/"))
    metrics.update(
        finetune_epochs=epochs, shot_sites=int(len(shots)), holdout=str(cfg.split.holdout), shots=int(cfg.split.shots)
    )
    return metrics
