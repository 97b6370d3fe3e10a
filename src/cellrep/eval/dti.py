"""Zero-shot drug–target interaction (docs/benchmarks.md "Zero-shot DTI", the RxRx3-core benchmark).

A compound that inhibits a gene's product should look like that gene's
knockout, so ranking genes by |cosine(compound, gene)| should put its known
targets first — with no training. Random scores on the same sampled genes give
the baseline; both are summarized over 100 negative-sampling seeds.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from cellrep.errors import CellrepError
from cellrep.eval.embeddings import Embeddings, unit_rows
from cellrep.eval.ranking import average_precision, roc_auc
from cellrep.eval.recall import gene_embeddings

log = logging.getLogger(__name__)
TARGET_COLUMNS = ("compound", "gene", "activity_nM")
QUANTILES = {"median": 0.5, "q75": 0.75, "q95": 0.95}


@dataclass
class DTIResult:
    metrics: dict
    per_compound: pd.DataFrame  # compound, variant, ap, auc, random_ap, random_auc (means over seeds)


def load_targets(path: Path | str) -> pd.DataFrame:
    """A drug–target activity table: ``compound, gene, activity_nM`` (one row per measured pair)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise CellrepError(
            f"drug-target table {path} does not exist",
            fix="set benchmarks.dti.targets to a CSV with columns compound,gene,activity_nM",
        )
    table = pd.read_csv(path)
    missing = [c for c in TARGET_COLUMNS if c not in table.columns]
    if missing:
        raise CellrepError(
            f"drug-target table {path} lacks column(s) {missing} (has {list(table.columns)})",
            fix="give a CSV with columns compound,gene,activity_nM (activity as IC50/Kd in nM)",
        )
    out = table[list(TARGET_COLUMNS)].copy()
    out["compound"], out["gene"] = out["compound"].astype(str).str.strip(), out["gene"].astype(str).str.strip()
    out["activity_nM"] = pd.to_numeric(out["activity_nM"], errors="coerce")
    if out["activity_nM"].isna().any():
        raise CellrepError(
            f"drug-target table {path}: {int(out['activity_nM'].isna().sum())} non-numeric activities",
            fix="write activity_nM as numbers (nM)",
        )
    return out


def compound_embeddings(emb: Embeddings, compounds) -> pd.DataFrame:
    """Mean embedding per (compound, concentration) over treatment wells: (keys frame, keys × D).

    A missing concentration is keyed -1 (one unnamed dose)."""
    meta = emb.meta
    rows = (meta["well_type"].astype(str) == "treatment") & meta["perturbation"].astype(str).isin(set(compounds))
    conc = meta["concentration"] if "concentration" in meta else pd.Series(np.nan, index=meta.index)
    frame = pd.DataFrame(
        {
            "compound": meta.loc[rows, "perturbation"].astype(str),
            "concentration": pd.to_numeric(conc[rows]).fillna(-1.0),
        }
    )
    groups = frame.groupby(["compound", "concentration"], sort=True).indices  # positions into frame
    feats = emb.features[rows.to_numpy()]
    means = np.stack([feats[idx].mean(axis=0) for idx in groups.values()]) if groups else np.zeros((0, emb.dim))
    return pd.DataFrame(list(groups), columns=["compound", "concentration"]), means


def _sample(rng, pool: np.ndarray, positive: np.ndarray, n_neg: np.ndarray):
    """Positives plus n_neg random genes of each compound's negative pool, compacted to a padded matrix."""
    keys = np.where(pool, rng.random(pool.shape), np.inf)
    rank = np.argsort(np.argsort(keys, axis=1), axis=1)
    chosen = positive | (pool & (rank < n_neg[:, None]))
    width = int(chosen.sum(axis=1).max())
    order = np.argsort(~chosen, axis=1, kind="stable")[:, :width]  # chosen genes first
    valid = np.take_along_axis(chosen, order, axis=1)
    return order, valid, np.take_along_axis(positive, order, axis=1)


def dti_benchmark(
    emb: Embeddings,
    targets: pd.DataFrame,
    seeds: int = 100,
    positive_nM: float = 1000.0,
    negative_nM: float = 10000.0,
    min_negatives: int = 20,
    negative_ratio: int = 2,
    progress: bool = True,
) -> DTIResult:
    """docs/benchmarks.md zero-shot DTI, exactly.

    Per compound: positives = genes with activity ≤ ``positive_nM``; the grey zone
    (``positive_nM`` < activity < ``negative_nM``) is excluded; negatives are
    sampled from the remaining annotated genes (genes of the table that are
    embedded), n = max(2·#positives, 20); compounds without a positive or with
    too few candidate negatives are skipped. Score = |cosine(compound embedding
    at a concentration, gene embedding)|, and the max over concentrations.
    Per compound AP and ROC AUC; the median, 0.75 and 0.95 quantiles over
    compounds, next to uniformly random scores on the same samples, each as
    mean ± std over ``seeds`` sampling seeds.
    """
    genes, gene_x = gene_embeddings(emb)
    annotated = np.isin(genes, targets["gene"].unique())
    genes, gene_x = genes[annotated], gene_x[annotated]
    keys, comp_x = compound_embeddings(emb, targets["compound"].unique())
    if len(keys) == 0:
        raise CellrepError(
            "no compound of the drug-target table is among the embedded treatment wells",
            fix="check that compound names in the table match the 'perturbation' column",
        )
    if len(genes) == 0:
        raise CellrepError(
            "no gene of the drug-target table is among the embedded gene perturbations",
            fix="check that gene symbols in the table match the embedded perturbations",
        )
    compounds = np.array(sorted(keys["compound"].unique()))
    activity = (
        targets.groupby(["compound", "gene"])["activity_nM"]
        .min()
        .unstack()
        .reindex(index=compounds, columns=genes)
        .to_numpy()
    )
    positive = activity <= positive_nM
    pool = ~positive & ~((activity > positive_nM) & (activity < negative_nM))  # unmeasured = inactive
    n_pos = positive.sum(axis=1)
    n_neg = np.maximum(negative_ratio * n_pos, min_negatives)
    usable = (n_pos > 0) & (pool.sum(axis=1) >= n_neg)
    skipped = {"no_positive": int((n_pos == 0).sum()), "too_few_negatives": int(((n_pos > 0) & ~usable).sum())}
    if not usable.any():
        raise CellrepError(
            f"no compound has a target (≤{positive_nM:g} nM) and {min_negatives}+ candidate "
            f"negatives among the {len(genes)} embedded genes (skipped: {skipped})",
            fix="embed more gene perturbations, or check the activity units (nM)",
        )
    compounds, positive, pool, n_neg = compounds[usable], positive[usable], pool[usable], n_neg[usable]

    # |cosine| per concentration (NaN where a compound lacks that dose), and the max over doses
    cos = np.abs(unit_rows(comp_x) @ unit_rows(gene_x).T)
    row = pd.Index(compounds).get_indexer(keys["compound"])
    variants: dict[str, np.ndarray] = {}
    for conc in sorted(keys["concentration"].unique()):
        grid = np.full((len(compounds), len(genes)), np.nan)
        pick = (keys["concentration"] == conc).to_numpy() & (row >= 0)
        grid[row[pick]] = cos[pick]
        if not np.isnan(grid).all():
            variants["dose" if conc < 0 else f"conc_{conc:g}"] = grid
    variants["max"] = np.fmax.reduce(np.stack(list(variants.values())), axis=0)

    runs = {v: {m: [] for m in ("ap", "auc", "random_ap", "random_auc")} for v in variants}  # seeds × compounds
    for seed in tqdm(range(seeds), desc="dti seeds", disable=not progress, leave=False):
        rng = np.random.default_rng(seed)
        order, valid, labels = _sample(rng, pool, positive, n_neg)
        random_scores = rng.random(order.shape)
        for name, grid in variants.items():
            scores = np.take_along_axis(grid, order, axis=1)
            has = ~np.isnan(scores).any(axis=1, where=valid)  # compounds measured at this dose
            s, v, y = np.nan_to_num(scores[has]), valid[has], labels[has]
            values = {
                "ap": average_precision(s, y, v),
                "auc": roc_auc(s, y, v),
                "random_ap": average_precision(random_scores[has], y, v),
                "random_auc": roc_auc(random_scores[has], y, v),
            }
            for metric, vals in values.items():
                full = np.full(len(compounds), np.nan)
                full[has] = vals
                runs[name][metric].append(full)

    metrics: dict = {
        "n_compounds": int(usable.sum()),
        "n_genes": int(len(genes)),
        "skipped": skipped,
        "seeds": seeds,
        "positive_nM": positive_nM,
        "negative_nM": negative_nM,
    }
    frames = []
    with warnings.catch_warnings():  # a compound without this dose is all-NaN: its statistics stay NaN
        warnings.simplefilter("ignore", RuntimeWarning)
        for name in variants:
            frame = pd.DataFrame({"compound": compounds, "variant": name})
            metrics[name] = {}
            for metric, per_seed in runs[name].items():
                table = np.stack(per_seed)  # seeds × compounds
                # quantile over compounds within each seed, then mean ± std over seeds
                q = np.nanquantile(table, list(QUANTILES.values()), axis=1)  # quantiles × seeds
                metrics[name][metric] = {
                    k: {"mean": float(q[i].mean()), "std": float(q[i].std())} for i, k in enumerate(QUANTILES)
                }
                frame[metric] = np.nanmean(table, axis=0)
            frames.append(frame)
    return DTIResult(metrics, pd.concat(frames, ignore_index=True))
