"""Relationship recall (docs/benchmarks.md) against hand-computed answers, random embeddings and bad inputs."""

from __future__ import annotations

import time

import numpy as np
import pandas as pd
import pytest

from cellrep.annotations import load_pairs
from cellrep.errors import CellrepError
from cellrep.eval.embeddings import Embeddings
from cellrep.eval.recall import cosine_matrix, gene_embeddings, pair_recall, recall_benchmark

GENES = np.array(["A", "B", "C", "D", "E"])
# upper triangle (A-B, A-C, A-D, A-E, B-C, B-D, B-E, C-D, C-E, D-E): N = 10 null values
UPPER = [-0.9, 0.1, 0.3, 0.95, -0.5, 0.1, 0.0, 0.5, 0.8, -0.2]


def cos_from_upper(values, n=5):
    cos = np.eye(n)
    iu = np.triu_indices(n, k=1)
    cos[iu] = values
    cos.T[iu] = values
    return cos


def pairs(*rows):
    return pd.DataFrame(rows, columns=["gene_a", "gene_b"])


def test_two_sided_rule_by_hand():
    cos = cos_from_upper(UPPER)
    # A-B = -0.9 (lowest: r_lo = 1/10), A-E = 0.95 (highest: r_hi = 9/10), C-E = 0.8 (r_hi = 8/10), A-C = 0.1 (tie)
    result = pair_recall(
        GENES,
        cos,
        pairs(("A", "B"), ("A", "E"), ("C", "E"), ("A", "C")),
        thresholds=[(0.1, 0.9), (0.05, 0.95), (0.2, 0.8)],
    )
    assert result["n_pairs"] == 4 and result["n_null"] == 10
    assert result["0.1/0.9"] == pytest.approx(2 / 4)  # both tails count
    assert result["0.05/0.95"] == 0.0  # 1/10 > 0.05 and 9/10 < 0.95
    assert result["0.2/0.8"] == pytest.approx(3 / 4)  # C-E: r_hi = 8/10 >= 0.8


def test_ties_use_right_side_low_and_left_side_high():
    # two lowest values tie at -0.5: a pair at -0.5 has r_lo = searchsorted(right) = 2/10 -> not in the 10% tail
    upper = [-0.5, -0.5, 0.0, 0.1, 0.2, 0.3, 0.4, 0.6, 0.7, 0.7]
    cos = cos_from_upper(upper)
    low = pair_recall(GENES, cos, pairs(("A", "B")), thresholds=[(0.1, 0.9), (0.2, 0.8)])
    assert low["0.1/0.9"] == 0.0 and low["0.2/0.8"] == 1.0
    # two highest tie at 0.7 (C-E, D-E): r_hi = searchsorted(left) = 8/10 -> recalled at 0.8, not at 0.9
    high = pair_recall(GENES, cos, pairs(("C", "E")), thresholds=[(0.1, 0.9), (0.2, 0.8)])
    assert high["0.1/0.9"] == 0.0 and high["0.2/0.8"] == 1.0


def test_pairs_deduplicated_self_pairs_and_absent_genes_dropped():
    cos = cos_from_upper(UPPER)
    result = pair_recall(
        GENES, cos, pairs(("A", "B"), ("B", "A"), ("A", "A"), ("A", "Z"), ("E", "A")), thresholds=[(0.1, 0.9)]
    )
    assert result["n_pairs"] == 2  # A-B and A-E
    assert result["0.1/0.9"] == 1.0


def test_random_embeddings_recall_about_ten_percent():
    string = load_pairs("StringDB")
    genes = np.unique(np.r_[string["gene_a"].to_numpy(), string["gene_b"].to_numpy()])[:1500]
    x = np.random.default_rng(0).standard_normal((len(genes), 32))
    result = pair_recall(genes, cosine_matrix(x), string)
    assert result["n_pairs"] > 1000
    assert result["0.05/0.95"] == pytest.approx(0.10, abs=0.025)
    assert result["0.1/0.9"] == pytest.approx(0.20, abs=0.035)


def test_vectorized_over_thousands_of_genes():
    string = load_pairs("StringDB")
    genes = np.unique(np.r_[string["gene_a"].to_numpy(), string["gene_b"].to_numpy()])[:3000]
    cos = cosine_matrix(np.random.default_rng(1).standard_normal((len(genes), 16)))
    start = time.perf_counter()
    result = pair_recall(genes, cos, string)
    assert result["n_pairs"] > 5000
    assert time.perf_counter() - start < 5.0  # a Python loop over pairs and the null would not be


def _wells(genes, dim=8, seed=0, guide=False):
    rng = np.random.default_rng(seed)
    names = [f"{g}_guide_{i}" if guide else g for g in genes for i in (1, 2)]
    meta = pd.DataFrame(
        {"experiment": "E1", "perturbation": names, "well_type": "treatment", "perturbation_type": "CRISPR"}
    )
    return Embeddings(meta, rng.standard_normal((len(names), dim)))


def test_guides_pool_into_their_gene():
    emb = _wells(["TP53", "MDM2"], guide=True)
    genes, x = gene_embeddings(emb)
    assert list(genes) == ["MDM2", "TP53"]
    np.testing.assert_allclose(x[1], emb.features[:2].mean(axis=0), rtol=1e-6)


def test_wrong_columns_in_annotation_file(tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("gene1,gene2\nTP53,MDM2\n")
    with pytest.raises(CellrepError, match="entity1,entity2"):
        recall_benchmark(_wells(["TP53", "MDM2", "ATM"]), [str(bad)])


def test_no_annotated_gene_present(tmp_path):
    with pytest.raises(CellrepError, match="no annotation source has a pair"):
        recall_benchmark(_wells(["NOTAGENE1", "NOTAGENE2", "NOTAGENE3"]), ["StringDB"])


def test_source_without_pairs_is_reported_skipped_when_another_has_them(tmp_path):
    custom = tmp_path / "mine.txt"
    custom.write_text("entity1,entity2\nTP53,MDM2\n")
    empty = tmp_path / "other.txt"
    empty.write_text("entity1,entity2\nFOO,BAR\n")
    out = recall_benchmark(_wells(["TP53", "MDM2", "ATM"]), [str(custom), str(empty)])
    assert out["mine"]["n_pairs"] == 1
    assert out["other"]["n_pairs"] == 0 and "skipped" in out["other"]
