"""cellrep-train: seed, data, model, callbacks, loggers, trainer; fit; test; report."""

from __future__ import annotations

import cellrep  # noqa: F401  (torchvision compat before timm)

# isort: split
import logging
import math
from typing import Any

import hydra
import lightning as L
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from cellrep.cli.common import exit_on_user_error, register_resolvers
from cellrep.cli.report import run_report
from cellrep.cli.resume import attach_wandb_identity, job_environment, pin_ddp_children, resume_checkpoint
from cellrep.cli.rundir import RunDir
from cellrep.config import register_configs, to_schema
from cellrep.data.loading.datamodule import CellDataModule
from cellrep.data.shards.prepare import ensure_shards
from cellrep.knowledge.inputs import context_inputs, graph_inputs
from cellrep.training import fewshot
from cellrep.training.callbacks.atomic_checkpoint import AtomicCheckpointIO
from cellrep.training.init_from import load_encoder
from cellrep.training.strategy import trainer_strategy
from cellrep.training.tasks.mae import MAETask
from cellrep.training.tasks.supervised import SupervisedTask

log = logging.getLogger("cellrep.cli.train")
register_configs()
register_resolvers()


def build_datamodule(cfg: DictConfig, shards_dir) -> CellDataModule:
    data = cfg.data
    channels = data.channel_names or (data.synthetic.channel_names if data.get("synthetic") else None)
    split = OmegaConf.to_container(cfg.split, resolve=True)
    split["name"] = cfg.split.name.name
    return CellDataModule(
        shards_dir,
        split=split,
        batch_size=data.batch_size,
        num_workers=data.num_workers,
        crop_size=data.crop_size,
        normalization=data.normalization.name,
        label_column=data.label_column,
        expected_channels=len(channels) if channels else None,
        seed=cfg.seed,
        max_corrupt=data.get("max_corrupt", 100),
        augment_on_device=data.get("augment_on_device"),
    )


def build_task(cfg: DictConfig, dm: CellDataModule) -> L.LightningModule:
    """The LightningModule named by ``task.name``: ``mae`` pretraining or ``supervised`` classification.

    Knowledge priors (DESIGN §6): ``task.graph_loss`` gets the perturbation graph over ``dm.class_names``,
    ``model.context_path`` a context vector per cell type; ``task.graph_report`` says which perturbations
    the graph lacks (it goes into metrics.json).
    """
    graph, graph_report = graph_inputs(cfg.task, dm.class_names)
    if cfg.task.name == "mae":
        options = OmegaConf.to_container(cfg.task, resolve=True)
        for key in ("name", "monitor", "monitor_mode", "graph_path", "graph_nodes"):  # read here, not by the module
            options.pop(key, None)
        context_inputs(cfg, [])  # MAE takes no context: says so if one is configured
        task = MAETask(
            model=OmegaConf.to_container(cfg.model, resolve=True), in_chans=dm.in_chans, **{**options, **graph}
        )
        task.graph_report = graph_report
        return task
    cell_types = sorted(dm.index["cell_type"].unique())
    group_of_index = torch.tensor(dm.index["cell_type"].map({c: i for i, c in enumerate(cell_types)}).to_numpy())
    task = SupervisedTask(
        model=OmegaConf.to_container(cfg.model, resolve=True),
        in_chans=dm.in_chans,
        num_classes=dm.num_classes,
        optimizer=OmegaConf.to_container(cfg.task.optimizer, resolve=True),
        scheduler=OmegaConf.to_container(cfg.task.scheduler, resolve=True),
        label_smoothing=cfg.task.label_smoothing,
        group_names=cell_types,
        group_of_index=group_of_index,
        context_table=context_inputs(cfg, cell_types),
        **graph,
    )
    task.graph_report = graph_report
    if cfg.task.get("init_from"):
        fresh = load_encoder(task.backbone, cfg.task.init_from)
        log.info("backbone from %s (left at initialization: %s)", cfg.task.init_from, ", ".join(fresh) or "nothing")
    return task


def instantiate_all(group: DictConfig | None) -> list[Any]:
    return [instantiate(node) for node in (group or {}).values() if node is not None and "_target_" in node]


def describe_test_set(cfg: DictConfig) -> str:
    return {
        "batch": "held-out experiments",
        "random": "random sites of every experiment",
        "cell_type": f"held-out cell type {cfg.split.holdout}",
        "official": "RxRx1 official test set",
    }[cfg.split.name.name]


def train(cfg: DictConfig) -> float | None:
    to_schema(cfg)
    fewshot.check_protocol(cfg)
    L.seed_everything(cfg.seed, workers=True)
    run = RunDir(cfg.paths.output_dir)
    version = run.write_provenance(cfg)
    ckpt_path = resume_checkpoint(cfg, run.path)  # run_name=...: the same command continues the run
    pin_ddp_children(run.path)  # DDP ranks re-run this job, not the whole sweep

    shards_dir = ensure_shards(cfg.data)
    datamodule = build_datamodule(cfg, shards_dir)
    log.info("split %s: %s sites", cfg.split.name.name, datamodule.split_counts)
    model = build_task(cfg, datamodule)
    callbacks = instantiate_all(cfg.get("callbacks"))
    attach_wandb_identity(cfg, run.path)  # a resumed run logs into the same wandb run
    loggers = instantiate_all(cfg.get("logger"))
    plugins = [AtomicCheckpointIO()]
    trainer_args = OmegaConf.to_container(cfg.trainer, resolve=True)
    trainer_args["strategy"] = trainer_strategy(trainer_args["strategy"], model)  # fsdp: one unit per block
    trainer = L.Trainer(**trainer_args, callbacks=callbacks, logger=loggers or False, plugins=plugins)
    for logger in loggers:
        logger.log_hyperparams({**OmegaConf.to_container(cfg, resolve=True), "code": version})

    denovo = fewshot.finetune_epochs(cfg) > 0  # de novo protocol: other cell types first, the shots after
    fit_data = (
        datamodule.with_train_rows(fewshot.phase_rows(datamodule, cfg.split.holdout)[0]) if denovo else datamodule
    )
    trainer.fit(model, datamodule=fit_data, ckpt_path=ckpt_path)
    metrics: dict[str, Any] = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
    for cb in callbacks:
        metrics.update(getattr(cb, "summary", {}))  # throughput, parameter counts
    metrics.update(getattr(model, "graph_report", {}))
    if denovo and cfg.test:
        metrics.update(fewshot.finetune_and_test(cfg, model, datamodule, trainer, run.path, plugins))
    elif cfg.test:
        has_best = any(getattr(cb, "best_model_path", "") for cb in trainer.checkpoint_callbacks)
        trainer.test(model, datamodule=datamodule, ckpt_path="best" if has_best else None)
        metrics.update({k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("test/")})

    metrics.update(
        split=cfg.split.name.name,
        test_description=describe_test_set(cfg),
        model=cfg.model.name,
        dataset=cfg.data.source.name,
        num_classes=datamodule.num_classes,
        split_counts=datamodule.split_counts,
        run_dir=str(run.path),
        best_checkpoint=next((cb.best_model_path for cb in trainer.checkpoint_callbacks), None),
    )
    if trainer.is_global_zero:  # DDP: every rank gets here, one writes
        run.write_metrics(metrics)
        print(run_report(metrics))
    for logger in loggers:
        logger.finalize("success")
    if "wandb" in (cfg.get("logger") or {}):
        import wandb

        wandb.finish()  # later jobs of a multirun must not log into this run
    value = metrics.get(cfg.optimized_metric)
    return None if value is None or math.isnan(value) else value


@hydra.main(version_base="1.3", config_path="../conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    with job_environment():  # a multirun's next job starts with no DDP state of this one
        return exit_on_user_error(train, cfg)


if __name__ == "__main__":
    main()
