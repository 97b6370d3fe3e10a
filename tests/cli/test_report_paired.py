"""The few-shot sweep summary on planted metrics.json files: means per arm, and graph − none paired by seed."""

from __future__ import annotations

import json

import numpy as np
import pytest

from cellrep.cli.report import collect, markdown_paired, paired, write_summary

SEEDS = (0, 1, 2, 3, 4)
# planted: linear top-1 of the "none" arm per seed, and what the graph adds to it in each seed
BASE = np.array([0.30, 0.35, 0.25, 0.40, 0.32])
GAIN = np.array([0.05, -0.02, 0.04, 0.01, 0.03])  # helps in 4 of 5 seeds; mean 0.022


def job(root, num, overrides, **metrics):
    d = root / str(num)
    (d / ".hydra").mkdir(parents=True)
    (d / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    (d / "metrics.json").write_text(json.dumps(metrics))


def planted_sweep(root, methods=("mae", "dino")):
    """A kg_ssl-style sweep: methods × seeds × {none, graph_contrastive}; dino's graph arm costs 0.1 always."""
    num = 0
    for method in methods:
        for s in SEEDS:
            for loss in ("none", "graph_contrastive"):
                gain = (GAIN if method == "mae" else np.full(5, -0.1))[s] if loss != "none" else 0.0
                acc = float(BASE[s] + gain)
                overrides = ["experiment=kg_ssl", f"fewshot_method={method}", f"seed={s}", f"task.graph_loss={loss}"]
                metrics = {"linear/acc": acc, "linear/acc_top5": acc + 0.3, "test/acc": acc + 0.1}
                job(root, num, overrides, **metrics)
                num += 1


def test_the_planted_paired_difference_comes_out(tmp_path):
    planted_sweep(tmp_path)
    (tmp_path / "99").mkdir()  # an unfinished job
    rows = {r["setting"]["fewshot_method"]: r for r in paired(collect(tmp_path))}
    mae, dino = rows["mae"], rows["dino"]
    assert mae["level"] == "graph_contrastive" and mae["baseline"] == "none" and mae["seeds"] == list("01234")
    assert mae["linear/acc"]["mean"] == pytest.approx(GAIN.mean())
    assert mae["linear/acc"]["std"] == pytest.approx(GAIN.std(ddof=1))
    assert mae["linear/acc"]["helped"] == 4 and mae["linear/acc"]["n"] == 5
    assert mae["test/acc"]["mean"] == pytest.approx(GAIN.mean())  # the same gain planted on the fine-tune
    assert dino["linear/acc"]["mean"] == pytest.approx(-0.1) and dino["linear/acc"]["helped"] == 0
    table = markdown_paired(list(rows.values()))
    assert (
        "| fewshot_method | level | n |" in table
        and f"+{GAIN.mean():.3f} ± {GAIN.std(ddof=1):.3f}" in table
        and "4 of 5" in table
    )


def test_pairs_are_matched_by_seed_not_by_job_order(tmp_path):
    job(tmp_path, 0, ["seed=1", "task.graph_loss=none"], **{"linear/acc": 0.5})
    job(tmp_path, 1, ["seed=0", "task.graph_loss=none"], **{"linear/acc": 0.1})
    job(tmp_path, 2, ["seed=0", "task.graph_loss=graph_contrastive"], **{"linear/acc": 0.3})
    job(tmp_path, 3, ["seed=2", "task.graph_loss=graph_contrastive"], **{"linear/acc": 0.9})  # no partner
    (row,) = paired(collect(tmp_path))
    assert row["seeds"] == ["0"] and row["linear/acc"]["values"] == [pytest.approx(0.2)]


def test_the_arm_recorded_in_metrics_pairs_runs_without_the_overrides(tmp_path):
    for num, (seed, loss, acc) in enumerate(
        [(0, "none", 0.2), (0, "laplacian", 0.5), (1, "none", 0.3), (1, "laplacian", 0.2)]
    ):
        job(tmp_path, num, [], **{"arm": {"seed": seed, "graph_loss": loss}, "linear/acc": acc})
    (row,) = paired(collect(tmp_path))
    assert row["level"] == "laplacian" and row["linear/acc"]["mean"] == pytest.approx(0.1)
    assert row["linear/acc"]["helped"] == 1


def test_summary_md_has_the_means_and_the_paired_table(tmp_path):
    planted_sweep(tmp_path, methods=("mae",))
    text = write_summary(tmp_path)
    md = (tmp_path / "summary.md").read_text()
    assert md == text + "\n"
    means, pairs = md.split("Paired by seed")
    none_mean = f"{BASE.mean():.3f} ± {BASE.std(ddof=1):.3f}"
    assert "| task.graph_loss | n | linear/acc | linear/acc_top5 | test/acc |" in means and none_mean in means
    assert "task.graph_loss: each level − none" in pairs and f"+{GAIN.mean():.3f} ± {GAIN.std(ddof=1):.3f}" in pairs
    saved = json.loads((tmp_path / "summary.json").read_text())
    assert len(saved["settings"]) == 2 and saved["paired"][0]["linear/acc"]["helped"] == 4


def test_multiruns_side_by_side_are_summarized_together(tmp_path):
    """sweeps/fewshot_ssl.sh runs one multirun per context arm: <k dir>/context_<arm>/<job>/."""
    for context in ("null", "synthetic"):
        for num, (s, loss) in enumerate([(0, "none"), (0, "graph_contrastive"), (1, "none"), (1, "graph_contrastive")]):
            acc = 0.2 + 0.1 * s + (0.05 if loss != "none" and context == "synthetic" else 0.0)
            overrides = [f"seed={s}", f"task.graph_loss={loss}", f"model.context_path={context}"]
            job(tmp_path / f"context_{context}", num, overrides, **{"linear/acc": acc})
    (tmp_path / "context_null" / "eval").mkdir()
    (tmp_path / "context_null" / "eval" / "metrics.json").write_text("{}")  # not a Hydra job: left out
    jobs = collect(tmp_path)
    assert len(jobs) == 8 and jobs[0][1]["job"] == "context_null/0"
    rows = {r["setting"]["model.context_path"]: r for r in paired(jobs)}
    assert rows["synthetic"]["linear/acc"]["mean"] == pytest.approx(0.05) and rows["null"]["linear/acc"]["mean"] == 0
    assert rows["synthetic"]["linear/acc"]["helped"] == 2 and rows["null"]["linear/acc"]["helped"] == 0


def test_a_shuffled_graph_control_is_paired_with_none_and_with_the_real_graph(tmp_path):
    arms = {"none": 0.0, "graph_contrastive": 0.10, "shuffled": 0.04}  # planted gains over none
    num = 0
    for s in SEEDS:
        for arm, gain in arms.items():
            overrides = [f"seed={s}", f"task.graph_loss={'none' if arm == 'none' else 'graph_contrastive'}"]
            overrides += ["task.graph_shuffle_seed=0"] if arm == "shuffled" else []
            job(tmp_path / ("control" if arm == "shuffled" else "main"), num, overrides, **{"test/acc": BASE[s] + gain})
            num += 1
    rows = {(r["level"], r["baseline"]): r["test/acc"]["mean"] for r in paired(collect(tmp_path))}
    shuffled = "graph_contrastive, graph_shuffle_seed=0"
    assert rows == {
        ("graph_contrastive", "none"): pytest.approx(0.10),
        (shuffled, "none"): pytest.approx(0.04),
        ("graph_contrastive", shuffled): pytest.approx(0.06),
    }
