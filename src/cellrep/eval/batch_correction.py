"""Batch correction of well embeddings, with the experiment as the batch (docs/benchmarks.md "Batch correction").

Every method uses only negative-control wells to learn the correction, so the
biology of treated wells cannot leak into it:

- ``none`` — the raw well embeddings;
- ``pca_centerscale`` — PCA fit on control wells of all batches, then each
  batch standardized by its own controls' mean/std;
- ``tvn`` (typical variation normalization) — standardize by the pooled
  controls, PCA fit on the controls (all components) applied to everything,
  standardize by the pooled controls again, then per batch multiply by
  ``(Cov(batch controls, ddof=1) + 0.5·I)^(-1/2)`` (CORAL).

- ``sphering`` — ZCA whitening fit on the control wells of all batches (the JUMP pipelines'
  sphering): ``(X − mean(controls)) · (Cov(controls, ddof=1) + λ·I)^(-1/2)``, with the ridge
  ``λ = sphering_reg · trace(Cov)/D`` (a fraction of the mean control variance);
- ``harmony`` — harmonypy's Harmony (Korsunsky et al. 2019) on the principal components of the
  pooled-control center-scaled wells. Harmony is the one method fit on every well (its soft
  clusters need them); it uses the batch labels only, never the perturbations.

Standardization uses the population std (ddof=0) like scikit-learn's
``StandardScaler``, and like it leaves a zero-variance dimension unscaled.
"All components" means every component with non-zero variance: with fewer
control wells than features the controls span fewer dimensions than the
embedding, and a component without control variance cannot be standardized.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from cellrep.config import CORRECTIONS
from cellrep.errors import CellrepError
from cellrep.eval.embeddings import Embeddings

log = logging.getLogger(__name__)
METHODS = CORRECTIONS  # the names corrections=[...] may use; the config schema checks them at start
CORAL_RIDGE = 0.5  # the 0.5·I added to each batch's control covariance (docs/benchmarks.md)


@dataclass(frozen=True)
class CorrectionSettings:
    """The settings of the methods that have any (``correction.*`` of the eval config; docs/benchmarks.md)."""

    sphering_reg: float = 0.01
    harmony_pcs: int = 50
    harmony_theta: float = 2.0
    harmony_sigma: float = 0.1
    harmony_max_iter: int = 10
    seed: int = 0

    @classmethod
    def from_dict(cls, values: dict | None, seed: int = 0) -> "CorrectionSettings":
        return cls(**{**(values or {}), "seed": seed})


def center_scale(x: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Subtract the mean and divide by the std (ddof=0) of the ``reference`` rows of ``x``."""
    ref = x[reference]
    mean, std = ref.mean(axis=0), ref.std(axis=0)
    scale = np.where(std > 1e-8 * max(float(std.max(initial=0.0)), 1e-30), std, 1.0)
    return (x - mean) / scale


def pca_fit(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and principal axes (rows) of ``x``: every component with non-zero variance."""
    mean = x.mean(axis=0)
    _, s, vt = np.linalg.svd(x - mean, full_matrices=False)
    tol = s.max(initial=0.0) * max(x.shape) * np.finfo(x.dtype).eps
    return mean, vt[s > tol]


def inverse_sqrt(cov: np.ndarray) -> np.ndarray:
    """``cov^(-1/2)`` of a symmetric positive-definite matrix (eigendecomposition): the direct definition
    that :func:`coral` is tested and benchmarked against (benchmarks/eval_cost.py)."""
    vals, vecs = np.linalg.eigh(cov)
    return (vecs / np.sqrt(vals)) @ vecs.T


def coral(z: np.ndarray, batch: np.ndarray, control: np.ndarray, ridge: float = CORAL_RIDGE) -> np.ndarray:
    """Per batch ``z @ (Cov(batch controls, ddof=1) + ridge·I)^(-1/2)`` (docs/benchmarks.md TVN, CORAL step).

    Computed from the thin SVD of each batch's centred control rows instead of a
    D×D eigendecomposition: with ``C_c/√(n-1) = U S Vᵀ`` (V: D×k, k = min(n, D)),
    ``Cov = V S² Vᵀ`` and, exactly,
    ``(Cov + r·I)^(-1/2) = r^(-1/2)·I + V diag((s² + r)^(-1/2) − r^(-1/2)) Vᵀ``
    (the identity part covers the D−k directions the controls do not span). Cost
    O(n²·D + rows·D·k) per batch instead of O(D³): seconds, not minutes, at screen scale.
    """
    out = np.empty_like(z)
    for b in np.unique(batch):
        rows = np.flatnonzero(batch == b)
        out[rows] = ridge_inverse_sqrt_apply(z[rows], z[rows[control[rows]]], ridge)
    return out


def ridge_inverse_sqrt_apply(x: np.ndarray, ref: np.ndarray, ridge: float) -> np.ndarray:
    """``x @ (Cov(ref, ddof=1) + ridge·I)^(-1/2)`` from the thin SVD of the centred ``ref`` rows (see :func:`coral`)."""
    centred = (ref - ref.mean(axis=0)) / np.sqrt(max(len(ref) - 1, 1))
    _, s, vt = np.linalg.svd(centred, full_matrices=False)
    d = 1.0 / np.sqrt(s**2 + ridge) - 1.0 / np.sqrt(ridge)
    return x / np.sqrt(ridge) + ((x @ vt.T) * d) @ vt


def _check_controls(batch: np.ndarray, control: np.ndarray, method: str, minimum: int) -> None:
    names, counts = np.unique(batch[control], return_counts=True)
    have = dict(zip(names.tolist(), counts.tolist()))
    short = [b for b in np.unique(batch).tolist() if have.get(b, 0) < minimum]
    if short:
        raise CellrepError(
            f"batch correction '{method}' needs at least {minimum} negative-control wells per experiment; "
            f"{len(short)} experiment(s) have fewer, e.g. {short[0]!r} has {have.get(short[0], 0)}",
            fix="mark control wells with well_type=negative_control, drop those experiments, or use correction none",
        )


def pca_centerscale(x: np.ndarray, batch: np.ndarray, control: np.ndarray) -> np.ndarray:
    """docs/benchmarks.md: PCA fit on control wells of all batches, then standardize each batch by its own controls."""
    _check_controls(batch, control, "pca_centerscale", 2)
    mean, axes = pca_fit(x[control])
    z = (x - mean) @ axes.T
    out = np.empty_like(z)
    for b in np.unique(batch):
        rows = batch == b
        out[rows] = center_scale(z[rows], control[rows])
    return out


def tvn(x: np.ndarray, batch: np.ndarray, control: np.ndarray) -> np.ndarray:
    """docs/benchmarks.md TVN: pooled center-scale, PCA on controls, pooled center-scale, then per-batch CORAL
    with ``(Cov(batch controls, ddof=1) + 0.5·I)^(-1/2)``."""
    _check_controls(batch, control, "tvn", 2)
    z = center_scale(x, control)
    mean, axes = pca_fit(z[control])
    z = center_scale((z - mean) @ axes.T, control)
    return coral(z, batch, control)


def sphering(x: np.ndarray, control: np.ndarray, reg: float = 0.01) -> np.ndarray:
    """docs/benchmarks.md: ZCA whitening fit on all control wells,
    ``(X − μ_c) · (Cov_c + λ·I)^(-1/2)`` with ``λ = reg · trace(Cov_c)/D`` (exact, from the thin SVD)."""
    if int(control.sum()) < 2:
        raise CellrepError(
            f"batch correction 'sphering' needs at least 2 negative-control wells, got {int(control.sum())}",
            fix="mark control wells with well_type=negative_control, or use correction none",
        )
    ref = x[control]
    mean = ref.mean(axis=0)
    total_var = float(ref.var(axis=0, ddof=1).sum())
    ridge = reg * max(total_var / x.shape[1], 1e-12)
    return ridge_inverse_sqrt_apply(x - mean, ref - mean, ridge)


def harmony(x: np.ndarray, batch: np.ndarray, control: np.ndarray, settings: CorrectionSettings) -> np.ndarray:
    """docs/benchmarks.md: harmonypy on the first ``harmony_pcs`` principal components of the wells
    center-scaled on the pooled controls; returns the corrected components."""
    try:
        import harmonypy
    except ImportError:
        raise CellrepError(
            "batch correction 'harmony' needs the harmonypy package (GPL-3.0, an optional extra)",
            fix="pip install 'cellrep[harmony]' (or pip install harmonypy), or drop harmony from corrections",
        ) from None
    if len(np.unique(batch)) < 2:
        log.warning("harmony: a single experiment; nothing to integrate, returning the principal components")
    z = center_scale(x, control) if int(control.sum()) >= 2 else x - x.mean(axis=0)
    mean, axes = pca_fit(z)
    pcs = (z - mean) @ axes[: settings.harmony_pcs].T
    if len(np.unique(batch)) < 2:
        return pcs
    logging.getLogger("harmonypy").setLevel(logging.WARNING)
    ho = harmonypy.run_harmony(
        pcs,
        {"batch": batch},
        ["batch"],
        theta=settings.harmony_theta,
        sigma=settings.harmony_sigma,
        max_iter_harmony=settings.harmony_max_iter,
        random_state=settings.seed,
        verbose=False,
    )
    out = np.asarray(ho.Z_corr, dtype=np.float64)
    return out.T if out.shape[0] != len(x) else out


def correct(emb: Embeddings, method: str, settings: CorrectionSettings | None = None) -> Embeddings:
    """Apply one of :data:`METHODS` to well embeddings (computed in float64, stored as float32)."""
    if method not in METHODS:
        raise CellrepError(f"unknown batch correction '{method}'", fix=f"use one of {list(METHODS)}")
    if method == "none":
        return emb
    settings = settings or CorrectionSettings()
    x = emb.features.astype(np.float64)
    if method == "sphering":
        return emb.with_features(sphering(x, emb.is_control, settings.sphering_reg))
    if method == "harmony":
        return emb.with_features(harmony(x, emb.batch, emb.is_control, settings))
    fn = pca_centerscale if method == "pca_centerscale" else tvn
    return emb.with_features(fn(x, emb.batch, emb.is_control))
