"""The pictures of an evaluation (docs/benchmarks.md "Plots"): accuracy per block, recall per
annotation source raw vs corrected, recall against threshold, the DTI AP distribution against its
random baseline, mAP against −log10 q per perturbation, and UMAP before and after each correction."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; never needs a display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from cellrep.annotations import strip_guide_suffix  # noqa: E402
from cellrep.errors import CellrepError  # noqa: E402
from cellrep.eval.embeddings import GENETIC, Embeddings  # noqa: E402
from cellrep.eval.map import check_columns  # noqa: E402


def _save(fig, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def probe_curve(table: pd.DataFrame, path: Path, best_block: str | None = None) -> Path:
    """Held-out top-1 (and validation) accuracy per block, chance as a dashed line."""
    fig, ax = plt.subplots(figsize=(max(4.0, 0.45 * len(table) + 2), 3.2))
    x = table["block_index"].to_numpy()
    ax.plot(x, table["test_acc"], "o-", label="held-out top-1")
    ax.plot(x, table["test_acc_top5"], "s--", alpha=0.6, label="held-out top-5")
    ax.plot(x, table["val_acc"], "^:", alpha=0.6, label="validation top-1")
    ax.axhline(float(table["chance"].iloc[0]), color="grey", ls="--", lw=1, label="chance")
    if best_block is not None and best_block in set(table["block"]):
        bx = int(table.loc[table["block"] == best_block, "block_index"].iloc[0])
        ax.axvline(bx, color="tab:red", lw=1, alpha=0.5, label=f"best: {best_block}")
    ax.set_xticks(x, table["block"], rotation=45, ha="right", fontsize=8)
    ax.set_xlabel("block")
    ax.set_ylabel("accuracy")
    ax.set_title("linear probe accuracy per block")
    ax.legend(fontsize=7)
    return _save(fig, path)


def recall_bars(metrics: dict[str, dict], path: Path, threshold: str = "0.05/0.95") -> Path:
    """Recall per annotation source, one bar per batch correction; random expectation dashed."""
    corrections = [c for c in metrics if "recall" in metrics[c]]
    sources = sorted({s for c in corrections for s, v in metrics[c]["recall"].items() if threshold in v})
    fig, ax = plt.subplots(figsize=(max(4.0, 1.4 * len(sources) + 1.5), 3.2))
    width = 0.8 / max(1, len(corrections))
    for i, corr in enumerate(corrections):
        values = [metrics[corr]["recall"].get(s, {}).get(threshold, np.nan) for s in sources]
        ax.bar(np.arange(len(sources)) + i * width, values, width, label=corr)
    lo, hi = (float(v) for v in threshold.split("/"))
    ax.axhline(lo + (1 - hi), color="grey", ls="--", lw=1, label="random")
    pairs = [
        next((metrics[c]["recall"][s]["n_pairs"] for c in corrections if s in metrics[c]["recall"]), 0) for s in sources
    ]
    ax.set_xticks(np.arange(len(sources)) + 0.4 - width / 2, [f"{s}\n({n} pairs)" for s, n in zip(sources, pairs)])
    ax.set_ylabel(f"recall at {threshold}")
    ax.set_title("known-relationship recall")
    ax.legend(fontsize=7)
    return _save(fig, path)


def dti_distribution(per_compound: pd.DataFrame, path: Path, variant: str = "max", correction: str = "") -> Path:
    """Per-compound AP (mean over sampling seeds) vs uniformly random scores on the same samples."""
    frame = per_compound[per_compound["variant"] == variant]
    fig, ax = plt.subplots(figsize=(4.5, 3.2))
    bins = np.linspace(0, 1, 21)
    ax.hist(frame["random_ap"].dropna(), bins=bins, alpha=0.5, label="random scores", color="grey")
    ax.hist(frame["ap"].dropna(), bins=bins, alpha=0.6, label=f"|cosine| ({variant} over doses)")
    for col, color in (("ap", "tab:blue"), ("random_ap", "black")):
        ax.axvline(float(frame[col].median()), color=color, ls="--", lw=1)
    ax.set_xlabel("average precision per compound")
    ax.set_ylabel("compounds")
    ax.set_title(f"zero-shot DTI{f' ({correction})' if correction else ''}, dashed: medians")
    ax.legend(fontsize=7)
    return _save(fig, path)


def mission_comparisons(comparisons: dict, path: Path) -> Path:
    """cellrep-mission's three comparisons in one figure: held-out accuracy per split arm, recall per
    correction (first source and threshold) and DTI median AP per correction, each against its baseline."""
    fig, axes = plt.subplots(1, 3, figsize=(11, 3.2))
    acc = comparisons["accuracy"]
    names = list(acc["arms"])
    axes[0].bar(names, [np.nan if acc["arms"][n]["top1"] is None else acc["arms"][n]["top1"] for n in names])
    if acc["chance"] is not None:
        axes[0].axhline(acc["chance"], color="grey", ls="--", lw=1, label="chance")
        axes[0].legend(fontsize=7)
    axes[0].set_ylabel("held-out top-1")
    axes[0].set_title("accuracy by split")

    # the source with the most annotated pairs: the least noisy recall of the run
    ran = [(s, e) for s, e in comparisons["recall"].items() if any("/" in k for k in e)]
    recall = max(ran, key=lambda se: se[1].get("n_pairs") or 0, default=None)
    if recall is not None:
        source, entry = recall
        key = next(k for k in entry if "/" in k)
        corrs = [c for c in entry[key] if c != "random"]
        axes[1].bar(corrs, [entry[key][c] for c in corrs])
        axes[1].axhline(entry[key]["random"], color="grey", ls="--", lw=1, label="random")
        axes[1].legend(fontsize=7)
        axes[1].set_title(f"recall {source} at {key}")
    else:
        axes[1].set_title("recall: not run")

    dti = {c: d for c, d in comparisons["dti"].items() if isinstance(d, dict)}
    if dti:
        x = np.arange(len(dti))
        axes[2].bar(x - 0.2, [d["ap"] for d in dti.values()], 0.4, label="|cosine|")
        axes[2].bar(x + 0.2, [d["random_ap"] for d in dti.values()], 0.4, color="grey", label="random scores")
        axes[2].set_xticks(x, list(dti))
        axes[2].legend(fontsize=7)
        axes[2].set_title("zero-shot DTI median AP")
    else:
        axes[2].set_title("zero-shot DTI: not run")
    for ax in axes[1:]:
        ax.tick_params(axis="x", labelsize=8)
    return _save(fig, path)


def recall_curve(curve: pd.DataFrame, path: Path) -> Path:
    """Recall against the symmetric threshold (q, 1 − q): one panel per annotation source, one line per
    correction, the random expectation 2q dashed. ``curve``: the suite's ``recall_curve`` table."""
    sources = list(dict.fromkeys(curve["source"]))
    fig, axes = plt.subplots(1, len(sources), figsize=(3.6 * len(sources) + 0.6, 3.2), squeeze=False)
    for ax, source in zip(axes[0], sources):
        part = curve[curve["source"] == source]
        for corr, line in part.groupby("correction", sort=False):
            line = line.sort_values("lower")
            ax.plot(line["lower"], line["recall"], "o-", ms=3, label=corr)
        q = np.sort(part["lower"].unique())
        ax.plot(q, 2 * q, color="grey", ls="--", lw=1, label="random (2q)")
        ax.set_xlabel("threshold q (both tails: q and 1 − q)")
        ax.set_ylabel("recall")
        ax.set_title(f"{source} ({int(part['n_pairs'].iloc[0])} pairs)", fontsize=9)
        ax.legend(fontsize=7)
    fig.suptitle("known-relationship recall against threshold", fontsize=10)
    return _save(fig, path)


def map_significance(tables: dict[str, pd.DataFrame], path: Path, threshold: float = 0.05) -> Path:
    """mAP against −log10 q (BH-corrected p) per perturbation, one panel per correction, coloured by
    perturbation type; the dashed line is the retrieval threshold. ``tables``: correction → the
    ``map_activity`` table of that correction."""
    fig, axes = plt.subplots(1, len(tables), figsize=(3.4 * len(tables) + 0.6, 3.2), squeeze=False, sharey=True)
    for ax, (corr, table) in zip(axes[0], tables.items()):
        q = np.clip(table["corrected_p_value"].to_numpy(dtype=float), 1e-300, 1.0)
        y = -np.log10(q)
        kinds = (
            table["perturbation_type"].astype(str) if "perturbation_type" in table else pd.Series("all", table.index)
        )
        for kind in sorted(kinds.unique()):
            rows = (kinds == kind).to_numpy()
            ax.scatter(table["mean_average_precision"].to_numpy()[rows], y[rows], s=10, alpha=0.7, label=kind)
        ax.axhline(-np.log10(threshold), color="grey", ls="--", lw=1, label=f"q = {threshold:g}")
        retrieved = float(np.mean(q < threshold)) if len(q) else float("nan")
        ax.set_title(f"{corr}: {retrieved:.0%} of {len(q)} retrieved", fontsize=9)
        ax.set_xlabel("mAP")
        ax.set_xlim(-0.02, 1.02)
        ax.legend(fontsize=7)
    axes[0][0].set_ylabel("−log10 q")
    fig.suptitle("phenotypic activity (map_activity) per perturbation", fontsize=10)
    return _save(fig, path)


def biology_labels(meta: pd.DataFrame, color_by: str = "auto", max_colors: int = 10) -> np.ndarray:
    """The UMAP's biology colour per well: ``color_by`` names a metadata column, or ``auto``: the
    ``module`` column when there is one, else what a well acts on (a compound's ``target``, a genetic
    perturbation's gene); controls are "control"; beyond the ``max_colors`` most frequent, "other"."""
    control = (meta["well_type"].astype(str) != "treatment").to_numpy() if "well_type" in meta else None
    if color_by != "auto":
        check_columns("plots.color_by", [color_by], meta.columns)
        labels = meta[color_by].astype(str).to_numpy(dtype=object)
    elif "module" in meta.columns:
        labels = meta["module"].astype(str).to_numpy(dtype=object)
    else:
        labels = strip_guide_suffix(meta["perturbation"].astype(str)).to_numpy(dtype=object)
        if "target" in meta.columns:
            target = meta["target"].fillna("").astype(str).str.split("|").str[0].str.strip().to_numpy(dtype=object)
            genetic = (
                meta["perturbation_type"].astype(str).isin(GENETIC).to_numpy()
                if "perturbation_type" in meta
                else np.zeros(len(meta), bool)
            )
            use = (target != "") & ~genetic
            labels[use] = target[use]
    if control is not None:
        labels[control] = "control"
    counts = pd.Series(labels[labels != "control"]).value_counts()
    keep = set(counts.index[:max_colors])
    return np.array([lab if lab in keep or lab == "control" else "other" for lab in labels], dtype=object)


def umap_coordinates(
    corrected: dict[str, Embeddings],
    max_wells: int = 2000,
    seed: int = 0,
    n_neighbors: int = 15,
    min_dist: float = 0.1,
    metric: str = "cosine",
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """(rows, correction → rows × 2 UMAP coordinates): one UMAP per correction, fit on the same seeded
    subsample of at most ``max_wells`` wells, ``random_state=seed`` (umap-learn, one thread)."""
    import warnings

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # numba / umap import-time notices
            import umap
    except ImportError as exc:
        raise CellrepError(
            f"the UMAP plot needs umap-learn ({exc})", fix="pip install 'umap-learn>=0.5', or pass plots.umap=false"
        ) from None

    n = len(next(iter(corrected.values())))
    rng = np.random.default_rng(seed)
    rows = np.sort(rng.choice(n, size=max_wells, replace=False)) if n > max_wells else np.arange(n)
    out = {}
    for method, emb in corrected.items():
        x = np.nan_to_num(np.asarray(emb.features[rows], dtype=np.float32))
        reducer = umap.UMAP(
            n_neighbors=min(n_neighbors, len(rows) - 1),
            min_dist=min_dist,
            metric=metric,
            random_state=seed,
            n_jobs=1,
        )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "n_jobs overridden by random_state", small-data notices
            out[method] = np.asarray(reducer.fit_transform(x), dtype=np.float64)
    return rows, out


def _scatter_labels(ax, xy: np.ndarray, labels: np.ndarray, legend: bool) -> None:
    names = [n for n in dict.fromkeys(sorted(labels, key=lambda v: (v in ("control", "other"), v)))]
    cmap = plt.get_cmap("tab10" if len(names) <= 10 else "tab20")
    for i, name in enumerate(names):
        rows = labels == name
        colour = {"control": "lightgrey", "other": "darkgrey"}.get(name, cmap(i % cmap.N))
        ax.scatter(xy[rows, 0], xy[rows, 1], s=4, alpha=0.7, color=colour, label=name, linewidths=0)
    ax.set_xticks([])
    ax.set_yticks([])
    if legend:
        ax.legend(fontsize=6, markerscale=2, loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False)


def umap_grid(
    corrected: dict[str, Embeddings],
    path: Path,
    max_wells: int = 2000,
    seed: int = 0,
    n_neighbors: int = 15,
    min_dist: float = 0.1,
    metric: str = "cosine",
    color_by: str = "auto",
    max_colors: int = 10,
) -> Path:
    """UMAP of the well embeddings, one row per correction (``none`` = before), coloured by experiment
    (left) and by biology (right, :func:`biology_labels`)."""
    rows, coords = umap_coordinates(corrected, max_wells, seed, n_neighbors, min_dist, metric)
    meta = next(iter(corrected.values())).meta.iloc[rows]
    experiment = meta["experiment"].astype(str).to_numpy(dtype=object)
    biology = biology_labels(meta, color_by, max_colors)
    fig, axes = plt.subplots(len(coords), 2, figsize=(8.5, 3.2 * len(coords)), squeeze=False)
    for r, (method, xy) in enumerate(coords.items()):
        _scatter_labels(axes[r][0], xy, experiment, legend=len(set(experiment)) <= 20)
        _scatter_labels(axes[r][1], xy, biology, legend=True)
        axes[r][0].set_ylabel("raw (none)" if method == "none" else method)
    axes[0][0].set_title("by experiment", fontsize=9)
    axes[0][1].set_title("by module / target" if color_by == "auto" else f"by {color_by}", fontsize=9)
    fig.suptitle(f"UMAP of {len(rows)} wells ({metric}), before and after each correction", fontsize=10)
    return _save(fig, path)
