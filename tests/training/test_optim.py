import math

import pytest
import torch.nn as nn

from cellrep.errors import CellrepError
from cellrep.training.optim import build_optimizer, param_groups, scaled_lr, warmup_cosine


def test_lr_scales_linearly_with_global_batch():
    assert scaled_lr(1e-3, 256) == pytest.approx(1e-3)
    assert scaled_lr(1e-3, 1024) == pytest.approx(4e-3)


def test_no_weight_decay_on_biases_and_norms():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.LazyLinear(2))
    model(__import__("torch").zeros(1, 3, 5, 5))
    decay, no_decay = param_groups(model, 0.05)
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    assert {p.ndim for p in decay["params"]} == {2, 4}
    assert {p.ndim for p in no_decay["params"]} == {1}
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def test_warmup_then_cosine_to_floor():
    f = warmup_cosine(total_steps=100, warmup_fraction=0.1, min_lr_ratio=0.01)
    assert f(0) == pytest.approx(0.1)
    assert f(9) == pytest.approx(1.0)
    assert f(10) == pytest.approx(1.0)
    mid = 10 + 45
    assert f(mid) == pytest.approx(0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert f(100) == pytest.approx(0.01)
    values = [f(s) for s in range(10, 101)]
    assert all(a >= b for a, b in zip(values, values[1:])), "cosine phase must not increase"


@pytest.mark.parametrize("name", ["adamw", "sgd", "lion"])
def test_optimizers_build(name):
    opt = build_optimizer(nn.Linear(3, 2), name, lr=1e-3, weight_decay=0.1, betas=(0.9, 0.95))
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-3)


def test_unknown_optimizer_is_a_clear_error():
    with pytest.raises(CellrepError, match="unknown optimizer 'adamz'"):
        build_optimizer(nn.Linear(3, 2), "adamz", lr=1e-3, weight_decay=0.1, betas=(0.9, 0.95))


def test_tokens_and_position_embeddings_declared_by_timm_get_no_decay():
    from cellrep.models.backbone import build_backbone

    vit = build_backbone("vit_small_patch16_224", in_chans=3, num_classes=2, img_size=32)
    wrapper = nn.Module()
    wrapper.backbone = vit
    decay, no_decay = param_groups(wrapper, 0.05)
    exempt = {id(p) for p in no_decay["params"]}
    assert id(vit.cls_token) in exempt and id(vit.pos_embed) in exempt
    assert id(vit.patch_embed.proj.weight) not in exempt
