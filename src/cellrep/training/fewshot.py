"""The de novo cell-line protocol (docs/FEWSHOT.md), inside one ``cellrep-train`` run.

``split=cell_type split.holdout=<type> split.shots=<k> task.finetune_epochs=<n>``, any task:

1. **pretrain** (``task=mae``, ``dino``, ``simclr``, ...) or **train** (``task=supervised``) on the
   training sites of the *other* cell types only (:func:`pretraining_data`): the held-out type's
   sites, its k shots included, are never in the fit's loaders; validation, and so ``best.ckpt``
   (by ``task.monitor``), uses the other cell types' validation wells;
2. ``task=supervised`` only: a **zero-shot** test of the best checkpoint on the held-out type's
   remaining sites (``zeroshot/acc``, ``zeroshot/acc_top5``, ``zeroshot/acc_top10``);
3. **linear probe** of the best encoder (``probe_backbone()``; with the task's cell-type context
   when it has one): pooled features of the k shots per perturbation and of the remaining sites,
   the probe of ``cellrep-probe`` (:func:`cellrep.eval.probe.train_probes`) fit on the shots,
   scored on the rest (``linear/acc``, ``linear/acc_top5``, ``linear/acc_top10``);
4. **fine-tune** a supervised model for ``n`` epochs on the shots at ``task.finetune_base_lr``, a
   fresh warmup + cosine schedule, with the graph loss when it is on: the trained model itself for
   ``task=supervised``; for any other task a :class:`SupervisedTask` whose backbone (and context
   projection) starts from the encoder. Saved as ``checkpoints/finetuned.ckpt``;
5. **test** it on the remaining sites: ``test/acc``, ``test/acc_top5``, ``test/acc_top10``.

``metrics.json`` also gets ``arm`` (task, graph loss, context, shots, seed), what the sweep summary
(:mod:`cellrep.cli.report`) pairs by. With ``task.finetune_epochs=0`` the split alone applies (one
fit with the shots mixed into the training set), as before.
"""

from __future__ import annotations

import logging
import random
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
import torch.nn as nn
from omegaconf import DictConfig, OmegaConf, open_dict

from cellrep.config import TaskConfig
from cellrep.data.loading.datamodule import CellDataModule
from cellrep.data.loading.streams import EvalLoader, EvalStream
from cellrep.errors import CellrepError
from cellrep.eval.classification import topk_accuracy
from cellrep.eval.probe import ProbeSettings, train_probes
from cellrep.models.checkpoint import classifier_keys, fit_problems, read_checkpoint
from cellrep.models.context import encoder_context, pooled_features
from cellrep.training.tasks import build_task

log = logging.getLogger(__name__)
TEST_KEYS = ("test/acc", "test/acc_top5", "test/acc_top10")
TOP_K = {"acc": 1, "acc_top5": 5, "acc_top10": 10}
# The shot probe: cellrep-probe's BatchNorm + linear head on the k·classes shot sites (one minibatch an
# epoch at k <= 9), so more epochs than cellrep-probe's 30 on thousands of sites. No validation rows
# exist among the shots (k = 1 leaves none to spare): the learning rate is the one with the best
# accuracy on the shots, ties to the smaller one.
SHOT_PROBE = ProbeSettings(lrs=[1e-3, 1e-2, 1e-1], epochs=200, batch_size=256, weight_decay=1e-4, knn=False)


def finetune_epochs(cfg: DictConfig) -> int:
    return int(cfg.task.get("finetune_epochs", 0) or 0)


def check_protocol(cfg: DictConfig) -> None:
    """The fine-tuning phase needs a held-out cell type with shots (checked before any data is made)."""
    if finetune_epochs(cfg) == 0:
        return
    split = str(cfg.split.name)
    if split != "cell_type" or int(cfg.split.get("shots", 0)) < 1:
        raise CellrepError(
            f"task.finetune_epochs={finetune_epochs(cfg)} fine-tunes on the shots of a held-out "
            f"cell type, but split={split} with shots={cfg.split.get('shots', 0)}",
            fix="use split=cell_type split.holdout=<type> split.shots=<k >= 1>, or task.finetune_epochs=0",
        )


def phase_rows(dm: CellDataModule, holdout: str) -> tuple[np.ndarray, np.ndarray]:
    """(training rows of the other cell types, the held-out type's shot rows)."""
    train = (dm.index["split"] == "train").to_numpy()
    held = (dm.index["cell_type"].astype(str) == str(holdout)).to_numpy()
    return np.flatnonzero(train & ~held), np.flatnonzero(train & held)


def pretraining_data(dm: CellDataModule, holdout: str) -> CellDataModule:
    """Step 1's data: training rows of the other cell types; validation is theirs already (the cell_type
    split never puts a held-out site in val), and the fit runs no test."""
    return dm.with_train_rows(phase_rows(dm, holdout)[0])


def _test(trainer: L.Trainer, model: L.LightningModule, dm: CellDataModule, prefix: str) -> dict[str, float]:
    trainer.test(model, datamodule=dm, ckpt_path=None, verbose=False)
    return {
        prefix + k.removeprefix("test/"): float(v) for k, v in trainer.callback_metrics.items() if k.startswith("test/")
    }


def arm(cfg: DictConfig) -> dict[str, Any]:
    """Which arm of the sweep this run is (docs/FEWSHOT.md)."""
    return {
        "task": str(cfg.task.name),
        "graph_loss": str(cfg.task.get("graph_loss", "none")),
        "context": bool(cfg.model.get("context_path")),
        "shots": int(cfg.split.shots),
        "seed": int(cfg.seed),
        "holdout": str(cfg.split.holdout),
    }


def finetune_and_test(
    cfg: DictConfig, model: L.LightningModule, dm: CellDataModule, trainer: L.Trainer, run_dir: Path, plugins: list
) -> dict[str, Any]:
    """Steps 2–5 of the protocol (the caller did step 1 on :func:`pretraining_data`)."""
    best = next((cb.best_model_path for cb in trainer.checkpoint_callbacks if cb.best_model_path), None)
    if best:  # the whole task (graph loss, context included) as it was at its best validation
        model.load_state_dict(read_checkpoint(best, setting="the de novo protocol's best checkpoint").state_dict)
    metrics: dict[str, Any] = {"arm": arm(cfg), "pretrained_checkpoint": best}
    source = phase_rows(dm, cfg.split.holdout)[0]  # what pretraining_data trained on
    metrics["pretrain_cell_types"] = sorted({str(c) for c in dm.index["cell_type"].iloc[source]})
    supervised = cfg.task.name == "supervised"
    if supervised:
        metrics.update(_test(trainer, model, dm, "zeroshot/"))
    metrics.update(linear_probe(model, dm, cfg.split.holdout, int(cfg.seed)))
    tuned = model if supervised else supervised_from_encoder(cfg, model, dm)
    metrics.update(fine_tune(cfg, tuned, dm, run_dir, plugins))
    return metrics


def fine_tune(
    cfg: DictConfig, tuned: L.LightningModule, dm: CellDataModule, run_dir: Path, plugins: list
) -> dict[str, Any]:
    """Steps 4–5: ``tuned`` (a supervised task) trained on the shots, saved, tested on the remaining sites."""
    _, shots = phase_rows(dm, cfg.split.holdout)
    epochs = finetune_epochs(cfg)
    if cfg.task.get("finetune_base_lr") is not None:
        tuned.hparams.optimizer["base_lr"] = float(cfg.task.finetune_base_lr)
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
    tuner.fit(tuned, datamodule=dm.with_train_rows(shots))
    tuner.save_checkpoint(run_dir / "checkpoints" / "finetuned.ckpt")
    metrics = _test(tuner, tuned, dm, "test/")
    metrics.update(
        finetune_epochs=epochs, shot_sites=int(len(shots)), holdout=str(cfg.split.holdout), shots=int(cfg.split.shots)
    )
    return metrics


# ------------------------------------------------------------------ step 3: the linear probe on the shots
def _cell_type_ids(task: nn.Module, dm: CellDataModule) -> torch.Tensor:
    """Cell-type id of every index row, in the order of the task's context table: the task's own map
    when it keeps one (``group_of_index``), else sorted cell-type names (how tasks build the table)."""
    ids = getattr(task, "group_of_index", None)
    if isinstance(ids, torch.Tensor) and len(ids) == len(dm.index):
        return ids.cpu().long()
    names = sorted(dm.index["cell_type"].unique())
    return torch.from_numpy(dm.index["cell_type"].map({c: i for i, c in enumerate(names)}).to_numpy()).long()


@torch.inference_mode()
def encoder_features(task: L.LightningModule, dm: CellDataModule, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(rows in loader order, pooled features): what the task's classifier would see of each site, so the
    encoder of ``probe_backbone()`` conditioned on the task's context, when it has one
    (:func:`cellrep.models.context.encoder_context`)."""
    encoder, context = task.probe_backbone(), encoder_context(task)
    ids = _cell_type_ids(task, dm) if context is not None else None
    device = next(encoder.parameters()).device
    # every rank embeds every row (as BlockProbes does), so under DDP all ranks fit the same probe
    loader = EvalLoader(EvalStream(dm, np.sort(rows), 0, 1), dm.num_workers, dm.pin_memory, dm.finish_batch)
    out_rows, feats = [], []
    for batch in loader:  # uint8 crops, normalized on the device as in training (extract_block_features)
        batch = loader.finish_batch({**batch, "image": batch["image"].to(device)})
        index = torch.as_tensor(batch["index"]).long().cpu()
        types = None if ids is None else ids[index].to(device)
        f = pooled_features(encoder, batch["image"], context, types)
        if context is not None and context.mode == "film":  # FiLM conditions the pooled features themselves
            f = context.film(f, types)
        out_rows.append(index.numpy())
        feats.append(f.float().cpu().numpy())
    return np.concatenate(out_rows), np.concatenate(feats)


def fit_linear_probe(
    features: np.ndarray, labels: np.ndarray, is_shot: np.ndarray, num_classes: int, seed: int
) -> dict[str, float]:
    """``cellrep-probe``'s probe fit on the shot rows, scored on the others: ``linear/acc``, ``_top5``, ``_top10``."""
    stage = np.where(is_shot, "train", "test")
    settings = ProbeSettings(**{**vars(SHOT_PROBE), "seed": seed})
    result = train_probes({"pooled": features}, labels, stage, num_classes, settings, keep_logits=True, progress=False)
    logits, held = result.test_logits["pooled"], np.asarray(labels)[~is_shot]
    return {f"linear/{name}": topk_accuracy(logits, held, k) for name, k in TOP_K.items()}


def linear_probe(task: L.LightningModule, dm: CellDataModule, holdout: str, seed: int) -> dict[str, float]:
    """Step 3. Leaves the RNGs and every module's train/eval mode as it found them, so the fine-tune
    after it (and so ``task=supervised``'s numbers) is what it was without the probe."""
    modes = {m: m.training for m in task.modules()}
    held = (dm.index["cell_type"].astype(str) == str(holdout)).to_numpy()
    shots = phase_rows(dm, holdout)[1]
    states = random.getstate(), np.random.get_state()
    device = next(task.parameters()).device  # train_probes seeds torch, the CUDA generators included
    try:
        with torch.random.fork_rng(devices=[device.index or 0] if device.type == "cuda" else []):
            task.eval()
            rows, feats = encoder_features(task, dm, np.flatnonzero(held))
            labels = dm.index["label"].to_numpy()[rows]
            out = fit_linear_probe(feats, labels, np.isin(rows, shots), dm.num_classes, seed)
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])
        for module, training in modes.items():
            module.train(training)
    log.info("de novo protocol: linear probe on %d shots, top-1 %.3f", len(shots), out["linear/acc"])
    return out


# ------------------------------------------------------------------ step 4: a supervised model from the encoder
def supervised_config(cfg: DictConfig) -> DictConfig:
    """The run's config with ``task`` a supervised one: the pretraining task's optimizer, schedule,
    graph prior and protocol settings; no ``init_from`` (the weights come from the encoder in memory)."""
    known = TaskConfig.__dataclass_fields__
    task = {k: v for k, v in OmegaConf.to_container(cfg.task, resolve=True).items() if k in known}
    task.update(name="supervised", init_from=None, init_channels=None, monitor="val/acc", monitor_mode="max")
    out = cfg.copy()
    with open_dict(out):
        out.task = OmegaConf.merge(OmegaConf.structured(TaskConfig), task)
    return out


def supervised_from_encoder(cfg: DictConfig, pretrained: L.LightningModule, dm: CellDataModule) -> L.LightningModule:
    """A :class:`SupervisedTask` for ``dm``'s classes whose backbone is a copy of ``pretrained``'s encoder
    (its classifier head new) and whose context projection is the pretrained one, when both have one
    (:func:`cellrep.models.context.encoder_context`)."""
    tuned = build_task(supervised_config(cfg), dm)
    weights = pretrained.probe_backbone().state_dict()
    head = classifier_keys(tuned.backbone)
    weights = {k: v for k, v in weights.items() if k not in head}
    problems = fit_problems(weights, tuned.backbone, fresh=head)
    if problems:
        raise CellrepError(
            f"the {cfg.task.name} encoder does not fit the supervised backbone of model.name={cfg.model.name}:\n    "
            + "\n    ".join(problems),
            fix="the protocol builds both from the same model settings: report this as a bug",
        )
    tuned.backbone.load_state_dict(weights, strict=False)
    source = encoder_context(pretrained)
    if tuned.context is not None and source is not None:
        tuned.context.load_state_dict(source.state_dict())
    elif tuned.context is not None:
        log.warning("task=%s kept no context projection: the fine-tune learns its own", cfg.task.name)
    log.info("de novo protocol: supervised fine-tune from the %s encoder", cfg.task.name)
    return tuned
