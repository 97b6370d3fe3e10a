"""Tasks: the LightningModules that train a backbone, and the one table that builds them from the config.

``TASKS`` maps ``task.name`` to its module class and to what that class needs from the data besides
the ``task`` settings (class count, cell types, context vectors). Every ``task.*`` setting whose name
is a constructor argument is passed as is; the others (``monitor``, ``graph_path``, ...) are read by
the run, not by the module. Adding a task is one class and one row here.
"""

from __future__ import annotations

import inspect
import logging
from typing import Any, Callable

import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf

from cellrep.knowledge.inputs import context_inputs, graph_inputs
from cellrep.models.pretrained import init_backbone
from cellrep.training.tasks.dino import DINOTask
from cellrep.training.tasks.mae import MAETask
from cellrep.training.tasks.simclr import SimCLRTask
from cellrep.training.tasks.supervised import SupervisedTask

log = logging.getLogger(__name__)


def _supervised_inputs(cfg: DictConfig, dm) -> dict[str, Any]:
    cell_types = sorted(dm.index["cell_type"].unique())
    group_of_index = dm.index["cell_type"].map({c: i for i, c in enumerate(cell_types)}).to_numpy()
    return {
        "num_classes": dm.num_classes,
        "group_names": cell_types,
        "group_of_index": torch.tensor(group_of_index),
        "context_table": context_inputs(cfg, cell_types),
    }


def _context_inputs(cfg: DictConfig, dm) -> dict[str, Any]:
    """The self-supervised tasks take the supervised task's cell-type context, not its classes."""
    inputs = _supervised_inputs(cfg, dm)
    return {"group_of_index": inputs["group_of_index"], "context_table": inputs["context_table"]}


TASKS: dict[str, tuple[type[L.LightningModule], Callable[[DictConfig, Any], dict[str, Any]]]] = {
    "supervised": (SupervisedTask, _supervised_inputs),
    "mae": (MAETask, _context_inputs),
    "dino": (DINOTask, _context_inputs),
    "simclr": (SimCLRTask, _context_inputs),
}


def build_task(cfg: DictConfig, dm) -> L.LightningModule:
    """The LightningModule named by ``task.name``, for the data of ``dm`` (a CellDataModule).

    Knowledge priors (docs/FEWSHOT.md): ``task.graph_loss`` gets the perturbation graph over
    ``dm.class_names``, ``model.context_path`` a context vector per cell type; ``task.graph_report``
    says which perturbations the graph lacks (it goes into metrics.json). ``task.init_from`` starts
    the backbone from a pretrained encoder.
    """
    task_cls, data_inputs = TASKS[cfg.task.name]
    graph, graph_report = graph_inputs(cfg.task, dm.class_names)
    accepted = inspect.signature(task_cls).parameters
    options = {k: v for k, v in OmegaConf.to_container(cfg.task, resolve=True).items() if k in accepted}
    task = task_cls(
        model=OmegaConf.to_container(cfg.model, resolve=True),
        in_chans=dm.in_chans,
        **{**options, **graph},
        **data_inputs(cfg, dm),
    )
    task.graph_report = graph_report
    if cfg.task.get("init_from"):  # a cellrep checkpoint or a published encoder (docs/encoders.md)
        fresh = init_backbone(
            task.backbone, cfg.task.init_from, cfg.model.name, dm.in_chans, cfg.task.get("init_channels")
        )
        log.info("backbone from %s (left at initialization: %s)", cfg.task.init_from, ", ".join(fresh) or "nothing")
    return task
