"""Baselines a learned representation has to beat: the "intensity statistics" probe.

Per site, each channel's mean and standard deviation of the centre crop the
model sees (2·C numbers), expressed per plate in units of that plate's
negative-control wells, and a linear probe (:func:`cellrep.eval.probe.train_probes`)
on the same train / validation / held-out rows as the per-block probes. A
model whose best block does not beat this row learned little more than pooled
intensities (docs/benchmarks.md, "Per-block linear probing", for the probe).
"""

from __future__ import annotations

import logging
import time

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from cellrep.errors import CellrepError
from cellrep.eval.probe import ProbeResult, ProbeSettings, train_probes

log = logging.getLogger(__name__)

BLOCK = "intensity"  # the baseline's row name in a probe table


def intensity_statistics(loader, progress: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """(rows, features): per site ``[mean_c..., std_c...]`` of the raw crop, rows sorted.

    ``loader`` yields ``{"image": B×C×H×W, "index": B}`` batches (a CellDataModule
    eval loader: uint8, not normalized, so the statistics are those of the pixels
    themselves and the control normalization below is the only one applied).
    """
    rows, chunks = [], []
    for batch in tqdm(
        loader,
        desc="intensity baseline: statistics per site",
        disable=not progress,
        total=len(loader) if hasattr(loader, "__len__") else None,
        leave=False,
    ):
        x = torch.as_tensor(batch["image"]).float().flatten(2)
        chunks.append(torch.cat([x.mean(-1), x.std(-1, unbiased=False)], dim=1).numpy())
        rows.append(np.asarray(batch["index"], dtype=np.int64))
    if not rows:
        raise CellrepError("the intensity baseline got no sites", fix="check the data config: the index is empty")
    rows_all, feats = np.concatenate(rows), np.concatenate(chunks)
    order = np.argsort(rows_all, kind="stable")
    return rows_all[order], feats[order].astype(np.float64)


def normalize_to_controls(features: np.ndarray, sites: pd.DataFrame, min_std: float = 1e-3) -> np.ndarray:
    """Per plate (experiment × plate): ``(x - mean of its negative controls) / their std``.

    Plate-to-plate shifts of the microscope are what the controls measure, so
    this is the cheapest batch correction a CellProfiler-style pipeline applies.
    A plate without negative-control sites is centred on all of its sites instead
    (logged): the baseline then still runs, only less corrected.
    """
    features = np.asarray(features, dtype=np.float64)
    if len(features) != len(sites):
        raise CellrepError(
            f"{len(features)} feature rows do not align with {len(sites)} sites", fix="pass one site per feature row"
        )
    out = np.empty_like(features)
    plates = sites.groupby(["experiment", "plate"], sort=False).indices
    no_controls = []
    for key, idx in plates.items():
        ctrl = idx[(sites["well_type"].to_numpy()[idx] == "negative_control")]
        if len(ctrl) == 0:
            no_controls.append(key)
            ctrl = idx
        ref = features[ctrl]
        std = ref.std(axis=0) if len(ref) > 1 else np.ones(features.shape[1])
        out[idx] = (features[idx] - ref.mean(axis=0)) / np.maximum(std, min_std)
    if no_controls:
        log.warning(
            "intensity baseline: %d plate(s) without negative controls, centred on all their sites (%s)",
            len(no_controls),
            no_controls[:3],
        )
    return out


def intensity_baseline(
    datamodule, settings: ProbeSettings = ProbeSettings(), progress: bool = True
) -> tuple[ProbeResult, float]:
    """(probe result with one block, ``intensity``; seconds): the baseline on ``datamodule``'s split.

    ``datamodule``: a prepared CellDataModule (``index`` with ``label`` and ``split``
    columns, ``eval_dataloader("all")``), as built for evaluation.
    """
    start = time.perf_counter()
    rows, feats = intensity_statistics(datamodule.eval_dataloader("all"), progress)
    sites = datamodule.index.iloc[rows].reset_index(drop=True)
    x = normalize_to_controls(feats, sites).astype(np.float32)
    result = train_probes(
        {BLOCK: x},
        sites["label"].to_numpy(),
        sites["split"].to_numpy(),
        datamodule.num_classes,
        settings,
        progress=progress,
    )
    return result, time.perf_counter() - start
