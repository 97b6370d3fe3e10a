"""Train/val/test assignment of sites (docs/data.md "Splits").

Every split first decides test vs. train; validation is then carved out of the
training rows only (whole wells, so sites of one well never straddle
train/val), so a test experiment never leaks into model selection. All random
choices use ``numpy.random.default_rng(seed)`` over rows sorted by site_id,
so the result depends on the seed and the data, not on row order.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from cellrep.errors import CellrepError

SPLITS = ("batch", "random", "cell_type", "official")


def check_split(name: str, test_fraction: float, val_fraction: float, holdout: str | None, shots: int) -> None:
    """The checks that need no data; ``cellrep.config.SplitConfig`` runs them at start, before any sharding."""
    if name not in SPLITS:
        raise CellrepError(f"unknown split '{name}'", fix=f"use split=<one of {list(SPLITS)}>")
    if not 0.0 <= val_fraction < 1.0 or (name in ("batch", "random") and not 0.0 < test_fraction < 1.0):
        raise CellrepError(
            f"split fractions out of range (test_fraction={test_fraction}, val_fraction={val_fraction})",
            fix="use 0 < split.test_fraction < 1 and 0 <= split.val_fraction < 1",
        )
    if name == "cell_type" and not holdout:
        raise CellrepError("split 'cell_type' needs a held-out cell type", fix="add split.holdout=<cell type>")
    if name == "cell_type" and shots < 0:
        raise CellrepError(f"split.shots={shots}", fix="use shots >= 0")


def assign_splits(
    index: pd.DataFrame,
    name: str,
    *,
    test_fraction: float = 0.21,
    val_fraction: float = 0.1,
    holdout: str | None = None,
    shots: int = 0,
    seed: int = 0,
) -> pd.Series:
    """Return "train"/"val"/"test" per row of ``index`` (same index)."""
    check_split(name, test_fraction, val_fraction, holdout, shots)
    df = index.reset_index(drop=True)
    order = np.argsort(df["site_id"].astype(str).to_numpy(), kind="stable")
    df = df.iloc[order]  # canonical order: results do not depend on row order
    rng = np.random.default_rng(seed)
    test = {"batch": _batch, "random": _random, "cell_type": _cell_type, "official": _official}[name](
        df, rng, test_fraction=test_fraction, holdout=holdout, shots=shots
    )
    split = pd.Series(np.where(test, "test", "train"), index=df.index, dtype=object)
    eligible = (~test) & _val_eligible(df, name, holdout)
    split[_pick_val(df, eligible, val_fraction, rng)] = "val"

    counts = {s: int((split == s).sum()) for s in ("train", "val", "test")}
    for stage in ("train", "test"):
        if counts[stage] == 0:
            raise CellrepError(
                f"split '{name}' leaves no {stage} sites (counts {counts}; {_describe(df)})",
                fix=_empty_fix(name, stage),
            )
    out = pd.Series(split.to_numpy(), index=df.index).sort_index()  # back to index's row order
    out.index = index.index
    return out


def _batch(df, rng, *, test_fraction, **_):
    """Whole experiments, ≈ test_fraction of each cell type's (≥1 when it has ≥2, never all)."""
    test_exps = []
    for _, grp in df.groupby("cell_type", sort=True):
        exps = np.array(sorted(grp["experiment"].astype(str).unique()))
        if len(exps) < 2:
            continue
        n = min(max(int(round(test_fraction * len(exps))), 1), len(exps) - 1)
        test_exps += list(rng.permutation(exps)[:n])
    return df["experiment"].astype(str).isin(test_exps).to_numpy()


def _random(df, rng, *, test_fraction, **_):
    """Sites at random over all experiments, stratified by perturbation.

    Systematic sampling per perturbation with a random phase: every group gets
    floor or ceil of test_fraction × its size, and the expected total is exact.
    """
    test = np.zeros(len(df), dtype=bool)
    for _, pos in _groups(df, "perturbation"):
        pos = rng.permutation(pos)
        u = (np.arange(len(pos)) + rng.random()) / len(pos)
        test[pos[u < test_fraction]] = True
    return test


def _cell_type(df, rng, *, holdout, shots, **_):
    held = (df["cell_type"].astype(str) == str(holdout)).to_numpy()
    if not held.any():
        raise CellrepError(
            f"split.holdout={holdout} is not a cell type of this dataset",
            fix=f"use one of {sorted(df['cell_type'].astype(str).unique())}",
        )
    test = held.copy()
    if shots and held.any():
        sub = df[held]
        for pert, pos in _groups(sub, "perturbation"):
            if len(pos) < shots + 1:
                raise CellrepError(
                    f"split 'cell_type' with shots={shots}: perturbation '{pert}' of {holdout} has only "
                    f"{len(pos)} site(s), so nothing would be left to test",
                    fix=f"lower split.shots below {len(pos)}",
                )
            chosen = rng.permutation(pos)[:shots]
            test[np.flatnonzero(held)[chosen]] = False
    return test


def _official(df, rng, **_):
    if "dataset" not in df.columns:
        raise CellrepError(
            "split 'official' needs the metadata column 'dataset' (train/test)",
            fix="use a source that has it (RxRx1) or another split, e.g. split=batch",
        )
    ds = df["dataset"].astype(str).str.lower()
    bad = sorted(set(ds) - {"train", "test"})
    if bad:
        raise CellrepError(
            f"column 'dataset' has values {bad[:5]} besides train/test", fix="fix the metadata, or use another split"
        )
    return (ds == "test").to_numpy()


def _val_eligible(df, name, holdout):
    # few-shot sites of the held-out cell type are the only examples of it: keep them in train
    if name == "cell_type":
        return (df["cell_type"].astype(str) != str(holdout)).to_numpy()
    return np.ones(len(df), dtype=bool)


def _pick_val(df, eligible, val_fraction, rng):
    """Whole wells of eligible rows until ≈ val_fraction of them are chosen."""
    val = np.zeros(len(df), dtype=bool)
    if val_fraction <= 0 or not eligible.any():
        return val
    sub = df[eligible]
    groups = [pos for _, pos in _groups(sub, ["experiment", "plate", "well"])]
    if len(groups) < 2:
        return val
    target = val_fraction * len(sub)
    rows = np.flatnonzero(eligible)
    taken = 0
    for g in rng.permutation(len(groups)):
        if taken and taken + len(groups[g]) / 2 > target:
            break
        val[rows[groups[g]]] = True
        taken += len(groups[g])
    return val


def _groups(df, by):
    """(key, positions within df) per group, groups in sorted key order."""
    codes = df.groupby(by, sort=True).ngroup().to_numpy()
    keys = df.groupby(by, sort=True).size().index
    order = np.argsort(codes, kind="stable")
    bounds = np.cumsum(np.bincount(codes, minlength=len(keys)))[:-1]
    return list(zip(keys, np.split(order, bounds)))


def _describe(df) -> str:
    per = df.groupby("cell_type")["experiment"].nunique().to_dict()
    return "experiments per cell type: " + ", ".join(f"{k}={v}" for k, v in sorted(per.items()))


def _empty_fix(name: str, stage: str) -> str:
    if name == "batch":
        return "split=batch needs a cell type with at least 2 experiments; use split=random for this data"
    if name == "cell_type":
        return (
            "set split.holdout to one of the dataset's cell types, and keep at least one other cell type"
            if stage == "test"
            else "the held-out cell type is the whole dataset: add other cell types"
        )
    if name == "official":
        return "the 'dataset' column must contain both 'train' and 'test' rows"
    return "use more sites, or change split.test_fraction / split.val_fraction"
