"""The cell-type context token in self-supervised pretraining (task=mae, task=dino; docs/FEWSHOT.md):
what the encoder sees, what the decoder and heads see, the EMA teacher's projection, real tiny runs
whose checkpoints embed through cellrep-probe, and the refusal for a CNN."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from cellrep.cli.probe import probe
from cellrep.cli.train import train
from cellrep.config import to_schema
from cellrep.errors import CellrepError
from cellrep.models.checkpoint import load_backbone
from cellrep.training.tasks import dino_loss
from cellrep.training.tasks.dino import DINOTask
from cellrep.training.tasks.mae import MAETask

pytestmark = pytest.mark.usefixtures("one_torch_thread")

OPT = {"name": "adamw", "base_lr": 1e-3, "weight_decay": 0.05, "betas": [0.9, 0.95]}
SCHED = {"warmup_fraction": 0.1, "min_lr_ratio": 0.01}
VIT = {"name": "vit_small_patch16_224", "img_size": 32, "kwargs": {"embed_dim": 32, "depth": 2, "num_heads": 2}}
VIT["kwargs"]["patch_size"] = 8  # 16 patch tokens at 32 px, 4 at a 16-px local crop
# cell types A, B, C; C is described exactly like A. Index rows 0..3 are of A, B, C, A.
TABLE = torch.tensor([[1.0, 0.0, 2.0], [0.0, 1.0, -1.0], [1.0, 0.0, 2.0]])
GROUPS = torch.tensor([0, 1, 2, 0])
CONTEXT = {"context_table": TABLE, "group_of_index": GROUPS}
SMALL = (  # the tiny ViT of tests/training/test_mae.py and test_dino.py
    "debug=tiny",
    "logger=csv",
    "model=vit_s16",
    "+model.kwargs.embed_dim=64",
    "+model.kwargs.depth=2",
    "+model.kwargs.num_heads=4",
    "+model.kwargs.patch_size=8",
    "model.context_path=synthetic",
    "trainer.enable_progress_bar=false",
    "trainer.max_epochs=1",
    "trainer.log_every_n_steps=1",
    "task.probe_every_n_epochs=0",
    "test=false",
)
MAE_OPTS = ("task=mae", "task.decoder_dim=64", "task.decoder_depth=1", "task.decoder_heads=4")
DINO_OPTS = ("task=dino", "task.out_dim=128", "task.head_hidden_dim=64", "task.head_bottleneck_dim=32")
DINO_OPTS += ("task.local_crops=2",)


def mae_task(**kwargs) -> MAETask:
    torch.manual_seed(0)
    return MAETask(VIT, 3, OPT, SCHED, decoder_dim=32, decoder_depth=1, decoder_heads=4, **kwargs)


def dino_task(**kwargs) -> DINOTask:
    torch.manual_seed(0)
    return DINOTask(VIT, 3, OPT, SCHED, out_dim=64, head_hidden_dim=32, head_bottleneck_dim=16, local_crops=2, **kwargs)


def first_block_inputs(vit):
    seen = []
    handle = vit.blocks[0].register_forward_pre_hook(lambda module, args: seen.append(args[0].detach().clone()))
    return seen, handle


def test_mae_context_is_a_visible_token_and_the_decoder_sees_patches_only():
    task, plain = mae_task(**CONTEXT), mae_task()
    plain.mae.load_state_dict(task.mae.state_dict())  # same weights: only the context differs
    assert set(task.mae.state_dict()) == set(plain.mae.state_dict())  # the projection is outside the MAE
    images = torch.randn(1, 3, 32, 32).expand(4, -1, -1, -1)
    index = torch.tensor([0, 1, 2, 3])  # cell types A, B, C, A
    gen = lambda: torch.Generator().manual_seed(3)  # noqa: E731 — the same masks every call
    seen, handle = first_block_inputs(task.mae.encoder)
    with torch.no_grad():
        out = task.mae(images, 0.75, gen(), context=task._context(index))
        ref = plain.mae(images, 0.75, gen())
    handle.remove()
    n, keep = task.mae.num_prefix_tokens, 4  # 16 tokens, mask 0.75
    assert seen[0].shape[1] == n + 1 + keep  # prefix, the context token, the visible patches: never masked
    torch.testing.assert_close(seen[0][:, n], task.context(GROUPS[index]))
    assert out.pred.shape == ref.pred.shape == (4, 16, 8 * 8 * 3)  # the decoder reconstructs patches only
    assert out.latent.shape == ref.latent.shape == (4, n + keep, 32)  # the token is gone before the decoder
    torch.testing.assert_close(out.mask, ref.mask)
    with torch.no_grad():  # nothing masked (each sample draws its own mask): features of one image
        feats = task.mae.encode(images, 0.0, gen(), context=task._context(index))[0][:, n:].mean(1)
        bare = plain.mae.encode(images, 0.0, gen())[0][:, n:].mean(1)
    assert not torch.allclose(feats[0], feats[1], atol=1e-4)  # another vector, another encoding of one image
    torch.testing.assert_close(feats[0], feats[2])  # a cell type is its vector, not its id
    torch.testing.assert_close(feats[0], feats[3])
    assert not torch.allclose(feats[0], bare[0], atol=1e-4)  # the token does something
    losses = task(images, gen(), index=index)
    losses["loss"].backward()
    assert task.context.proj.weight.grad.abs().sum() > 0
    with pytest.raises(CellrepError, match="no index"):
        task(images, gen())


def test_dino_context_reaches_every_crop_of_student_and_teacher():
    task = dino_task(**CONTEXT)
    index = torch.tensor([0, 1, 2, 3])
    images = torch.randn(4, 3, 32, 32)
    s_seen, s_handle = first_block_inputs(task.student.backbone)
    t_seen, t_handle = first_block_inputs(task.teacher.backbone)
    task(images, torch.Generator().manual_seed(0), index=index)
    s_handle.remove(), t_handle.remove()
    n = task.student.num_prefix_tokens
    # teacher: 2 global crops (8 images); student: the global crops, then the 2 local ones (16-px, 4 patches)
    assert [x.shape[:2] for x in t_seen] == [(8, n + 1 + 16)]
    assert [x.shape[:2] for x in s_seen] == [(8, n + 1 + 16), (8, n + 1 + 4)]
    expected = task.student.context(GROUPS[index].repeat(2))  # crop-major: each crop holds every image once
    for x in s_seen:
        torch.testing.assert_close(x[:, n], expected)
    # same image, cell types A, B, C: the class token depends on the vector, not on the id
    with torch.no_grad():
        same = torch.randn(1, 3, 32, 32).expand(3, -1, -1, -1)
        cls = task.teacher(same, cell_types=torch.tensor([0, 1, 2]))["cls"]
        plain = task.teacher.backbone.forward_features(same)[:, 0]
    assert not torch.allclose(cls[0], cls[1], atol=1e-4)
    torch.testing.assert_close(cls[0], cls[2])
    assert not torch.allclose(cls[0], plain[0], atol=1e-4)
    assert cls.shape == plain.shape  # the heads see the usual class token


def test_dino_teacher_context_projection_is_the_ema_of_the_students():
    task = dino_task(**CONTEXT)
    t_proj, s_proj = task.teacher.context.proj, task.student.context.proj
    assert not t_proj.weight.requires_grad and s_proj.weight.requires_grad
    with torch.no_grad():
        s_proj.weight.add_(1.0)
    before_t, student = t_proj.weight.clone(), s_proj.weight.clone()
    dino_loss.ema_update(task.teacher, task.student, 0.9)
    torch.testing.assert_close(t_proj.weight, 0.9 * before_t + 0.1 * student)


def test_cnn_with_a_context_and_task_mae_is_one_clear_error(make_cfg):
    with pytest.raises(CellrepError, match="task=mae"):
        to_schema(make_cfg("task=mae", "model=resnet50", "model.context_path=synthetic"))
    cnn = {"name": "test_resnet"}
    with pytest.raises(CellrepError, match="task=dino needs a ViT"):
        DINOTask(cnn, 3, OPT, SCHED, **CONTEXT)


@pytest.mark.parametrize("task_opts", [MAE_OPTS, DINO_OPTS], ids=["mae", "dino"])
def test_tiny_ssl_run_with_a_context_trains_and_its_checkpoint_embeds(make_cfg, tmp_path, task_opts):
    train(make_cfg(*SMALL, *task_opts))
    run = tmp_path / "run"
    log = pd.read_csv(run / "csv" / "metrics.csv")
    assert np.isfinite(log["train/loss"].dropna()).all() and np.isfinite(log["val/loss"].dropna()).all()
    assert (run / "context.csv").is_file()  # the synthetic screen's vectors, written by the run
    ckpt = run / "checkpoints" / "last.ckpt"
    state = torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]
    proj = "context.proj.weight" if task_opts is MAE_OPTS else "teacher.context.proj.weight"
    assert proj in state  # the trained projection is in the checkpoint, outside the encoder's keys
    backbone, _ = load_backbone(ckpt)  # the encoder alone, as for any cellrep checkpoint
    assert backbone.forward_features(torch.randn(2, 6, 32, 32)).shape[-1] == 64
    out = probe(
        make_cfg(f"ckpt_path={ckpt}", f"paths.output_dir={tmp_path}/probe", "progress=false", config_name="probe")
    )
    assert out["num_sites"] > 0
