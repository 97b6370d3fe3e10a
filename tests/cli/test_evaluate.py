"""cellrep-eval without a checkpoint: an external embeddings parquet through every benchmark, and bad input.

Runs on the trained model (and the science checks on the synthetic screen)
are in tests/eval/test_evaluate_cli.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
from hydra.errors import ConfigCompositionException

from cellrep.annotations import load_pairs
from cellrep.cli.evaluate import evaluate
from cellrep.errors import CellrepError

QUIET = ("progress=false", "plots.umap=false")  # UMAP: tests/eval/test_plots_umap.py


def write_screen(folder, replicates=3, seed=0, dim=8):
    """Well embeddings of 40 StringDB genes, 2 compounds at 2 doses and controls, in 3 experiments."""
    rng = np.random.default_rng(seed)
    pairs = load_pairs("StringDB")
    genes = sorted(set(pairs["gene_a"][:200]) | set(pairs["gene_b"][:200]))[:40]
    rows = []
    for e in range(replicates):
        exp = f"HUVEC-{e + 1:02d}"
        split = "test" if e == replicates - 1 else "train"
        for i in range(6):
            rows.append((exp, 1, f"C{i:02d}", "EMPTY_control", "control", np.nan, "negative_control", split))
        for i, g in enumerate(genes):
            rows.append((exp, 1, f"D{i:02d}", g, "siRNA", np.nan, "treatment", split))
        for j, c in enumerate(("CMPD-1", "CMPD-2")):
            for k, dose in enumerate((0.1, 1.0)):
                rows.append((exp, 1, f"E{j}{k}", c, "COMPOUND", dose, "treatment", split))
    meta = pd.DataFrame(
        rows,
        columns=[
            "experiment",
            "plate",
            "well",
            "perturbation",
            "perturbation_type",
            "concentration",
            "well_type",
            "split",
        ],
    )
    meta["cell_type"] = "HUVEC"
    feats = pd.DataFrame(rng.standard_normal((len(meta), dim)), columns=[f"feature_{i}" for i in range(dim)])
    folder.mkdir(parents=True, exist_ok=True)
    pd.concat([meta, feats], axis=1).to_parquet(folder / "wells.parquet")
    targets = [(c, g, 100.0 if g == genes[j] else 50000.0) for j, c in enumerate(("CMPD-1", "CMPD-2")) for g in genes]
    pd.DataFrame(targets, columns=["compound", "gene", "activity_nM"]).to_csv(
        folder / "compound_targets.csv", index=False
    )
    return folder / "wells.parquet"


def test_external_parquet_through_every_benchmark(make_cfg, tmp_path):
    path = write_screen(tmp_path / "published")
    metrics = evaluate(make_cfg(f"embeddings={path}", *QUIET, config_name="eval"))
    run = tmp_path / "run"
    assert metrics["skipped"] == {} and set(metrics["benchmarks"]) == {"none", "pca_centerscale", "tvn"}
    tvn = metrics["benchmarks"]["tvn"]
    assert tvn["recall"]["StringDB"]["n_pairs"] > 0 and "0.05/0.95" in tvn["recall"]["StringDB"]
    assert tvn["dti"]["n_compounds"] == 2 and "conc_0.1" in tvn["dti"]
    assert tvn["consistency"]["n_perturbations"] == 44 and tvn["classification"]["n_classes"] == 40
    assert json.loads((run / "metrics.json").read_text())["dti_targets"].endswith("compound_targets.csv")
    report = (run / "report.md").read_text()
    assert "](recall.png)" in report and "](dti.png)" in report and "probe" not in report.lower()
    assert (run / "embeddings.parquet").exists() and (run / "embeddings_tvn.parquet").exists()


def test_published_column_names_are_renamed(make_cfg, tmp_path):
    path = write_screen(tmp_path / "published")
    pd.read_parquet(path).rename(columns={"perturbation": "gene", "experiment": "experiment_name"}).to_parquet(path)
    metrics = evaluate(
        make_cfg(
            f"embeddings={path}",
            *QUIET,
            "rename={gene:perturbation,experiment_name:experiment}",
            "benchmarks=[recall]",
            "corrections=[tvn]",
            config_name="eval",
        )
    )
    assert metrics["benchmarks"]["tvn"]["recall"]["StringDB"]["n_genes"] == 40
    with pytest.raises(CellrepError, match="lacks column"):
        evaluate(
            make_cfg(
                f"embeddings={path}", "benchmarks=[recall]", f"paths.output_dir={tmp_path}/run2", config_name="eval"
            )
        )


def test_benchmarks_that_do_not_apply_are_skipped_with_the_reason(make_cfg, tmp_path):
    path = write_screen(tmp_path / "published")
    (tmp_path / "published" / "compound_targets.csv").unlink()
    frame = pd.read_parquet(path).drop(columns=["split"])
    frame.to_parquet(path)
    metrics = evaluate(make_cfg(f"embeddings={path}", *QUIET, "corrections=[tvn]", config_name="eval"))
    assert set(metrics["skipped"]) == {"dti", "classification"}
    assert "benchmarks.dti.targets" in metrics["skipped"]["dti"]
    assert set(metrics["benchmarks"]["tvn"]) == {"recall", "consistency"}


def test_neither_or_both_inputs(make_cfg, tmp_path):
    with pytest.raises(CellrepError, match="exactly one of ckpt_path"):
        evaluate(make_cfg(*QUIET, config_name="eval"))
    with pytest.raises(CellrepError, match="exactly one of ckpt_path"):
        evaluate(make_cfg("ckpt_path=/a.ckpt", "embeddings=/b.parquet", config_name="eval"))


def test_unknown_correction_or_benchmark(make_cfg, tmp_path):
    with pytest.raises(CellrepError, match="unknown batch correction"):
        evaluate(make_cfg("embeddings=/b.parquet", "corrections=[combat]", config_name="eval"))
    with pytest.raises(ConfigCompositionException, match="benchmarks"):
        make_cfg("embeddings=/b.parquet", "benchmarks=[recal]", config_name="eval")


def test_misaligned_metadata_table(make_cfg, tmp_path):
    path = write_screen(tmp_path / "published")
    frame = pd.read_parquet(path)
    frame["well_id"] = [f"w{i}" for i in range(len(frame))]
    frame[["well_id"] + [c for c in frame.columns if c.startswith("feature_")]].to_parquet(path)
    frame.drop(columns=[c for c in frame.columns if c.startswith("feature_")]).iloc[5:].to_csv(
        tmp_path / "meta.csv", index=False
    )
    with pytest.raises(CellrepError, match="5 of 150 embedding rows have no metadata row"):
        evaluate(make_cfg(f"embeddings={path}", f"metadata={tmp_path / 'meta.csv'}", config_name="eval"))


def test_single_replicates_are_a_clear_error(make_cfg, tmp_path):
    path = write_screen(tmp_path / "published", replicates=1)
    with pytest.raises(CellrepError, match="at least 2 replicate wells"):
        evaluate(
            make_cfg(f"embeddings={path}", *QUIET, "benchmarks=[consistency]", "corrections=[none]", config_name="eval")
        )


def test_console_bad_annotation_file_is_one_message(tmp_path):
    path = write_screen(tmp_path / "published")
    bad = tmp_path / "pairs.csv"
    bad.write_text("geneA,geneB\nTP53,MDM2\n")
    cmd = [
        sys.executable,
        "-m",
        "cellrep.cli.evaluate",
        f"embeddings={path}",
        "benchmarks=[recall]",
        f"benchmarks.recall.sources=[{bad}]",
        "progress=false",
    ]
    out = subprocess.run(
        cmd,
        cwd=tmp_path,
        env={**os.environ, "CELLREP_ROOT": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 2, out.stderr[-2000:]
    assert "entity1,entity2" in out.stderr and "Traceback" not in out.stderr
