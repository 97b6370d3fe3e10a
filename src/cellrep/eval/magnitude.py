"""Perturbation magnitude (docs/benchmarks.md "Perturbation magnitude"), as EFAAR defines it
(Celik et al. 2024): how far a perturbation's wells sit from the controls of the same batches,
measured by the energy distance, and whether that is more than a relabelling of the same wells gives.

For a perturbation with wells A (m of them) and the negative-control wells B of the experiments
its wells are in (at most ``max_controls`` per experiment, a seeded subsample above that):

    E(A, B) = 2·mean_{a∈A, b∈B} ‖a − b‖ − mean_{a,a'∈A} ‖a − a'‖ − mean_{b,b'∈B} ‖b − b'‖

(the V-statistic: the means include i = j, as ``dcor.energy_distance`` computes it). The null
relabels the pooled wells: ``null_samples`` random m-subsets of A ∪ B play A, and
``p = (1 + #{E_null ≥ E}) / (1 + null_samples)``. The control–control distances are computed once
for all controls used and indexed per perturbation; each permutation costs O(m²).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from cellrep.errors import CellrepError
from cellrep.eval.embeddings import Embeddings
from cellrep.eval.map import perturbation_label
from cellrep.eval.scores import pairwise_distances


def _cross(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    d2 = np.einsum("ij,ij->i", a, a)[:, None] + np.einsum("ij,ij->i", b, b)[None, :] - 2.0 * (a @ b.T)
    return np.sqrt(np.clip(d2, 0.0, None))


def energy_distance(a: np.ndarray, b: np.ndarray) -> float:
    """E(A, B) with the means over all pairs (V-statistic)."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    return float(2.0 * _cross(a, b).mean() - pairwise_distances(a).mean() - pairwise_distances(b).mean())


def _energy_from_pooled(dist: np.ndarray, sets: np.ndarray) -> np.ndarray:
    """E for each row of ``sets`` (indices into the pooled wells playing A; the rest play B)."""
    n_all, m = len(dist), sets.shape[1]
    n = n_all - m
    total = dist.sum()
    rows = dist.sum(axis=1)
    s_aa = dist[sets[:, :, None], sets[:, None, :]].sum(axis=(1, 2))
    s_ab = rows[sets].sum(axis=1) - s_aa
    s_bb = total - s_aa - 2.0 * s_ab
    return 2.0 * s_ab / (m * n) - s_aa / (m * m) - s_bb / (n * n)


class _Pooled:
    """The distance matrix of A ∪ B (A first) without building it: A–A, A–B blocks and the B–B block as
    rows of the shared control-distance matrix. :meth:`energy` equals :func:`_energy_from_pooled`."""

    def __init__(self, aa, ac, control_dist, cpos, cc_rows):
        self.aa, self.ac, self.cd, self.cpos = aa, ac, control_dist, cpos
        self.m, self.n = ac.shape
        self.rows = np.r_[aa.sum(axis=1) + ac.sum(axis=1), cc_rows + ac.sum(axis=0)]
        self.total = float(self.rows.sum())

    def lookup(self, p: np.ndarray, q: np.ndarray) -> np.ndarray:
        """Distances between pooled items ``p`` and ``q`` (same-shape index arrays)."""
        m, out = self.m, np.empty(p.shape)
        pa, qa = p < m, q < m
        both, first, second, none = pa & qa, pa & ~qa, ~pa & qa, ~pa & ~qa
        out[both] = self.aa[p[both], q[both]]
        out[first] = self.ac[p[first], q[first] - m]
        out[second] = self.ac[q[second], p[second] - m]
        out[none] = self.cd[self.cpos[p[none] - m], self.cpos[q[none] - m]]
        return out

    def energy(self, sets: np.ndarray) -> np.ndarray:
        m, n = self.m, self.n
        i, j = np.triu_indices(sets.shape[1], k=1)
        s_aa = 2.0 * self.lookup(sets[:, i], sets[:, j]).sum(axis=1)  # both orders; the diagonal is 0
        s_ab = self.rows[sets].sum(axis=1) - s_aa
        s_bb = self.total - s_aa - 2.0 * s_ab
        return 2.0 * s_ab / (m * n) - s_aa / (m * m) - s_bb / (n * n)


def random_subsets(rng: np.random.Generator, n: int, m: int, count: int) -> np.ndarray:
    """``count`` uniformly random m-subsets of range(n) (rows of distinct indices), O(count·m):
    draw with replacement, redraw the rows that repeat an index (rare when m ≪ n)."""
    if 2 * m > n:  # dense subsets: a permutation per row
        return np.argsort(rng.random((count, n)), axis=1)[:, :m]
    out = rng.integers(0, n, size=(count, m))
    while True:
        s = np.sort(out, axis=1)
        bad = np.flatnonzero((s[:, 1:] == s[:, :-1]).any(axis=1)) if m > 1 else np.array([], dtype=int)
        if len(bad) == 0:
            return out
        out[bad] = rng.integers(0, n, size=(len(bad), m))


def magnitude_table(emb: Embeddings, null_samples: int = 1000, max_controls: int = 200, seed: int = 0) -> pd.DataFrame:
    """Per perturbation (``perturbation@concentration`` for doses): n_wells, n_controls, energy, p."""
    meta = emb.meta
    wt = meta["well_type"].astype(str).to_numpy()
    control = wt == "negative_control"
    if not control.any():
        raise CellrepError("magnitude needs negative-control wells", fix="mark them with well_type=negative_control")
    rng = np.random.default_rng(seed)
    x = emb.features.astype(np.float64)
    batch = emb.batch
    controls = {}
    for b in np.unique(batch):
        rows = np.flatnonzero(control & (batch == b))
        controls[b] = np.sort(rng.choice(rows, size=max_controls, replace=False)) if len(rows) > max_controls else rows
    treated = wt == "treatment"
    label = perturbation_label(meta).to_numpy()
    groups = pd.Series(np.flatnonzero(treated)).groupby(label[treated], sort=True).agg(list)
    ptype = meta["perturbation_type"].astype(str).to_numpy() if "perturbation_type" in meta else np.full(len(meta), "")
    order = sorted(controls)
    pool = np.concatenate([controls[b] for b in order])  # every control used: their distances once
    position = np.full(len(meta), -1)
    position[pool] = np.arange(len(pool))
    control_dist = pairwise_distances(x[pool])
    pool_batch = np.repeat(np.arange(len(order)), [len(controls[b]) for b in order])
    # to_batch[j, k]: summed distance of pooled control j to the controls of batch k (any signature's row sums)
    to_batch = control_dist @ np.eye(len(order))[pool_batch]
    batch_index = {b: k for k, b in enumerate(order)}
    per_batch = {b: (x[rows], np.einsum("ij,ij->i", x[rows], x[rows])) for b, rows in controls.items()}
    out = []
    for name, rows in groups.items():
        rows = np.asarray(rows)
        signature = tuple(sorted(set(batch[rows].tolist())))
        ctrl = np.concatenate([controls[b] for b in signature])
        if len(ctrl) < 2:
            continue
        a = x[rows]
        a_sq = np.einsum("ij,ij->i", a, a)
        aa = pairwise_distances(a)
        ac = np.concatenate(
            [
                np.sqrt(np.clip(a_sq[:, None] + per_batch[b][1][None, :] - 2.0 * (a @ per_batch[b][0].T), 0.0, None))
                for b in signature
            ],
            axis=1,
        )
        cpos = position[ctrl]
        cc_rows = to_batch[cpos][:, [batch_index[b] for b in signature]].sum(axis=1)
        pooled = _Pooled(aa, ac, control_dist, cpos, cc_rows)
        m = len(rows)
        stat = float(pooled.energy(np.arange(m)[None, :])[0])
        null = pooled.energy(random_subsets(rng, m + len(ctrl), m, null_samples))
        p = (1.0 + float((null >= stat - 1e-12).sum())) / (1.0 + null_samples)
        out.append((name, str(ptype[rows[0]]), m, len(ctrl), stat, p))
    return pd.DataFrame(out, columns=["perturbation", "perturbation_type", "n_wells", "n_controls", "energy", "p"])


def magnitude_benchmark(
    emb: Embeddings, null_samples: int = 1000, alpha: float = 0.05, max_controls: int = 200, seed: int = 0
) -> tuple[dict, pd.DataFrame]:
    """Summary (overall and per perturbation type): the fraction with p < alpha and the median energy distance."""
    table = magnitude_table(emb, null_samples, max_controls, seed)
    if table.empty:
        raise CellrepError(
            "magnitude found no treatment wells with controls in their experiments", fix="check well_type"
        )

    def one(t: pd.DataFrame) -> dict:
        return {
            "n": int(len(t)),
            f"frac_p_lt_{alpha:g}": float((t["p"] < alpha).mean()),
            "median_energy": float(t["energy"].median()),
        }

    metrics = {**one(table), "null_samples": int(null_samples), "alpha": alpha}
    if table["perturbation_type"].ne("").any():
        metrics["by_type"] = {k: one(g) for k, g in table.groupby("perturbation_type", sort=True)}
    return metrics, table
