"""Replicate consistency (DESIGN §5): the statistic, the p-value rule, the null, bad input."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from cellrep.errors import CellrepError
from cellrep.eval.consistency import mean_pairwise_cosine, p_values, replicate_consistency
from cellrep.eval.embeddings import Embeddings


def test_mean_pairwise_cosine_by_hand():
    u = np.array([[1.0, 0.0], [0.0, 1.0], [1 / np.sqrt(2), 1 / np.sqrt(2)]])
    # pairs: 0, 1/√2, 1/√2
    assert mean_pairwise_cosine(u) == pytest.approx((2 / np.sqrt(2)) / 3)
    assert mean_pairwise_cosine(u[:2]) == pytest.approx(0.0)


def test_p_value_is_one_minus_rank_in_sorted_null():
    null = np.array([0.1, 0.2, 0.2, 0.5])
    # rank = number of null values below the statistic (searchsorted left)
    np.testing.assert_allclose(p_values(np.array([0.05, 0.2, 0.3, 0.6]), null), [1.0, 0.75, 0.25, 0.0])


def screen(n_batches=4, controls=6, with_controls=True, seed=0, dim=16):
    """g_strong: the same direction in every batch; g_noise: random; controls: random."""
    rng = np.random.default_rng(seed)
    direction = rng.standard_normal(dim)
    rows, feats = [], []
    for b in range(n_batches):
        for i in range(controls if with_controls else 0):
            rows.append(("E%d" % b, "EMPTY_control", "negative_control"))
            feats.append(rng.standard_normal(dim))
        rows.append(("E%d" % b, "g_strong", "treatment"))
        feats.append(direction + 0.3 * rng.standard_normal(dim))
        rows.append(("E%d" % b, "g_noise", "treatment"))
        feats.append(rng.standard_normal(dim))
        for j in range(3 if not with_controls else 0):
            rows.append(("E%d" % b, f"other{j}", "treatment"))
            feats.append(rng.standard_normal(dim))
    meta = pd.DataFrame(rows, columns=["experiment", "perturbation", "well_type"])
    return Embeddings(meta, np.array(feats))


def test_consistent_perturbation_beats_the_control_null():
    out = replicate_consistency(screen(), null_samples=500)
    assert out["n_perturbations"] == 2
    assert out["frac_p_lt_0.05"] == pytest.approx(0.5)  # g_strong yes, g_noise no
    assert out["null"] == {"negative_control": 2, "random_wells": 0}


def test_random_wells_of_the_same_batches_when_there_are_no_controls():
    out = replicate_consistency(screen(with_controls=False), null_samples=500)
    assert out["null"]["random_wells"] == out["n_perturbations"] == 5


def test_compound_doses_are_separate_perturbations():
    emb = screen()
    meta = emb.meta.copy()
    meta["concentration"] = np.nan
    noise = np.flatnonzero(meta["perturbation"] == "g_noise")
    meta.loc[noise, "concentration"] = [0.1, 1.0] * (len(noise) // 2)
    out = replicate_consistency(Embeddings(meta, emb.features), null_samples=100)
    assert out["n_perturbations"] == 3  # g_strong, g_noise@0.1, g_noise@1.0


def test_fewer_than_two_replicates_is_a_clear_error():
    emb = screen(n_batches=1)
    with pytest.raises(CellrepError, match="at least 2 replicate wells"):
        replicate_consistency(emb)
