"""1-NN classification (CHAMMI protocol) and perturbation magnitude (energy distance, EFAAR)."""

from __future__ import annotations

from dataclasses import asdict

import numpy as np
import pytest
from planted_wells import planted_screen

from cellrep.config import MagnitudeConfig
from cellrep.eval.embeddings import Embeddings
from cellrep.eval.knn import knn_metrics, macro_f1, nearest_neighbour
from cellrep.eval.magnitude import _energy_from_pooled, energy_distance, magnitude_benchmark
from cellrep.eval.probe import ProbeSettings
from cellrep.eval.scores import pairwise_distances
from cellrep.eval.suite import run_suite


def test_macro_f1_by_hand():
    # a: P=1, R=1/2 -> 2/3; b: P=1/3, R=1 -> 1/2; c: 0
    assert macro_f1(np.array(list("aabc")), np.array(list("abbb"))) == pytest.approx((2 / 3 + 1 / 2 + 0) / 3)
    assert macro_f1(np.array(list("ab")), np.array(list("ab"))) == 1.0


def test_nearest_neighbour_is_cosine():
    train = np.array([[1.0, 0.0], [0.0, 1.0]])
    # (10, 1) is far from (1, 0) in Euclidean distance but its direction is (1, 0)'s
    pred = nearest_neighbour(train, np.array(["x", "y"]), np.array([[10.0, 1.0], [0.1, 0.3]]))
    assert list(pred) == ["x", "y"]
    m = knn_metrics(np.r_[train, [[10.0, 1.0]]], np.array(["x", "y", "x"]), np.array(["train", "train", "test"]))
    assert m == {"knn_top1": 1.0, "knn_macro_f1": 1.0}


def test_energy_distance_by_hand():
    # 2·mean|a−b| − mean|a−a'| − mean|b−b'| = 2·2 − 0 − (0+2+2+0)/4
    assert energy_distance(np.array([[0.0]]), np.array([[1.0], [3.0]])) == pytest.approx(3.0)
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(3, 4)), rng.normal(size=(7, 4))
    pooled = pairwise_distances(np.r_[a, b])
    assert _energy_from_pooled(pooled, np.arange(3)[None, :])[0] == pytest.approx(energy_distance(a, b))
    perm = np.array([[4, 0, 9]])
    rest = np.setdiff1d(np.arange(10), perm[0])
    x = np.r_[a, b]
    assert _energy_from_pooled(pooled, perm)[0] == pytest.approx(energy_distance(x[perm[0]], x[rest]))


def test_magnitude_finds_planted_perturbations_and_not_random_ones():
    emb, _, _ = planted_screen(controls=10, effect=5.0)
    metrics, table = magnitude_benchmark(emb, null_samples=300)
    genes = table[table["perturbation"].str.startswith("G")]
    inactive = table[table["perturbation"].str.startswith("N")]
    assert (genes["p"] < 0.05).mean() > 0.9
    assert (inactive["p"] < 0.05).mean() < 0.5
    assert set(metrics["by_type"]) == {"CRISPR", "COMPOUND"}
    rng = np.random.default_rng(0)
    noise, _ = magnitude_benchmark(Embeddings(emb.meta, rng.normal(size=emb.features.shape)), null_samples=300)
    assert noise["frac_p_lt_0.05"] < 0.2


def test_suite_magnitude_and_skip_without_controls():
    emb, _, _ = planted_screen(controls=4)
    b = {"magnitude": asdict(MagnitudeConfig(null_samples=100))}
    out = run_suite(emb, ["none"], b, ProbeSettings())
    assert "frac_p_lt_0.05" in out.metrics["none"]["magnitude"] and "magnitude_none" in out.tables
    meta = emb.meta.assign(well_type=emb.meta["well_type"].replace("negative_control", "treatment"))
    out = run_suite(Embeddings(meta, emb.features), ["none"], b, ProbeSettings())
    assert "negative-control" in out.skipped["magnitude"]


def test_classification_benchmark_reports_knn_next_to_the_probe():
    emb, _, _ = planted_screen(controls=4, effect=6.0)
    meta = emb.meta.assign(split=np.where(emb.meta["experiment"] == "E3", "test", "train"))
    b = {"classification": {"plate_groups": False, "knn": True}}
    out = run_suite(Embeddings(meta, emb.features), ["none"], b, ProbeSettings(epochs=2, lrs=[1e-2]), progress=False)
    c = out.metrics["none"]["classification"]
    assert c["knn_top1"] > 0.5 > c["chance"]  # planted genes are their own nearest replicates
    assert 0.0 < c["knn_macro_f1"] <= 1.0
    b["classification"]["knn"] = False
    out = run_suite(Embeddings(meta, emb.features), ["none"], b, ProbeSettings(epochs=2, lrs=[1e-2]), progress=False)
    assert "knn_top1" not in out.metrics["none"]["classification"]


def test_pooled_energy_without_the_matrix_equals_the_reference():
    from cellrep.eval.magnitude import _Pooled, random_subsets

    rng = np.random.default_rng(2)
    a, c = rng.normal(size=(3, 5)), rng.normal(size=(9, 5))
    cd = pairwise_distances(c)
    cpos = np.array([7, 1, 4, 0, 8, 2])  # B = six of the nine controls, in this order
    b = c[cpos]
    full = pairwise_distances(np.r_[a, b])
    pooled = _Pooled(full[:3, :3], full[:3, 3:], cd, cpos, cd[np.ix_(cpos, cpos)].sum(axis=1))
    sets = random_subsets(rng, 9, 3, 50)
    assert (np.sort(sets, axis=1)[:, 1:] != np.sort(sets, axis=1)[:, :-1]).all()  # distinct within a set
    np.testing.assert_allclose(pooled.energy(sets), _energy_from_pooled(full, sets))
    assert pooled.energy(np.arange(3)[None, :])[0] == pytest.approx(energy_distance(a, b))
