"""cellrep-probe end to end on the session's tiny model: one backbone pass, outputs, logger."""

from __future__ import annotations

import json
import math

import pandas as pd
import pytest

import cellrep.eval.pipeline as pipeline
from cellrep.cli.probe import probe


@pytest.fixture
def counted_backbone(monkeypatch):
    """Wrap load_backbone so every backbone forward pass (one stem call) is counted."""
    calls = {"passes": 0}
    real = pipeline.load_backbone

    def load(path):
        backbone, meta = real(path)
        stem = next(m for m in backbone.modules() if hasattr(m, "weight") and getattr(m, "weight").ndim == 4)
        stem.register_forward_hook(lambda *_: calls.__setitem__("passes", calls["passes"] + 1))
        return backbone, meta

    monkeypatch.setattr(pipeline, "load_backbone", load)
    return calls


def test_probe_all_blocks_in_one_backbone_pass(eval_cfg, checkpoint, counted_backbone, tmp_path, capsys):
    cfg = eval_cfg("probe", f"ckpt_path={checkpoint}", "loader.batch_size=64", "probe.epochs=20")
    metrics = probe(cfg)
    run = tmp_path / "run"

    batches = math.ceil(metrics["num_sites"] / 64)
    assert metrics["num_blocks"] == 5  # resnet: stem + 4 stages
    assert counted_backbone["passes"] == batches  # one pass for all 5 blocks, not 5 passes

    table = pd.read_csv(run / "probe.csv")
    assert list(table["block"]) == ["act1", "layer1", "layer2", "layer3", "layer4"]
    assert {"val_acc", "test_acc", "test_acc_top5", "best_lr", "chance"} <= set(table.columns)
    record = json.loads((run / "probe.json").read_text())
    assert record["best_block"] in set(table["block"]) and len(record["blocks"]) == 5
    assert (run / "probe.png").stat().st_size > 0
    assert json.loads((run / "metrics.json").read_text())["probe"]["best_block"] == record["best_block"]
    # a trained model's probes beat chance on held-out experiments
    assert table["test_acc"].max() > 3 * table["chance"].iloc[0]

    logged = pd.read_csv(run / "csv" / "metrics.csv")
    assert "probe/best_block_index" in logged.columns and "probe/test_acc/layer4" in logged.columns
    assert f"best_block: {record['best_block']}" in (run / "csv" / "hparams.yaml").read_text()
    out = capsys.readouterr().out
    assert f"best block: {record['best_block']}" in out and "<- best" in out
    print(table[["block", "best_lr", "val_acc", "test_acc", "test_acc_top5", "chance"]].to_string())
