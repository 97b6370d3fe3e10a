"""Small planted well tables for the mAP, correction and score tests: numpy only, no model.

Every experiment has ``plates`` plates with ``controls`` negative-control wells each. Genes come
in modules (phenotype = module direction + a gene-specific part); each gene has one well per
experiment, on a plate that rotates with the experiment. Compounds copy their target gene's
phenotype (two compounds share a target). ``batch_shift`` adds one random offset per experiment.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from cellrep.eval.embeddings import Embeddings


def planted_screen(
    experiments: int = 4,
    plates: int = 3,
    controls: int = 6,
    modules: int = 5,
    genes_per_module: int = 4,
    inactive_genes: int = 4,
    dim: int = 24,
    effect: float = 3.0,
    batch_shift: float = 0.0,
    seed: int = 0,
) -> tuple[Embeddings, pd.DataFrame, pd.DataFrame]:
    """(wells, annotation pairs gene_a/gene_b of the modules, drug-target table compound/gene/activity_nM)."""
    rng = np.random.default_rng(seed)
    module_dirs = rng.normal(size=(modules, dim))
    genes, phen = [], []
    for m in range(modules):
        for g in range(genes_per_module):
            genes.append(f"G{m}_{g}")
            v = 0.8 * module_dirs[m] + 0.6 * rng.normal(size=dim)
            phen.append(effect * v / np.linalg.norm(v))
    for i in range(inactive_genes):
        genes.append(f"N{i}")
        phen.append(np.zeros(dim))
    compounds = [("CMP0", 0), ("CMP1", 0), ("CMP2", 5), ("CMP3", 9)]  # CMP0 and CMP1 share target G0_0
    rows, feats = [], []
    for e in range(experiments):
        shift = batch_shift * rng.normal(size=dim)
        for p in range(plates):
            base = dict(experiment=f"E{e}", plate=str(p + 1), perturbation_type="control", concentration=np.nan)
            for c in range(controls):
                rows.append({**base, "well": f"c{c}", "perturbation": "EMPTY", "well_type": "negative_control"})
                rows[-1]["target"] = ""
                feats.append(shift + rng.normal(size=dim))
        for i, (gene, v) in enumerate(zip(genes, phen)):
            p = (i + e) % plates
            rows.append(
                dict(
                    experiment=f"E{e}",
                    plate=str(p + 1),
                    well=f"g{i}",
                    perturbation=gene,
                    perturbation_type="CRISPR",
                    well_type="treatment",
                    concentration=np.nan,
                    target="",
                )
            )
            feats.append(shift + v + rng.normal(size=dim))
        for j, (comp, t) in enumerate(compounds):
            for k, conc in enumerate((0.1, 1.0, 10.0)):
                rows.append(
                    dict(
                        experiment=f"E{e}",
                        plate=str((j + e) % plates + 1),
                        well=f"k{j}_{k}",
                        perturbation=comp,
                        perturbation_type="COMPOUND",
                        well_type="treatment",
                        concentration=conc,
                        target=genes[t],
                    )
                )
                feats.append(shift + (conc / 10.0) * phen[t] + rng.normal(size=dim))
    emb = Embeddings(pd.DataFrame(rows), np.asarray(feats, dtype=np.float32))
    pairs = [
        (f"G{m}_{a}", f"G{m}_{b}")
        for m in range(modules)
        for a in range(genes_per_module)
        for b in range(a + 1, genes_per_module)
    ]
    annotation = pd.DataFrame(pairs, columns=["gene_a", "gene_b"])
    table = pd.DataFrame(
        [(c, g, 50.0 if g == genes[t] else 50000.0) for c, t in compounds for g in genes],
        columns=["compound", "gene", "activity_nM"],
    )
    return emb, annotation, table


def shuffled(emb: Embeddings, seed: int = 1) -> Embeddings:
    """The same wells with the treatment wells' metadata permuted among them (a shuffled-label control)."""
    rng = np.random.default_rng(seed)
    meta = emb.meta.copy()
    rows = np.flatnonzero((meta["well_type"] == "treatment").to_numpy())
    cols = ["perturbation", "perturbation_type", "concentration", "target"]
    meta.loc[rows, cols] = meta.loc[rng.permutation(rows), cols].to_numpy()
    return Embeddings(meta, emb.features)
