"""Batch correction (docs/benchmarks.md) checked against a direct transcription of the definitions."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy.linalg import fractional_matrix_power

from cellrep.errors import CellrepError
from cellrep.eval.batch_correction import correct, pca_centerscale, tvn
from cellrep.eval.embeddings import Embeddings


def screen(n_batches=3, controls=12, treated=10, dim=5, seed=0):
    rng = np.random.default_rng(seed)
    rows, feats = [], []
    for b in range(n_batches):
        shift, gain = rng.normal(0, 3, dim), rng.uniform(0.5, 2, dim)
        for i in range(controls + treated):
            ctrl = i < controls
            rows.append(
                {
                    "experiment": f"E{b}",
                    "perturbation": "EMPTY_control" if ctrl else f"g{i % 4}",
                    "well_type": "negative_control" if ctrl else "treatment",
                }
            )
            feats.append(gain * rng.standard_normal(dim) + shift)
    return Embeddings(pd.DataFrame(rows), np.array(feats))


def reference_tvn(x, batch, ctrl):
    def cs(z):
        return (z - z[ctrl].mean(0)) / z[ctrl].std(0)

    z = cs(x)
    c = z[ctrl] - z[ctrl].mean(0)
    _, _, vt = np.linalg.svd(c, full_matrices=False)
    z = cs((z - z[ctrl].mean(0)) @ vt.T)
    out = z.copy()
    for b in np.unique(batch):
        rows = batch == b
        cov = np.cov(z[rows & ctrl], rowvar=False, ddof=1) + 0.5 * np.eye(z.shape[1])
        out[rows] = z[rows] @ np.real(fractional_matrix_power(cov, -0.5))
    return out


def test_tvn_matches_the_definition():
    emb = screen()
    x = emb.features.astype(np.float64)
    ours = tvn(x, emb.batch, emb.is_control)
    ref = reference_tvn(x, emb.batch, emb.is_control)
    # PCA axes are defined up to sign: compare up to a per-column sign
    signs = np.sign((ours * ref).sum(0))
    np.testing.assert_allclose(ours * signs, ref, atol=1e-8)


def test_pca_centerscale_standardizes_each_batch_by_its_own_controls():
    emb = screen()
    z = pca_centerscale(emb.features.astype(np.float64), emb.batch, emb.is_control)
    for b in np.unique(emb.batch):
        ctrl = z[(emb.batch == b) & emb.is_control]
        np.testing.assert_allclose(ctrl.mean(0), 0, atol=1e-9)
        np.testing.assert_allclose(ctrl.std(0), 1, atol=1e-9)


def test_tvn_coral_step_whitens_each_batch_controls():
    # after (Cov_b + 0.5 I)^(-1/2), batch b's control covariance has eigenvalues λ/(λ + 0.5) < 1
    emb = screen()
    out = correct(emb, "tvn").features.astype(np.float64)
    for b in np.unique(emb.batch):
        cov = np.cov(out[(emb.batch == b) & emb.is_control], rowvar=False, ddof=1)
        assert np.linalg.eigvalsh(cov).max() < 1.0


def test_fewer_controls_than_features_keeps_only_components_with_variance():
    emb = screen(controls=3, dim=20)  # 9 control wells span 8 dimensions
    out = correct(emb, "tvn")
    assert out.features.shape[1] <= 9 and np.isfinite(out.features).all()


def test_none_is_identity_and_unknown_method_is_an_error():
    emb = screen()
    assert correct(emb, "none") is emb
    with pytest.raises(CellrepError, match="unknown batch correction"):
        correct(emb, "combat")


def test_batch_without_two_controls_is_named():
    emb = screen()
    meta = emb.meta.copy()
    meta.loc[(meta["experiment"] == "E1") & (meta["well_type"] == "negative_control"), "well_type"] = "treatment"
    with pytest.raises(CellrepError, match="(?s)negative-control.*'E1' has 0"):
        correct(Embeddings(meta, emb.features), "tvn")


def confounded_screen(seed=0, dim=16, batches=8, modules=20, genes_per_module=4, controls=40):
    """Gene modules whose members sit in different experiments, under strong experiment offsets that
    the control wells share: raw cosines mostly say "same experiment", not "same module"."""
    rng = np.random.default_rng(seed)
    offsets = rng.standard_normal((batches, 3)) @ rng.standard_normal((3, dim)) * 3  # a 3-d batch subspace
    module_dir = rng.standard_normal((modules, dim))
    rows, feats, pairs = [], [], []
    for b in range(batches):
        for _ in range(controls):
            rows.append((f"E{b}", "EMPTY_control", "negative_control", "control"))
            feats.append(offsets[b] + 0.5 * rng.standard_normal(dim))
    for m in range(modules):
        names = [f"M{m}G{i}" for i in range(genes_per_module)]
        pairs += [(a, c) for i, a in enumerate(names) for c in names[i + 1 :]]
        for name, b in zip(names, rng.choice(batches, genes_per_module, replace=False)):
            for _ in range(2):
                rows.append((f"E{b}", name, "treatment", "CRISPR"))
                feats.append(offsets[b] + 0.6 * module_dir[m] + 0.5 * rng.standard_normal(dim))
    meta = pd.DataFrame(rows, columns=["experiment", "perturbation", "well_type", "perturbation_type"])
    return Embeddings(meta, np.array(feats)), pd.DataFrame(pairs, columns=["gene_a", "gene_b"])


def test_tvn_separates_biology_from_experiment_offsets():
    from cellrep.eval.recall import cosine_matrix, gene_embeddings, pair_recall

    emb, pairs = confounded_screen()
    scores = {}
    for method in ("none", "pca_centerscale", "tvn"):
        genes, x = gene_embeddings(correct(emb, method))
        scores[method] = pair_recall(genes, cosine_matrix(x), pairs)["0.05/0.95"]
    assert scores["none"] < 0.2  # random: 0.10
    assert scores["tvn"] > 0.4 and scores["pca_centerscale"] > 0.4, scores


@pytest.mark.parametrize("controls,dim", [(12, 5), (3, 20)])  # controls span all / only some dimensions
def test_coral_from_control_svd_equals_the_inverse_square_root(controls, dim):
    from cellrep.eval.batch_correction import CORAL_RIDGE, coral, inverse_sqrt

    emb = screen(controls=controls, dim=dim)
    z, batch, ctrl = emb.features.astype(np.float64), emb.batch, emb.is_control
    expected = np.empty_like(z)
    for b in np.unique(batch):
        rows = batch == b
        cov = np.cov(z[rows & ctrl], rowvar=False, ddof=1) + CORAL_RIDGE * np.eye(dim)
        expected[rows] = z[rows] @ inverse_sqrt(cov)
    np.testing.assert_allclose(coral(z, batch, ctrl), expected, atol=1e-10)
