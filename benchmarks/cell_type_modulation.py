"""How new is a gene's phenotype in a cell type never seen in training? (docs/data.md, "Cell-type modulation")

For each strength m of ``data.synthetic.cell_type_modulation`` on the de novo layout
(``experiment=kg_fewshot``: 4 cell types, 24 genes in 6 modules), over screen seeds, cosines of

  planted   the generator's effect vectors T_c · shift
  profile   a gene's mean site morphology z in one cell type minus that type's control mean
            (so batch effects and noise are in)

for the same gene in two cell types and for module mates within one cell type, and how often the
held-out cell type's (last) profile of a gene has, as nearest of the other types' mean profiles,
the gene itself or a module mate. No images are rendered: z is what the pixels are drawn from.

    python benchmarks/cell_type_modulation.py [--seeds 5] [--strengths 0 0.4 0.8 1.2]
"""

from __future__ import annotations

import argparse
import itertools

import cellrep  # noqa: F401

# isort: split
import numpy as np
from _common import machine, table

import cellrep.data.sources.synthetic as synthetic

# conf/experiment/kg_fewshot.yaml's screen
KG_FEWSHOT = dict(
    cell_types=("HUVEC", "RPE", "HepG2", "U2OS"),
    experiments_per_cell_type=4,
    sites_per_well=3,
    image_size=48,
    num_compounds=2,
    plates_per_experiment=1,
    num_modules=6,
    gene_groups=1,
    rotate_groups=False,
    control_wells_per_plate=4,
    crispr_control_wells_per_plate=0,
    positive_controls=0,
    gene_perturbation_type="siRNA",
)


def _cos(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))


def measure(strength: float, seed: int) -> dict[str, float]:
    spec = synthetic.SyntheticScreenSpec(**KG_FEWSHOT, seed=seed, cell_type_modulation=strength)
    planned = synthetic.plan_screen(spec)
    bio, sites, transforms = planned.biology, planned.sites, planned.transforms
    z = synthetic.latent_morphology(spec, planned)
    types, genes = spec.cell_types, bio.genes
    of_type = {c: (sites.cell_type == c).to_numpy() for c in types}
    control = (sites.perturbation_type == "control").to_numpy()
    profile = {}
    for c in types:
        base = z[of_type[c] & control].mean(0)
        for g in genes:
            profile[g, c] = z[of_type[c] & (sites.sirna == g).to_numpy()].mean(0) - base
    effect = {(g, c): bio.gene_shift[g] if transforms[c] is None else transforms[c] @ bio.gene_shift[g]
              for g in genes for c in types}  # fmt: skip
    type_pairs = list(itertools.combinations(types, 2))
    mates = [(g, h) for module in bio.modules for g, h in itertools.combinations(module, 2)]
    out = {}
    for name, vectors in (("planted", effect), ("profile", profile)):
        out[f"same gene, two types ({name})"] = np.mean(
            [_cos(vectors[g, a], vectors[g, b]) for g in genes for a, b in type_pairs]
        )
        out[f"module mates, one type ({name})"] = np.mean(
            [_cos(vectors[g, c], vectors[h, c]) for g, h in mates for c in types]
        )
    held, seen = types[-1], types[:-1]
    ref = np.stack([np.mean([profile[g, c] for c in seen], 0) for g in genes])
    query = np.stack([profile[g, held] for g in genes])
    ref /= np.linalg.norm(ref, axis=1, keepdims=True)
    query /= np.linalg.norm(query, axis=1, keepdims=True)
    nearest = (query @ ref.T).argmax(1)
    out[f"{held} nearest is the gene"] = float(np.mean(nearest == np.arange(len(genes))))
    out[f"{held} nearest is a module mate or the gene"] = float(
        np.mean([bio.module_of(genes[n]) == bio.module_of(g) for n, g in zip(nearest, genes)])
    )
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, default=5, help="screen seeds 0..N-1")
    p.add_argument("--strengths", type=float, nargs="+", default=[0.0, 0.4, 0.8, 1.2])
    args = p.parse_args()
    header, rows = None, []
    for m in args.strengths:
        runs = [measure(m, s) for s in range(args.seeds)]
        header = ["m", *runs[0]]
        ddof = 1 if len(runs) > 1 else 0  # one seed: no spread, shown as 0
        cells = [
            f"{np.mean([r[k] for r in runs]):.2f} ± {np.std([r[k] for r in runs], ddof=ddof):.2f}" for k in runs[0]
        ]
        rows.append([f"{m:g}", *cells])
    print(f"{machine()}; mean ± std over screen seeds 0–{args.seeds - 1}\n")
    print(table(header, rows))


if __name__ == "__main__":
    main()
