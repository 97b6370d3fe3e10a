"""The intensity-statistics baseline: per-site channel statistics, control normalization, the probe."""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd
import pytest
import torch

from cellrep.errors import CellrepError
from cellrep.eval.baselines import intensity_baseline, intensity_statistics, normalize_to_controls
from cellrep.eval.probe import ProbeSettings


def batches(images: np.ndarray, rows: np.ndarray, size: int):
    return [
        {"image": torch.from_numpy(images[i : i + size]), "index": torch.from_numpy(rows[i : i + size])}
        for i in range(0, len(rows), size)
    ]


def test_statistics_are_per_channel_mean_and_std_in_row_order():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(7, 3, 5, 5), dtype=np.uint8)
    rows = np.array([4, 0, 6, 2, 1, 5, 3])  # the loader's order is not the index order
    got_rows, feats = intensity_statistics(batches(images, rows, 3), progress=False)
    assert got_rows.tolist() == list(range(7))
    site = images[rows.tolist().index(2)].astype(np.float64)
    assert feats.shape == (7, 6)
    np.testing.assert_allclose(feats[2, :3], site.reshape(3, -1).mean(1), rtol=1e-5)
    np.testing.assert_allclose(feats[2, 3:], site.reshape(3, -1).std(1), rtol=1e-4)


def test_statistics_of_an_empty_loader_is_a_user_error():
    with pytest.raises(CellrepError, match="no sites"):
        intensity_statistics([], progress=False)


def plates_frame(n_per_plate: int, controls: int) -> pd.DataFrame:
    rows = []
    for exp in ("A", "B"):
        for i in range(n_per_plate):
            rows.append((exp, 1, "negative_control" if i < controls else "treatment"))
    return pd.DataFrame(rows, columns=["experiment", "plate", "well_type"])


def test_control_normalization_removes_a_plate_shift_and_scale():
    sites = plates_frame(10, controls=4)
    rng = np.random.default_rng(1)
    base = rng.standard_normal((10, 2))
    # plate B sees the same biology through a brighter, more contrasted microscope
    feats = np.concatenate([base, 3.0 * base + 40.0])
    out = normalize_to_controls(feats, sites)
    np.testing.assert_allclose(out[:10], out[10:], atol=1e-9)
    ctrl = sites["well_type"].to_numpy() == "negative_control"
    a = out[: len(base)][ctrl[:10]]
    np.testing.assert_allclose(a.mean(0), 0.0, atol=1e-9)
    np.testing.assert_allclose(a.std(0), 1.0, atol=1e-9)
    assert not np.allclose(normalize_to_controls(feats, sites.assign(plate=1, experiment="A")), out)


def test_a_plate_without_controls_is_centred_on_its_sites(caplog):
    sites = plates_frame(6, controls=0)
    feats = np.arange(24, dtype=np.float64).reshape(12, 2)
    with caplog.at_level(logging.WARNING, logger="cellrep.eval.baselines"):
        out = normalize_to_controls(feats, sites)
    assert "without negative controls" in caplog.text
    np.testing.assert_allclose(out[:6].mean(0), 0.0, atol=1e-9)
    with pytest.raises(CellrepError, match="do not align"):
        normalize_to_controls(feats[:5], sites)


class FakeDataModule:
    """What intensity_baseline reads of a CellDataModule: index (+label, split), num_classes, a loader."""

    def __init__(self, informative: bool, seed: int = 0):
        rng = np.random.default_rng(seed)
        rows = []
        for e in range(4):
            split = {0: "train", 1: "train", 2: "val", 3: "test"}[e]
            for w in range(60):
                ctrl = w < 12
                rows.append((f"E{e}", 1, "negative_control" if ctrl else "treatment", 0 if ctrl else 1 + w % 3, split))
        self.index = pd.DataFrame(rows, columns=["experiment", "plate", "well_type", "label", "split"])
        self.num_classes = 4
        n = len(self.index)
        images = rng.integers(60, 100, size=(n, 2, 8, 8)).astype(np.float64)
        # the held-out experiment's microscope is brighter: only the control normalization removes that
        images += 30.0 * (self.index["experiment"] == "E3").to_numpy()[:, None, None, None]
        if informative:
            images[:, 0] += 25.0 * self.index["label"].to_numpy()[:, None, None]
        self.images = np.clip(images, 0, 255).astype(np.uint8)

    def eval_dataloader(self, stage: str):
        assert stage == "all"
        return batches(self.images, np.arange(len(self.index)), 64)


@pytest.mark.parametrize("informative", [True, False])
def test_the_baseline_probe_finds_intensity_signal_and_only_that(informative):
    result, seconds = intensity_baseline(
        FakeDataModule(informative), ProbeSettings(epochs=200, lrs=[1e-2, 1e-1]), progress=False
    )
    row = result.table.iloc[0]
    assert result.best_block == "intensity" and row["dim"] == 4 and seconds >= 0
    assert row["chance"] == pytest.approx(0.25)
    if informative:
        assert row["test_acc"] > 0.85
    else:  # the 3 treatment classes look alike; the controls are 12 of 60 sites
        assert row["test_acc"] < 0.6
