"""cellrep-train: seed, data, model, callbacks, loggers, trainer; fit; test; report."""

from __future__ import annotations

import cellrep  # noqa: F401  (torchvision compat before timm)

# isort: split
import logging
import math
from typing import Any

import hydra
import lightning as L
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from cellrep.cli.common import exit_on_user_error, register_resolvers
from cellrep.cli.report import run_report
from cellrep.cli.resume import attach_wandb_identity, job_environment, pin_ddp_children, resume_checkpoint
from cellrep.cli.rundir import RunDir
from cellrep.config import register_configs, to_schema
from cellrep.data.loading.datamodule import CellDataModule
from cellrep.data.shards.prepare import ensure_shards
from cellrep.errors import CellrepError
from cellrep.training import fewshot
from cellrep.training.callbacks.atomic_checkpoint import AtomicCheckpointIO
from cellrep.training.strategy import trainer_strategy
from cellrep.training.tasks import build_task

log = logging.getLogger("cellrep.cli.train")
register_configs()
register_resolvers()


def instantiate_all(group: DictConfig | None) -> list[Any]:
    return [instantiate(node) for node in (group or {}).values() if node is not None and "_target_" in node]


def describe_test_set(cfg: DictConfig) -> str:
    return {
        "batch": "held-out experiments",
        "random": "random sites of every experiment",
        "cell_type": f"held-out cell type {cfg.split.holdout}",
        "official": "RxRx1 official test set",
    }[cfg.split.name]


def train(cfg: DictConfig) -> float | None:
    to_schema(cfg)
    fewshot.check_protocol(cfg)
    L.seed_everything(cfg.seed, workers=True)
    run = RunDir(cfg.paths.output_dir)
    version = run.write_provenance(cfg)
    ckpt_path = resume_checkpoint(cfg, run.path)  # run_name=...: the same command continues the run
    pin_ddp_children(run.path)  # DDP ranks re-run this job, not the whole sweep

    shards_dir = ensure_shards(cfg.data).shards_dir
    datamodule = CellDataModule.from_config(shards_dir, cfg.data, cfg.split, cfg.seed)
    log.info("split %s: %s sites", cfg.split.name, datamodule.split_counts)
    model = build_task(cfg, datamodule)
    callbacks = instantiate_all(cfg.get("callbacks"))
    attach_wandb_identity(cfg, run.path)  # a resumed run logs into the same wandb run
    loggers = instantiate_all(cfg.get("logger"))
    plugins = [AtomicCheckpointIO()]
    trainer_args = OmegaConf.to_container(cfg.trainer, resolve=True)
    trainer_args["strategy"] = trainer_strategy(trainer_args["strategy"])  # fsdp: FSDP2, one unit per block
    trainer = L.Trainer(**trainer_args, callbacks=callbacks, logger=loggers or False, plugins=plugins)
    for logger in loggers:
        logger.log_hyperparams({**OmegaConf.to_container(cfg, resolve=True), "code": version})

    denovo = fewshot.finetune_epochs(cfg) > 0  # de novo protocol: other cell types first, the shots after
    fit_data = fewshot.pretraining_data(datamodule, cfg.split.holdout) if denovo else datamodule
    trainer.fit(model, datamodule=fit_data, ckpt_path=ckpt_path)
    metrics: dict[str, Any] = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/")}
    for cb in callbacks:
        metrics.update(getattr(cb, "summary", {}))  # throughput, parameter counts
    metrics.update(getattr(model, "graph_report", {}))
    if denovo and cfg.test:
        metrics.update(fewshot.finetune_and_test(cfg, model, datamodule, trainer, run.path, plugins))
    elif cfg.test:
        # the best checkpoint's path, not "best": with two checkpoint callbacks (best.ckpt, last.ckpt) Lightning
        # warns that "best" is ambiguous; this is the one it would pick. No path: the model in memory.
        best = next(
            (cb.best_model_path for cb in trainer.checkpoint_callbacks if getattr(cb, "best_model_path", "")), None
        )
        trainer.test(model, datamodule=datamodule, ckpt_path=best)
        metrics.update({k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("test/")})

    metrics.update(
        split=cfg.split.name,
        test_description=describe_test_set(cfg),
        model=cfg.model.name,
        dataset=cfg.data.source,
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
    return optimized_value(metrics, cfg.get("optimized_metric"))


def optimized_value(metrics: dict[str, Any], name: str | None) -> float | None:
    """The metric a sweeper optimizes (None when none is asked for, or when it is NaN)."""
    if not name:
        return None
    if name not in metrics:
        numeric = sorted(k for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool))
        raise CellrepError(
            f"optimized_metric={name} is not among this run's metrics (metrics.json is written: {', '.join(numeric)})",
            fix="set optimized_metric to one of those (test/* need test=true), or optimized_metric=null",
        )
    value = float(metrics[name])
    return None if math.isnan(value) else value


@hydra.main(version_base="1.3", config_path="../conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    with job_environment():  # a multirun's next job starts with no DDP state of this one
        return exit_on_user_error(train, cfg)


if __name__ == "__main__":
    main()
