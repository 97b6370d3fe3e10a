"""Split definitions (docs/data.md): batch, random, cell_type (+shots), official; validation rules."""

from __future__ import annotations

import numpy as np
import pytest

from cellrep.data.loading.splits import assign_splits
from cellrep.errors import CellrepError


@pytest.fixture(scope="module")
def index(make_source):
    # 2 cell types × 5 experiments × 12 sites; 'dataset' column for the official split
    return make_source(experiments_per_type=5, with_dataset=True).metadata


def _exps(index, split, stage):
    return set(index.loc[split == stage, "experiment"])


def _check_val_rules(index, split):
    """Val only from training experiments, and no well split between train and val."""
    assert set(split) <= {"train", "val", "test"}
    assert (split == "val").any()
    test_only = _exps(index, split, "test") - _exps(index, split, "train")
    assert not (_exps(index, split, "val") & test_only)
    wells = index.assign(s=split).groupby(["experiment", "plate", "well"])["s"].agg(lambda s: set(s) - {"test"})
    assert all(len(s) <= 1 for s in wells)


def test_batch_holds_out_whole_experiments_per_cell_type(index):
    split = assign_splits(index, "batch", seed=0)
    _check_val_rules(index, split)
    test_exps = _exps(index, split, "test")
    assert not test_exps & (_exps(index, split, "train") | _exps(index, split, "val"))
    for ct in ("HUVEC", "RPE"):  # round(0.21 × 5) = 1 test experiment per cell type
        assert len({e for e in test_exps if e.startswith(ct)}) == 1
    assert len(assign_splits(index, "batch", test_fraction=0.5)[lambda s: s == "test"]) == 2 * 2 * 12


def test_random_spreads_sites_over_all_experiments(index):
    split = assign_splits(index, "random", seed=0)
    _check_val_rules(index, split)
    assert _exps(index, split, "test") == _exps(index, split, "train") == set(index["experiment"])
    for _, grp in index.assign(s=split).groupby("perturbation"):  # stratified: floor or ceil of the fraction
        n_test = (grp["s"] == "test").sum()
        assert np.floor(0.21 * len(grp)) <= n_test <= np.ceil(0.21 * len(grp))
    assert abs((split == "test").mean() - 0.21) < 0.02


def test_cell_type_holds_out_one_type(index):
    split = assign_splits(index, "cell_type", holdout="RPE", seed=0)
    _check_val_rules(index, split)
    assert ((split == "test") == (index["cell_type"] == "RPE")).all()


def test_cell_type_shots_move_k_sites_per_perturbation_into_train(index):
    split = assign_splits(index, "cell_type", holdout="RPE", shots=2, seed=0)
    rpe = index.assign(s=split)[index["cell_type"] == "RPE"]
    assert (rpe.groupby("perturbation")["s"].agg(lambda s: (s == "train").sum()) == 2).all()
    assert not (rpe["s"] == "val").any(), "the few shots stay in train"
    with pytest.raises(CellrepError, match="shots=10.*only 10 site"):
        assign_splits(index, "cell_type", holdout="RPE", shots=10)


def test_official_uses_the_dataset_column(index):
    split = assign_splits(index, "official")
    _check_val_rules(index, split)
    assert ((split == "test") == (index["dataset"] == "test")).all()
    with pytest.raises(CellrepError, match="'dataset'"):
        assign_splits(index.drop(columns="dataset"), "official")


@pytest.mark.parametrize("name,kw", [("batch", {}), ("random", {}), ("cell_type", {"holdout": "HUVEC", "shots": 1})])
def test_deterministic_and_independent_of_row_order(index, name, kw):
    a = assign_splits(index, name, seed=3, **kw)
    assert a.equals(assign_splits(index, name, seed=3, **kw))
    shuffled = index.sample(frac=1.0, random_state=0)
    b = assign_splits(shuffled, name, seed=3, **kw)
    assert (b.loc[a.index] == a).all()
    assert not a.equals(assign_splits(index, name, seed=4, **kw))


def test_empty_train_or_test_is_an_error(make_source, index):
    one_each = make_source(experiments_per_type=1).metadata
    with pytest.raises(CellrepError, match="(?s)no test sites.*HUVEC=1.*split=random"):
        assign_splits(one_each, "batch")
    with pytest.raises(CellrepError, match="(?s)holdout=U2OS is not a cell type.*HUVEC"):
        assign_splits(index, "cell_type", holdout="U2OS")
    only_rpe = index[index["cell_type"] == "RPE"]
    with pytest.raises(CellrepError, match="no train sites"):
        assign_splits(only_rpe, "cell_type", holdout="RPE")
    with pytest.raises(CellrepError, match="unknown split"):
        assign_splits(index, "plate")


def test_no_validation_when_fraction_is_zero(index):
    split = assign_splits(index, "batch", val_fraction=0.0)
    assert not (split == "val").any() and (split == "train").any()
