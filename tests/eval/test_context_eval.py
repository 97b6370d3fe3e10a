"""Evaluating a model trained with a cell-type context (docs/FEWSHOT.md) with that context: tiny real runs
(supervised ViT, MAE, a FiLM CNN, none) through cellrep-probe's embedding, checked against the features
computed straight from the raw checkpoint and models.context, by cell-type name; the context=false
ablation; a cell type missing from the table; the training callbacks' context."""

from __future__ import annotations

import copy
import json

import lightning as L
import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn as nn
from PIL import Image

from cellrep.cli.evaluate import evaluate
from cellrep.cli.probe import probe
from cellrep.cli.train import train
from cellrep.errors import CellrepError
from cellrep.eval.features import block_names, pooled_block_features
from cellrep.eval.pipeline import block_features, prepare
from cellrep.eval.ranks import features_across_ranks
from cellrep.models.context import CellTypeContext, context_tokens
from cellrep.training.callbacks.block_probes import probe_context
from cellrep.training.callbacks.reconstructions import ReconstructionImages, reconstruction_grid
from cellrep.training.tasks.dino import DINOTask
from cellrep.training.tasks.mae import MAETask
from cellrep.training.tasks.supervised import SupervisedTask

TINY = ("debug=tiny", "logger=csv", "trainer.enable_progress_bar=false", "trainer.max_epochs=1", "test=false")
TINY += ("task.probe_every_n_epochs=0",)
VIT = ("model=vit_s16", "+model.kwargs.embed_dim=64", "+model.kwargs.depth=2", "+model.kwargs.num_heads=4")
VIT += ("+model.kwargs.patch_size=8",)  # the tiny ViT of tests/training/test_context_ssl.py
SYNTHETIC = ("model.context_path=synthetic",)
MAE = ("task=mae", "task.decoder_dim=64", "task.decoder_depth=1", "task.decoder_heads=4")


def trained(make_cfg, tmp_path, *overrides):
    train(make_cfg(*TINY, *overrides))
    return tmp_path / "run" / "checkpoints" / "last.ckpt"


def probe_cfg(make_cfg, ckpt, *overrides):
    return make_cfg(f"ckpt_path={ckpt}", "progress=false", "device=cpu", *overrides, config_name="probe")


def features(make_cfg, ckpt, *overrides):
    prep = prepare(probe_cfg(make_cfg, ckpt, *overrides))
    return prep, block_features(prep, None, progress=False)


def direct_last_block(prep, ckpt, prefix: str):
    """The last block's pooled features of one batch, from the raw checkpoint's projection, the run's
    context.csv looked up by each site's cell-type name, and models.context.context_tokens (the training
    path), with the final norm taken out since block features are the blocks' raw outputs."""
    state = torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]
    table = pd.read_csv(ckpt.parent.parent / "context.csv", index_col="cell_type")
    loader = prep.datamodule.eval_dataloader("all")
    batch = loader.finish_batch(next(iter(loader)))
    rows = np.asarray(batch["index"])
    names = prep.datamodule.index["cell_type"].iloc[rows].astype(str)
    context = CellTypeContext(torch.tensor(table.loc[names].to_numpy(), dtype=torch.float32), 64, "token")
    context.proj.load_state_dict({"weight": state[prefix + "proj.weight"], "bias": state[prefix + "proj.bias"]})
    bare = copy.deepcopy(prep.backbone)
    bare.norm = nn.Identity()
    with torch.no_grad():
        tokens = context_tokens(bare, batch["image"], context, torch.arange(len(rows)))
    n = bare.num_prefix_tokens
    return rows, torch.cat([tokens[:, n:].mean(1), tokens[:, 0]], dim=1).numpy()


def assert_context_changes_features(make_cfg, ckpt, prefix):
    prep, on = features(make_cfg, ckpt)
    _, off = features(make_cfg, ckpt, "context=false")
    assert prep.context_record == {
        "in_checkpoint": True,
        "used": True,
        "mode": "token",
        "table": prep.context_record["table"],
    }
    assert prep.context_record["table"] == str(ckpt.parent.parent / "context.csv")
    np.testing.assert_array_equal(on.rows, off.rows)
    for name in on.features:  # every block sees the token
        assert np.abs(on.features[name] - off.features[name]).max() > 1e-4, name
    rows, expected = direct_last_block(prep, ckpt, prefix)
    last = block_names(prep.backbone)[-1]
    np.testing.assert_allclose(on.features[last][np.searchsorted(on.rows, rows)], expected, rtol=1e-4, atol=1e-5)
    return prep, on


def test_supervised_vit_is_embedded_with_its_context_token_by_cell_type_name(make_cfg, tmp_path):
    ckpt = trained(make_cfg, tmp_path, *VIT, *SYNTHETIC)
    prep, on = assert_context_changes_features(make_cfg, ckpt, "context.")
    # the trainer=ddp path (eval/ranks.py: Lightning predict, parts on disk), here with one CPU rank
    ranks = features_across_ranks(
        prep.backbone, prep.datamodule, None, {"accelerator": "cpu", "devices": 1}, tmp_path / "ranks", "x", False,
        prep.context,
    )  # fmt: skip
    for name in on.features:
        np.testing.assert_allclose(ranks.features[name], on.features[name], rtol=1e-5, atol=1e-6)
    assert json.loads((tmp_path / "ranks" / "features.parts" / "parts.json").read_text())["context"] == "token"

    # a table with the rows reversed and a de novo cell type added: vectors are found by name
    table = pd.read_csv(ckpt.parent.parent / "context.csv")
    novel = pd.DataFrame([["novel_line", *np.ones(table.shape[1] - 1)]], columns=table.columns)
    reordered = tmp_path / "reordered.csv"
    pd.concat([table.iloc[::-1], novel]).to_csv(reordered, index=False)
    prep2, again = features(make_cfg, ckpt, f"model.context_path={reordered}")
    assert prep2.context_record["table"] == str(reordered)
    for name in on.features:
        np.testing.assert_allclose(again.features[name], on.features[name], rtol=1e-5, atol=1e-6)

    # a cell type of the sites missing from the table: one clear error naming the fix
    short = tmp_path / "short.csv"
    table.iloc[1:].to_csv(short, index=False)
    with pytest.raises(CellrepError, match="no context vector") as err:
        prepare(probe_cfg(make_cfg, ckpt, f"model.context_path={short}"))
    assert str(table["cell_type"].iloc[0]) in err.value.problem
    assert "add a row" in err.value.fix and "context=false" in err.value.fix

    # cellrep-probe records it in metrics.json
    out = probe(probe_cfg(make_cfg, ckpt, f"paths.output_dir={tmp_path}/probe"))
    written = json.loads((tmp_path / "probe" / "metrics.json").read_text())
    assert out["context"]["used"] and written["context"]["mode"] == "token"
    off = probe(probe_cfg(make_cfg, ckpt, f"paths.output_dir={tmp_path}/probe_off", "context=false"))
    assert off["context"] == {"in_checkpoint": True, "used": False, "table": str(ckpt.parent.parent / "context.csv")}
    # and cellrep-eval says so in metrics.json and report.md
    out = evaluate(
        make_cfg(f"ckpt_path={ckpt}", "block=last", "benchmarks=[]", "plots.umap=false", "progress=false",
                 f"paths.output_dir={tmp_path}/eval", config_name="eval")
    )  # fmt: skip
    assert out["cell-type context"].startswith("used: a token in every block")
    assert "cell-type context**: used" in (tmp_path / "eval" / "report.md").read_text()


def test_mae_encoder_is_embedded_with_its_context_token_and_drawn_with_it(make_cfg, tmp_path):
    ckpt = trained(make_cfg, tmp_path, *VIT, *SYNTHETIC, *MAE, "task.reconstructions_every_n_steps=1")
    assert_context_changes_features(make_cfg, ckpt, "context.")
    assert list((tmp_path / "run").rglob("reconstructions/step_*.png"))  # drawn with the batch's index


def test_film_cnn_block_features_are_the_encoders_alone(make_cfg, tmp_path):
    ckpt = trained(make_cfg, tmp_path, "model=test_resnet", *SYNTHETIC)
    state = torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]
    assert "context.proj.weight" in state
    prep, on = features(make_cfg, ckpt)
    assert prep.context is None  # FiLM acts on the classifier's input, after the last stage
    assert prep.context_record["in_checkpoint"] and not prep.context_record["used"]
    assert prep.context_record["mode"] == "film"
    _, off = features(make_cfg, ckpt, "context=false")
    for name in on.features:
        np.testing.assert_array_equal(on.features[name], off.features[name])


def test_a_checkpoint_without_context_embeds_exactly_as_before(make_cfg, tmp_path):
    ckpt = trained(make_cfg, tmp_path, *VIT)
    prep, feats = features(make_cfg, ckpt)
    assert prep.context is None and prep.context_record == {"in_checkpoint": False, "used": False}
    loader = prep.datamodule.eval_dataloader("all")
    batch = loader.finish_batch(next(iter(loader)))
    with torch.no_grad():  # timm's own forward_intermediates, pooled as docs/benchmarks.md says
        outs = prep.backbone.forward_intermediates(
            batch["image"], return_prefix_tokens=True, norm=False, output_fmt="NLC", intermediates_only=True
        )
    at = np.searchsorted(feats.rows, np.asarray(batch["index"]))
    for name, (tokens, prefix) in zip(block_names(prep.backbone), outs):
        expected = torch.cat([tokens.mean(1), prefix[:, 0]], dim=1).numpy()
        np.testing.assert_allclose(feats.features[name][at], expected, rtol=1e-5, atol=1e-6)


SMALL_VIT = {"name": "vit_small_patch16_224", "img_size": 32, "kwargs": {"embed_dim": 32, "depth": 2, "num_heads": 2}}
SMALL_VIT["kwargs"]["patch_size"] = 8
OPT = {"name": "adamw", "base_lr": 1e-3, "weight_decay": 0.05, "betas": [0.9, 0.95]}
SCHED = {"warmup_fraction": 0.1, "min_lr_ratio": 0.01}


def test_block_probes_take_the_context_of_the_probed_encoder():
    vit, opt, sched = SMALL_VIT, OPT, SCHED
    table, groups = torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([0, 1, 1])
    torch.manual_seed(0)
    sup = SupervisedTask(vit, 3, 2, opt, sched, group_of_index=groups, context_table=table)
    dino = DINOTask(vit, 3, opt, sched, out_dim=16, head_hidden_dim=16, head_bottleneck_dim=8, local_crops=2,
                    group_of_index=groups, context_table=table)  # fmt: skip
    assert probe_context(SupervisedTask(vit, 3, 2, opt, sched)) is None
    assert probe_context(sup).module is sup.context
    assert probe_context(dino).module is dino.teacher.context  # DINO probes its teacher's backbone
    images = torch.randn(3, 3, 32, 32)
    site = probe_context(sup)
    with torch.no_grad():
        with_it = pooled_block_features(sup.backbone, images, None, site.module, site.cell_types([0, 1, 2], "cpu"))
        without = pooled_block_features(sup.backbone, images)
    assert [f.shape for f in with_it] == [f.shape for f in without]
    assert not torch.allclose(with_it[-1], without[-1], atol=1e-5)


def test_reconstruction_pictures_are_drawn_with_the_batch_context(tmp_path):
    torch.manual_seed(0)
    table, groups = torch.tensor([[3.0, 0.0], [0.0, -3.0]]), torch.tensor([0, 1])
    task = MAETask(SMALL_VIT, 3, OPT, SCHED, decoder_dim=32, decoder_depth=1, decoder_heads=4,
                   context_table=table, group_of_index=groups)  # fmt: skip
    trainer = L.Trainer(logger=False, enable_checkpointing=False, accelerator="cpu", default_root_dir=tmp_path)
    images = torch.randn(1, 3, 32, 32).expand(2, -1, -1, -1)  # one image, as cell types A and B
    callback = ReconstructionImages(every_n_steps=1, num_images=2, dirpath=str(tmp_path / "pictures"))
    callback.on_train_batch_end(trainer, task, None, {"image": images, "index": torch.tensor([0, 1])}, 0)
    drawn = np.asarray(Image.open(callback.written[0]))

    def grid(index):  # the picture of reconstruct() itself, with the callback's fixed masks
        out = task.eval().reconstruct(images, torch.Generator().manual_seed(0), index)
        return reconstruction_grid(out["target"], out["reconstruction"], out["mask"])

    np.testing.assert_array_equal(drawn, grid(torch.tensor([0, 1])))
    assert not np.array_equal(drawn, grid(None))  # drawn with the token, not without it
