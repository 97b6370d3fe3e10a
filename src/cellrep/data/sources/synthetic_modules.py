"""The planted biology of the synthetic screen: which genes, which modules, which phenotypes.

Modules are cliques of a real annotation graph (e.g. StringDB), chosen so that
no annotated pair links two different modules: then every annotated pair among
the screen's genes is a pair the embedding *should* place close together, and
relationship recall against the shipped file has a known answer. Each module
has a phenotype direction in morphology space; each gene mixes its module's
direction with a private one (``module_similarity`` sets the mix). A compound
copies its target gene's phenotype (cosine 0.9) scaled by a Hill dose response.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from scipy import sparse

from cellrep.data.schema import NEGATIVE_CONTROL
from cellrep.errors import CellrepError

# The two kinds of negative control of a CRISPR screen, as RxRx3-core names them: untreated wells and
# non-targeting guides. Both have no phenotype here and both anchor normalization (docs/data.md).
CRISPR_CONTROL = "CRISPR_control"
NEGATIVE_CONTROLS = (NEGATIVE_CONTROL, CRISPR_CONTROL)
EFFECT_NORM = 10.0  # length of a gene's phenotype vector at effect_strength=1 (morphology units)
COMPOUND_TARGET_COSINE = 0.9
HILL_SLOPE = 1.5
EC50_RANGE_UM = (0.3, 3.0)  # EC50s sit mid-range so the default doses 0.1/1/10 µM span the curve
POSITIVE_CONTROL_NORM = 1.5  # positive controls are strong on purpose: a plate's assay-works check
POSITIVE_CONTROL_PREFIX = "POSCTRL"


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def select_modules(pairs: pd.DataFrame, num_modules: int, size: int, rng: np.random.Generator) -> list[list[str]]:
    """Pick ``num_modules`` disjoint cliques of ``size`` genes with no annotated edge between cliques.

    Greedy: from a random seed gene, repeatedly add the common neighbour that is
    best connected among the remaining candidates. Genes adjacent to an
    accepted module are blocked so modules stay mutually unannotated.
    """
    first, second = pairs["gene_a"].to_numpy(dtype=str), pairs["gene_b"].to_numpy(dtype=str)
    genes = np.unique(np.concatenate([first, second]))
    a, b = genes.searchsorted(first), genes.searchsorted(second)
    adjacency = sparse.coo_matrix(
        (np.ones(2 * len(a), dtype=np.int32), (np.r_[a, b], np.r_[b, a])), shape=(len(genes), len(genes))
    ).tocsr()
    adjacency.sum_duplicates()
    neighbours = lambda i: adjacency.indices[adjacency.indptr[i] : adjacency.indptr[i + 1]]  # noqa: E731
    degree = np.diff(adjacency.indptr)
    blocked = np.zeros(len(genes), dtype=bool)
    modules: list[list[int]] = []
    for start in rng.permutation(np.flatnonzero(degree >= size - 1)):
        if blocked[start]:
            continue
        members, pool = [int(start)], neighbours(start)
        pool = pool[~blocked[pool]]
        while len(members) < size and pool.size:
            within = np.asarray(adjacency[pool][:, pool].sum(axis=1)).ravel()
            pick = int(pool[np.argmax(within)])
            members.append(pick)
            pool = np.intersect1d(pool, neighbours(pick))  # stay adjacent to every member: a clique
        if len(members) < size:
            continue
        modules.append(sorted(members))
        blocked[members] = True
        for m in members:
            blocked[neighbours(m)] = True
        if len(modules) == num_modules:
            return [[str(genes[i]) for i in m] for m in modules]
    raise CellrepError(
        f"the annotation graph holds only {len(modules)} separable cliques of {size} genes, "
        f"{num_modules} were requested",
        fix="lower num_modules or genes_per_module, or use a denser annotation_source (StringDB, HuMAP)",
    )


def hill(concentration: float, ec50: float, slope: float = HILL_SLOPE) -> float:
    """Fraction of the maximal effect at ``concentration`` (µM)."""
    ratio = (concentration / ec50) ** slope
    return float(ratio / (1.0 + ratio))


@dataclass(frozen=True)
class Compound:
    name: str
    target: str
    ec50_um: float
    max_shift: np.ndarray = field(repr=False)


@dataclass
class Biology:
    """The planted answer: modules, per-gene phenotype shifts, compounds and their targets."""

    modules: list[list[str]]
    gene_shift: dict[str, np.ndarray]
    compounds: list[Compound]
    positive_shift: dict[str, np.ndarray] = field(default_factory=dict)  # positive-control name → shift

    @property
    def positive_controls(self) -> list[str]:
        return list(self.positive_shift)

    @property
    def genes(self) -> list[str]:
        return [g for module in self.modules for g in module]

    def module_of(self, gene: str) -> int:
        return next(i for i, m in enumerate(self.modules) if gene in m)

    def shift(self, perturbation: str, concentration: float) -> np.ndarray:
        """Morphology shift of a perturbation (at a concentration, for compounds)."""
        if perturbation in self.gene_shift:
            return self.gene_shift[perturbation]
        if perturbation in self.positive_shift:
            return self.positive_shift[perturbation]
        for compound in self.compounds:
            if compound.name == perturbation:
                return hill(concentration, compound.ec50_um) * compound.max_shift
        if perturbation in NEGATIVE_CONTROLS:
            return np.zeros_like(next(iter(self.gene_shift.values())))
        raise KeyError(perturbation)

    def modules_table(self) -> pd.DataFrame:
        return pd.DataFrame([(g, i) for i, m in enumerate(self.modules) for g in m], columns=["gene", "module"])

    def targets_table(self, rng: np.random.Generator) -> pd.DataFrame:
        """Drug–target activities: the planted target is potent (10–500 nM); its module mates
        fall in the 1–10 µM grey zone (the DTI benchmark excludes them); every other gene is weak.
        """
        rows = []
        for compound in self.compounds:
            mates = [g for g in self.modules[self.module_of(compound.target)] if g != compound.target]
            for gene in self.genes:
                if gene == compound.target:
                    lo, hi = 1.0, np.log10(500.0)
                elif gene in mates:
                    lo, hi = 3.05, 3.95
                else:
                    lo, hi = 4.1, 5.0
                rows.append((compound.name, gene, round(float(10 ** rng.uniform(lo, hi)), 1)))
        return pd.DataFrame(rows, columns=["compound", "gene", "activity_nM"])

    def describe(self) -> dict:
        return {
            "modules": self.modules,
            "compounds": [
                dict(name=c.name, target=c.target, ec50_uM=round(c.ec50_um, 6), hill_slope=HILL_SLOPE)
                for c in self.compounds
            ],
            "positive_controls": self.positive_controls,
        }


def plan_biology(spec, pairs: pd.DataFrame, num_params: int, rng: np.random.Generator, mask=None) -> Biology:
    """Draw modules, gene phenotypes, compounds and positive controls for ``spec`` (a SyntheticScreenSpec).

    ``mask`` (``num_params``): how much a phenotype may load on each parameter (0: it stays 0; a bool
    mask works too).
    """
    mask = np.ones(num_params) if mask is None else np.asarray(mask, dtype=np.float64)

    def directions(n: int) -> np.ndarray:
        return _unit(rng.standard_normal((n, num_params)) * mask)

    modules = select_modules(pairs, spec.num_modules, spec.genes_per_module, rng)
    genes = [g for m in modules for g in m]
    module_dir = directions(len(modules))
    private = directions(len(genes))
    share = spec.module_similarity
    module_index = np.repeat(np.arange(len(modules)), spec.genes_per_module)
    gene_dir = _unit(np.sqrt(share) * module_dir[module_index] + np.sqrt(1 - share) * private)
    scale = EFFECT_NORM * spec.effect_strength
    gene_shift = {g: scale * gene_dir[i] for i, g in enumerate(genes)}

    width = max(2, len(str(spec.num_compounds)))
    target_order = rng.permutation(len(genes))
    compounds = []
    for j in range(spec.num_compounds):
        t = int(target_order[j % len(genes)])
        own = directions(1)[0]
        direction = _unit(COMPOUND_TARGET_COSINE * gene_dir[t] + np.sqrt(1 - COMPOUND_TARGET_COSINE**2) * own)
        ec50 = float(10 ** rng.uniform(*np.log10(EC50_RANGE_UM)))
        compounds.append(Compound(f"CMPD-{j + 1:0{width}d}", genes[t], ec50, scale * direction))
    # From their own stream, keyed by name like every other draw, so adding positive controls leaves
    # genes and compounds as they were.
    own_rng = np.random.default_rng([int(spec.seed), zlib.crc32(b"positive_controls")])
    positive_dir = _unit(own_rng.standard_normal((spec.positive_controls, num_params)) * mask)
    positive = {
        f"{POSITIVE_CONTROL_PREFIX}-{k + 1:02d}": POSITIVE_CONTROL_NORM * scale * d for k, d in enumerate(positive_dir)
    }
    return Biology(modules, gene_shift, compounds, positive)
