"""From the config to the tensors a task needs: the perturbation graph and the context table."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from cellrep.errors import CellrepError
from cellrep.knowledge.context import SYNTHETIC, context_matrix, synthetic_context, write_context
from cellrep.knowledge.graph import load_graph, perturbation_graph

log = logging.getLogger(__name__)


def graph_inputs(task_cfg: DictConfig, class_names: Sequence[str]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(task keyword arguments, report for metrics.json); both empty when ``task.graph_loss=none``."""
    name = str(task_cfg.get("graph_loss", "none"))
    if name == "none":
        return {}, {}
    graph = load_graph(task_cfg.graph_path, task_cfg.get("graph_nodes"))
    shuffle_seed = task_cfg.get("graph_shuffle_seed")
    pg = perturbation_graph(graph, class_names, shuffle_seed=shuffle_seed)
    if pg.num_edges == 0:
        raise CellrepError(
            f"task.graph_loss={name}: the graph {graph.source} has no edge between two of this "
            f"dataset's {len(class_names)} perturbations ({len(pg.missing)} are not nodes of it)",
            fix="use a graph over these genes (task.graph_path), map its ids with task.graph_nodes, "
            "or set task.graph_loss=none",
        )
    kwargs = {
        "graph_loss": name,
        "graph_weight": float(task_cfg.graph_weight),
        "graph_temperature": float(task_cfg.graph_temperature),
        "graph_weights": torch.from_numpy(pg.weights).float(),
        "graph_present": torch.from_numpy(pg.present),
    }
    report = {
        "graph_source": graph.source,
        "graph_edges": pg.num_edges,
        "graph_perturbations_present": int(pg.present.sum()),
        "graph_perturbations_absent": len(pg.missing),
        "graph_absent": pg.missing,
    }
    if shuffle_seed is not None:  # the control: how many of the true edges the permutation kept
        true = perturbation_graph(graph, class_names).weights > 0
        report["graph_shuffle_seed"] = int(shuffle_seed)
        report["graph_true_edges_kept"] = int(np.count_nonzero(np.triu(true & (pg.weights > 0), 1)))
        log.info(
            "graph prior on a shuffled graph (seed %d): %d of its %d edges are true ones",
            shuffle_seed,
            report["graph_true_edges_kept"],
            pg.num_edges,
        )
    return kwargs, report


def context_inputs(cfg: DictConfig, cell_types: Sequence[str]) -> torch.Tensor | None:
    """The T×K context table for ``cell_types`` (in order), or None without ``model.context_path``.

    ``synthetic`` writes the derived table to ``<run dir>/context.csv`` and reads it back.
    """
    path = cfg.model.get("context_path")
    if not path:
        return None
    if cfg.task.name not in ("supervised", "simclr", "mae", "dino"):  # the tasks whose encoder takes the context
        raise CellrepError(
            f"model.context_path is used by task=supervised, simclr, mae and dino, not task={cfg.task.name}",
            fix="drop model.context_path for this task",
        )
    if str(path) == SYNTHETIC:
        source = cfg.data.source
        if source != "synthetic" or cfg.data.get("synthetic") is None:
            raise CellrepError(
                f"model.context_path=synthetic needs data=synthetic (this run has data={source})",
                fix="give a context CSV (cell_type,v0,v1,...) as model.context_path",
            )
        table = synthetic_context(OmegaConf.to_container(cfg.data.synthetic, resolve=True))
        path = write_context(table, Path(cfg.paths.output_dir) / "context.csv")
        log.info("context vectors of the synthetic screen (stand-in for a transcriptomic embedding): %s", path)
    return torch.tensor(context_matrix(path, [str(c) for c in cell_types]))
