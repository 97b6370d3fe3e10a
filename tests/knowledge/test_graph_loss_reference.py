"""The authors' per-sample graph losses (docs/FEWSHOT.md, "Two forms of the graph losses") against
explicit loops over their definition, against our per-perturbation forms, and what they reward."""

from __future__ import annotations

import math

import pytest
import torch

from cellrep.config import GraphPriorConfig
from cellrep.knowledge.graph_loss import (
    GRAPH_LOSSES,
    graph_contrastive_loss,
    graph_contrastive_reference_loss,
    graph_loss,
    laplacian_loss,
    laplacian_reference_loss,
)

# Perturbations 0–1 (weight 1) and 1–2 (weight 0.5) are linked; 3 is absent from the graph (zero row).
W = torch.zeros(4, 4)
W[0, 1] = W[1, 0] = 1.0
W[1, 2] = W[2, 1] = 0.5
PRESENT = torch.tensor([True, True, True, False])
# Repeated labels (two samples of 0, two of 1) and one sample of the absent perturbation 3.
Y = torch.tensor([0, 0, 1, 2, 3, 1])
X = torch.tensor(
    [[1.0, 0.2, 0.0], [0.8, -0.3, 0.1], [0.0, 2.0, 0.5], [1.0, 1.0, 1.0], [-0.5, 0.3, 2.0], [0.3, 1.5, -0.4]]
)
T = 0.1


def _unit(v):
    n = math.sqrt(sum(c * c for c in v))
    return [c / n for c in v]


def _dot(u, v):
    return sum(a * b for a, b in zip(u, v))


def _sample_weights(y, w):
    """A_bc = W[y_b, y_c] off the diagonal, 0 on it (nested lists)."""
    return [[0.0 if b == c else float(w[y[b], y[c]]) for c in range(len(y))] for b in range(len(y))]


def hand_contrastive(x, y, w, t):
    f = [_unit(row) for row in x.tolist()]
    a = _sample_weights(y.tolist(), w)
    total = 0.0
    for b in range(len(f)):
        scores = [0.0 if c == b else _dot(f[b], f[c]) / t for c in range(len(f))]  # own score zeroed, kept
        log_z = math.log(sum(math.exp(s) for s in scores))
        total += -sum(a[b][c] * (scores[c] - log_z) for c in range(len(f)))
    return total / len(f)  # every row counts, neighbours or not


def hand_laplacian(x, y, w):
    f = [_unit(row) for row in x.tolist()]
    a = _sample_weights(y.tolist(), w)
    d = [sum(row) for row in a]
    total = 0.0  # trace(Fᵀ L F) = Σ_bc L_bc f_b·f_c
    for b in range(len(f)):
        for c in range(len(f)):
            lap = (1.0 if b == c else 0.0) - a[b][c] / math.sqrt((d[b] + 1e-6) * (d[c] + 1e-6))
            total += lap * _dot(f[b], f[c])
    return total


def test_reference_forms_are_selectable_by_name():
    assert {"graph_contrastive_reference", "laplacian_reference"} <= set(GRAPH_LOSSES)
    GraphPriorConfig(graph_loss="laplacian_reference")  # the config accepts them
    assert graph_loss("graph_contrastive_reference", X, Y, W, PRESENT, T).item() == pytest.approx(
        hand_contrastive(X, Y, W, T), rel=1e-5
    )
    assert graph_loss("laplacian_reference", X, Y, W, PRESENT).item() == pytest.approx(
        hand_laplacian(X, Y, W), rel=1e-5
    )


@pytest.mark.parametrize("t", [T, 1.0])  # at τ = 1 the kept exp(0) self term weighs in every softmax
def test_contrastive_reference_matches_the_loops(t):
    got = graph_contrastive_reference_loss(X, Y, W, t).item()
    assert got == pytest.approx(hand_contrastive(X, Y, W, t), rel=1e-5)
    assert got > 0


def test_laplacian_reference_matches_the_loops():
    got = laplacian_reference_loss(X, Y, W).item()
    assert got == pytest.approx(hand_laplacian(X, Y, W), rel=1e-5)
    # the samples without a neighbour (the absent perturbation's) add ‖f‖² = 1 each: not averaged away
    assert got > 1


def test_reference_forms_differ_from_ours_on_the_same_batch():
    ours_c, ref_c = graph_contrastive_loss(X, Y, W, PRESENT, T).item(), graph_contrastive_reference_loss(X, Y, W, T)
    ours_l, ref_l = laplacian_loss(X, Y, W, PRESENT).item(), laplacian_reference_loss(X, Y, W)
    assert abs(ours_c - ref_c.item()) > 0.05 * abs(ours_c), (ours_c, ref_c)
    assert abs(ours_l - ref_l.item()) > 0.05 * abs(ours_l), (ours_l, ref_l)


def test_two_samples_of_one_perturbation_are_not_neighbours_in_the_reference():
    """Per sample, A = W[u, u] = 0 for two samples of one perturbation: alone in a batch they are two
    rows without neighbours (our form would see a single perturbation mean)."""
    x, y = torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([0, 0])
    assert graph_contrastive_reference_loss(x, y, W, T).item() == 0.0
    assert laplacian_reference_loss(x, y, W).item() == pytest.approx(2.0)  # two isolated samples: 1 + 1


def test_absent_samples_are_negatives_in_the_reference_only():
    """Our form ignores the absent perturbation's sample; the reference keeps it in the softmaxes."""
    moved = X.clone()
    moved[4] = X[2]  # the absent sample now sits exactly on a sample of perturbation 1
    assert graph_contrastive_loss(moved, Y, W, PRESENT, T).item() == pytest.approx(
        graph_contrastive_loss(X, Y, W, PRESENT, T).item()
    )
    assert graph_contrastive_reference_loss(moved, Y, W, T).item() != pytest.approx(
        graph_contrastive_reference_loss(X, Y, W, T).item(), rel=1e-3
    )


@pytest.mark.parametrize("loss_fn", [graph_contrastive_reference_loss, laplacian_reference_loss])
def test_pulling_graph_neighbours_together_lowers_the_reference_loss(loss_fn):
    kwargs = {"temperature": T} if loss_fn is graph_contrastive_reference_loss else {}
    before = loss_fn(X, Y, W, **kwargs).item()
    pulled = X.clone()
    anchor = torch.nn.functional.normalize(X[Y == 0].mean(0), dim=0)
    pulled[Y == 1] = 0.5 * torch.nn.functional.normalize(X[Y == 1], dim=1) + 0.5 * anchor  # 1 halfway to 0
    assert loss_fn(pulled, Y, W, **kwargs).item() < before
    # and a gradient step lowers it and raises the cosine of every linked pair of samples
    x = X.clone().requires_grad_(True)
    loss_fn(x, Y, W, **kwargs).backward()
    after = (x - 0.05 * x.grad).detach()
    assert loss_fn(after, Y, W, **kwargs).item() < before
    cos = lambda z, b, c: torch.nn.functional.cosine_similarity(z[b], z[c], dim=0).item()  # noqa: E731
    for b, c in [(0, 2), (1, 5), (2, 3), (3, 5)]:  # (0, 1) and (1, 2) pairs of samples
        assert cos(after, b, c) > cos(X, b, c), (b, c)
