"""Cell-type context vectors: the file, the synthetic stand-in, and how ViTs and CNNs take them."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cellrep.errors import CellrepError
from cellrep.knowledge.context import context_matrix, read_context, synthetic_context, write_context
from cellrep.models.backbone import build_backbone
from cellrep.models.context import CellTypeContext, pooled_features, takes_context_token
from cellrep.training.tasks.supervised import SupervisedTask

pytestmark = pytest.mark.usefixtures("one_torch_thread")
OPT = {"name": "adamw", "base_lr": 1e-3, "weight_decay": 0.05, "betas": [0.9, 0.999]}
SCHED = {"warmup_fraction": 0.1, "min_lr_ratio": 0.01}
TINY_VIT = {
    "name": "vit_small_patch16_224",
    "img_size": 32,
    "kwargs": {"embed_dim": 32, "depth": 1, "num_heads": 2, "patch_size": 8},
}


def test_context_file_round_trip_and_order(tmp_path):
    path = tmp_path / "ctx.csv"
    path.write_text("cell_type,e0,e1\nHUVEC,1,2\nRPE,3,4\nU2OS,5,6\n")
    np.testing.assert_array_equal(context_matrix(path, ["U2OS", "HUVEC"]), [[5, 6], [1, 2]])
    assert list(read_context(path).columns) == ["e0", "e1"]


def test_missing_cell_type_names_it_and_the_file(tmp_path):
    path = tmp_path / "ctx.csv"
    path.write_text("cell_type,e0\nHUVEC,1\n")
    with pytest.raises(CellrepError, match=r"(?s)\['HepG2'\] have no context vector in .*ctx\.csv.*add a row"):
        context_matrix(path, ["HUVEC", "HepG2"])


@pytest.mark.parametrize(
    "text,match",
    [
        ("name,e0\nA,1\n", "columns"),
        ("cell_type,e0\nA,x\n", "non-numeric"),
        ("cell_type,e0\nA,1\nA,2\n", "more than once"),
    ],
)
def test_bad_context_files_are_clear(tmp_path, text, match):
    path = tmp_path / "ctx.csv"
    path.write_text(text)
    with pytest.raises(CellrepError, match=match):
        read_context(path)


def test_synthetic_context_is_deterministic_per_cell_type(tmp_path):
    spec = {"seed": 0, "channel_names": ["a", "b", "c"], "cell_types": ["HUVEC", "RPE"]}
    table = synthetic_context(spec)
    again = synthetic_context({**spec, "cell_types": ["RPE", "HUVEC", "U2OS"]})
    np.testing.assert_allclose(table.loc["RPE"], again.loc["RPE"])  # keyed by name, not by position
    assert not np.allclose(table.loc["RPE"], table.loc["HUVEC"])
    assert table.shape == (2, 10 + 2 * 3) and "nucleus_size" in table.columns  # 10 global parameters
    assert not np.allclose(synthetic_context({**spec, "seed": 1}).loc["RPE"], table.loc["RPE"])
    path = write_context(table, tmp_path / "ctx.csv")
    np.testing.assert_allclose(context_matrix(path, ["RPE"])[0], table.loc["RPE"], rtol=1e-5)


def make_task(model, table):
    torch.manual_seed(0)
    return SupervisedTask(
        model=model,
        in_chans=3,
        num_classes=5,
        optimizer=OPT,
        scheduler=SCHED,
        group_names=["A", "B", "C"],
        group_of_index=torch.tensor([0, 1, 2, 0]),
        context_table=table,
    )


@pytest.mark.parametrize("model,mode", [({"name": "test_resnet"}, "film"), (TINY_VIT, "token")])
def test_context_conditions_the_output_and_gets_gradients(model, mode):
    table = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])  # C is described exactly like A
    task = make_task(model, table)
    assert task.context.mode == mode and takes_context_token(task.backbone) == (mode == "token")
    if mode == "film":  # FiLM starts as the identity; give it something to do
        torch.nn.init.normal_(task.context.proj.weight)
    images = torch.randn(1, 3, 32, 32).expand(3, -1, -1, -1)
    logits = task(images, torch.tensor([0, 1, 2]))  # rows of cell types A, B, C
    assert logits.shape == (3, 5) and torch.isfinite(logits).all()
    assert not torch.allclose(logits[0], logits[1])  # a different vector changes the answer
    torch.testing.assert_close(logits[0], logits[2])  # a cell type is its vector, not an id
    logits.sum().backward()
    assert task.context.proj.weight.grad is not None and task.context.proj.weight.grad.abs().sum() > 0


def test_vit_context_projection_lives_outside_the_backbone():
    backbone = build_backbone(TINY_VIT["name"], 3, num_classes=0, img_size=32, **TINY_VIT["kwargs"])
    plain = set(build_backbone(TINY_VIT["name"], 3, num_classes=0, img_size=32, **TINY_VIT["kwargs"]).state_dict())
    assert set(backbone.state_dict()) == plain  # the projection lives outside the backbone
    context = CellTypeContext(torch.eye(2), backbone.num_features, "token")
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        context.proj.weight.zero_()
        context.proj.bias.zero_()
        backbone.eval()
        out = pooled_features(backbone, images, context, torch.tensor([0, 1]))
    assert out.shape == (2, backbone.num_features)


@pytest.mark.parametrize(
    "name,options",
    [
        ("vit_small_patch16_224", {"reg_tokens": 1, "pre_norm": True, "pos_drop_rate": 0.2, "patch_drop_rate": 0.3}),
        ("ca_vit_small_patch16", {}),
    ],
)
def test_the_context_token_joins_the_backbones_own_tokens(name, options):
    """The blocks see the backbone's own tokens, dropout draws included, with the context token after the prefix."""
    torch.manual_seed(0)
    backbone = build_backbone(name, 3, num_classes=0, img_size=32, **TINY_VIT["kwargs"], **options).train()
    context = CellTypeContext(torch.randn(2, 4), backbone.num_features, "token")
    seen = []
    backbone.blocks[0].register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    images, ids = torch.randn(2, 3, 32, 32), torch.tensor([0, 1])
    with torch.no_grad():
        torch.manual_seed(1)
        backbone.forward_features(images)
        torch.manual_seed(1)
        pooled_features(backbone, images, context, ids)
        plain, with_context = seen
        n = backbone.num_prefix_tokens
        expected = torch.cat([plain[:, :n], context(ids)[:, None], plain[:, n:]], dim=1)
    assert torch.equal(with_context, expected)


def test_film_starts_as_the_identity():
    task = make_task({"name": "test_resnet"}, torch.randn(3, 4))
    plain = make_task({"name": "test_resnet"}, None)
    plain.backbone.load_state_dict(task.backbone.state_dict())
    images = torch.randn(2, 3, 32, 32)
    task.eval(), plain.eval()
    torch.testing.assert_close(task(images, torch.tensor([0, 1])), plain(images))
