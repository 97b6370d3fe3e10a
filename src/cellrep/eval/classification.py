"""RxRx1 classification from well embeddings (docs/benchmarks.md "RxRx1 classification").

A linear probe (the same BatchNorm + linear, several learning rates, as
per-block probing) is fit on wells of training experiments and scored on the
held-out experiments: top-1/top-5 over non-control siRNAs, overall and per
cell type. RxRx1 plates each hold one of 4 disjoint siRNA groups; knowing that,
a test plate's wells can only be of one group, so groups are assigned to test
plates by linear sum assignment and predictions restricted to the group.
"""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd
from scipy import sparse
from scipy.optimize import linear_sum_assignment
from scipy.sparse.csgraph import connected_components

from cellrep.errors import CellrepError
from cellrep.eval.embeddings import Embeddings
from cellrep.eval.probe import ProbeSettings, train_probes

log = logging.getLogger(__name__)


def held_out_stage(meta: pd.DataFrame) -> np.ndarray:
    """train/val/test per well: the ``split`` column (written by cellrep-eval), else RxRx1's ``dataset``."""
    if "split" in meta.columns:
        return meta["split"].astype(str).to_numpy()
    if "dataset" in meta.columns:
        return np.where(meta["dataset"].astype(str) == "test", "test", "train")
    raise CellrepError(
        "classification needs to know the held-out experiments, but the embeddings have neither "
        "a 'split' nor a 'dataset' column",
        fix="add a 'split' column (train/val/test) per well",
    )


def topk_accuracy(logits: np.ndarray, labels: np.ndarray, k: int) -> float:
    if len(labels) == 0:
        return float("nan")
    k = min(k, logits.shape[1])
    top = np.argpartition(-logits, k - 1, axis=1)[:, :k]
    return float((top == labels[:, None]).any(axis=1).mean())


def plate_groups(classes: np.ndarray, plates: np.ndarray, num_classes: int) -> np.ndarray:
    """Group id per class: connected components of "appears on the same (training) plate"."""
    plate_ids, plate_idx = np.unique(plates, return_inverse=True)
    n = num_classes + len(plate_ids)
    graph = sparse.coo_matrix((np.ones(len(classes)), (classes, num_classes + plate_idx)), shape=(n, n))
    _, comp = connected_components(graph, directed=False)
    return comp[:num_classes]


def assign_groups(probs: np.ndarray, plates: np.ndarray, experiments: np.ndarray, group: np.ndarray) -> np.ndarray:
    """Per test experiment, plates × groups assignment maximizing the summed group probability;
    returns each well's assigned group (-1 where a plate got none)."""
    groups = np.unique(group)
    mass = np.stack([probs[:, group == g].sum(axis=1) for g in groups], axis=1)  # wells × groups
    out = np.full(len(probs), -1)
    for exp in np.unique(experiments):
        rows = experiments == exp
        plate_ids, idx = np.unique(plates[rows], return_inverse=True)
        cost = -np.stack([mass[rows][idx == p].mean(axis=0) for p in range(len(plate_ids))])
        r, c = linear_sum_assignment(cost)
        assigned = np.full(len(plate_ids), -1)
        assigned[r] = groups[c]
        out[np.flatnonzero(rows)] = assigned[idx]
    return out


def classification_benchmark(
    emb: Embeddings, settings: ProbeSettings = ProbeSettings(), use_plate_groups: bool = True, progress: bool = True
) -> dict:
    """docs/benchmarks.md: top-1/top-5 on held-out experiments over non-control siRNAs, overall and per cell
    type, plus (when the plates hold ≥2 disjoint groups) with plate-group assignment."""
    sub = emb.subset(emb.genetic_mask())
    stage = held_out_stage(sub.meta)
    names = sub.meta["perturbation"].astype(str).to_numpy()
    classes, labels = np.unique(names, return_inverse=True)
    result = train_probes(
        {"embedding": sub.features}, labels, stage, len(classes), settings, keep_logits=True, progress=progress
    )
    logits = result.test_logits["embedding"]
    test = stage == "test"
    y, meta = labels[test], sub.meta.loc[test].reset_index(drop=True)
    out = {
        "n_classes": int(len(classes)),
        "n_test_wells": int(test.sum()),
        "n_train_wells": int((stage != "test").sum()),
        "top1": topk_accuracy(logits, y, 1),
        "top5": topk_accuracy(logits, y, 5),
        "chance": 1.0 / len(classes),
        "probe_lr": float(result.table["best_lr"].iloc[0]),
    }
    if "cell_type" in meta.columns:
        for ct in sorted(meta["cell_type"].astype(str).unique()):
            rows = (meta["cell_type"].astype(str) == ct).to_numpy()
            out[f"top1/{ct}"] = topk_accuracy(logits[rows], y[rows], 1)
            out[f"top5/{ct}"] = topk_accuracy(logits[rows], y[rows], 5)
    if use_plate_groups and "plate" in sub.meta.columns:
        train = stage != "test"
        plate_key = sub.meta["experiment"].astype(str) + "/" + sub.meta["plate"].astype(str)
        group = plate_groups(labels[train], plate_key[train].to_numpy(), len(classes))
        n_groups = len(np.unique(group[np.unique(labels[train])]))
        out["plate_groups"] = int(n_groups)
        if n_groups >= 2:
            probs = np.exp(logits - logits.max(axis=1, keepdims=True))
            probs /= probs.sum(axis=1, keepdims=True)
            assigned = assign_groups(
                probs, plate_key[test].to_numpy(), meta["experiment"].astype(str).to_numpy(), group
            )
            masked = np.where((assigned[:, None] < 0) | (group[None, :] == assigned[:, None]), logits, -np.inf)
            out["top1_plate_groups"] = topk_accuracy(masked, y, 1)
            out["top5_plate_groups"] = topk_accuracy(masked, y, 5)
        else:
            log.info("classification: every plate holds the same siRNAs; plate-group assignment does not apply")
    return out
