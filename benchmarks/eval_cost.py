"""Evaluation cost: TVN batch correction and known-relationship recall at screen scale.

Issue 7 bar: on 20,000 wells × 1,024 features and ~5,000 genes, recall and
TVN finish in seconds, not minutes (vectorized). Uses the public functions of
:mod:`cellrep.eval` (``correct(..., "tvn")``, ``gene_embeddings``,
``cosine_matrix``, ``pair_recall``) on random features: 16 experiments, 5%
negative-control wells, 4 wells per gene, and 100,000 random annotated pairs
(the shipped annotation files are ~10⁴–10⁵ pairs). Each stage is timed
``--repeats`` times; the table shows medians. numpy uses its default threads.

TVN is timed twice side by side: the current ``correct(emb, "tvn")`` (CORAL from
the SVD of each experiment's control rows) and the previous implementation, one
D×D ``eigh`` of each experiment's control covariance (kept here as the reference;
``--skip-old`` leaves it out). The largest absolute difference between the two
outputs is printed next to the table.

    python benchmarks/eval_cost.py [--quick]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import cellrep  # noqa: F401, E402  (torchvision compat before lightning/timm)

# isort: split
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from _common import machine, median, table  # noqa: E402

from cellrep.eval.batch_correction import CORAL_RIDGE, center_scale, correct, inverse_sqrt, pca_fit  # noqa: E402
from cellrep.eval.embeddings import Embeddings  # noqa: E402
from cellrep.eval.recall import cosine_matrix, gene_embeddings, pair_recall  # noqa: E402


def screen(wells: int, dim: int, genes: int, experiments: int, seed: int = 0) -> Embeddings:
    rng = np.random.default_rng(seed)
    control = rng.random(wells) < 0.05
    gene = np.array([f"G{i:05d}" for i in range(genes)])[rng.integers(0, genes, wells)]
    meta = pd.DataFrame(
        {
            "experiment": [f"E{i % experiments:02d}" for i in range(wells)],
            "perturbation": np.where(control, "EMPTY_control", gene),
            "perturbation_type": np.where(control, "control", "CRISPR"),
            "well_type": np.where(control, "negative_control", "treatment"),
        }
    )
    return Embeddings(meta, rng.standard_normal((wells, dim), dtype=np.float32))


def tvn_eigh_per_experiment(emb: Embeddings) -> np.ndarray:
    """The previous TVN: identical up to the CORAL step, which did one D×D eigh per experiment."""
    x, batch, control = emb.features.astype(np.float64), emb.batch, emb.is_control
    z = center_scale(x, control)
    mean, axes = pca_fit(z[control])
    z = center_scale((z - mean) @ axes.T, control)
    ridge = CORAL_RIDGE * np.eye(z.shape[1])
    out = np.empty_like(z)
    for b in np.unique(batch):
        rows = batch == b
        cov = np.cov(z[rows & control], rowvar=False, ddof=1).reshape(z.shape[1], z.shape[1])
        out[rows] = z[rows] @ inverse_sqrt(cov + ridge)
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--wells", type=int, default=20_000)
    p.add_argument("--dim", type=int, default=1024)
    p.add_argument("--genes", type=int, default=5000)
    p.add_argument("--experiments", type=int, default=16)
    p.add_argument("--pairs", type=int, default=100_000)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--skip-old", action="store_true", help="do not time the previous (eigh) TVN")
    a = p.parse_args(argv)
    if a.quick:
        a.wells, a.dim, a.genes, a.experiments, a.pairs, a.repeats = 800, 16, 50, 4, 200, 1
    emb = screen(a.wells, a.dim, a.genes, a.experiments)
    rng = np.random.default_rng(1)
    names = np.array([f"G{i:05d}" for i in range(a.genes)])
    pairs = pd.DataFrame({"gene_a": rng.choice(names, a.pairs), "gene_b": rng.choice(names, a.pairs)})
    times: dict[str, list[float]] = {}
    cpu: dict[str, list[float]] = {}

    def timed(name, fn):
        t0, c0 = time.perf_counter(), time.process_time()
        out = fn()
        times.setdefault(name, []).append(time.perf_counter() - t0)
        cpu.setdefault(name, []).append(time.process_time() - c0)
        return out

    old = None
    for _ in range(a.repeats):
        if not a.skip_old:
            old = timed("TVN before: one eigh per experiment", lambda: tvn_eigh_per_experiment(emb))
        corrected = timed("TVN now (correct(emb, 'tvn'), SVD of control rows)", lambda: correct(emb, "tvn"))
        genes, x = timed("recall: gene means (gene_embeddings)", lambda: gene_embeddings(corrected))
        cos = timed("recall: gene×gene cosine (cosine_matrix)", lambda: cosine_matrix(x))
        res = timed("recall: null + pairs (pair_recall)", lambda: pair_recall(genes, cos, pairs))
    rows = [[k, f"{median(v):.2f}", f"{median(cpu[k]):.2f}"] for k, v in times.items()]
    now = [k for k in times if not k.startswith("TVN before")]
    rows.append(
        [
            "**total (TVN now + recall)**",
            f"{sum(median(times[k]) for k in now):.2f}",
            f"{sum(median(cpu[k]) for k in now):.2f}",
        ]
    )
    print(f"# machine: {machine()}")
    print(
        f"# {a.wells:,} wells × {a.dim:,} features, {a.experiments} experiments, {len(genes):,} genes, "
        f"{res['n_pairs']:,} pairs present, null of {res['n_null']:,} cosines; median of {a.repeats}"
    )
    # CPU seconds (all threads of this process) next to wall seconds: on a shared machine the wall
    # clock also counts time spent waiting for a core
    print(table(["stage", "wall seconds", "CPU seconds"], rows))
    if old is not None:
        # both share the same PCA axes (same SVD call); float32 storage of the new output bounds the
        # agreement at ~1e-7 relative
        new = corrected.features.astype(np.float64)
        print(
            f"# max |TVN now − TVN before| = {np.abs(new - old).max():.2e} "
            f"(outputs' max |value| {np.abs(old).max():.1f}; the new one is stored as float32)"
        )


if __name__ == "__main__":
    main()
