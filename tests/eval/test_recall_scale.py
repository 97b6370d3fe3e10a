"""Genome-scale recall (cellrep.eval.recall) equals the straightforward float64 full-matrix computation.

The package never builds the G × G matrix nor sorts the null: it selects the few order statistics the
rank rule needs, block by block, from float32 cosines, and decides every comparison with float64
cosines. The reference below is the definition of docs/benchmarks.md written out naively (full float64
matrix, sorted upper triangle, two ``searchsorted``). Recall fractions must be equal exactly (they are
counts over pairs); order statistics to 1e-12 (the two compute a float64 cosine with different
summation orders, ~1e-16 apart; float32 never decides).
"""

from __future__ import annotations

import tracemalloc

import numpy as np
import pandas as pd
import pytest

import cellrep.eval.recall as recall
from cellrep.eval.embeddings import Embeddings
from cellrep.eval.recall import THRESHOLDS, gene_embeddings, pair_recall, recall_benchmark, threshold_key

CURVE = [(q, round(1.0 - q, 12)) for q in (0.01, 0.02, 0.2, 0.3, 0.4)]
# the configured thresholds, the curve's, and edge cases of the rank rule (empty and full tails)
ALL = [*THRESHOLDS, *CURVE, (0.0, 1.0), (0.5, 0.5), (0.001, 0.999), (-0.1, 1.1), (1.0, 0.0)]


def unit_of(x: np.ndarray) -> np.ndarray:
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.where(norm > 0, norm, 1.0)


def blas_cosines(x: np.ndarray) -> np.ndarray:
    unit = unit_of(x)
    return unit @ unit.T


def row_cosines(x: np.ndarray) -> np.ndarray:
    """The full float64 matrix summed row by row (numpy's pairwise sum over the D products), the
    summation order the package uses for the float64 cosines that decide."""
    unit = unit_of(x)
    return np.stack([(unit[i] * unit).sum(axis=1) for i in range(len(unit))])


def reference_recall(cos: np.ndarray, ab: np.ndarray, thresholds) -> tuple[dict, np.ndarray]:
    """docs/benchmarks.md, naively: the full float64 matrix, its sorted upper triangle, searchsorted."""
    null = np.sort(cos[np.triu_indices(len(cos), k=1)])
    q = cos[ab[:, 0], ab[:, 1]]
    r_lo = np.searchsorted(null, q, side="right") / len(null)
    r_hi = np.searchsorted(null, q, side="left") / len(null)
    return {threshold_key(lo, hi): float(np.mean((r_lo <= lo) | (r_hi >= hi))) for lo, hi in thresholds}, null


def wells(x: np.ndarray) -> Embeddings:
    """One treatment well per gene, so the gene means are the rows of x (as float32 wells)."""
    meta = pd.DataFrame(
        {
            "experiment": "E1",
            "perturbation": [f"G{i:05d}" for i in range(len(x))],
            "well_type": "treatment",
            "perturbation_type": "CRISPR",
        }
    )
    return Embeddings(meta, x.astype(np.float32))


def boundary_pairs(cos: np.ndarray, thresholds, per_side: int = 30) -> np.ndarray:
    """The gene pairs whose float64 cosines rank next to each threshold's order statistics: the pairs
    float32 rounding would misplace first."""
    iu = np.triu_indices(len(cos), k=1)
    order = np.argsort(cos[iu], kind="stable")
    n = len(order)
    ranks = []
    for lo, hi in thresholds:
        k_lo, k_hi = recall._rank_cuts(lo, hi, n)
        ranks += [k_lo, k_hi - 1]
    pick = np.unique(np.clip(np.concatenate([np.arange(k - per_side, k + per_side) for k in ranks]), 0, n - 1))
    return np.stack([iu[0][order[pick]], iu[1][order[pick]]], axis=1)


def as_frame(ab: np.ndarray) -> pd.DataFrame:
    return pd.DataFrame({"gene_a": [f"G{i:05d}" for i in ab[:, 0]], "gene_b": [f"G{i:05d}" for i in ab[:, 1]]})


def check_equal(x_wells: np.ndarray, ab: np.ndarray, thresholds=ALL, blas_thresholds=None) -> dict:
    """recall_benchmark (blocks, float32 then float64) and pair_recall (a given matrix) against the
    reference, on the same gene matrix and pairs, for the matrix summed row by row and for BLAS's.

    recall_benchmark equals BLAS's matrix at ``blas_thresholds`` (default: all): where two cosines
    differ by float64 summation-order rounding alone, which one is larger is that order's choice.
    """
    emb = wells(x_wells)
    genes, x = gene_embeddings(emb)
    pairs = as_frame(ab)
    ab = np.unique(np.sort(ab, axis=1), axis=0)
    ab = ab[ab[:, 0] != ab[:, 1]]
    got = recall_benchmark(emb, {"pairs": pairs}, thresholds)["pairs"]
    assert got["n_pairs"] == len(ab)
    assert got["n_null"] == len(x) * (len(x) - 1) // 2  # upper triangle, no diagonal
    for cos, keys in ((row_cosines(x), thresholds), (blas_cosines(x), blas_thresholds or thresholds)):
        want, _ = reference_recall(cos, ab, thresholds)
        from_matrix = pair_recall(genes, cos, pairs, thresholds)
        assert from_matrix["n_pairs"] == len(ab)
        for lo, hi in thresholds:
            key = threshold_key(lo, hi)
            assert from_matrix[key] == want[key], (key, from_matrix[key], want[key])  # exact: counts
            if (lo, hi) in keys:
                assert got[key] == want[key], (key, got[key], want[key])
    return got


@pytest.fixture(params=["kept", "recomputed"])
def small_blocks(request, monkeypatch):
    """Many row blocks (some one row high), as at genome scale; pass 2 reads the float32 cosines
    kept from pass 1 (up to ~23,000 genes) or multiplies again (beyond)."""
    monkeypatch.setattr(recall, "_BLOCK", 4096)
    monkeypatch.setattr(recall, "_ROWS", 7)
    if request.param == "recomputed":
        monkeypatch.setattr(recall, "_KEEP", 0)


def near_tie_genes(rng: np.random.Generator) -> np.ndarray:
    """Genes whose cosines form clusters of values 1e-8 apart: distinct in float64, below float32's
    resolution. 600 genes live in 8 dimensions; 100 more are v + ε_i·e_(8+i) with ε_i = 1 + i·2⁻²³, so
    each of the 600 has a cosine with every one of the 100 that differs only through ε_i (exact in the
    float32 wells). A quarter of the null sits in such clusters, so most thresholds' order statistics do.
    """
    x = np.zeros((700, 256))
    x[:600, :8] = rng.standard_normal((600, 8))
    v = rng.standard_normal(8)
    x[600:, :8] = v / np.linalg.norm(v)
    x[600 + np.arange(100), 8 + np.arange(100)] = 1.0 + np.arange(100) * 2.0**-23
    return x


def test_random_embeddings_equal_reference_at_boundary_pairs(small_blocks):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1200, 256)).astype(np.float32).astype(np.float64)
    ab = np.concatenate([boundary_pairs(blas_cosines(x), ALL), rng.integers(0, len(x), (3000, 2))])
    got = check_equal(x, ab)
    assert 0.0 < got["0.05/0.95"] < 1.0


def test_near_ties_below_float32_resolution_equal_reference(small_blocks):
    rng = np.random.default_rng(5)
    x = near_tie_genes(rng).astype(np.float32).astype(np.float64)
    ab = boundary_pairs(blas_cosines(x), ALL, per_side=3)
    check_equal(x, np.concatenate([ab, rng.integers(0, 700, (500, 2))]))


def test_float32_cosines_alone_would_not_be_identical():
    """Broken-pipeline control: the same rule on float32 cosines (no float64 decision) gives other
    recall on the near ties, so the equality tests can fail."""
    rng = np.random.default_rng(5)
    x = near_tie_genes(rng).astype(np.float32).astype(np.float64)
    ab = boundary_pairs(blas_cosines(x), ALL, per_side=3)
    want, _ = reference_recall(blas_cosines(x), ab, ALL)
    u32 = unit_of(x).astype(np.float32)
    cos32 = u32 @ u32.T
    null32 = np.sort(cos32[np.triu_indices(len(x), k=1)])
    q = cos32[ab[:, 0], ab[:, 1]]
    r_lo, r_hi = (np.searchsorted(null32, q, side=s) / len(null32) for s in ("right", "left"))
    naive = {threshold_key(lo, hi): float(np.mean((r_lo <= lo) | (r_hi >= hi))) for lo, hi in ALL}
    assert naive != want  # (one threshold differs with this seed: a pair float32 ties with the cut)


def test_ties_from_duplicate_genes_and_discrete_cosines(small_blocks):
    rng = np.random.default_rng(1)
    # 4 entries of ±1 among 16: unit entries ±0.5, so every cosine is an exact multiple of 1/16 and the
    # null is a few huge tie groups; every order statistic falls inside one
    discrete = np.zeros((150, 16))
    for row in discrete:
        row[rng.choice(16, 4, replace=False)] = rng.choice([-1.0, 1.0], 4)
    # continuous genes, each present 3 times (identical wells: ties at arbitrary values, cos ≈ 1 pairs
    # in the null), and a zero vector (cosine 0 with everything)
    base = rng.standard_normal((60, 16))
    x = np.concatenate([discrete, np.repeat(base, 3, axis=0), np.zeros((1, 16))])
    ab = np.concatenate([rng.integers(0, len(x), (4000, 2)), np.stack([np.arange(150, 329, 3)] * 2, 1) + [0, 1]])
    # the 180 self-cosines of the triplicated genes are the top of the null, all 1 ± a few ulps: the
    # 0.999 cut falls among them, where summation order alone ranks them (row sums: exact there too)
    got = check_equal(x, ab, blas_thresholds=[t for t in ALL if t != (0.001, 0.999)])
    assert got["n_pairs"] > 3000


def test_planted_modules_are_recalled_and_equal_reference(small_blocks):
    rng = np.random.default_rng(2)
    modules = rng.standard_normal((40, 64))
    member = rng.integers(0, 40, 800)
    x = modules[member] + 0.6 * rng.standard_normal((800, 64))
    same = [(i, j) for i in range(800) for j in range(i + 1, 800) if member[i] == member[j]]
    mates = np.array(same)[rng.choice(len(same), 2000, replace=False)]
    got = check_equal(x, np.concatenate([mates, rng.integers(0, 800, (2000, 2))]))
    assert got["0.05/0.95"] > 0.4  # module mates sit in the upper tail: the benchmark sees the biology


def test_order_statistics_equal_sorted_null(small_blocks):
    rng = np.random.default_rng(3)
    x = rng.standard_normal((700, 256))
    x[5] = x[9]  # a duplicate gene
    unit = x / np.linalg.norm(x, axis=1, keepdims=True)
    cos = unit @ unit.T
    null_ref = np.sort(cos[np.triu_indices(len(x), k=1)])
    ranks = [0, 1, 7, len(null_ref) // 2, len(null_ref) - 2, len(null_ref) - 1, *rng.integers(0, len(null_ref), 20)]
    from_unit = recall._Null(len(x), unit=unit).cuts(ranks)
    from_matrix = recall._Null(len(x), cos=cos).cuts(ranks)
    for k in ranks:
        assert from_matrix[k] == null_ref[k]  # the matrix's own values: bit-equal
        assert from_unit[k] == pytest.approx(null_ref[k], abs=1e-12)  # float64, another summation order


@pytest.mark.parametrize("n", [1, 2, 3, 10, 20, 99, 100, 4950])
def test_rank_cuts_match_searchsorted_fractions(n):
    """k ≤ k_lo ⇔ k/n ≤ lo and k ≥ k_hi ⇔ k/n ≥ hi for every count k, with the reference's divisions."""
    counts = np.arange(n + 1)
    for lo in (0.0, 0.01, 0.05, 0.1, 1 / 3, 0.3, 0.5, 0.7, 1.0, -0.1, 1.5):
        hi = round(1.0 - lo, 12)
        k_lo, k_hi = recall._rank_cuts(lo, hi, n)
        np.testing.assert_array_equal(counts <= k_lo, counts / n <= lo)
        np.testing.assert_array_equal(counts >= k_hi, counts / n >= hi)


def test_memory_stays_blockwise(monkeypatch):
    """recall_benchmark on 3,000 genes never holds a G × G float64 matrix (72 MB) or the null (36 MB)
    when the float32 null is not to be kept (past _KEEP bytes, ~23,000 genes by default)."""
    monkeypatch.setattr(recall, "_BLOCK", 1 << 16)
    monkeypatch.setattr(recall, "_KEEP", 0)
    rng = np.random.default_rng(4)
    x = rng.standard_normal((3000, 32))
    emb, pairs = wells(x), as_frame(rng.integers(0, 3000, (5000, 2)))
    tracemalloc.start()
    try:
        res = recall_benchmark(emb, {"pairs": pairs}, ALL)["pairs"]
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert res["n_null"] == 3000 * 2999 // 2
    assert peak < 12e6, f"peak {peak / 1e6:.1f} MB"


def test_non_finite_cosine_matrix_is_refused():
    cos = np.eye(3)
    cos[0, 2] = cos[2, 0] = np.nan
    with pytest.raises(recall.CellrepError, match="NaN"):
        pair_recall(np.array(["A", "B", "C"]), cos, pd.DataFrame({"gene_a": ["A"], "gene_b": ["B"]}))
