"""Well embeddings (docs/benchmarks.md): per-well means, parquet round trip, alignment checks."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from cellrep.errors import CellrepError
from cellrep.eval.embeddings import Embeddings, aggregate_wells, read_embeddings


def sites():
    meta = pd.DataFrame(
        {
            "site_id": ["E1_1_B02_1", "E1_1_B02_2", "E1_1_B03_1", "E2_1_B02_1"],
            "experiment": ["E1", "E1", "E1", "E2"],
            "plate": 1,
            "well": ["B02", "B02", "B03", "B02"],
            "site": [1, 2, 1, 1],
            "perturbation": ["g1", "g1", "EMPTY_control", "g1"],
            "well_type": ["treatment", "treatment", "negative_control", "treatment"],
        }
    )
    feats = np.array([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0], [7.0, 8.0]])
    return meta, feats


def test_sites_are_averaged_per_well():
    meta, feats = sites()
    emb = aggregate_wells(feats, meta)
    assert len(emb) == 3
    row = emb.meta.index[(emb.meta["experiment"] == "E1") & (emb.meta["well"] == "B02")][0]
    np.testing.assert_allclose(emb.features[row], [2.0, 3.0])
    assert emb.meta.loc[row, "n_sites"] == 2
    assert "site_id" not in emb.meta.columns and "site" not in emb.meta.columns


def test_parquet_round_trip(tmp_path):
    emb = aggregate_wells(*reversed(sites()))
    path = emb.write_parquet(tmp_path / "wells.parquet")
    frame = pd.read_parquet(path)
    assert [c for c in frame.columns if c.startswith("feature_")] == ["feature_0", "feature_1"]
    back = read_embeddings(path)
    np.testing.assert_allclose(back.features, emb.features)
    assert list(back.meta["perturbation"]) == list(emb.meta["perturbation"])


def test_misaligned_embeddings_and_metadata():
    meta, feats = sites()
    with pytest.raises(CellrepError, match="do not align: 3 feature rows but 4 metadata rows"):
        Embeddings(meta, feats[:3])
    with pytest.raises(CellrepError, match="do not align"):
        aggregate_wells(feats[:2], meta)


def test_external_parquet_joined_to_metadata(tmp_path):
    feats = pd.DataFrame({"well_id": ["w1", "w2", "w3"], "feature_0": [0.1, 0.2, 0.3], "feature_1": [1.0, 2.0, 3.0]})
    feats.to_parquet(tmp_path / "emb.parquet")
    meta = pd.DataFrame(
        {
            "well_id": ["w3", "w1", "w2"],
            "experiment_name": ["E1"] * 3,
            "gene": ["A", "B", "C"],
            "well_type": "treatment",
        }
    )
    meta.to_csv(tmp_path / "meta.csv", index=False)
    emb = read_embeddings(
        tmp_path / "emb.parquet",
        tmp_path / "meta.csv",
        "well_id",
        {"experiment_name": "experiment", "gene": "perturbation"},
    )
    assert list(emb.meta["perturbation"]) == ["B", "C", "A"]  # follows the embedding rows
    meta.iloc[:2].to_csv(tmp_path / "short.csv", index=False)
    with pytest.raises(CellrepError, match="1 of 3 embedding rows have no metadata row"):
        read_embeddings(tmp_path / "emb.parquet", tmp_path / "short.csv")


def test_parquet_without_features_or_required_columns(tmp_path):
    pd.DataFrame({"experiment": ["E1"], "x": [1.0]}).to_parquet(tmp_path / "a.parquet")
    with pytest.raises(CellrepError, match="no 'feature_<i>' columns"):
        read_embeddings(tmp_path / "a.parquet")
    pd.DataFrame({"experiment": ["E1"], "feature_0": [1.0]}).to_parquet(tmp_path / "b.parquet")
    with pytest.raises(CellrepError, match=r"lacks column\(s\) \['perturbation', 'well_type'\]"):
        read_embeddings(tmp_path / "b.parquet")


def test_nan_features_are_named():
    meta, feats = sites()
    feats[2, 1] = np.nan
    with pytest.raises(CellrepError, match="NaN or inf"):
        Embeddings(meta, feats)
