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

Standardization uses the population std (ddof=0) like scikit-learn's
``StandardScaler``, and like it leaves a zero-variance dimension unscaled.
"All components" means every component with non-zero variance: with fewer
control wells than features the controls span fewer dimensions than the
embedding, and a component without control variance cannot be standardized.
"""

from __future__ import annotations

import numpy as np

from cellrep.errors import CellrepError
from cellrep.eval.embeddings import Embeddings

METHODS = ("none", "pca_centerscale", "tvn")
CORAL_RIDGE = 0.5  # the 0.5·I added to each batch's control covariance (docs/benchmarks.md)


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
    out = z / np.sqrt(ridge)
    for b in np.unique(batch):
        rows = np.flatnonzero(batch == b)
        ctrl = z[rows[control[rows]]]
        centred = (ctrl - ctrl.mean(axis=0)) / np.sqrt(max(len(ctrl) - 1, 1))
        _, s, vt = np.linalg.svd(centred, full_matrices=False)
        d = 1.0 / np.sqrt(s**2 + ridge) - 1.0 / np.sqrt(ridge)
        out[rows] += ((z[rows] @ vt.T) * d) @ vt
    return out


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


def correct(emb: Embeddings, method: str) -> Embeddings:
    """Apply one of :data:`METHODS` to well embeddings (computed in float64, stored as float32)."""
    if method not in METHODS:
        raise CellrepError(f"unknown batch correction '{method}'", fix=f"use one of {list(METHODS)}")
    if method == "none":
        return emb
    x = emb.features.astype(np.float64)
    fn = pca_centerscale if method == "pca_centerscale" else tvn
    return emb.with_features(fn(x, emb.batch, emb.is_control))
