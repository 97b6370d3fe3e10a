"""The three pictures of an evaluation (docs/benchmarks.md): accuracy per block, recall per
annotation source raw vs corrected, and the DTI AP distribution against its random baseline."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; never needs a display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402


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
