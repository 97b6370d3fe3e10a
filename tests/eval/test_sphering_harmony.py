"""sphering and harmony (docs/benchmarks.md "Batch correction") on a planted pure batch shift."""

from __future__ import annotations

import numpy as np
import pytest
from planted_wells import planted_screen

from cellrep.errors import CellrepError
from cellrep.eval.batch_correction import CorrectionSettings, correct, sphering
from cellrep.eval.embeddings import Embeddings
from cellrep.eval.scores import pairwise_distances, silhouette_samples


def batch_silhouette(emb: Embeddings) -> float:
    """Mean silhouette of the experiment labels over all wells: high = batches apart."""
    return float(silhouette_samples(pairwise_distances(emb.features), emb.batch).mean())


@pytest.fixture(scope="module")
def shifted():
    emb, _, _ = planted_screen(batch_shift=1.0, controls=10, effect=2.0)
    return emb


@pytest.mark.parametrize("method", ["pca_centerscale", "tvn", "sphering", "harmony"])
def test_every_correction_reduces_a_pure_batch_shift(shifted, method):
    if method == "harmony":
        pytest.importorskip("harmonypy")
    before = batch_silhouette(shifted)
    after = batch_silhouette(correct(shifted, method))
    assert before > 0.2  # the shift dominates
    assert after < before - (0.05 if method == "harmony" else 0.1), (method, before, after)


def test_harmony_integrates_separated_batches_with_a_wider_kernel():
    """Batches that share no neighbourhood: harmonypy's default sigma=0.1 corrects them little
    (docs/benchmarks.md); a wider soft-clustering kernel integrates them."""
    pytest.importorskip("harmonypy")
    emb, _, _ = planted_screen(batch_shift=3.0, controls=10, effect=2.0)
    before = batch_silhouette(emb)
    default = batch_silhouette(correct(emb, "harmony"))
    wide = batch_silhouette(correct(emb, "harmony", CorrectionSettings(harmony_sigma=0.5)))
    assert wide < 0.1 < default < before


def test_sphering_whitens_the_controls():
    rng = np.random.default_rng(0)
    mix = rng.normal(size=(6, 6))
    x = rng.normal(size=(400, 6)) @ mix + 5.0
    control = np.zeros(400, dtype=bool)
    control[:300] = True
    z = sphering(x, control, reg=1e-6)
    ctrl = z[control]
    np.testing.assert_allclose(ctrl.mean(axis=0), 0.0, atol=1e-8)
    np.testing.assert_allclose(np.cov(ctrl, rowvar=False), np.eye(6), atol=1e-4)
    # ZCA, not any whitening: the whitening matrix is symmetric, so z stays closest to the centred data
    w = np.linalg.lstsq(x[control] - x[control].mean(axis=0), ctrl, rcond=None)[0]
    np.testing.assert_allclose(w, w.T, atol=1e-6)


def test_sphering_ridge_is_relative_to_the_mean_control_variance():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(50, 200))  # fewer controls than features: the ridge keeps it finite
    control = np.ones(50, dtype=bool)
    z = sphering(x, control, reg=0.01)
    assert np.isfinite(z).all()
    lam = 0.01 * x.var(axis=0, ddof=1).mean()
    direct = (x - x.mean(axis=0)) @ np.linalg.inv(
        np.real(__import__("scipy").linalg.sqrtm(np.cov(x, rowvar=False) + lam * np.eye(200)))
    )
    np.testing.assert_allclose(z, direct, atol=1e-6)


def test_sphering_needs_controls():
    with pytest.raises(CellrepError, match="sphering"):
        sphering(np.zeros((4, 3)), np.array([True, False, False, False]))


def test_harmony_is_seeded_and_shaped(shifted):
    pytest.importorskip("harmonypy")
    a = correct(shifted, "harmony", CorrectionSettings(harmony_pcs=10, seed=3))
    b = correct(shifted, "harmony", CorrectionSettings(harmony_pcs=10, seed=3))
    assert a.features.shape == (len(shifted), 10)
    np.testing.assert_array_equal(a.features, b.features)
