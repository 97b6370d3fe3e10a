"""Each batch correction scored on batch removal and biology conserved (docs/benchmarks.md "Correction scores").

As the JUMP batch-correction benchmark (Arevalo et al., Nat Commun 2024) does, after scib
(Luecken et al. 2022): every metric is computed per correction, min-max scaled across the
corrections, averaged within its axis, and ``overall = 0.4·batch + 0.6·biology``.

Batch removal (higher = batches better mixed):

- ``silhouette_batch``: per perturbation label (the controls form one label), the silhouette
  of the batch labels among its wells, ``1 − |s_i|`` averaged over the label's wells, then over labels;
- ``ilisi``: (median local inverse Simpson index of the batch labels − 1) / (batches − 1);
- ``graph_connectivity``: on the k-nearest-neighbour graph of all scored wells, per label, the
  share of its wells in the largest connected component of the label's subgraph, averaged over labels;
- ``pcr_batch``: ``(pcr(none) − pcr(method)) / pcr(none)``, clipped to [0, 1], with
  ``pcr = Σ_i var_i · R²(PC_i ~ batch) / Σ_i var_i`` over the first principal components.

Biology conserved (higher = perturbations better separated):

- ``silhouette_label``: ``(s_i + 1)/2`` of the perturbation labels of treatment wells, averaged;
- ``clisi``: scib's cLISI of the perturbation labels of treatment wells,
  (labels − median LISI) / (labels − 1): 1 when every neighbourhood holds one label;
- ``map_activity``: the mean mAP of the map_activity benchmark, when it ran.

The formulas are the well-known ones, written here with NumPy/SciPy (scib-metrics would pull
JAX) and tested against hand-computed cases; distances are Euclidean, as in scib.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import scipy.linalg
from scipy import sparse
from scipy.sparse.csgraph import connected_components

from cellrep.eval.embeddings import Embeddings
from cellrep.eval.map import perturbation_label

BATCH_METRICS = ("silhouette_batch", "ilisi", "graph_connectivity", "pcr_batch")
BIO_METRICS = ("silhouette_label", "clisi", "map_activity")


def pairwise_distances(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    sq = np.einsum("ij,ij->i", x, x)
    d2 = sq[:, None] + sq[None, :] - 2.0 * (x @ x.T)
    np.fill_diagonal(d2, 0.0)
    return np.sqrt(np.clip(d2, 0.0, None))


def silhouette_samples(dist: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Per-sample silhouette from a distance matrix (scikit-learn's definition: 0 for a singleton label)."""
    names, codes = np.unique(np.asarray(labels), return_inverse=True)
    n = len(codes)
    onehot = sparse.csr_matrix((np.ones(n), (codes, np.arange(n))), shape=(len(names), n))
    counts = np.bincount(codes, minlength=len(names)).astype(np.float64)
    sums = np.asarray((onehot @ dist).T)  # n × L: summed distance to each label, O(n²) with a sparse one-hot
    own = counts[codes]
    a = sums[np.arange(len(codes)), codes] / np.maximum(own - 1, 1)
    means = sums / counts[None, :]
    means[np.arange(len(codes)), codes] = np.inf
    b = means.min(axis=1)
    s = (b - a) / np.maximum(np.maximum(a, b), 1e-300)
    return np.where(own > 1, s, 0.0)


def silhouette_label(dist: np.ndarray, labels: np.ndarray) -> float:
    """scib ``silhouette`` rescaled: mean of (s + 1)/2."""
    return float(np.mean((silhouette_samples(dist, labels) + 1.0) / 2.0))


def silhouette_batch(dist: np.ndarray, batch: np.ndarray, labels: np.ndarray) -> float:
    """scib ``silhouette_batch``: per label, mean of 1 − |s_i| of the batch labels; mean over labels.

    Labels whose wells sit in a single batch, or that have no more wells than batches, are left out.
    """
    scores = []
    for lab in np.unique(labels):
        rows = np.flatnonzero(labels == lab)
        n_batches = len(np.unique(batch[rows]))
        if n_batches < 2 or len(rows) <= n_batches:
            continue
        s = silhouette_samples(dist[np.ix_(rows, rows)], batch[rows])
        scores.append(float(np.mean(1.0 - np.abs(s))))
    return float(np.mean(scores)) if scores else float("nan")


def knn_graph(dist: np.ndarray, k: int) -> sparse.csr_matrix:
    """Symmetric k-nearest-neighbour graph (self excluded)."""
    n = len(dist)
    k = min(k, n - 1)
    d = dist.copy()
    np.fill_diagonal(d, np.inf)
    nbrs = np.argpartition(d, k - 1, axis=1)[:, :k]
    graph = sparse.coo_matrix((np.ones(n * k), (np.repeat(np.arange(n), k), nbrs.ravel())), shape=(n, n)).tocsr()
    return ((graph + graph.T) > 0).astype(np.float64)


def lisi(dist: np.ndarray, labels: np.ndarray, perplexity: float = 30.0, tol: float = 1e-5) -> np.ndarray:
    """Local inverse Simpson index per well (Korsunsky et al. 2019): on its k = 3·perplexity nearest
    neighbours, Gaussian weights ``exp(−β·d)`` of the (Euclidean) distances with β set by bisection so
    that the weights' entropy is log(perplexity); LISI = 1 / Σ_labels (weight of the label)²."""
    n = len(dist)
    k = int(min(3 * perplexity, n - 1))
    d = dist.copy()
    np.fill_diagonal(d, np.inf)
    idx = np.argpartition(d, k - 1, axis=1)[:, :k]
    dk = np.take_along_axis(d, idx, axis=1)
    beta, lo, hi = np.ones(n), np.full(n, -np.inf), np.full(n, np.inf)
    target = np.log(min(perplexity, k))
    for _ in range(50):
        w = np.exp(-(dk - dk.min(axis=1, keepdims=True)) * beta[:, None])  # shifted: same weights, no underflow
        total = w.sum(axis=1)
        entropy = np.log(total) + beta * ((dk - dk.min(axis=1, keepdims=True)) * w).sum(axis=1) / total
        diff = entropy - target
        if np.all(np.abs(diff) < tol):
            break
        up = diff > 0  # too flat: sharpen
        lo, hi = np.where(up, beta, lo), np.where(up, hi, beta)
        beta = np.where(
            up,
            np.where(np.isinf(hi), beta * 2.0, (beta + hi) / 2.0),
            np.where(np.isinf(lo), beta / 2.0, (beta + lo) / 2.0),
        )
    w = w / total[:, None]
    _, codes = np.unique(labels, return_inverse=True)
    neighbour = codes[idx]
    simpson = np.zeros(n)
    for c in range(codes.max() + 1):
        simpson += ((neighbour == c) * w).sum(axis=1) ** 2
    return 1.0 / simpson


def ilisi(dist: np.ndarray, batch: np.ndarray, perplexity: float = 30.0) -> float:
    """scib's iLISI score: (median LISI of the batch labels − 1) / (batches − 1), in [0, 1]."""
    n_batches = len(np.unique(batch))
    if n_batches < 2:
        return float("nan")
    return float((np.median(lisi(dist, batch, perplexity)) - 1.0) / (n_batches - 1))


def clisi(dist: np.ndarray, labels: np.ndarray, perplexity: float = 30.0) -> float:
    """scib's cLISI score: (labels − median LISI of the labels) / (labels − 1), in [0, 1]."""
    n_labels = len(np.unique(labels))
    if n_labels < 2:
        return float("nan")
    return float((n_labels - np.median(lisi(dist, labels, perplexity))) / (n_labels - 1))


def graph_connectivity(graph: sparse.csr_matrix, labels: np.ndarray) -> float:
    """scib ``graph_connectivity``: mean over labels (≥ 2 wells) of the largest component's share."""
    shares = []
    for lab in np.unique(labels):
        rows = np.flatnonzero(labels == lab)
        if len(rows) < 2:
            continue
        _, comp = connected_components(graph[rows][:, rows], directed=False)
        shares.append(np.bincount(comp).max() / len(rows))
    return float(np.mean(shares)) if shares else float("nan")


def pcr(x: np.ndarray, batch: np.ndarray, n_components: int = 50) -> float:
    """scib ``pc_regression``: Σ var_i·R²(PC_i ~ batch one-hot) / Σ var_i over the first components."""
    x = np.asarray(x, dtype=np.float64)
    centred = x - x.mean(axis=0)
    # only the leading components, from the smaller of the covariance and Gram matrices (no full SVD)
    wide = centred.shape[1] > centred.shape[0]
    gram = centred @ centred.T if wide else centred.T @ centred
    k = min(n_components, len(gram))
    vals, vecs = scipy.linalg.eigh(gram, subset_by_index=[len(gram) - k, len(gram) - 1], driver="evx")
    vals, vecs = vals[::-1], vecs[:, ::-1]
    var = np.clip(vals, 0.0, None)
    pcs = vecs * np.sqrt(var) if wide else centred @ vecs
    keep = var > var.max(initial=0.0) * 1e-12
    pcs, var = pcs[:, keep], var[keep]
    if len(var) == 0:
        return 0.0
    _, codes = np.unique(batch, return_inverse=True)
    counts = np.bincount(codes)
    means = np.zeros((len(counts), pcs.shape[1]))
    np.add.at(means, codes, pcs)
    means /= counts[:, None]
    between = (counts[:, None] * means**2).sum(axis=0)  # PCs are centred: SS_between / SS_total = R²
    r2 = between / (pcs**2).sum(axis=0)
    return float((r2 * var).sum() / var.sum())


def minmax(values: pd.Series) -> pd.Series:
    """Min-max scaling across corrections; a metric equal for all (or all NaN) scores 0.5 for each."""
    lo, hi = values.min(), values.max()
    if not np.isfinite(lo) or not np.isfinite(hi) or hi - lo <= 1e-12:
        return pd.Series(np.where(values.notna(), 0.5, np.nan), index=values.index)
    return (values - lo) / (hi - lo)


def scored_wells(emb: Embeddings, max_wells: int, seed: int) -> np.ndarray:
    """Rows scored: treatment wells of labels with ≥ 2 wells and the controls; above ``max_wells``,
    whole labels drawn at random (seeded) and at most a quarter of the budget of controls."""
    meta = emb.meta
    wt = meta["well_type"].astype(str).to_numpy()
    label = perturbation_label(meta).to_numpy()
    treated = wt == "treatment"
    sizes = pd.Series(label[treated]).value_counts()
    rep = treated & np.isin(label, sizes[sizes >= 2].index.to_numpy())
    ctrl = np.flatnonzero(wt == "negative_control")
    rows = np.flatnonzero(rep)
    if len(rows) + len(ctrl) <= max_wells:
        return np.sort(np.r_[rows, ctrl])
    rng = np.random.default_rng(seed)
    ctrl = rng.choice(ctrl, size=min(len(ctrl), max_wells // 4), replace=False)
    budget, chosen = max_wells - len(ctrl), []
    groups = pd.Series(rows).groupby(label[rows]).indices  # label -> positions in rows
    for lab in rng.permutation(sizes[sizes >= 2].index.to_numpy()):
        members = rows[groups[lab]]
        if len(members) > budget:
            continue
        chosen.append(members)
        budget -= len(members)
    return np.sort(np.concatenate([ctrl, *chosen]))


def raw_scores(
    emb: Embeddings, rows: np.ndarray, knn: int, pcr_components: int, perplexity: float = 30.0
) -> dict[str, float]:
    """The unscaled metrics of one correction on the scored ``rows`` (pcr_batch: the raw pcr)."""
    meta = emb.meta.iloc[rows]
    x = emb.features[rows].astype(np.float64)
    batch = meta["experiment"].astype(str).to_numpy()
    control = (meta["well_type"].astype(str) == "negative_control").to_numpy()
    label = np.where(control, "__control__", perturbation_label(meta).to_numpy())
    dist = pairwise_distances(x)
    treated = ~control
    return {
        "silhouette_batch": silhouette_batch(dist, batch, label),
        "ilisi": ilisi(dist, batch, perplexity),
        "graph_connectivity": graph_connectivity(knn_graph(dist, knn), label),
        "pcr": pcr(x, batch, pcr_components),
        "silhouette_label": silhouette_label(dist[np.ix_(treated, treated)], label[treated])
        if treated.sum() > 2
        else float("nan"),
        "clisi": clisi(dist[np.ix_(treated, treated)], label[treated], perplexity)
        if treated.sum() > 2
        else float("nan"),
    }


def skip_reason(emb: Embeddings, corrections: list[str]) -> str | None:
    if emb.meta["experiment"].nunique() < 2:
        return "a single experiment: there is no batch effect to score"
    if len(corrections) < 2:
        return "needs at least 2 corrections to scale the metrics across (e.g. corrections=[none,tvn])"
    return None


def correction_scores(raw: dict[str, dict[str, float]], batch_weight: float = 0.4) -> pd.DataFrame:
    """One row per correction: raw and min-max scaled metrics, ``batch``, ``biology``, ``overall``, ``rank``.

    ``raw``: correction → :func:`raw_scores` (plus ``map_activity`` when it ran). ``pcr_batch`` is
    relative to ``none`` when it is among the corrections, else to the largest pcr.
    """
    table = pd.DataFrame.from_dict(raw, orient="index")
    base = table.loc["none", "pcr"] if "none" in table.index else table["pcr"].max()
    table["pcr_batch"] = ((base - table["pcr"]) / base).clip(0.0, 1.0) if base > 0 else 0.0
    batch_cols = [c for c in BATCH_METRICS if c in table and table[c].notna().any()]
    bio_cols = [c for c in BIO_METRICS if c in table and table[c].notna().any()]
    scaled = pd.DataFrame({f"{c}_scaled": minmax(table[c]) for c in (*batch_cols, *bio_cols)})
    table = pd.concat([table, scaled], axis=1)
    table["batch"] = scaled[[f"{c}_scaled" for c in batch_cols]].mean(axis=1)
    table["biology"] = scaled[[f"{c}_scaled" for c in bio_cols]].mean(axis=1)
    table["overall"] = batch_weight * table["batch"] + (1.0 - batch_weight) * table["biology"]
    table["rank"] = table["overall"].rank(ascending=False, method="min").astype(int)
    table.index.name = "correction"
    return table.reset_index().sort_values("rank", kind="stable").reset_index(drop=True)


def ranking_plot(table: pd.DataFrame, path: Path | str) -> Path:
    """Horizontal bars of batch, biology and overall per correction, best at the top."""
    from cellrep.eval.plots import _save, plt

    order = table.sort_values("overall")
    y = np.arange(len(order))
    fig, ax = plt.subplots(figsize=(5.5, 0.5 * len(order) + 1.5))
    for i, (col, colour) in enumerate((("batch", "tab:blue"), ("biology", "tab:green"), ("overall", "black"))):
        ax.barh(y + (i - 1) * 0.27, order[col], height=0.25, color=colour, label=col)
    ax.set_yticks(y, order["correction"])
    ax.set_xlim(0, 1)
    ax.set_xlabel("min-max scaled score (overall = 0.4·batch + 0.6·biology by default)")
    ax.set_title("batch corrections ranked")
    ax.legend(fontsize=7, loc="lower right")
    return _save(fig, Path(path))
