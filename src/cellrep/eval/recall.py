"""Known-relationship recall (docs/benchmarks.md "Relationship recall").

Do genes that annotation databases (StringDB, HuMAP, Reactome, CORUM, SIGNOR)
say are related sit unusually close — or unusually far — in the embedding?
A pair counts when its cosine falls in either tail of the distribution of all
gene–gene cosines, so a random embedding recalls ≈ the tail mass (0.10 at
5/95) whatever its geometry. Everything is vectorized: the pairs are looked
up in one ``searchsorted`` over the sorted null, never a Python loop.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd

from cellrep.annotations import SHIPPED, load_pairs, strip_guide_suffix
from cellrep.errors import CellrepError
from cellrep.eval.embeddings import Embeddings, unit_rows

log = logging.getLogger(__name__)
THRESHOLDS = ((0.05, 0.95), (0.1, 0.9))


def threshold_key(lo: float, hi: float) -> str:
    return f"{lo:g}/{hi:g}"


def gene_embeddings(emb: Embeddings) -> tuple[np.ndarray, np.ndarray]:
    """Mean corrected embedding per gene (docs/benchmarks.md: aggregate per perturbation, mean).

    Uses treatment wells of genetic perturbations; per-guide names
    (``GENE_guide_3``) are stripped to the gene symbol first, so guides of one
    gene pool into one row. Returns (sorted gene symbols, genes × D).
    """
    sub = emb.subset(emb.genetic_mask())
    if len(sub.meta) == 0:
        raise CellrepError(
            "no genetic-perturbation treatment wells to compute recall on",
            fix="recall needs wells with perturbation_type siRNA or CRISPR and well_type treatment",
        )
    genes = strip_guide_suffix(sub.meta["perturbation"]).to_numpy(dtype=str)
    names, inverse = np.unique(genes, return_inverse=True)
    order = np.argsort(inverse, kind="stable")  # wells grouped by gene: one reduceat, no np.add.at
    counts = np.bincount(inverse, minlength=len(names))
    starts = np.r_[0, np.cumsum(counts)[:-1]]
    sums = np.add.reduceat(sub.features[order].astype(np.float64), starts, axis=0)
    return names, sums / counts[:, None]


def cosine_matrix(x: np.ndarray) -> np.ndarray:
    unit = unit_rows(x)
    return unit @ unit.T


def pair_recall(genes: np.ndarray, cos: np.ndarray, pairs: pd.DataFrame, thresholds=THRESHOLDS) -> dict:
    """Two-sided recall of annotated pairs against the all-pairs null (docs/benchmarks.md, exactly).

    Null: the upper triangle (k=1) of the gene–gene cosine matrix, sorted, N
    values. For each annotated pair with both genes present (de-duplicated,
    self-pairs dropped) and cosine q: ``r_lo = searchsorted(null, q, "right")/N``,
    ``r_hi = searchsorted(null, q, "left")/N``; recalled at (lo, hi) when
    ``r_lo <= lo or r_hi >= hi``. Recall = recalled / annotated pairs present.
    """
    genes = np.asarray(genes, dtype=str)
    if cos.shape != (len(genes), len(genes)):
        raise CellrepError(
            f"cosine matrix {cos.shape} does not match {len(genes)} genes", fix="pass one row and column per gene"
        )
    if len(genes) < 2:
        raise CellrepError(f"recall needs at least 2 genes, got {len(genes)}", fix="embed more gene perturbations")
    index = pd.Index(genes)
    a = index.get_indexer(pairs["gene_a"].astype(str))
    b = index.get_indexer(pairs["gene_b"].astype(str))
    keep = (a >= 0) & (b >= 0) & (a != b)
    a, b = np.minimum(a[keep], b[keep]), np.maximum(a[keep], b[keep])
    ab = np.unique(np.stack([a, b], axis=1), axis=0) if len(a) else np.zeros((0, 2), dtype=int)
    if len(ab) == 0:
        raise CellrepError(
            f"no annotated pair has both genes among the {len(genes)} embedded genes (e.g. {', '.join(genes[:3])})",
            fix="check that perturbation names are gene symbols (case-sensitive) "
            "matching the annotation file, or use another annotation source",
        )
    null = np.sort(cos[np.triu_indices(len(genes), k=1)])
    q = cos[ab[:, 0], ab[:, 1]]
    r_lo = np.searchsorted(null, q, side="right") / len(null)
    r_hi = np.searchsorted(null, q, side="left") / len(null)
    out = {"n_pairs": int(len(ab)), "n_genes": int(len(genes)), "n_null": int(len(null))}
    for lo, hi in thresholds:
        out[threshold_key(lo, hi)] = float(np.mean((r_lo <= lo) | (r_hi >= hi)))
    return out


def source_name(source: str | Path) -> str:
    text = str(source)
    return text if text in SHIPPED else Path(text).stem


def load_sources(sources) -> dict[str, pd.DataFrame]:
    """name → cleaned pairs; ``sources`` is a list of shipped names / paths, or such a dict already loaded."""
    if isinstance(sources, dict):
        return sources
    return {source_name(s): load_pairs(s) for s in sources}  # bad files (wrong columns, no file) raise here


def recall_benchmark(emb: Embeddings, sources=SHIPPED, thresholds=THRESHOLDS) -> dict:
    """Recall per annotation source (shipped names or paths, or :func:`load_sources`' dict) with the
    number of pairs used.

    A source with no annotated pair among the embedded genes is reported as
    skipped (with the reason); if that happens to every source it is an error.
    """
    genes, x = gene_embeddings(emb)
    cos = cosine_matrix(x)
    out, reasons = {}, {}
    for name, pairs in load_sources(sources).items():
        try:
            out[name] = pair_recall(genes, cos, pairs, thresholds)
        except CellrepError as exc:
            reasons[name] = exc.problem
            out[name] = {"n_pairs": 0, "skipped": exc.problem}
            log.warning("recall: %s skipped: %s", name, exc.problem)
    if reasons and len(reasons) == len(out):
        raise CellrepError(
            f"no annotation source has a pair among the {len(genes)} embedded genes: {reasons}",
            fix="check that perturbation names are gene symbols matching the annotation files",
        )
    return out
