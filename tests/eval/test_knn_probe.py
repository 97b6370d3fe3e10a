"""kNN next to the linear probes per block (CHAMMI: 1-NN cosine, accuracy and macro-F1 of held-out rows against
the training rows), on planted features: one informative block, one block of noise."""

from __future__ import annotations

import numpy as np
import pandas as pd

from cellrep.cli.probe import knn_lines
from cellrep.eval.knn import knn_metrics
from cellrep.eval.probe import ProbeSettings, train_probes
from cellrep.eval.runtime import save_probe_outputs


def planted(n_per_class: int = 12, classes: int = 6, dim: int = 16, seed: int = 0):
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(classes), n_per_class)
    stage = np.tile(np.array(["train"] * (n_per_class - 4) + ["val"] * 2 + ["test"] * 2), classes)
    centres = rng.normal(size=(classes, dim)) * 3.0
    informative = centres[labels] + rng.normal(size=(len(labels), dim))
    noise = rng.normal(size=(len(labels), dim))
    return {"informative": informative, "noise": noise}, labels, stage


def test_knn_is_higher_on_the_informative_block_and_lands_in_every_output(tmp_path):
    feats, labels, stage = planted()
    settings = ProbeSettings(epochs=3, lrs=[1e-2], batch_size=16)
    result = train_probes(feats, labels, stage, int(labels.max()) + 1, settings, progress=False)
    table = result.table.set_index("block")
    assert table.loc["informative", "knn_top1"] > 0.9 > table.loc["noise", "knn_top1"]
    assert table.loc["informative", "knn_macro_f1"] > table.loc["noise", "knn_macro_f1"]
    chance = float(table["chance"].iloc[0])
    assert table.loc["noise", "knn_top1"] < chance + 0.35  # noise: no better than a little above chance
    # the same numbers as the module the classification benchmark uses, against training rows only
    ref = knn_metrics(feats["informative"], labels, stage, reference=("train",))
    assert ref["knn_top1"] == table.loc["informative", "knn_top1"]

    out = save_probe_outputs(tmp_path, result)
    csv = pd.read_csv(out["csv"])
    assert {"knn_top1", "knn_macro_f1"} <= set(csv.columns)
    js = pd.read_json(out["json"], typ="series")
    assert all("knn_top1" in b for b in js["blocks"])
    lines = knn_lines(result.table)
    assert len(lines) == 2 + 2 and "informative" in lines[2] and "kNN top-1" in lines[1]


def test_knn_off_and_reference_rows():
    feats, labels, stage = planted()
    settings = ProbeSettings(epochs=1, lrs=[1e-2], batch_size=16, knn=False)
    result = train_probes(feats, labels, stage, int(labels.max()) + 1, settings, progress=False)
    assert "knn_top1" not in result.table and knn_lines(result.table) == []
    # reference=("train",) leaves the validation rows out; nothing to compare against: no numbers
    x = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 0.1]])
    assert knn_metrics(x, np.array([0, 1, 0]), np.array(["val", "val", "test"]), reference=("train",)) == {}
    assert knn_metrics(x, np.array([0, 1, 0]), np.array(["val", "val", "test"]))["knn_top1"] == 1.0


def test_nearest_neighbour_chunks_bound_memory():
    from cellrep.eval.knn import nearest_neighbour

    rng = np.random.default_rng(1)
    train, test = rng.normal(size=(50, 4)), rng.normal(size=(37, 4))
    labels = np.arange(50)
    full = nearest_neighbour(train, labels, test)
    assert np.array_equal(nearest_neighbour(train, labels, test, max_block=120), full)  # 2 test rows a chunk
