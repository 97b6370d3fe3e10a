"""Replicate consistency (docs/benchmarks.md "Replicate consistency").

Does a perturbation look the same every time it is applied? Its replicate
wells (usually one per experiment) should point the same way more often than
wells that share nothing but their batches.

Null, as docs/benchmarks.md orders it: the same statistic for negative-control
*perturbations* (e.g. non-targeting guides, each with its own replicate wells)
when the screen has at least ``min_control_perturbations`` of them; lacking
them, random well sets of the same size within the same batches. The random
sets are drawn from treatment wells: the untreated control wells are what
batch correction is fitted on, so after TVN they are shaped by the fit and are
no null for other wells (measured: with 6 control wells per batch in 64
dimensions, random embeddings looked "consistent" for 99% of perturbations
when the null was drawn from the fitted controls; 5% with treatment wells).
"""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd

from cellrep.errors import CellrepError
from cellrep.eval.embeddings import Embeddings, unit_rows

log = logging.getLogger(__name__)


def mean_pairwise_cosine(unit_sets: np.ndarray) -> np.ndarray:
    """Mean cosine over the k(k−1)/2 pairs of each set of k unit vectors (…, k, D) → (…).

    Σ_{i≠j} uᵢ·uⱼ = ‖Σ uᵢ‖² − k for unit vectors, so no k×k matrix is built.
    """
    k = unit_sets.shape[-2]
    total = np.square(unit_sets.sum(axis=-2)).sum(axis=-1)
    return (total - np.square(unit_sets).sum(axis=(-2, -1))) / (k * (k - 1))


def p_values(stats: np.ndarray, sorted_null: np.ndarray) -> np.ndarray:
    """docs/benchmarks.md: p = 1 − rank in the sorted null / len(null), rank = #null values below the statistic."""
    return 1.0 - np.searchsorted(sorted_null, stats, side="left") / len(sorted_null)


def _null_sets(batches: tuple[str, ...], pools: dict[str, np.ndarray], rng, n: int) -> np.ndarray:
    """n index sets: for each batch b (with multiplicity m), m distinct wells of pools[b]."""
    parts = []
    for b in sorted(set(batches)):
        m, pool = batches.count(b), pools[b]
        draw = np.argsort(rng.random((n, len(pool))), axis=1)[:, :m]
        parts.append(pool[draw])
    return np.concatenate(parts, axis=1)


def _replicate_groups(meta: pd.DataFrame, rows: np.ndarray) -> pd.Series:
    """Row lists per perturbation (a compound at each concentration is its own perturbation)."""
    conc = pd.to_numeric(meta["concentration"]) if "concentration" in meta else pd.Series(np.nan, index=meta.index)
    label = meta["perturbation"].astype(str) + np.where(conc.notna(), "@" + conc.astype(str), "")
    return pd.Series(np.flatnonzero(rows)).groupby(label[rows].to_numpy(), sort=True).agg(list)


def consistency_table(
    emb: Embeddings, null_samples: int = 1000, seed: int = 0, min_control_perturbations: int = 20
) -> tuple[pd.DataFrame, dict]:
    """docs/benchmarks.md: per perturbation the mean pairwise cosine of its replicate wells and p = 1 − rank in
    the sorted null / len(null) (null: see the module docstring). Returns the table
    (perturbation, n_wells, cosine, p) and a description of the null."""
    meta = emb.meta
    treated = (meta["well_type"].astype(str) == "treatment").to_numpy()
    groups = _replicate_groups(meta, treated)
    sizes = groups.map(len)
    single = int((sizes < 2).sum())
    groups = groups[sizes >= 2]
    if groups.empty:
        raise CellrepError(
            f"replicate consistency needs perturbations with at least 2 replicate wells; all {len(sizes)} "
            "treated perturbations have fewer than 2",
            fix="embed a screen with replicate wells (e.g. several experiments), or drop benchmark consistency",
        )
    if single:
        log.warning("consistency: %d perturbation(s) with a single well are skipped", single)

    unit = unit_rows(emb.features.astype(np.float64))
    stats = np.array([float(mean_pairwise_cosine(unit[np.asarray(rows)])) for rows in groups])
    controls = _replicate_groups(meta, emb.is_control)
    controls = controls[controls.map(len) >= 2]
    if len(controls) >= min_control_perturbations:
        null = np.sort([float(mean_pairwise_cosine(unit[np.asarray(rows)])) for rows in controls])
        pvals, kind, size = p_values(stats, null), "negative_control_perturbations", len(null)
    else:
        batch = emb.batch
        pools = {b: np.flatnonzero((batch == b) & treated) for b in np.unique(batch)}
        rng, cache, pvals = np.random.default_rng(seed), {}, []
        for rows, stat in zip(groups, stats):
            signature = tuple(sorted(batch[np.asarray(rows)].tolist()))
            if signature not in cache:
                cache[signature] = np.sort(mean_pairwise_cosine(unit[_null_sets(signature, pools, rng, null_samples)]))
            pvals.append(float(p_values(np.array([stat]), cache[signature])[0]))
        pvals, kind, size = np.array(pvals), "random_treatment_wells_same_batches", null_samples
    table = pd.DataFrame(
        {"perturbation": groups.index, "n_wells": groups.map(len).to_numpy(), "cosine": stats, "p": pvals}
    )
    return table, {"null": kind, "null_size": int(size), "n_single_well_skipped": single}


def replicate_consistency(
    emb: Embeddings, null_samples: int = 1000, alpha: float = 0.05, seed: int = 0, min_control_perturbations: int = 20
) -> dict:
    """docs/benchmarks.md summary: the fraction of perturbations with p < alpha and the median cosine."""
    table, null = consistency_table(emb, null_samples, seed, min_control_perturbations)
    return {
        "n_perturbations": int(len(table)),
        f"frac_p_lt_{alpha:g}": float(np.mean(table["p"] < alpha)),
        "median_cosine": float(np.median(table["cosine"])),
        **null,
    }
