"""Zero-shot DTI (docs/benchmarks.md): positives, grey zone, negative sampling, AP/AUC vs random, bad tables."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from cellrep.errors import CellrepError
from cellrep.eval.dti import dti_benchmark, load_targets
from cellrep.eval.embeddings import Embeddings

GENES = [f"G{i:02d}" for i in range(30)]


def screen(target_signal=1.0, seed=0, dim=12):
    """Each gene: 2 wells; CMPD-A copies G00 (×dose), CMPD-B copies G01; random otherwise."""
    rng = np.random.default_rng(seed)
    gene_x = {g: rng.standard_normal(dim) for g in GENES}
    rows, feats = [], []
    for g in GENES:
        for _ in range(2):
            rows.append((g, "siRNA", np.nan))
            feats.append(gene_x[g] + 0.1 * rng.standard_normal(dim))
    for name, target in (("CMPD-A", "G00"), ("CMPD-B", "G01")):
        for dose in (0.1, 1.0):
            own = rng.standard_normal(dim)
            rows.append((name, "COMPOUND", dose))
            feats.append(target_signal * dose * gene_x[target] + (1 - target_signal * dose) * own)
    meta = pd.DataFrame(rows, columns=["perturbation", "perturbation_type", "concentration"])
    meta["experiment"], meta["well_type"] = "E1", "treatment"
    return Embeddings(meta, np.array(feats))


def targets(extra=()):
    rows = [("CMPD-A", "G00", 50.0), ("CMPD-A", "G02", 5000.0), ("CMPD-B", "G01", 900.0)]
    rows += [(c, g, 50000.0) for c in ("CMPD-A", "CMPD-B") for g in GENES[3:]]
    return pd.DataFrame(rows + list(extra), columns=["compound", "gene", "activity_nM"])


def test_target_ranked_first_gives_ap_one_and_random_baseline_lower():
    result = dti_benchmark(screen(), targets(), seeds=20, progress=False)
    m = result.metrics
    assert m["n_compounds"] == 2
    assert m["max"]["ap"]["median"]["mean"] == pytest.approx(1.0)
    assert m["max"]["auc"]["median"]["mean"] == pytest.approx(1.0)
    assert m["max"]["ap"]["median"]["std"] == pytest.approx(0.0)
    # one positive among 1 + 20: E[AP] of a random ranking = mean over ranks r of 1/r = H(21)/21 ≈ 0.173
    assert 0.08 < m["max"]["random_ap"]["median"]["mean"] < 0.35
    assert m["max"]["random_auc"]["median"]["mean"] == pytest.approx(0.5, abs=0.2)
    assert {"conc_0.1", "conc_1", "max"} <= set(m)
    assert set(result.per_compound["variant"]) == {"conc_0.1", "conc_1", "max"}


def test_grey_zone_and_sampling_sizes():
    # CMPD-A: 1 positive (G00), G02 in the grey zone; 27 annotated negatives (G03..G29) + G01 unmeasured
    result = dti_benchmark(screen(), targets(), seeds=3, progress=False)
    assert result.metrics["n_genes"] == 30 and result.metrics["skipped"] == {"no_positive": 0, "too_few_negatives": 0}


def test_compound_with_too_few_negatives_is_skipped():
    # 12 positives for CMPD-B -> needs 24 negatives; only G13..G29 (17) remain (+G00 unmeasured, G02)
    extra = [("CMPD-B", g, 10.0) for g in GENES[2:13]]
    table = targets(extra).drop_duplicates(["compound", "gene"], keep="last")
    result = dti_benchmark(screen(), table, seeds=3, progress=False)
    assert result.metrics["n_compounds"] == 1
    assert result.metrics["skipped"]["too_few_negatives"] == 1


def test_no_compound_usable_is_a_clear_error():
    table = targets()
    table.loc[table["activity_nM"] < 1000, "activity_nM"] = 2000.0  # every positive into the grey zone
    with pytest.raises(CellrepError, match="no compound has a target"):
        dti_benchmark(screen(), table, seeds=2, progress=False)


def test_unknown_compounds_is_a_clear_error():
    table = targets().assign(compound="UNKNOWN")
    with pytest.raises(CellrepError, match="no compound of the drug-target table"):
        dti_benchmark(screen(), table, seeds=2, progress=False)


def test_table_with_wrong_columns(tmp_path):
    path = tmp_path / "t.csv"
    path.write_text("drug,target,ic50\nA,B,1\n")
    with pytest.raises(CellrepError, match="compound,gene,activity_nM"):
        load_targets(path)
