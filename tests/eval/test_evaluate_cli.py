"""cellrep-eval end to end on the session's tiny model, then on its own embeddings parquet.

The science checks of docs/data.md/§5 on the synthetic screen: a trained model's
batch-corrected embeddings recall annotated gene pairs above chance and above
the raw embeddings, and zero-shot DTI ranks known targets above random.
"""

from __future__ import annotations

import json
import shutil

import pandas as pd
import pytest

from cellrep.cli.evaluate import evaluate

QUIET = ("progress=false", "loader.num_workers=0", "plots.umap=false")  # UMAP: test_plots_umap, and below


@pytest.fixture(scope="module")
def evaluated(checkpoint, compose_cfg, tmp_path_factory, shared_data_dir):
    """The model's final stage (block=last): the science checks should not hinge on a noisy block choice."""
    root = tmp_path_factory.mktemp("eval")
    cfg = compose_cfg(
        "eval", [*QUIET, f"ckpt_path={checkpoint}", "block=last", "plots.umap=true"], root, shared_data_dir
    )
    return evaluate(cfg), root / "run"


def test_outputs_of_an_evaluation(evaluated):
    metrics, run = evaluated
    wells = pd.read_parquet(run / "embeddings.parquet")
    features = [c for c in wells.columns if c.startswith("feature_")]
    assert len(wells) == metrics["wells"] and len(features) == metrics["features"]
    assert {
        "experiment",
        "plate",
        "well",
        "perturbation",
        "perturbation_type",
        "concentration",
        "well_type",
        "cell_type",
        "split",
        "n_sites",
    } <= set(wells.columns)
    assert wells.groupby(["experiment", "plate", "well"]).size().max() == 1  # one row per well
    assert (run / "embeddings_tvn.parquet").exists() and (run / "embeddings_pca_centerscale.parquet").exists()
    saved = json.loads((run / "metrics.json").read_text())
    assert saved["block"] == "layer4" and "probe" not in saved
    assert set(saved["benchmarks"]) == {"none", "pca_centerscale", "tvn"}
    assert set(saved["benchmarks"]["tvn"]) == {"recall", "consistency", "dti", "classification"}
    assert saved["skipped"] == {}
    report = (run / "report.md").read_text()
    for plot in ("recall.png", "dti.png", "umap.png"):
        assert f"]({plot})" in report and (run / plot).stat().st_size > 0
    assert any(c.startswith("eval/tvn/recall/StringDB") for c in pd.read_csv(run / "csv" / "metrics.csv").columns)


def test_block_best_probes_and_embeds_from_the_same_pass(eval_cfg, checkpoint, tmp_path):
    metrics = evaluate(
        eval_cfg(
            "eval", f"ckpt_path={checkpoint}", "block=best", "benchmarks=[]", "corrections=[none]", "probe.epochs=10"
        )
    )
    assert metrics["block"] == metrics["probe"]["best_block"]
    report = (tmp_path / "run" / "report.md").read_text()
    assert "](probe.png)" in report and f"Best block (validation): **{metrics['block']}**" in report
    assert (tmp_path / "run" / "probe.csv").exists()


# The screen (conftest.SCREEN) plates its 48 genes RxRx1-style: each of 4 plates per experiment holds one
# of 4 disjoint gene groups, module mates spread over the groups, and every plate slot shifts morphology
# the same way in every experiment (its control wells too). TVN learns from the pooled controls only.
# On this 10-epoch model of 1-site wells its lead over raw is within noise (measured with the
# morphology-only generator, StringDB 5/95 + 10/90: raw 0.600, TVN 0.600 and 0.617 on two reruns): the
# lead itself is measured on the default screen over seeds (docs/SCIENCE.md). Here TVN must keep the
# biology (no worse than raw by more than the rerun noise) and stay clearly above random.
# How far TVN may fall below raw, summed over the two thresholds: reruns vary ~0.05 each, and the model
# itself changes with the thread count (1 thread: raw 0.608, TVN 0.592; the full suite at 2 threads: raw
# 0.625, TVN 0.517). A TVN that destroyed the biology would sit at random (0.30), far below either.
SLACK = 0.15
LO, HI = 0.10, 0.15  # TVN's lead over random at 5/95 and at 10/90


def test_recall_after_tvn_keeps_the_biology(evaluated):
    metrics, _ = evaluated
    raw, tvn = (metrics["benchmarks"][m]["recall"]["StringDB"] for m in ("none", "tvn"))
    print("recall StringDB raw", raw, "tvn", tvn)
    assert tvn["0.05/0.95"] + tvn["0.1/0.9"] > raw["0.05/0.95"] + raw["0.1/0.9"] - SLACK, (raw, tvn)


def test_recall_after_tvn_is_clearly_above_random(evaluated):
    metrics, _ = evaluated
    tvn = metrics["benchmarks"]["tvn"]["recall"]["StringDB"]
    assert tvn["n_pairs"] == 120  # the planted modules' pairs: 8 cliques of 6 genes
    assert tvn["0.05/0.95"] > 0.10 + LO and tvn["0.1/0.9"] > 0.20 + HI, tvn  # random: 0.10 / 0.20


def test_recall_is_chance_when_the_gene_labels_are_shuffled(evaluated):
    """A broken pipeline (wells carrying the wrong gene's name) must not pass the recall bar above."""
    import numpy as np

    from cellrep.eval.embeddings import Embeddings, read_embeddings
    from cellrep.eval.recall import recall_benchmark

    _, run = evaluated
    emb = read_embeddings(run / "embeddings_tvn.parquet")
    meta = emb.meta.copy()
    genes = emb.genetic_mask()
    meta.loc[genes, "perturbation"] = np.random.default_rng(0).permutation(meta.loc[genes, "perturbation"].to_numpy())
    shuffled = recall_benchmark(Embeddings(meta, emb.features), sources=["StringDB"])["StringDB"]
    summed = shuffled["0.05/0.95"] + shuffled["0.1/0.9"]
    assert summed < 0.30 + (LO + HI) / 2, shuffled  # random 0.30; the trained model must beat 0.30 + LO + HI


def test_dti_average_precision_above_random_baseline(evaluated):
    metrics, _ = evaluated
    dti = metrics["benchmarks"]["tvn"]["dti"]
    print("dti tvn max:", dti["max"]["ap"]["median"], "random:", dti["max"]["random_ap"]["median"])
    assert dti["n_compounds"] >= 1
    assert dti["max"]["ap"]["median"]["mean"] > dti["max"]["random_ap"]["median"]["mean"] + 0.1
    assert dti["max"]["auc"]["median"]["mean"] > 0.6


def test_consistency_and_classification(evaluated):
    metrics, _ = evaluated
    for method, result in metrics["benchmarks"].items():
        c, k = result["consistency"], result["classification"]
        print(
            f"{method}: consistency {c['frac_p_lt_0.05']:.2f} (random 0.05), median cos {c['median_cosine']:.3f}; "
            f"classification top-1 {k['top1']:.3f} top-5 {k['top5']:.3f} (chance {k['chance']:.3f})"
        )
    tvn = metrics["benchmarks"]["tvn"]
    assert tvn["consistency"]["null"] == "random_treatment_wells_same_batches"  # one control name only
    assert tvn["consistency"]["frac_p_lt_0.05"] > 4 * 0.05  # replicates agree far more often than chance
    raw = metrics["benchmarks"]["none"]["classification"]
    # 4× chance: the session model varies with the run order and thread count (measured in a full-suite run
    # at one thread: top-1 0.094 = 4.5× chance; elsewhere above 5×); an untrained model sits at chance
    assert raw["top1"] > 4 * raw["chance"] and raw["top5"] >= raw["top1"]
    assert {"top1/HUVEC", "top1/RPE"} <= set(raw)
    assert raw["plate_groups"] == 4  # 4 disjoint gene groups, one per plate
    assert raw["top1_plate_groups"] > raw["top1"]  # assigning groups to test plates narrows the choice 48 → 12


def test_external_embeddings_without_a_checkpoint(evaluated, eval_cfg, tmp_path):
    metrics, run = evaluated
    folder = tmp_path / "published"
    folder.mkdir()
    shutil.copy(run / "embeddings.parquet", folder / "wells.parquet")
    shutil.copy(metrics["dti_targets"], folder / "compound_targets.csv")  # found next to the parquet
    again = evaluate(
        eval_cfg("eval", f"embeddings={folder / 'wells.parquet'}", "benchmarks=[recall,dti]", "corrections=[none,tvn]")
    )
    for method in ("none", "tvn"):
        assert again["benchmarks"][method]["recall"] == metrics["benchmarks"][method]["recall"]
        assert again["benchmarks"][method]["dti"]["max"] == metrics["benchmarks"][method]["dti"]["max"]
    assert "probe" not in again and (tmp_path / "run" / "report.md").exists()
