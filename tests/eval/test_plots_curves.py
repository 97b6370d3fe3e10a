"""Recall against threshold and mAP against −log10 q: the suite's tables behind them and the files, from planted
wells (numpy only, no model)."""

from __future__ import annotations

from dataclasses import asdict

import numpy as np
import pandas as pd
import pytest
from planted_wells import planted_screen

from cellrep.config import MapActivityConfig, RecallConfig
from cellrep.errors import CellrepError
from cellrep.eval import plots
from cellrep.eval.probe import ProbeSettings
from cellrep.eval.report import write_markdown
from cellrep.eval.suite import run_suite


@pytest.fixture(scope="module")
def suite(tmp_path_factory):
    emb, pairs, _ = planted_screen(controls=6, effect=4.0, batch_shift=1.0)
    source = tmp_path_factory.mktemp("annotations") / "modules.csv"
    pairs.rename(columns={"gene_a": "entity1", "gene_b": "entity2"}).to_csv(source, index=False)
    benchmarks = {
        "recall": {**asdict(RecallConfig()), "sources": [str(source)]},
        "map_activity": asdict(MapActivityConfig(null_size=200)),
    }
    return run_suite(emb, ["none", "pca_centerscale"], benchmarks, ProbeSettings(), progress=False)


def test_recall_curve_table_one_row_per_correction_source_and_threshold(suite):
    curve = suite.tables["recall_curve"]
    q = RecallConfig().curve
    assert len(curve) == 2 * len(q) and set(curve["correction"]) == {"none", "pca_centerscale"}
    np.testing.assert_allclose(curve["random"], curve["lower"] * 2)
    for _, line in curve.groupby("correction"):
        assert line.sort_values("lower")["recall"].is_monotonic_increasing  # wider tails recall more
    # the configured thresholds stay in the metrics, the curve's extra ones do not
    assert set(k for k in suite.metrics["none"]["recall"]["modules"] if "/" in k) == {"0.05/0.95", "0.1/0.9"}
    at = curve[(curve["correction"] == "none") & (curve["lower"] == 0.05)]["recall"].item()
    assert at == suite.metrics["none"]["recall"]["modules"]["0.05/0.95"]
    assert at > 0.1  # the planted modules are recalled above random


def test_recall_curve_config_checks_its_fractions():
    with pytest.raises(CellrepError, match="curve"):
        RecallConfig(curve=[0.6])


def test_plots_are_written_and_embedded_in_the_report(suite, tmp_path):
    files = {
        "recall_curve": plots.recall_curve(suite.tables["recall_curve"], tmp_path / "recall_curve.png"),
        "map_activity": plots.map_significance(
            {k.removeprefix("map_activity_"): t for k, t in suite.tables.items() if k.startswith("map_activity_")},
            tmp_path / "map_activity.png",
            0.05,
        ),
    }
    for path in files.values():
        assert path.is_file() and path.stat().st_size > 1000
    report = write_markdown(tmp_path / "report.md", {}, files, None, None, suite.metrics, suite.skipped).read_text()
    assert "![Recall against threshold" in report and "(recall_curve.png)" in report
    assert "(map_activity.png)" in report


def test_map_significance_handles_q_of_zero_and_no_type_column(tmp_path):
    table = pd.DataFrame({"mean_average_precision": [0.9, 0.1], "corrected_p_value": [0.0, 1.0]})
    path = plots.map_significance({"none": table}, tmp_path / "m.png")
    assert path.stat().st_size > 1000
