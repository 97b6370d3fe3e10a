"""Replicate consistency (docs/benchmarks.md): the statistic, the p-value rule, the null, bad input."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from cellrep.errors import CellrepError
from cellrep.eval.batch_correction import correct
from cellrep.eval.consistency import consistency_table, mean_pairwise_cosine, p_values, replicate_consistency
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


def screen(n_batches=4, controls=6, others=20, control_perturbations=0, seed=0, dim=16):
    """g_strong: the same direction in every batch; g_noise and `others`: random; controls: random."""
    rng = np.random.default_rng(seed)
    direction = rng.standard_normal(dim)
    rows, feats = [], []
    for b in range(n_batches):
        for i in range(controls):
            rows.append((f"E{b}", "EMPTY_control", "negative_control"))
            feats.append(rng.standard_normal(dim))
        for i in range(control_perturbations):
            rows.append((f"E{b}", f"non-targeting-{i}", "negative_control"))
            feats.append(rng.standard_normal(dim))
        rows.append((f"E{b}", "g_strong", "treatment"))
        feats.append(direction + 0.3 * rng.standard_normal(dim))
        rows.append((f"E{b}", "g_noise", "treatment"))
        feats.append(rng.standard_normal(dim))
        for j in range(others):
            rows.append((f"E{b}", f"other{j}", "treatment"))
            feats.append(rng.standard_normal(dim))
    meta = pd.DataFrame(rows, columns=["experiment", "perturbation", "well_type"])
    return Embeddings(meta, np.array(feats))


def test_consistent_perturbation_beats_random_wells_of_its_batches():
    table, null = consistency_table(screen(), null_samples=500)
    assert null["null"] == "random_treatment_wells_same_batches" and len(table) == 22
    p = dict(zip(table["perturbation"], table["p"]))
    assert p["g_strong"] < 0.01 and p["g_noise"] > 0.05
    assert (table["p"] < 0.05).mean() < 0.25  # random perturbations: about 5%


def test_negative_control_perturbations_form_the_null_when_there_are_enough():
    out = replicate_consistency(screen(control_perturbations=25), null_samples=100)
    assert out["null"] == "negative_control_perturbations" and out["null_size"] == 26  # + EMPTY_control
    few = replicate_consistency(screen(control_perturbations=5), null_samples=100)
    assert few["null"] == "random_treatment_wells_same_batches"


def test_random_embeddings_after_tvn_are_not_called_consistent():
    # the correction is fitted on the untreated controls: the null must not come from them
    emb = screen(controls=6, others=40, dim=64)
    random = emb.with_features(np.random.default_rng(1).standard_normal(emb.features.shape))
    out = replicate_consistency(correct(random, "tvn"), null_samples=500)
    assert out["frac_p_lt_0.05"] < 0.15


def test_compound_doses_are_separate_perturbations():
    emb = screen(others=0)
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
