"""UMAP before and after each correction (umap-learn): a planted two-batch shift separates the batches in the
raw UMAP and not after a correction; the figure is written; the biology colours are what the docs say."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from planted_wells import planted_screen

from cellrep.errors import CellrepError
from cellrep.eval import plots
from cellrep.eval.batch_correction import correct
from cellrep.eval.scores import pairwise_distances, silhouette_samples


@pytest.fixture(scope="module")
def shifted():
    emb, _, _ = planted_screen(experiments=2, controls=12, batch_shift=4.0, effect=4.0, seed=3)
    corrected = {m: correct(emb, m) for m in ("none", "pca_centerscale")}
    rows, coords = plots.umap_coordinates(corrected, max_wells=10_000, seed=0)
    return emb, corrected, rows, coords


def _batch_silhouette(xy: np.ndarray, batch: np.ndarray) -> float:
    return float(np.mean(silhouette_samples(pairwise_distances(xy), batch)))


def test_umap_separates_a_planted_batch_shift_before_and_not_after_correction(shifted):
    emb, _, rows, coords = shifted
    batch = emb.meta["experiment"].astype(str).to_numpy()[rows]
    before = _batch_silhouette(coords["none"], batch)
    after = _batch_silhouette(coords["pca_centerscale"], batch)
    assert before > 0.5  # two islands, one per experiment
    assert after < 0.15 and after < before - 0.4


def test_umap_is_seeded_and_subsamples(shifted):
    emb, corrected, rows, coords = shifted
    assert len(rows) == len(emb) and coords["none"].shape == (len(emb), 2)
    small_rows, small = plots.umap_coordinates({"none": corrected["none"]}, max_wells=60, seed=0)
    again_rows, again = plots.umap_coordinates({"none": corrected["none"]}, max_wells=60, seed=0)
    assert len(small_rows) == 60 and np.array_equal(small_rows, again_rows)
    np.testing.assert_allclose(small["none"], again["none"])


def test_umap_grid_is_written(shifted, tmp_path):
    _, corrected, _, _ = shifted
    path = plots.umap_grid(corrected, tmp_path / "umap.png", max_wells=80, seed=0)
    assert path.is_file() and path.stat().st_size > 1000


def test_biology_labels_module_target_gene_control_other():
    meta = pd.DataFrame(
        {
            "perturbation": ["GENE1_guide_2", "GENE1", "CMP0", "EMPTY", "GENE2", "GENE3"],
            "perturbation_type": ["CRISPR", "CRISPR", "COMPOUND", "control", "CRISPR", "CRISPR"],
            "well_type": ["treatment", "treatment", "treatment", "negative_control", "treatment", "treatment"],
            "target": ["", "", "GENE1|GENE9", "", "", ""],
        }
    )
    labels = plots.biology_labels(meta, max_colors=2)
    # the compound takes its (first) target's colour; the gene guides pool; beyond 2 colours: other
    assert list(labels[:4]) == ["GENE1", "GENE1", "GENE1", "control"]
    assert sorted(labels[4:]) == ["GENE2", "other"] or sorted(labels[4:]) == ["GENE3", "other"]
    by_module = plots.biology_labels(meta.assign(module=list("aabxab")))
    assert list(by_module) == ["a", "a", "b", "control", "a", "b"]
    with pytest.raises(CellrepError, match="columns"):
        plots.biology_labels(meta, color_by="pathway")
