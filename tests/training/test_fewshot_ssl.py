"""The paper's de novo protocol with a self-supervised task (experiment=kg_ssl): pretraining never sees the
held-out cell type, the shot probe separates what is separable, and a tiny MAE arm runs end to end."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from cellrep.cli.train import train
from cellrep.data.loading.datamodule import CellDataModule
from cellrep.data.shards.prepare import ensure_shards
from cellrep.training.fewshot import fit_linear_probe, pretraining_data, supervised_from_encoder
from cellrep.training.tasks import build_task

pytestmark = pytest.mark.usefixtures("one_torch_thread")
# Two cell types, two experiments each, two sites per well: every gene has 4 sites in U2OS (1 shot, 3 to test).
TINY = (
    "experiment=kg_ssl",
    "fewshot_method=mae",
    "logger=csv",
    "data.synthetic.cell_types=[HUVEC,U2OS]",
    "data.synthetic.experiments_per_cell_type=2",
    "data.synthetic.sites_per_well=2",
    "data.synthetic.image_size=32",
    "data.synthetic.num_compounds=0",
    "data.batch_size=32",
    "trainer.max_epochs=1",
    "task.finetune_epochs=1",
    "callbacks=none",
)


def datamodule(cfg) -> CellDataModule:
    return CellDataModule.from_config(ensure_shards(cfg.data, progress=False).shards_dir, cfg.data, cfg.split, cfg.seed)


def loader_rows(loader) -> np.ndarray:
    return np.concatenate([np.asarray(batch["index"]) for batch in loader])


def test_an_mae_arm_pretrains_probes_fine_tunes_and_records_its_arm(make_cfg, tmp_path):
    train(make_cfg(*TINY, "split.shots=1", "seed=3"))
    run = tmp_path / "run"
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["arm"] == {
        "task": "mae",
        "graph_loss": "graph_contrastive",
        "context": False,
        "shots": 1,
        "seed": 3,
        "holdout": "U2OS",
    }
    assert metrics["pretrain_cell_types"] == ["HUVEC"] and "val/loss" in metrics  # MAE's monitor picked best.ckpt
    for prefix in ("linear/", "test/"):
        top = [metrics[f"{prefix}acc"], metrics[f"{prefix}acc_top5"], metrics[f"{prefix}acc_top10"]]
        assert all(0.0 <= a <= 1.0 for a in top) and top == sorted(top), (prefix, top)
    assert not any(k.startswith("zeroshot/") for k in metrics)  # an encoder has no classifier to test zero-shot
    assert metrics["shot_sites"] == metrics["num_classes"] == 25
    finetuned = torch.load(run / "checkpoints" / "finetuned.ckpt", map_location="cpu", weights_only=True)
    assert finetuned["hyper_parameters"]["num_classes"] == 25 and "backbone.head.weight" in finetuned["state_dict"]


def test_the_pretraining_loaders_never_hold_a_held_out_site(make_cfg):
    cfg = make_cfg(*TINY, "split.shots=1")
    dm = datamodule(cfg)
    u2os = set(np.flatnonzero((dm.index["cell_type"] == "U2OS").to_numpy()))
    fit = pretraining_data(dm, "U2OS")
    seen = np.r_[loader_rows(fit.train_dataloader()), loader_rows(fit.val_dataloader())]
    assert len(seen) and not u2os & set(seen)
    assert set(dm.index["cell_type"].iloc[seen]) == {"HUVEC"}
    assert u2os & set(loader_rows(dm.train_dataloader()))  # the split's own training stage holds the shots


def test_the_fine_tune_starts_from_the_encoder_and_its_context(make_cfg):
    cfg = make_cfg(*TINY, "split.shots=1", "model.context_path=synthetic")
    dm = datamodule(cfg)
    mae = build_task(cfg, dm)
    with torch.no_grad():  # not the initialization a fresh supervised backbone would also draw
        for p in [*mae.probe_backbone().parameters(), *mae.context.parameters()]:
            p.add_(torch.randn_like(p))
    tuned = supervised_from_encoder(cfg, mae, dm)
    encoder = mae.probe_backbone().state_dict()
    assert tuned.hparams.num_classes == dm.num_classes and tuned.hparams.graph_loss == "graph_contrastive"
    mismatched = [k for k, v in tuned.backbone.state_dict().items() if k in encoder and not torch.equal(v, encoder[k])]
    assert not mismatched and set(tuned.backbone.state_dict()) - set(encoder) == {"head.weight", "head.bias"}
    assert torch.equal(tuned.context.proj.weight, mae.context.proj.weight)


def planted(num_classes=20, per_class=6, dim=32, seed=0):
    """Features that a linear map separates (one direction per class), the first site of each class the shot."""
    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(num_classes), per_class)
    centres = rng.normal(size=(num_classes, dim)) * 3
    features = centres[labels] + rng.normal(size=(len(labels), dim)) * 0.5
    is_shot = np.zeros(len(labels), dtype=bool)
    is_shot[::per_class] = True
    return features.astype(np.float32), labels, is_shot


def test_the_shot_probe_learns_planted_classes_and_not_shuffled_labels():
    features, labels, is_shot = planted()
    good = fit_linear_probe(features, labels, is_shot, 20, seed=0)
    shuffled = labels.copy()
    shuffled[is_shot] = np.random.default_rng(1).permutation(labels[is_shot])  # shots with wrong labels
    bad = fit_linear_probe(features, shuffled, is_shot, 20, seed=0)
    assert good["linear/acc"] > 0.9 and bad["linear/acc"] < 0.2, (good, bad)
    assert good["linear/acc"] <= good["linear/acc_top5"] <= good["linear/acc_top10"] == 1.0
