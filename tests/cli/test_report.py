"""What a person reads at the end: the run report, the sweep table, mean ± std over seeds of a multirun's jobs."""

from __future__ import annotations

import json

import pytest
from omegaconf import OmegaConf

from cellrep.cli.report import (
    FewShotSummary,
    MultirunSummary,
    collect,
    main,
    markdown,
    run_report,
    summarize,
    sweep_table,
    write_summary,
)


def job(root, num, overrides, **metrics):
    d = root / str(num)
    (d / ".hydra").mkdir(parents=True)
    (d / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    (d / "metrics.json").write_text(json.dumps(metrics))


def test_jobs_are_grouped_by_everything_but_the_seed(tmp_path):
    job(tmp_path, 0, ["experiment=kg_fewshot", "seed=0", "task.graph_loss=none"], **{"test/acc": 0.2})
    job(tmp_path, 1, ["experiment=kg_fewshot", "seed=1", "task.graph_loss=none"], **{"test/acc": 0.4})
    job(tmp_path, 2, ["experiment=kg_fewshot", "seed=0", "task.graph_loss=laplacian"], **{"test/acc": 0.5})
    (tmp_path / "3").mkdir()  # an unfinished job: no metrics.json
    rows = summarize(collect(tmp_path), metrics=["test/acc"])
    by_loss = {r["setting"]["task.graph_loss"]: r for r in rows}
    assert by_loss["none"]["n"] == 2 and by_loss["laplacian"]["n"] == 1
    assert by_loss["none"]["test/acc"]["mean"] == pytest.approx(0.3)
    assert by_loss["none"]["test/acc"]["std"] == pytest.approx(0.1414213, rel=1e-5)  # sample std (ddof=1)
    table = markdown(rows, metrics=["test/acc"])
    assert "| task.graph_loss | n | test/acc |" in table and "0.300 ± 0.141" in table
    assert "experiment" not in table.splitlines()[0]  # constant across jobs: not a column


def test_write_summary_writes_markdown_and_json(tmp_path):
    job(tmp_path, 0, ["seed=0"], **{"test/acc": 0.25, "test/acc_top5": 0.5})
    write_summary(tmp_path)
    assert "0.250 ± 0.000" in (tmp_path / "summary.md").read_text()
    assert json.loads((tmp_path / "summary.json").read_text())["settings"][0]["n"] == 1


# ------------------------------------------------------------------ the end-of-run report and the sweep table
RUN = {
    "model": "resnet18",
    "dataset": "synthetic",
    "num_classes": 4,
    "split": "cell_type",
    "test_description": "held-out cell type U2OS",
    "test/acc": 0.5,
    "test/acc_top5": 0.75,
    "test/acc/U2OS": 0.5,
    "val/acc": 0.625,
    "run_dir": "/runs/a",
}


def test_run_report_says_held_out_accuracy_against_chance_and_where_the_outputs_are():
    lines = run_report(RUN).splitlines()
    assert lines[0] == "cellrep: resnet18 on synthetic (4 classes), split=cell_type"
    assert lines[1] == "  held-out (held-out cell type U2OS): top-1 0.500, top-5 0.750  (chance 0.250)"
    assert lines[2].split() == ["U2OS:", "top-1", "0.500"]  # one line per cell type
    assert lines[3:] == ["  validation (training experiments): top-1 0.625", "  outputs: /runs/a"]


def test_run_report_of_a_run_without_a_test():
    report = run_report({k: v for k, v in RUN.items() if not k.startswith("test")})
    assert "held-out" not in report and "validation (training experiments): top-1 0.625" in report


def sweep(tmp_path):
    job(tmp_path, 0, ["seed=0", "model=resnet18"], num_classes=5, **{"test/acc": 0.4, "test/acc_top5": 0.8})
    job(tmp_path, 1, ["seed=1", "model=resnet18"], num_classes=5)  # test=false: no held-out accuracy
    (tmp_path / "2").mkdir()  # still running: no metrics.json
    return tmp_path


def test_sweep_table_has_a_row_per_finished_job(tmp_path):
    lines = sweep_table(sweep(tmp_path)).splitlines()
    assert lines[0].split() == ["job", "top-1", "top-5", "chance"]
    assert [line.split() for line in lines[1:]] == [
        ["seed=0", "model=resnet18", "0.400", "0.800", "0.200"],
        ["seed=1", "model=resnet18", "n/a", "n/a", "0.200"],
    ]
    assert len({len(line) for line in lines}) == 1  # columns line up
    assert sweep_table(tmp_path / "2") is None


def test_multirun_summary_prints_the_table_when_the_sweep_ends(tmp_path, capsys):
    config = OmegaConf.create({"hydra": {"sweep": {"dir": str(sweep(tmp_path))}}})
    MultirunSummary().on_multirun_end(config)
    out = capsys.readouterr().out
    assert f"held-out accuracy per job (sweep dir {tmp_path})" in out and sweep_table(tmp_path) in out
    MultirunSummary().on_multirun_end(OmegaConf.create({"hydra": {"sweep": {"dir": str(tmp_path / "2")}}}))
    assert capsys.readouterr().out == ""  # no finished job: nothing to print


def test_few_shot_summary_and_the_command_line_write_the_mean_table(tmp_path, capsys):
    job(tmp_path, 0, ["seed=0"], **{"test/acc": 0.2})
    job(tmp_path, 1, ["seed=1"], **{"test/acc": 0.4})
    FewShotSummary().on_multirun_end(OmegaConf.create({"hydra": {"sweep": {"dir": str(tmp_path)}}}))
    assert "0.300 ± 0.141" in capsys.readouterr().out and (tmp_path / "summary.json").is_file()
    (tmp_path / "summary.md").unlink()
    main([str(tmp_path)])
    assert "0.300 ± 0.141" in capsys.readouterr().out and "0.300 ± 0.141" in (tmp_path / "summary.md").read_text()
