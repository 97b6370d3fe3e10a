"""Mean average precision with copairs (docs/benchmarks.md "mAP: phenotypic activity" and "... consistency").

The Cell Painting / JUMP way of scoring profiles (Kalinin et al., Nat Commun 2025): every
profile is a query that ranks other profiles by cosine similarity; its average precision (AP)
says how high its positives rank among its negatives. The AP of each query and the mAP of
each group, with a permutation p-value and Benjamini–Hochberg correction, are computed by
``copairs.map.average_precision`` / ``copairs.map.multilabel.average_precision`` and
``copairs.map.mean_average_precision``; nothing of it is re-implemented here. This module only
decides which profiles, which positives and which negatives:

- ``map_activity``: well-level. A perturbation's replicate wells are the positives, the
  negative-control wells the negatives (each control gets its own label so controls are never
  positives of each other, the JUMP convention). Positives come from different plates and
  negatives from the query's own plate by default.
- ``map_consistency``: perturbation-level profiles (the mean of a perturbation's wells).
  Compounds sharing a target, and a compound and its target gene, are positives (one group per
  target); for each annotation source, genes related by a pair of the source are positives (one
  group per gene).

A shuffled-label baseline (the same computation with the labels permuted) is reported next to
each mean mAP.
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from cellrep.annotations import strip_guide_suffix
from cellrep.errors import CellrepError
from cellrep.eval.embeddings import GENETIC, Embeddings
from cellrep.eval.recall import gene_embeddings

log = logging.getLogger(__name__)
# copairs logs every stage of every call at INFO ("Indexing metadata...", a dozen lines per mAP): in a
# run that computes mAP per correction and per part that buries cellrep's own progress, so only its
# warnings pass.
logging.getLogger("copairs").setLevel(logging.WARNING)
PLATE_KEY = "plate_key"  # derived column: experiment/plate (experiment alone without a plate column)
LABEL = "_map_label"
CONTROL = "_map_control"
LABELS = "_map_labels"


@dataclass
class MapResult:
    metrics: dict
    tables: dict[str, pd.DataFrame] = field(default_factory=dict)  # name -> per-group table


def _copairs():
    """copairs and its AP functions, imported on use (it pulls duckdb and statsmodels)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import copairs.map as cmap
        from copairs.map import multilabel
        from copairs.matching import UnpairedException
    return cmap, multilabel, UnpairedException


def perturbation_label(meta: pd.DataFrame) -> pd.Series:
    """The perturbation, or ``perturbation@concentration`` when a concentration is set (as in consistency)."""
    conc = pd.to_numeric(meta["concentration"]) if "concentration" in meta else pd.Series(np.nan, index=meta.index)
    return meta["perturbation"].astype(str) + np.where(conc.notna(), "@" + conc.astype(str), "")


def plate_key(meta: pd.DataFrame) -> pd.Series:
    exp = meta["experiment"].astype(str)
    return exp + "/" + meta["plate"].astype(str) if "plate" in meta.columns else exp


def check_columns(option: str, names, columns) -> None:
    """One error naming the columns that exist when a benchmark option names a column that does not."""
    bad = [n for n in names if n not in columns]
    if bad:
        raise CellrepError(
            f"{option} names column(s) {bad} that the embeddings do not have; columns: "
            f"{sorted(str(c) for c in columns)}",
            fix=f"set {option} to columns from that list (or [] for none)",
        )


def activity_columns(meta: pd.DataFrame) -> list[str]:
    """Columns a map_activity option may name: the metadata plus the derived ``plate_key``."""
    return [*map(str, meta.columns), PLATE_KEY]


def activity_skip_reason(meta: pd.DataFrame) -> str | None:
    """Why map_activity cannot run on these wells, or None."""
    wt = meta["well_type"].astype(str)
    if not (wt == "negative_control").any():
        return "no negative-control wells (well_type=negative_control) to retrieve replicates against"
    treated = wt == "treatment"
    if not treated.any():
        return "no treatment wells"
    if perturbation_label(meta)[treated].value_counts().max() < 2:
        return "no perturbation has 2 or more replicate wells"
    return None


def _summaries(table: pd.DataFrame, by: str | None) -> dict:
    def one(t: pd.DataFrame) -> dict:
        return {
            "n": int(len(t)),
            "mean_map": float(t["mean_average_precision"].mean()) if len(t) else float("nan"),
            "frac_retrieved": float(t["below_corrected_p"].mean()) if len(t) else float("nan"),
        }

    out = one(table)
    if by is not None and by in table.columns:
        out["by_type"] = {str(k): one(g) for k, g in table.groupby(by, sort=True)}
    return out


def _null_cache(cache_dir: Path | str | None):
    """Where copairs keeps its null distributions: ``cache_dir`` (kept), or a temporary folder (removed).
    Never copairs' default ``~/.copairs``."""
    if cache_dir is None:
        return tempfile.TemporaryDirectory(prefix="cellrep-copairs-")
    Path(cache_dir).mkdir(parents=True, exist_ok=True)
    return contextlib.nullcontext(str(cache_dir))


def _map_table(ap: pd.DataFrame, sameby: list[str], null_size: int, threshold: float, seed: int, cache: Path):
    cmap, _, _ = _copairs()
    return cmap.mean_average_precision(
        ap, sameby, null_size=null_size, threshold=threshold, seed=seed, progress_bar=False, cache_dir=cache
    )


def map_activity(
    emb: Embeddings,
    null_size: int = 10000,
    threshold: float = 0.05,
    pos_sameby: list[str] | tuple = (),
    pos_diffby: list[str] | tuple = (PLATE_KEY,),
    neg_sameby: list[str] | tuple = (PLATE_KEY,),
    neg_diffby: list[str] | tuple = (),
    shuffled_baseline: bool = True,
    seed: int = 0,
    cache_dir: Path | str | None = None,
) -> MapResult:
    """docs/benchmarks.md "mAP: phenotypic activity": per perturbation, its replicate wells vs the controls.

    Queries are treatment wells; ``pos_sameby``/``pos_diffby``/``neg_sameby``/``neg_diffby`` add
    to the fixed rules (positives share the perturbation label, negatives are controls). When no
    perturbation has positives under ``pos_diffby`` (all replicates on one plate), it is dropped
    and the fallback recorded.
    """
    meta = emb.meta.copy()
    meta[PLATE_KEY] = plate_key(meta)
    for option, names in (
        ("pos_sameby", pos_sameby),
        ("pos_diffby", pos_diffby),
        ("neg_sameby", neg_sameby),
        ("neg_diffby", neg_diffby),
    ):
        check_columns(f"benchmarks.map_activity.{option}", names, meta.columns)
    why = activity_skip_reason(meta)
    if why:
        raise CellrepError(f"map_activity does not apply: {why}", fix="drop benchmark map_activity")
    wt = meta["well_type"].astype(str)
    keep = ((wt == "treatment") | (wt == "negative_control")).to_numpy()
    meta = meta.loc[keep].reset_index(drop=True)
    feats = emb.features[keep]  # float32: copairs gathers two rows per pair, so this halves its memory traffic
    control = (meta["well_type"].astype(str) == "negative_control").to_numpy()
    label = perturbation_label(meta).to_numpy(dtype=object)
    label[control] = [f"__control_{i}" for i in range(int(control.sum()))]
    meta[LABEL], meta[CONTROL] = label, control
    single = meta.loc[~control, LABEL].value_counts()
    n_single = int((single < 2).sum())

    with _null_cache(cache_dir) as cache:
        cache = Path(cache)
        pos_diffby_used = list(pos_diffby)
        ap = _activity_ap(meta, feats, pos_sameby, pos_diffby_used, neg_sameby, neg_diffby)
        if ap is None and pos_diffby_used:
            log.warning("map_activity: no replicates differ in %s; positives from any wells instead", pos_diffby_used)
            pos_diffby_used = []
            ap = _activity_ap(meta, feats, pos_sameby, pos_diffby_used, neg_sameby, neg_diffby)
        if ap is None:
            raise CellrepError(
                "map_activity found no positive and negative pairs under the configured rules",
                fix="relax benchmarks.map_activity.pos_diffby / neg_sameby",
            )
        ap, counts = _usable(ap, control)
        table = _map_table(ap, [LABEL], null_size, threshold, seed, cache)
        table = _attach_type(table, meta)
        metrics = {
            **_summaries(table, "perturbation_type"),
            "threshold": threshold,
            "null_size": int(null_size),
            "pos_diffby_used": pos_diffby_used,
            "n_single_well_skipped": n_single,
            **counts,
        }
        if shuffled_baseline:
            rng = np.random.default_rng(seed)
            shuffled = meta.copy()
            treated = np.flatnonzero(~control)
            shuffled.loc[treated, LABEL] = rng.permutation(shuffled.loc[treated, LABEL].to_numpy())
            sap = _activity_ap(shuffled, feats, pos_sameby, pos_diffby_used, neg_sameby, neg_diffby)
            if sap is not None:
                sap, _ = _usable(sap, control)
                stable = _map_table(sap, [LABEL], null_size, threshold, seed, cache)
                metrics["shuffled_mean_map"] = float(stable["mean_average_precision"].mean())
                metrics["shuffled_frac_retrieved"] = float(stable["below_corrected_p"].mean())
    table = table.rename(columns={LABEL: "perturbation"}).drop(columns=["indices"], errors="ignore")
    return MapResult(metrics, {"map_activity": table})


def _activity_ap(meta, feats, pos_sameby, pos_diffby, neg_sameby, neg_diffby) -> pd.DataFrame | None:
    cmap, _, unpaired = _copairs()
    try:
        return cmap.average_precision(
            meta,
            feats,
            pos_sameby=[LABEL, *pos_sameby],
            pos_diffby=list(pos_diffby),
            neg_sameby=list(neg_sameby),
            neg_diffby=[LABEL, CONTROL, *neg_diffby],
            progress_bar=False,
        )
    except unpaired:
        return None


def _usable(ap: pd.DataFrame, control: np.ndarray) -> tuple[pd.DataFrame, dict]:
    """Treatment queries with at least one positive and one negative (a query without negatives
    would score AP = 1 and a p-value of ~0, e.g. a well on a plate without controls)."""
    treated = ~control
    has_pos = ap["n_pos_pairs"].to_numpy() > 0
    has_neg = ap["n_total_pairs"].to_numpy() > ap["n_pos_pairs"].to_numpy()
    keep = treated & has_pos & has_neg
    counts = {
        "n_wells_without_positives": int((treated & ~has_pos).sum()),
        "n_wells_without_negatives": int((treated & has_pos & ~has_neg).sum()),
    }
    return ap.loc[keep].reset_index(drop=True), counts


def _attach_type(table: pd.DataFrame, meta: pd.DataFrame) -> pd.DataFrame:
    if "perturbation_type" not in meta.columns:
        return table
    types = meta.loc[~meta[CONTROL]].groupby(LABEL, sort=False)["perturbation_type"].first().astype(str)
    return table.assign(perturbation_type=table[LABEL].map(types).to_numpy())


# --- phenotypic consistency -------------------------------------------------------------------------------------


def compound_profiles(emb: Embeddings, dose: str = "highest") -> tuple[np.ndarray, np.ndarray]:
    """(compound names, compounds × D): the mean of each compound's treatment wells at its highest
    concentration (``dose=highest``) or at every concentration (``dose=all``)."""
    meta = emb.meta
    treated = (meta["well_type"].astype(str) == "treatment").to_numpy()
    if "perturbation_type" in meta.columns:
        treated &= ~meta["perturbation_type"].astype(str).isin(GENETIC).to_numpy()
    else:
        treated &= False
    rows = np.flatnonzero(treated)
    if len(rows) == 0:
        return np.array([], dtype=str), np.zeros((0, emb.dim))
    sub = meta.iloc[rows]
    if dose == "highest" and "concentration" in sub.columns:
        conc = pd.to_numeric(sub["concentration"]).fillna(-np.inf)
        top = conc.groupby(sub["perturbation"].astype(str)).transform("max")
        rows = rows[(conc == top).to_numpy()]
    names = meta["perturbation"].astype(str).to_numpy()[rows]
    uniq, inv = np.unique(names, return_inverse=True)
    sums = np.zeros((len(uniq), emb.dim))
    np.add.at(sums, inv, emb.features[rows].astype(np.float64))
    return uniq, sums / np.bincount(inv)[:, None]


def compound_targets(
    meta: pd.DataFrame, table: pd.DataFrame | None, positive_nM: float, target_column: str
) -> dict[str, set[str]]:
    """compound → its targets: genes with activity ≤ positive_nM in the DTI table, else the metadata column."""
    if table is not None:
        hits = table.loc[table["activity_nM"] <= positive_nM]
        return {c: set(g["gene"]) for c, g in hits.groupby("compound")}
    if target_column not in meta.columns:
        return {}
    out: dict[str, set[str]] = {}
    for comp, tgt in zip(meta["perturbation"].astype(str), meta[target_column]):
        if isinstance(tgt, str) and tgt.strip():
            out.setdefault(comp, set()).update(t.strip() for t in tgt.replace(";", "|").split("|") if t.strip())
    return out


def _multilabel_map(
    names: np.ndarray,
    kind: np.ndarray,
    x: np.ndarray,
    labels: list[list[str]],
    group_by: str,
    null_size: int,
    threshold: float,
    seed: int,
    cache: Path,
) -> pd.DataFrame | None:
    """copairs multilabel AP: positives share a label, negatives share none; mAP per ``group_by``
    (``label`` or ``profile``). None when no two profiles share a label."""
    _, multilabel, unpaired = _copairs()
    keep = np.array([len(v) > 0 for v in labels])
    counts = pd.Series([lab for v in labels for lab in v], dtype=object).value_counts()
    if keep.sum() < 3 or not (counts >= 2).any():  # no positive pair, or no profile left to be a negative
        return None
    meta = pd.DataFrame({"profile": names[keep], "kind": kind[keep]})
    # a Series of lists (assigning a list of equal-length lists would make a 2-D column of strings)
    meta[LABELS] = pd.Series([sorted(str(s) for s in v) for v, k in zip(labels, keep) if k], dtype=object)
    try:
        ap = multilabel.average_precision(
            meta,
            x[keep],
            pos_sameby=[LABELS],
            pos_diffby=[],
            neg_sameby=[],
            neg_diffby=[LABELS],
            multilabel_col=LABELS,
            progress_bar=False,
        )
    except unpaired:
        return None
    ap = ap.loc[ap["n_total_pairs"] > ap["n_pos_pairs"]].reset_index(drop=True)
    if ap.empty:
        return None
    col = LABELS if group_by == "label" else "profile"
    table = _map_table(ap, [col], null_size, threshold, seed, cache)
    return table.drop(columns=["indices"], errors="ignore").rename(columns={LABELS: "label"})


def bounded_profiles(labels: list[list[str]], max_profiles: int, seed: int) -> np.ndarray:
    """Indices of at most ``max_profiles`` profiles (all when there are fewer): copairs' multilabel
    pair finding is quadratic in the profiles. Labels shared by ≥ 2 profiles are visited in a seeded
    random order and all their members taken while they fit; the rest of the budget is filled with
    random other profiles (negatives only). The same seed gives the same profiles for every correction."""
    n = len(labels)
    if n <= max_profiles:
        return np.arange(n)
    rng = np.random.default_rng([seed, 1])
    members: dict[str, list[int]] = {}
    for i, labs in enumerate(labels):
        for lab in labs:
            members.setdefault(lab, []).append(i)
    shared = [lab for lab in sorted(members) if len(members[lab]) >= 2]
    chosen: set[int] = set()
    for j in rng.permutation(len(shared)):
        new = set(members[shared[j]]) - chosen
        if len(chosen) + len(new) <= max_profiles:
            chosen |= new
    rest = np.setdiff1d(np.arange(n), np.fromiter(chosen, dtype=int, count=len(chosen)))
    fill = rng.permutation(rest)[: max_profiles - len(chosen)]
    return np.sort(np.r_[np.fromiter(chosen, dtype=int, count=len(chosen)), fill]).astype(int)


def _shuffled(labels: list[list[str]], rng) -> list[list[str]]:
    return [labels[i] for i in rng.permutation(len(labels))]


def map_consistency(
    emb: Embeddings,
    sources: dict[str, pd.DataFrame],
    targets: pd.DataFrame | None = None,
    null_size: int = 10000,
    threshold: float = 0.05,
    positive_nM: float = 1000.0,
    target_column: str = "target",
    dose: str = "highest",
    include_genes: bool = True,
    shuffled_baseline: bool = True,
    max_profiles: int = 500,
    seed: int = 0,
    cache_dir: Path | str | None = None,
) -> MapResult:
    """docs/benchmarks.md "mAP: phenotypic consistency" on perturbation-level profiles.

    ``targets``: compounds sharing a target (and a compound with its target gene when
    ``include_genes``) are positives; mAP per target. ``sources`` (name → pairs, as recall
    loads them): genes related by a pair are positives; mAP per gene. A part without any
    positive pair is reported as ``{"skipped": reason}``; with every part skipped, so is the whole
    benchmark (``metrics["skipped"]``). Each part scores at most ``max_profiles`` profiles
    (:func:`bounded_profiles`).
    """
    metrics: dict = {"threshold": threshold, "null_size": int(null_size)}
    tables: dict[str, pd.DataFrame] = {}
    try:
        genes, gx = gene_embeddings(emb)
    except CellrepError:
        genes, gx = np.array([], dtype=str), np.zeros((0, emb.dim))
    rng = np.random.default_rng(seed)
    reasons: dict[str, str] = {}
    with _null_cache(cache_dir) as cache:
        cache = Path(cache)
        parts = []
        comp_targets = compound_targets(emb.meta, targets, positive_nM, target_column)
        comps, cx = compound_profiles(emb, dose)
        if comp_targets and len(comps):
            c_labels = [sorted(comp_targets.get(c, ())) for c in comps]
            names, kind, x, labels = comps, np.array(["compound"] * len(comps)), cx, c_labels
            if include_genes and len(genes):
                names = np.r_[comps, genes]
                kind = np.r_[kind, np.array(["gene"] * len(genes))]
                x = np.vstack([cx, gx])
                labels = c_labels + [[g] for g in genes]
            parts.append(("targets", names, kind, x, labels, "label"))
        else:
            reasons["targets"] = (
                "no compound wells" if not len(comps) else "no compound targets (no DTI table, no target column)"
            )
        for source, pairs in sources.items():
            if len(genes) < 2:
                reasons[source] = "fewer than 2 genetic perturbations"
                continue
            index = pd.Index(genes)
            a = index.get_indexer(strip_guide_suffix(pairs["gene_a"].astype(str)))
            b = index.get_indexer(strip_guide_suffix(pairs["gene_b"].astype(str)))
            ok = (a >= 0) & (b >= 0) & (a != b)
            labels = [[] for _ in genes]
            for i, (u, v) in enumerate(zip(a[ok], b[ok])):
                labels[u].append(f"pair{i}")
                labels[v].append(f"pair{i}")
            parts.append((source, genes, np.array(["gene"] * len(genes)), gx, labels, "profile"))
        for name, names, kind, x, labels, group_by in parts:
            keep = bounded_profiles(labels, max_profiles, seed)
            subsampled = len(keep) < len(names)
            names, kind, x, labels = names[keep], kind[keep], x[keep], [labels[i] for i in keep]
            table = _multilabel_map(names, kind, x, labels, group_by, null_size, threshold, seed, cache)
            if table is None:
                reasons[name] = "no two profiles share a label (no positive pair)"
                continue
            tables[f"map_consistency_{name}"] = table
            metrics[name] = {
                **_summaries(table, None),
                "group_by": "target" if group_by == "label" else "gene",
                "n_profiles": int(len(names)),
                "subsampled": subsampled,
            }
            if shuffled_baseline:
                stable = _multilabel_map(
                    names, kind, x, _shuffled(labels, rng), group_by, null_size, threshold, seed, cache
                )
                if stable is not None:
                    metrics[name]["shuffled_mean_map"] = float(stable["mean_average_precision"].mean())
                    metrics[name]["shuffled_frac_retrieved"] = float(stable["below_corrected_p"].mean())
    for name, why in reasons.items():
        metrics[name] = {"skipped": why}
    if not tables:  # the suite records this as the benchmark's skip reason
        metrics["skipped"] = "nothing to score: " + "; ".join(f"{k}: {v}" for k, v in reasons.items())
    return MapResult(metrics, tables)
