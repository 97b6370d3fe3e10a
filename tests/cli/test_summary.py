"""Mean ± std over seeds of a multirun's jobs."""

from __future__ import annotations

import json

import pytest

from cellrep.cli.summary import collect, markdown, summarize, write_summary


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
    assert json.loads((tmp_path / "summary.json").read_text())[0]["n"] == 1
