"""RxRx1 classification (docs/benchmarks.md): top-k, per cell type, plate-group assignment."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from cellrep.eval.classification import assign_groups, classification_benchmark, plate_groups, topk_accuracy
from cellrep.eval.embeddings import Embeddings
from cellrep.eval.probe import ProbeSettings


def test_topk_by_hand():
    logits = np.array([[0.1, 0.9, 0.0], [0.8, 0.1, 0.3], [0.2, 0.3, 0.5]])
    labels = np.array([1, 2, 0])
    assert topk_accuracy(logits, labels, 1) == pytest.approx(1 / 3)
    assert topk_accuracy(logits, labels, 2) == pytest.approx(2 / 3)
    assert topk_accuracy(logits, labels, 5) == 1.0


def test_plate_groups_are_co_occurrence_components():
    # classes 0,1 share plate P1; 2,3 share P2; class 1 also on P3 with 0 -> groups {0,1}, {2,3}
    group = plate_groups(np.array([0, 1, 2, 3, 0, 1]), np.array(["P1", "P1", "P2", "P2", "P3", "P3"]), 4)
    assert group[0] == group[1] and group[2] == group[3] and group[0] != group[2]


def test_groups_assigned_to_plates_one_to_one():
    group = np.array([0, 0, 1, 1])
    # plate A's wells favor group 1 a little, plate B's favor group 1 strongly: B gets 1, A gets 0
    probs = np.array([[0.3, 0.2, 0.3, 0.2], [0.1, 0.1, 0.4, 0.4], [0.0, 0.0, 0.5, 0.5]])
    out = assign_groups(probs, np.array(["A", "A", "B"]), np.array(["E", "E", "E"]), group)
    assert list(out) == [0, 0, 1]


def _screen(seed=0, n_exp=4, dim=16):
    """8 siRNAs in 2 plate groups of 4; each experiment has 2 plates (one per group); 2 cell types."""
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((8, dim)) * 2
    rows, feats = [], []
    for ct in ("HUVEC", "RPE"):
        for e in range(n_exp):
            order = rng.permutation(2)
            for plate, g in enumerate(order, start=1):
                for k in range(4 * g, 4 * g + 4):
                    for rep in range(2):
                        rows.append(
                            (
                                f"{ct}-{e}",
                                plate,
                                f"W{k}{rep}",
                                ct,
                                f"s{k}",
                                "siRNA",
                                "treatment",
                                "test" if e == n_exp - 1 else "train",
                            )
                        )
                        feats.append(centers[k] + rng.standard_normal(dim))
    meta = pd.DataFrame(
        rows,
        columns=["experiment", "plate", "well", "cell_type", "perturbation", "perturbation_type", "well_type", "split"],
    )
    return Embeddings(meta, np.array(feats))


def test_classification_on_held_out_experiments():
    out = classification_benchmark(_screen(), ProbeSettings(epochs=40, batch_size=64), progress=False)
    assert out["n_classes"] == 8 and out["n_test_wells"] == 32
    assert out["top1"] > 0.6 and out["top5"] >= out["top1"]
    assert {"top1/HUVEC", "top1/RPE", "top5/HUVEC"} <= set(out)
    assert out["plate_groups"] == 2
    assert out["top1_plate_groups"] >= out["top1"] - 1e-9
