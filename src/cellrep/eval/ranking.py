"""Average precision and ROC AUC for many small ranking problems at once (used by docs/benchmarks.md DTI).

Each row of a padded matrix is one problem (one compound's sampled genes);
``valid`` marks the real entries. Ties are handled exactly as scikit-learn
does: tied scores form one threshold, so they count together (AP: precision
is taken at the end of a tied group; AUC: a positive–negative tie counts ½).
"""

from __future__ import annotations

import numpy as np
from scipy.stats import rankdata


def _prepare(scores, labels, valid):
    scores = np.atleast_2d(np.asarray(scores, dtype=np.float64))
    labels = np.atleast_2d(np.asarray(labels, dtype=bool))
    valid = np.ones_like(labels) if valid is None else np.atleast_2d(np.asarray(valid, dtype=bool))
    if not (scores.shape == labels.shape == valid.shape):
        raise ValueError(f"scores {scores.shape}, labels {labels.shape} and valid {valid.shape} differ in shape")
    if not np.isfinite(scores[valid]).all():
        raise ValueError("scores must be finite")
    return np.where(valid, scores, -np.inf), labels & valid, valid


def average_precision(scores, labels, valid=None) -> np.ndarray:
    """Per row: Σ over distinct thresholds (high→low) of ΔTP/P × precision; NaN without positives."""
    scores, labels, valid = _prepare(scores, labels, valid)
    order = np.argsort(-scores, axis=1, kind="stable")
    s = np.take_along_axis(scores, order, axis=1)
    y = np.take_along_axis(labels, order, axis=1)
    tp = np.cumsum(y, axis=1)
    seen = np.arange(1, s.shape[1] + 1)
    # the last entry of each group of tied scores (padding, at -inf, forms its own last group)
    end = np.ones_like(y)
    end[:, :-1] = s[:, 1:] != s[:, :-1]
    tp_at_end = np.where(end, tp, 0)
    last_end_tp = np.maximum.accumulate(tp_at_end, axis=1)  # tp is non-decreasing along the row
    prev_end_tp = np.zeros_like(tp)
    prev_end_tp[:, 1:] = last_end_tp[:, :-1]
    gain = np.where(end, tp - prev_end_tp, 0) * (tp / seen)
    positives = labels.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(positives > 0, gain.sum(axis=1) / positives, np.nan)


def roc_auc(scores, labels, valid=None) -> np.ndarray:
    """Per row: Mann–Whitney U / (P·N) with average ranks for ties; NaN without both classes."""
    scores, labels, valid = _prepare(scores, labels, valid)
    ranks = rankdata(scores, axis=1, method="average")
    n_pad = (~valid).sum(axis=1)
    # padding sits at -inf below every real score, so a real entry's rank among real entries is rank - n_pad
    pos_rank_sum = np.where(labels, ranks - n_pad[:, None], 0).sum(axis=1)
    p = labels.sum(axis=1)
    n = valid.sum(axis=1) - p
    with np.errstate(invalid="ignore", divide="ignore"):
        auc = (pos_rank_sum - p * (p + 1) / 2) / (p * n)
    return np.where((p > 0) & (n > 0), auc, np.nan)
