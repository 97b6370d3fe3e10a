"""Correction scores (docs/benchmarks.md "Correction scores"): the formulas on hand-computed cases,
and on a planted pure batch shift every correction's batch-removal score beats none."""

from __future__ import annotations

from dataclasses import asdict

import numpy as np
import pandas as pd
import pytest
from planted_wells import planted_screen
from scipy import sparse

from cellrep.config import CorrectionScoresConfig, MapActivityConfig
from cellrep.eval.probe import ProbeSettings
from cellrep.eval.scores import (
    correction_scores,
    graph_connectivity,
    knn_graph,
    minmax,
    pairwise_distances,
    pcr,
    silhouette_batch,
    silhouette_label,
    silhouette_samples,
)
from cellrep.eval.suite import run_suite


def test_silhouette_by_hand():
    dist = pairwise_distances(np.array([[0.0], [1.0], [5.0]]))
    s = silhouette_samples(dist, np.array(["A", "A", "B"]))
    np.testing.assert_allclose(s, [0.8, 0.75, 0.0])  # (5-1)/5, (4-1)/4, singleton
    assert silhouette_label(dist, np.array(["A", "A", "B"])) == pytest.approx((0.9 + 0.875 + 0.5) / 3)


def test_silhouette_batch_by_hand():
    x = np.array([[0.0], [1.0], [5.0], [6.0], [20.0], [21.0]])
    batch = np.array(["a", "b", "a", "b", "a", "a"])
    labels = np.array(["L", "L", "L", "L", "M", "M"])  # M sits in one batch: left out
    # L: s = (3.5-5)/5, (2.5-5)/5, (2.5-5)/5, (3.5-5)/5 -> 1 - |s| = 0.7, 0.5, 0.5, 0.7
    assert silhouette_batch(pairwise_distances(x), batch, labels) == pytest.approx(0.6)


def test_graph_connectivity_by_hand():
    edges = [(0, 1), (2, 3)]
    g = sparse.coo_matrix(
        (np.ones(4), ([a for a, b in edges] + [b for a, b in edges], [b for a, b in edges] + [a for a, b in edges])),
        shape=(5, 5),
    ).tocsr()
    labels = np.array(["A", "A", "A", "B", "B"])
    assert graph_connectivity(g, labels) == pytest.approx((2 / 3 + 1 / 2) / 2)
    knn = knn_graph(pairwise_distances(np.array([[0.0], [1.0], [10.0], [11.0]])), 1).toarray()
    np.testing.assert_array_equal(knn, [[0, 1, 0, 0], [1, 0, 0, 0], [0, 0, 0, 1], [0, 0, 1, 0]])


def test_lisi_by_hand():
    from cellrep.eval.scores import ilisi, lisi

    dist = 1.0 - np.eye(5)  # equidistant: every weight 1/4 on the 4 neighbours, whatever the bandwidth
    labels = np.array(["a", "a", "b", "b", "b"])
    # a well: 1 a + 3 b neighbours -> 1/((1/4)² + (3/4)²) = 1.6; b well: 2 + 2 -> 2
    np.testing.assert_allclose(lisi(dist, labels, perplexity=4), [1.6, 1.6, 2.0, 2.0, 2.0])
    assert ilisi(dist, labels, perplexity=4) == pytest.approx(1.0)  # (median 2 − 1) / (2 − 1)
    rng = np.random.default_rng(0)
    apart = np.r_[rng.normal(size=(10, 3)), rng.normal(size=(10, 3)) + 100.0]
    assert ilisi(pairwise_distances(apart), np.repeat(["a", "b"], 10), perplexity=2) == pytest.approx(0.0)


def test_clisi_by_hand():
    from cellrep.eval.scores import clisi

    dist = 1.0 - np.eye(5)  # as above: median LISI 2 of 2 labels -> (2 − 2) / (2 − 1) = 0, fully mixed
    assert clisi(dist, np.array(["a", "a", "b", "b", "b"]), perplexity=4) == pytest.approx(0.0)
    rng = np.random.default_rng(0)
    apart = np.r_[rng.normal(size=(10, 3)), rng.normal(size=(10, 3)) + 100.0]
    # every neighbourhood holds one label: LISI 1 -> (2 − 1) / (2 − 1) = 1
    assert clisi(pairwise_distances(apart), np.repeat(["a", "b"], 10), perplexity=2) == pytest.approx(1.0)


def test_lisi_bandwidth_reaches_the_perplexity():
    from cellrep.eval import scores

    rng = np.random.default_rng(1)
    dist = pairwise_distances(rng.normal(size=(200, 4)))
    # with one label per well, 1/Simpson = 1/Σw² is the kernel's effective neighbour count ~ perplexity
    eff = scores.lisi(dist, np.arange(200).astype(str), perplexity=10)
    assert 5.0 < np.median(eff) < 12.0


def test_pcr_by_hand():
    x = np.array([[1.0, 0.5], [1.0, -0.5], [-1.0, 0.5], [-1.0, -0.5]])
    # PC1 = the batch axis (variance share 1/1.25, R² 1), PC2 independent of batch (R² 0)
    assert pcr(x, np.array(["a", "a", "b", "b"])) == pytest.approx(0.8)
    assert pcr(x, np.array(["a", "b", "a", "b"])) == pytest.approx(0.2)


def test_minmax_and_overall_by_hand():
    raw = {
        "none": dict(silhouette_batch=0.2, graph_connectivity=0.5, pcr=0.8, silhouette_label=0.6, map_activity=0.4),
        "a": dict(silhouette_batch=0.8, graph_connectivity=1.0, pcr=0.2, silhouette_label=0.5, map_activity=0.5),
        "b": dict(silhouette_batch=0.5, graph_connectivity=0.5, pcr=0.4, silhouette_label=0.7, map_activity=0.3),
    }
    t = correction_scores(raw).set_index("correction")
    np.testing.assert_allclose(t.loc[["none", "a", "b"], "pcr_batch"], [0.0, 0.75, 0.5])
    np.testing.assert_allclose(t.loc[["none", "a", "b"], "batch"], [0.0, 1.0, (0.5 + 0 + 0.5 / 0.75) / 3])
    np.testing.assert_allclose(t.loc[["none", "a", "b"], "biology"], [0.5, 0.5, 0.5])
    np.testing.assert_allclose(t.loc[["none", "a", "b"], "overall"], [0.3, 0.7, 0.4 * (0.5 + 0.5 / 0.75) / 3 + 0.3])
    assert t["rank"].to_dict() == {"a": 1, "b": 2, "none": 3}
    assert list(minmax(pd.Series([2.0, 2.0]))) == [0.5, 0.5]


@pytest.fixture(scope="module")
def shift_run():
    emb, _, _ = planted_screen(batch_shift=1.0, controls=10, effect=4.0)
    benchmarks = {
        "correction_scores": asdict(CorrectionScoresConfig()),
        "map_activity": {**asdict(MapActivityConfig(null_size=500)), "shuffled_baseline": False},
    }
    methods = ["none", "pca_centerscale", "tvn", "sphering"]
    try:
        import harmonypy  # noqa: F401

        methods.append("harmony")
    except ImportError:
        pass
    return run_suite(emb, methods, benchmarks, ProbeSettings(), progress=False), methods


def test_every_correction_beats_none_on_batch_removal(shift_run):
    out, methods = shift_run
    table = out.tables["correction_scores"].set_index("correction")
    assert set(table.index) == set(methods)
    for method in methods[1:]:
        assert table.loc[method, "batch"] > table.loc["none", "batch"], method
        assert out.metrics[method]["correction_scores"]["batch"] == pytest.approx(table.loc[method, "batch"])
    assert table.loc["none", "pcr_batch"] == 0.0
    assert {"silhouette_label", "map_activity", "biology", "overall", "rank"} <= set(table.columns)


def test_scores_written_with_a_ranking_plot(shift_run, tmp_path):
    out, _ = shift_run
    paths = out.write_tables(tmp_path)
    assert (tmp_path / "correction_scores.csv").is_file() and paths["correction_ranking"].is_file()
    assert pd.read_csv(tmp_path / "correction_scores.csv")["rank"].min() == 1


def test_scores_skip_with_one_experiment():
    emb, _, _ = planted_screen(experiments=1)
    out = run_suite(emb, ["none", "tvn"], {"correction_scores": asdict(CorrectionScoresConfig())}, ProbeSettings())
    assert "single experiment" in out.skipped["correction_scores"]
    emb, _, _ = planted_screen(experiments=2)
    out = run_suite(emb, ["none"], {"correction_scores": asdict(CorrectionScoresConfig())}, ProbeSettings())
    assert "at least 2 corrections" in out.skipped["correction_scores"]
