"""DINO self-distillation (task=dino): the loss pieces against hand computations, the EMA teacher,
real fits of a tiny ViT and CA-ViT on the tiny screen, and the collapse detector on a collapsed control."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pandas as pd
import pytest
import torch

from cellrep.cli.train import train
from cellrep.models.backbone import build_backbone
from cellrep.models.checkpoint import load_backbone, load_encoder
from cellrep.training.tasks import dino_loss as dl
from cellrep.training.tasks.dino import DINOTask
from cellrep.training.tasks.dino_views import random_resized_crops, token_masks

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TINY_DINO = (  # ViT-S/16's architecture at 2 blocks of width 64, patch 8: 16 tokens at 32 px, 4 at 16 px
    "debug=tiny",
    "logger=csv",
    "task=dino",
    "+model.kwargs.embed_dim=64",
    "+model.kwargs.depth=2",
    "+model.kwargs.num_heads=4",
    "+model.kwargs.patch_size=8",
    "task.out_dim=256",
    "task.head_hidden_dim=64",
    "task.head_bottleneck_dim=32",
    "task.local_crops=2",
    "task.momentum_teacher=0.9",  # a 20-step run: the teacher must follow within it
    "task.probe_every_n_epochs=0",
    "trainer.enable_progress_bar=false",
    "test=false",
)
OPT = {"name": "adamw", "base_lr": 1e-3, "weight_decay": 0.04, "betas": [0.9, 0.999]}
SCHED = {"warmup_fraction": 0.1, "min_lr_ratio": 0.01}


def tiny_task(model: str = "vit_small_patch16_224", sched=SCHED, **kwargs) -> DINOTask:
    torch.manual_seed(0)
    spec = {"name": model, "img_size": 32, "kwargs": {"embed_dim": 64, "depth": 2, "num_heads": 4, "patch_size": 8}}
    return DINOTask(spec, 5, OPT, sched, out_dim=64, head_hidden_dim=32, head_bottleneck_dim=16, **kwargs)


def test_centering_subtracts_the_ema_center_before_the_sharp_softmax():
    logits = torch.tensor([[1.0, 0.0, -1.0], [3.0, 1.0, 2.0]])
    centers = dl.DINOCenters(3, 3, momentum=0.9)
    centers.center.copy_(torch.tensor([[0.5, -0.5, 0.0]]))
    probs = dl.teacher_probs(logits, "center", 0.5, centers, "center", update=True)
    expected = torch.softmax((logits - torch.tensor([0.5, -0.5, 0.0])) / 0.5, dim=-1)
    torch.testing.assert_close(probs, expected)  # the center from before this batch
    batch_mean = torch.tensor([2.0, 0.5, 0.5])
    torch.testing.assert_close(centers.center[0], 0.9 * torch.tensor([0.5, -0.5, 0.0]) + 0.1 * batch_mean)
    before = centers.center.clone()
    dl.teacher_probs(logits, "center", 0.5, centers, "center", update=False)  # validation: center unmoved
    torch.testing.assert_close(centers.center, before)


def test_sinkhorn_rows_sum_to_one_and_prototypes_share_the_batch():
    torch.manual_seed(0)
    logits = torch.randn(64, 8) * 0.3 + torch.tensor([0.5] + [0.0] * 7)  # prototype 0 favoured by every sample
    plain = torch.softmax(logits / 0.1, dim=-1)
    q = dl.sinkhorn_knopp(logits, 0.1, iterations=3)
    torch.testing.assert_close(q.sum(dim=1), torch.ones(64))
    share = q.sum(dim=0) / (64 / 8)  # 1 = an equal share
    plain_share = plain.sum(dim=0) / (64 / 8)
    assert (share - 1).abs().max() < 0.5 * (plain_share - 1).abs().max()  # three iterations go most of the way
    exact = dl.sinkhorn_knopp(logits, 0.1, iterations=200).sum(dim=0)
    torch.testing.assert_close(exact, torch.full((8,), 8.0), rtol=1e-3, atol=1e-3)


def test_dino_loss_pairs_different_views_and_averages_over_pairs():
    k = 5
    teacher = torch.softmax(torch.randn(2, 3, k), dim=-1)
    sg, sl = torch.randn(2, 3, k), torch.randn(4, 3, k)
    out = dl.dino_loss(sg, sl, teacher, 0.1)

    def ce(s, t):
        return -(t * torch.log_softmax(s / 0.1, dim=-1)).sum(-1).mean()

    glob = ce(sg[0], teacher[1]) + ce(sg[1], teacher[0])  # never a crop against itself
    loc = sum(ce(sl[i], teacher[j]) for i in range(4) for j in range(2))
    torch.testing.assert_close(out["loss"], (glob + loc) / (2 + 8))
    torch.testing.assert_close(out["global"] + out["local"], out["loss"])
    uniform = dl.dino_loss(torch.zeros(2, 3, k), torch.zeros(0, 3, k), torch.full((2, 3, k), 1 / k), 0.1)
    assert uniform["loss"].item() == pytest.approx(math.log(k))


def test_koleo_on_a_planted_configuration():
    square = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]]) * 3.0  # lengths do not matter
    assert dl.koleo(square).item() == pytest.approx(-math.log(math.sqrt(2)), abs=1e-6)
    pair = torch.tensor([[1.0, 0.0], [1.0, 0.01], [-1.0, 0.0], [-1.0, 0.01]])  # two tight pairs: far worse
    assert dl.koleo(pair).item() > dl.koleo(square).item() + 3


def test_ibot_loss_averages_each_masked_image_over_its_tokens():
    mask = torch.tensor([[True, True, False], [False, False, False], [False, True, False]])
    s, t = torch.randn(3, 4), torch.softmax(torch.randn(3, 4), dim=-1)
    ce = dl.cross_entropy(s, t, 0.1)
    expected = ((ce[0] + ce[1]) / 2 + ce[2]) / 3  # image 1 unmasked: counts as zero of three
    torch.testing.assert_close(dl.ibot_loss(s, t, mask, 0.1), expected)


def test_schedules_follow_dinov2():
    assert dl.teacher_temperature(0.0, 0.04, 0.07, 0.3) == pytest.approx(0.04)
    assert dl.teacher_temperature(0.15, 0.04, 0.07, 0.3) == pytest.approx(0.055)
    assert dl.teacher_temperature(0.3, 0.04, 0.07, 0.3) == dl.teacher_temperature(0.9, 0.04, 0.07, 0.3) == 0.07
    assert dl.teacher_momentum(0.0, 0.992) == pytest.approx(0.992)
    assert dl.teacher_momentum(0.5, 0.992) == pytest.approx(0.996)
    assert dl.teacher_momentum(1.0, 0.992) == pytest.approx(1.0)


def test_teacher_ema_update_is_exactly_the_formula():
    task = tiny_task()
    with torch.no_grad():
        for p in task.student.parameters():
            p.add_(torch.randn_like(p))
    before = [p.clone() for p in task.teacher.parameters()]
    dl.ema_update(task.teacher, task.student, 0.95)
    for t0, t1, s in zip(before, task.teacher.parameters(), task.student.parameters()):
        torch.testing.assert_close(t1, 0.95 * t0 + 0.05 * s, rtol=0, atol=1e-6)
    assert not any(p.requires_grad for p in task.teacher.parameters())


def test_views_and_masks():
    images = torch.arange(2 * 3 * 32 * 32, dtype=torch.float32).reshape(2, 3, 32, 32)
    full = random_resized_crops(images, 32, (1.0, 1.0), ratio=(1.0, 1.0), flip=False)
    torch.testing.assert_close(full, images)  # the whole image at its size: unchanged
    g = torch.Generator().manual_seed(3)
    local = random_resized_crops(images, 16, (0.05, 0.32), generator=g)
    again = random_resized_crops(images, 16, (0.05, 0.32), generator=torch.Generator().manual_seed(3))
    assert local.shape == (2, 3, 16, 16) and torch.equal(local, again)  # seeded: validation views repeat
    masks = token_masks(1000, 16, 0.5, (0.1, 0.5), "cpu", torch.Generator().manual_seed(0))
    masked = masks.any(dim=1)
    assert 0.45 < masked.float().mean() < 0.55
    frac = masks[masked].float().mean(dim=1)
    assert frac.min() >= 1 / 16 and frac.max() <= 0.5 + 1 / 32


@pytest.mark.parametrize("model", ["vit_small_patch16_224", "ca_vit_small_patch16"])
@pytest.mark.parametrize("in_chans", [3, 11])
def test_any_channel_count_with_local_crops_and_ibot(model, in_chans):
    task = tiny_task(model, local_crops=2, ibot_weight=1.0, ibot_mask_probability=1.0)
    task.hparams.in_chans = in_chans
    images = torch.randn(4, in_chans, 32, 32) if model.startswith("ca_") else None
    if images is None:  # a timm ViT fixes its channel count at construction
        task = DINOTask(
            {**task.hparams.model},
            in_chans,
            OPT,
            SCHED,
            out_dim=64,
            head_hidden_dim=32,
            head_bottleneck_dim=16,
            local_crops=2,
            ibot_weight=1.0,
            ibot_mask_probability=1.0,
        )
        images = torch.randn(4, in_chans, 32, 32)
    out, metrics = task(images)
    out["loss"].backward()
    assert {"dino_global", "dino_local", "koleo", "ibot", "kl"} <= set(out) and torch.isfinite(out["loss"])
    assert task.student.mask_token.grad is not None and task.student.mask_token.grad.abs().sum() > 0
    assert all(p.grad is None for p in task.teacher.parameters())


def test_collapsed_teacher_triggers_the_detector():
    constant = torch.softmax(torch.tensor([3.0, 0.0, 0.0, 0.0]), dim=-1).expand(32, 4)  # every image alike
    feats = torch.ones(32, 16)
    metrics = dl.collapse_metrics(constant, torch.randn(32, 16), feats)
    reasons = dl.collapse_reasons(metrics, 0.01)
    assert len(reasons) == 2 and "same target" in reasons[0] and "teacher embeddings" in reasons[1]
    healthy = dl.collapse_metrics(torch.eye(4).repeat(8, 1) * 0.9 + 0.025, torch.randn(32, 16), torch.randn(32, 16))
    assert dl.collapse_reasons(healthy, 0.01) == []
    # through the task: a teacher whose output is constant (prototypes all one direction)
    task = tiny_task(sched={**SCHED, "warmup_fraction": 0.0})  # judged from step 0
    with torch.no_grad():
        task.teacher.dino_head.mlp[-1].weight.zero_()
    _, m = task(torch.randn(16, 5, 32, 32))
    with pytest.warns(UserWarning, match="DINO collapse at step 0: the teacher gives every image the same target"):
        task._check_collapse(m)


def _metrics(run):
    return pd.read_csv(run / "csv" / "metrics.csv")


def test_dino_fit_learns_without_collapse_and_its_teacher_probes(make_cfg, tmp_path):
    cfg = make_cfg(
        *TINY_DINO,
        "model=vit_s16",
        "trainer.max_epochs=-1",
        "trainer.max_steps=27",
        "trainer.log_every_n_steps=1",
        "task.optimizer.base_lr=1e-2",
        "task.centering=sinkhorn",
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train(cfg)
    assert not [w for w in caught if "DINO collapse" in str(w.message)]
    run = tmp_path / "run"
    log = _metrics(run)
    kl = log["val/kl"].dropna().to_numpy()  # fixed views: moves only because the model does
    assert len(kl) >= 3 and np.isfinite(log["train/loss"].dropna()).all()
    assert kl[-1] < kl[0], kl
    assert log["collapse/teacher_std"].dropna().min() > 0.1
    backbone, info = load_backbone(run / "checkpoints" / "last.ckpt")
    ckpt = torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)["state_dict"]
    teacher = {k[len("teacher.backbone.") :]: v for k, v in ckpt.items() if k.startswith("teacher.backbone.")}
    student = {k[len("student.backbone.") :]: v for k, v in ckpt.items() if k.startswith("student.backbone.")}
    for key, value in backbone.state_dict().items():
        torch.testing.assert_close(value, teacher[key])  # the teacher is the encoder
    assert any(not torch.equal(teacher[k], student[k]) for k in teacher)
    assert info["model"]["name"] == "vit_small_patch16_224"
    assert backbone(torch.randn(2, 6, 32, 32)).shape == (2, 64)


def test_channel_agnostic_dino_fits_and_its_checkpoint_loads(make_cfg, tmp_path):
    cfg = make_cfg(
        *TINY_DINO, "model=ca_vit_s16", "task.ibot_weight=1.0", "trainer.max_epochs=1", "trainer.log_every_n_steps=1"
    )
    train(cfg)
    log = _metrics(tmp_path / "run")
    assert np.isfinite(log["train/ibot"].dropna()).all() and np.isfinite(log["val/loss"].dropna()).all()
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    backbone, info = load_backbone(last)
    assert info["model"]["name"] == "ca_vit_small_patch16"
    # the same weights take another channel count, and task.init_from finds the teacher
    assert backbone.forward_features(torch.randn(2, 3, 32, 32)).shape == (2, 1 + 3 * 16, 64)
    fresh = build_backbone("ca_vit_small_patch16", in_chans=6, embed_dim=64, depth=2, num_heads=4, patch_size=8)
    assert load_encoder(fresh, last) == []
    torch.testing.assert_close(fresh.state_dict(), backbone.state_dict())


def test_bad_dino_options_fail_when_the_config_is_composed(make_cfg):
    from cellrep.config import to_schema
    from cellrep.errors import CellrepError

    assert to_schema(make_cfg("task=dino", "model=vit_s16"))["task"].out_dim == 4096
    with pytest.raises(CellrepError, match="centering"):
        to_schema(make_cfg("task=dino", "task.centering=mean"))
    with pytest.raises(CellrepError, match="local_crops_scale"):
        to_schema(make_cfg("task=dino", "task.local_crops_scale=[0.5,0.1]"))
    with pytest.raises(CellrepError, match="task=dino needs a ViT"):
        DINOTask({"name": "resnet18"}, 3, OPT, SCHED)
