"""embeddings.h5ad interchange (docs/benchmarks.md "Embeddings"): obs = metadata, X = features, obsm per correction."""

from __future__ import annotations

import numpy as np
import pytest
from planted_wells import planted_screen

from cellrep.errors import CellrepError
from cellrep.eval.batch_correction import correct
from cellrep.eval.embeddings import read_embeddings

anndata = pytest.importorskip("anndata")


def test_h5ad_round_trip_with_corrections(tmp_path):
    emb, _, _ = planted_screen(experiments=2)
    tvn = correct(emb, "tvn")
    path = emb.write_h5ad(tmp_path / "embeddings.h5ad", {"none": emb, "tvn": tvn})
    adata = anndata.read_h5ad(path)
    assert list(adata.obsm.keys()) == ["X_tvn"]
    assert adata.obs["perturbation"].astype(str).tolist() == emb.meta["perturbation"].tolist()
    back = read_embeddings(path)
    np.testing.assert_array_equal(back.features, emb.features)
    assert back.meta["experiment"].tolist() == emb.meta["experiment"].tolist()
    assert back.meta["well_type"].dtype == object  # categoricals come back as plain strings
    np.testing.assert_allclose(back.meta["concentration"], emb.meta["concentration"])
    np.testing.assert_array_equal(read_embeddings(path, representation="X_tvn").features, tvn.features)
    assert not list(tmp_path.glob(".*.tmp"))


def test_h5ad_unknown_representation_names_what_exists(tmp_path):
    emb, _, _ = planted_screen(experiments=2)
    path = emb.write_h5ad(tmp_path / "e.h5ad", {"tvn": correct(emb, "tvn")})
    with pytest.raises(CellrepError, match="X_tvn"):
        read_embeddings(path, representation="X_harmony")
    with pytest.raises(CellrepError, match="no such file"):
        read_embeddings(tmp_path / "missing.h5ad")
