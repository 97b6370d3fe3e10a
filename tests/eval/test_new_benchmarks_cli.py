"""cellrep-eval with the mAP, magnitude and correction-score benchmarks and the new corrections, on
published (planted) embeddings: Hydra composes the benchmark nodes, the schema checks them, the suite runs."""

from __future__ import annotations

import json

import pytest
from planted_wells import planted_screen

from cellrep.cli.evaluate import evaluate
from cellrep.errors import CellrepError

QUIET = ("progress=false", "benchmarks.map_activity.null_size=500", "benchmarks.map_consistency.null_size=500")
NEW = "benchmarks=[map_activity,map_consistency,magnitude,correction_scores]"


def test_new_benchmarks_through_cellrep_eval(make_cfg, tmp_path):
    emb, _, table = planted_screen(batch_shift=1.0, controls=8, effect=5.0)
    folder = tmp_path / "published"
    emb.write_parquet(folder / "wells.parquet")
    table.to_csv(folder / "compound_targets.csv", index=False)
    metrics = evaluate(
        make_cfg(
            f"embeddings={folder / 'wells.parquet'}",
            *QUIET,
            NEW,
            "benchmarks.map_consistency.sources=[]",
            "benchmarks.magnitude.null_samples=100",
            "corrections=[none,sphering,tvn]",
            "correction.sphering_reg=0.05",
            config_name="eval",
        )
    )
    assert metrics["skipped"] == {}
    for method in ("none", "sphering", "tvn"):
        result = metrics["benchmarks"][method]
        assert {"map_activity", "map_consistency", "magnitude", "correction_scores"} <= set(result)
        assert result["map_consistency"]["targets"]["n"] == 3  # from the metadata's target column
    ranks = sorted(metrics["benchmarks"][m]["correction_scores"]["rank"] for m in ("none", "sphering", "tvn"))
    assert ranks[0] == 1
    json.dumps(metrics)  # metrics.json-serializable


@pytest.mark.parametrize(
    "override, message",
    [
        ("benchmarks.map_consistency.dose=lowest", "dose"),
        ("benchmarks.map_activity.threshold=2", "threshold"),
        ("benchmarks.correction_scores.batch_weight=1.5", "batch_weight"),
        ("correction.sphering_reg=0", "sphering_reg"),
    ],
)
def test_bad_settings_are_one_message(make_cfg, override, message):
    with pytest.raises(CellrepError, match=message):
        evaluate(make_cfg("embeddings=/x.parquet", NEW, override, config_name="eval"))


def test_h5ad_embeddings_through_cellrep_eval(make_cfg, tmp_path):
    emb, _, _ = planted_screen(experiments=2, controls=6)
    path = emb.write_h5ad(tmp_path / "published" / "wells.h5ad")
    metrics = evaluate(
        make_cfg(
            f"embeddings={path}",
            "progress=false",
            "benchmarks=[map_activity]",
            "benchmarks.map_activity.null_size=500",
            "corrections=[none]",
            config_name="eval",
        )
    )
    assert metrics["wells"] == len(emb) and "mean_map" in metrics["benchmarks"]["none"]["map_activity"]
