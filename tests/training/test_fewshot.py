"""The de novo protocol end to end (tiny), and the bad inputs that must stop it with a clear message."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from cellrep.cli.train import train
from cellrep.data.loading.datamodule import CellDataModule
from cellrep.errors import CellrepError
from cellrep.training.fewshot import phase_rows

pytestmark = pytest.mark.usefixtures("one_torch_thread")
# Two cell types, two experiments each, one site per well: every gene has 2 sites in U2OS.
TINY = (
    "experiment=kg_fewshot",
    "logger=csv",
    "data.synthetic.cell_types=[HUVEC,U2OS]",
    "data.synthetic.experiments_per_cell_type=2",
    "data.synthetic.sites_per_well=1",
    "data.synthetic.image_size=32",
    "data.synthetic.num_compounds=0",
    # the simple layout (one plate holding every gene, one control kind): what this test counts on
    "data.synthetic.plates_per_experiment=1",
    "data.synthetic.num_modules=6",
    "data.synthetic.gene_groups=1",
    "data.synthetic.rotate_groups=false",
    "data.synthetic.control_wells_per_plate=4",
    "data.synthetic.crispr_control_wells_per_plate=0",
    "data.synthetic.positive_controls=0",
    "data.batch_size=32",
    "trainer.max_epochs=1",
    "task.finetune_epochs=1",
    "callbacks=none",
)


def test_protocol_trains_fine_tunes_and_reports_top_1_5_10(make_cfg, tmp_path):
    cfg = make_cfg(*TINY, "split.shots=1")
    train(cfg)
    run = tmp_path / "run"
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["shot_sites"] == metrics["num_classes"] == 25  # one site per perturbation (24 genes + control)
    # fine-tuning starts from the pretrained checkpoint, trains on the shots for finetune_epochs, and moves weights
    pretrained = torch.load(metrics["pretrained_checkpoint"], map_location="cpu", weights_only=False)
    finetuned = torch.load(run / "checkpoints" / "finetuned.ckpt", map_location="cpu", weights_only=False)
    steps_per_epoch = math.ceil(metrics["shot_sites"] / cfg.data.batch_size)
    assert finetuned["global_step"] == cfg.task.finetune_epochs * steps_per_epoch
    assert pretrained["state_dict"].keys() == finetuned["state_dict"].keys()
    moved = [k for k, v in pretrained["state_dict"].items() if not torch.equal(v, finetuned["state_dict"][k])]
    assert any(k.startswith("backbone.") for k in moved) and any(not k.startswith("backbone.") for k in moved), moved
    # and what the held-out type's test sites get: the same sites before (zero-shot) and after fine-tuning
    keys = ("acc", "acc_top5", "acc_top10")
    assert [metrics[f"test/{k}"] for k in keys] != [metrics[f"zeroshot/{k}"] for k in keys]
    assert metrics["test/acc/U2OS"] == metrics["test/acc"] and "test/acc/HUVEC" not in metrics
    assert metrics["graph_perturbations_absent"] == 1 and metrics["graph_absent"] == ["EMPTY_control"]
    assert metrics["test_description"] == "held-out cell type U2OS"
    assert (run / "checkpoints" / "finetuned.ckpt").is_file() and (run / "context.csv").is_file()


def test_phases_split_the_training_rows_by_cell_type(make_cfg):
    from cellrep.data.shards.prepare import ensure_shards

    cfg = make_cfg(*TINY, "split.shots=1")
    dm = CellDataModule.from_config(ensure_shards(cfg.data, progress=False).shards_dir, cfg.data, cfg.split, cfg.seed)
    source, shots = phase_rows(dm, "U2OS")
    index = dm.index
    assert (index.loc[source, "cell_type"] != "U2OS").all() and (index.loc[shots, "cell_type"] == "U2OS").all()
    assert (index.loc[np.r_[source, shots], "split"] == "train").all()
    assert index.loc[shots].groupby("perturbation").size().eq(1).all()
    assert not set(index.index[index["split"] == "test"]) & set(shots)


def test_more_shots_than_sites_is_a_clear_error(make_cfg):
    with pytest.raises(CellrepError, match=r"(?s)shots=2.*has only 2 site\(s\).*lower split.shots below 2"):
        train(make_cfg(*TINY, "split.shots=2"))


def test_fine_tuning_without_held_out_shots_is_refused_before_data(make_cfg, tmp_path):
    with pytest.raises(CellrepError, match="split=batch with shots=1"):
        train(make_cfg(*TINY, "split=batch", f"paths.data_dir={tmp_path}/nodata"))
    assert not (tmp_path / "nodata").exists()


def test_graph_file_with_unknown_columns_is_a_clear_error(make_cfg, tmp_path):
    bad = tmp_path / "graph.tsv"
    bad.write_text("gene_a\tgene_b\nTP53\tMDM2\n")
    with pytest.raises(CellrepError, match="(?s)gene_a.*protein1 protein2 combined_score"):
        train(make_cfg(*TINY, "split.shots=1", f"task.graph_path={bad}"))


def test_cell_type_missing_from_the_context_file_is_named(make_cfg, tmp_path):
    ctx = tmp_path / "ctx.csv"
    ctx.write_text("cell_type,e0\nHUVEC,1.0\n")
    with pytest.raises(CellrepError, match=r"(?s)\['U2OS'\] have no context vector in .*ctx\.csv"):
        train(make_cfg(*TINY, "split.shots=1", f"model.context_path={ctx}"))


def test_unknown_graph_loss_fails_at_config_time(make_cfg, tmp_path):
    with pytest.raises(CellrepError, match="unknown task.graph_loss 'gcn'"):
        train(make_cfg(*TINY, "task.graph_loss=gcn", f"paths.data_dir={tmp_path}/nodata"))
