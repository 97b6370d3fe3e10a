"""SimCLR (task=simclr): NT-Xent against a loop over anchors, across two gloo ranks with uneven batches,
the views, and real fits on the tiny screen (a small ViT; a test ResNet with the graph prior, a cell-type
context and the block probes) whose checkpoints evaluation reads back."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from cellrep.cli.train import train
from cellrep.config import to_schema
from cellrep.errors import CellrepError
from cellrep.models.backbone import build_backbone
from cellrep.models.checkpoint import load_backbone, load_encoder
from cellrep.training.tasks import simclr_loss
from cellrep.training.tasks.dino_loss import spread
from cellrep.training.tasks.simclr import SimCLRTask
from cellrep.training.tasks.simclr_loss import nt_xent

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TINY_SIMCLR = (
    "debug=tiny",
    "logger=csv",
    "task=simclr",
    "task.projector_hidden_dim=128",
    "task.projector_dim=32",
    "task.probe_every_n_epochs=0",
    "trainer.enable_progress_bar=false",
    "trainer.log_every_n_steps=1",
    "test=false",
)
SMALL_VIT = (  # ViT-S/16's architecture at 2 blocks of width 64, patch 8: 16 tokens at 32 px
    "model=vit_s16",
    "+model.kwargs.embed_dim=64",
    "+model.kwargs.depth=2",
    "+model.kwargs.num_heads=4",
    "+model.kwargs.patch_size=8",
)
OPT = {"name": "adamw", "base_lr": 1e-3, "weight_decay": 1e-4, "betas": [0.9, 0.999]}
SCHED = {"warmup_fraction": 0.1, "min_lr_ratio": 0.01}


def per_anchor_nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> torch.Tensor:
    """The 2N anchors' losses one at a time, from the definition: -log e^{s(i,pos)} / Σ_{k≠i} e^{s(i,k)}."""
    z = F.normalize(torch.cat([z1, z2]), dim=-1)
    n = z1.shape[0]
    losses = []
    for i in range(2 * n):
        pos = (i + n) % (2 * n)
        sims = {k: float(z[i] @ z[k]) / temperature for k in range(2 * n) if k != i}
        losses.append(-sims[pos] + math.log(sum(math.exp(s) for s in sims.values())))
    return torch.tensor(losses)


def test_nt_xent_equals_the_loop_over_anchors():
    torch.manual_seed(0)
    z1, z2 = torch.randn(5, 3), torch.randn(5, 3) * 4  # lengths do not matter: cosines
    out = nt_xent(z1, z2, 0.5)
    torch.testing.assert_close(out["loss"], per_anchor_nt_xent(z1, z2, 0.5).mean())
    # accuracy: anchors whose nearest other view is their positive, here planted for two of four sites
    e = torch.eye(4)
    z1 = torch.stack([e[0], e[1], e[2], e[2] + 0.1 * e[3]])
    z2 = torch.stack([e[0], e[1], e[3], e[3] + 0.1 * e[2]])  # sites 2 and 3: each view nearer the other site
    assert nt_xent(z1, z2, 0.1)["accuracy"].item() == pytest.approx(4 / 8)


def test_nt_xent_is_lowest_when_the_views_match():
    n, t = 6, 0.1
    sites = torch.eye(8)[:n]  # orthogonal sites, identical views: the positive at cosine 1, negatives at 0
    best = nt_xent(sites, sites.clone(), t)["loss"]
    assert best.item() == pytest.approx(math.log1p((2 * n - 2) * math.exp(-1 / t)), abs=1e-6)  # float32
    torch.manual_seed(0)
    for noise in (0.3, 1.0, 3.0):  # views drifting apart cost more and more
        worse = nt_xent(sites, sites + noise * torch.randn(n, 8), t)["loss"]
        assert worse > best
    swapped = nt_xent(sites, sites.roll(1, dims=0), t)["loss"]  # each view matches another site
    assert swapped > math.log(2 * n - 1)  # worse than not knowing (all cosines equal)


# One rank of a 2-process gloo group. The loss module is loaded from its file, so a rank imports torch
# alone and not the whole package (lightning, timm: half a minute each on a busy 2-core machine).
RANK = """
import importlib.util, sys
import torch, torch.distributed as dist
rank, store, out, path = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
sizes = (3, 2)
spec = importlib.util.spec_from_file_location("simclr_loss", path)
loss_module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(loss_module)
dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=2)
torch.manual_seed(0)
z1, z2 = torch.randn(sum(sizes), 4), torch.randn(sum(sizes), 4)
mine = slice(0, sizes[0]) if rank == 0 else slice(sizes[0], sum(sizes))
a, b = z1[mine].clone().requires_grad_(), z2[mine].clone().requires_grad_()
loss = loss_module.nt_xent(a, b, 0.2)["loss"]
(loss * sizes[rank] / sum(sizes)).backward()  # this rank's share of the global mean
torch.save({"loss": loss.detach(), "g1": a.grad, "g2": b.grad}, f"{out}.{rank}")
dist.destroy_process_group()
"""


def test_negatives_come_from_every_rank_and_gradients_flow_back(tmp_path):
    # sizes (3, 2) sites: uneven, as an evaluation's last batches
    args = [str(tmp_path / "store"), str(tmp_path / "out"), simclr_loss.__file__]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    ranks = [subprocess.Popen([sys.executable, "-c", RANK, str(r), *args], env=env) for r in range(2)]
    assert [p.wait(timeout=300) for p in ranks] == [0, 0]
    ranks = [torch.load(tmp_path / f"out.{r}", weights_only=True) for r in range(2)]
    torch.manual_seed(0)
    z1, z2 = torch.randn(5, 4).requires_grad_(), torch.randn(5, 4).requires_grad_()
    every = per_anchor_nt_xent(z1.detach(), z2.detach(), 0.2)  # anchors 0-4 view 1, 5-9 view 2
    for r, rows in enumerate([[0, 1, 2], [3, 4]]):  # one process over all 5 sites, each rank's anchors
        anchors = rows + [5 + i for i in rows]
        torch.testing.assert_close(ranks[r]["loss"], every[anchors].mean(), rtol=1e-5, atol=1e-6)
    nt_xent(z1, z2, 0.2)["loss"].backward()
    torch.testing.assert_close(torch.cat([ranks[0]["g1"], ranks[1]["g1"]]), z1.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(torch.cat([ranks[0]["g2"], ranks[1]["g2"]]), z2.grad, rtol=1e-4, atol=1e-6)


def test_views_differ_from_each_other_and_repeat_under_a_seed():
    torch.manual_seed(0)
    task = SimCLRTask({"name": "test_resnet"}, 3, OPT, SCHED, projector_hidden_dim=16, projector_dim=8)
    images = torch.randn(4, 3, 32, 32)
    views = task.views(images, torch.Generator().manual_seed(1))
    assert views.shape == (8, 3, 32, 32) and not torch.allclose(views[:4], views[4:])
    torch.testing.assert_close(views, task.views(images, torch.Generator().manual_seed(1)))
    # the intensity jitter is per image and channel: a constant image stays constant within each channel
    flat = task.views(torch.ones(2, 3, 32, 32))
    assert flat.flatten(2).std(dim=2).max() < 1e-5 and flat.flatten(2).mean(dim=2).std() > 0.01
    assert spread(torch.ones(8, 16)) < 1e-6 and spread(torch.randn(256, 16)) > 0.9


def test_a_channel_sampled_batch_and_a_context_token_reach_the_ca_vit():
    spec = {"name": "ca_vit_small_patch16", "img_size": 32, "kwargs": {"embed_dim": 64, "depth": 2, "num_heads": 4}}
    torch.manual_seed(0)
    table, groups = torch.randn(2, 3), torch.tensor([0, 1, 1, 0])
    task = SimCLRTask(spec, 5, OPT, SCHED, 32, 16, context_table=table, group_of_index=groups).eval()
    images, g = torch.randn(4, 3, 32, 32), torch.Generator().manual_seed(0)
    out, _ = task(images, g, index=torch.arange(4), channel_ids=torch.tensor([0, 2, 4]))
    out["loss"].backward()
    assert torch.isfinite(out["loss"]) and task.context.proj.weight.grad.abs().sum() > 0
    other, _ = task(
        images, torch.Generator().manual_seed(0), index=torch.arange(4), channel_ids=torch.tensor([1, 2, 3])
    )
    assert not torch.allclose(out["loss"], other["loss"])  # the slots are the channels' identities


def _metrics(run):
    return pd.read_csv(run / "csv" / "metrics.csv")


def _epoch_means(log: pd.DataFrame, column: str) -> np.ndarray:
    return log.dropna(subset=[column]).groupby("epoch")[column].mean().to_numpy()


def test_simclr_vit_learns_without_collapse_and_its_backbone_is_the_encoder(make_cfg, tmp_path):
    train(make_cfg(*TINY_SIMCLR, *SMALL_VIT, "trainer.max_epochs=4"))
    run = tmp_path / "run"
    log = _metrics(run)
    val = log["val/loss"].dropna().to_numpy()  # fixed views: moves only because the model does
    train_loss = _epoch_means(log, "train/loss")
    assert len(val) == 4 and val[-1] < val[0] - 0.2, val  # measured: 1.94 → 1.38
    assert train_loss[-1] < train_loss[0], train_loss
    assert log["collapse/backbone_std"].dropna().min() > 0.1 and log["collapse/projection_std"].dropna().min() > 0.1
    last = run / "checkpoints" / "last.ckpt"
    backbone, info = load_backbone(last)
    state = torch.load(last, map_location="cpu", weights_only=True)["state_dict"]
    assert any(k.startswith("projector.") for k in state)  # kept in the checkpoint, not in the encoder
    for key, value in backbone.state_dict().items():
        torch.testing.assert_close(value, state[f"backbone.{key}"])
    assert info["model"]["name"] == "vit_small_patch16_224" and info["num_classes"] is None
    assert backbone(torch.randn(2, 6, 32, 32)).shape == (2, 64)
    fresh = build_backbone(
        "vit_small_patch16_224", in_chans=6, img_size=32, embed_dim=64, depth=2, num_heads=4, patch_size=8
    )
    assert load_encoder(fresh, last) == []  # task.init_from finds it


def test_simclr_resnet_with_graph_prior_context_and_block_probes(make_cfg, tmp_path):
    cfg = make_cfg(
        *TINY_SIMCLR,
        "model=test_resnet",
        "model.context_path=synthetic",
        "task.graph_loss=graph_contrastive",
        "task.graph_weight=0.5",
        "task.probe_every_n_epochs=2",  # once, at the last epoch
    )
    train(cfg)
    run = tmp_path / "run"
    log = _metrics(run)
    graph, nt = log["train/graph"].dropna(), log["train/nt_xent"].dropna()
    assert len(graph) == len(nt) > 0 and np.isfinite(graph).all() and (graph > 0).all()
    rows = log.dropna(subset=["train/loss"])
    torch.testing.assert_close(
        torch.tensor(rows["train/loss"].to_numpy()),
        torch.tensor((rows["train/nt_xent"] + 0.5 * rows["train/graph"]).to_numpy()),
        rtol=1e-5,
        atol=1e-5,
    )
    metrics = json.loads((run / "metrics.json").read_text())
    assert 0.0 <= metrics["probe/best_acc"] <= 1.0 and "probe/best_block" in metrics
    last = run / "checkpoints" / "last.ckpt"
    state = torch.load(last, map_location="cpu", weights_only=True)["state_dict"]
    assert state["context.proj.weight"].abs().sum() > 0  # FiLM starts at zero: the context took part
    backbone, _ = load_backbone(last)
    assert backbone(torch.randn(2, 6, 32, 32)).ndim == 2


def test_bad_simclr_options_fail_when_the_config_is_composed(make_cfg):
    task = to_schema(make_cfg("task=simclr"))["task"]
    assert (task.projector_hidden_dim, task.projector_dim, task.temperature, task.probe_every_n_epochs) == (
        2048,
        128,
        0.1,
        5,
    )
    with pytest.raises(CellrepError, match="temperature"):
        to_schema(make_cfg("task=simclr", "task.temperature=0"))
    with pytest.raises(CellrepError, match="crops_scale"):
        to_schema(make_cfg("task=simclr", "task.crops_scale=[0.9,0.2]"))
    with pytest.raises(CellrepError, match="intensity_jitter"):
        to_schema(make_cfg("task=simclr", "task.intensity_jitter=-1"))
