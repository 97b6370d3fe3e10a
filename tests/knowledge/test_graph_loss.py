"""Graph losses (docs/FEWSHOT.md) against hand-computed values, and what their gradients do."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from cellrep.knowledge.graph_loss import graph_contrastive_loss, laplacian_loss

# Three perturbations, edges 0–1 (weight 1) and 1–2 (weight 0.5); 3 is present without edges, 4 is absent.
W = torch.zeros(5, 5)
W[0, 1] = W[1, 0] = 1.0
W[1, 2] = W[2, 1] = 0.5
PRESENT = torch.tensor([True, True, True, True, False])
# Samples whose perturbation means are f0 = (1, 0), f1 = (0, 1), f2 ∝ (1, 1).
X = torch.tensor([[1.0, 0.5], [1.0, -0.5], [0.0, 3.0], [2.0, 2.0]])
Y = torch.tensor([0, 0, 1, 2])
C = 1 / math.sqrt(2)  # cos(f0, f2) = cos(f1, f2)


def test_contrastive_matches_hand_computation():
    t = 0.1
    log_p01 = -math.log(1 + math.exp(C / t))  # row 0: candidates 1 (cos 0) and 2 (cos C)
    log_p12 = C / t - math.log(1 + math.exp(C / t))  # row 1: candidates 0 (cos 0) and 2 (cos C)
    log_p10 = -math.log(1 + math.exp(C / t))
    log_p21 = math.log(0.5)  # row 2: candidates 0 and 1 both at cos C
    rows = [-log_p01, -(1.0 * log_p10 + 0.5 * log_p12) / 1.5, -log_p21]
    loss = graph_contrastive_loss(X, Y, W, PRESENT, temperature=t)
    assert loss.item() == pytest.approx(sum(rows) / 3, rel=1e-5)


def test_laplacian_matches_hand_computation():
    d = [1.0, 1.5, 0.5]
    f = [torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0]), torch.tensor([C, C])]
    edges = [(0, 1, 1.0), (1, 2, 0.5)]
    by_edges = sum(w * float(((f[i] / math.sqrt(d[i]) - f[j] / math.sqrt(d[j])) ** 2).sum()) for i, j, w in edges)
    # the same trace written out: Σ_i |f_i|² − Σ_ij A_ij f_i·f_j / √(d_i d_j)
    by_trace = 3 - 2 * (1.0 * 0.0 / math.sqrt(1.5) + 0.5 * C / math.sqrt(1.5 * 0.5))
    assert by_edges == pytest.approx(by_trace)
    assert laplacian_loss(X, Y, W, PRESENT).item() == pytest.approx(by_trace / 3, rel=1e-5)


@pytest.mark.parametrize("loss_fn", [graph_contrastive_loss, laplacian_loss])
def test_absent_perturbations_do_not_change_the_loss(loss_fn):
    extra_x = torch.cat([X, torch.tensor([[5.0, -1.0], [0.3, 0.3]])])
    extra_y = torch.cat([Y, torch.tensor([4, 4])])  # perturbation 4 is not a node of the graph
    assert loss_fn(extra_x, extra_y, W, PRESENT).item() == pytest.approx(loss_fn(X, Y, W, PRESENT).item())


def test_rows_without_neighbours_in_the_batch_are_left_out():
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    y = torch.tensor([0, 2, 3])  # 0 and 2 are not linked; 3 has no edges
    assert graph_contrastive_loss(x, y, W, PRESENT).item() == 0.0
    assert laplacian_loss(x, y, W, PRESENT).item() == 0.0
    w = W.clone()
    w[2, 3] = w[3, 2] = 1.0  # now 2–3 is an edge; row 0 (no neighbour) still does not count
    t = 0.1
    row2 = -math.log(math.exp(C / t) / (1 + math.exp(C / t)))  # candidates 0 (cos 0) and 3 (cos C)
    row3 = math.log(2)  # candidates 0 and 2, both at cos C
    expected = (row2 + row3) / 2
    assert graph_contrastive_loss(x, y, w, PRESENT, t).item() == pytest.approx(expected, rel=1e-5)


def test_loss_is_zero_but_differentiable_without_connected_pairs():
    x = torch.randn(4, 3, requires_grad=True)
    loss = graph_contrastive_loss(x, torch.tensor([0, 0, 4, 4]), W, PRESENT)
    loss.backward()
    assert loss.item() == 0.0 and torch.all(x.grad == 0)


def _mean_cos(x, y, a, b):
    return F.cosine_similarity(x[y == a].mean(0), x[y == b].mean(0), dim=0).item()


@pytest.mark.parametrize("name", ["graph_contrastive", "laplacian"])
def test_a_gradient_step_pulls_connected_perturbations_together(name):
    torch.manual_seed(0)
    w = torch.zeros(5, 5)
    w[0, 1] = w[1, 0] = 1.0
    w[2, 3] = w[3, 2] = 0.7
    present = torch.ones(5, dtype=torch.bool)
    y = torch.arange(5).repeat_interleave(3)  # 4 is present but isolated
    x = torch.randn(len(y), 8, requires_grad=True)
    loss_fn = {"graph_contrastive": graph_contrastive_loss, "laplacian": laplacian_loss}[name]
    loss_fn(x, y, w, present).backward()
    after = (x - 0.05 * x.grad).detach()
    connected = [(0, 1), (2, 3)]
    unconnected = [(0, 2), (0, 3), (1, 2), (1, 3), (0, 4), (1, 4), (2, 4), (3, 4)]
    gain = {p: _mean_cos(after, y, *p) - _mean_cos(x.detach(), y, *p) for p in connected + unconnected}
    assert all(gain[p] > 1e-3 for p in connected), gain
    assert min(gain[p] for p in connected) > max(gain[p] for p in unconnected), gain
    if name == "graph_contrastive":  # non-neighbours are pushed apart, on average
        assert sum(gain[p] for p in unconnected) / len(unconnected) < 0, gain
    else:  # the Laplacian only acts along edges: the isolated perturbation gets no gradient
        assert torch.all(x.grad[y == 4] == 0)


def _graph_kwargs():
    return {
        "graph_loss": "graph_contrastive",
        "graph_weight": 1.0,
        "graph_temperature": 0.1,
        "graph_weights": W,
        "graph_present": PRESENT,
    }


def test_supervised_task_adds_the_graph_loss_to_cross_entropy(one_torch_thread):
    from cellrep.training.tasks.supervised import SupervisedTask

    torch.manual_seed(0)
    opt = {"name": "adamw", "base_lr": 1e-3, "weight_decay": 0.05, "betas": [0.9, 0.999]}
    task = SupervisedTask(
        model={"name": "test_resnet"},
        in_chans=3,
        num_classes=5,
        optimizer=opt,
        scheduler={"warmup_fraction": 0.1, "min_lr_ratio": 0.01},
        **_graph_kwargs(),
    )
    batch = {"image": torch.randn(6, 3, 32, 32), "label": torch.tensor([0, 0, 1, 1, 2, 4]), "index": torch.arange(6)}
    ce, _, extra = task._losses(batch)
    assert extra is not None and extra.item() > 0
    total = task.training_step(batch, 0)
    torch.testing.assert_close(total, ce + extra)
    total.backward()
    assert all(p.grad is not None for p in task.backbone.parameters() if p.requires_grad)


def test_mae_task_applies_the_graph_loss_to_pooled_encoder_features(one_torch_thread):
    from cellrep.training.tasks.mae import MAETask

    torch.manual_seed(0)
    task = MAETask(
        {
            "name": "vit_small_patch16_224",
            "img_size": 32,
            "kwargs": {"embed_dim": 32, "depth": 1, "num_heads": 2, "patch_size": 8},
        },
        3,
        {"name": "adamw", "base_lr": 1e-3, "weight_decay": 0.05, "betas": [0.9, 0.95]},
        {"warmup_fraction": 0.1, "min_lr_ratio": 0.01},
        decoder_dim=32,
        decoder_depth=1,
        decoder_heads=4,
        **_graph_kwargs(),
    )
    images, labels = torch.randn(6, 3, 32, 32), torch.tensor([0, 0, 1, 1, 2, 4])
    gen = lambda: torch.Generator().manual_seed(1)  # noqa: E731 — the same masks for both calls
    with_graph, without = task(images, gen(), labels=labels), task(images, gen())
    assert "graph" in with_graph and "graph" not in without  # validation (no labels) stays the plain MAE loss
    torch.testing.assert_close(with_graph["loss"], without["loss"] + with_graph["graph"])
    with_graph["graph"].backward()
    assert task.mae.encoder.blocks[0].attn.qkv.weight.grad.abs().sum() > 0
