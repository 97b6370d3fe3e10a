"""Replicate consistency (DESIGN §5 "Replicate consistency").

Does a perturbation look the same every time it is applied? Its replicate
wells (usually one per experiment) should point the same way more often than
wells that share nothing but their batches. The null therefore matches the
batches: for a perturbation with replicates in experiments (b1, …, bk), the
null statistic is the same mean pairwise cosine over one negative-control well
drawn from each of b1…bk — the "negative-control perturbation" of DESIGN §5
made batch-matched — or, where a batch lacks enough control wells, over random
wells of those batches.
"""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd

from cellrep.errors import CellrepError
from cellrep.eval.embeddings import Embeddings

log = logging.getLogger(__name__)


def _unit(x: np.ndarray) -> np.ndarray:
    norm = np.linalg.norm(x, axis=-1, keepdims=True)
    return x / np.where(norm > 0, norm, 1.0)


def mean_pairwise_cosine(unit_sets: np.ndarray) -> np.ndarray:
    """Mean cosine over the k(k−1)/2 pairs of each set of k unit vectors (…, k, D) → (…).

    Σ_{i≠j} uᵢ·uⱼ = ‖Σ uᵢ‖² − k for unit vectors, so no k×k matrix is built.
    """
    k = unit_sets.shape[-2]
    total = np.square(unit_sets.sum(axis=-2)).sum(axis=-1)
    return (total - np.square(unit_sets).sum(axis=(-2, -1))) / (k * (k - 1))


def p_values(stats: np.ndarray, sorted_null: np.ndarray) -> np.ndarray:
    """DESIGN §5: p = 1 − rank in the sorted null / len(null), rank = #null values below the statistic."""
    return 1.0 - np.searchsorted(sorted_null, stats, side="left") / len(sorted_null)


def _null_sets(batches: tuple[str, ...], pools: dict[str, np.ndarray], rng, n: int) -> np.ndarray:
    """n index sets: for each batch b (with multiplicity m), m distinct wells of pools[b]."""
    parts = []
    for b in sorted(set(batches)):
        m, pool = batches.count(b), pools[b]
        draw = np.argsort(rng.random((n, len(pool))), axis=1)[:, :m]
        parts.append(pool[draw])
    return np.concatenate(parts, axis=1)


def replicate_consistency(emb: Embeddings, null_samples: int = 1000, alpha: float = 0.05,
                          seed: int = 0) -> dict:
    """DESIGN §5: per perturbation the mean pairwise cosine of its replicate wells, a p-value
    against the batch-matched null (see module docstring); reports the fraction with p < alpha
    and the median cosine. A compound at each concentration is its own perturbation."""
    meta = emb.meta
    treated = (meta["well_type"].astype(str) == "treatment").to_numpy()
    conc = pd.to_numeric(meta["concentration"]) if "concentration" in meta else pd.Series(np.nan, index=meta.index)
    label = meta["perturbation"].astype(str) + np.where(conc.notna(), "@" + conc.astype(str), "")
    groups = pd.Series(np.flatnonzero(treated)).groupby(label[treated].to_numpy(), sort=True).agg(list)
    sizes = groups.map(len)
    single = int((sizes < 2).sum())
    groups = groups[sizes >= 2]
    if groups.empty:
        raise CellrepError(
            f"replicate consistency needs perturbations with at least 2 replicate wells; all {len(sizes)} "
            "treated perturbations have fewer than 2",
            fix="embed a screen with replicate wells (e.g. several experiments), or drop benchmark consistency")
    if single:
        log.warning("consistency: %d perturbation(s) with a single well are skipped", single)

    unit = _unit(emb.features.astype(np.float64))
    batch = emb.batch
    controls = {b: np.flatnonzero((batch == b) & emb.is_control) for b in np.unique(batch)}
    anywell = {b: np.flatnonzero(batch == b) for b in np.unique(batch)}
    rng = np.random.default_rng(seed)
    stats, pvals, nulls_used, cache = [], [], {"negative_control": 0, "random_wells": 0}, {}
    for rows in groups:
        rows = np.asarray(rows)
        signature = tuple(sorted(batch[rows].tolist()))
        if signature not in cache:
            enough = all(len(controls[b]) >= signature.count(b) for b in set(signature))
            kind = "negative_control" if enough else "random_wells"
            sets = _null_sets(signature, controls if enough else anywell, rng, null_samples)
            cache[signature] = (np.sort(mean_pairwise_cosine(unit[sets])), kind)
        null, kind = cache[signature]
        nulls_used[kind] += 1
        stat = float(mean_pairwise_cosine(unit[rows]))
        stats.append(stat)
        pvals.append(float(p_values(np.array([stat]), null)[0]))
    stats, pvals = np.array(stats), np.array(pvals)
    return {
        "n_perturbations": int(len(stats)),
        "n_single_well_skipped": single,
        f"frac_p_lt_{alpha:g}": float(np.mean(pvals < alpha)),
        "median_cosine": float(np.median(stats)),
        "null": nulls_used,
        "null_samples": null_samples,
    }
