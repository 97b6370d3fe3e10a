"""copairs mAP benchmarks (docs/benchmarks.md "mAP: phenotypic activity" / "... consistency") on planted wells."""

from __future__ import annotations

from dataclasses import asdict

import numpy as np
import pytest
from planted_wells import planted_screen, shuffled

from cellrep.config import MapActivityConfig, MapConsistencyConfig
from cellrep.errors import CellrepError
from cellrep.eval.embeddings import Embeddings
from cellrep.eval.map import map_activity, map_consistency
from cellrep.eval.probe import ProbeSettings
from cellrep.eval.suite import run_suite

NULL = 1000


@pytest.fixture(scope="module")
def screen():
    return planted_screen(controls=12, effect=6.0)


def test_map_activity_finds_planted_perturbations_above_shuffled_labels(screen):
    emb, _, _ = screen
    planted = map_activity(emb, null_size=NULL)
    control = map_activity(shuffled(emb), null_size=NULL)
    m = planted.metrics
    assert m["pos_diffby_used"] == ["plate_key"]
    assert m["mean_map"] > control.metrics["mean_map"] + 0.25
    assert m["mean_map"] > m["shuffled_mean_map"] + 0.25  # the built-in baseline agrees
    assert m["frac_retrieved"] > 0.5 > control.metrics["frac_retrieved"] + 0.3
    table = planted.tables["map_activity"].set_index("perturbation")
    genes = table.loc[[p for p in table.index if p.startswith("G")]]
    inactive = table.loc[[p for p in table.index if p.startswith("N")]]
    assert genes["below_corrected_p"].mean() > 0.8
    assert inactive["below_corrected_p"].mean() < 0.5
    assert set(m["by_type"]) == {"CRISPR", "COMPOUND"}
    assert 0.0 <= m["by_type"]["COMPOUND"]["frac_retrieved"] <= 1.0
    assert {"corrected_p_value", "p_value", "mean_average_precision"} <= set(table.columns)


def test_map_activity_positives_from_any_plate_when_replicates_share_one(screen):
    emb, _, _ = screen
    meta = emb.meta.copy()
    meta["plate"] = "1"  # one plate per experiment; replicates are in different experiments
    meta["experiment"] = "E0"  # ... and now all in one experiment: no replicate differs in plate_key
    res = map_activity(Embeddings(meta, emb.features), null_size=NULL, shuffled_baseline=False)
    assert res.metrics["pos_diffby_used"] == []
    assert res.metrics["n"] > 0


def test_map_activity_drops_wells_without_controls_on_their_plate(screen):
    emb, _, _ = screen
    meta = emb.meta
    keep = ~((meta["plate"] == "1") & (meta["experiment"] == "E0") & (meta["well_type"] == "negative_control"))
    res = map_activity(emb.subset(keep.to_numpy()), null_size=NULL, shuffled_baseline=False)
    assert res.metrics["n_wells_without_negatives"] > 0


def test_map_activity_wrong_column_names_the_columns(screen):
    emb, _, _ = screen
    with pytest.raises(CellrepError, match=r"plate_key.*") as info:
        map_activity(emb, null_size=NULL, pos_diffby=["Metadata_Plate"])
    assert "Metadata_Plate" in info.value.problem and "experiment" in info.value.problem


def test_map_consistency_targets_and_relationships_above_shuffled(screen):
    emb, pairs, table = screen
    planted = map_consistency(emb, {"modules": pairs}, table, null_size=NULL)
    control = map_consistency(shuffled(emb), {"modules": pairs}, table, null_size=NULL)
    for part in ("targets", "modules"):
        got, base = planted.metrics[part], control.metrics[part]
        assert got["mean_map"] > base["mean_map"] + 0.2, part
        assert got["mean_map"] > got["shuffled_mean_map"] + 0.2, part
    assert planted.metrics["targets"]["group_by"] == "target"
    assert planted.metrics["modules"]["group_by"] == "gene"
    targets = planted.tables["map_consistency_targets"]
    assert set(targets["label"]) == {"G0_0", "G1_1", "G2_1"}  # the planted targets (CMP0 and CMP1 share G0_0)


def test_map_consistency_uses_the_target_column_without_a_table(screen):
    emb, _, _ = screen
    res = map_consistency(emb, {}, None, null_size=NULL, shuffled_baseline=False)
    assert res.metrics["targets"]["n"] == 3


def _benchmarks(**over):
    b = {
        "map_activity": {**asdict(MapActivityConfig(null_size=NULL)), "shuffled_baseline": False},
        "map_consistency": {**asdict(MapConsistencyConfig(null_size=NULL)), "sources": [], "shuffled_baseline": False},
    }
    for k, v in over.items():
        b[k].update(v)
    return b


def test_suite_skips_map_benchmarks_without_labels(screen):
    emb, _, _ = screen
    meta = emb.meta.copy()
    meta["well_type"] = np.where(meta["well_type"] == "negative_control", "treatment", meta["well_type"])
    meta = meta.drop(columns=["target"])
    meta.loc[meta["perturbation_type"] == "COMPOUND", "perturbation_type"] = "CRISPR"
    out = run_suite(Embeddings(meta, emb.features), ["none"], _benchmarks(), ProbeSettings())
    assert "negative-control" in out.skipped["map_activity"]
    assert "nothing to score" in out.skipped["map_consistency"]
    assert out.metrics["none"] == {}


def test_suite_wrong_column_is_one_error(screen):
    emb, _, _ = screen
    with pytest.raises(CellrepError, match="benchmarks.map_activity.neg_sameby") as info:
        run_suite(emb, ["none"], _benchmarks(map_activity={"neg_sameby": ["Metadata_Plate"]}), ProbeSettings())
    assert "plate_key" in info.value.problem


def test_suite_runs_map_on_each_correction(screen):
    emb, _, _ = screen
    out = run_suite(emb, ["none", "tvn"], _benchmarks(), ProbeSettings())
    for method in ("none", "tvn"):
        assert "mean_map" in out.metrics[method]["map_activity"]
        assert "targets" in out.metrics[method]["map_consistency"]
        assert f"map_activity_{method}" in out.tables
        assert f"map_consistency_targets_{method}" in out.tables


def test_bounded_profiles_keep_whole_labels_and_are_seeded():
    from cellrep.eval.map import bounded_profiles

    labels = [[f"p{i // 2}"] for i in range(40)] + [[] for _ in range(20)]  # 20 pairs, 20 unlabelled
    keep = bounded_profiles(labels, 15, seed=0)
    assert len(keep) == 15 and list(keep) == list(bounded_profiles(labels, 15, seed=0))
    kept_labels = [labels[i][0] for i in keep if labels[i]]
    assert sum(kept_labels.count(lab) == 2 for lab in set(kept_labels)) == 7  # whole pairs first, then fill
    assert list(bounded_profiles(labels, 100, seed=0)) == list(range(60))


def test_map_consistency_bounded_still_finds_the_modules(screen):
    emb, pairs, _ = screen
    res = map_consistency(emb, {"modules": pairs}, None, null_size=NULL, max_profiles=12, target_column="none")
    m = res.metrics["modules"]
    assert m["subsampled"] and m["n_profiles"] == 12
    assert m["mean_map"] > m["shuffled_mean_map"]
