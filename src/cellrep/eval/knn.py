"""1-nearest-neighbour classification of held-out wells (docs/benchmarks.md "RxRx1 classification", kNN).

CHAMMI's protocol (Chen et al. 2023): each held-out (test) well takes the label of its most
cosine-similar training well; reported are the accuracy and the macro-F1 (scikit-learn's
``f1_score(average="macro")``: the unweighted mean over every label that is true or predicted of
``2·P·R / (P + R)``, 0 where P + R = 0).
"""

from __future__ import annotations

import numpy as np

from cellrep.eval.embeddings import unit_rows


def nearest_neighbour(
    train: np.ndarray, train_labels: np.ndarray, test: np.ndarray, chunk: int = 4096, max_block: int = 2**25
) -> np.ndarray:
    """Label of the most cosine-similar training row for each test row (ties: the first training row).

    Test rows go in chunks of at most ``chunk`` rows and ``max_block`` similarities (256 MiB of float64),
    so memory stays bounded on site-level probe features too."""
    a, b = unit_rows(np.asarray(train, dtype=np.float64)), unit_rows(np.asarray(test, dtype=np.float64))
    chunk = max(1, min(chunk, max_block // max(1, len(a))))
    out = np.empty(len(b), dtype=np.asarray(train_labels).dtype)
    for start in range(0, len(b), chunk):
        sims = b[start : start + chunk] @ a.T
        out[start : start + chunk] = np.asarray(train_labels)[np.argmax(sims, axis=1)]
    return out


def macro_f1(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    y_true, y_pred = np.asarray(y_true), np.asarray(y_pred)
    if len(y_true) == 0:
        return float("nan")
    scores = []
    for lab in np.union1d(y_true, y_pred):
        tp = float(np.sum((y_true == lab) & (y_pred == lab)))
        fp = float(np.sum((y_true != lab) & (y_pred == lab)))
        fn = float(np.sum((y_true == lab) & (y_pred != lab)))
        p = tp / (tp + fp) if tp + fp else 0.0
        r = tp / (tp + fn) if tp + fn else 0.0
        scores.append(2 * p * r / (p + r) if p + r else 0.0)
    return float(np.mean(scores))


def knn_metrics(features: np.ndarray, labels: np.ndarray, stage: np.ndarray, reference: tuple[str, ...] = ()) -> dict:
    """``knn_top1`` and ``knn_macro_f1`` of test rows (stage == "test") against the reference rows:
    the rows whose stage is in ``reference``, or every other row when it is empty."""
    stage = np.asarray(stage)
    test = stage == "test"
    ref = np.isin(stage, list(reference)) & ~test if reference else ~test
    if not test.any() or not ref.any():
        return {}
    features = np.asarray(features)
    pred = nearest_neighbour(features[ref], np.asarray(labels)[ref], features[test])
    y = np.asarray(labels)[test]
    return {"knn_top1": float(np.mean(pred == y)), "knn_macro_f1": macro_f1(y, pred)}
