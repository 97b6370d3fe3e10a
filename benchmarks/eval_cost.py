"""Evaluation cost: TVN batch correction and known-relationship recall at screen scale.

Issue 7 bar: on 20,000 wells × 1,024 features and ~5,000 genes, recall and
TVN finish in seconds, not minutes (vectorized). Uses the public functions of
:mod:`cellrep.eval` (``correct(..., "tvn")``, ``gene_embeddings``,
``cosine_matrix``, ``pair_recall``) on random features: 16 experiments, 5%
negative-control wells, 4 wells per gene, and 100,000 random annotated pairs
(the shipped annotation files are ~10⁴–10⁵ pairs). Each stage is timed
``--repeats`` times; the table shows medians. numpy uses its default threads.

    python benchmarks/eval_cost.py [--quick]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import machine, median, table  # noqa: E402

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from cellrep.eval.batch_correction import correct  # noqa: E402
from cellrep.eval.embeddings import Embeddings  # noqa: E402
from cellrep.eval.recall import cosine_matrix, gene_embeddings, pair_recall  # noqa: E402


def screen(wells: int, dim: int, genes: int, experiments: int, seed: int = 0) -> Embeddings:
    rng = np.random.default_rng(seed)
    control = rng.random(wells) < 0.05
    gene = np.array([f"G{i:05d}" for i in range(genes)])[rng.integers(0, genes, wells)]
    meta = pd.DataFrame({"experiment": [f"E{i % experiments:02d}" for i in range(wells)],
                         "perturbation": np.where(control, "EMPTY_control", gene),
                         "perturbation_type": np.where(control, "control", "CRISPR"),
                         "well_type": np.where(control, "negative_control", "treatment")})
    return Embeddings(meta, rng.standard_normal((wells, dim), dtype=np.float32))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--wells", type=int, default=20_000)
    p.add_argument("--dim", type=int, default=1024)
    p.add_argument("--genes", type=int, default=5000)
    p.add_argument("--experiments", type=int, default=16)
    p.add_argument("--pairs", type=int, default=100_000)
    p.add_argument("--repeats", type=int, default=1)
    a = p.parse_args(argv)
    if a.quick:
        a.wells, a.dim, a.genes, a.experiments, a.pairs, a.repeats = 800, 16, 50, 4, 200, 1
    emb = screen(a.wells, a.dim, a.genes, a.experiments)
    rng = np.random.default_rng(1)
    names = np.array([f"G{i:05d}" for i in range(a.genes)])
    pairs = pd.DataFrame({"gene_a": rng.choice(names, a.pairs), "gene_b": rng.choice(names, a.pairs)})
    times: dict[str, list[float]] = {}

    def timed(name, fn):
        t0 = time.perf_counter()
        out = fn()
        times.setdefault(name, []).append(time.perf_counter() - t0)
        return out

    for _ in range(a.repeats):
        corrected = timed("TVN (correct(emb, 'tvn'))", lambda: correct(emb, "tvn"))
        genes, x = timed("recall: gene means (gene_embeddings)", lambda: gene_embeddings(corrected))
        cos = timed("recall: gene×gene cosine (cosine_matrix)", lambda: cosine_matrix(x))
        res = timed("recall: null + pairs (pair_recall)", lambda: pair_recall(genes, cos, pairs))
    rows = [[k, f"{median(v):.2f}"] for k, v in times.items()]
    rows.append(["**total**", f"{sum(median(v) for v in times.values()):.2f}"])
    print(f"# machine: {machine()}")
    print(f"# {a.wells:,} wells × {a.dim:,} features, {a.experiments} experiments, {len(genes):,} genes, "
          f"{res['n_pairs']:,} pairs present, null of {res['n_null']:,} cosines; median of {a.repeats}")
    print(table(["stage", "seconds"], rows))


if __name__ == "__main__":
    main()
