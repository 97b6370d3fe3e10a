"""AP and ROC AUC (used by DTI, docs/benchmarks.md) against hand-computed values, ties included."""

from __future__ import annotations

import numpy as np
import pytest

from cellrep.eval.ranking import average_precision, roc_auc


def test_ap_and_auc_by_hand():
    # ranking: pos, neg, pos, neg -> AP = (1/1 + 2/3) / 2; AUC: pairs (p1>n1, p1>n2, p2<n1, p2>n2) = 3/4
    scores, labels = [0.9, 0.8, 0.7, 0.1], [1, 0, 1, 0]
    assert average_precision(scores, labels)[0] == pytest.approx((1 + 2 / 3) / 2)
    assert roc_auc(scores, labels)[0] == pytest.approx(3 / 4)


def test_ties_form_one_threshold():
    # the top two tie (one pos, one neg): precision at that threshold is 1/2 for the first positive;
    # the second positive comes at rank 3: precision 2/3. AUC: tie counts 1/2 -> (0.5 + 1 + 0 + 1) / 4
    scores, labels = [0.5, 0.5, 0.4, 0.3], [1, 0, 1, 0]
    assert average_precision(scores, labels)[0] == pytest.approx((1 / 2 + 2 / 3) / 2)
    assert roc_auc(scores, labels)[0] == pytest.approx(2.5 / 4)


def test_all_tied_gives_base_rate():
    assert average_precision([1.0] * 4, [1, 0, 0, 0])[0] == pytest.approx(0.25)
    assert roc_auc([1.0] * 4, [1, 0, 0, 0])[0] == pytest.approx(0.5)


def test_rows_with_padding_match_unpadded():
    rng = np.random.default_rng(0)
    a_scores, a_labels = rng.random(6), np.array([1, 0, 0, 1, 0, 0], bool)
    b_scores, b_labels = rng.random(3), np.array([0, 1, 0], bool)
    scores = np.zeros((2, 6))
    labels = np.zeros((2, 6), bool)
    valid = np.zeros((2, 6), bool)
    scores[0], labels[0], valid[0] = a_scores, a_labels, True
    scores[1, :3], labels[1, :3], valid[1, :3] = b_scores, b_labels, True
    labels[1, 3:] = True  # labels under padding must be ignored
    ap, auc = average_precision(scores, labels, valid), roc_auc(scores, labels, valid)
    assert ap[0] == pytest.approx(average_precision(a_scores, a_labels)[0])
    assert ap[1] == pytest.approx(average_precision(b_scores, b_labels)[0])
    assert auc[1] == pytest.approx(roc_auc(b_scores, b_labels)[0])


def test_no_positive_is_nan():
    assert np.isnan(average_precision([0.3, 0.2], [0, 0])[0])
    assert np.isnan(roc_auc([0.3, 0.2], [1, 1])[0])
